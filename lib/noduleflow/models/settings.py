"""Typed settings of the models (config keys `models.vae`, `models.vae_volumes`, `models.pretrain.*`,
`models.runs.*` and `models.sampler`), built by noduleflow.settings.from_config.

A paired run's settings are also what its model file records (as plain data, `asdict`), so a forecast reads them
back with the same from_config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from noduleflow.models.training import TrainSettings

START_NOISE = 1.0  # default standard deviation of the noise added to the prior (noisy_prior)


@dataclass(frozen=True)
class VaeSettings:
    """The 3D VAE (`models.vae`; with `crop`, `models.vae_volumes`)."""

    channels: tuple[int, ...]
    latent_channels: int
    num_res_blocks: int
    norm_num_groups: int
    kl_weight: float
    training: TrainSettings
    crop: tuple[int, int, int] | None = None  # x, y, z: train on random crops of full volumes (vae_volumes)

    def hparams(self) -> dict[str, Any]:
        """What builds the network (and what its model file records)."""
        return {"spatial_dims": 3, "channels": list(self.channels), "latent_channels": self.latent_channels,
                "num_res_blocks": self.num_res_blocks, "norm_num_groups": self.norm_num_groups}


@dataclass(frozen=True)
class PretrainSettings:
    """Unconditional flow matching (`models.pretrain.2d|3d`, with `models.sigma`)."""

    space: str
    net: dict[str, Any]  # VelocityNet hyper-parameters, as given
    training: TrainSettings
    sigma: float


@dataclass(frozen=True)
class GrowthSettings:
    """A paired run's growth head (`models.runs.<name>.growth`; noduleflow.models.growth)."""

    channels: tuple[int, ...]  # the head's CNN: one stride-2 convolution per entry
    crop: tuple[int, int, int]  # x, y, z voxels (of the run's grid) at the prior's centre that the head sees
    weight: float  # of the head's negative log-likelihood in the run's loss
    floor_mm3: float  # added to both measured volumes before their ratio (a vanished nodule stays finite)

    def hparams(self) -> dict[str, Any]:
        """What builds the head (VelocityNet's `growth` hyper-parameter)."""
        return {"channels": list(self.channels), "crop": list(self.crop)}


@dataclass(frozen=True)
class RunSettings:
    """One paired forecasting run (`models.runs.<name>`, with `models.sigma`)."""

    space: str
    formulation: str
    interval: bool
    interval_dim: int
    box_weight: float
    box_margin: tuple[int, int, int]
    pretrained: str | None
    net: dict[str, Any]  # VelocityNet hyper-parameters, as given
    training: TrainSettings
    sigma: float
    start_noise: float = START_NOISE  # noisy_prior: the noise's standard deviation
    augment: bool = False  # the same random flips of prior and follow-up at every step
    growth: GrowthSettings | None = None  # a growth head whose log volume ratio conditions the flow

    def record(self) -> dict[str, Any]:
        """Plain data for a model file (read back with from_config)."""
        return dataclasses.asdict(self)

    @property
    def random_forecasts(self) -> bool:
        """Whether its forecasts are random (a start with noise, or ratios drawn from a growth head): such a run
        is sampled several times per forecast, any other once."""
        return self.formulation != "bridge" or self.growth is not None


@dataclass(frozen=True)
class SamplerSettings:
    """How a flow is integrated (`models.sampler`)."""

    method: str
    steps: int
