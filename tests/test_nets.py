import itertools

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


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_embedded_nets_equal_torchvisions_layers(name):
    """The embedded nets are built from torch.nn (bayeskd.zoo.embedded says why): from one seed,
    the same weights and the same outputs as torchvision's MLP and Conv2dNormActivation."""
    from torchvision.ops import MLP, Conv2dNormActivation

    in_shape = (1, 8, 8) if name.startswith("cnn") else (30,)
    torch.manual_seed(0)
    ours = nets.build(name, 7, in_shape)
    torch.manual_seed(0)
    declared = nets.NETS[name].kwargs  # the widths of the declaration (bayeskd.zoo.embedded)
    if "hidden" in declared:
        theirs = torch.nn.Sequential(torch.nn.Flatten(), MLP(30, [*declared["hidden"], 7]))
    else:
        widths = declared["widths"]
        blocks = [Conv2dNormActivation(a, b, kernel_size=3) for a, b in itertools.pairwise([1, *widths])]
        theirs = torch.nn.Sequential(blocks[0], torch.nn.MaxPool2d(2), *blocks[1:],
                                     torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                     torch.nn.Linear(widths[-1], 7))
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(5, *in_shape)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)


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
