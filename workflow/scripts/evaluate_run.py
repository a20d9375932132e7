"""Rule evaluate_run: forecasts of one run on the test split (noduleflow.evaluation)."""

from noduleflow.evaluation.tasks import forecast, forecast_settings
from noduleflow.logs import log_to
from noduleflow.models.tasks import cache_folder

with log_to(snakemake.log[0]):
    inputs, params = snakemake.input, snakemake.params
    forecast(snakemake.wildcards.run, params.space, inputs.model, cache_folder(inputs.raw), cache_folder(inputs.data),
             inputs.pairs, inputs.get("vae"), inputs.get("truth"), params.patch, params.segmentation,
             forecast_settings(params.evaluation, params.sampler, params.seed), snakemake.output.pairs,
             snakemake.output.montage)
