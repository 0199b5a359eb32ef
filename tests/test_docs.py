"""The documentation: a README that guides (short, its links resolve) and a site that builds strictly."""

import os
import re
import subprocess

from conftest import BIN, ROOT


def test_the_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`, as `make docs` runs it: a broken link or anchor, or a page left out of
    the navigation, fails the build."""
    result = subprocess.run([f"{BIN}/mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=os.environ | {"NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site/effect-map/index.html").exists()


def test_the_readme_guides_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
