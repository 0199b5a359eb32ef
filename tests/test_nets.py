import pytest
import torch
import torchvision
from torchvision.ops import nms

from bayeskd import nets

EMBEDDED = ["mlp_teacher", "mlp_student", "cnn_teacher", "cnn_student"]  # bayeskd.zoo.embedded


def test_torchvision_imports_and_runs_an_op():
    # A CPU-only torch wheel paired with the registry's torchvision fails here, at its compiled ops.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    assert torchvision.__version__.split("+")[0] == "0.29.2"


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_every_net_builds_and_classifies(name):
    in_shape = (1, 8, 8) if name.startswith("cnn") else (30,)
    model = nets.build(name, 7, in_shape)
    assert model(torch.randn(5, *in_shape)).shape == (5, 7)


def test_teacher_is_larger_than_student():
    count = {n: sum(p.numel() for p in nets.build(n, 10, (1, 8, 8)).parameters()) for n in EMBEDDED}
    assert count["mlp_teacher"] > 4 * count["mlp_student"]
    assert count["cnn_teacher"] > 4 * count["cnn_student"]


def test_paper_mlp_shape():
    # 30-128-128-10: (30*128+128) + (128*128+128) + (128*10+10)
    model = nets.build("mlp_teacher", 10, (30,))
    assert sum(p.numel() for p in model.parameters()) == 3968 + 16512 + 1290


def test_zoo_is_registered():
    model = nets.build("resnet8x4", 100, (3, 32, 32))
    assert sum(p.numel() for p in model.parameters()) == 1_233_540


def test_bad_names_and_shapes_are_clear():
    with pytest.raises(ValueError, match="expected one of .*mlp_teacher"):
        nets.build("resnet9000", 10, (30,))
    with pytest.raises(ValueError, match=r"image input .* shape \(30,\)"):
        nets.build("cnn_teacher", 10, (30,))


def test_weights_roundtrip(tmp_path):
    a = nets.build("cnn_student", 10, (1, 8, 8))
    nets.save_weights(a, tmp_path / "w.safetensors")
    b = nets.load_weights(nets.build("cnn_student", 10, (1, 8, 8)), tmp_path / "w.safetensors")
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(a.eval()(x), b(x), rtol=0, atol=0)
