"""Rule registered_niftis: a few follow-ups in registered space with QC pictures (noduleflow.registration.rigid)."""

import pandas as pd

from noduleflow.io import write_pickle
from noduleflow.logs import log_to
from noduleflow.registration.rigid import write_registered_exams

with log_to(snakemake.log[0]):
    written = write_registered_exams(
        pd.concat([pd.read_parquet(path) for path in snakemake.input.exams], ignore_index=True),
        pd.concat([pd.read_parquet(path) for path in snakemake.input.nodules], ignore_index=True),
        snakemake.params.spacing, snakemake.params.how_many, snakemake.output.niftis, snakemake.output.pictures)
    write_pickle(written, snakemake.output.mapping)
