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


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (unreadable, or a required column is missing)."""


def read_manifest(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a CSV or parquet manifest with id columns as strings; fail at once on a missing column."""
    path = Path(path)
    string_columns = {"pid": str, "exam_id": str, "series_uid": str, "image_path": str, "split": str}
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif path.suffix in {".csv", ".tsv"}:
        frame = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", dtype=string_columns)
    else:
        raise ManifestError(f"{path}: manifest must be .csv, .tsv or .parquet")
    missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise ManifestError(
            f"{path}: manifest is missing required column(s) {', '.join(missing)}; "
            f"required: {', '.join(REQUIRED_COLUMNS)}"
        )
    for column in ("pid", "exam_id", "series_uid"):
        if pd.api.types.is_integer_dtype(frame[column]):
            frame[column] = frame[column].astype(str)
    return frame


def _validate_rows(frame: pd.DataFrame, problems: ProblemLog) -> pd.DataFrame:
    """Drop rows with unsafe ids, missing or non-numeric values, and conflicting duplicate exam ids."""
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
        reason = None
        timepoint = pd.to_numeric(row.screen_timepoint, errors="coerce")
        days = pd.to_numeric(row.days_since_baseline, errors="coerce")
        thickness = pd.to_numeric(row.slice_thickness, errors="coerce")
        if not isinstance(row.image_path, str) or not row.image_path:
            reason = "image_path is empty"
        elif not isinstance(row.series_uid, str) or not row.series_uid:
            reason = "series_uid is empty"
        elif pd.isna(timepoint) or timepoint < 0 or timepoint != int(timepoint):
            reason = f"screen_timepoint {row.screen_timepoint!r} is not a non-negative integer"
        elif pd.isna(days):
            reason = f"days_since_baseline {row.days_since_baseline!r} is not a number"
        elif pd.isna(thickness) or thickness <= 0:
            reason = f"slice_thickness {row.slice_thickness!r} is not a positive number"
        if reason:
            problems.add(reason, pid=row.pid, exam_id=row.exam_id)
        keep.append(reason is None)
    frame = frame.loc[keep].copy()
    frame["screen_timepoint"] = frame["screen_timepoint"].astype("int64")
    frame["days_since_baseline"] = pd.to_numeric(frame["days_since_baseline"]).astype("float64")
    frame["slice_thickness"] = pd.to_numeric(frame["slice_thickness"]).astype("float64")

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
    return frame[keep_mask]


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
    if "pixel_spacing" not in frame.columns:
        frame["pixel_spacing"] = [s[0] for s in frame["spacing"]]
    frame["pixel_spacing"] = pd.to_numeric(frame["pixel_spacing"], errors="coerce").astype("float64")
    columns = REQUIRED_COLUMNS + ["pixel_spacing", "split", "num_slices", "shape", "spacing", "origin", "direction"]
    frame = frame[columns].sort_values(["pid", "screen_timepoint", "exam_id"], kind="stable").reset_index(drop=True)
    for column in ("pid", "exam_id", "series_uid", "image_path"):
        frame[column] = frame[column].astype("string")
    log.info("manifest: %d usable series, %d problems", len(frame), len(problems.problems))
    return frame, problems


def exam_to_nifti(series: pd.DataFrame) -> dict[str, str]:
    """exam_id -> NIfTI path for every usable series."""
    return {str(e): str(p) for e, p in zip(series["exam_id"], series["image_path"], strict=True)}
