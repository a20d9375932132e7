"""Rule growth_rates: the train split's median annual growth, for the median-growth baseline (and per nodule kind,
for the kind-growth reference, on the synthetic cohort)."""

from noduleflow.cache.datasets import cache_folder
from noduleflow.cache.patches import PatchSettings
from noduleflow.cache.segmenter import build_segmenter
from noduleflow.evaluation.tasks import growth_rates
from noduleflow.logs import log_to
from noduleflow.settings import from_config

with log_to(snakemake.log[0]):
    growth_rates(raw_folder=str(cache_folder(snakemake.input.raw)), pairs_path=snakemake.input.pairs,
                 patch=from_config(PatchSettings, snakemake.params.patch),
                 segmenter=build_segmenter(snakemake.params.segmentation), path=snakemake.output[0],
                 truth=snakemake.input.get("truth"))
