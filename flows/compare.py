"""The comparison flow. Without a server: `python -m flows.compare [flow parameter=value ...]`,
e.g. `python -m flows.compare "seeds=[0, 1]" "teacher_losses=[ce, mse]"`."""

import sys

from bayeskd.flows import cli_overrides, compare

if __name__ == "__main__":
    compare(**cli_overrides(sys.argv[1:]))
