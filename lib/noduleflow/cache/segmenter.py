"""Segmentation of a nodule in a patch, for reference volumes and Dice.

The default needs no weights. Inside the nodule's box grown by a margin (vessels further away are cut off),
the threshold lies halfway ("half maximum") between the surrounding parenchyma (median HU in the grown box
outside the nodule box) and the nodule's bright end (90th percentile inside the box); the nodule is the
6-connected component above it at the box centre (or, when the centre is below it, the largest component in
the box), found after an in-plane opening (`opening_voxels`) that cuts vessels and noise specks thinner than its
element off; the voxels above the threshold next to that component (its rim, the caps of small nodules) are
then given back. Tiny nodules that the opening would remove entirely keep their raw component. A half-maximum
threshold follows each nodule's own contrast, so solid, part-solid and ground-glass nodules are measured alike
and partial-volume voxels count half in, half out.

A loose box needs one more step. A forecast is measured in the prior's box grown by the most growth its interval
allows, so a nodule that did not grow that much fills a small part of its box; the box's 90th
percentile then lies near the parenchyma and the threshold low enough to take in noise and the partial-volume
voxels around the nodule. Where the nodule found fills less than `loose_fill` of the box, the bright end is
re-estimated from the nodule itself (its `peak_percentile` percentile) and the nodule found again, until the
threshold settles (`refinements` at most). Tight boxes, where the first estimate is good, are left alone: there
the re-estimate would follow the bright core of a part-solid or calcified nodule and cut its fainter rest off.

A nodule against the pleura, the mediastinum or the diaphragm touches tissue as bright as itself, and the
component would take in the chest wall behind it. Only voxels on the lung's side of the lung border count: the
border is drawn past such a nodule by closing the dark (below-threshold) voxels, slice by slice, with a disk of
`pleura_disk` times the box's in-plane half-size (the rolling ball of juxtapleural nodule segmentation). A disk
that size cannot fit in the nodule, so the nodule falls inside the closed lung; the wall, wider than the disk,
stays outside. The bright end is taken on the lung's side too (drawn with the first threshold), so a faint
ground-glass nodule against the wall is not thresholded against the wall's density. Free nodules are unchanged.

Users with a learned segmenter give its file instead (`segmentation.model`): a `torch.export` program (`.pt2`)
or a TorchScript file (what a MONAI bundle's `ckpt_export` writes) that maps a (1, 1, Z, Y, X) float HU tensor to
nodule probabilities of the same shape; the mask is the component above `threshold` at the box centre, inside
the same grown box. The file is code the user chose to run, like the config itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from noduleflow.settings import from_config, section

if TYPE_CHECKING:
    import torch

Segmenter = Callable[[np.ndarray, Sequence[int]], np.ndarray]  # (HU patch (Z, Y, X), box) -> boolean mask


def grown_box(box: Sequence[int], margin: Sequence[int], shape: Sequence[int]) -> tuple[tuple[slice, ...], ...]:
    """(region, inner) slices (z, y, x) of a box (i0, i1, j0, j1, k0, k1) grown by margin (x, y, z), and of the box."""
    mx, my, mz = margin
    lows, highs = (box[4], box[0], box[2]), (box[5], box[1], box[3])
    region = tuple(slice(max(lo - m, 0), min(hi + m + 1, n))
                   for lo, hi, m, n in zip(lows, highs, (mz, my, mx), shape, strict=True))
    return region, tuple(slice(lo, hi + 1) for lo, hi in zip(lows, highs, strict=True))


def _component_at_box(above: np.ndarray, box: Sequence[int], inner: tuple[slice, ...]) -> np.ndarray:
    """The 6-connected component of `above` at the box centre, or the largest one inside the box."""
    labels, count = ndimage.label(above)
    label = labels[((box[4] + box[5]) // 2, (box[0] + box[1]) // 2, (box[2] + box[3]) // 2)]
    if label == 0:
        counts = np.bincount(labels[inner].ravel(), minlength=count + 1)
        counts[0] = 0
        if counts.max() == 0:
            return np.zeros(above.shape, dtype=bool)
        label = int(np.argmax(counts))
    return labels == label


def _lung_side(dark: np.ndarray, box: Sequence[int], size: float) -> np.ndarray:
    """The lung with the nodules in it: `dark` (Z, Y, X) closed slice by slice with a disk of `size` times the
    box's in-plane half-size (the patch's edge continued outwards, so the disk rolls past it too). The closing
    is taken through distance transforms (within the radius of `dark`, then more than the radius from what
    that left out), exact for a Euclidean disk and as fast for a large one as for a small one."""
    radius = float(np.ceil(size * max(box[1] - box[0], box[3] - box[2]) / 2.0)) + 1.0
    pad = int(radius) + 1
    padded = np.pad(dark, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    closed = np.empty_like(padded)
    for k, plane in enumerate(padded):
        grown = plane | (ndimage.distance_transform_edt(~plane) <= radius) if plane.any() else plane
        closed[k] = ndimage.distance_transform_edt(grown) > radius if not grown.all() else grown
    return closed[:, pad:-pad, pad:-pad]


@dataclass(frozen=True)
class HalfMaximumSegmenter:
    """Adaptive threshold + connected component around a known box (config key `segmentation`)."""

    level: float  # threshold position between parenchyma (0) and the nodule's bright end (1)
    margin_voxels: tuple[int, int, int]  # x, y, z added around the box
    min_contrast_hu: float  # a box this close to its surroundings holds no nodule
    opening_voxels: tuple[int, int, int] = (3, 3, 1)  # x, y, z size of the opening's box element; (1, 1, 1): none
    loose_fill: float = 0.25  # a nodule filling less of its box than this gets its bright end re-estimated
    peak_percentile: float = 60.0  # the re-estimate: this percentile of the nodule's HU
    refinements: int = 3  # re-estimates at most (0: never)
    pleura_disk: float = 2.0  # the rolling disk that draws the lung border past a nodule, in box half-sizes (0: none)

    def __call__(self, patch_hu: np.ndarray, box: Sequence[int]) -> np.ndarray:
        """Boolean mask (Z, Y, X) of the nodule in a HU patch; `box` is (i0, i1, j0, j1, k0, k1) = (y, x, z)."""
        region, inner = grown_box(box, self.margin_voxels, patch_hu.shape)
        outside = np.ones(patch_hu.shape, dtype=bool)
        outside[inner] = False
        surroundings = patch_hu[region][outside[region]]
        background = float(np.median(surroundings)) if surroundings.size else float(patch_hu.min())
        peak = float(np.percentile(patch_hu[inner], 90))
        lung = None
        if self.pleura_disk > 0:  # the bright end of what lies on the lung's side: a ground-glass nodule, not the wall
            lung = _lung_side(patch_hu <= background + self.level * (peak - background), box, self.pleura_disk)
            if lung[inner].any() and not lung[inner].all():
                peak, lung = float(np.percentile(patch_hu[inner][lung[inner]], 90)), None
        if peak - background < self.min_contrast_hu:
            return np.zeros(patch_hu.shape, dtype=bool)
        mask = self._nodule(patch_hu, box, region, inner, background + self.level * (peak - background), lung)
        box_voxels = patch_hu[inner].size
        for _ in range(self.refinements):
            if not mask.any() or mask[inner].sum() >= self.loose_fill * box_voxels:
                break
            refined = float(np.percentile(patch_hu[mask], self.peak_percentile))
            if abs(refined - peak) < 1.0:
                break
            peak = refined
            mask = self._nodule(patch_hu, box, region, inner, background + self.level * (peak - background))
        return mask

    def _nodule(self, patch_hu: np.ndarray, box: Sequence[int], region: tuple[slice, ...], inner: tuple[slice, ...],
                threshold: float, lung: np.ndarray | None = None) -> np.ndarray:
        """The component above `threshold` at the box, opened to cut vessels off, with its rim given back; `lung`:
        the lung's side for this threshold, if already drawn."""
        above = np.zeros(patch_hu.shape, dtype=bool)
        above[region] = patch_hu[region] > threshold
        if self.pleura_disk > 0:
            above &= _lung_side(patch_hu <= threshold, box, self.pleura_disk) if lung is None else lung
        opened = ndimage.binary_opening(above, structure=np.ones(tuple(reversed(self.opening_voxels)), dtype=bool))
        if not opened[inner].any():
            return _component_at_box(above, box, inner)
        core = _component_at_box(opened, box, inner)
        return above & ndimage.binary_dilation(core, structure=ndimage.generate_binary_structure(3, 1))


@dataclass(frozen=True)
class LearnedSegmenter:
    """A learned segmenter from a `.pt2` (torch.export) or TorchScript file, restricted to the grown box."""

    model: str  # path of the model file
    margin_voxels: tuple[int, int, int]  # x, y, z added around the box
    threshold: float = 0.5  # on the probabilities (an optional config key)

    @cached_property
    def module(self) -> torch.nn.Module:
        import torch  # only here: the cache rules, which use the default segmenter, do not pay torch's start-up

        if self.model.endswith(".pt2"):
            return torch.export.load(self.model).module()
        return torch.jit.load(self.model, map_location="cpu").eval()

    def __call__(self, patch_hu: np.ndarray, box: Sequence[int]) -> np.ndarray:
        """Boolean mask (Z, Y, X) of the nodule in a HU patch; `box` is (i0, i1, j0, j1, k0, k1) = (y, x, z)."""
        import torch

        with torch.no_grad():
            probabilities = self.module(torch.as_tensor(patch_hu, dtype=torch.float32)[None, None])
        region, inner = grown_box(box, self.margin_voxels, patch_hu.shape)
        above = np.zeros(patch_hu.shape, dtype=bool)
        above[region] = probabilities[0, 0].numpy()[region] > self.threshold
        return _component_at_box(above, box, inner)


def build_segmenter(values: Mapping[str, Any]) -> HalfMaximumSegmenter | LearnedSegmenter:
    """The segmenter the `segmentation` config section asks for: the learned one if `model` is set (the section
    holds the settings of both; each reads its own keys)."""
    kind = LearnedSegmenter if values.get("model") else HalfMaximumSegmenter
    return from_config(kind, section(kind, values))
