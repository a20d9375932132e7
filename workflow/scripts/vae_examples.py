"""Rule vae_examples: test patches next to their VAE reconstructions."""

from noduleflow.cache.datasets import cache_folder
from noduleflow.cache.patches import PatchSettings
from noduleflow.evaluation.tasks import vae_examples
from noduleflow.logs import log_to
from noduleflow.settings import from_config

with log_to(snakemake.log[0]):
    vae_examples(vae=snakemake.input.model, raw_folder=str(cache_folder(snakemake.input.raw)),
                 patch=from_config(PatchSettings, snakemake.params.patch), count=snakemake.params.examples,
                 path=snakemake.output[0])
