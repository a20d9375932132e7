"""Rule nodule_tracking: tracking file -> one row per nodule per exam (noduleflow.metadata.nodules)."""

import pandas as pd

from noduleflow.io import write_csv, write_parquet
from noduleflow.logs import log_to
from noduleflow.metadata.nodules import TRACKING_SCHEMA, build_tracking_table, load_tracking

with log_to(snakemake.log[0]):
    table, problems = build_tracking_table(load_tracking(snakemake.input.nodules),
                                           pd.read_parquet(snakemake.input.series))
    write_parquet(table, snakemake.output.tracking, schema=TRACKING_SCHEMA)
    write_csv(problems.frame(), snakemake.output.problems)
