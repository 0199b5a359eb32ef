import re

import numpy as np
import pytest
import torch
from torch import nn

from bayeskd import nets
from bayeskd.taps import features
from bayeskd.zoo import NETS

PARAMS_AT_100_CLASSES = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "ResNet18": 11_220_132,
    "ResNet50": 23_705_252,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "MobileNetV2": 812_836,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
}
NAMES = list(PARAMS_AT_100_CLASSES)


def smallest_of_each_builder() -> list[str]:
    """The nets the ONNX export test exports: one per builder, its smallest. The others run the same
    code with more blocks or wider layers, and tracing each costs seconds (resnet110: 12 s); the
    presets' pairs export in the end-to-end tests too (resnet56 -> resnet20 on the CIFAR fixture,
    resnet32x4 -> resnet8x4 in the paper-scale preset)."""
    by_builder: dict = {}
    for name in NAMES:
        by_builder.setdefault(NETS[name].impl, []).append(name)
    return [min(names, key=PARAMS_AT_100_CLASSES.__getitem__) for names in by_builder.values()]


def build(name: str, num_classes: int = 100) -> nn.Module:
    torch.manual_seed(0)
    return NETS[name].build(num_classes, (3, 32, 32)).eval()


def test_zoo_has_exactly_the_listed_nets():
    zoo = [name for name, declared in NETS.items() if declared.impl.__module__ != "bayeskd.zoo.embedded"]
    assert sorted(zoo) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_and_logits_shape(name):
    model = build(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS_AT_100_CLASSES[name]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


# (channels, side) of each stage output and the pre-logit width on a 32x32 input, as the reference CIFAR
# KD code (CRD's RepDistiller, mdistiller) gives them in its feature lists
THIN = [(16, 32), (32, 16), (64, 8)], 64
WIDE = [(64, 32), (128, 16), (256, 8)], 256
STAGES_AT_32_PIXELS = {
    **{f"resnet{d}": THIN for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": WIDE,
    "resnet32x4": WIDE,
    "ResNet18": ([(64, 32), (128, 16), (256, 8), (512, 4)], 512),
    "ResNet50": ([(256, 32), (512, 16), (1024, 8), (2048, 4)], 2048),
    **{f"wrn_{d}_{w}": ([(16 * w, 32), (32 * w, 16), (64 * w, 8)], 64 * w) for d in (16, 40) for w in (1, 2)},
    # the last block runs at 4x4: the reference pools before it only for 64-pixel inputs
    **{f"vgg{d}": ([(64, 32), (128, 16), (256, 8), (512, 4), (512, 4)], 512) for d in (8, 11, 13, 16, 19)},
    "MobileNetV2": ([(12, 16), (16, 8), (48, 4), (160, 2)], 1280),
    "ShuffleV1": ([(240, 16), (480, 8), (960, 4)], 960),
    "ShuffleV2": ([(116, 16), (232, 8), (464, 4)], 1024),
}


@pytest.mark.parametrize("name", NAMES)
def test_stage_outputs_have_the_reference_shapes_and_taps_leave_no_hooks(name):
    model = build(name, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        f = features(model, x)
    torch.testing.assert_close(f.logits, expected, rtol=0, atol=0)
    stages, width = STAGES_AT_32_PIXELS[name]
    assert [(s.shape[1], s.shape[2], s.shape[3]) for s in f.stages] == [(c, p, p) for c, p in stages]
    assert f.pooled.shape == (2, width)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name", list(NETS))
def test_every_net_keeps_the_zoo_convention(name):
    """bayeskd.zoo's docstring: forward returns the logits only; the taps are the stage outputs,
    shallow to deep, and the pre-logit vector, the input of the final linear layer; global pooling is
    a mean (no AdaptiveAvgPool2d)."""
    torch.manual_seed(0)
    model = nets.build(name, 10, (3, 32, 32)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        f = features(model, x)
        last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        torch.testing.assert_close(last_linear(f.pooled), out, rtol=1e-5, atol=1e-5)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
    assert f.pooled.shape == (2, last_linear.in_features)
    assert all(s.dim() == 4 for s in f.stages)
    sides = [s.shape[-1] for s in f.stages]
    assert sides == sorted(sides, reverse=True)
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())


def test_vgg_pools_before_its_last_block_on_64_pixel_inputs_only():
    big = NETS["vgg8"].build(10, (3, 64, 64)).eval()
    with torch.no_grad():
        f = features(big, torch.randn(2, 3, 64, 64))
    assert [s.shape[-1] for s in f.stages] == [64, 32, 16, 8, 4]


@pytest.mark.parametrize("in_shape", [(1, 8, 8), (30,), (3, 32)])
@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV2"])
def test_bad_input_shape_is_rejected(name, in_shape):
    with pytest.raises(ValueError, match=rf"{name}.*{re.escape(str(in_shape))}"):
        nets.build(name, 10, in_shape)


def with_batch_statistics(model: nn.Module) -> nn.Module:
    """Set every batch norm's running statistics from one batch, as training would, so that the
    eval-mode logits have a trained net's scale (fresh running statistics let deep nets' logits grow
    into the thousands, where float32 rounding alone exceeds an absolute tolerance)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", smallest_of_each_builder())
def test_onnx_export_with_dynamic_batch_matches_torch(tmp_path, name):
    import onnxruntime as ort

    model = with_batch_statistics(build(name))
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(
        model, (torch.randn(2, 3, 32, 32),), str(path), dynamo=True, opset_version=18,
        input_names=["input"], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
    )
    x = torch.randn(3, 3, 32, 32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert got.shape == (3, 100)
    assert float(np.abs(got - expected).max()) <= 1e-4
