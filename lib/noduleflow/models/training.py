"""The one training loop of the project: AdamW, warm-up + cosine LR, gradient clipping, EMA, resumable checkpoints.

Models and losses come from the caller. Every source of randomness is a pure function of (seed, step), so a run
killed and restarted from its checkpoint ends with the same weights as an unbroken one (bit for bit on CPU):

- the batch of step `s` holds the dataset items that `numpy.random.default_rng([seed, s])` chooses;
- the loss gets a `torch.Generator` seeded from (seed, s), which it must use for all its own randomness;
- the global torch RNG (dropout and the like inside the model) is reseeded from (seed, s) before each step.

In a data-parallel process group (`noduleflow.distributed`) every worker takes its share of that batch and its
own noise (seeded from (seed, s, rank)), gradients are averaged over the workers before clipping, and only the
main worker logs, validates and writes checkpoints.

Steps are counted from 1; the history has one row per step.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import Dataset, default_collate

from noduleflow import distributed
from noduleflow.io import atomic_path, write_csv

log = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=torch.nn.Module)
LossFn = Callable[[torch.nn.Module, dict[str, Any], torch.Generator], torch.Tensor]
"""loss_fn(model, batch, generator) -> scalar loss; all its randomness must come from `generator`."""

CHECKPOINT_NAME = "checkpoint.pt"
_WARMUP_START = 1e-3  # the warm-up starts at this fraction of the peak learning rate
_COLUMNS = ("step", "loss", "lr", "grad_norm", "seconds", "val_loss")


class CheckpointMismatch(ValueError):
    """A checkpoint in the work folder was written by a run with another fingerprint."""


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings shared by every model."""

    steps: int  # optimizer steps in total
    batch_size: int
    lr: float  # peak learning rate
    weight_decay: float = 0.01  # AdamW
    warmup_fraction: float = 0.1  # linear warm-up from 1e-3 * lr over this fraction of the steps
    min_lr_fraction: float = 0.1  # then cosine decay to lr * min_lr_fraction at the last step
    grad_clip: float = 1.0  # max gradient norm
    ema_decay: float = 0.999  # EMA of the weights (used for sampling and saving); warmed up, see _ema_update
    checkpoint_every: int = 50  # steps between resumable checkpoints
    log_every: int = 10  # steps between progress lines
    seed: int = 42
    bf16: bool = True  # autocast to bf16 on CUDA
    bf16_cpu: bool = False  # autocast to bf16 on CPU too: about 1.5x faster on CPUs with bf16 units (AVX512-BF16, AMX)

    def __post_init__(self) -> None:
        problems = [
            name for name, ok in [
                ("steps", self.steps >= 1), ("batch_size", self.batch_size >= 1), ("lr", self.lr > 0),
                ("weight_decay", self.weight_decay >= 0), ("warmup_fraction", 0 <= self.warmup_fraction <= 1),
                ("min_lr_fraction", 0 <= self.min_lr_fraction <= 1), ("grad_clip", self.grad_clip > 0),
                ("ema_decay", 0 <= self.ema_decay < 1), ("checkpoint_every", self.checkpoint_every >= 1),
                ("log_every", self.log_every >= 1),
            ] if not ok
        ]
        if problems:
            raise ValueError(f"invalid training settings: {', '.join(f'{p}={getattr(self, p)!r}' for p in problems)}")


@dataclass
class TrainResult:
    """What training returns."""

    model: torch.nn.Module  # the EMA weights (a copy of the model), in eval mode
    history: pd.DataFrame  # one row per step: step, loss, lr (used by the step), grad_norm (before clipping),
    # seconds (wall-clock training time so far, summed over resumed runs), val_loss (NaN where not computed)


def train(model: torch.nn.Module, loss_fn: LossFn, dataset: Dataset, settings: TrainSettings,
          work_dir: str | os.PathLike[str], fingerprint: Mapping[str, Any], *, val_dataset: Dataset | None = None,
          val_every: int = 0, max_steps_this_run: int | None = None) -> TrainResult:
    """Train `model` in place for `settings.steps` steps, resuming from `work_dir/checkpoint.pt` when present.

    `fingerprint` (JSON-able) describes the model, data and settings; a checkpoint written under another
    fingerprint raises CheckpointMismatch. With `val_dataset` and `val_every` > 0 the EMA model's mean loss over
    the whole validation set is recorded every `val_every` steps and at the last step. `max_steps_this_run`
    stops early (after writing a checkpoint) once that many steps were taken in this call.
    """
    if len(dataset) == 0 or (val_dataset is not None and val_every > 0 and len(val_dataset) == 0):
        raise ValueError("cannot train on an empty dataset")
    rank, workers = distributed.rank_and_size()
    if settings.batch_size % workers:
        raise ValueError(f"batch_size {settings.batch_size} does not split evenly over {workers} workers")
    main = rank == 0
    device = distributed.device()
    autocast = dict(device_type=device.type, dtype=torch.bfloat16,
                    enabled=settings.bf16 if device.type == "cuda" else settings.bf16_cpu)
    seed_everything(settings.seed)
    fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))  # plain lists and dicts, as stored

    model = model.to(device).train()
    distributed.broadcast_from_main(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = LambdaLR(optimizer, lambda index: _lr_factor(index, settings))
    history: dict[str, list[float]] = {name: [] for name in _COLUMNS}
    step = 0
    checkpoint = Path(work_dir) / CHECKPOINT_NAME
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True, map_location=device)
        _check_fingerprint(state["fingerprint"], fingerprint, checkpoint)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = state["step"], state["history"]
        if main:
            log.info("resuming from step %d/%d of %s on %s", step, settings.steps, checkpoint, device)
    elif main:
        log.info("training %d steps on %s (%d worker(s))", settings.steps, device, workers)

    validate = val_dataset is not None and val_every > 0
    stop = settings.steps if max_steps_this_run is None else min(settings.steps, step + max_steps_this_run)
    pending: list[tuple[int, torch.Tensor, float, torch.Tensor, float]] = []  # read back at flushes only
    seconds_before = history["seconds"][-1] if history["seconds"] else 0.0
    started = last_log_time = time.perf_counter()
    last_log_step = step
    while step < stop:
        step += 1
        indices = _batch_indices(len(dataset), settings.batch_size, settings.seed, step)[rank::workers]
        batch = _batch(dataset, indices, device)
        keys = (step,) if workers == 1 else (step, rank)  # each worker its own noise
        torch.manual_seed(derived_seed(settings.seed, "model", *keys))
        generator = torch.Generator(device).manual_seed(derived_seed(settings.seed, "loss", *keys))
        with torch.autocast(**autocast):
            loss = loss_fn(model, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(list(model.parameters()))
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        _ema_update(ema, model, settings.ema_decay, step)
        pending.append((step, distributed.mean_over_workers(loss.detach().float()), lr, grad_norm.detach().float(),
                        seconds_before + time.perf_counter() - started))

        log_now = step % settings.log_every == 0 or step == stop
        validate_now = validate and (step % val_every == 0 or step == settings.steps)
        save_now = step % settings.checkpoint_every == 0 or step == stop
        if not (log_now or validate_now or save_now):
            continue
        _flush(pending, history)
        if log_now and main:
            now = time.perf_counter()
            losses = history["loss"][len(history["loss"]) - (step - last_log_step):]
            log.info("step %d/%d loss %.4g lr %.2g %.1f steps/s", step, settings.steps, sum(losses) / len(losses),
                     lr, (step - last_log_step) / max(now - last_log_time, 1e-9))
            last_log_time, last_log_step = now, step
        if validate_now and main:
            history["val_loss"][-1] = _validation_loss(ema, loss_fn, val_dataset, settings, device, autocast)
            log.info("step %d/%d val_loss %.4g", step, settings.steps, history["val_loss"][-1])
        if save_now and main:
            _save_checkpoint(checkpoint, {
                "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "history": history, "fingerprint": fingerprint,
            })
    return TrainResult(model=ema, history=pd.DataFrame(history, columns=list(_COLUMNS)))


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seeded_model(build: Callable[[], ModelT], seed: int) -> ModelT:
    """`build()` after seed_everything(seed): initial weights that depend on `seed` alone, not on the process."""
    seed_everything(seed)
    return build()


def _lr_factor(index: int, settings: TrainSettings) -> float:
    """Multiplier of the peak LR at optimizer step `index` (0-based): linear warm-up, then cosine decay."""
    warmup = round(settings.warmup_fraction * settings.steps)
    if index < warmup:
        return _WARMUP_START + (1.0 - _WARMUP_START) * index / warmup
    decay_steps = settings.steps - 1 - warmup
    progress = min(1.0, (index - warmup) / decay_steps) if decay_steps > 0 else 0.0
    low = settings.min_lr_fraction
    return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def derived_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed that depends only on `seed` and `keys` (stable across processes and platforms)."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _batch_indices(size: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The dataset items of step `step`: a function of (seed, step) only, so no sampler state needs saving."""
    return np.random.default_rng([seed, step]).choice(size, size=batch_size, replace=size < batch_size)


def _batch(dataset: Dataset, indices: np.ndarray, device: torch.device) -> dict[str, Any]:
    """Collate the items at `indices` and move their tensors to `device`."""
    return _to_device(default_collate([dataset[int(index)] for index in indices]), device)


def _to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor inside (dicts, lists, tuples) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_device(item, device) for item in value)
    return value


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """Move the EMA parameters and floating-point buffers towards the model's; copy integer buffers.

    The decay is warmed up as min(decay, (1 + step) / (10 + step)), as in diffusers' EMAModel, so that short
    runs are not dominated by the initial weights.
    """
    weight = 1.0 - min(decay, (1.0 + step) / (10.0 + step))
    averaged, current = [], []
    for ema_tensor, tensor in zip(itertools.chain(ema.parameters(), ema.buffers()),
                                  itertools.chain(model.parameters(), model.buffers()), strict=True):
        if ema_tensor.is_floating_point():
            averaged.append(ema_tensor)
            current.append(tensor.detach())
        else:
            ema_tensor.copy_(tensor)
    if averaged:
        torch._foreach_lerp_(averaged, current, weight)


def _flush(pending: list[tuple[int, torch.Tensor, float, torch.Tensor, float]], history: dict[str, list]) -> None:
    """Append the pending step rows to `history`, reading their device values back in one go."""
    if not pending:
        return
    steps, losses, lrs, norms, seconds = zip(*pending, strict=True)
    history["step"].extend(steps)
    history["loss"].extend(torch.stack(losses).tolist())
    history["lr"].extend(lrs)
    history["grad_norm"].extend(torch.stack(norms).tolist())
    history["seconds"].extend(seconds)
    history["val_loss"].extend([math.nan] * len(pending))
    pending.clear()


@torch.no_grad()
def _validation_loss(model: torch.nn.Module, loss_fn: LossFn, dataset: Dataset, settings: TrainSettings,
                     device: torch.device, autocast: dict[str, Any]) -> float:
    """Mean loss of `model` over the whole of `dataset`, in order, with the same randomness every time."""
    generator = torch.Generator(device).manual_seed(derived_seed(settings.seed, "val"))
    total = torch.zeros((), device=device)
    for start in range(0, len(dataset), settings.batch_size):
        indices = np.arange(start, min(start + settings.batch_size, len(dataset)))
        with torch.autocast(**autocast):
            total += loss_fn(model, _batch(dataset, indices, device), generator).float() * len(indices)
    return total.item() / len(dataset)


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_fingerprint(stored: Mapping[str, Any], given: Mapping[str, Any], checkpoint: Path) -> None:
    """Raise CheckpointMismatch, naming the differing keys, unless the two fingerprints are equal."""
    if stored == given:
        return
    old, new = _flatten(stored), _flatten(given)
    absent = "<absent>"
    differences = [f"{key}: {old.get(key, absent)!r} in the checkpoint, {new.get(key, absent)!r} now"
                   for key in sorted(set(old) | set(new)) if old.get(key, absent) != new.get(key, absent)]
    raise CheckpointMismatch(
        f"{checkpoint} was written by a different run ({'; '.join(differences)}); "
        f"remove the folder {checkpoint.parent} to start over"
    )


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write the training state atomically, so a kill leaves either the previous checkpoint or this one."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


MODEL_FORMAT = 2
"""Version of the model file layout written by save_model; load_model refuses any other."""


class ModelFileError(ValueError):
    """A model file that is missing, unreadable, of another format version, altered, or made for other settings."""


@dataclass(frozen=True)
class SavedModel:
    """What a model file holds: weights, the hyper-parameters to rebuild the model, what it was trained on
    (`meta`: plain data, e.g. the patch geometry and HU window), and for latent runs the VAE it decodes with."""

    state_dict: dict[str, torch.Tensor]
    hparams: dict[str, Any]
    meta: dict[str, Any]
    vae: SavedModel | None = None

    @property
    def sha256(self) -> str:
        return weights_digest(self.state_dict)


def weights_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _record(model: SavedModel) -> dict[str, Any]:
    return {"hparams": model.hparams, "meta": model.meta, "state_dict": model.state_dict, "sha256": model.sha256}


def save_model(path: str | os.PathLike[str], model: torch.nn.Module, hparams: dict[str, Any],
               history: pd.DataFrame | None = None, meta: dict[str, Any] | None = None,
               vae: SavedModel | None = None) -> None:
    """Save the weights (on CPU) with the hyper-parameters needed to rebuild the model, atomically.

    The file (format MODEL_FORMAT) also holds `meta` (plain data: what the model was trained on), a SHA-256 of
    the weights, and `vae` (a latent run's VAE, so that the file alone is enough to forecast). With `history`,
    also write `<path without suffix>.metrics.csv` and `<path without suffix>.loss.png` beside it. In a
    data-parallel process group only the main worker writes.
    """
    if not distributed.is_main():
        return
    json.dumps([hparams, meta])  # fail now, not when loading, if these are not plain data
    path = Path(path)
    if history is not None:
        stem = path.with_suffix("")
        write_csv(history, stem.with_name(f"{stem.name}.metrics.csv"))
        _plot_history(history, stem.with_name(f"{stem.name}.loss.png"))
    saved = SavedModel({key: value.detach().cpu() for key, value in model.state_dict().items()}, hparams, meta or {})
    with atomic_path(path) as tmp:
        torch.save({"format": MODEL_FORMAT, **_record(saved), "vae": None if vae is None else _record(vae)}, tmp)


def _checked(record: Any, path: Path, what: str) -> SavedModel:
    """A stored model record as a SavedModel, after checking its layout and its weights' checksum."""
    if not isinstance(record, dict) or not {"hparams", "meta", "state_dict", "sha256"} <= set(record):
        raise ModelFileError(f"{path}: the {what} record is incomplete")
    model = SavedModel(record["state_dict"], record["hparams"], record["meta"])
    if model.sha256 != record["sha256"]:
        raise ModelFileError(f"{path}: the {what} weights were altered or damaged (SHA-256 {model.sha256[:12]}..., "
                             f"the file records {str(record['sha256'])[:12]}...)")
    return model


def read_model(path: str | os.PathLike[str]) -> SavedModel:
    """Everything save_model wrote, loaded on CPU without running any pickled code, checked against its
    format version and checksums (ModelFileError otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    try:
        stored = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # torch raises many types for damaged or non-torch files
        raise ModelFileError(f"{path}: not a readable model file ({type(error).__name__}: {error})") from error
    found = stored.get("format", "1 (no version)") if isinstance(stored, dict) else type(stored).__name__
    if found != MODEL_FORMAT:
        raise ModelFileError(f"{path}: model file format {found}, this version of noduleflow reads format "
                             f"{MODEL_FORMAT}; train the model again")
    model = _checked(stored, path, "model")
    vae = None if stored.get("vae") is None else _checked(stored["vae"], path, "VAE")
    return dataclasses.replace(model, vae=vae)


def load_model(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The (state_dict, hparams) written by save_model (read_model checks the file)."""
    saved = read_model(path)
    return saved.state_dict, saved.hparams


def _plot_history(history: pd.DataFrame, path: Path) -> None:
    """Training loss (raw and smoothed) and validation loss against the step, on a log axis."""
    figure = Figure(figsize=(6.4, 4.0))
    axis = figure.subplots()
    window = max(1, len(history) // 50)
    axis.plot(history["step"], history["loss"], color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    axis.plot(history["step"], history["loss"].rolling(window, min_periods=1).mean(), color="tab:blue",
              label=f"loss (mean of {window})")
    if "val_loss" in history and history["val_loss"].notna().any():
        validated = history.dropna(subset=["val_loss"])
        axis.plot(validated["step"], validated["val_loss"], "o-", color="tab:orange", label="val_loss")
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
