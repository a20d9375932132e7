"""Rule fm_paired: one paired forecasting run (noduleflow.models.tasks)."""

from noduleflow.logs import log_to
from noduleflow.models.tasks import cache_folder, latent_channels_and_scale, train_paired

with log_to(snakemake.log[0]):
    run = snakemake.params.run
    channels, scale = latent_channels_and_scale(snakemake.params.vae) if run["space"] == "latent" else (1, (1, 1, 1))
    train_paired(run, channels, scale, cache_folder(snakemake.input.train), snakemake.input.train_pairs,
                 cache_folder(snakemake.input.val), snakemake.input.val_pairs, snakemake.input.pretrained or None,
                 snakemake.output.model, snakemake.params.work_dir, snakemake.params.seed)
