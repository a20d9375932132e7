"""Rule volume_shard: the full registered volumes of one shard (noduleflow.cache.volumes)."""

import pandas as pd

from noduleflow.cache.patches import PatchSettings
from noduleflow.cache.volumes import volume_shard
from noduleflow.io import write_parquet
from noduleflow.logs import log_to
from noduleflow.settings import from_config

with log_to(snakemake.log[0]):
    index = volume_shard(pd.read_parquet(snakemake.input.exams), snakemake.wildcards.split,
                         int(snakemake.wildcards.shard), from_config(PatchSettings, snakemake.params.volumes),
                         snakemake.output.volumes)
    write_parquet(index, snakemake.output.index)
