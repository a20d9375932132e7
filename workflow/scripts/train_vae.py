"""Rule train_vae: the 3D VAE on raw nodule patches (noduleflow.models.tasks)."""

from noduleflow.logs import log_to
from noduleflow.models.tasks import cache_folder, train_vae

with log_to(snakemake.log[0]):
    train_vae(snakemake.params.vae, cache_folder(snakemake.input.train), cache_folder(snakemake.input.val),
              snakemake.output.model, snakemake.params.work_dir, snakemake.params.seed)
