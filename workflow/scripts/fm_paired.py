"""Rule fm_paired: one paired forecasting run (noduleflow.models.tasks), data-parallel over its GPUs."""

from noduleflow import distributed
from noduleflow.cache.datasets import cache_folder
from noduleflow.cache.patches import PatchSettings
from noduleflow.logs import log_to
from noduleflow.models.settings import RunSettings, SamplerSettings
from noduleflow.models.tasks import train_paired
from noduleflow.settings import from_config

with log_to(snakemake.log[0]):
    params, inputs = snakemake.params, snakemake.input
    distributed.run(train_paired, snakemake.resources.gpu, run=from_config(RunSettings, params.run),
                    data_channels=params.data["channels"], box_scale=tuple(params.data["scale"]),
                    train_folder=cache_folder(inputs.train), train_pairs=inputs.train_pairs,
                    val_folder=cache_folder(inputs.val), val_pairs=inputs.val_pairs,
                    pretrained=inputs.pretrained or None, model_path=snakemake.output.model,
                    work_dir=params.work_dir, seed=params.seed, patch=from_config(PatchSettings, params.patch),
                    sampler=from_config(SamplerSettings, params.sampler), vae=inputs.vae or None,
                    train_volumes=inputs.train_volumes or None, val_volumes=inputs.val_volumes or None)
