"""Every path that runs on a GPU, one step each, on stand-in devices on the CPU.

Models and data live on PyTorch's `meta` device: tensors with shapes and no data. An op that mixes
in a CPU tensor fails there as it does on CUDA, and reading a value back to the host (`.item()`,
`bool()`, `.numpy()`, `.tolist()`, `.cpu()`) raises, so a step that would wait for the GPU fails.
`HostWork` also fails a step that does any work on a CPU tensor: a step's work is the device's. The
once-per-epoch work (drawing the order, moving it to the device, reading the sums) is left out of
those checks by taking the epoch's first batch before them. Forward-only paths (evaluate's and
export's predictions) run under FakeTensorMode with fake CUDA tensors, where a CPU input to a CUDA
model fails as on a GPU. The float32 teacher inside a student's bf16 autocast is checked on the CPU.
"""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bayeskd import cache, calibration, distill, methods, nets, placement
from bayeskd.augment import CropFlip
from bayeskd.batch import Batch
from bayeskd.config import Optim
from bayeskd.losses import ce
from bayeskd.placement import Teacher
from bayeskd.train import Placement, Tally, TrainSet, epoch_draws, make_optimizer, predict, train_step

META = torch.device("meta")
SHAPE, CLASSES, N, BATCH = (3, 8, 8), 10, 16, 8
AUG = CropFlip(1)  # 18 views
CFG = Optim(epochs=1, batch_size=BATCH, lr=0.1, momentum=0.9, weight_decay=5e-4, milestones=[], gamma=0.1)


class HostWork(TorchDispatchMode):
    """Records every op that computes on a CPU tensor while active. Views and copies to the device
    that do not wait (non_blocking) are not work."""

    FREE = {torch.ops.aten.slice.Tensor, torch.ops.aten.view.default, torch.ops.aten.alias.default}

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        on_host = any(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() > 0
                      for t in tree_leaves((args, kwargs, out)))  # 0-dim: Python numbers as tensors
        copy_ahead = func is torch.ops.aten._to_copy.default and kwargs.get("non_blocking")
        if on_host and func not in self.FREE and not copy_ahead:
            self.ops.append(str(func))
        return out


def data(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, *SHAPE, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def net(name: str) -> nn.Module:
    torch.manual_seed(0)
    return nets.build(name, CLASSES, SHAPE)


def plain(logits, batch, epoch):
    return {"ce": ce(logits, batch.y)}


def steps_on_meta(model: nn.Module, loss_fn, train: TrainSet, extra: nn.Module | None = None,
                  resident: bool = True, host_work: tuple[str, ...] = ()) -> None:
    """Place `model`, its `extra` parts and `train` on the meta device as `fit` does (bf16 autocast
    and channels_last on, as on a GPU), then run the epoch's two steps with its tally; the second
    batch is made and trained on with nothing read back and no host work but `host_work`."""
    extra = extra or nn.Module()
    place = Placement.of(model, extra, train, META, BATCH, mixed_precision=True, channels_last=True,
                         resident=resident)
    opt = make_optimizer([*model.parameters(), *extra.parameters()], CFG)
    order, drawn = epoch_draws(len(train.y), seed=0, epoch=0, slots=train.slots)
    batches, tally = place.batches(order, drawn), Tally(META)
    first = next(batches)
    tally.add(*train_step(place, loss_fn, opt, extra, first, 0), first)
    with HostWork() as host:
        batch = next(batches)
        terms, logits = train_step(place, loss_fn, opt, extra, batch, 0)
        tally.add(terms, logits, batch)
    assert set(host.ops) == set(host_work)
    assert {t.device for t in (batch.x, batch.y, batch.idx, logits, *terms.values())} == {META}
    assert logits.shape == (BATCH, CLASSES) and next(model.parameters()).device == META
    with pytest.raises((RuntimeError, NotImplementedError)):  # the epoch's one read of its sums
        tally.totals(1)


@pytest.mark.parametrize("resident", [True, False], ids=["data-on-device", "data-in-host-memory"])
@pytest.mark.parametrize("name,augment", [("cnn_teacher", AUG), ("mlp_teacher", None)])
def test_teacher_training_step(name, augment, resident):
    x, y = data()
    if augment is None:
        x = x.flatten(1)
    model = nets.build(name, CLASSES, x.shape[1:])
    steps_on_meta(model, plain, TrainSet(x, y, augment), resident=resident)


def test_a_cache_build_batch():
    x, _ = data(4)
    table = cache.view_table(4, AUG, 3, seed=0)
    teacher = Teacher(net("cnn_teacher"), META)
    logits = cache.teacher_logits(teacher, x, table, AUG, batch_size=5)  # inputs from the host, moved once
    assert logits.device == META and logits.shape == (4, 3, CLASSES)
    x_on, table_on = x.to(META), torch.from_numpy(table).to(META)
    with HostWork() as host:
        cache.teacher_logits(teacher, x_on, table_on, AUG, batch_size=5)
    assert host.ops == []


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Caches of a random cnn teacher's logits: all logits and top-3, 3 views per sample."""
    x, y = data()
    directories = {}
    for topk in (0, 3):
        directories[topk] = tmp_path_factory.mktemp(f"cache-top{topk}")
        cache.build(net("cnn_teacher"), x, y, directories[topk], num_classes=CLASSES, augment=AUG, views=3,
                    seed=0, dtype="bfloat16", shard_size=6, topk=topk, teacher_sha256="t", batch_size=7,
                    device="cpu", log=lambda _: None)
    return directories


@pytest.mark.parametrize("topk", [0, 3])
@pytest.mark.parametrize("method", sorted(distill.METHODS))
def test_cached_kd_step(built, method, topk):
    x, y = data()
    logit_cache = cache.LogitCache(built[topk], num_samples=N, num_classes=CLASSES, device=META)
    assert {t.device for t in logit_cache.arrays.values()} == {META}  # the whole cache on the device
    student = net("cnn_student")
    d = distill.distiller(method, student, cache=logit_cache)
    steps_on_meta(student, d.loss_fn, TrainSet(x, y, AUG, d.view_table))


@pytest.mark.parametrize("topk", [0, 3])
def test_cached_kd_step_with_the_cache_in_host_memory(built, topk):
    """A cache too large for the device stays in host memory: a step gathers its rows there, with
    the batch's host copies of its indices (no wait for the device), and sends them on without
    waiting; that gather is the step's only host work."""
    x, y = data()
    logit_cache = cache.LogitCache(built[topk], num_samples=N, num_classes=CLASSES, device="cpu")
    student = net("cnn_student")
    d = distill.distiller("kd", student, cache=logit_cache)
    steps_on_meta(student, d.loss_fn, TrainSet(x, y, AUG, d.view_table), host_work=("aten.index.Tensor",))
    idx, slots = torch.tensor([3, 0, 7]), torch.tensor([2, 1, 0])
    got = logit_cache.logits(idx.to(META), slots.to(META), idx, slots)
    assert (got.device, got.dtype, got.shape) == (META, torch.float32, (3, CLASSES))
    with pytest.raises(NotImplementedError, match="meta"):  # without host copies it reads idx back
        logit_cache.logits(idx.to(META), slots.to(META))


def test_online_kd_step():
    x, y = data()
    student = net("cnn_student")
    d = distill.distiller("kd", student, teacher=net("cnn_teacher"), device=META)
    steps_on_meta(student, d.loss_fn, TrainSet(x, y, AUG))


@pytest.mark.parametrize("method", sorted(methods.FEATURE))
def test_feature_method_step(method):
    x, y = data()
    student = net("cnn_student")
    hparams = {"nce_k": 4} if method == "crd" else {}
    # the student is still on the CPU here: each net is probed on its own device
    d = distill.distiller(method, student, hparams=hparams, teacher=net("cnn_teacher"), in_shape=SHAPE,
                          num_samples=N, device=META)
    steps_on_meta(student, d.loss_fn, TrainSet(x, y, AUG), extra=d.extra)


def fake_cuda() -> FakeTensorMode:
    return FakeTensorMode(allow_non_fake_inputs=True)  # real CPU inputs and models may enter


@pytest.mark.parametrize("name,shape", [("cnn_student", SHAPE), ("mlp_student", (30,))])
def test_evaluate_and_export_predict_on_the_device(name, shape):
    """evaluate's prediction and the torch side of export's parity check (both `predict`): a model
    and inputs from the host, predicted on a (fake) CUDA device, the logits back on the host."""
    x = torch.rand(10, *shape)
    model = nets.build(name, CLASSES, shape)
    with fake_cuda():
        cuda = torch.device("cuda", 0)
        logits = predict(model, x, batch_size=4, device=cuda)
        assert next(model.parameters()).device == cuda
    assert logits.device.type == "cpu" and logits.shape == (10, CLASSES) and logits.dtype == torch.float32


def test_a_temperature_is_folded_where_the_teacher_is():
    """teacher.loss=ce_ts folds T into the teacher on its device (the probe moves there): on the
    stand-in device the fold runs up to its check's one read back, once per run."""
    model = net("cnn_teacher").to(META)
    with pytest.raises(RuntimeError, match=r"item\(\) cannot be called on meta tensors"):
        calibration.fold_temperature(model, 2.0, torch.rand(4, *SHAPE))


def test_the_stand_ins_are_strict():
    """Work on the host is recorded; a (fake) CUDA model fed a CPU batch fails."""
    with HostWork() as host:
        torch.rand(4, device=META) + 1
        torch.ones(3).sum()
    assert host.ops == ["aten.ones.default", "aten.sum.default"]  # a tensor made on the host, then work
    model = net("cnn_student")
    with fake_cuda(), pytest.raises(RuntimeError, match="same device"):
        model.to("cuda")(torch.rand(2, *SHAPE))


def test_teacher_supervision_is_float32_and_identical_cached_online_and_in_features(tmp_path):
    """Inside a student's bf16 autocast the teacher still runs in float32: online KD gets the very
    logits that a float32 cache stores, and a feature method the float32 maps."""
    x, y = data()
    teacher = net("cnn_teacher")
    cache.build(teacher, x, y, tmp_path, num_classes=CLASSES, augment=AUG, views="all", seed=0,
                dtype="float32", shard_size=N, topk=0, teacher_sha256="t", batch_size=64, device="cpu",
                log=lambda _: None)
    logit_cache = cache.LogitCache(tmp_path, num_samples=N, num_classes=CLASSES, device="cpu")
    idx, views = torch.arange(N), torch.arange(N) % AUG.num_views
    batch_x = AUG.apply(x, views)
    seen = []
    hook = teacher.stage1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        online = Teacher(teacher, torch.device("cpu"))(batch_x)
        student = net("cnn_student")
        method = distill.distiller("at", student, teacher=teacher, in_shape=SHAPE, num_samples=N,
                                   device="cpu")
        method.loss_fn(student(batch_x), Batch(batch_x, y, idx, views, views), 0)
    hook.remove()
    assert online.dtype == torch.float32 and set(seen) == {torch.float32}
    assert torch.equal(online, logit_cache.logits(idx, views))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_cuda_asked_for_without_a_gpu_is_refused_and_auto_is_the_cpu():
    with pytest.raises(placement.DeviceError, match="compute.device = 'cuda', but no CUDA device is visible"):
        placement.choose("cuda")
    assert placement.choose("auto") == placement.choose("cpu") == torch.device("cpu")
