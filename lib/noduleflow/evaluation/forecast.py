"""Per-pair evaluation of a paired forecasting run on the test split (seed step 20: eval_3D_fm, eval_2D_fm).

For every prior/follow-up pair the run generates the follow-up from the prior and the interval (latent runs
decode through the VAE), and every image is measured the same way: the segmenter runs on the union of the two
nodule boxes (so prior, real and generated sizes come from one region), Dice compares the generated and the
real segmentation, SSIM and PSNR compare the images on the whole patch and on the nodule region (the union box
grown by a margin). The copy-the-prior baseline gets the same measurements with the prior as its forecast.
Runs whose sampling is random (every formulation but the bridge) are sampled several times per pair.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.metrics import PSNRMetric, SSIMMetric, compute_dice

from noduleflow.datasets import NodulePairs
from noduleflow.evaluation.metrics import COPY_PRIOR
from noduleflow.evaluation.segmenter import grown_box
from noduleflow.models.flow import VelocityNet, paired_start, sample
from noduleflow.patches import PatchSettings, to_hu
from noduleflow.training import SavedModel, derived_seed, read_model

log = logging.getLogger(__name__)

Segmenter = Callable[[np.ndarray, Sequence[int]], np.ndarray]
DATA_RANGE = 2.0  # patches are in [-1, 1]


@dataclass(frozen=True)
class ForecastSettings:
    """How forecasts are drawn and measured (config key `evaluation`)."""

    samples: int = 3  # forecasts per pair for runs whose sampling is random
    sampler: str = "heun"
    steps: int = 20
    region_margin: tuple[int, int, int] = (4, 4, 1)  # x, y, z voxels around the union box for region SSIM/PSNR
    batch_size: int = 8
    examples: int = 6  # pairs kept (first sample) for the montage
    seed: int = 0


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
             device: torch.device) -> tuple[VelocityNet, dict[str, Any]]:
    """A trained paired run (EMA weights; from its file, or as read by read_model) in eval mode, and its run
    settings."""
    saved = path if isinstance(path, SavedModel) else read_model(path)
    net = VelocityNet(saved.hparams)
    net.load_state_dict(saved.state_dict)
    return net.to(device).eval(), saved.hparams["run"]


def _noise(priors: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """Seeded noise per pair and sample, shaped like the priors."""
    noise = [torch.randn(priors.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(noise).to(priors)


def forecast_batch(net: VelocityNet, run: dict[str, Any], priors: torch.Tensor, delta_days: torch.Tensor,
                   seeds: Sequence[int], settings: ForecastSettings) -> torch.Tensor:
    """Generated follow-ups (in the run's space) for a batch of priors and intervals."""
    x0, condition = paired_start(run, priors, _noise(priors, seeds))
    delta = delta_days if run["interval"] else None
    return sample(net, x0, settings.steps, settings.sampler, condition, delta)


class _Measure:
    """Segments and scores images of one pair against its real follow-up."""

    def __init__(self, real: np.ndarray, box: list[int], patch: PatchSettings, segmenter: Segmenter,
                 margin: Sequence[int]) -> None:
        self.patch, self.segmenter, self.box = patch, segmenter, box
        self.unit = float(np.prod(patch.spacing_mm[: 3 if real.shape[0] > 1 else 2]))
        self.region = grown_box(box, margin, real.shape)[0]
        self.real, self.real_mask = real, self.mask(real)

    def mask(self, image: np.ndarray) -> np.ndarray:
        return self.segmenter(to_hu(image, self.patch.hu_window), self.box)

    def size(self, mask: np.ndarray) -> float:
        return float(mask.sum()) * self.unit

    def scores(self, image: np.ndarray) -> dict[str, float]:
        mask = self.mask(image)
        ssim, psnr = image_scores(image, self.real)
        ssim_region, psnr_region = image_scores(image[self.region], self.real[self.region])
        return {"predicted_size": self.size(mask), "dice": dice(mask, self.real_mask), "ssim": ssim, "psnr": psnr,
                "ssim_nodule": ssim_region, "psnr_nodule": psnr_region}


def _volumes(images: torch.Tensor, slices: bool) -> np.ndarray:
    """(B, 1, Z, Y, X) or (B, 1, Y, X) tensors as numpy (B, Z, Y, X), 2D slices with Z = 1."""
    array = images[:, 0].clamp(-1.0, 1.0).float().cpu().numpy()
    return array[:, None] if slices else array


def _pair_images(raw: NodulePairs, item: int, slices: bool) -> tuple[dict[str, Any], np.ndarray, np.ndarray,
                                                                      list[int]]:
    """A pair's item, its prior and real follow-up as (Z, Y, X) arrays, and the union of its boxes."""
    pair = raw[item]
    prior, real = (_volumes(pair[k][None], slices)[0] for k in ("prior", "follow_up"))
    box = union_box(pair["bbox_a"].tolist(), pair["bbox_b"].tolist())
    if slices:
        box[4:] = [0, 0]
    return pair, prior, real, box


def pair_sizes(raw: NodulePairs, patch: PatchSettings, segmenter: Segmenter, slices: bool) -> pd.DataFrame:
    """Prior and follow-up sizes of every pair, measured as the evaluation measures them (for growth rates)."""
    rows = []
    for item in range(len(raw)):
        pair, prior, real, box = _pair_images(raw, item, slices)
        measure = _Measure(real, box, patch, segmenter, (0, 0, 0))
        rows.append({"prior_size": measure.size(measure.mask(prior)), "real_size": measure.size(measure.real_mask),
                     "delta_days": float(pair["delta_days"])})
    return pd.DataFrame(rows, columns=["prior_size", "real_size", "delta_days"])


def evaluate_run(model_path: str | os.PathLike[str], raw: NodulePairs, model_data: NodulePairs,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None, patch: PatchSettings, segmenter: Segmenter,
                 settings: ForecastSettings, run_name: str,
                 true_volumes: pd.DataFrame | None = None) -> Forecasts:
    """Forecast every test pair with a run and measure it and the copy-prior baseline.

    `raw` gives the prior and real follow-up images (patches or slices); `model_data` the same pairs in the
    run's space (the raw pairs again, or latents, with `decode` back to patches). `true_volumes` (synthetic
    cohort: exam_id, nodule_group, true_volume_mm3, kind) adds the true follow-up volume of 3D pairs and every
    nodule's kind.
    """
    if list(raw.pairs["key_b"]) != list(model_data.pairs["key_b"]):
        raise ValueError("the raw and the model caches hold different pairs")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net, run = load_run(model_path, device)
    slices = run["space"] == "slices"
    samples = 1 if run["formulation"] == "bridge" else settings.samples
    rows, examples = [], []
    for start in range(0, len(raw), settings.batch_size):
        items = range(start, min(start + settings.batch_size, len(raw)))
        batch = [model_data[i] for i in items]
        priors = torch.stack([b["prior"] for b in batch]).to(device)
        delta = torch.stack([b["delta_days"] for b in batch]).to(device)
        generated = []
        for s in range(samples):
            seeds = [derived_seed(settings.seed, "forecast", i, s) for i in items]
            out = forecast_batch(net, run, priors, delta, seeds, settings)
            generated.append(_volumes(decode(out) if decode is not None else out, slices))
        for offset, item in enumerate(items):
            pair, prior, real, box = _pair_images(raw, item, slices)
            measure = _Measure(real, box, patch, segmenter, settings.region_margin)
            ids = {"pair": item, "pid": pair["pid"], "nodule_group": pair["nodule_group"],
                   "nodule_key_a": pair["nodule_key_a"], "nodule_key_b": pair["nodule_key_b"],
                   "exam_a": raw.pairs.at[item, "exam_a"], "exam_b": raw.pairs.at[item, "exam_b"],
                   "delta_days": float(pair["delta_days"]), "prior_size": measure.size(measure.mask(prior)),
                   "real_size": measure.size(measure.real_mask)}
            rows.append({**ids, "method": COPY_PRIOR, "sample": 0, **measure.scores(prior)})
            for s in range(samples):
                rows.append({**ids, "method": run_name, "sample": s, **measure.scores(generated[s][offset])})
            if len(examples) < settings.examples:
                examples.append({"prior": prior, "real": real, "generated": generated[0][offset], "box": box,
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
