import pytest
import torch

from bayeskd import nets
from bayeskd.config import Optim
from bayeskd.losses import ce
from bayeskd.train import Checkpoint, TrainSet, fit, lr_at, seed_everything

CFG = Optim(epochs=6, batch_size=32, lr=0.1, momentum=0.9, weight_decay=5e-4, milestones=[2, 4],
            gamma=0.1)


def toy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


def loss_fn(logits, batch, epoch):
    return {"ce": ce(logits, batch.y)}


def train(tmp_path, name="ck.pt", on_epoch=None, fingerprint="a", seed=0):
    seed_everything(seed)
    model = nets.build("mlp_student", 3, (5,))
    x, y = toy()
    history = fit(model, loss_fn, TrainSet(x, y), CFG, seed=seed,
                  checkpoint=Checkpoint(tmp_path / name, fingerprint), val=(x[:50], y[:50]),
                  on_epoch=on_epoch)
    return model, history


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_step_schedule():
    assert [lr_at(CFG, e) for e in range(6)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_training_learns_and_repeats_bit_for_bit(tmp_path):
    a, hist = train(tmp_path, "a.pt")
    b, _ = train(tmp_path, "b.pt")
    assert same_weights(a, b)
    assert hist[-1]["train/loss"] < hist[0]["train/loss"] and hist[-1]["val/acc"] > 0.8
    c, _ = train(tmp_path, "c.pt", seed=1)
    assert not same_weights(a, c)


class Killed(Exception):
    pass


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    reference, ref_hist = train(tmp_path, "ref.pt")

    def die_after_epoch_3(epoch, metrics):
        if epoch == 2:
            raise Killed
    with pytest.raises(Killed):
        train(tmp_path, "run.pt", on_epoch=die_after_epoch_3)
    assert len(torch.load(tmp_path / "run.pt", weights_only=True)["history"]) == 3

    seen = []
    resumed, hist = train(tmp_path, "run.pt", on_epoch=lambda e, m: seen.append(e))
    assert same_weights(resumed, reference)
    assert hist == ref_hist
    assert seen == list(range(6))  # restored epochs are replayed to the logger, in order


def test_checkpoint_of_other_inputs_is_not_resumed(tmp_path, capsys):
    train(tmp_path, "ck.pt", fingerprint="first")
    fresh, _ = train(tmp_path, "ck.pt", fingerprint="second")
    assert "starting afresh" in capsys.readouterr().out
    reference, _ = train(tmp_path, "other.pt", fingerprint="second")
    assert same_weights(fresh, reference)


def crd_run(tmp_path, epochs: int) -> tuple[dict, dict]:
    """A cnn student with CRD (memory banks, random negatives) on random digits-sized images."""
    from bayeskd import distill

    seed_everything(0)
    x, y = torch.rand(96, 1, 8, 8), torch.randint(0, 10, (96,))
    student = nets.build("cnn_student", 10, (1, 8, 8))
    teacher = nets.build("cnn_teacher", 10, (1, 8, 8))
    crd = distill.distiller("crd", student, hparams={"nce_k": 16}, teacher=teacher, in_shape=(1, 8, 8),
                            num_samples=len(y))
    cfg = CFG.model_copy(update={"epochs": epochs})
    fit(student, crd.loss_fn, TrainSet(x, y), cfg, seed=0, checkpoint=Checkpoint(tmp_path / "crd.pt", "crd"),
        extra=crd.extra)
    return student.state_dict(), crd.extra.state_dict()


def test_a_methods_own_parts_train_and_resume_bit_for_bit(tmp_path):
    whole = crd_run(tmp_path / "a", epochs=3)
    crd_run(tmp_path / "b", epochs=2)  # "killed" after epoch 2: its checkpoint stays
    resumed = crd_run(tmp_path / "b", epochs=3)
    for a, b in zip(whole, resumed, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = crd_run(tmp_path / "c", epochs=1)[1]
    assert not torch.equal(fresh["memory_s.rows"], whole[1]["memory_s.rows"])  # the banks moved
    assert not torch.equal(fresh["embed_s.weight"], whole[1]["embed_s.weight"])  # the embedding trained


@pytest.mark.slow  # inductor's first compile takes a minute on 2 cores
def test_compiled_training_matches_eager(tmp_path):
    cfg = CFG.model_copy(update={"epochs": 2})
    results = []
    for compiled in (False, True):
        seed_everything(0)
        x, y = torch.randn(128, 30), torch.randint(0, 3, (128,))
        model = nets.build("mlp_student", 3, (30,))
        history = fit(model, loss_fn, TrainSet(x, y), cfg, seed=0,
                      checkpoint=Checkpoint(tmp_path / f"{compiled}.pt", "c"), compiled=compiled)
        results.append((model.state_dict(), history))
    (eager, eager_history), (compiled, compiled_history) = results
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5)
    assert compiled_history[-1]["train/loss"] == pytest.approx(eager_history[-1]["train/loss"], rel=1e-4)


def test_bf16_autocast_and_channels_last_run_on_the_cpu_behind_the_gpu_switches(tmp_path):
    """The switches that are on by default on a GPU, exercised on the CPU: the same training, within
    bf16 rounding of the float32 run."""
    results = []
    for fast in (False, True):
        seed_everything(0)
        x, y = torch.rand(64, 3, 8, 8), torch.randint(0, 4, (64,))
        model = nets.build("cnn_student", 4, (3, 8, 8))
        history = fit(model, loss_fn, TrainSet(x, y), CFG.model_copy(update={"epochs": 2}), seed=0,
                      checkpoint=Checkpoint(tmp_path / f"{fast}.pt", "f"), mixed_precision=fast,
                      channels_last=fast)
        results.append(history[-1]["train/loss"])
    assert results[0] != results[1]  # bf16 did run
    assert results[1] == pytest.approx(results[0], rel=0.05)


def test_a_checkpoint_with_a_flipped_byte_is_moved_aside(tmp_path, capsys):
    """torch.load checks no checksum: a flipped byte in a tensor loads as another value. The
    checkpoint's own sha256 catches it, and training starts afresh instead of resuming from it."""
    weights = torch.arange(1000, dtype=torch.float32)
    state = {"model": {"w": weights}, "extra": {}, "optimizer": {}, "rng": {}, "history": [{"acc": 0.5}]}
    Checkpoint(tmp_path / "ck.pt", "a").save(**state)
    assert torch.equal(Checkpoint(tmp_path / "ck.pt", "a").load()["model"]["w"], weights)
    raw = bytearray((tmp_path / "ck.pt").read_bytes())
    at = bytes(raw).find(weights[500:502].numpy().tobytes())
    raw[at + 2] ^= 0x40  # 500.0 becomes another number; the zip file stays readable
    (tmp_path / "ck.pt").write_bytes(raw)
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["model"]["w"][500] != 500
    assert Checkpoint(tmp_path / "ck.pt", "a").load() is None
    assert (tmp_path / "ck.pt.unreadable").exists() and not (tmp_path / "ck.pt").exists()
    assert "is unreadable" in capsys.readouterr().out
