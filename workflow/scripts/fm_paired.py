"""Rule fm_paired: one paired forecasting run (noduleflow.models.tasks), data-parallel over its GPUs."""

from noduleflow import distributed
from noduleflow.logs import log_to
from noduleflow.models.tasks import cache_folder, train_paired

with log_to(snakemake.log[0]):
    data = snakemake.params.data
    distributed.run(train_paired, snakemake.resources.gpu, snakemake.params.run, data["channels"],
                    tuple(data["scale"]), cache_folder(snakemake.input.train), snakemake.input.train_pairs,
                    cache_folder(snakemake.input.val), snakemake.input.val_pairs, snakemake.input.pretrained or None,
                    snakemake.output.model, snakemake.params.work_dir, snakemake.params.seed, snakemake.params.patch,
                    snakemake.params.sampler, snakemake.input.vae or None)
