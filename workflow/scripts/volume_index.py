"""Rule volume_index: one checked index of a split's volumes (noduleflow.cache.volumes)."""

from pathlib import Path

import pandas as pd

from noduleflow.cache.patches import PatchSettings
from noduleflow.cache.volumes import consolidate_volumes
from noduleflow.io import write_parquet
from noduleflow.logs import log_to
from noduleflow.settings import from_config

with log_to(snakemake.log[0]):
    index = consolidate_volumes([pd.read_parquet(path) for path in snakemake.input.indexes],
                                Path(snakemake.output[0]).parent, from_config(PatchSettings, snakemake.params.volumes))
    write_parquet(index, snakemake.output[0])
