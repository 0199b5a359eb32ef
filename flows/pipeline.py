"""The pipeline flow. Without a server: `python -m flows.pipeline [params.yaml key=value ...]`,
e.g. `python -m flows.pipeline teacher.loss=mse seed=1`."""

import sys

from bayeskd.flows import cli_overrides, pipeline

if __name__ == "__main__":
    pipeline(set_params=cli_overrides(sys.argv[1:]))
