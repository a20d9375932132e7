"""The exams manifest: read, validate, resolve image paths and read each image's header (seed step 1).

A manifest has one row per image series. Required columns are listed in REQUIRED_COLUMNS; `pixel_spacing`
and `split` are optional (a provided split wins over the computed one). Relative image paths are relative to
the manifest's own folder. A missing required column fails at once; a bad row is reported and skipped.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from noduleflow.ids import is_safe_id
from noduleflow.imaging import Geometry, ImageHeaderError, read_geometry
from noduleflow.io import check_input_size
from noduleflow.limits import MAX_ABS_DAYS, MAX_PIXEL_MM, MAX_SLICE_MM, MAX_TIMEPOINT, integer, number
from noduleflow.problems import ProblemLog

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = [
    "pid",
    "exam_id",
    "screen_timepoint",
    "days_since_baseline",
    "series_uid",
    "slice_thickness",
    "image_path",
]
OPTIONAL_COLUMNS = ["pixel_spacing", "split"]
SPLITS = ("train", "val", "test")
SPACING_TOLERANCE = 0.1  # relative disagreement between a manifest spacing and the image header that is reported


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (unreadable, or a required column is missing)."""


def read_manifest(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a CSV or parquet manifest with id columns as strings; fail at once on a missing column."""
    path = Path(path)
    string_columns = {"pid": str, "exam_id": str, "series_uid": str, "image_path": str, "split": str}
    if path.suffix not in {".parquet", ".csv", ".tsv"}:
        raise ManifestError(f"{path}: manifest must be .csv, .tsv or .parquet")
    try:
        check_input_size(path)
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", dtype=string_columns)
    except pd.errors.EmptyDataError as error:
        raise ManifestError(f"{path}: the manifest file is empty (no header, no rows)") from error
    except Exception as error:  # pandas and pyarrow raise many types for damaged files
        raise ManifestError(f"{path}: cannot read manifest ({type(error).__name__}: {error})") from error
    missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise ManifestError(
            f"{path}: manifest is missing required column(s) {', '.join(missing)}; "
            f"required: {', '.join(REQUIRED_COLUMNS)}"
        )
    if frame.empty:
        raise ManifestError(f"{path}: the manifest has a header but no rows")
    for column in ("pid", "exam_id", "series_uid"):
        if pd.api.types.is_integer_dtype(frame[column]):
            frame[column] = frame[column].astype(str)
    return frame


def _row_problem(row) -> str | None:
    """Why a manifest row cannot be used (ids already checked), or None; numbers must be finite and plausible."""
    for column in ("image_path", "series_uid"):
        value = getattr(row, column)
        if not isinstance(value, str) or not value.strip():
            return f"{column} is empty"
        if any(ord(c) < 32 for c in value):
            return f"{column} {value!r} contains control characters"
    checks = [
        ("screen_timepoint", lambda v: integer(v, "screen_timepoint", 0, MAX_TIMEPOINT)),
        ("days_since_baseline", lambda v: number(v, "days_since_baseline", -MAX_ABS_DAYS, MAX_ABS_DAYS)),
        ("slice_thickness", lambda v: number(v, "slice_thickness (mm)", 0.0, MAX_SLICE_MM, low_open=True)),
    ]
    if "pixel_spacing" in row._fields and not pd.isna(row.pixel_spacing):
        checks.append(("pixel_spacing", lambda v: number(v, "pixel_spacing (mm)", 0.0, MAX_PIXEL_MM, low_open=True)))
    for column, check in checks:
        try:
            check(getattr(row, column))
        except ValueError as error:
            return str(error)
    return None


def _numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(frame[column], errors="coerce").astype("float64")


def _validate_rows(frame: pd.DataFrame, problems: ProblemLog) -> pd.DataFrame:
    """Drop rows with unsafe ids, missing or implausible values, conflicting duplicate exam ids, and patients whose
    dates contradict their timepoint order."""
    keep = []
    for row in frame.itertuples(index=False):
        ids = {"pid": row.pid, "exam_id": row.exam_id}
        unsafe = [name for name, value in ids.items() if not is_safe_id(value)]
        if unsafe:
            problems.add(
                f"unsafe {' and '.join(unsafe)} (allowed: letters, digits, '.', '_', '-'; no leading dot, no '..')",
                pid=str(row.pid), exam_id=str(row.exam_id),
            )
            keep.append(False)
            continue
        reason = _row_problem(row)
        if reason:
            problems.add(reason, pid=row.pid, exam_id=row.exam_id)
        keep.append(reason is None)
    frame = frame.loc[keep].copy()
    frame["screen_timepoint"] = _numeric(frame, "screen_timepoint").astype("int64")
    for column in ("days_since_baseline", "slice_thickness"):
        frame[column] = _numeric(frame, column)

    # Duplicated exam ids: identical rows collapse to one; conflicting rows are all rejected.
    columns = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in frame.columns]
    frame = frame.sort_values(columns, kind="stable")
    duplicated = frame["exam_id"].duplicated(keep=False)
    keep_mask = ~duplicated
    for exam_id, group in frame[duplicated].groupby("exam_id", sort=True):
        distinct = group[columns].astype(str).drop_duplicates()
        if len(distinct) == 1:
            problems.add(
                f"exam listed {len(group)} times with identical values; one row kept",
                severity="repaired", pid=group["pid"].iloc[0], exam_id=exam_id,
            )
            keep_mask[group.index[0]] = True
        else:
            problems.add(
                f"exam listed {len(group)} times with conflicting values; all rows rejected",
                pid=group["pid"].iloc[0], exam_id=exam_id,
            )
    return _check_timelines(frame[keep_mask], problems)


def _check_timelines(frame: pd.DataFrame, problems: ProblemLog) -> pd.DataFrame:
    """Reject patients whose dates contradict their timepoints: a later timepoint on the same or an earlier day,
    or two series of one timepoint on different days."""
    by_timepoint = frame.groupby(["pid", "screen_timepoint"], sort=True)["days_since_baseline"]
    spread = by_timepoint.agg(lambda d: d.max() - d.min())
    first = by_timepoint.min().groupby(level="pid").diff()
    bad_pids = {*spread[spread > 0].index.get_level_values("pid"), *first[first <= 0].index.get_level_values("pid")}
    for pid in sorted(bad_pids):
        rows = frame[frame["pid"] == pid].sort_values(["screen_timepoint", "days_since_baseline"], kind="stable")
        dates = ", ".join(f"timepoint {t}: day {d:g}"
                          for t, d in zip(rows["screen_timepoint"], rows["days_since_baseline"], strict=True))
        problems.add(f"dates contradict the timepoint order ({dates}); the patient's {len(rows)} series rejected",
                     pid=pid)
    return frame[~frame["pid"].isin(bad_pids)]


def _check_shared_images(frame: pd.DataFrame, problems: ProblemLog) -> pd.DataFrame:
    """Reject every row whose image (same file, or same series UID) is also given under another exam."""
    real = frame["image_path"].map(os.path.realpath)
    shared = pd.Series(False, index=frame.index)
    for key, label in ((real, "image file"), (frame["series_uid"], "series UID")):
        exams = frame.groupby(key)["exam_id"].transform("nunique")
        new = (exams > 1) & ~shared  # each rejected row reported once
        for value, group in frame[new].groupby(key[new], sort=True):
            owners = ", ".join(f"{p}/{e}" for p, e in zip(group["pid"], group["exam_id"], strict=True))
            for row in group.itertuples(index=False):
                problems.add(f"the same {label} {value} is given under {len(group)} exams ({owners}); all rejected",
                             pid=row.pid, exam_id=row.exam_id)
        shared |= exams > 1
    return frame[~shared]


def resolve_image_path(image_path: str, manifest_dir: Path) -> str:
    """Image path as the pipeline will use it: relative paths are taken from the manifest's folder."""
    return os.path.normpath(image_path if os.path.isabs(image_path) else manifest_dir / image_path)


def _header(path: str) -> Geometry | str:
    """The image geometry, or the reason it cannot be used."""
    if not os.path.exists(path):
        return f"image file not found: {path}"
    if not path.endswith((".nii", ".nii.gz")):
        return f"not a NIfTI file (expected .nii or .nii.gz): {path}"
    try:
        return read_geometry(path)
    except ImageHeaderError as error:
        return f"unreadable image {path}: {error}"


def build_exam_series(manifest_path: str | os.PathLike[str], threads: int = 1) -> tuple[pd.DataFrame, ProblemLog]:
    """Validated series table (one row per usable series, with its image geometry) and the problems found."""
    problems = ProblemLog("manifest")
    frame = _validate_rows(read_manifest(manifest_path), problems)
    manifest_dir = Path(manifest_path).parent
    frame["image_path"] = [resolve_image_path(p, manifest_dir) for p in frame["image_path"]]
    frame = _check_shared_images(frame, problems)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        headers = list(pool.map(_header, frame["image_path"]))
    usable = []
    for (pid, exam_id), header in zip(frame[["pid", "exam_id"]].itertuples(index=False), headers, strict=True):
        if isinstance(header, str):
            problems.add(header, pid=pid, exam_id=exam_id)
        usable.append(not isinstance(header, str))
    frame = frame[usable].copy()
    geometries = [h for h in headers if not isinstance(h, str)]
    frame["shape"] = [list(g.shape) for g in geometries]
    frame["spacing"] = [list(g.spacing) for g in geometries]
    frame["origin"] = [list(g.origin) for g in geometries]
    frame["direction"] = [list(g.direction) for g in geometries]
    frame["num_slices"] = np.array([g.shape[2] for g in geometries], dtype="int64")
    if "split" in frame.columns:
        provided = frame["split"].where(frame["split"].isin(SPLITS))
        for row in frame[frame["split"].notna() & provided.isna()].itertuples(index=False):
            problems.add(f"unknown split {row.split!r} ignored; the split is computed", severity="repaired",
                         pid=row.pid, exam_id=row.exam_id)
        frame["split"] = provided.astype("string")
    else:
        frame["split"] = pd.Series(pd.NA, index=frame.index, dtype="string")
    _check_against_headers(frame, problems)
    columns = REQUIRED_COLUMNS + ["pixel_spacing", "split", "num_slices", "shape", "spacing", "origin", "direction"]
    frame = frame[columns].sort_values(["pid", "screen_timepoint", "exam_id"], kind="stable").reset_index(drop=True)
    for column in ("pid", "exam_id", "series_uid", "image_path"):
        frame[column] = frame[column].astype("string")
    log.info("manifest: %d usable series, %d problems", len(frame), len(problems.problems))
    return frame, problems


def _check_against_headers(frame: pd.DataFrame, problems: ProblemLog) -> None:
    """Make the manifest's spacings agree with the image headers (in place); the header wins and is reported.

    A slice thickness below the header's slice spacing by more than SPACING_TOLERANCE is contradicted by the image
    (the series is coarser than the manifest says, and series selection would prefer it wrongly): it is raised to
    the spacing. A thickness above 3x the spacing is kept with a warning (thick slices reconstructed with
    overlap). A manifest pixel spacing that differs from the header's by more than SPACING_TOLERANCE is replaced.
    """
    header_slice = np.array([s[2] for s in frame["spacing"]], dtype="float64")
    header_pixel = np.array([s[0] for s in frame["spacing"]], dtype="float64")
    if "pixel_spacing" not in frame.columns:
        frame["pixel_spacing"] = np.nan
    frame["pixel_spacing"] = _numeric(frame, "pixel_spacing")
    for position, row in enumerate(frame.itertuples(index=False)):
        ids = {"pid": row.pid, "exam_id": row.exam_id}
        slice_mm, pixel_mm = header_slice[position], header_pixel[position]
        if row.slice_thickness < slice_mm * (1 - SPACING_TOLERANCE):
            problems.add(f"slice_thickness {row.slice_thickness:g} mm is less than the image's slice spacing "
                         f"{slice_mm:.4g} mm; the spacing is used", severity="repaired", **ids)
            frame.iloc[position, frame.columns.get_loc("slice_thickness")] = slice_mm
        elif row.slice_thickness > 3 * slice_mm:
            problems.add(f"slice_thickness {row.slice_thickness:g} mm is more than 3x the image's slice spacing "
                         f"{slice_mm:.4g} mm", severity="warning", **ids)
        if not pd.isna(row.pixel_spacing) and abs(row.pixel_spacing - pixel_mm) > SPACING_TOLERANCE * pixel_mm:
            problems.add(f"pixel_spacing {row.pixel_spacing:g} mm contradicts the image header's {pixel_mm:.4g} mm; "
                         f"the header's is used", severity="repaired", **ids)
            frame.iloc[position, frame.columns.get_loc("pixel_spacing")] = np.nan
    frame["pixel_spacing"] = frame["pixel_spacing"].fillna(pd.Series(header_pixel, index=frame.index))


def exam_to_nifti(series: pd.DataFrame) -> dict[str, str]:
    """exam_id -> NIfTI path for every usable series."""
    return {str(e): str(p) for e, p in zip(series["exam_id"], series["image_path"], strict=True)}
