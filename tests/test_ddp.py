"""Data-parallel training: two CPU processes (torchrun, gloo) against one, on the same global batch."""

import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from bayeskd.train import epoch_steps
from conftest import run, tiny_params

SCRIPT = """
import atexit, sys, torch, torch.distributed as dist
from pathlib import Path
from bayeskd import nets
from bayeskd.config import Optim
from bayeskd.losses import ce
from bayeskd.train import Checkpoint, TrainSet, distributed, fit, seed_everything

rank, world = distributed()
# atexit runs last-registered first: this runs after the loop's own exit handler
atexit.register(lambda: Path(f"{sys.argv[1]}.group-left-{rank}").write_text(str(not dist.is_initialized())))
seed_everything(0)
g = torch.Generator().manual_seed(1)
x = torch.randn(512, 8, generator=g)
y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
model = nets.build("mlp_teacher", 3, (8,))
cfg = Optim(epochs=3, batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4, milestones=[2], gamma=0.1)
loss = lambda logits, b, e: {"ce": ce(logits, b.y)}
history = fit(model, loss, TrainSet(x, y), cfg, seed=0, val=(x[:100], y[:100]), name=f"rank{rank}",
              checkpoint=Checkpoint(sys.argv[1] + ".ckpt", "ddp-test"))
# 65 samples: the last global batch has 1 sample, fewer than the processes
tail = fit(nets.build("mlp_teacher", 3, (8,)), loss, TrainSet(x[:65], y[:65]),
           cfg.model_copy(update={"epochs": 1}), seed=0, checkpoint=Checkpoint(sys.argv[1] + ".tail", "tail"),
           name=f"tail{rank}")
if rank == 0:
    torch.save({"weights": model.state_dict(), "history": history, "tail": tail, "world": world}, sys.argv[1])
"""


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    single, ddp = tmp_path / "single.pt", tmp_path / "ddp.pt"
    subprocess.run([sys.executable, str(script), str(single)], check=True, timeout=300)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                          "2", str(script), str(ddp)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    a, b = (torch.load(p, weights_only=True) for p in (single, ddp))
    assert (a["world"], b["world"]) == (1, 2)
    # the same steps: gradients averaged over two halves of each global batch; only the order of
    # floating-point reductions differs
    for key, value in a["weights"].items():
        torch.testing.assert_close(b["weights"][key], value, rtol=1e-5, atol=1e-6)
    for ha, hb in zip(a["history"], b["history"], strict=True):  # epoch metrics summed over ranks
        assert abs(ha["train/loss"] - hb["train/loss"]) < 1e-5 and ha["train/acc"] == hb["train/acc"]
        assert abs(ha["val/nll"] - hb["val/nll"]) < 1e-4  # validated on rank 0 alone
    # the sample of a last batch smaller than the world is dropped, not split into an empty part
    assert torch.isfinite(torch.tensor(b["tail"][0]["train/loss"]))
    for rank in (0, 1):
        assert (tmp_path / f"ddp.pt.group-left-{rank}").read_text() == "True"  # the group was destroyed


def test_each_rank_gets_a_part_of_every_batch_and_a_tail_below_the_world_is_dropped():
    order = torch.arange(130)
    parts = [epoch_steps(order, 64, rank, 3) for rank in range(3)]
    assert [len(p) for p in parts] == [2, 2, 2]  # the last batch (2 samples < 3 processes) dropped
    assert [len(s) for s in parts[0]] == [22, 22] and [len(s) for s in parts[2]] == [21, 21]
    assert torch.equal(torch.cat([torch.cat([p[i] for p in parts]) for i in range(2)]), order[:128])
    assert [len(s) for s in epoch_steps(order, 64, 0, 1)] == [64, 64, 2]  # one process drops nothing
    assert [len(s) for s in epoch_steps(torch.arange(130), 64, 1, 2)] == [32, 32, 1]  # 2 samples, 1 each


@pytest.mark.slow
def test_training_stage_with_two_processes(built):
    """The teacher stage under two processes, on the shared built project's prepared data."""
    project = built
    params = tiny_params(**{"compute.processes": 2})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / "models/teacher.safetensors").unlink()  # the outputs below are this run's
    shutil.rmtree(project / "dvclive/teacher")
    out = run(["python", "-m", "bayeskd.launch", "stages/train_teacher.py"], project)
    assert out.stdout.count("teacher mlp_teacher (ce) done") == 1  # rank 0 alone reports and writes
    assert (project / "models/teacher.safetensors").exists()
    assert len((project / "dvclive/teacher/plots/metrics/train/loss.tsv").read_text().splitlines()) == 1 + 3
