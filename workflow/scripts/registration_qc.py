"""Rule registration_qc: gather a split's shards and flag bad registrations (noduleflow.registration.rigid)."""

import pandas as pd

from noduleflow.io import write_csv, write_parquet
from noduleflow.logs import log_to
from noduleflow.registration.rigid import QualityThresholds, gather_registrations
from noduleflow.settings import from_config

with log_to(snakemake.log[0]):
    exams, bad = gather_registrations(pd.read_parquet(snakemake.input.exams),
                                      [pd.read_parquet(path) for path in snakemake.input.shards],
                                      from_config(QualityThresholds, snakemake.params.qc))
    write_parquet(exams, snakemake.output.exams)
    write_csv(bad, snakemake.output.bad)
