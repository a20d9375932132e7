"""Rule forecast_patients: forecasts of the nodules in the config's table with one trained run
(noduleflow.evaluation.predict)."""

from noduleflow.cache.segmenter import build_segmenter
from noduleflow.evaluation.forecast import forecast_settings
from noduleflow.evaluation.predict import forecast_table
from noduleflow.logs import log_to

with log_to(snakemake.log[0]):
    params = snakemake.params
    forecast_table(model=snakemake.input.model, table=snakemake.input.table, out_dir=snakemake.output.nodules,
                   table_path=snakemake.output.table, patch=params.patch,
                   segmenter=build_segmenter(params.segmentation),
                   settings=forecast_settings(params.evaluation, params.sampler, params.seed), samples=params.samples)
