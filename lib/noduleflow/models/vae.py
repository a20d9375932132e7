"""The VAE on nodule patches or full volumes (MONAI AutoencoderKL), its loss, and the latent caches it produces
(seed 15-17)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL

from noduleflow.io import write_array

log = logging.getLogger(__name__)


def build_vae(hparams: dict[str, Any]) -> AutoencoderKL:
    """An AutoencoderKL without attention (3D patches are large); hparams: spatial_dims, channels,
    latent_channels, num_res_blocks, norm_num_groups."""
    channels = tuple(hparams["channels"])
    return AutoencoderKL(
        spatial_dims=hparams["spatial_dims"], in_channels=1, out_channels=1, channels=channels,
        latent_channels=hparams["latent_channels"], num_res_blocks=hparams["num_res_blocks"],
        norm_num_groups=hparams["norm_num_groups"], attention_levels=(False,) * len(channels),
        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)


def vae_loss(model: AutoencoderKL, images: torch.Tensor, generator: torch.Generator,
             kl_weight: float) -> torch.Tensor:
    """Mean squared reconstruction error plus kl_weight times the KL divergence to N(0, I) (per element)."""
    mean, sigma = model.encode(images)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    reconstruction = model.decode(mean + sigma * noise)
    kl = 0.5 * (mean.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1.0).mean()
    return F.mse_loss(reconstruction, images) + kl_weight * kl


@torch.no_grad()
def encode_cache(model: AutoencoderKL, index: pd.DataFrame, raw_folder: str | os.PathLike[str],
                 latent_folder: str | os.PathLike[str], batch_size: int = 8) -> pd.DataFrame:
    """Encode every cached array (patches or whole volumes: the encoder is fully convolutional) to the encoder
    mean, into shard files of the same names and offsets, `batch_size` arrays at a time.

    Returns the latent cache's index.
    """
    model.eval()
    device = next(model.parameters()).device
    latent_folder = Path(latent_folder)
    for shard_file, rows in index.groupby("shard_file", sort=True):
        arrays = np.load(Path(raw_folder) / shard_file, mmap_mode="r", allow_pickle=False)
        rows = rows.sort_values("offset")
        latents = []
        for start in range(0, len(rows), batch_size):
            offsets = rows["offset"].to_numpy()[start:start + batch_size]
            batch = torch.from_numpy(np.asarray(arrays[offsets], dtype=np.float32)).to(device)
            latents.append(model.encode(batch)[0].float().cpu().numpy())
        stack = np.concatenate(latents)
        write_array(latent_folder / shard_file, stack, stack.shape, stack.dtype)
        log.info("encoded %s: %d arrays", shard_file, len(rows))
    return index.drop(columns="slice_file", errors="ignore")  # same files, rows and offsets; latents have no slices


def decoder(model: AutoencoderKL) -> Callable[[np.ndarray], np.ndarray]:
    """A function from one latent array (C, ...) to its decoded patch (1, Z, Y, X) in [-1, 1]."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def decode(latent: np.ndarray) -> np.ndarray:
        patch = model.decode(torch.from_numpy(np.asarray(latent, dtype=np.float32))[None].to(device))
        return patch[0].clamp(-1.0, 1.0).float().cpu().numpy()

    return decode
