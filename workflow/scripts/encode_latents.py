"""Rules encode_latents and encode_volumes (params: batch_size): the latent cache of one split
(noduleflow.models.vae)."""

from pathlib import Path

import pandas as pd

from noduleflow import distributed
from noduleflow.io import write_parquet
from noduleflow.logs import log_to
from noduleflow.models.tasks import load_vae
from noduleflow.models.vae import encode_cache

with log_to(snakemake.log[0]):
    model = load_vae(snakemake.input.model).to(distributed.device())
    out = Path(snakemake.output[0])
    out.mkdir(parents=True, exist_ok=True)
    index = encode_cache(model, pd.read_parquet(snakemake.input.index), Path(snakemake.input.index).parent, out,
                         **dict(snakemake.params.items()))
    write_parquet(index, out / "index.parquet")
