"""Data-parallel training: two CPU processes (torchrun, gloo) against one, on the same global batch."""

import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors import safe_open
from torch import nn

from bayeskd import calibration
from bayeskd.train import Placement, TrainingError, TrainSet, epoch_steps
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


def test_a_rank_pins_host_memory_for_its_own_part_only(tmp_path):
    """With the training inputs kept in host memory, each rank's buffer holds its part of an epoch
    (about 1/world of the set), and its batches are its parts of the global batches."""
    x, y = torch.arange(130.0).reshape(130, 1).expand(130, 4).contiguous(), torch.zeros(130, dtype=torch.long)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:  # DDP wraps the model in a group of one; the placement is rank 1's of 3
        place = Placement.of(nn.Linear(4, 2), nn.Module(), TrainSet(x, y), torch.device("cpu"), 64, rank=1,
                             world=3, resident=False)
        order = torch.randperm(130, generator=torch.Generator().manual_seed(0))
        got = [b.x[:, 0].long() for b in place.batches(order, None)]
    finally:
        dist.destroy_process_group()
    mine = epoch_steps(order, 64, 1, 3)
    assert len(place.pinned) == sum(len(p) for p in mine) == 42  # 21 of each 64, not 130
    assert [b.tolist() for b in got] == [p.tolist() for p in mine]


@pytest.mark.parametrize("samples,batch", [(3, 64), (100, 3)])
def test_fewer_samples_or_a_smaller_batch_than_processes_is_refused(samples, batch):
    train = TrainSet(torch.zeros(samples, 4), torch.zeros(samples, dtype=torch.long))
    why = f"a batch of {batch} and {samples} training samples for compute.processes = 4: each process needs"
    with pytest.raises(TrainingError, match=why):
        Placement.of(nn.Linear(4, 2), nn.Module(), train, torch.device("cpu"), batch, rank=0, world=4)


@pytest.mark.slow
def test_training_stage_with_two_processes(built):
    """The teacher stage under two processes, on the shared built project's prepared data, with a
    temperature-scaled teacher: rank 0 alone fits the temperature and writes the weights."""
    project = built
    params = tiny_params(**{"compute.processes": 2, "teacher.loss": "ce_ts"})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / "models/teacher.safetensors").unlink()  # the outputs below are this run's
    shutil.rmtree(project / "dvclive/teacher")
    out = run(["python", "-m", "bayeskd.launch", "stages/train_teacher.py"], project)
    assert out.stdout.count("teacher mlp_teacher (ce_ts) done") == 1  # rank 0 alone reports and writes
    assert out.stdout.count("temperature scaling: T = ") == 1
    with safe_open(project / "models/teacher.safetensors", "pt") as f:
        assert float(f.metadata()[calibration.METADATA_KEY]) > 0
    assert len((project / "dvclive/teacher/plots/metrics/train/loss.tsv").read_text().splitlines()) == 1 + 3
