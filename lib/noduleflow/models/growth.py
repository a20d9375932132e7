"""The growth head of a paired run (config `models.runs.<name>.growth`): a forecast of the nodule's log volume
ratio that conditions the flow.

The head is a small CNN on the centre of the prior patch (in the run's space). It reads the interval through a
growth law: the log ratio of follow-up to prior volume is a yearly rate times the interval in years, plus a
measurement error, with the rate's centre and spread and the error's spread read from the image. Its output is a
Laplace distribution, median = rate * years and scale = sqrt((rate spread * years)^2 + error spread^2), fitted by
its negative log-likelihood. Laplace, not Gaussian: its median is what minimises the absolute error of a forecast
(the evaluation's MAE), while a few fast growers among mostly stable nodules pull a Gaussian's mean, and with it
every forecast, towards growth.

The target is the ratio as the pipeline measures it: the segmenter's volume of each cached nodule in its own box
(`small_boxes.parquet` of the raw cache), never a synthetic truth. The flow is trained with the measured ratio
and sampled with one ratio from the head per forecast sample, sample s of n taking the head's quantile at level
(s + 0.5) / n, so the samples spread as the head is unsure and their median is the head's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.networks.blocks import Convolution
from torch import nn
from torch.utils.data import Dataset

from noduleflow.cache.datasets import NodulePairs

DAYS_PER_YEAR = 365.25
_LOG_STD_RANGE = (-7.0, 3.0)  # the head's log standard deviations are clamped to this range


class RatioEmbedding(nn.Module):
    """A log volume ratio (B,) -> (B, dim), added to the velocity net's timestep embedding."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, log_ratio: torch.Tensor) -> torch.Tensor:
        return self.mlp(log_ratio.float()[:, None])


class GrowthHead(nn.Module):
    """Prior patch (B, C, *spatial) and interval (B,) days -> median and scale (B,) of the log ratio's Laplace
    distribution.

    The head sees the centre of the prior, `crop` (x, y, z; 2D: x, y) voxels of the run's grid, where the cache
    centres the nodule; its convolutions' features are flattened, not pooled, so it knows where in the crop a
    feature lies (the nodule, its margin or the parenchyma around it).
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int], crop: Sequence[int]) -> None:
        super().__init__()
        self.crop = tuple(int(c) for c in reversed(crop[:spatial_dims]))  # (Z,) Y, X
        layers: list[nn.Module] = []
        for c_in, c_out in zip([in_channels, *channels[:-1]], channels, strict=True):
            layers.append(Convolution(spatial_dims, c_in, c_out, strides=2, kernel_size=3, act="SWISH", norm=None))
        self.features = nn.Sequential(*layers, nn.Flatten())
        grid = [int(n) for n in self.crop]
        for _ in channels:  # each stride-2 convolution (kernel 3, padding 1) halves the grid, rounding up
            grid = [(n + 1) // 2 for n in grid]
        width = channels[-1]
        self.out = nn.Sequential(nn.Linear(width * math.prod(grid), width), nn.SiLU(), nn.Linear(width, 3))

    def centre(self, prior: torch.Tensor) -> torch.Tensor:
        """The central `crop` of a batch of priors."""
        shape = prior.shape[2:]
        if any(c > n for c, n in zip(self.crop, shape, strict=True)):
            raise ValueError(f"growth crop {list(reversed(self.crop))} (x, y, z) is larger than the prior "
                             f"{list(reversed(shape))}")
        return prior[(..., *(slice((n - c) // 2, (n - c) // 2 + c) for c, n in zip(self.crop, shape, strict=True)))]

    def forward(self, prior: torch.Tensor, delta_days: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rate, log_rate_std, log_error_std = self.out(self.features(self.centre(prior))).float().unbind(dim=1)
        years = delta_days.float() / DAYS_PER_YEAR
        variance = ((log_rate_std.clamp(*_LOG_STD_RANGE).exp() * years) ** 2
                    + log_error_std.clamp(*_LOG_STD_RANGE).exp() ** 2)
        return rate * years, variance.sqrt()

    def nll(self, prior: torch.Tensor, delta_days: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
        """Mean Laplace negative log-likelihood of the measured log ratios (B,)."""
        median, scale = self(prior, delta_days)
        return (torch.log(2.0 * scale) + (log_ratio.float() - median).abs() / scale).mean()

    @torch.no_grad()
    def draw(self, prior: torch.Tensor, delta_days: torch.Tensor, levels: Sequence[float]) -> torch.Tensor:
        """The log ratio at each sample's quantile level (0-1, `sample_level`) of the head's Laplace distribution."""
        median, scale = self(prior, delta_days)
        centred = torch.as_tensor(levels, dtype=median.dtype, device=median.device) - 0.5
        return median - scale * centred.sign() * torch.log1p(-2.0 * centred.abs())


def sample_level(sample: int, samples: int) -> float:
    """The quantile level, (sample + 0.5) / samples, at which forecast sample `sample` of `samples` takes its log
    ratio from the head: stratified rather than random levels, so a pair's samples hold the head's median and
    its quantiles without Monte Carlo noise (8 random draws move their median by about a third of the head's
    scale, and with it the forecast's absolute error), while the flow's start noise still differs per sample."""
    return (sample + 0.5) / samples


def log_ratio(prior_mm3: np.ndarray | float, follow_up_mm3: np.ndarray | float, floor_mm3: float) -> np.ndarray:
    """log((follow-up + floor) / (prior + floor)): finite for a nodule that vanished or was not found."""
    return np.log((np.asarray(follow_up_mm3, dtype=float) + floor_mm3) / (np.asarray(prior_mm3, dtype=float)
                                                                          + floor_mm3))


def measured_volumes(small_boxes: pd.DataFrame) -> dict[str, float]:
    """nodule_key -> the segmenter's volume (mm^3) in its own box, from a cache's small_boxes table."""
    return dict(zip(small_boxes["nodule_key"], small_boxes["nodule_volume"].astype(float), strict=True))


class WithLogRatio(Dataset):
    """A pairs dataset whose items also carry `log_ratio`, the measured log volume ratio (follow-up to prior)."""

    def __init__(self, pairs: NodulePairs, volumes: Mapping[str, float], floor_mm3: float) -> None:
        missing = sorted({k for k in (*pairs.pairs["key_a"], *pairs.pairs["key_b"]) if k not in volumes})
        if missing:
            raise ValueError(f"no measured volume for {len(missing)} cached nodule(s), e.g. {missing[:3]}")
        self.pairs = pairs
        self.ratios = log_ratio([volumes[k] for k in pairs.pairs["key_a"]],
                                [volumes[k] for k in pairs.pairs["key_b"]], floor_mm3)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return {**self.pairs[item], "log_ratio": torch.tensor(float(self.ratios[item]))}


def ratio_summary(ratios: np.ndarray) -> str:
    """A log line on the targets: count, median and spread of the measured log ratios."""
    if len(ratios) == 0:
        return "no pairs"
    quartiles = np.quantile(ratios, [0.25, 0.5, 0.75])
    return (f"{len(ratios)} pairs, log volume ratio median {quartiles[1]:+.2f} (quartiles {quartiles[0]:+.2f}, "
            f"{quartiles[2]:+.2f}; x{math.exp(quartiles[1]):.2f})")
