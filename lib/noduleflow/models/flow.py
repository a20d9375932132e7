"""Flow matching (seed steps 18-19): the objective, ODE samplers and the velocity network.

A flow carries x0 to x1 along straight paths x_t = t x1 + (1 - t) x0 (+ sigma noise); the network learns the
velocity u = x1 - x0. Unconditional pretraining flows from noise to data. Paired forecasting flows to the
follow-up from the prior itself ("bridge"), from noise ("noise"), or from the prior plus noise ("noisy_prior");
the last two see the prior as conditioning channels too and give a different forecast for each noise draw. The
interval in days conditions the network through a trained embedding; with a growth head
(noduleflow.models.growth) the log volume ratio of follow-up to prior conditions it too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from noduleflow.models.growth import GrowthHead, RatioEmbedding

FORMULATIONS = ("bridge", "noise", "noisy_prior")


class IntervalEmbedding(nn.Module):
    """Days between exams -> sinusoidal features -> MLP -> a (B, 1, dim) cross-attention context (trained)."""

    def __init__(self, dim: int, max_period: float = 10_000.0) -> None:
        super().__init__()
        self.dim = dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))

    def forward(self, days: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        frequencies = torch.exp(-math.log(self.max_period) * torch.arange(half, device=days.device) / half)
        angles = days.float()[:, None] * frequencies[None]
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=1))[:, None, :]


class VelocityNet(nn.Module):
    """MONAI DiffusionModelUNet predicting the flow's velocity, optionally conditioned on a prior and an interval.

    hparams: spatial_dims, data_channels, prior_channels (0 for the bridge, else data_channels),
    channels, attention_levels, num_res_blocks, num_head_channels, norm_num_groups, interval_dim (0: none), and
    optionally growth ({"channels": [...], "crop": [x, y, z]}: a growth head, `growth_head`; absent or None:
    none).

    With a growth head the network also takes the log volume ratio, through MONAI's class-conditioning path: its
    embedding (RatioEmbedding, in place of the class table) is added to the timestep embedding of every block.
    """

    def __init__(self, hparams: dict[str, Any]) -> None:
        super().__init__()
        self.hparams = dict(hparams)
        interval_dim = hparams["interval_dim"]
        growth = hparams.get("growth")  # model files from before the growth head lack the key
        self.unet = DiffusionModelUNet(
            spatial_dims=hparams["spatial_dims"], in_channels=hparams["data_channels"] + hparams["prior_channels"],
            out_channels=hparams["data_channels"], channels=tuple(hparams["channels"]),
            attention_levels=tuple(hparams["attention_levels"]), num_res_blocks=hparams["num_res_blocks"],
            num_head_channels=hparams["num_head_channels"], norm_num_groups=hparams["norm_num_groups"],
            resblock_updown=True, with_conditioning=interval_dim > 0,
            cross_attention_dim=interval_dim if interval_dim > 0 else None, num_class_embeds=1 if growth else None)
        self.interval = IntervalEmbedding(interval_dim) if interval_dim > 0 else None
        self.growth_head = None
        if growth:
            self.unet.class_embedding = RatioEmbedding(4 * hparams["channels"][0])  # MONAI's timestep embedding width
            self.growth_head = GrowthHead(hparams["spatial_dims"], hparams["data_channels"], growth["channels"],
                                          growth["crop"])

    def forward(self, x: torch.Tensor, t: torch.Tensor, prior: torch.Tensor | None = None,
                delta_days: torch.Tensor | None = None, log_ratio: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity at x and flow time t in [0, 1] (MONAI's timestep embedding expects a 0-1000 scale)."""
        if (log_ratio is None) != (self.growth_head is None):
            raise ValueError("a network with a growth head needs the log volume ratio, one without takes none")
        if self.hparams["prior_channels"]:
            x = torch.cat([x, prior], dim=1)
        context = self.interval(delta_days) if self.interval is not None else None
        return self.unet(x, timesteps=t * 1000.0, context=context, class_labels=log_ratio)


def flow_start(formulation: str, prior: torch.Tensor, noise: torch.Tensor, start_noise: float) -> torch.Tensor:
    """Where a paired flow starts: the prior (bridge), the noise (noise), or the prior plus start_noise times the
    noise (noisy_prior: early on the change hides under the noise, so the network has to forecast it from the
    prior rather than read it off x_t, while the background stays the prior's)."""
    if formulation == "bridge":
        return prior
    if formulation == "noise":
        return noise
    if formulation == "noisy_prior":
        return prior + start_noise * noise
    raise ValueError(f"unknown formulation {formulation!r}; expected one of {FORMULATIONS}")


def paired_start(formulation: str, start_noise: float, prior: torch.Tensor,
                 noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A paired run's flow start (`flow_start` with the run's formulation and start_noise) and its conditioning
    channels (the prior, except for the bridge, which starts at it)."""
    x0 = flow_start(formulation, prior, noise, start_noise)
    return x0, None if formulation == "bridge" else prior


def _broadcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


def flow_matching_loss(net: VelocityNet, x0: torch.Tensor, x1: torch.Tensor, generator: torch.Generator,
                       sigma: float = 0.0, prior: torch.Tensor | None = None, delta_days: torch.Tensor | None = None,
                       weights: torch.Tensor | None = None, log_ratio: torch.Tensor | None = None) -> torch.Tensor:
    """(Weighted) mean squared error between the predicted and the true velocity at a random time."""
    t = torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = _broadcast(t, x0) * x1 + (1 - _broadcast(t, x0)) * x0 + sigma * noise
    error = (net(x_t, t, prior, delta_days, log_ratio) - (x1 - x0)).pow(2)
    if weights is None:
        return error.mean()
    weights = weights.expand_as(error)
    return (weights * error).sum() / (weights.sum() + 1e-8)


def box_weights(shape: Sequence[int], boxes: Sequence[torch.Tensor], margin: Sequence[int], weight: float,
                scale: Sequence[float]) -> torch.Tensor:
    """Per-sample loss weights (B, 1, *spatial): `weight` inside the union of the boxes grown by `margin`, 1 outside.

    Boxes are (B, 6) tensors (i0, i1, j0, j1, k0, k1) = (y, x, z) in patch voxels; `margin` (x, y, z) is in
    patch voxels; `scale` (x, y, z) maps patch voxels to this grid, e.g. 1/4 on a latent grid downsampled 4
    times. 2D grids (slices) use y and x only.
    """
    batch, spatial = shape[0], list(shape[2:])
    out = torch.ones(batch, 1, *spatial)
    for b in range(batch):
        region = torch.zeros(spatial, dtype=torch.bool)
        for box in boxes:
            y0, y1, x0, x1, z0, z1 = (int(v) for v in box[b])
            spans = [(z0, z1), (y0, y1), (x0, x1)][-len(spatial):]
            margins = list(reversed(margin))[-len(spatial):]
            factors = list(reversed(scale))[-len(spatial):]
            slices = tuple(slice(max(int((lo - m) * f), 0), min(int(math.ceil((hi + 1 + m) * f)), n))
                           for (lo, hi), m, f, n in zip(spans, margins, factors, spatial, strict=True))
            region[slices] = True
        out[b, 0][region] = weight
    return out


@torch.no_grad()
def sample(net: VelocityNet, x0: torch.Tensor, steps: int, method: str = "heun", prior: torch.Tensor | None = None,
           delta_days: torch.Tensor | None = None, log_ratio: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate the flow from x0 at t = 0 to t = 1 with Euler or Heun (2nd order) steps."""
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown sampler {method!r}: use 'euler' or 'heun'")
    x = x0
    dt = 1.0 / steps
    for k in range(steps):
        t = torch.full((x.shape[0],), k * dt, device=x.device, dtype=x.dtype)
        velocity = net(x, t, prior, delta_days, log_ratio)
        if method == "heun":
            predicted = x + dt * velocity
            velocity = 0.5 * (velocity + net(predicted, t + dt, prior, delta_days, log_ratio))
        x = x + dt * velocity
    return x
