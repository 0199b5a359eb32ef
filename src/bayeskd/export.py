"""ONNX export with a dynamic batch axis, checked against torch with onnxruntime."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from bayeskd import integrity

STACK_TRACE = "pkg.torch.onnx.stack_trace"  # node metadata holding absolute source paths


def to_onnx(model: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    """The serialised ONNX model, with a dynamic batch axis and without the exporter's per-node
    Python stack traces (they hold this machine's paths and make equal models differ between
    checkouts); checked by onnx.checker; carrying the sha256 of its content in its metadata. Exported
    from the CPU (the model moves there; an ONNX model holds no device), with the example input there
    too."""
    import onnx

    model.eval().cpu()
    program = torch.onnx.export(
        model, (example.cpu(),), dynamo=True, opset_version=opset, input_names=["input"],
        output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
    )
    exported = program.model_proto
    for node in exported.graph.node:
        kept = [p for p in node.metadata_props if p.key != STACK_TRACE]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.checker.check_model(exported, full_check=True)
    return integrity.onnx_with_digest(exported.SerializeToString())


def check(onnx_model: bytes, model: nn.Module, x: torch.Tensor, batch_size: int, runs: int,
          device: torch.device | str = "auto") -> dict:
    """Largest |onnxruntime - torch| over the inputs `x`, in batches (torch predicting on `device`,
    bayeskd.placement), and onnxruntime's median latency for one batch of `batch_size`."""
    import onnxruntime as ort

    from bayeskd.train import predict

    session = ort.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    reference = predict(model, x, batch_size, device).numpy()
    diff = 0.0
    for i in range(0, len(x), batch_size):
        got = session.run(None, {"input": x[i : i + batch_size].numpy()})[0]
        diff = max(diff, float(np.abs(got - reference[i : i + batch_size]).max()))
    batch = x[:batch_size].numpy()
    session.run(None, {"input": batch})  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"input": batch})
        times.append(time.perf_counter() - start)
    return {"max_abs_diff": diff, "latency_ms": 1000 * float(np.median(times)),
            "batch_size": len(batch)}
