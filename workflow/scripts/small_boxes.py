"""Rule small_boxes: boxes in patch coordinates and reference volumes (noduleflow.cache.patches)."""

from pathlib import Path

import pandas as pd

from noduleflow.cache.patches import PatchSettings, small_boxes
from noduleflow.cache.segmenter import build_segmenter
from noduleflow.io import write_parquet
from noduleflow.logs import log_to
from noduleflow.settings import from_config

with log_to(snakemake.log[0]):
    table = small_boxes(pd.read_parquet(snakemake.input.index), Path(snakemake.input.index).parent,
                        from_config(PatchSettings, snakemake.params.patch),
                        build_segmenter(snakemake.params.segmentation))
    write_parquet(table, snakemake.output[0])
