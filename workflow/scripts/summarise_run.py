"""Rule summarise_run: metrics of one run and its baselines, with bootstrap intervals and pictures."""

from noduleflow.evaluation.tasks import summarise
from noduleflow.logs import log_to

with log_to(snakemake.log[0]):
    out = snakemake.output
    summarise(run_name=snakemake.wildcards.run, table_path=snakemake.input.pairs, rates_path=snakemake.input.rates,
              evaluation=snakemake.params.evaluation, seed=snakemake.params.seed, summary_path=out.summary,
              scatter_path=out.scatter, interval_path=out.interval)
