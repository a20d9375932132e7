"""Rule evaluation_table: every run and baseline in one ranked table."""

from noduleflow.evaluation.tasks import cross_run_table
from noduleflow.logs import log_to

with log_to(snakemake.log[0]):
    cross_run_table(list(snakemake.input), snakemake.output[0])
