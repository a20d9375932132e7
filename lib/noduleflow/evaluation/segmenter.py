"""Segmentation of a nodule in a patch, for reference volumes and Dice.

The default needs no weights. Inside the nodule's box grown by a margin (vessels further away are cut off),
the threshold lies halfway ("half maximum") between the surrounding parenchyma (median HU in the grown box
outside the nodule box) and the nodule's bright end (90th percentile inside the box); the nodule is the
6-connected component above it at the box centre (or, when the centre is below it, the largest component in
the box). A half-maximum threshold follows each nodule's own contrast, so solid, part-solid and ground-glass
nodules are measured alike and partial-volume voxels count half in, half out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class HalfMaximumSegmenter:
    """Adaptive threshold + connected component around a known box (config key `segmentation`)."""

    level: float = 0.5  # threshold position between parenchyma (0) and the nodule's bright end (1)
    margin_voxels: tuple[int, int, int] = (2, 2, 1)  # x, y, z added around the box
    min_contrast_hu: float = 100.0  # a box this close to its surroundings holds no nodule

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> HalfMaximumSegmenter:
        """Build from a config mapping, turning lists into tuples."""
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})

    def __call__(self, patch_hu: np.ndarray, box: Sequence[int]) -> np.ndarray:
        """Boolean mask (Z, Y, X) of the nodule in a HU patch; `box` is (i0, i1, j0, j1, k0, k1) = (y, x, z)."""
        mx, my, mz = self.margin_voxels
        lows, highs = (box[4], box[0], box[2]), (box[5], box[1], box[3])
        region = tuple(slice(max(lo - m, 0), min(hi + m + 1, n))
                       for lo, hi, m, n in zip(lows, highs, (mz, my, mx), patch_hu.shape, strict=True))
        inner = tuple(slice(lo, hi + 1) for lo, hi in zip(lows, highs, strict=True))
        outside = np.ones(patch_hu.shape, dtype=bool)
        outside[inner] = False
        surroundings = patch_hu[region][outside[region]]
        background = float(np.median(surroundings)) if surroundings.size else float(patch_hu.min())
        peak = float(np.percentile(patch_hu[inner], 90))
        empty = np.zeros(patch_hu.shape, dtype=bool)
        if peak - background < self.min_contrast_hu:
            return empty
        above = empty.copy()
        above[region] = patch_hu[region] > background + self.level * (peak - background)
        labels, count = ndimage.label(above)
        label = labels[tuple((lo + hi) // 2 for lo, hi in zip(lows, highs, strict=True))]
        if label == 0:
            counts = np.bincount(labels[inner].ravel(), minlength=count + 1)
            counts[0] = 0
            if counts.max() == 0:
                return empty
            label = int(np.argmax(counts))
        return labels == label
