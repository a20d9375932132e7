"""Rule nodule_pairs: consecutive exams of the same nodule (noduleflow.metadata.tables)."""

import pandas as pd

from noduleflow.io import write_parquet
from noduleflow.logs import log_to
from noduleflow.metadata.tables import nodule_pairs

with log_to(snakemake.log[0]):
    write_parquet(nodule_pairs(pd.read_parquet(snakemake.input[0])), snakemake.output[0])
