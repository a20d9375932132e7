"""Rule growth_rates: the train split's median annual growth, for the median-growth baseline (and per nodule kind,
for the kind-growth reference, on the synthetic cohort)."""

from noduleflow.evaluation.tasks import growth_rates
from noduleflow.logs import log_to
from noduleflow.models.tasks import cache_folder

with log_to(snakemake.log[0]):
    growth_rates(str(cache_folder(snakemake.input.raw)), snakemake.input.pairs, snakemake.params.patch,
                 snakemake.params.segmentation, snakemake.output[0], snakemake.input.get("truth"))
