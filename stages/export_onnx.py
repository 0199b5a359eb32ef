"""Stage export_onnx: teacher and student to ONNX, checked against torch with onnxruntime; then the
pipeline execution's MLflow run is completed: test metrics, reports, the ONNX student (see
bayeskd.tracking)."""

import json
from pathlib import Path

from bayeskd import data, export, nets
from bayeskd.io import json_text, outputs
from bayeskd.tracking import MODEL_NAME, mlflow_run
from common import DATA, STUDENT, TEACHER, build, fail, params, stage, tensors

REPORT = "reports/export.json"
METRICS = "reports/metrics.json"  # written by the evaluate stage


def main() -> None:
    p = params()
    e = p.export
    ds = data.load(DATA, ("test",))
    x, _ = tensors(ds, "test")  # held-out inputs for the parity check
    exported, report = {}, {}
    for role, net, weights in (("teacher", p.teacher.net, TEACHER), ("student", p.student.net, STUDENT)):
        model = nets.load_weights(build(role, net, ds), weights)
        exported[role] = export.to_onnx(model, x[:2], e.opset)
        report[role] = r = export.check(exported[role], model, x, e.batch_size, e.latency_runs,
                                        device=p.compute.device)
        print(f"{role}: max |onnxruntime - torch| {r['max_abs_diff']:.2e}, "
              f"{r['latency_ms']:.3f} ms per batch of {r['batch_size']}")
    worst = max(r["max_abs_diff"] for r in report.values())
    if worst > e.max_abs_diff:
        fail(f"ONNX output differs from torch by {worst:.3g} > export.max_abs_diff = {e.max_abs_diff}; "
             "nothing written")
    # the latency goes to MLflow and the log only: it differs on every run, and would change a
    # tracked file (and dvc.lock) on every rerun of a pipeline that otherwise repeats bit for bit
    kept = {role: {k: v for k, v in r.items() if k != "latency_ms"} for role, r in report.items()}
    with outputs() as out:  # the models, then the report: all new or all old
        for role, model_bytes in exported.items():
            out.path(f"models/{role}.onnx").write_bytes(model_bytes)
        out.text(REPORT, json_text(kept))
    print(f"wrote models/teacher.onnx, models/student.onnx and {REPORT}")

    metrics = json.loads(Path(METRICS).read_text())
    with mlflow_run(final=True) as run:
        student = {"student": metrics["student"], "agreement": metrics["agreement"],
                   "export": {"student": report["student"]}}
        version = run.register_onnx("models/student.onnx", x[:2].numpy(), student)
        run.log_metrics({k: v for k, v in metrics.items() if k not in student}
                        | {"export": {"teacher": report["teacher"]}})
        run.log_restored_curves({role: f"dvclive/{role}" for role in ("teacher", "student")})
        run.log_artifacts("reports", "dvclive")
    if version:
        print(f"registered models/student.onnx as {MODEL_NAME} version {version}")


if __name__ == "__main__":
    stage(main)
