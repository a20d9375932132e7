"""Rule split_tables: exams, timelines and exam pairs of one split (noduleflow.metadata.tables)."""

import pandas as pd

from noduleflow.io import write_csv, write_parquet
from noduleflow.logs import log_to
from noduleflow.metadata.tables import SeriesFilter, split_tables
from noduleflow.settings import from_config

with log_to(snakemake.log[0]):
    tables, problems = split_tables(
        series=pd.read_parquet(snakemake.input.series),
        nodules=pd.read_parquet(snakemake.input.tracking),
        split=snakemake.wildcards.split,
        seed=snakemake.params.seed,
        fractions=snakemake.params.fractions,
        n_shards=snakemake.params.n_shards,
        series_filter=from_config(SeriesFilter, snakemake.params.series_filter),
    )
    for name, table in tables.items():
        write_parquet(table, snakemake.output[name])
    write_csv(problems.frame(), snakemake.output.problems)
