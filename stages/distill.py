"""Stage distill: train the student with student.method (bayeskd.distill.distiller). Logit methods
read the teacher's logits from the cache (no teacher forward); feature methods run the teacher."""

from bayeskd import data, distill, nets
from bayeskd.cache import IDENTITY, CacheError, LogitCache
from bayeskd.io import sha256_file
from bayeskd.train import Checkpoint, TrainSet, fit, seed_everything
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
    load_teacher,
    params,
    stage,
    tensors,
)

CHECKPOINT = "checkpoints/student.pt"


def main() -> None:
    p = params()
    s = p.student
    ds = data.load(DATA, ("train", "val"))
    x, y = tensors(ds, "train")
    aug = augmentation(p)
    cache, teacher, inputs = None, None, [f"{DATA}/train.npz", TEACHER]
    nets.read_weights(TEACHER)  # a damaged teacher is named as such, not as a cache mismatch
    if s.method in distill.METHODS:
        try:
            cache = LogitCache(CACHE, num_samples=len(y), num_classes=ds.num_classes,
                               teacher_sha256=sha256_file(TEACHER),
                               augmentation=aug.spec() if aug else IDENTITY, device=p.compute.device)
        except CacheError as e:
            fail(str(e))
        inputs.append(f"{CACHE}/manifest.json")
    else:
        teacher = load_teacher(p.teacher.net, ds)
    seed_everything(p.seed)
    model = build("student", s.net, ds)
    try:
        method = distill.distiller(s.method, model, hparams=s.hparams(), cache=cache, teacher=teacher,
                                   in_shape=ds.in_shape, num_samples=len(y), processes=p.compute.processes,
                                   device=p.compute.device)
    except ValueError as e:
        fail(f"student.method = {s.method!r} cannot distill {p.teacher.net} -> {s.net}: {e}")
    with epoch_logging("student") as on_epoch:
        history = fit(model, method.loss_fn, TrainSet(x, y, aug, method.view_table), s.optim, seed=p.seed,
                      checkpoint=Checkpoint(CHECKPOINT, fingerprint(s.model_dump(), p.seed, files=inputs)),
                      val=tensors(ds, "val"), on_epoch=on_epoch, extra=method.extra,
                      compiled=p.compute.compile, device=p.compute.device, name=f"student[{s.method}]")
    finish(model, history, STUDENT, CHECKPOINT, f"student {s.net} ({s.method})")


if __name__ == "__main__":
    stage(main)
