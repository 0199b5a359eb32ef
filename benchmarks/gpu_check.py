"""The GPU check: every CUDA path of the pipeline run once, then paper-scale speed, in one command.

    PYTHONPATH=src python benchmarks/gpu_check.py OUT             # on a GPU host, from the repository root
    PYTHONPATH=src python benchmarks/gpu_check.py OUT --cpu-smoke  # tiny sizes on the CPU (a test)

With PYTHONPATH=src it needs no install of this project. What it imports beyond a stock PyTorch GPU
image is listed, with versions, in benchmarks/gpu_wheels.txt (tests/test_gpu_check.py derives the
list from this script's imports and the image's package list, benchmarks/gpu_host_packages.txt);
on a host without a package index, bring those as wheels (the README, "Devices and several GPUs").

Parts, in this order, so that a timeout still leaves the first results; each writes its figures to
OUT/gpu_check.json as it ends (and everything printed goes to OUT/gpu_check.log):
  a. correctness: a zoo teacher and student trained with bf16 autocast and channels_last on
     GPU-resident data; the logit cache built on the GPU and read by a cached KD student; a feature
     method (reviewkd); torch.compile against eager, with the graphs compiled (1: a smaller last
     batch runs eagerly); ONNX export of the GPU-trained student with onnxruntime parity; the same
     seed twice, with the largest weight difference, for plain training and for every feature method;
  b. throughput of this loop's steps against the common loop (PIL transforms, a DataLoader with 8
     workers, fp32) and the common loop with bf16 autocast and channels_last, for resnet32x4 and
     resnet8x4 at batch 64 and 512: the reference loops run as common code runs them (no
     deterministic algorithms, cuDNN's autotuner on), both sides timed over the same steps, and the
     host syncs per timed step counted with torch.cuda.set_sync_debug_mode (target 0 for this loop);
  c. one full epoch of resnet32x4 at batch 64 on 50,000 synthetic 32x32 images, eager and compiled,
     and the projected wall time of the paper's 240-epoch teacher;
  d. cached against online KD student steps (resnet32x4 -> resnet8x4), with their host syncs;
  e. the cache build of 50,000 images x all 162 views of resnet32x4 (target: under 2 minutes).
A part that fails records its error and the check goes on. The last line is this loop's throughput
over the common fp32 loop's, over all of part b.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import train_throughput  # this folder's benchmarks
from cache_speedup import student_run
from torch._dynamo.utils import counters

from bayeskd import cache, distill, export, methods, nets, placement
from bayeskd.augment import CropFlip
from bayeskd.config import Optim
from bayeskd.io import write_json
from bayeskd.losses import ce
from bayeskd.placement import Teacher
from bayeskd.train import Checkpoint, TrainSet, fit, seed_everything

SIZES = {
    # images, steps and nets of each part: the GPU run, and the CPU smoke test
    "gpu": {"a_images": 4096, "a_teacher": "resnet8x4", "a_student": "resnet8", "a_method_images": 512,
            "b_steps": (200, 50), "b_workers": 8, "b_nets": ("resnet32x4", "resnet8x4"),
            "b_batches": (64, 512),
            "c_images": 50_000, "c_net": "resnet32x4", "d_steps": 100, "d_pair": ("resnet32x4", "resnet8x4"),
            "e_images": 50_000, "e_net": "resnet32x4", "compile": True},
    "smoke": {"a_images": 96, "a_teacher": "resnet8", "a_student": "cnn_student", "a_method_images": 16,
              "b_steps": (2, 1), "b_workers": 2, "b_nets": ("resnet8",), "b_batches": (16, 32),
              "c_images": 64, "c_net": "cnn_student", "d_steps": 2, "d_pair": ("resnet8", "cnn_student"),
              "e_images": 4, "e_net": "cnn_student",
              "compile": False},  # compiling takes minutes on a CPU; tests/test_train.py covers it
}
CLASSES = 100
BUILD_BATCH = 1024  # params.yaml's cache.batch_size
DEVICE = placement.choose("auto")


class Check:
    """The figures so far, written to OUT/gpu_check.json after every part; prints go to the log too."""

    def __init__(self, out: Path):
        self.out = out
        self.results: dict = {"device": str(DEVICE), "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                              "parts": {}}
        self.log = open(out / "gpu_check.log", "a")  # noqa: SIM115 (open for the whole run)

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    @contextlib.contextmanager
    def part(self, name: str):
        figures: dict = {}
        start = time.perf_counter()
        self.say(f"== {name}")
        try:
            yield figures
            figures["passed"] = True
        except Exception as e:  # a failed part is a result too; the next part still runs
            figures["passed"] = False
            figures["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            self.say(traceback.format_exc())
        figures["seconds"] = round(time.perf_counter() - start, 2)
        self.results["parts"][name] = figures
        write_json(self.out / "gpu_check.json", self.results)
        self.say(f"== {name}: {'passed' if figures['passed'] else 'FAILED'} in {figures['seconds']} s "
                 f"{json.dumps({k: v for k, v in figures.items() if k not in ('passed', 'seconds')})}")


def images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n learnable 3x32x32 images in [0, 1]: a smooth random pattern per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.nn.functional.interpolate(torch.rand(CLASSES, 3, 4, 4, generator=g), size=32,
                                               mode="bilinear", align_corners=False)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = (0.6 * patterns[y] + 0.4 * torch.rand(n, 3, 32, 32, generator=g)).clamp(0, 1)
    return (x * 255).round() / 255, y  # what uint8 storage holds


def optim(epochs: int = 1, batch: int = 64) -> Optim:
    return Optim(epochs=epochs, batch_size=batch, lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=[],
                 gamma=0.1)


def net(name: str) -> torch.nn.Module:
    _, _, mean, std = train_throughput.CIFAR["cifar100"]
    return nets.build(name, CLASSES, (3, 32, 32), normalize={"mean": mean, "std": std})


def train(name: str, loss_fn, data: TrainSet, work: Path, label: str, seed: int = 0, **kw):
    """One epoch of `name` with bf16 autocast and channels_last (the GPU defaults, asked for here so
    that the CPU smoke test runs the same logic)."""
    seed_everything(seed)
    model = net(name)
    history = fit(model, loss_fn or (lambda z, b, e: {"ce": ce(z, b.y)}), data, optim(), seed=seed,
                  checkpoint=Checkpoint(work / f"{label}.pt", label), name=label, mixed_precision=True,
                  channels_last=True, **kw)
    return model, history


def largest_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((u - v).abs().max()) for u, v in
               zip(a.state_dict().values(), b.state_dict().values(), strict=True) if u.is_floating_point())


def finite(history: list[dict]) -> float:
    loss = history[-1]["train/loss"]
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss {loss}")
    return loss


def compiled_graphs() -> int:
    """The graphs torch.compile has compiled in this process so far."""
    return counters["stats"]["unique_graphs"]


def correctness(check: Check, s: dict, work: Path) -> None:
    x, y = images(s["a_images"])
    aug = CropFlip(4)
    with check.part("a1 teacher and student, bf16 autocast, channels_last, data on the device") as f:
        teacher, hist = train(s["a_teacher"], None, TrainSet(x, y, aug), work, "teacher")
        f["teacher_loss"] = finite(hist)
        f["teacher_train_acc"] = hist[-1]["train/acc"]
        _, hist = train(s["a_student"], None, TrainSet(x, y, aug), work, "student")
        f["student_loss"] = finite(hist)
    with check.part("a2 logit cache built on the device, read by a cached KD student") as f:
        m = cache.build(teacher, x, y, work / "cache", num_classes=CLASSES, augment=aug, views=2, seed=0,
                        dtype="float16", shard_size=len(y), topk=0, teacher_sha256="gpu-check",
                        batch_size=BUILD_BATCH, device=DEVICE, log=check.say)
        cached = cache.LogitCache(work / "cache", num_samples=len(y), num_classes=CLASSES, device=DEVICE)
        f["cache_on"] = str(cached.arrays["logits"].device)
        idx = torch.arange(min(256, len(y)), device=DEVICE)
        views = cached.view_table.to(DEVICE)[idx, 1]
        online = Teacher(teacher, DEVICE)(aug.apply(x.to(DEVICE)[idx], views))
        stored = cached.logits(idx, torch.ones_like(idx))
        f["cache_vs_online_max_abs_diff"] = (stored - online).abs().max().item()
        # a cache too large for the device is read from host memory: the same logits
        in_host = cache.LogitCache(work / "cache", num_samples=len(y), num_classes=CLASSES, device="cpu")
        ones = torch.ones_like(idx)
        from_host = in_host.logits(idx, ones, idx.cpu(), ones.cpu())
        f["host_cache_vs_device_cache_max_abs_diff"] = (from_host - stored).abs().max().item()
        if not torch.equal(from_host, stored):
            raise AssertionError("the cache read from host memory differs from the one on the device")
        f["cache_teacher_accuracy"] = m["shards"][0]["accuracy"]
        seed_everything(0)
        student = net(s["a_student"])
        kd = distill.distiller("kd", student, cache=cached)
        hist = fit(student, kd.loss_fn, TrainSet(x, y, aug, kd.view_table), optim(), seed=0,
                   checkpoint=Checkpoint(work / "cached.pt", "cached"), name="cached KD",
                   mixed_precision=True, channels_last=True)
        f["cached_kd_loss"] = finite(hist)
    with check.part("a3 feature method reviewkd (teacher online)") as f:
        seed_everything(0)
        student = net(s["a_student"])
        rk = distill.distiller("reviewkd", student, teacher=teacher, in_shape=(3, 32, 32), num_samples=len(y))
        hist = fit(student, rk.loss_fn, TrainSet(x, y, aug), optim(), seed=0, extra=rk.extra,
                   checkpoint=Checkpoint(work / "reviewkd.pt", "reviewkd"), name="reviewkd",
                   mixed_precision=True, channels_last=True)
        f["reviewkd_loss"] = finite(hist)
        f["reviewkd_terms"] = {k: v for k, v in hist[-1].items() if k.startswith("train/")}
    with check.part("a4 torch.compile against eager, a smaller last batch included") as f:
        tail = TrainSet(x[:-16], y[:-16], aug)  # the last batch 16 samples short
        eager, e_hist = train(s["a_student"], None, tail, work, "eager")
        graphs = compiled_graphs()
        compiled, c_hist = train(s["a_student"], None, tail, work, "compiled", compiled=s["compile"])
        f["compiled_graphs"] = compiled_graphs() - graphs  # 1 when compiling: the last batch runs eagerly
        f["eager_loss"], f["compiled_loss"] = finite(e_hist), finite(c_hist)
        f["loss_relative_diff"] = abs(f["compiled_loss"] - f["eager_loss"]) / abs(f["eager_loss"])
        f["max_weight_diff"] = largest_difference(eager, compiled)
    with check.part("a5 ONNX export of the device-trained student, onnxruntime parity") as f:
        exported = export.to_onnx(eager, x[:2], opset=18)
        report = export.check(exported, eager, x[:512], batch_size=256, runs=3, device=DEVICE)
        f.update(report)
        if report["max_abs_diff"] > 1e-3:
            raise AssertionError(f"onnxruntime differs from torch by {report['max_abs_diff']}")
    with check.part("a6 the same seed twice: largest weight difference") as f:
        again, _ = train(s["a_student"], None, tail, work, "eager-again")
        f["max_weight_diff"] = largest_difference(eager, again)
        f["bit_identical"] = f["max_weight_diff"] == 0.0
    with check.part("a7 every feature method, the same seed twice: largest weight difference") as f:
        n = s["a_method_images"]
        for method in sorted(methods.FEATURE):
            runs = []
            for label in ("first", "again"):
                seed_everything(0)
                student = net(s["a_student"])
                d = distill.distiller(method, student, teacher=teacher, in_shape=(3, 32, 32), num_samples=n)
                fit(student, d.loss_fn, TrainSet(x[:n], y[:n], aug), optim(), seed=0, extra=d.extra,
                    checkpoint=Checkpoint(work / f"{method}-{label}.pt", method), name=method,
                    mixed_precision=True, channels_last=True)
                runs.append(student)
            f[method] = largest_difference(*runs)


def throughput(check: Check, s: dict, work: Path) -> float:
    rng = np.random.default_rng(0)
    steps_small, steps_large = s["b_steps"]
    n = (max(steps_small, steps_large) + 1) * max(s["b_batches"])
    pixels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, n).astype(np.int64)
    total = {"ours": 0.0, "fp32": 0.0, "bf16": 0.0}
    with check.part("b throughput: this loop against the common loop, fp32 and bf16") as f:
        for name in s["b_nets"]:
            for batch, steps in zip(s["b_batches"], (steps_small, steps_large), strict=True):
                done = steps * batch
                t = {"fp32": train_throughput.reference(name, pixels, labels, batch, steps, s["b_workers"]),
                     "bf16": train_throughput.reference(name, pixels, labels, batch, steps, s["b_workers"],
                                                        mixed_precision=True),
                     "ours": train_throughput.ours(name, pixels, labels, batch, steps)}
                for k, (seconds, _) in t.items():
                    total[k] += seconds
                row = {f"{k}_images_per_s": round(done / v[0], 1) for k, v in t.items()}
                row |= {f"{k}_host_syncs_per_step": v[1] for k, v in t.items()}
                row |= {"ours_over_fp32": round(t["fp32"][0] / t["ours"][0], 2),
                        "ours_over_bf16": round(t["bf16"][0] / t["ours"][0], 2)}
                f[f"{name}_batch{batch}"] = row
                check.say(f"{name} batch {batch}: {row}")
        f["ours_over_fp32"] = round(total["fp32"] / total["ours"], 2)
        f["ours_over_bf16"] = round(total["bf16"] / total["ours"], 2)
    return total["fp32"] / total["ours"] if total["ours"] else float("nan")


def paper_epoch(check: Check, s: dict, work: Path) -> None:
    x, y = images(s["c_images"], seed=1)
    title = f"c one full epoch of {s['c_net']} at batch 64 on {len(y)} images, eager and compiled"
    with check.part(title) as f:
        for compiled in (False, True) if s["compile"] else (False,):
            label = "compiled" if compiled else "eager"
            seed_everything(0)
            model = net(s["c_net"])
            times: list[float] = []
            last = [time.perf_counter()]

            def timed(epoch, metrics, times=times, last=last):
                now = time.perf_counter()
                times.append(now - last[0])
                last[0] = now

            # two epochs: the first pays for compiling (and warm-up); the second is the one measured
            graphs = compiled_graphs()
            fit(model, lambda z, b, e: {"ce": ce(z, b.y)}, TrainSet(x, y, CropFlip(4)), optim(epochs=2),
                seed=0, checkpoint=Checkpoint(work / f"epoch-{label}.pt", label), on_epoch=timed,
                compiled=compiled, name=f"{s['c_net']} {label}")
            f[f"{label}_graphs_compiled"] = compiled_graphs() - graphs  # compiled: 1, the last batch eager
            f[f"{label}_first_epoch_s"] = round(times[0], 2)
            f[f"{label}_epoch_s"] = round(times[1], 2)
            f[f"{label}_240_epochs_min"] = round((times[0] + 239 * times[1]) / 60, 1)
            f[f"{label}_images_per_s"] = round(len(y) / times[1], 1)


def cached_vs_online(check: Check, s: dict, work: Path) -> None:
    teacher_name, student_name = s["d_pair"]
    with check.part(f"d cached against online KD steps ({teacher_name} -> {student_name})") as f:
        n = (s["d_steps"] + 1) * 64
        x, y = images(n, seed=2)
        teacher = net(teacher_name).eval()
        cache.build(teacher, x, y, work / "d-cache", num_classes=CLASSES, augment=CropFlip(4), views=2,
                    seed=0, dtype="float16", shard_size=n, topk=0, teacher_sha256="gpu-check",
                    batch_size=BUILD_BATCH, device=DEVICE, log=lambda _: None)
        cached = cache.LogitCache(work / "d-cache", num_samples=n, num_classes=CLASSES, device=DEVICE)
        online, online_syncs = student_run(x, y, teacher, None, s["d_steps"], student=student_name)
        offline, cached_syncs = student_run(x, y, teacher, cached, s["d_steps"], student=student_name)
        f["online_s_per_step"] = round(online / s["d_steps"], 4)
        f["cached_s_per_step"] = round(offline / s["d_steps"], 4)
        f["online_over_cached"] = round(online / offline, 2)
        f["online_host_syncs_per_step"], f["cached_host_syncs_per_step"] = online_syncs, cached_syncs


def cache_build(check: Check, s: dict, work: Path) -> None:
    n = s["e_images"]
    with check.part(f"e cache build: {n} images x all 162 views of {s['e_net']}") as f:
        x, y = images(n, seed=3)
        teacher = net(s["e_net"]).eval()
        # as the cache_logits stage runs: it trains nothing and asks for no deterministic algorithms
        # (the earlier parts' training did), with torch's default cuDNN settings
        with train_throughput.algorithms(deterministic=False, benchmark=False):
            start = time.perf_counter()
            m = cache.build(teacher, x, y, work / "e-cache", num_classes=CLASSES, augment=CropFlip(4),
                            views="all", seed=0, dtype="float16", shard_size=n, topk=0,
                            teacher_sha256="gpu-check", batch_size=BUILD_BATCH, device=DEVICE, log=check.say)
            seconds = time.perf_counter() - start
        views = m["num_samples"] * m["num_slots"]
        f["views"] = views
        f["build_s"] = round(seconds, 1)
        f["views_per_s"] = round(views / seconds)
        f["cifar100_minutes"] = round(seconds * 50_000 / n / 60, 2)  # scaled to 50,000 images
        f["under_2_minutes"] = f["cifar100_minutes"] < 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for gpu_check.json and gpu_check.log")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, for a test on the CPU")
    parser.add_argument("--parts", default="abcde", help="which parts to run (default: all)")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; use --cpu-smoke to run the check at tiny sizes on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = SIZES["smoke" if args.cpu_smoke else "gpu"]
    check = Check(args.out)
    r = check.results
    check.say(f"device {r['device']} ({r['gpu'] or 'CPU'}), torch {r['torch']}")
    ratio = float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for part, run in (("a", correctness), ("b", throughput), ("c", paper_epoch), ("d", cached_vs_online),
                          ("e", cache_build)):
            if part in args.parts:
                (work / part).mkdir()  # checkpoints of one part never meet another's
                result = run(check, sizes, work / part)
                ratio = result if part == "b" else ratio
    failed = [name for name, p in check.results["parts"].items() if not p["passed"]]
    check.say(f"parts failed: {', '.join(failed) or 'none'}")
    check.say(f"this loop / common fp32 loop: {ratio:.2f}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
