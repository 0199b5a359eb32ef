"""Stage evaluate: test-split metrics of teacher and student, reliability and confusion plot data;
validation-split accuracy and NLL (what a model may be selected on); and, where p* is known, the
teacher on the transfer set: its distance to p* on the un-augmented training split, at T = 1 and at
the distillation method's temperature. The models predict on compute.device, in float32."""

import numpy as np

from bayeskd import calibration, data, metrics, nets
from bayeskd.io import csv_text, json_text, outputs
from bayeskd.tracking import read_curves
from bayeskd.train import predict
from common import DATA, STUDENT, TEACHER, build, params, stage, tensors

METRICS = "reports/metrics.json"
PLOTS = "reports/plots"
TEACHER_CURVES = "dvclive/teacher"


def validation(model, ds: data.Dataset, device: str) -> dict[str, float]:
    """Accuracy and NLL on the validation split ({} without one)."""
    val = tensors(ds, "val")
    if val is None:
        return {}
    logits, y = predict(model, val[0], device=device).numpy(), val[1].numpy()
    return {"val_accuracy": float((logits.argmax(1) == y).mean()), "val_nll": calibration.nll(logits, y)}


def transfer_set(model, temperature: float | None, device: str) -> dict[str, float]:
    """The teacher's accuracy on the un-augmented training split and its distance to p* there
    (metrics.transfer), for a dataset whose p* is known."""
    ds = data.load(DATA, ("train",))
    probs = metrics.softmax(predict(model, tensors(ds, "train")[0], device=device).numpy())
    train = ds.splits["train"]
    return ({"train_accuracy": float((probs.argmax(1) == train.y).mean())}
            | metrics.transfer(probs, train.p, temperature))


def training(p) -> dict[str, float]:
    """The teacher's training plateau (metrics.plateau of its per-epoch training accuracy over its
    first learning-rate phase) and, for ce_ts, its calibration temperature."""
    optim, out = p.teacher.optim, {}
    curve = [v for k, v, _ in sorted(read_curves(TEACHER_CURVES, "teacher"), key=lambda r: r[2])
             if k == "teacher/train/acc"]
    phase = next((m for m in optim.milestones if m < optim.epochs), optim.epochs)
    if (rise := metrics.plateau(curve, phase)) is not None:
        out["plateau"] = rise
    if calibration.METADATA_KEY in (meta := nets.read_metadata(TEACHER)):
        out["calibration_temperature"] = float(meta[calibration.METADATA_KEY])
    return out


def main() -> None:
    p = params()
    ds = data.load(DATA, ("val", "test"))
    x, _ = tensors(ds, "test")
    test = ds.splits["test"]
    bins = p.evaluate.ece_bins
    out, probs = {}, {}
    for role, net, weights in (("teacher", p.teacher.net, TEACHER), ("student", p.student.net, STUDENT)):
        model = nets.load_weights(build(role, net, ds), weights)
        probs[role] = metrics.softmax(predict(model, x, device=p.compute.device).numpy())
        out[role] = (metrics.summary(probs[role], test.y, bins, test.p)
                     | validation(model, ds, p.compute.device))
        if role == "teacher":
            out[role] |= training(p) | (transfer_set(model, p.student.temperature(), p.compute.device)
                                        if test.p is not None else {})
    if "transfer_bcpd_mse_at_t" in out["teacher"]:
        out["distill_temperature"] = p.student.temperature()
    out["agreement"] = float((probs["teacher"].argmax(1) == probs["student"].argmax(1)).mean())
    if "bayes_accuracy" in ds.info:
        out["bayes_accuracy"] = ds.info["bayes_accuracy"]
    counts = np.zeros((ds.num_classes, ds.num_classes), dtype=int)  # [actual, predicted]
    np.add.at(counts, (test.y, probs["student"].argmax(1)), 1)
    with outputs() as files:  # the plot data, then the metrics: all new or all old
        for role in ("teacher", "student"):
            files.text(f"{PLOTS}/reliability_{role}.csv",
                       csv_text(metrics.reliability(probs[role], test.y, bins)))
        files.text(f"{PLOTS}/confusion_student.csv",
                   csv_text([{"actual": a, "predicted": b, "count": int(counts[a, b])}
                             for a in range(ds.num_classes) for b in range(ds.num_classes)]))
        files.text(METRICS, json_text(out))
    for role in ("teacher", "student"):
        shown = " ".join(f"{k} {v:.4f}" for k, v in out[role].items())
        print(f"{role}: {shown}")
    print(f"agreement {out['agreement']:.4f} -> {METRICS}")


if __name__ == "__main__":
    stage(main)
