"""Stage train_teacher: train the teacher with teacher.loss (ce, mse, ls, or ce_ts: CE, then a
temperature fitted on the validation split and folded into the logit layer); resumable per epoch."""

from bayeskd import calibration, config, data
from bayeskd.losses import TEACHER_LOSSES
from bayeskd.train import Checkpoint, TrainSet, distributed, fit, predict, seed_everything
from common import (
    DATA,
    TEACHER,
    augmentation,
    build,
    epoch_logging,
    fingerprint,
    finish,
    params,
    stage,
    tensors,
)

CHECKPOINT = "checkpoints/teacher.pt"


def calibrate(model, val, device: str) -> dict[str, str]:
    """Temperature scaling on the validation split (config.TEMPERATURE_SCALED losses): T minimises
    the validation NLL and is folded into the logit layer, on `device`; returned as the weights'
    metadata. The model is left on the CPU, as `fit` leaves it."""
    x, y = val[0], val[1].numpy()
    logits = predict(model, x, device=device).numpy()
    temperature = calibration.fit_temperature(logits, y)
    calibration.fold_temperature(model, temperature, x[:256])
    model.cpu()
    print(f"temperature scaling: T = {temperature:.4f}, validation NLL "
          f"{calibration.nll(logits, y):.4f} -> {calibration.nll(logits, y, temperature):.4f}")
    return {calibration.METADATA_KEY: repr(temperature)}


def main() -> None:
    p = params()
    t = p.teacher
    ds = data.load(DATA, ("train", "val"))
    seed_everything(p.seed)
    model = build("teacher", t.net, ds)
    loss = TEACHER_LOSSES[t.loss]

    def loss_fn(logits, batch, epoch):
        return {t.loss: loss(logits, batch.y, t.label_smoothing)}

    run = fingerprint(t.model_dump(), p.seed, p.data.augment.model_dump(), files=(f"{DATA}/train.npz",))
    val = tensors(ds, "val")
    with epoch_logging("teacher") as on_epoch:
        history = fit(model, loss_fn, TrainSet(*tensors(ds, "train"), augmentation(p)), t.optim, seed=p.seed,
                      checkpoint=Checkpoint(CHECKPOINT, run), val=val, on_epoch=on_epoch,
                      compiled=p.compute.compile, device=p.compute.device, name=f"teacher[{t.loss}]")
    # the schema refuses these losses without a validation split (config.Data.no_validation_split);
    # rank 0 alone writes the weights (finish)
    scaled = t.loss in config.TEMPERATURE_SCALED and distributed()[0] == 0
    metadata = calibrate(model, val, p.compute.device) if scaled else None
    finish(model, history, TEACHER, CHECKPOINT, f"teacher {t.net} ({t.loss})", metadata)


if __name__ == "__main__":
    stage(main)
