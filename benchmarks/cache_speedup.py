"""Student training from the teacher-logit cache against online KD, in one run.

resnet32x4 -> resnet8x4 at batch 64 on 32x32 images with the standard crop-and-flip views (162 per
image), both through the steps of `bayeskd.train` (as `fit` runs them) with the KD loss: online, the
teacher runs on every augmented batch; cached, the teacher's logits for the drawn views are read
from the cache (held on the training device). Also measures building the cache (all 162 views per
image) and says after how many student runs it has paid for itself on CIFAR-100 (50,000 images,
240 epochs).

    python benchmarks/cache_speedup.py [--steps 12]

The last line is online time divided by cached time.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from train_throughput import loop_steps  # this folder's benchmarks

from bayeskd import cache, distill, nets
from bayeskd.augment import CropFlip
from bayeskd.train import TrainSet, seed_everything

BATCH, AUG = 64, CropFlip(4)


def student_run(x, y, teacher, logit_cache, steps: int,
                student: str = "resnet8x4") -> tuple[float, float | None]:
    """Seconds (and host syncs per step) for `steps` KD steps of a fresh student after one warm-up
    step (x, y: steps + 1 batches), its teacher logits read from `logit_cache`, or, without one,
    from the teacher run online."""
    seed_everything(0)
    student = nets.build(student, 100, (3, 32, 32))
    kd = distill.distiller("kd", student, cache=logit_cache, teacher=None if logit_cache else teacher)
    return loop_steps(student, kd.loss_fn, TrainSet(x, y, AUG, kd.view_table), BATCH, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="student steps per measured run")
    parser.add_argument("--build-images", type=int, default=4, help="images whose 162 views time the build")
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = nets.build("resnet32x4", 100, (3, 32, 32)).eval()
    n = (args.steps + 1) * BATCH
    x, y = torch.rand(n, 3, 32, 32), torch.randint(0, 100, (n,))
    common = dict(num_classes=100, augment=AUG, seed=0, dtype="float16", shard_size=4096, topk=0,
                  teacher_sha256="benchmark", batch_size=BATCH, log=lambda _: None)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        m = cache.build(teacher, x[: args.build_images], y[: args.build_images], tmp / "all", views="all",
                        **common)
        build_s = (time.perf_counter() - start) / args.build_images * 1000
        stored = sum(f.stat().st_size for f in (tmp / "all").glob("shard-*"))
        size_mb = stored / args.build_images * 1000 / 1e6
        print(f"cache build: {build_s:.0f} s and {size_mb:.1f} MB per 1,000 images "
              f"({m['num_slots']} views each, float16; timed on {args.build_images} images)")

        # the student's reads cost the same however many views are stored: two per image suffice here
        cache.build(teacher, x, y, tmp / "two", views=2, **common)
        cached = cache.LogitCache(tmp / "two", num_samples=n, num_classes=100)
        online_s, _ = student_run(x, y, teacher, None, args.steps)
        cached_s, _ = student_run(x, y, teacher, cached, args.steps)

    print(f"online KD: {online_s:.2f} s for {args.steps} steps ({online_s / args.steps:.3f} s/step)")
    print(f"cached KD: {cached_s:.2f} s for {args.steps} steps ({cached_s / args.steps:.3f} s/step)")
    steps_per_run = 240 * math.ceil(50_000 / BATCH)
    saved_per_run = (online_s - cached_s) / args.steps * steps_per_run
    build_cifar = build_s * 50
    print(f"CIFAR-100 (50,000 images, 240 epochs): cache build {build_cifar / 3600:.1f} h, "
          f"{size_mb * 50 / 1000:.2f} GB; each student run saves {saved_per_run / 3600:.1f} h; "
          f"the cache has paid for itself after {build_cifar / saved_per_run:.2f} student runs")
    print(f"online/cached: {online_s / cached_s:.2f}")


if __name__ == "__main__":
    main()
