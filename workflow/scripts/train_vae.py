"""Rules train_vae (raw nodule patches) and train_vae_volumes (crops of full volumes): the 3D VAE
(noduleflow.models.tasks), data-parallel over its GPUs."""

from noduleflow import distributed
from noduleflow.cache.datasets import cache_folder
from noduleflow.cache.patches import PatchSettings
from noduleflow.logs import log_to
from noduleflow.models.settings import VaeSettings
from noduleflow.models.tasks import train_vae
from noduleflow.settings import from_config

with log_to(snakemake.log[0]):
    patch = snakemake.params.get("patch")
    distributed.run(train_vae, snakemake.resources.gpu, settings=from_config(VaeSettings, snakemake.params.vae),
                    train_folder=cache_folder(snakemake.input.train), val_folder=cache_folder(snakemake.input.val),
                    model_path=snakemake.output.model, work_dir=snakemake.params.work_dir, seed=snakemake.params.seed,
                    patch=from_config(PatchSettings, patch) if patch else None)
