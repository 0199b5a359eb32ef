"""Write .dvc/plots/page.html: DVC's plots page with vega, vega-lite and vega-embed inlined.

`dvc plots show` / `dvc plots diff` load these scripts from a CDN by default, so their pages are
blank without internet (GPU hosts, clusters). .dvc/config points DVC at this template instead
(`plots.html_template`). The scripts are the builds of the versions that dvc-render loads, taken
from their npm packages; regenerate after upgrading dvc-render:

    npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
    python tools/offline_plots_page.py vega-5.20.2.tgz vega-lite-5.2.0.tgz vega-embed-6.18.2.tgz
"""

import hashlib
import sys
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / ".dvc" / "plots" / "page.html"


def main(tarballs: list[str]) -> None:
    scripts, notices = [], []
    for tgz in tarballs:
        with tarfile.open(tgz) as tar:
            names = tar.getnames()
            (build,) = [n for n in names if n.startswith("package/build/") and n.endswith(".min.js")
                        and "core" not in n]
            js = tar.extractfile(build).read().decode()
            license_text = tar.extractfile("package/LICENSE").read().decode().strip()
        for marker in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}"):
            assert marker not in js, f"{build} of {tgz} contains {marker!r}"
        name = Path(tgz).name.removesuffix(".tgz")
        notices.append(f"{name} ({build}, sha256 {hashlib.sha256(js.encode()).hexdigest()}):\n"
                       f"{license_text.replace('--', '- -')}")
        scripts.append(f"<script>/* {name} */\n{js}\n</script>")
    header = ("<!-- bayeskd: the page of `dvc plots show/diff` with its scripts inlined, so that it "
              "renders offline.\nWritten by tools/offline_plots_page.py from the npm packages below."
              "\n\n" + "\n\n".join(notices) + "\n-->")
    page = f"""<!DOCTYPE html>
{header}
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    {chr(10).join(scripts)}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(page)
    print(f"wrote {OUT} ({len(page) // 1024} KiB)")


if __name__ == "__main__":
    main(sys.argv[1:])
