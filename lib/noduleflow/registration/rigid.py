"""Rigid registration of follow-up exams to the patient's baseline exam, and its quality check (seed steps 2-8).

Transforms follow ITK's registration convention: with the baseline as fixed image, a transform maps a
physical point of the baseline to the same anatomy in the follow-up ("fixed_to_moving", stored as the 3x4
matrix [A | b], row-major). Precomputed transforms (see `plan`) are reused instead of being recomputed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from noduleflow.figures import registration_figure
from noduleflow.imaging import Geometry, geometry_columns, homogeneous, read_image, write_nifti
from noduleflow.io import atomic_path
from noduleflow.plan import ShardExam, transform_file
from noduleflow.registration.boxes import registered_grid

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class RegistrationSettings:
    """How follow-ups are registered: config `registration.method`, plus `registration.threads` and the seed."""

    resample_mm: float  # both images are block-averaged and resampled to this isotropic spacing first
    search_mm: float  # spacing of the translation search that starts the optimisation
    search_min_overlap: float  # the search ignores shifts overlapping less than this fraction of the body
    search_starts: int  # at most this many distinct shifts of the search are tried as starts ...
    search_tolerance: float  # ... those whose correlation is within this of the best one's
    shrink_factors: tuple[int, ...]
    smoothing_sigmas_mm: tuple[float, ...]
    iterations: int
    histogram_bins: int
    sampling_fraction: tuple[float, ...]  # per level: the coarse one needs many samples to turn far
    body_threshold_hu: float
    threads: int  # ITK threads; more is faster, but multi-threaded metric sums differ in the last bits
    seed: int

    def __post_init__(self) -> None:
        levels = {len(self.shrink_factors), len(self.smoothing_sigmas_mm), len(self.sampling_fraction)}
        if len(levels) != 1:
            raise ValueError(f"registration: shrink_factors, smoothing_sigmas_mm and sampling_fraction need one value "
                             f"per pyramid level each, got {self.shrink_factors}, {self.smoothing_sigmas_mm} and "
                             f"{self.sampling_fraction}")


def _downsample(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Anti-aliased resampling to an isotropic grid inside the same physical extent (float32, same axes).

    Voxels are averaged in blocks of about `spacing_mm` (the anti-aliasing, cheap on a full-size CT), then
    linearly resampled.
    """
    factors = [max(1, round(spacing_mm / s)) for s in image.GetSpacing()]
    image = sitk.Cast(sitk.BinShrink(image, factors), sitk.sitkFloat32)  # averaging first: 4x less to cast
    size = [max(2, int((n - 1) * s / spacing_mm) + 1) for n, s in zip(image.GetSize(), image.GetSpacing(),
                                                                     strict=True)]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), [spacing_mm] * 3,
                         image.GetDirection(), -1024.0, sitk.sitkFloat32)


# 4-connected within a slice, not across slices
_IN_SLICE = np.pad(ndimage.generate_binary_structure(2, 1)[None], ((1, 1), (0, 0), (0, 0)))


def body_mask(image: sitk.Image, threshold_hu: float) -> sitk.Image:
    """The patient's body: the largest connected component above the threshold, lungs filled in slice by slice.

    The table and the air around the patient are left out, so that the table, which stays still while the
    patient moves, does not pull the registration.
    """
    above = ndimage.binary_opening(sitk.GetArrayViewFromImage(image) > threshold_hu, iterations=1)
    labels, count = ndimage.label(above)
    body = np.zeros(above.shape, dtype=bool)
    if count:
        largest = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
        # filled slice by slice (no connection along z), as the lungs may touch the first or last slice
        body = ndimage.binary_fill_holes(largest, structure=_IN_SLICE)
    mask = sitk.GetImageFromArray(body.astype(np.uint8))
    mask.CopyInformation(image)
    return mask


def _ncc(fixed: np.ndarray, moving: np.ndarray, inside: np.ndarray) -> float:
    """Normalised cross-correlation of two arrays inside a mask (0 when the mask is empty)."""
    a = fixed[inside].astype(np.float64)
    b = moving[inside].astype(np.float64)
    a -= a.mean() if a.size else 0.0
    b -= b.mean() if b.size else 0.0
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def transform_to_matrix(transform: sitk.Transform) -> np.ndarray:
    """4x4 matrix of a linear SimpleITK transform (fixed physical point -> moving physical point)."""
    out = np.eye(4)
    for column, axis in enumerate(np.eye(3)):
        origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
        out[:3, column] = np.asarray(transform.TransformPoint(tuple(axis))) - origin
    out[:3, 3] = transform.TransformPoint((0.0, 0.0, 0.0))
    return out


def matrix_to_transform(matrix: np.ndarray) -> sitk.AffineTransform:
    """SimpleITK affine transform from a 4x4 matrix."""
    return sitk.AffineTransform(np.asarray(matrix)[:3, :3].ravel().tolist(), np.asarray(matrix)[:3, 3].tolist())


def _domain(image: sitk.Image, margin_voxels: int = 0) -> sitk.Image:
    """A uint8 image of ones on the image's grid, zero within `margin_voxels` of its border."""
    size = [max(1, n - 2 * margin_voxels) for n in image.GetSize()]
    ones = sitk.Image(size, sitk.sitkUInt8) + 1
    domain = sitk.ConstantPad(ones, [margin_voxels] * 3, [n - m - margin_voxels for n, m in
                                                          zip(image.GetSize(), size, strict=True)], 0)
    domain.CopyInformation(image)
    return domain


def _seen(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, margin_voxels: int = 0) -> np.ndarray:
    """Which fixed voxels the transform maps inside the moving exam ([z, y, x] boolean array)."""
    domain = _domain(moving, margin_voxels)
    return sitk.GetArrayFromImage(sitk.Resample(domain, fixed, transform, sitk.sitkNearestNeighbor, 0)) > 0


def _shift_candidates(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, moving_mask: sitk.Image,
                      settings: RegistrationSettings) -> list[np.ndarray]:
    """Translations (fixed -> moving, mm) that best line up the bodies, best first.

    The masked normalised cross-correlation (Padfield 2012, ITK's MaskedFFTNormalizedCorrelation) of both
    images at `search_mm`, over every shift whose body overlap is at least `search_min_overlap`, so that exams
    covering different parts of the chest are compared only where both see the patient. Peaks closer than
    30 mm to a better one, or with a correlation more than `search_tolerance` below the best, are skipped.
    """
    factor = max(1, int(round(settings.search_mm / settings.resample_mm)))
    images = [sitk.BinShrink(image, [factor] * 3) for image in (fixed, moving)]
    masks = [sitk.Cast(sitk.BinShrink(sitk.Cast(mask, sitk.sitkFloat32), [factor] * 3) > 0.5, sitk.sitkFloat32)
             for mask in (fixed_mask, moving_mask)]
    origin_shift = np.asarray(images[1].GetOrigin()) - np.asarray(images[0].GetOrigin())
    for image in (images[1], masks[1]):  # ITK wants both on one origin; the shift is added back below
        image.SetOrigin(images[0].GetOrigin())
    correlation = sitk.GetArrayFromImage(sitk.MaskedFFTNormalizedCorrelation(
        images[0], images[1], masks[0], masks[1], 0, settings.search_min_overlap))
    peaks = correlation == ndimage.maximum_filter(correlation, size=5)
    order = np.argsort(correlation[peaks])[::-1]
    spacing = np.asarray(images[0].GetSpacing())
    axes = np.reshape(images[0].GetDirection(), (3, 3))
    candidates: list[np.ndarray] = []
    values = correlation[peaks][order]
    for index, value in zip(np.argwhere(peaks)[order][:, ::-1], values, strict=True):
        if value < values[0] - settings.search_tolerance:
            break
        # correlation voxel `index` pairs fixed voxel i with moving voxel i - (index - (moving size - 1))
        voxels = (np.asarray(images[1].GetSize()) - 1) - index
        shift = origin_shift + axes @ (voxels * spacing)
        log.debug("search: shift %s mm, correlation %.3f", np.round(shift, 1).tolist(), value)
        if all(np.linalg.norm(shift - other) > 30.0 for other in candidates):
            candidates.append(shift)
        if len(candidates) == settings.search_starts:
            break
    return candidates


def _rigid_start(fixed: sitk.Image, moving: sitk.Image, fixed_body: sitk.Image,
                 shift: np.ndarray) -> tuple[sitk.VersorRigid3DTransform, sitk.Image]:
    """A translation as a versor-rigid start, and the metric's fixed mask: the body voxels that it maps inside
    the moving exam (10 mm in from its border), whose centre is the rotation centre."""
    translation = sitk.TranslationTransform(3, shift.tolist())
    margin = int(math.ceil(10.0 / fixed.GetSpacing()[0]))
    inside = sitk.GetArrayViewFromImage(fixed_body).astype(bool) & _seen(fixed, moving, translation, margin)
    if not inside.any():
        raise ValueError("the exams do not overlap at the start of the optimisation")
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.CopyInformation(fixed_body)
    start = sitk.VersorRigid3DTransform()
    start.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint(np.argwhere(inside).mean(axis=0)[::-1].tolist()))
    start.SetTranslation(shift.tolist())
    return start, mask


def _rigid_register(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, moving_mask: sitk.Image,
                    start: sitk.Transform, levels: slice,
                    settings: RegistrationSettings) -> tuple[sitk.Transform, float]:
    """Versor-rigid registration with Mattes mutual information over some levels of the pyramid.

    Returns the transform and the final metric (lower is better).
    """
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentagePerLevel(list(settings.sampling_fraction[levels]), settings.seed)
    method.SetMetricFixedMask(fixed_mask)
    method.SetMetricMovingMask(moving_mask)
    method.SetMetricUseFixedImageGradientFilter(False)  # gradients at the samples only, not of whole images
    method.SetMetricUseMovingImageGradientFilter(False)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-2, numberOfIterations=settings.iterations, relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(settings.shrink_factors[levels]))
    method.SetSmoothingSigmasPerLevel(list(settings.smoothing_sigmas_mm[levels]))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(sitk.VersorRigid3DTransform(start), inPlace=False)
    transform = method.Execute(fixed, moving)
    log.debug("levels %s: %d iterations in the last, metric %.4f, %s", levels, method.GetOptimizerIteration(),
              method.GetMetricValue(), method.GetOptimizerStopConditionDescription())
    return transform, float(method.GetMetricValue())


def _register(fixed: sitk.Image, moving: sitk.Image, fixed_body: sitk.Image, moving_body: sitk.Image,
              settings: RegistrationSettings) -> tuple[sitk.Transform, float]:
    """Search the translation, run the first pyramid level from each start, refine the best one.

    Starts are compared by the body similarity where both exams overlap (their metric values are not
    comparable: each start has its own overlap mask).
    """
    starts = _shift_candidates(fixed, moving, fixed_body, moving_body, settings)
    if not starts:
        raise ValueError(f"no shift overlaps the bodies by {settings.search_min_overlap:.0%} or more")
    body = sitk.GetArrayViewFromImage(fixed_body).astype(bool)
    best = None
    for shift in starts:
        start, mask = _rigid_start(fixed, moving, fixed_body, shift)
        transform, metric = _rigid_register(fixed, moving, mask, moving_body, start, slice(0, 1), settings)
        score = _similarity(fixed, body, moving, transform)[1] if len(starts) > 1 else 0.0
        if best is None or score > best[3]:
            best = (transform, mask, metric, score)
    transform, mask, metric, _ = best
    if len(settings.shrink_factors) > 1:
        rigid = sitk.VersorRigid3DTransform(sitk.CompositeTransform(transform).GetNthTransform(0))
        transform, metric = _rigid_register(fixed, moving, mask, moving_body, rigid, slice(1, None), settings)
    return transform, metric


def _rotation_deg(matrix: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(matrix[:3, :3]) - 1.0) / 2.0, -1.0, 1.0))))


def _geometry_of(image: sitk.Image) -> Geometry:
    return Geometry(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                    tuple(image.GetDirection()))


def _similarity(fixed: sitk.Image, fixed_body: np.ndarray, moving: sitk.Image,
                transform: sitk.Transform) -> tuple[float, float, float]:
    """Overlap and similarity of fixed and moving through a transform, where both exams see the patient.

    Returns the fraction of the fixed body that the transform maps inside the moving exam, and the normalised
    cross-correlation inside the body and inside the lungs (below -400 HU) on that overlap only, so that a
    follow-up covering less of the chest is not mistaken for a bad registration.
    """
    fixed_array = sitk.GetArrayViewFromImage(fixed)
    moved = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, -1024.0))
    body = fixed_body & _seen(fixed, moving, transform)
    overlap = float(body.sum() / fixed_body.sum()) if fixed_body.any() else 0.0
    return overlap, _ncc(fixed_array, moved, body), _ncc(fixed_array, moved, body & (fixed_array < -400))


def register_exam(fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings,
                  precomputed: sitk.Transform | None = None) -> dict[str, Any]:
    """Register `moving` to `fixed` (or evaluate a precomputed transform) and measure its quality.

    A translation search over the whole plausible range proposes `search_starts` starts; the first pyramid
    level runs from each, and the best is refined on the others. Returns the fixed -> moving matrix and QC
    numbers: the final metric, the rotation and translation of the transform, the overlap of the two exams
    and the normalised cross-correlation of fixed and moving inside the fixed body and lungs, where both
    exams see the patient, before (identity) and after registration.
    """
    fixed_small = _downsample(fixed, settings.resample_mm)
    moving_small = _downsample(moving, settings.resample_mm)
    fixed_body = body_mask(fixed_small, settings.body_threshold_hu)
    moving_body = body_mask(moving_small, settings.body_threshold_hu)
    metric = math.nan
    if precomputed is None:
        transform, metric = _register(fixed_small, moving_small, fixed_body, moving_body, settings)
    else:
        transform = precomputed
    matrix = transform_to_matrix(transform)
    body = sitk.GetArrayViewFromImage(fixed_body).astype(bool)
    _, body_before, lung_before = _similarity(fixed_small, body, moving_small, sitk.Transform())
    overlap, body_after, lung_after = _similarity(fixed_small, body, moving_small, transform)
    return {
        "fixed_to_moving": matrix[:3, :].ravel().tolist(),
        "metric": metric,
        "rotation_deg": _rotation_deg(matrix),
        "translation_mm": float(np.linalg.norm(matrix[:3, 3])),
        "overlap": overlap,
        "body_ncc_before": body_before,
        "body_ncc_after": body_after,
        "lung_ncc_before": lung_before,
        "lung_ncc_after": lung_after,
    }


def _load_precomputed(exam: ShardExam) -> sitk.Transform:
    """A stored transform as fixed -> moving, inverted when the file maps the other way round; a transform that is
    not a finite rigid map (a damaged or foreign file) is refused, naming the file."""
    try:
        matrix = transform_to_matrix(sitk.ReadTransform(exam.precomputed))
    except RuntimeError as error:  # ITK's message says what it could not parse, not in which file
        raise ValueError(f"precomputed transform {exam.precomputed} is not a finite rigid transform: "
                         f"unreadable ({str(error).strip().splitlines()[-1][:200]})") from error
    rotation = matrix[:3, :3]
    if not np.all(np.isfinite(matrix)) or not np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-3) \
            or np.linalg.det(rotation) <= 0:
        raise ValueError(f"precomputed transform {exam.precomputed} is not a finite rigid transform")
    return matrix_to_transform(np.linalg.inv(matrix) if exam.precomputed_inverted else matrix)


SHARD_COLUMNS = [
    "exam_id", "pid", "fixed_exam_id", "is_fixed", "transform_source", "transform_file", "fixed_to_moving",
    "metric", "rotation_deg", "translation_mm", "overlap", "body_ncc_before", "body_ncc_after", "lung_ncc_before",
    "lung_ncc_after", "fixed_shape", "fixed_spacing", "fixed_origin", "fixed_direction", "original_shape",
    "original_spacing", "original_origin", "original_direction", "error", "runtime_s",
]


def register_shard(exams: list[ShardExam], settings: RegistrationSettings,
                   transform_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Register every exam of a shard to its baseline; one row per exam (baselines included, as identity).

    A failing exam gets its error in the `error` column and the others go on. Each baseline is read once.
    """
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(settings.threads)
    rows = []
    by_fixed: dict[str, list[ShardExam]] = {}
    for exam in sorted(exams, key=lambda e: (e.fixed_exam_id, e.exam_id)):
        by_fixed.setdefault(exam.fixed_exam_id, []).append(exam)
    for fixed_id, group in by_fixed.items():
        try:
            fixed = read_image(group[0].fixed_image_path)
            fixed_geometry, fixed_error = _geometry_of(fixed), None
        except Exception as error:  # any unreadable baseline: every exam of the patient is reported
            fixed, fixed_geometry, fixed_error = None, None, f"baseline {fixed_id} unusable: {error}"
        for exam in group:
            start = time.perf_counter()
            row: dict[str, Any] = {"exam_id": exam.exam_id, "pid": exam.pid, "fixed_exam_id": fixed_id,
                                   "is_fixed": exam.exam_id == fixed_id, "transform_source": "identity",
                                   "transform_file": None, "error": fixed_error}
            result: dict[str, Any] = {"fixed_to_moving": np.eye(4)[:3].ravel().tolist()}
            moving_geometry = fixed_geometry if row["is_fixed"] else None
            if fixed is not None and not row["is_fixed"]:
                try:
                    moving = read_image(exam.image_path)
                    moving_geometry = _geometry_of(moving)
                    precomputed = _load_precomputed(exam) if exam.precomputed else None
                    result = register_exam(fixed, moving, settings, precomputed)
                    path = transform_file(transform_dir, fixed_id, exam.exam_id)
                    with atomic_path(path) as tmp:
                        sitk.WriteTransform(matrix_to_transform(
                            homogeneous(result["fixed_to_moving"])), str(tmp))
                    row["transform_file"] = os.fspath(path)
                    row["transform_source"] = "precomputed" if precomputed else "registered"
                except Exception as error:
                    row["error"] = f"{type(error).__name__}: {error}"
                    log.warning("registration of %s to %s failed: %s", exam.exam_id, fixed_id, row["error"])
            row.update(result)
            for prefix, geometry in (("fixed", fixed_geometry), ("original", moving_geometry)):
                row.update(geometry_columns(prefix, geometry))
            row["runtime_s"] = time.perf_counter() - start
            rows.append(row)
            log.info("%s -> %s: %s", exam.exam_id, fixed_id,
                     row["error"] or {k: round(v, 3) for k, v in result.items() if k != "fixed_to_moving"})
    return pd.DataFrame(rows, columns=SHARD_COLUMNS)




@dataclass(frozen=True)
class QualityThresholds:
    """When a registration is flagged as bad (config `registration.qc`)."""

    min_lung_ncc: float  # lung similarity after registration (same patient ~0.85-0.95, another ~0.5)
    min_overlap: float  # fraction of the baseline's body that the registered follow-up covers
    max_ncc_drop: float  # registration may not make the lung similarity worse than no registration
    max_rotation_deg: float  # screening follow-ups differ by a few degrees
    max_translation_mm: float


def quality_reasons(row: Mapping[str, Any], thresholds: QualityThresholds) -> str | None:
    """Why a registered exam is implausible, or None when it passes."""
    if row["error"] is not None and not (isinstance(row["error"], float) and math.isnan(row["error"])):
        return f"registration failed: {row['error']}"
    if row["is_fixed"]:
        return None
    reasons = []
    if row["overlap"] < thresholds.min_overlap:
        reasons.append(f"the follow-up covers {row['overlap']:.0%} of the baseline's body "
                       f"< {thresholds.min_overlap:.0%}")
    if row["lung_ncc_after"] < thresholds.min_lung_ncc:
        reasons.append(f"lung similarity after registration {row['lung_ncc_after']:.3f} < {thresholds.min_lung_ncc}")
    if row["lung_ncc_after"] < row["lung_ncc_before"] - thresholds.max_ncc_drop:
        reasons.append(f"registration made the alignment worse (lung similarity {row['lung_ncc_before']:.3f} -> "
                       f"{row['lung_ncc_after']:.3f})")
    if row["rotation_deg"] > thresholds.max_rotation_deg:
        reasons.append(f"rotation {row['rotation_deg']:.1f} deg > {thresholds.max_rotation_deg}")
    if row["translation_mm"] > thresholds.max_translation_mm:
        reasons.append(f"translation {row['translation_mm']:.1f} mm > {thresholds.max_translation_mm}")
    return "; ".join(reasons) or None


def gather_registrations(exams: pd.DataFrame, shards: list[pd.DataFrame],
                         thresholds: QualityThresholds) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Join the split's exams with their registration rows and apply the quality check.

    Returns every exam with `qc_pass` and `qc_reason`, and the flagged ones (the bad-exams table). Runtimes
    stay in the shard tables, so the gathered table is the same whenever and however the shards ran.
    """
    registered = pd.concat([s for s in shards if not s.empty] or [pd.DataFrame(columns=SHARD_COLUMNS)],
                           ignore_index=True)
    frame = exams.merge(registered.drop(columns=["pid", "runtime_s"]), on="exam_id", how="left",
                        validate="one_to_one")
    missing = frame["fixed_exam_id"].isna()
    frame.loc[missing, "error"] = "no registration result (exam missing from its shard)"
    frame["is_fixed"] = frame["is_fixed"].astype("boolean").fillna(False).astype(bool)
    frame["qc_reason"] = [quality_reasons(row, thresholds) for row in frame.to_dict("records")]
    frame["qc_pass"] = frame["qc_reason"].isna()
    frame = frame.sort_values(["pid", "screen_timepoint"], kind="stable").reset_index(drop=True)
    bad = frame.loc[~frame["qc_pass"], ["pid", "exam_id", "fixed_exam_id", "screen_timepoint", "qc_reason"]]
    log.info("registration QC: %d exams, %d flagged", len(frame), len(bad))
    return frame, bad.rename(columns={"qc_reason": "reason"}).reset_index(drop=True)



def _resample(image: sitk.Image, grid: Geometry, fixed_to_moving: np.ndarray) -> np.ndarray:
    """`image` (a moving exam) on `grid` (in fixed space) through a fixed -> moving matrix, as an int16 array."""
    out = sitk.Resample(image, grid.reference_image(), matrix_to_transform(fixed_to_moving), sitk.sitkLinear,
                        -1024.0, sitk.sitkFloat32)
    return np.round(sitk.GetArrayFromImage(out)).astype(np.int16)


def write_registered_exams(exams: pd.DataFrame, nodules: pd.DataFrame, spacing: Sequence[float], count: int,
                           nifti_dir: str | os.PathLike[str], picture_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Write up to `count` follow-ups resampled into registered space, with a QC picture each (seed steps 5, 10-11).

    Flagged exams come first (they are the ones to look at), then the others by exam id. The picture shows the
    baseline, the follow-up before and after registration, on the axial slice through one of its nodules.
    Returns exam_id -> registered NIfTI path.
    """
    follow_ups = exams[~exams["is_fixed"] & exams["fixed_to_moving"].notna()]
    chosen = follow_ups.sort_values(["qc_pass", "exam_id"], kind="stable").head(count)
    Path(nifti_dir).mkdir(parents=True, exist_ok=True)
    Path(picture_dir).mkdir(parents=True, exist_ok=True)
    written = {}
    for exam in chosen.to_dict("records"):
        fixed_row = exams.set_index("exam_id").loc[exam["fixed_exam_id"]]
        fixed_geometry = Geometry.from_columns(exam, "fixed")
        grid = registered_grid(fixed_geometry, spacing)
        matrix = homogeneous(exam["fixed_to_moving"])
        moving = read_image(exam["image_path"])
        after = _resample(moving, grid, matrix)
        path = Path(nifti_dir) / f"{exam['exam_id']}.nii.gz"
        write_nifti(after, grid, path)
        written[exam["exam_id"]] = os.fspath(path)
        mine = nodules[(nodules["exam"] == exam["exam_id"]) & nodules["coords_fixed"].notna()]
        box = list(mine["coords_fixed"].iloc[0]) if len(mine) else None
        k = (box[4] + box[5]) // 2 if box else grid.shape[2] // 2
        panels = [("baseline", _resample(read_image(fixed_row["image_path"]), grid, np.eye(4))[k]),
                  ("follow-up, not registered", _resample(moving, grid, np.eye(4))[k]),
                  ("follow-up, registered", after[k])]
        verdict = "passed QC" if exam["qc_pass"] else f"FLAGGED: {exam['qc_reason']}"
        registration_figure(panels, box[:4] if box else None,
                            f"{exam['exam_id']} -> {exam['fixed_exam_id']} ({verdict})",
                            Path(picture_dir) / f"{exam['exam_id']}.png")
    log.info("wrote %d registered exams", len(written))
    return written
