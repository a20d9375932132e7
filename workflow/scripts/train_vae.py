"""Rules train_vae (raw nodule patches) and train_vae_volumes (crops of full volumes): the 3D VAE
(noduleflow.models.tasks), data-parallel over its GPUs."""

from noduleflow import distributed
from noduleflow.logs import log_to
from noduleflow.models.tasks import cache_folder, train_vae

with log_to(snakemake.log[0]):
    distributed.run(train_vae, snakemake.resources.gpu, snakemake.params.vae, cache_folder(snakemake.input.train),
                    cache_folder(snakemake.input.val), snakemake.output.model, snakemake.params.work_dir,
                    snakemake.params.seed, snakemake.params.get("patch"))
