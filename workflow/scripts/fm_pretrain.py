"""Rule fm_pretrain: unconditional flow matching, 2D on slices or 3D on latents (noduleflow.models.tasks)."""

from noduleflow import distributed
from noduleflow.cache.datasets import cache_folder
from noduleflow.logs import log_to
from noduleflow.models.settings import PretrainSettings
from noduleflow.models.tasks import train_pretraining
from noduleflow.settings import from_config

with log_to(snakemake.log[0]):
    distributed.run(train_pretraining, snakemake.resources.gpu,
                    settings=from_config(PretrainSettings, snakemake.params.pretrain),
                    data_channels=snakemake.params.data["channels"], train_folder=cache_folder(snakemake.input.train),
                    val_folder=cache_folder(snakemake.input.val), model_path=snakemake.output.model,
                    work_dir=snakemake.params.work_dir, seed=snakemake.params.seed)
