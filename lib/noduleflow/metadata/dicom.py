"""DICOM series to NIfTI: one series of an exam folder as a 3D volume in HU on its LPS geometry.

Files under the folder are grouped by SeriesInstanceUID. Within the requested series, scouts are dropped:
images whose ImageType says LOCALIZER or SCOUT, and images whose slice normal lies more than 45 degrees from
the body axis (not axial). The rest is sorted by position along the slice normal (row cosines x column
cosines); the slice spacing comes from those positions, not from SliceThickness. Pixels become HU through
RescaleSlope and RescaleIntercept, slice by slice. Anything that would make the volume wrong raises
DicomSeriesError with the reason: a single image, a gap, a duplicate position, uneven spacing, a sheared
stack (gantry tilt), mixed orientations, sizes or spacings, missing, malformed or implausible geometry tags, a
DICOM file in the folder that cannot be parsed, an unusable rescale.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from noduleflow import limits
from noduleflow.ids import is_safe_id
from noduleflow.imaging import Geometry, write_nifti
from noduleflow.io import write_csv
from noduleflow.metadata.manifest import read_manifest, resolve_image_path
from noduleflow.problems import ProblemLog

log = logging.getLogger(__name__)

SCOUT_TYPES = {"LOCALIZER", "SCOUT"}
MIN_AXIAL_COSINE = np.cos(np.radians(45.0))  # |normal . body axis| below this: not an axial image
DUPLICATE_MM = 0.01  # slices closer than this along the normal share a position
GAP_FACTOR = 1.5  # a step this many times the median step means missing slices
GRID_TOLERANCE = 0.1  # fraction of the slice spacing a slice may sit off the regular grid (or off the normal)
_HEADER_TAGS = ["SeriesInstanceUID", "ImageType", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                "Rows", "Columns", "NumberOfFrames"]


class DicomSeriesError(ValueError):
    """A DICOM series that cannot become one regular 3D volume."""


@dataclass(frozen=True)
class SliceHeader:
    """The header fields of one image file that place it in the volume."""

    path: str
    image_type: tuple[str, ...]
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    size: tuple[int, int]  # rows, columns
    frames: int
    problem: str | None = None  # why this file cannot be part of a volume (malformed or implausible tags)


def _floats(value: object, name: str, count: int, low: float, high: float, *, low_open: bool = False
            ) -> tuple[float, ...] | None:
    """A multi-valued numeric tag as `count` finite floats in range (None if absent); ValueError naming the tag."""
    if value is None:
        return None
    values = [value] if isinstance(value, str | bytes | int | float) else list(value)  # type: ignore[call-overload]
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} value(s), expected {count}")
    return tuple(limits.number(v, name, low, high, low_open=low_open) for v in values)


def _slice_header(path: Path, ds: pydicom.Dataset) -> SliceHeader:
    """The placing tags of one file; a malformed or implausible tag is recorded as the header's problem."""
    types: tuple[str, ...] = ()
    try:
        image_type = ds.get("ImageType") or ()
        types = tuple(str(v).upper() for v in ([image_type] if isinstance(image_type, str) else image_type))
        return SliceHeader(
            path=str(path),
            image_type=types,
            position=_floats(ds.get("ImagePositionPatient"), "ImagePositionPatient", 3, -limits.MAX_POSITION_MM,
                             limits.MAX_POSITION_MM),
            orientation=_floats(ds.get("ImageOrientationPatient"), "ImageOrientationPatient", 6, -1.001, 1.001),
            pixel_spacing=_floats(ds.get("PixelSpacing"), "PixelSpacing", 2, 0.0, limits.MAX_PIXEL_MM,
                                  low_open=True),
            size=(limits.integer(ds.Rows, "Rows", 1, limits.MAX_VOXELS_PER_AXIS),
                  limits.integer(ds.Columns, "Columns", 1, limits.MAX_VOXELS_PER_AXIS)),
            frames=limits.integer(ds.get("NumberOfFrames") or 1, "NumberOfFrames", 1, limits.MAX_VOXELS_PER_AXIS),
        )
    except Exception as error:  # pydicom converts values lazily and raises many types for malformed ones
        return SliceHeader(str(path), types, None, None, None, (0, 0), 1,
                           problem=f"{path.name}: malformed geometry tags ({type(error).__name__}: "
                                   f"{str(error)[:200]})")


def _looks_like_dicom(path: Path) -> bool:
    """True if the file carries the DICOM Part 10 marker ('DICM' after the 128-byte preamble)."""
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def _claims_image(ds: pydicom.Dataset) -> bool:
    """True if the file meta says this file holds an image (CT Image Storage and the like)."""
    sop_class = getattr(ds, "file_meta", pydicom.Dataset()).get("MediaStorageSOPClassUID")
    return sop_class is not None and "Image Storage" in pydicom.uid.UID(str(sop_class)).name


def read_headers(folder: str | os.PathLike[str]) -> tuple[dict[str, list[SliceHeader]], list[str]]:
    """Image files under `folder` (recursively, in path order) grouped by SeriesInstanceUID, and the names of the
    DICOM files whose header cannot be parsed at all (unknown series: a caller must not ignore them).

    Files that are not DICOM, and DICOM files without an image (a DICOMDIR, a report), are skipped. A file with
    malformed placing tags, or without Rows while placed in space, keeps its place in its series with the problem
    recorded; converting that series then fails with the file's name.
    """
    series: dict[str, list[SliceHeader]] = {}
    skipped, unreadable = 0, []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            is_image = "SeriesInstanceUID" in ds and ("Rows" in ds or "ImagePositionPatient" in ds)
            uid = str(ds.SeriesInstanceUID) if is_image else None
            if uid is None and _claims_image(ds):  # an image storage file cut short
                unreadable.append(path.name)
        except Exception:  # not DICOM, or a header pydicom cannot parse (unknown VR, truncated, bad encoding)
            if _looks_like_dicom(path):
                unreadable.append(path.name)
            uid = None
        if uid is None:
            skipped += 1
            continue
        series.setdefault(uid, []).append(_slice_header(path, ds))
    if skipped:
        log.info("%s: %d file(s) without a readable DICOM image header skipped", folder, skipped)
    return series, unreadable


def _axes(orientation: tuple[float, ...]) -> np.ndarray:
    """3x3 matrix whose columns are the row direction, the column direction and the slice normal (LPS)."""
    row, column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    if not (np.isclose(np.linalg.norm(row), 1, atol=1e-3) and np.isclose(np.linalg.norm(column), 1, atol=1e-3)
            and abs(row @ column) < 1e-3):
        raise DicomSeriesError(f"ImageOrientationPatient {list(orientation)} is not two orthonormal directions")
    row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
    normal = np.cross(row, column)
    return np.column_stack([row, column, normal / np.linalg.norm(normal)])


def is_scout(header: SliceHeader) -> bool:
    """True for a localizer: so typed in ImageType, or not an axial image."""
    if SCOUT_TYPES & set(header.image_type):
        return True
    return header.orientation is not None and abs(_axes(header.orientation)[2, 2]) < MIN_AXIAL_COSINE


def _same(values: list, name: str) -> None:
    """Raise unless every slice has the same `name` (numbers compared to 1e-4)."""
    first = np.asarray(values[0], dtype=float)
    if any(not np.allclose(np.asarray(v, dtype=float), first, atol=1e-4) for v in values[1:]):
        raise DicomSeriesError(f"slices differ in {name} (e.g. {list(first)} and "
                               f"{next(list(v) for v in values if not np.allclose(v, first, atol=1e-4))})")


def stack_geometry(slices: list[SliceHeader]) -> tuple[list[SliceHeader], Geometry]:
    """The slices in volume order (ascending along the normal) and the volume's geometry; checks the stack."""
    if len(slices) < 2:
        raise DicomSeriesError(f"{len(slices)} axial image(s): a scout or a 2D image, not a volume")
    tags = {"position": "ImagePositionPatient", "orientation": "ImageOrientationPatient",
            "pixel_spacing": "PixelSpacing"}
    for name, tag in tags.items():
        lacking = [Path(s.path).name for s in slices if getattr(s, name) is None]
        if lacking:
            raise DicomSeriesError(f"{len(lacking)} slice(s) without {tag}, e.g. {lacking[0]}")
    if any(s.frames != 1 for s in slices):
        raise DicomSeriesError("multi-frame (enhanced) DICOM images are not supported")
    _same([s.orientation for s in slices], "ImageOrientationPatient")
    _same([s.size for s in slices], "size (rows, columns)")
    _same([s.pixel_spacing for s in slices], "PixelSpacing")

    axes = _axes(slices[0].orientation)
    positions = np.array([s.position for s in slices])
    along = positions @ axes[:, 2]
    order = np.argsort(along, kind="stable")
    slices, positions, along = [slices[i] for i in order], positions[order], along[order]
    steps = np.diff(along)
    duplicates = np.flatnonzero(steps < DUPLICATE_MM)
    if len(duplicates):
        first = duplicates[0]
        raise DicomSeriesError(
            f"{len(duplicates)} duplicate slice position(s), e.g. {along[first]:.3f} mm along the normal in "
            f"{Path(slices[first].path).name} and {Path(slices[first + 1].path).name}")
    step = float(np.median(steps))
    gaps = np.flatnonzero(steps > GAP_FACTOR * step)
    if len(gaps):
        missing = int(sum(round(steps[g] / step) - 1 for g in gaps))
        raise DicomSeriesError(
            f"gap: about {missing} slice(s) missing in {len(gaps)} place(s), e.g. between {along[gaps[0]]:.3f} and "
            f"{along[gaps[0] + 1]:.3f} mm along the normal (usual step {step:.3f} mm)")
    spacing = (along[-1] - along[0]) / (len(slices) - 1)
    off_grid = np.abs(along - (along[0] + spacing * np.arange(len(slices))))
    if off_grid.max() > GRID_TOLERANCE * spacing:
        raise DicomSeriesError(f"non-uniform slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm "
                               f"(a slice lies {off_grid.max():.3f} mm off the regular grid of {spacing:.3f} mm)")
    in_plane = np.abs((positions - positions[0]) @ axes[:, :2]).max()
    row_spacing, column_spacing = slices[0].pixel_spacing
    if in_plane > GRID_TOLERANCE * min(row_spacing, column_spacing):
        raise DicomSeriesError(f"slices shift {in_plane:.3f} mm within their plane along the stack (gantry tilt or "
                               f"sheared stack); resample it before conversion")
    rows, columns = slices[0].size
    geometry = Geometry(
        shape=(columns, rows, len(slices)),
        spacing=(column_spacing, row_spacing, float(spacing)),
        origin=tuple(float(v) for v in positions[0]),
        direction=tuple(float(v) for v in axes.ravel()),
    )
    return slices, geometry


def _hu(path: str) -> tuple[np.ndarray, float, float]:
    """One slice in HU (float32, exact for integer HU), with its rescale slope and intercept."""
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
    except Exception as error:  # pydicom raises many types for truncated or undecodable files
        raise DicomSeriesError(f"{Path(path).name}: cannot read pixel data ({type(error).__name__}: {error}); "
                               f"a compressed transfer syntax needs a decoder such as pylibjpeg") from error
    if not (np.isfinite(slope) and np.isfinite(intercept) and slope != 0):
        raise DicomSeriesError(f"{Path(path).name}: unusable RescaleSlope {slope} / RescaleIntercept {intercept}")
    return (pixels.astype(np.float64) * slope + intercept).astype(np.float32), slope, intercept


def read_series(folder: str | os.PathLike[str], series_uid: str) -> tuple[np.ndarray, Geometry]:
    """The series `series_uid` of `folder` as an array indexed [z, y, x] in HU and its geometry.

    The array is int16 when every slope and intercept is an integer and the HU fit, float32 otherwise.
    """
    groups, unreadable = read_headers(folder)
    if series_uid not in groups:
        found = ", ".join(f"{uid} ({len(files)} files)" for uid, files in sorted(groups.items())) or "no DICOM images"
        raise DicomSeriesError(f"series {series_uid} not found in {folder}; found: {found}")
    if unreadable:
        raise DicomSeriesError(f"{len(unreadable)} DICOM file(s) in the folder cannot be read, e.g. {unreadable[0]} "
                               f"(they may be slices of this series)")
    headers = [h for h in groups[series_uid] if not SCOUT_TYPES & set(h.image_type)]
    malformed = [h.problem for h in headers if h.problem]
    if malformed:
        raise DicomSeriesError(f"{len(malformed)} image(s) with malformed tags, e.g. {malformed[0]}")
    axial = [h for h in headers if not is_scout(h)]
    if len(axial) < len(groups[series_uid]):
        log.info("series %s: %d localizer or non-axial image(s) dropped", series_uid,
                 len(groups[series_uid]) - len(axial))
    slices, geometry = stack_geometry(axial)
    hu, slopes, intercepts = zip(*(_hu(s.path) for s in slices), strict=True)
    volume = np.stack(hu)
    if volume.shape[1:] != tuple(reversed(geometry.shape[:2])):
        raise DicomSeriesError(f"pixel data of shape {volume.shape[1:]} does not match Rows x Columns")
    integral = all(float(v).is_integer() for v in (*slopes, *intercepts))
    if integral and volume.min() >= np.iinfo(np.int16).min and volume.max() <= np.iinfo(np.int16).max:
        return np.rint(volume).astype(np.int16), geometry
    return volume, geometry


def convert_series(folder: str | os.PathLike[str], series_uid: str, path: str | os.PathLike[str]) -> Geometry:
    """Write series `series_uid` of `folder` as a NIfTI file (atomically) and return its geometry."""
    volume, geometry = read_series(folder, series_uid)
    write_nifti(volume, geometry, path)
    return geometry


def convert_manifest(manifest_path: str | os.PathLike[str], out_manifest: str | os.PathLike[str],
                     images_dir: str | os.PathLike[str], threads: int = 1) -> ProblemLog:
    """Convert every exam whose image_path is a folder to `images_dir/<exam_id>.nii.gz`; write the new manifest.

    Other rows keep their image (as an absolute path). Rows with an unsafe or conflicting exam id, or without a
    series UID, are passed on unconverted for the manifest checks to report; a series that cannot be converted
    is reported here and left out.
    """
    problems = ProblemLog("dicom")
    frame = read_manifest(manifest_path)
    manifest_dir = Path(manifest_path).parent
    resolved = [resolve_image_path(p, manifest_dir) if isinstance(p, str) and p else p for p in frame["image_path"]]
    frame["image_path"] = [os.path.abspath(p) if isinstance(p, str) else p for p in resolved]
    is_folder = frame["image_path"].map(lambda p: isinstance(p, str) and os.path.isdir(p))
    sources = frame[is_folder].groupby("exam_id")[["image_path", "series_uid"]].nunique(dropna=False)
    convertible = set(sources.index[(sources.max(axis=1) == 1)])
    jobs = frame[is_folder & frame["exam_id"].isin(convertible) & frame["exam_id"].map(is_safe_id)
                 & frame["series_uid"].map(lambda v: isinstance(v, str) and bool(v))]
    jobs = jobs.drop_duplicates("exam_id")
    targets = {exam_id: Path(images_dir) / f"{exam_id}.nii.gz" for exam_id in jobs["exam_id"]}
    Path(images_dir).mkdir(parents=True, exist_ok=True)

    def convert(row) -> str | None:
        try:
            convert_series(row.image_path, row.series_uid, targets[row.exam_id])
        except DicomSeriesError as error:
            return str(error)
        except Exception as error:  # the item boundary: one unexpected failure never sinks the other exams
            log.exception("exam %s: unexpected error while converting", row.exam_id)
            return f"unexpected {type(error).__name__}: {str(error)[:300]}"
        return None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        errors = list(pool.map(convert, jobs.itertuples(index=False)))
    failed = set()
    for row, error in zip(jobs.itertuples(index=False), errors, strict=True):
        if error:
            problems.add(f"DICOM series not converted: {error}", pid=row.pid, exam_id=row.exam_id)
            failed.add(row.exam_id)
    converted = frame["exam_id"].isin(set(targets) - failed) & is_folder
    relative = {exam_id: os.path.relpath(target, Path(out_manifest).parent) for exam_id, target in targets.items()}
    frame.loc[converted, "image_path"] = frame.loc[converted, "exam_id"].map(relative)
    frame = frame[~(frame["exam_id"].isin(failed) & is_folder)]
    log.info("dicom: %d series converted, %d failed, %d rows with NIfTI images", len(targets) - len(failed),
             len(failed), int((~is_folder).sum()))
    write_csv(frame, out_manifest)
    return problems
