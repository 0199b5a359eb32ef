"""Stage distill: train the student with student.method. Logit methods read the teacher's logits
from the cache (no teacher forward); feature methods run the teacher online for its features."""

import torch

from bayeskd import data, distill, feature, nets
from bayeskd.cache import IDENTITY, CacheError, LogitCache
from bayeskd.io import sha256_file
from bayeskd.train import default_device, fit, seed_everything
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
    method = None
    if s.method in distill.METHODS:
        def loss_fn(logits, batch, epoch):
            # the cached view's logits: no teacher forward
            teacher_logits = teacher.logits(batch.idx, batch.slots).to(logits.device)
            return distill.loss_terms(s.method, logits, teacher_logits, batch.y, epoch + 1, **s.hparams())
    else:
        online = nets.load_weights(build("teacher", p.teacher.net, ds), TEACHER).requires_grad_(False)
        try:
            method = feature.build(s.method, model, online, ds.in_shape, len(y), **s.hparams())
            student_features, teacher_features = feature.Extractor(model), feature.Extractor(online)
        except ValueError as e:
            fail(f"student.method = {s.method!r} cannot distill {p.teacher.net} -> {s.net}: {e}", code=2)
        if method.single_process and p.compute.processes > 1:
            fail(f"student.method = {s.method!r} runs in one process only; compute.processes = "
                 f"{p.compute.processes}: set it to 1", code=2)
        online.to(default_device())

        def loss_fn(logits, batch, epoch):
            with torch.no_grad():
                t = teacher_features(batch.x)
            return method(student_features.last(logits), t, batch, epoch + 1)

    with epoch_logging("student") as on_epoch:
        history = fit(model, loss_fn, x, y, s.optim, seed=p.seed, checkpoint=CHECKPOINT,
                      val=tensors(ds, "val"), on_epoch=on_epoch,
                      augment=aug, view_table=teacher.view_table if aug else None,
                      name=f"student[{s.method}]", extra=method, compiled=p.compute.compile,
                      fingerprint=fingerprint(s.model_dump(), p.seed,
                                              files=(f"{DATA}/train.npz", f"{CACHE}/manifest.json")))
    finish(model, history, STUDENT, CHECKPOINT, f"student {s.net} ({s.method})")


if __name__ == "__main__":
    main()
