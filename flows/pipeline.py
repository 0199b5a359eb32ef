"""The pipeline flow. Without a server: `python -m flows.pipeline [params.yaml key=value ...]`,
e.g. `python -m flows.pipeline teacher.loss=mse seed=1`."""

import sys

from bayeskd.flows import pipeline, run_pipeline_cli

__all__ = ["pipeline"]  # the deployments' entrypoint (prefect.yaml)

if __name__ == "__main__":
    run_pipeline_cli(sys.argv[1:])
