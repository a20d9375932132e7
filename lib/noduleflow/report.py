"""The report's landing page (workflow/report/workflow.rst): the runs table and the headline figures.

Snakemake renders the page with Jinja when it writes `snakemake --report`; the page reaches these functions through
the Snakefile's globals (workflow/rules/common.smk imports them).
"""

from __future__ import annotations

import base64
import os

import pandas as pd

# runs.csv columns shown on the landing page (the rest are in each run's summary.csv), with their headings
LANDING_COLUMNS = {"rank": "rank", "dims": "dims", "run": "run", "method": "method", "mae": "MAE",
                   "r2": "R^2", "direction_accuracy": "direction accuracy", "crps": "CRPS",
                   "coverage_80": "80 % coverage", "dice": "mean Dice"}


def runs_table(path: str | os.PathLike[str]) -> str:
    """runs.csv as the body of an rst `csv-table` (header row first, lines indented by three spaces)."""
    table = pd.read_csv(path)
    columns = [c for c in LANDING_COLUMNS if c in table]
    shown = table[columns].rename(columns=LANDING_COLUMNS)
    for column in shown.select_dtypes("number"):
        if column not in ("rank", "dims"):
            shown[column] = shown[column].map(lambda v: "n/a" if pd.isna(v) else f"{v:.3g}")
    lines = [",".join(f'"{v}"' for v in row) for row in [list(shown.columns), *shown.astype(str).values.tolist()]]
    return "\n".join("   " + line for line in lines)


def image_tag(path: str | os.PathLike[str], alt: str) -> str:
    """A PNG as an HTML <img> with the image inlined, so the self-contained report shows it on its first page.

    The base64 data is broken into lines (browsers drop the line breaks of a data URL): docutils refuses lines
    longer than 10,000 characters.
    """
    data = base64.encodebytes(open(path, "rb").read()).decode("ascii").strip()
    return f'<img alt="{alt}" style="max-width: 100%" src="data:image/png;base64,\n{data}">'
