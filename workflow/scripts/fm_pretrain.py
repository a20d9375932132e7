"""Rule fm_pretrain: unconditional flow matching, 2D on slices or 3D on latents (noduleflow.models.tasks)."""

from noduleflow import distributed
from noduleflow.logs import log_to
from noduleflow.models.tasks import cache_folder, train_pretraining

with log_to(snakemake.log[0]):
    config = snakemake.params.pretrain
    distributed.run(train_pretraining, snakemake.resources.gpu, config, config["space"],
                    snakemake.params.data["channels"], cache_folder(snakemake.input.train),
                    cache_folder(snakemake.input.val), snakemake.output.model, snakemake.params.work_dir,
                    snakemake.params.seed)
