"""Rule evaluate_run: forecasts of one run on the test split (noduleflow.evaluation)."""

from noduleflow.cache.datasets import cache_folder
from noduleflow.cache.patches import PatchSettings
from noduleflow.cache.segmenter import build_segmenter
from noduleflow.evaluation.forecast import forecast_settings
from noduleflow.evaluation.tasks import forecast
from noduleflow.logs import log_to
from noduleflow.settings import from_config

with log_to(snakemake.log[0]):
    inputs, params = snakemake.input, snakemake.params
    forecast(run_name=snakemake.wildcards.run, space=params.space, model=inputs.model,
             raw_folder=cache_folder(inputs.raw), model_folder=cache_folder(inputs.data), pairs_path=inputs.pairs,
             vae=inputs.get("vae"), truth=inputs.get("truth"), patch=from_config(PatchSettings, params.patch),
             segmenter=build_segmenter(params.segmentation),
             settings=forecast_settings(params.evaluation, params.sampler, params.seed),
             table_path=snakemake.output.pairs, montage_path=snakemake.output.montage)
