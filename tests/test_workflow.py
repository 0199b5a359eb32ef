"""The pull-request workflow runs the same commands that the README documents and the tests run."""

import yaml

from conftest import ROOT


def test_pull_request_workflow_calls_the_documented_commands():
    wf = yaml.safe_load((ROOT / ".github/workflows/metrics-diff.yml").read_text())
    assert "pull_request" in wf[True]  # YAML reads the key `on` as True
    assert wf["permissions"]["pull-requests"] == "write"
    steps = wf["jobs"]["metrics-diff"]["steps"]
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0  # the base branch's metrics are in its commits
    commands = [s["run"] for s in steps if "run" in s]
    assert commands[0] == "make run"
    assert commands[1].startswith(".venv/bin/bayeskd diff \"origin/${{ github.base_ref }}\" > ")
    written = commands[1].rsplit("> ", 1)[1]
    comment = next(s for s in steps if "sticky-pull-request-comment" in s.get("uses", ""))
    assert comment["with"]["path"] == written

    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "bayeskd diff main" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert "dvc repro" in makefile.split("run: setup", 1)[1].split("\n\n")[0]
