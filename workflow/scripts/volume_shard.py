"""Rule volume_shard: the full registered volumes of one shard (noduleflow.volumes)."""

import pandas as pd

from noduleflow.io import write_parquet
from noduleflow.logs import log_to
from noduleflow.patches import PatchSettings
from noduleflow.settings import from_config
from noduleflow.volumes import volume_shard

with log_to(snakemake.log[0]):
    index = volume_shard(pd.read_parquet(snakemake.input.exams), snakemake.wildcards.split,
                         int(snakemake.wildcards.shard), from_config(PatchSettings, snakemake.params.volumes),
                         snakemake.output.volumes)
    write_parquet(index, snakemake.output.index)
