"""Forecast a new patient: one exam, its nodules, one or more intervals, a trained run (a portable model file).

An exam is a NIfTI file or a DICOM folder (converted by noduleflow.metadata.dicom, as the pipeline converts it).
A nodule
is given by a box or a centre, in voxel indices or in world millimetres:

- voxel box (i0, i1, j0, j1, k0, k1), inclusive, i = row (y), j = column (x), k = slice (z), as everywhere in
  noduleflow; voxel centre (i, j, k);
- world box (x0, x1, y0, y1, z0, z1) and world centre (x, y, z) in LPS millimetres (DICOM patient coordinates,
  what ITK uses; 3D Slicer shows RAS, i.e. x and y negated). A centre gets a cube of `diameter_mm` as its box.

The patch is cut as the patch cache cuts it (noduleflow.cache.patches), on the exam's own grid resampled to the run's
patch spacing (a single exam needs no registration), and the run samples the follow-up with the seeds
evaluate_run uses for the same pair index, so a test pair forecast here equals its evaluation forecast. Every
forecast patch is written as NIfTI on the patch grid in the exam's space (it overlays the exam in 3D Slicer or
ITK-SNAP), with the N samples (4D), their voxel-wise median, a PNG card and one CSV row per nodule and interval.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch

from noduleflow import distributed, figures
from noduleflow.cache.patches import PatchSettings, box_in_patch, cut_patch, patch_grid, patch_start
from noduleflow.evaluation.forecast import (
    ForecastSettings,
    Segmenter,
    as_volumes,
    forecast_batch,
    forecast_size,
    load_run,
    voxel_size,
)
from noduleflow.hu import to_hu
from noduleflow.ids import is_safe_id
from noduleflow.imaging import Geometry, ImageHeaderError, read_image, write_nifti
from noduleflow.io import write_csv
from noduleflow.metadata.dicom import DicomSeriesError, convert_series, is_scout, read_headers
from noduleflow.models.flow import VelocityNet
from noduleflow.models.growth import sample_level
from noduleflow.models.settings import RunSettings
from noduleflow.models.tasks import load_vae
from noduleflow.models.training import ModelFileError, derived_seed, read_model
from noduleflow.registration.boxes import map_box, registered_grid
from noduleflow.settings import from_config

log = logging.getLogger(__name__)

MAX_INTERVAL_DAYS = 3652.5  # ten years
QUANTILES = (0.1, 0.5, 0.9)
CSV_COLUMNS = ["name", "image", "days", "samples", "dims", "unit", "prior_size", "prior_forecast_size", "size_q10",
               "size_q50", "size_q90", "centre_x_mm", "centre_y_mm", "centre_z_mm", "median", "samples_file", "prior",
               "card", "error"]


class ForecastInputError(ValueError):
    """An exam, nodule or interval that cannot be forecast (the message names the input and the problem)."""


@dataclass
class PortableRun:
    """A trained run ready to forecast: the network, its settings, the patch it was trained on, its VAE."""

    path: Path
    net: VelocityNet
    run: RunSettings
    patch: PatchSettings
    sampler: dict[str, Any]
    seed: int
    vae: torch.nn.Module | None
    device: torch.device

    @property
    def dims(self) -> int:
        return 2 if self.run.space == "slices" else 3


def load_portable_run(path: str | os.PathLike[str], expected_patch: dict[str, Any] | None = None,
                      device: torch.device | None = None) -> PortableRun:
    """A run's model file, checked (read_model: format, checksums) and, with `expected_patch` (a `patch` config),
    refused if it was trained on another patch geometry or HU window (ModelFileError naming what differs)."""
    saved = read_model(path)
    device = device or distributed.device()
    if "run" not in saved.hparams or "patch" not in saved.meta:
        raise ModelFileError(f"{path}: not a paired forecasting run (no run settings or patch geometry)")
    patch = saved.meta["patch"]
    differences = [f"{key} {patch[key]} in the model, {list(expected_patch[key])} expected"
                   for key in patch if expected_patch is not None and list(expected_patch[key]) != patch[key]]
    net, run = load_run(saved, device)
    if run.space == "latent":
        if saved.vae is None:
            raise ModelFileError(f"{path}: a latent run without its VAE")
        vae_patch = saved.vae.meta.get("patch")
        differences += [f"VAE {key} {vae_patch[key]}, run {patch[key]}" for key in patch
                        if vae_patch is not None and vae_patch[key] != patch[key]]
    if differences:
        raise ModelFileError(f"{path}: trained for another patch: {'; '.join(differences)}")
    vae = None if saved.vae is None else load_vae(saved.vae).to(device)
    # a model file records the patch geometry and HU window; a forecast cuts its patch in memory, as float32
    return PortableRun(Path(path), net, run, from_config(PatchSettings, patch, dtype="float32"), saved.meta["sampler"],
                       int(saved.meta["seed"]), vae, device)


@dataclass(frozen=True)
class NoduleRequest:
    """One nodule of one exam and the intervals to forecast (see the module docstring for the conventions)."""

    name: str
    image: str  # NIfTI file or DICOM folder
    days: tuple[float, ...]
    box: tuple[float, ...] | None = None
    centre: tuple[float, ...] | None = None
    world: bool = False  # box/centre in LPS mm instead of voxel indices
    diameter_mm: float = 10.0  # box edge around a centre
    series_uid: str | None = None  # the series of a DICOM folder holding several

    def __post_init__(self) -> None:
        if not is_safe_id(self.name):
            raise ForecastInputError(f"nodule name {self.name!r} is not a safe file name")
        if (self.box is None) == (self.centre is None):
            raise ForecastInputError(f"{self.name}: give either a box or a centre")
        values = self.box if self.box is not None else self.centre
        if len(values) != (6 if self.box is not None else 3) or not np.all(np.isfinite(values)):
            raise ForecastInputError(f"{self.name}: a box has 6 finite values, a centre 3, not {list(values)}")
        if not self.days:
            raise ForecastInputError(f"{self.name}: no interval given")
        for days in self.days:
            if not 0 < days <= MAX_INTERVAL_DAYS:
                raise ForecastInputError(f"{self.name}: interval of {days:g} days is outside (0, {MAX_INTERVAL_DAYS:g}]"
                                         f" (more than zero, at most ten years)")
        if self.centre is not None and not self.diameter_mm > 0:
            raise ForecastInputError(f"{self.name}: diameter_mm must be positive, not {self.diameter_mm:g}")


def read_exam(path: str | os.PathLike[str], series_uid: str | None = None) -> sitk.Image:
    """An exam as a SimpleITK image: a NIfTI file, or a DICOM folder converted as the pipeline converts it."""
    path = Path(path)
    if not path.exists():
        raise ForecastInputError(f"{path}: exam image not found")
    try:
        if not path.is_dir():
            return read_image(path)
        if series_uid is None:
            groups, _ = read_headers(path)  # unparseable files fail the conversion of their series, naming them
            series = sorted(uid for uid, headers in groups.items() if not all(is_scout(h) for h in headers))
            if len(series) != 1:
                raise ForecastInputError(f"{path}: {len(series)} image series ({', '.join(series) or 'none'}); "
                                         f"name one with series_uid")
            series_uid = series[0]
        with tempfile.TemporaryDirectory() as folder:
            converted = Path(folder) / "exam.nii.gz"
            convert_series(path, series_uid, converted)
            return read_image(converted)
    except (ImageHeaderError, DicomSeriesError) as error:
        raise ForecastInputError(f"{path}: {error}") from error


def voxel_box(request: NoduleRequest, geometry: Geometry) -> tuple[list[int], list[float]]:
    """The nodule's box (i0, i1, j0, j1, k0, k1) and centre (i, j, k) in the exam's voxels; ForecastInputError if
    the box does not lie wholly inside the image."""
    to_index = np.linalg.inv(geometry.matrix()) if request.world else np.eye(4)
    if request.box is not None:
        values = np.asarray(request.box, dtype=float)
        if request.world:  # the 8 corners of the world box, in continuous (x, y, z) indices
            corners = np.array(np.meshgrid(*values.reshape(3, 2), indexing="ij")).reshape(3, -1)
            xyz = (to_index @ np.vstack([corners, np.ones(8)]))[:3]
            low, high = xyz.min(axis=1), xyz.max(axis=1)
        else:
            (i0, i1), (j0, j1), (k0, k1) = values.reshape(3, 2)
            low, high = np.array([j0, i0, k0]), np.array([j1, i1, k1])
        low, high = np.rint(low).astype(int), np.rint(high).astype(int)
    else:
        centre = np.asarray(request.centre, dtype=float)
        xyz = (to_index @ np.r_[centre, 1.0])[:3] if request.world else centre[[1, 0, 2]]
        half = request.diameter_mm / 2 / np.asarray(geometry.spacing)
        low, high = np.ceil(xyz - half).astype(int), np.floor(xyz + half).astype(int)
        high = np.maximum(high, low)
    box = [int(low[1]), int(high[1]), int(low[0]), int(high[0]), int(low[2]), int(high[2])]
    if (low > high).any() or (low < 0).any() or (high > np.asarray(geometry.shape) - 1).any():
        raise ForecastInputError(f"{request.name}: box {box} (i0, i1, j0, j1, k0, k1) is not inside the image "
                                 f"{request.image} of {list(geometry.shape)} voxels (x, y, z)")
    return box, [(box[0] + box[1]) / 2, (box[2] + box[3]) / 2, (box[4] + box[5]) / 2]


@dataclass
class Prior:
    """The prior patch of one nodule in the run's space, with its grid in the exam's space."""

    image: np.ndarray  # (Z, Y, X) in [-1, 1]; Z = 1 for slice runs
    box: list[int]  # the nodule box in the patch
    grid: Geometry  # the patch grid in the exam's space (LPS)


def image_geometry(image: sitk.Image) -> Geometry:
    """The grid of a SimpleITK image."""
    return Geometry(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                    tuple(image.GetDirection()))


def cut_prior(image: sitk.Image, box: Sequence[int], centre: Sequence[float], run: PortableRun) -> Prior:
    """The prior patch as the cache cuts it: the exam's grid at the patch spacing stands in for registered space."""
    geometry = image_geometry(image)
    grid = registered_grid(geometry, run.patch.spacing_mm)
    grid_box, _, _ = map_box(box, centre, geometry, np.eye(4), grid)
    start, cropped = patch_start(grid_box, run.patch.size)
    if cropped:
        log.warning("the nodule box %s is larger than the patch; it is cut", box)
    patch = cut_patch(image, grid, start, np.eye(4), run.patch).astype(np.float32)
    in_patch = box_in_patch(grid_box, start, run.patch.size)
    patch_geometry = patch_grid(grid, start, run.patch)
    if run.dims == 3:
        return Prior(patch, in_patch, patch_geometry)
    centre_z = (in_patch[4] + in_patch[5]) // 2  # the cache's slice: the axial slice through the box centre
    origin = np.asarray(patch_geometry.matrix() @ [0.0, 0.0, centre_z, 1.0])[:3]
    return Prior(patch[centre_z:centre_z + 1], [*in_patch[:4], 0, 0],
                 Geometry((*patch_geometry.shape[:2], 1), patch_geometry.spacing, tuple(float(v) for v in origin),
                          patch_geometry.direction))


@torch.no_grad()
def sample_forecasts(run: PortableRun, prior: Prior, days: float, item: int, samples: int,
                     settings: ForecastSettings) -> np.ndarray:
    """`samples` forecasts (N, Z, Y, X) in [-1, 1] of one prior, drawn with evaluate_run's seeds for pair `item`."""
    tensor = torch.from_numpy(prior.image if run.dims == 3 else prior.image[0])[None, None].to(run.device)
    if run.vae is not None:
        tensor = run.vae.encode(tensor)[0]  # the encoder mean, as the latent cache holds
    samples = samples if run.run.random_forecasts else 1
    out = []
    for start in range(0, samples, settings.batch_size):
        chosen = range(start, min(start + settings.batch_size, samples))
        seeds = [derived_seed(settings.seed, "forecast", item, s) for s in chosen]
        priors = tensor.expand(len(seeds), *tensor.shape[1:])
        delta = torch.full((len(seeds),), float(days), device=run.device)
        generated = forecast_batch(run.net, run.run, priors, delta, seeds, [sample_level(s, samples) for s in chosen],
                                   settings)
        out.append(as_volumes(run.vae.decode(generated) if run.vae is not None else generated, run.dims == 2))
    return np.concatenate(out)


@dataclass
class ForecastJob:
    """How to forecast: samples per nodule and interval, the sampler and measurement settings, the segmenter."""

    samples: int
    settings: ForecastSettings
    segmenter: Segmenter


def _hu(image: np.ndarray, run: PortableRun) -> np.ndarray:
    return to_hu(image, run.patch.hu_window).astype(np.float32)


def forecast_nodule(run: PortableRun, image: sitk.Image, request: NoduleRequest, item: int, job: ForecastJob,
                    out_dir: Path) -> list[dict[str, Any]]:
    """Every interval of one nodule: NIfTI files, a card and a CSV row each (the rows are returned)."""
    geometry = image_geometry(image)
    box, centre = voxel_box(request, geometry)
    prior = cut_prior(image, box, centre, run)
    unit = "mm^2" if run.dims == 2 else "mm^3"
    voxel = voxel_size(run.patch, run.dims == 2)
    prior_size = float(job.segmenter(_hu(prior.image, run), prior.box).sum()) * voxel  # the prior in its own box
    world = geometry.matrix() @ [centre[1], centre[0], centre[2], 1.0]
    folder = out_dir / request.name
    write_nifti(_hu(prior.image, run), prior.grid, folder / "prior.nii.gz")
    rows = []
    for days in request.days:
        samples = sample_forecasts(run, prior, days, item, job.samples, job.settings)
        sizes = np.array([forecast_size(s, prior.box, days, run.patch, job.segmenter, job.settings) for s in samples])
        prior_forecast_size = forecast_size(prior.image, prior.box, days, run.patch, job.segmenter, job.settings)
        median = np.median(samples, axis=0)
        tag = f"{days:g}d"
        paths = {"median": folder / f"{tag}_median.nii.gz", "samples_file": folder / f"{tag}_samples.nii.gz",
                 "card": folder / f"{tag}_card.png"}
        write_nifti(_hu(median, run), prior.grid, paths["median"])
        write_nifti(_hu(samples, run), prior.grid, paths["samples_file"])
        spread = np.quantile(_hu(samples, run), 0.9, axis=0) - np.quantile(_hu(samples, run), 0.1, axis=0)
        figures.forecast_card(_hu(prior.image, run), _hu(median, run), spread, prior.box,
                              f"{request.name}: {days:g} days, {len(samples)} samples, "
                              f"{np.quantile(sizes, 0.5):.0f} {unit} (prior {prior_size:.0f})", paths["card"])
        q10, q50, q90 = np.quantile(sizes, QUANTILES)
        rows.append({"name": request.name, "image": str(request.image), "days": float(days), "samples": len(samples),
                     "dims": run.dims, "unit": unit, "prior_size": prior_size,
                     "prior_forecast_size": prior_forecast_size, "size_q10": q10, "size_q50": q50,
                     "size_q90": q90, "centre_x_mm": world[0], "centre_y_mm": world[1], "centre_z_mm": world[2],
                     "prior": str(folder / "prior.nii.gz"), **{k: str(v) for k, v in paths.items()}, "error": ""})
    return rows


def forecast_requests(run: PortableRun, requests: Sequence[NoduleRequest | ForecastInputError], job: ForecastJob,
                      out_dir: str | os.PathLike[str], table_path: str | os.PathLike[str]) -> pd.DataFrame:
    """Forecast every request (nodule `n` draws evaluate_run's seeds of pair `n`) into `out_dir/<name>/`; write
    the table (CSV_COLUMNS, one row per nodule and interval) to `table_path` and return it.

    Consecutive requests of one exam read it once. A bad request (or one read_requests could not parse) gets a
    row with its error, and the others go on; a progress line is logged after each nodule.
    """
    out_dir = Path(out_dir)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    images: dict[tuple[str, str | None], sitk.Image | ForecastInputError] = {}
    for item, request in enumerate(requests):
        if isinstance(request, ForecastInputError):
            log.error("%s", request)
            rows.append({"name": "", "error": str(request)})
            continue
        key = (request.image, request.series_uid)
        try:
            if key not in images:
                images.clear()  # one exam in memory at a time; requests of one exam come together in a table
                try:
                    images[key] = read_exam(request.image, request.series_uid)
                except ForecastInputError as error:
                    images[key] = error
            if isinstance(images[key], ForecastInputError):
                raise images[key]
            rows += forecast_nodule(run, images[key], request, item, job, out_dir)
        except ForecastInputError as error:
            log.error("%s: %s", request.name, error)
            rows.append({"name": request.name, "image": str(request.image), "error": str(error)})
        elapsed = time.perf_counter() - started
        log.info("forecast %d/%d nodules (%s), %.1f s, about %.0f s left", item + 1, len(requests), request.name,
                 elapsed, elapsed / (item + 1) * (len(requests) - item - 1))
    table = pd.DataFrame(rows, columns=CSV_COLUMNS)
    write_csv(table, table_path)
    return table


def _numbers(value: Any, name: str, row: str) -> tuple[float, ...] | None:
    """A table cell of space-separated numbers (None when empty)."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        return None
    try:
        return tuple(float(v) for v in str(value).replace(",", " ").split())
    except ValueError as error:
        raise ForecastInputError(f"{row}: {name} {value!r} is not a list of numbers") from error


def read_requests(path: str | os.PathLike[str]) -> list[NoduleRequest | ForecastInputError]:
    """The nodules of a table (CSV): name, image (relative to the table's folder), days, box or centre
    (space-separated numbers), optional space (voxel or world), diameter_mm, series_uid. A bad row becomes its
    error."""
    path = Path(path)
    if not path.is_file():
        raise ForecastInputError(f"{path}: nodule table not found")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"name", "image", "days"} - set(table.columns)
    if missing:
        raise ForecastInputError(f"{path}: missing column(s) {sorted(missing)}")
    out: list[NoduleRequest | ForecastInputError] = []
    for number, row in enumerate(table.to_dict("records"), start=1):
        where = f"{path} row {number}"
        try:
            space = row.get("space", "") or "voxel"
            if space not in ("voxel", "world"):
                raise ForecastInputError(f"{where}: space {space!r} is neither voxel nor world")
            image = Path(row["image"])
            out.append(NoduleRequest(
                name=row["name"], image=str(image if image.is_absolute() else path.parent / image),
                days=_numbers(row["days"], "days", where) or (), box=_numbers(row.get("box"), "box", where),
                centre=_numbers(row.get("centre"), "centre", where), world=space == "world",
                diameter_mm=(_numbers(row.get("diameter_mm"), "diameter_mm", where) or (10.0,))[0],
                series_uid=row.get("series_uid") or None))
        except ForecastInputError as error:
            out.append(ForecastInputError(f"{where}: {error}"))
    return out


def forecast_table(*, model: str, table: str, out_dir: str, table_path: str, patch: dict[str, Any],
                   segmenter: Segmenter, settings: ForecastSettings, samples: int) -> None:
    """The `forecast` target: every nodule of `table` forecast by the run in `model`, which must have been trained
    on the `patch` config, measured with `segmenter` (rule forecast_patients)."""
    run = load_portable_run(model, expected_patch=patch)
    forecast_requests(run, read_requests(table), ForecastJob(samples, settings, segmenter), out_dir, table_path)
