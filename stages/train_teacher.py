"""Stage train_teacher: train the teacher with teacher.loss (ce, mse or ls); resumable per epoch."""

from bayeskd import data
from bayeskd.losses import TEACHER_LOSSES
from bayeskd.train import Checkpoint, TrainSet, fit, seed_everything
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
    with epoch_logging("teacher") as on_epoch:
        history = fit(model, loss_fn, TrainSet(*tensors(ds, "train"), augmentation(p)), t.optim, seed=p.seed,
                      checkpoint=Checkpoint(CHECKPOINT, run), val=tensors(ds, "val"), on_epoch=on_epoch,
                      compiled=p.compute.compile, device=p.compute.device, name=f"teacher[{t.loss}]")
    finish(model, history, TEACHER, CHECKPOINT, f"teacher {t.net} ({t.loss})")


if __name__ == "__main__":
    stage(main)
