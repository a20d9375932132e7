"""Rule cache_shard: cut the nodule patches of one shard (noduleflow.cache.patches)."""

import pandas as pd

from noduleflow.cache.patches import PatchSettings, cache_shard
from noduleflow.io import write_csv, write_parquet
from noduleflow.logs import log_to
from noduleflow.settings import from_config

with log_to(snakemake.log[0]):
    index, skipped = cache_shard(
        exams=pd.read_parquet(snakemake.input.exams), nodules=pd.read_parquet(snakemake.input.nodules),
        split=snakemake.wildcards.split, shard=int(snakemake.wildcards.shard),
        settings=from_config(PatchSettings, snakemake.params.patch), patch_file=snakemake.output.patches,
        slice_file=snakemake.output.slices)
    write_parquet(index, snakemake.output.index)
    write_csv(skipped, snakemake.output.skipped)
