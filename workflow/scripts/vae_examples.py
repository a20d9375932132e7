"""Rule vae_examples: test patches next to their VAE reconstructions."""

from noduleflow.evaluation.tasks import vae_examples
from noduleflow.logs import log_to
from noduleflow.models.tasks import cache_folder

with log_to(snakemake.log[0]):
    vae_examples(snakemake.input.model, str(cache_folder(snakemake.input.raw)), snakemake.params.patch,
                 snakemake.params.examples, snakemake.output[0])
