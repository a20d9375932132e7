"""Rule cache_index: one checked index per split (noduleflow.cache.patches)."""

from pathlib import Path

import pandas as pd

from noduleflow.cache.patches import PatchSettings, consolidate
from noduleflow.io import write_csv, write_parquet
from noduleflow.logs import log_to
from noduleflow.settings import from_config

with log_to(snakemake.log[0]):
    index = consolidate([pd.read_parquet(path) for path in snakemake.input.indexes],
                        Path(snakemake.output.index).parent, from_config(PatchSettings, snakemake.params.patch))
    write_parquet(index, snakemake.output.index)
    write_csv(pd.concat([pd.read_csv(path, dtype=str) for path in snakemake.input.skipped]), snakemake.output.skipped)
