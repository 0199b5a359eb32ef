import onnx
import pytest
import torch

from bayeskd import export, nets


@pytest.mark.parametrize("name,in_shape", [("mlp_teacher", (30,)), ("cnn_teacher", (1, 8, 8))])
def test_onnx_matches_torch_for_any_batch_size(tmp_path, name, in_shape):
    torch.manual_seed(0)
    model = nets.build(name, 10, in_shape).eval()
    exported = export.to_onnx(model, torch.randn(2, *in_shape), opset=18)
    graph = onnx.load_from_string(exported).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    assert all(p.key != export.STACK_TRACE for node in graph.node for p in node.metadata_props)
    assert "/src/bayeskd" not in exported.decode("latin1")  # no paths of this machine
    x = torch.randn(300, *in_shape)
    report = export.check(exported, model, x, batch_size=128, runs=3)  # batches of 128, 128 and 44
    assert report["max_abs_diff"] <= 1e-4
    assert report["latency_ms"] > 0 and report["batch_size"] == 128


def test_parity_check_detects_a_different_model(tmp_path):
    torch.manual_seed(0)
    model = nets.build("mlp_student", 10, (30,)).eval()
    exported = export.to_onnx(model, torch.randn(2, 30), opset=18)
    other = nets.build("mlp_student", 10, (30,)).eval()
    report = export.check(exported, other, torch.randn(64, 30), batch_size=64, runs=1)
    assert report["max_abs_diff"] > 1e-3
