"""Data-parallel training: two CPU processes (torchrun, gloo) against one, on the same global batch."""

import subprocess
import sys

import torch
import yaml

from conftest import BIN, run, tiny_params

SCRIPT = """
import sys, torch
from bayeskd import nets
from bayeskd.config import Optim
from bayeskd.losses import ce
from bayeskd.train import Checkpoint, TrainSet, distributed, fit, seed_everything

rank, world = distributed()
seed_everything(0)
g = torch.Generator().manual_seed(1)
x = torch.randn(512, 8, generator=g)
y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
model = nets.build("mlp_teacher", 3, (8,))
cfg = Optim(epochs=3, batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4, milestones=[2], gamma=0.1)
history = fit(model, lambda logits, b, e: {"ce": ce(logits, b.y)}, TrainSet(x, y), cfg, seed=0,
              checkpoint=Checkpoint(sys.argv[1] + ".ckpt", "ddp-test"), name=f"rank{rank}")
if rank == 0:
    torch.save({"weights": model.state_dict(), "history": history, "world": world}, sys.argv[1])
"""


def test_two_gloo_processes_match_one_process(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    single, ddp = tmp_path / "single.pt", tmp_path / "ddp.pt"
    subprocess.run([sys.executable, str(script), str(single)], check=True, timeout=300)
    out = subprocess.run([f"{BIN}/torchrun", "--standalone", "--nproc-per-node", "2", str(script), str(ddp)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    a, b = (torch.load(p, weights_only=True) for p in (single, ddp))
    assert (a["world"], b["world"]) == (1, 2)
    # the same steps: gradients averaged over two halves of each global batch; only the order of
    # floating-point reductions differs
    for key, value in a["weights"].items():
        torch.testing.assert_close(b["weights"][key], value, rtol=1e-5, atol=1e-6)
    for ha, hb in zip(a["history"], b["history"], strict=True):  # epoch metrics summed over ranks
        assert abs(ha["train/loss"] - hb["train/loss"]) < 1e-5 and ha["train/acc"] == hb["train/acc"]


def test_training_stage_with_two_processes(project):
    params = tiny_params(**{"compute.processes": 2})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["python", "stages/prepare.py"], project)
    out = run(["python", "-m", "bayeskd.launch", "stages/train_teacher.py"], project)
    assert out.stdout.count("teacher mlp_teacher (ce) done") == 1  # rank 0 alone reports and writes
    assert (project / "models/teacher.safetensors").exists()
    assert len((project / "dvclive/teacher/plots/metrics/train/loss.tsv").read_text().splitlines()) == 1 + 3
