"""Rule forecast_patients: forecasts of the nodules in the config's table with one trained run (noduleflow.predict)."""

from noduleflow.evaluation.tasks import forecast_settings
from noduleflow.logs import log_to
from noduleflow.predict import forecast_table

with log_to(snakemake.log[0]):
    params = snakemake.params
    forecast_table(snakemake.input.model, snakemake.input.table, snakemake.output.nodules, snakemake.output.table,
                   params.patch, params.segmentation, forecast_settings(params.evaluation, params.sampler, params.seed),
                   params.samples)
