"""Stage distill: train the student from the cached teacher logits (no teacher forward here)."""

from bayeskd import data, distill
from bayeskd.cache import IDENTITY, CacheError, LogitCache
from bayeskd.io import sha256_file
from bayeskd.train import fit, seed_everything
from common import (
    CACHE,
    DATA,
    STUDENT,
    TEACHER,
    augmentation,
    build,
    epoch_logging,
    fail,
    fingerprint,
    finish,
    params,
    tensors,
)

CHECKPOINT = "checkpoints/student.pt"


def main() -> None:
    p = params()
    s = p.student
    ds = data.load(DATA, ("train", "val"))
    x, y = tensors(ds, "train")
    aug = augmentation(p)
    try:
        teacher = LogitCache(CACHE, num_samples=len(y), num_classes=ds.num_classes,
                             teacher_sha256=sha256_file(TEACHER),
                             augmentation=aug.spec() if aug else IDENTITY)
    except CacheError as e:
        fail(str(e))
    seed_everything(p.seed)
    model = build("student", s.net, ds)
    hparams = {"temperature": s.temperature, "ce_weight": s.ce_weight, "kd_weight": s.kd_weight}

    def loss_fn(logits, batch, epoch):
        # the cached view's logits: no teacher forward
        teacher_logits = teacher.logits(batch.idx, batch.slots).to(logits.device)
        return distill.loss_terms(s.method, logits, teacher_logits, batch.y, epoch, **hparams)

    with epoch_logging("student") as on_epoch:
        history = fit(model, loss_fn, x, y, s.optim, seed=p.seed, checkpoint=CHECKPOINT,
                      val=tensors(ds, "val"), on_epoch=on_epoch,
                      augment=aug, view_table=teacher.view_table if aug else None,
                      name=f"student[{s.method}]",
                      fingerprint=fingerprint(s.model_dump(), p.seed,
                                              files=(f"{DATA}/train.npz", f"{CACHE}/manifest.json")))
    finish(model, history, STUDENT, CHECKPOINT, f"student {s.net} ({s.method})")


if __name__ == "__main__":
    main()
