"""Run a training stage: directly for one process, under torchrun for `compute.processes` > 1.

`python -m bayeskd.launch stages/train_teacher.py`. One process keeps the stage's own exit code
and messages; torchrun (`python -m torch.distributed.run` of this interpreter, so no `torchrun` on
PATH is needed) reports a failed rank with its own exit code (1) and a report.
"""

import os
import sys

from bayeskd import config


def main() -> None:
    script = sys.argv[1]
    processes = config.load_or_exit().compute.processes
    if processes == 1:
        os.execv(sys.executable, [sys.executable, script])
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={processes}", script])


if __name__ == "__main__":
    main()
