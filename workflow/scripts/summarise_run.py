"""Rule summarise_run: metrics of one run and its baselines, with bootstrap intervals and pictures."""

from noduleflow.evaluation.tasks import summarise
from noduleflow.logs import log_to

with log_to(snakemake.log[0]):
    out = snakemake.output
    summarise(snakemake.wildcards.run, snakemake.input.pairs, snakemake.input.rates, snakemake.params.evaluation,
              snakemake.params.seed, out.summary, out.scatter, out.interval)
