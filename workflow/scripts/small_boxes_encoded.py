"""Rule small_boxes_encoded: small boxes and reference volumes of VAE-decoded patches (noduleflow.cache.patches)."""

from pathlib import Path

import pandas as pd

from noduleflow.cache.patches import PatchSettings, small_boxes
from noduleflow.cache.segmenter import build_segmenter
from noduleflow.io import write_parquet
from noduleflow.logs import log_to
from noduleflow.models.tasks import load_vae
from noduleflow.models.vae import decoder
from noduleflow.settings import from_config

with log_to(snakemake.log[0]):
    folder = Path(snakemake.input.latents)
    table = small_boxes(pd.read_parquet(folder / "index.parquet"), folder,
                        from_config(PatchSettings, snakemake.params.patch),
                        build_segmenter(snakemake.params.segmentation),
                        decode=decoder(load_vae(snakemake.input.model)))
    write_parquet(table, snakemake.output[0])
