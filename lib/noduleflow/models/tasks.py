"""What each model trains on and with which loss: the VAE, unconditional pretraining and paired forecasting.

Spaces: "raw" (3D patches of the raw cache), "slices" (2D axial slices of the raw cache) and "latent" (3D VAE
latents of the latent cache). Every function here wires a cache folder and typed settings
(noduleflow.models.settings) to `noduleflow.models.training.train`; they take keyword arguments only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from noduleflow.cache.datasets import NodulePairs, NodulePatches, VolumeCrops
from noduleflow.cache.patches import PatchSettings
from noduleflow.models.flow import FORMULATIONS, VelocityNet, box_weights, flow_matching_loss, paired_start
from noduleflow.models.growth import WithLogRatio, measured_volumes, ratio_summary
from noduleflow.models.settings import PretrainSettings, RunSettings, SamplerSettings, VaeSettings
from noduleflow.models.training import (
    SavedModel,
    derived_seed,
    load_model,
    read_model,
    save_model,
    seeded_model,
    train,
)
from noduleflow.models.vae import build_vae, vae_loss

log = logging.getLogger(__name__)

SPACES = ("raw", "slices", "latent")
TRAIN_CROPS = 2**20  # random crops per train volume: more than any training run draws
VAL_CROPS = 4  # fixed crops per val volume


def _non_empty(dataset: Dataset) -> Dataset | None:
    """The validation set, or None (no validation, with a warning) when the split has nothing to offer."""
    if len(dataset) == 0:
        log.warning("the validation split is empty: training runs without validation")
        return None
    return dataset


def _patches(folder: str | os.PathLike[str], space: str) -> NodulePatches:
    return NodulePatches(folder, slices=space == "slices")


def vae_datasets(settings: VaeSettings, train_folder: str, val_folder: str,
                 seed: int) -> tuple[Dataset, Dataset | None]:
    """What a VAE trains and validates on: raw nodule patches, or with `crop` in its settings (`vae_volumes`) random
    crops of the train volumes and VAL_CROPS fixed crops per val volume, all drawn from `seed`."""
    if settings.crop is None:
        return _patches(train_folder, "raw"), _non_empty(_patches(val_folder, "raw"))
    crop = settings.crop
    train_set = VolumeCrops(train_folder, crop, derived_seed(seed, "train crops"), TRAIN_CROPS)
    return train_set, _non_empty(VolumeCrops(val_folder, crop, derived_seed(seed, "val crops"), VAL_CROPS))


def train_vae(*, settings: VaeSettings, train_folder: str, val_folder: str, model_path: str, work_dir: str,
              seed: int, patch: PatchSettings | None = None) -> None:
    """Train the 3D VAE on the train split (see vae_datasets), validated on the val split; `patch` (the patch
    settings of a VAE on nodule patches) is recorded in the model file."""
    hparams = settings.hparams()
    training = dataclasses.replace(settings.training, seed=seed)
    model = seeded_model(lambda: build_vae(hparams), seed)
    kl_weight = settings.kl_weight
    train_set, val_set = vae_datasets(settings, train_folder, val_folder, seed)
    result = train(model, lambda m, batch, g: vae_loss(m, batch["image"], g, kl_weight), train_set, training,
                   work_dir, {"vae": dataclasses.asdict(settings), "seed": seed},
                   val_dataset=val_set, val_every=training.checkpoint_every)
    save_model(model_path, result.model, hparams, result.history,
               meta={"patch": patch_geometry(patch)} if patch else None)


def load_vae(path: str | os.PathLike[str] | SavedModel) -> nn.Module:
    """A trained VAE (from its file, or as read by read_model) in eval mode."""
    saved = path if isinstance(path, SavedModel) else read_model(path)
    model = build_vae(saved.hparams)
    model.load_state_dict(saved.state_dict)
    return model.eval()


def patch_geometry(patch: PatchSettings) -> dict[str, list[float]]:
    """What a model file records of the patch settings: the patch spacing, size and HU window (plain lists)."""
    return {"spacing_mm": [float(v) for v in patch.spacing_mm], "size": [int(v) for v in patch.size],
            "hu_window": [float(v) for v in patch.hu_window]}


def _net_hparams(net: dict[str, Any], space: str, data_channels: int, prior_channels: int,
                 interval_dim: int) -> dict[str, Any]:
    return {"spatial_dims": 2 if space == "slices" else 3, "data_channels": data_channels,
            "prior_channels": prior_channels, "interval_dim": interval_dim, **net}


def _initialise(net: VelocityNet, pretrained: str | os.PathLike[str]) -> None:
    """Copy every pretrained weight whose name and shape match (new conditioning layers keep their init)."""
    state, _ = load_model(pretrained)
    own = net.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    net.load_state_dict(matching, strict=False)
    log.info("initialised %d of %d tensors from %s", len(matching), len(own), pretrained)


def train_pretraining(*, settings: PretrainSettings, data_channels: int, train_folder: str, val_folder: str,
                      model_path: str, work_dir: str, seed: int) -> None:
    """Unconditional flow matching from noise to cached patches, slices or latents."""
    space = settings.space
    hparams = _net_hparams(settings.net, space, data_channels, 0, 0)
    training = dataclasses.replace(settings.training, seed=seed)
    sigma = settings.sigma

    def loss(net: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        x1 = batch["image"]
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        return flow_matching_loss(net, x0, x1, generator, sigma)

    net = seeded_model(lambda: VelocityNet(hparams), seed)
    result = train(net, loss, _patches(train_folder, space), training, work_dir,
                   {"hparams": hparams, "pretrain": dataclasses.asdict(settings), "seed": seed},
                   val_dataset=_non_empty(_patches(val_folder, space)), val_every=training.checkpoint_every)
    save_model(model_path, result.model, hparams, result.history)


def paired_dataset(folder: str | os.PathLike[str], pairs_path: str | os.PathLike[str], space: str) -> NodulePairs:
    """Prior/follow-up pairs of one split from a cache folder."""
    return NodulePairs(folder, pd.read_parquet(pairs_path), slices=space == "slices")


def random_flips(tensors: list[torch.Tensor | None], generator: torch.Generator) -> list[torch.Tensor | None]:
    """The same random flip of every spatial axis per sample, and a swap of y and x where they are equal in size.

    Tensors are (B, C, *spatial) and share B and spatial sizes; None entries pass through. The flips come from
    `generator`, so a resumed training run draws the same ones.
    """
    present = [t for t in tensors if t is not None]
    batch, spatial = present[0].shape[0], present[0].dim() - 2
    flags = (torch.rand(batch, spatial + 1, generator=generator, device=generator.device) < 0.5).tolist()
    square = present[0].shape[-1] == present[0].shape[-2]
    out = []
    for tensor in tensors:
        if tensor is None:
            out.append(None)
            continue
        samples = []
        for b in range(batch):
            item = tensor[b].flip([1 + axis for axis in range(spatial) if flags[b][axis]])
            samples.append(item.transpose(-1, -2) if square and flags[b][spatial] else item)
        out.append(torch.stack(samples))
    return out


def paired_loss(run: RunSettings, box_scale: tuple[float, float, float]):
    """The loss of a paired run: its formulation, interval conditioning and optional box weighting; with a growth
    head, the flow is conditioned on the batch's measured `log_ratio` and the head's negative log-likelihood of
    it is added (times its weight)."""
    formulation, sigma = run.formulation, run.sigma
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}; expected one of {FORMULATIONS}")
    weight, margin = run.box_weight, run.box_margin

    def loss(net: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        prior, x1 = batch["prior"], batch["follow_up"]
        delta = batch["delta_days"] if run.interval else None
        weights = None
        if weight != 1.0:
            weights = box_weights(x1.shape, (batch["bbox_a"], batch["bbox_b"]), margin, weight, box_scale).to(x1)
        if run.augment:
            prior, x1, weights = random_flips([prior, x1, weights], generator)
        noise = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        x0, condition = paired_start(run.formulation, run.start_noise, prior, noise)
        if run.growth is None:
            return flow_matching_loss(net, x0, x1, generator, sigma, condition, delta, weights)
        ratio = batch["log_ratio"]
        flow = flow_matching_loss(net, x0, x1, generator, sigma, condition, delta, weights, ratio)
        return flow + run.growth.weight * net.growth_head.nll(prior, batch["delta_days"], ratio)

    return loss


def run_hparams(run: RunSettings, data_channels: int) -> dict[str, Any]:
    """Network hyper-parameters of a paired run."""
    prior_channels = 0 if run.formulation == "bridge" else data_channels
    hparams = _net_hparams(run.net, run.space, data_channels, prior_channels, run.interval_dim if run.interval else 0)
    return hparams if run.growth is None else {**hparams, "growth": run.growth.hparams()}


def growth_dataset(pairs: NodulePairs, run: RunSettings, small_boxes: str | None) -> Dataset:
    """A run's pairs, with the measured log volume ratio of each (from the raw cache's `small_boxes` table of
    the split) when the run has a growth head."""
    if run.growth is None:
        return pairs
    if small_boxes is None:
        raise ValueError("a run with a growth head needs the measured volumes (small_boxes.parquet) of its pairs")
    dataset = WithLogRatio(pairs, measured_volumes(pd.read_parquet(small_boxes)), run.growth.floor_mm3)
    log.info("growth targets of %s: %s", small_boxes, ratio_summary(dataset.ratios))
    return dataset


def train_paired(*, run: RunSettings, data_channels: int, box_scale: tuple[float, float, float],
                 train_folder: str, train_pairs: str, val_folder: str, val_pairs: str, pretrained: str | None,
                 model_path: str, work_dir: str, seed: int, patch: PatchSettings, sampler: SamplerSettings,
                 vae: str | None = None, train_volumes: str | None = None, val_volumes: str | None = None) -> None:
    """Paired conditional flow matching: prior patch and interval -> follow-up patch.

    A run with a growth head also needs the measured volumes of the train and val nodules (`train_volumes`,
    `val_volumes`: the raw cache's small_boxes tables). The model file is a portable run
    (noduleflow.evaluation.predict): it records the patch geometry and HU window, the sampler and the seed, and
    holds the VAE of a latent run and the growth head."""
    hparams = run_hparams(run, data_channels)
    training = dataclasses.replace(run.training, seed=seed)
    net = seeded_model(lambda: VelocityNet(hparams), seed)
    if pretrained:
        _initialise(net, pretrained)
    train_set = growth_dataset(paired_dataset(train_folder, train_pairs, run.space), run, train_volumes)
    val_set = growth_dataset(paired_dataset(val_folder, val_pairs, run.space), run, val_volumes)
    result = train(net, paired_loss(run, box_scale), train_set, training, work_dir,
                   {"run": run.record(), "hparams": hparams, "pretrained": bool(pretrained), "seed": seed},
                   val_dataset=_non_empty(val_set), val_every=training.checkpoint_every)
    meta = {"patch": patch_geometry(patch), "sampler": dataclasses.asdict(sampler), "seed": seed}
    save_model(model_path, result.model, {**hparams, "run": run.record()}, result.history, meta,
               read_model(vae) if run.space == "latent" else None)
