"""Stage evaluate: test-split metrics of teacher and student, reliability and confusion plot data.
The models predict on compute.device, in float32."""

import numpy as np

from bayeskd import data, metrics, nets
from bayeskd.io import csv_text, json_text, outputs
from bayeskd.train import predict
from common import DATA, STUDENT, TEACHER, build, params, stage, tensors

METRICS = "reports/metrics.json"
PLOTS = "reports/plots"


def main() -> None:
    p = params()
    ds = data.load(DATA, ("test",))
    x, _ = tensors(ds, "test")
    test = ds.splits["test"]
    bins = p.evaluate.ece_bins
    out, probs = {}, {}
    for role, net, weights in (("teacher", p.teacher.net, TEACHER), ("student", p.student.net, STUDENT)):
        model = nets.load_weights(build(role, net, ds), weights)
        probs[role] = metrics.softmax(predict(model, x, device=p.compute.device).numpy())
        out[role] = metrics.summary(probs[role], test.y, bins, test.p)
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
