import re

import numpy as np
import pytest
import torch
from torch import nn

from bayeskd.zoo import ZOO, features

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


def build(name: str, num_classes: int = 100) -> nn.Module:
    torch.manual_seed(0)
    return ZOO[name](num_classes, (3, 32, 32)).eval()


def test_zoo_has_exactly_the_listed_nets():
    assert sorted(ZOO) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_and_logits_shape(name):
    model = build(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS_AT_100_CLASSES[name]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("name", NAMES)
def test_features_match_forward_and_leave_no_hooks(name):
    model = build(name, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        logits, feats = features(model, x)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert list(feats) == model.feature_names
    *stages, pre_logit = model.feature_names
    assert stages and all(feats[s].dim() == 4 and feats[s].shape[0] == 2 for s in stages)
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert feats[pre_logit].shape == (2, last_linear.in_features)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("in_shape", [(1, 8, 8), (30,), (3, 32)])
@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV2"])
def test_bad_input_shape_is_rejected(name, in_shape):
    with pytest.raises(ValueError, match=rf"{name}.*{re.escape(str(in_shape))}"):
        ZOO[name](10, in_shape)


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
@pytest.mark.parametrize("name", NAMES)
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
