"""Per-pair evaluation of a paired forecasting run on a split (seed step 20: eval_3D_fm, eval_2D_fm).

For every prior/follow-up pair the run generates the follow-up from the prior and the interval (latent runs
decode through the VAE). A forecast is measured only with what is known at the prior exam (`forecast_size`):

1. the search region is the prior's box grown, per side, by what the fastest growth allowed over the interval
   adds to the nodule's half-extent (volume doubling every `fastest_doubling_days`, so the radius grows by
   2^(days / (3 * fastest_doubling_days))) plus `shift_mm` for the registration's residual, cut to the patch;
   nothing outside it counts;
2. the segmenter measures the forecast in the prior's box, as it measures an annotated nodule in its box;
3. where it finds nothing there (the nodule is gone, faint in a box now too loose for it, or larger than the
   box all round), the box becomes that of the bright component in the region (voxels `detect_contrast_hu`
   above the region's median, opened in-plane by `opening_voxels` to cut vessels off) with the most voxels in
   the prior's box, or, where none overlaps it, the one nearest its centre (none: size 0); components that
   reach the patch's border are not candidates, since the cache centres the nodule in a patch made to hold it;
4. where the nodule is cut off at the segmenter's region (it reaches `reach_voxels` past the box with an outer
   layer of at least `cut_fraction` of its largest cross-section, unlike a vessel leaving it), that side of
   the box moves out to it and the nodule is measured again, until it fits, or until the mask would reach the
   patch's border (then it is the chest wall or a vessel that was followed, and the last mask stands).

The real follow-up is the reference: the segmenter measures it in its own annotated box (the prior, in the
prior's box). Dice compares the forecast's and the real segmentation, SSIM and PSNR compare the images on the
whole patch and on the nodule region (the union of the two boxes grown by a margin; an image comparison with
the reference, not a measurement of the forecast). The copy-the-prior baseline is the prior image measured by
`forecast_size` like any forecast; the growth baselines scale that size (`metrics.with_baselines`).
Runs whose sampling is random (every formulation but the bridge, and any run with a growth head) are sampled
`samples` times per pair; a pair's row keeps the median size, the 10 / 90 % quantiles and the CRPS of its
samples, and their mean image scores.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.metrics import PSNRMetric, SSIMMetric, compute_dice
from scipy import ndimage

from noduleflow import distributed
from noduleflow.cache.datasets import NodulePairs
from noduleflow.cache.patches import PatchSettings
from noduleflow.cache.segmenter import Segmenter, grown_box
from noduleflow.evaluation.metrics import COPY_PRIOR, IMAGE_METRICS, forecast_distribution
from noduleflow.hu import to_hu
from noduleflow.models.flow import VelocityNet, paired_start, sample
from noduleflow.models.growth import sample_level
from noduleflow.models.settings import RunSettings
from noduleflow.models.training import SavedModel, derived_seed, read_model
from noduleflow.settings import from_config, section

log = logging.getLogger(__name__)

DATA_RANGE = 2.0  # patches are in [-1, 1]


@dataclass(frozen=True)
class ForecastSettings:
    """How forecasts are drawn and measured (config keys `evaluation` and `models.sampler`: forecast_settings)."""

    samples: int  # forecasts per pair for runs whose sampling is random
    sampler: str
    steps: int
    region_margin: tuple[int, int, int]  # x, y, z voxels around the union box for region SSIM/PSNR
    batch_size: int
    examples: int  # pairs kept (first sample) for the montage
    seed: int
    fastest_doubling_days: float  # fastest volume doubling the search region allows for
    shift_mm: float  # and the nodule's shift (registration residual) it allows for
    detect_contrast_hu: float  # a forecast nodule is brighter than the region's parenchyma by this
    opening_voxels: tuple[int, int, int] = (3, 3, 1)  # x, y, z: in-plane opening that cuts vessels off the nodule
    reach_voxels: tuple[int, int, int] = (2, 2, 1)  # x, y, z: a nodule reaching this far past its box (the
    # segmenter's margin) may go on beyond it: that side of the box moves out to it
    cut_fraction: float = 0.25  # ... with an outer layer this large against its largest cross-section
    max_box_updates: int = 20  # times the box may grow after a nodule reaching past it


def forecast_settings(evaluation: Mapping[str, Any], sampler: Mapping[str, Any], seed: int) -> ForecastSettings:
    """Forecast settings from the `evaluation` and `models.sampler` config sections and the models' seed."""
    return from_config(ForecastSettings, section(ForecastSettings, evaluation), sampler=sampler["method"],
                       steps=sampler["steps"], seed=seed)


@dataclass
class Forecasts:
    """The per-pair table and a few example images (prior, real, generated) with their boxes."""

    table: pd.DataFrame
    examples: list[dict[str, Any]]


def union_box(box_a: Sequence[int], box_b: Sequence[int]) -> list[int]:
    """The smallest box (i0, i1, j0, j1, k0, k1) holding both boxes."""
    return [min(box_a[i], box_b[i]) if i % 2 == 0 else max(box_a[i], box_b[i]) for i in range(6)]


def _window(shape: Sequence[int], largest: int) -> tuple[int, ...]:
    """An odd SSIM window per dimension, at most `largest` and at most the image size."""
    return tuple(max(min(largest, n) - (1 - min(largest, n) % 2), 1) for n in shape)


def image_scores(generated: np.ndarray, real: np.ndarray) -> tuple[float, float]:
    """SSIM and PSNR (MONAI) of two images in [-1, 1] of shape (Z, Y, X); singleton z is 2D; equal images: PSNR inf."""
    squeeze = generated.shape[0] == 1
    a = torch.from_numpy(np.ascontiguousarray(generated[0] if squeeze else generated, dtype=np.float32))[None, None]
    b = torch.from_numpy(np.ascontiguousarray(real[0] if squeeze else real, dtype=np.float32))[None, None]
    dims = a.dim() - 2
    ssim = SSIMMetric(spatial_dims=dims, data_range=DATA_RANGE, win_size=_window(a.shape[2:], 11 if dims == 3 else 7))
    return float(ssim(a, b).item()), float(PSNRMetric(max_val=DATA_RANGE)(a, b).item())


def dice(predicted: np.ndarray, real: np.ndarray) -> float:
    """Dice of two boolean masks (MONAI); 1 when both are empty."""
    a, b = (torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None] for m in (predicted, real))
    return float(compute_dice(a, b, include_background=True, ignore_empty=False).item())


def load_run(path: str | os.PathLike[str] | SavedModel,
             device: torch.device) -> tuple[VelocityNet, RunSettings]:
    """A trained paired run (EMA weights; from its file, or as read by read_model) in eval mode, and its run
    settings."""
    saved = path if isinstance(path, SavedModel) else read_model(path)
    net = VelocityNet(saved.hparams)
    net.load_state_dict(saved.state_dict)
    return net.to(device).eval(), from_config(RunSettings, saved.hparams["run"])


def _noise(priors: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """Seeded noise per pair and sample, shaped like the priors."""
    noise = [torch.randn(priors.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(noise).to(priors)


def forecast_batch(net: VelocityNet, run: RunSettings, priors: torch.Tensor, delta_days: torch.Tensor,
                   seeds: Sequence[int], levels: Sequence[float], settings: ForecastSettings) -> torch.Tensor:
    """Generated follow-ups (in the run's space) for a batch of priors and intervals, each sample's start noise
    from its seed; a run with a growth head takes each sample's log volume ratio from the head at the sample's
    quantile level (noduleflow.models.growth.sample_level)."""
    x0, condition = paired_start(run.formulation, run.start_noise, priors, _noise(priors, seeds))
    delta = delta_days if run.interval else None
    ratio = None if net.growth_head is None else net.growth_head.draw(priors, delta_days, levels)
    return sample(net, x0, settings.steps, settings.sampler, condition, delta, ratio)


def growth_region(prior_box: Sequence[int], delta_days: float, spacing_mm: Sequence[float], shape: Sequence[int],
                  settings: ForecastSettings) -> tuple[slice, ...]:
    """Slices (z, y, x) of the prior's box grown by the fastest growth the interval allows plus the shift allowance."""
    factor = 2.0 ** (max(float(delta_days), 0.0) / (3.0 * settings.fastest_doubling_days)) - 1.0
    margin = []
    for axis, spacing in ((2, spacing_mm[0]), (0, spacing_mm[1]), (4, spacing_mm[2])):  # x, y, z
        half_mm = (prior_box[axis + 1] - prior_box[axis] + 1) * spacing / 2.0
        margin.append(int(np.ceil((half_mm * factor + settings.shift_mm) / spacing)))
    return grown_box(prior_box, margin, shape)[0]


def _bounding_box(mask: np.ndarray) -> list[int]:
    """The box (i0, i1, j0, j1, k0, k1) = (y, x, z) of a non-empty (Z, Y, X) mask."""
    z, y, x = (np.flatnonzero(mask.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    return [int(y[0]), int(y[-1]), int(x[0]), int(x[-1]), int(z[0]), int(z[-1])]


def _detected_box(hu: np.ndarray, prior_box: Sequence[int], inside: np.ndarray, border: np.ndarray,
                  patch: PatchSettings, settings: ForecastSettings) -> list[int] | None:
    """The box of the bright component in `inside` that overlaps the prior's box most, or lies nearest its centre:
    voxels `detect_contrast_hu` above the region's median, opened in-plane to cut vessels off (None: nothing).
    Components that reach the patch's border are left out: the cache centres the nodule in a patch made to hold
    it, so what runs out of the patch is anatomy (chest wall, a large vessel, parenchyma of a faint prior)."""
    above = inside & (hu > float(np.median(hu[inside])) + settings.detect_contrast_hu)
    opened = ndimage.binary_opening(above, structure=np.ones(tuple(reversed(settings.opening_voxels)), dtype=bool))
    labels, _ = ndimage.label(opened if opened.any() else above)
    labels[np.isin(labels, labels[border])] = 0  # components on the patch's `border`; background stays 0
    if not labels.any():
        return None
    count = int(labels.max())
    overlap = np.bincount(labels[grown_box(prior_box, (0, 0, 0), hu.shape)[1]].ravel(), minlength=count + 1)[1:]
    if overlap.max() > 0:
        label = int(np.argmax(overlap)) + 1
    else:
        centre = np.array([(prior_box[4] + prior_box[5]) / 2, (prior_box[0] + prior_box[1]) / 2,
                           (prior_box[2] + prior_box[3]) / 2])
        scale = np.array([patch.spacing_mm[2], patch.spacing_mm[1], patch.spacing_mm[0]])
        points = np.argwhere(labels > 0)
        label = int(labels[tuple(points[np.argmin((((points - centre) * scale) ** 2).sum(axis=1))])])
    return _bounding_box(labels == label)


def _border(shape: Sequence[int]) -> np.ndarray:
    """A mask of the patch's outer faces, along the axes longer than one voxel (a 2D slice has no z faces)."""
    border = np.zeros(shape, dtype=bool)
    for axis, length in enumerate(shape):
        if length > 1:
            border[(slice(None),) * axis + ([0, length - 1],)] = True
    return border


def forecast_mask(image: np.ndarray, prior_box: Sequence[int], delta_days: float, patch: PatchSettings,
                  segmenter: Segmenter, settings: ForecastSettings) -> np.ndarray:
    """The forecast nodule's mask (Z, Y, X), found with what is known at the prior (see the module docstring)."""
    hu = to_hu(image, patch.hu_window)
    inside = np.zeros(hu.shape, dtype=bool)
    inside[growth_region(prior_box, delta_days, patch.spacing_mm, hu.shape, settings)] = True
    border = _border(hu.shape)
    box = list(prior_box)
    mask = segmenter(hu, box) & inside
    if not mask.any():  # gone, faint in a box now too loose, or larger than the box all round: look for it
        box = _detected_box(hu, prior_box, inside, border, patch, settings)
        if box is None:
            return mask
        mask = segmenter(hu, box) & inside
    for _ in range(settings.max_box_updates):  # the box follows a nodule cut off at the segmenter's region
        grown = _box_past_cuts(mask, box, settings)
        if grown == box:
            break
        grown_mask = segmenter(hu, grown) & inside
        if (grown_mask & border).any():  # the cut leads out of the patch: the chest wall or a vessel, not the nodule
            break
        box, mask = grown, grown_mask
    return mask


def _box_past_cuts(mask: np.ndarray, box: list[int], settings: ForecastSettings) -> list[int]:
    """`box` with each side moved out to the mask where the mask reaches `reach_voxels` past it with an outer
    layer of at least `cut_fraction` of its largest cross-section on that axis: a nodule cut off there, not a
    vessel leaving it."""
    if not mask.any():
        return box
    found = _bounding_box(mask)
    reach = (settings.reach_voxels[1], settings.reach_voxels[0], settings.reach_voxels[2])  # y, x, z
    grown = list(box)
    for side in range(6):
        axis = (1, 2, 0)[side // 2]  # array axis of y, x, z
        beyond = box[side] - found[side] if side % 2 == 0 else found[side] - box[side]
        if beyond < reach[side // 2]:
            continue
        sections = mask.sum(axis=tuple(a for a in range(3) if a != axis))
        if sections[found[side]] >= settings.cut_fraction * sections.max():
            grown[side] = found[side]
    return grown


def voxel_size(patch: PatchSettings, slices: bool) -> float:
    """mm^3 of a voxel (3D) or mm^2 of a pixel (2D slices)."""
    return float(np.prod(patch.spacing_mm[: 2 if slices else 3]))


def forecast_size(image: np.ndarray, prior_box: Sequence[int], delta_days: float, patch: PatchSettings,
                  segmenter: Segmenter, settings: ForecastSettings) -> float:
    """The size of the nodule in a forecast image in [-1, 1] (Z, Y, X; Z = 1: a 2D slice, size in mm^2), measured
    only with the prior's box (i0, i1, j0, j1, k0, k1) and the interval: mm^3 (3D) or mm^2 (2D)."""
    mask = forecast_mask(image, prior_box, delta_days, patch, segmenter, settings)
    return float(mask.sum()) * voxel_size(patch, image.shape[0] == 1)


def reference_mask(image: np.ndarray, box: list[int], patch: PatchSettings, segmenter: Segmenter) -> np.ndarray:
    """A reference image's nodule (an annotated prior or follow-up), segmented in its own box."""
    return segmenter(to_hu(image, patch.hu_window), box)


class _Measure:
    """Measures the images of one pair: the references in their own boxes, forecasts by `forecast_mask`."""

    def __init__(self, pair: dict[str, Any], prior: np.ndarray, real: np.ndarray, slices: bool, patch: PatchSettings,
                 segmenter: Segmenter, settings: ForecastSettings) -> None:
        self.patch, self.segmenter, self.settings = patch, segmenter, settings
        self.prior_box, self.real_box = (_box(pair[k], slices) for k in ("bbox_a", "bbox_b"))
        self.delta_days = float(pair["delta_days"])
        self.unit = voxel_size(patch, slices)
        self.region = grown_box(union_box(self.prior_box, self.real_box), settings.region_margin, real.shape)[0]
        self.real = real
        self.prior_size = self.size(self.reference(prior, self.prior_box))
        self.real_mask = self.reference(real, self.real_box)

    def reference(self, image: np.ndarray, box: list[int]) -> np.ndarray:
        return reference_mask(image, box, self.patch, self.segmenter)

    def size(self, mask: np.ndarray) -> float:
        return float(mask.sum()) * self.unit

    def scores(self, images: Sequence[np.ndarray]) -> dict[str, float]:
        """One forecast's samples: their size distribution (`metrics.forecast_distribution`) and mean image scores."""
        sizes, per_sample = [], []
        for image in images:
            mask = forecast_mask(image, self.prior_box, self.delta_days, self.patch, self.segmenter, self.settings)
            ssim, psnr = image_scores(image, self.real)
            ssim_region, psnr_region = image_scores(image[self.region], self.real[self.region])
            sizes.append(self.size(mask))
            per_sample.append([dice(mask, self.real_mask), ssim, psnr, ssim_region, psnr_region])
        means = np.mean(np.asarray(per_sample, dtype=float), axis=0)
        return {**forecast_distribution(np.asarray(sizes), self.size(self.real_mask)),
                **dict(zip(IMAGE_METRICS, means.tolist(), strict=True))}


def as_volumes(images: torch.Tensor, slices: bool) -> np.ndarray:
    """(B, 1, Z, Y, X) or (B, 1, Y, X) tensors as numpy (B, Z, Y, X), 2D slices with Z = 1."""
    array = images[:, 0].clamp(-1.0, 1.0).float().cpu().numpy()
    return array[:, None] if slices else array


def _box(box: torch.Tensor, slices: bool) -> list[int]:
    """A pair's box as a list; 2D slices keep only the in-plane part (z = 0)."""
    values = box.tolist()
    return values[:4] + [0, 0] if slices else values


def _pair_images(raw: NodulePairs, item: int, slices: bool) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """A pair's item and its prior and real follow-up as (Z, Y, X) arrays."""
    pair = raw[item]
    prior, real = (as_volumes(pair[k][None], slices)[0] for k in ("prior", "follow_up"))
    return pair, prior, real


def pair_sizes(raw: NodulePairs, patch: PatchSettings, segmenter: Segmenter, slices: bool) -> pd.DataFrame:
    """Prior and follow-up sizes of every pair, each measured in its own box (the reference, for growth rates)."""
    rows, unit = [], voxel_size(patch, slices)
    for item in range(len(raw)):
        pair, prior, real = _pair_images(raw, item, slices)
        prior_box, real_box = (_box(pair[k], slices) for k in ("bbox_a", "bbox_b"))
        rows.append({"prior_size": float(reference_mask(prior, prior_box, patch, segmenter).sum()) * unit,
                     "real_size": float(reference_mask(real, real_box, patch, segmenter).sum()) * unit,
                     "delta_days": float(pair["delta_days"])})
    return pd.DataFrame(rows, columns=["prior_size", "real_size", "delta_days"])


def evaluate_run(*, model_path: str | os.PathLike[str], raw: NodulePairs, model_data: NodulePairs,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None, patch: PatchSettings, segmenter: Segmenter,
                 settings: ForecastSettings, run_name: str,
                 true_volumes: pd.DataFrame | None = None) -> Forecasts:
    """Forecast every pair with a run and measure it and the copy-prior baseline: one row per pair and method.

    `raw` gives the prior and real follow-up images (patches or slices); `model_data` the same pairs in the
    run's space (the raw pairs again, or latents, with `decode` back to patches). `true_volumes` (synthetic
    cohort: exam_id, nodule_group, true_volume_mm3, kind) adds the true follow-up volume of 3D pairs and every
    nodule's kind.
    """
    if list(raw.pairs["key_b"]) != list(model_data.pairs["key_b"]):
        raise ValueError("the raw and the model caches hold different pairs")
    device = distributed.device()
    net, run = load_run(model_path, device)
    slices = run.space == "slices"
    samples = settings.samples if run.random_forecasts else 1
    rows, examples = [], []
    for start in range(0, len(raw), settings.batch_size):
        items = range(start, min(start + settings.batch_size, len(raw)))
        batch = [model_data[i] for i in items]
        priors = torch.stack([b["prior"] for b in batch]).to(device)
        delta = torch.stack([b["delta_days"] for b in batch]).to(device)
        generated = []
        for s in range(samples):
            seeds = [derived_seed(settings.seed, "forecast", i, s) for i in items]
            out = forecast_batch(net, run, priors, delta, seeds, [sample_level(s, samples)] * len(seeds), settings)
            generated.append(as_volumes(decode(out) if decode is not None else out, slices))
        for offset, item in enumerate(items):
            pair, prior, real = _pair_images(raw, item, slices)
            measure = _Measure(pair, prior, real, slices, patch, segmenter, settings)
            ids = {"pair": item, "pid": pair["pid"], "nodule_group": pair["nodule_group"],
                   "nodule_key_a": pair["nodule_key_a"], "nodule_key_b": pair["nodule_key_b"],
                   "exam_a": raw.pairs.at[item, "exam_a"], "exam_b": raw.pairs.at[item, "exam_b"],
                   "delta_days": measure.delta_days, "prior_size": measure.prior_size,
                   "real_size": measure.size(measure.real_mask)}
            copy = measure.scores([prior])
            ids["prior_forecast_size"] = copy["predicted_size"]
            rows.append({**ids, "method": COPY_PRIOR, **copy})
            rows.append({**ids, "method": run_name, **measure.scores([g[offset] for g in generated])})
            if len(examples) < settings.examples:
                examples.append({"prior": prior, "real": real, "generated": generated[0][offset],
                                 "box": union_box(measure.prior_box, measure.real_box),
                                 "title": f"{pair['pid']} nodule {pair['nodule_group']}, "
                                          f"{pair['delta_days'].item():.0f} days"})
        log.info("%s: %d/%d pairs", run_name, items[-1] + 1, len(raw))
    table = pd.DataFrame(rows)
    table.insert(0, "run", run_name)
    table.insert(1, "dims", 2 if slices else 3)
    if true_volumes is not None:
        truth = true_volumes.set_index(["exam_id", "nodule_group"])
        keys = list(zip(table["exam_b"], table["nodule_group"], strict=True))
        if not slices:
            table["true_size"] = truth["true_volume_mm3"].reindex(keys).to_numpy()
        table["kind"] = truth["kind"].reindex(keys).to_numpy()
    return Forecasts(table, examples)
