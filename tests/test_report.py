"""The report: its landing page, and `snakemake --report` after the README's install (no test extras)."""

import base64
import json
import re
import subprocess
import sys

import pandas as pd
import pytest
from docutils.core import publish_parts

from conftest import REPO
from noduleflow.report import image_tag, runs_table


def test_the_runs_table_becomes_an_rst_table_of_the_landing_columns(tmp_path):
    runs = pd.DataFrame({"rank": [1, 2, 1], "run": ["raw3d_bridge", "raw3d_bridge", "slices2d_bridge"],
                         "method": ["median_growth", "raw3d_bridge", "copy_prior"], "dims": [3, 3, 2],
                         "mae": [123.456, 150.0, 12.5], "direction_accuracy": [0.6, 0.5, float("nan")],
                         "rmse": [200.0, 210.0, 20.0]})
    runs.to_csv(tmp_path / "runs.csv", index=False)
    html = publish_parts(".. csv-table:: runs\n   :header-rows: 1\n\n" + runs_table(tmp_path / "runs.csv"),
                         writer="html", settings_overrides={"report_level": 2, "halt_level": 2})["body"]
    cells = [re.sub("<[^>]+>", "", c).strip() for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", html, re.S)]
    assert cells[:6] == ["rank", "dims", "run", "method", "MAE", "direction accuracy"]  # rmse is left out
    assert cells[6:12] == ["1", "3", "raw3d_bridge", "median_growth", "123", "0.6"]
    assert cells[-2:] == ["12.5", "n/a"]  # a metric a baseline has no value for


def test_an_image_tag_inlines_the_png_in_lines_docutils_accepts(tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 200  # 51 kB: one base64 line would be too long for docutils
    (tmp_path / "a.png").write_bytes(png)
    tag = image_tag(tmp_path / "a.png", "montage.png")
    assert tag.startswith('<img alt="montage.png" style="max-width: 100%" src="data:image/png;base64,')
    assert max(len(line) for line in tag.splitlines()) < 10000
    assert base64.b64decode("".join(tag.split("base64,")[1].rstrip('">').split())) == png
    html = publish_parts(".. raw:: html\n\n" + "\n".join("   " + line for line in tag.splitlines()), writer="html",
                         settings_overrides={"report_level": 2, "halt_level": 2})["body"]
    assert "data:image/png;base64," in html


@pytest.mark.slow
def test_the_report_after_the_readme_install_opens_on_the_runs_table(demo_run, tmp_path):
    """The README's install (no test extras) in a fresh environment makes the report of a finished run."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "torch==2.13.0", "-e", str(REPO)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-4000:]
    report = demo_run / "report_without_test_extras.html"
    result = subprocess.run([str(venv / "bin" / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory",
                             str(demo_run), "--report", str(report)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    html = report.read_text(errors="replace")
    landing = json.loads(re.search(r"var workflow_desc = (\".*?\");\n", html, re.S).group(1))
    assert "Runs and baselines" in landing and "What a good result looks like" in landing
    ranked = pd.read_csv(demo_run / "results" / "evaluation" / "val" / "runs.csv")
    table = landing[landing.index("<table"):landing.index("</table>")]
    assert all(method in table for method in ranked["method"])  # every row of runs.csv
    assert landing.count("data:image/png;base64,") == 2 * len(ranked["run"].unique())  # montage, change scatter
