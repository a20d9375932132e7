"""NLST metadata JSON -> exams manifest (the layout of the NLST cohort's `all_nlst.json`).

The JSON is a list of patient rows: `pid`, `pt_metadata` (each field a 1-element list, among them `scr_days0/1/2`),
`accessions` (exams with `screen_timepoint` and `image_series`: series UID -> `paths`, `slice_thickness`,
`pixel_spacing`, `series_data` with `imageclass` and `imagetype`). Every series is a candidate; filters run in
the order of FILTERS, each series counted under the first one that removes it. A kept series becomes a manifest
row whose image is the folder holding its DICOM files (converted by rule dicom_to_nifti). The JSON's `split` is
not used: splits are computed as for any manifest.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from noduleflow import limits
from noduleflow.ids import nlst_exam_id
from noduleflow.io import load_json, short_repr
from noduleflow.metadata.manifest import REQUIRED_COLUMNS
from noduleflow.metadata.tables import SeriesFilter, choose_series
from noduleflow.problems import ProblemLog

log = logging.getLogger(__name__)

FILTERS = [
    "malformed entry",
    "no screening date for the timepoint",
    "slice thickness missing or not positive",
    "slice thickness above the maximum",
    "localizer",
    "too few slices",
    "another series of the timepoint chosen",
]
LOCALIZER_TYPES = ("LOCALIZER", "TOP")


class NlstError(ValueError):
    """The NLST metadata file as a whole cannot be used."""


def _first(value: Any) -> Any:
    """A `pt_metadata` value: the single element of its list (or the value itself)."""
    return value[0] if isinstance(value, list | tuple) and value else value


def _number(value: Any) -> float | None:
    try:
        number = float(_first(value))
    except (TypeError, ValueError, OverflowError):
        return None
    return number if number == number else None  # NaN -> None


def _is_localizer(series_data: Mapping[str, Any]) -> bool:
    """NLST's localizer marks: image class 0, or LOCALIZER / TOP in the image type."""
    image_type = str(series_data.get("imagetype") or "").upper()
    return _number(series_data.get("imageclass")) == 0 or any(word in image_type for word in LOCALIZER_TYPES)


def _series_folder(paths: list[str], json_dir: Path) -> str:
    """The one folder that holds every file of a series (relative paths are taken from the JSON's folder)."""
    folders = {os.path.dirname(os.path.normpath(json_dir / p)) for p in paths}
    if len(folders) != 1:
        raise ValueError(f"series files lie in {len(folders)} folders, expected one")
    return os.path.abspath(folders.pop())


def _checked(value: Any, name: str, high: float) -> float | None:
    """A positive spacing in mm, None when missing (or not positive: a filter's case); ValueError if implausible."""
    number = _number(value)
    return None if number is None or number <= 0 else limits.number(number, name, 0.0, high, low_open=True)


def _series_row(pid: str, exam: Mapping[str, Any], uid: str, series: Mapping[str, Any],
                metadata: Mapping[str, Any], json_dir: Path) -> dict[str, Any]:
    """One candidate row, with the filter that removes it (or None); raises on malformed or implausible input."""
    timepoint = limits.integer(exam["screen_timepoint"], "screen_timepoint", 0, limits.MAX_TIMEPOINT)
    if not isinstance(series, Mapping):
        raise TypeError(f"series must be a dict, got {type(series).__name__}")
    paths = series["paths"]
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise ValueError("paths must be a non-empty list of file paths")
    if len(set(paths)) != len(paths):
        raise ValueError(f"paths list {len(paths) - len(set(paths))} file(s) twice")
    days = _number(metadata.get(f"scr_days{timepoint}"))
    if days is not None:
        days = limits.number(days, f"scr_days{timepoint}", -limits.MAX_ABS_DAYS, limits.MAX_ABS_DAYS)
    thickness = _checked(series.get("slice_thickness"), "slice_thickness (mm)", limits.MAX_SLICE_MM)
    pixel_spacing = _checked(series.get("pixel_spacing"), "pixel_spacing (mm)", limits.MAX_PIXEL_MM)
    row = {
        "pid": pid, "exam_id": nlst_exam_id(pid, timepoint, uid), "screen_timepoint": timepoint,
        "days_since_baseline": days, "series_uid": uid, "slice_thickness": thickness,
        "image_path": _series_folder(paths, json_dir), "pixel_spacing": pixel_spacing,
        "num_slices": len(paths), "localizer": _is_localizer(series.get("series_data") or {}),
    }
    if days is None or days < 0:
        row["removed_by"] = FILTERS[1]
    elif thickness is None or thickness <= 0:
        row["removed_by"] = FILTERS[2]
    else:
        row["removed_by"] = None
    return row


def candidate_series(patients: list[Any], json_dir: Path, problems: ProblemLog) -> tuple[pd.DataFrame, int]:
    """Every well-formed series of the JSON as a row, and the number of malformed entries (each reported)."""
    rows, malformed = [], 0
    pids = [str(p["pid"]) if isinstance(p, Mapping) and "pid" in p else None for p in patients]
    counts = Counter(pids)
    for index, patient in enumerate(patients):
        try:
            if not isinstance(patient, Mapping):
                raise TypeError(f"patient row must be a dict, got {type(patient).__name__}")
            pid = str(patient["pid"])
            if counts[pid] > 1:
                raise ValueError(f"pid {short_repr(pid)} has {counts[pid]} patient rows (e.g. as a number and as "
                                 f"text); all rejected")
            metadata = patient.get("pt_metadata") or {}
            exams = patient["accessions"]
            if not isinstance(exams, list):
                raise TypeError("accessions must be a list")
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            problems.add(f"malformed patient row: {type(error).__name__}: {error}", item=f"patient row {index}")
            malformed += 1
            continue
        for exam in exams:
            try:
                series_items = list(exam["image_series"].items())
            except (KeyError, TypeError, AttributeError) as error:
                problems.add(f"malformed exam: {type(error).__name__}: {error}", pid=pid)
                malformed += 1
                continue
            for uid, series in series_items:
                try:
                    rows.append(_series_row(pid, exam, str(uid), series, metadata, json_dir))
                except Exception as error:  # the item boundary: whatever a malformed series raises stays its own
                    problems.add(f"malformed series: {type(error).__name__}: {str(error)[:300]}", pid=pid,
                                 item=short_repr(str(uid)))
                    malformed += 1
    columns = [*REQUIRED_COLUMNS, "pixel_spacing", "num_slices", "localizer", "removed_by"]
    return pd.DataFrame(rows, columns=columns), malformed


def nlst_manifest(json_path: str | os.PathLike[str],
                  series_filter: SeriesFilter) -> tuple[pd.DataFrame, pd.DataFrame, ProblemLog]:
    """The exams manifest made from an NLST metadata JSON, the count of series each filter removed, the problems."""
    problems = ProblemLog("nlst")
    try:
        patients = load_json(json_path)
    except (OSError, ValueError) as error:
        raise NlstError(f"cannot read NLST metadata {json_path} ({type(error).__name__}: {error})") from error
    if not isinstance(patients, list):
        raise NlstError(f"{json_path}: expected a list of patient rows, got {type(patients).__name__}")
    if not patients:
        raise NlstError(f"{json_path}: the list of patient rows is empty")
    series, malformed = candidate_series(patients, Path(json_path).parent, problems)
    removed = {FILTERS[0]: malformed}
    too_thick, too_few = series_filter.rejects(series)
    pending = series["removed_by"].isna()
    for name, mask in [(FILTERS[3], too_thick), (FILTERS[4], series["localizer"]), (FILTERS[5], too_few)]:
        series.loc[pending & mask, "removed_by"] = name
        pending = series["removed_by"].isna()
    chosen = choose_series(series[pending])
    series.loc[pending & ~series.index.isin(chosen.index), "removed_by"] = FILTERS[6]
    counts_by_filter = series["removed_by"].value_counts()
    removed.update({name: int(counts_by_filter.get(name, 0)) for name in FILTERS[1:]})
    remaining = len(series) + malformed - pd.Series(removed).cumsum()
    counts = pd.DataFrame({"filter": ["input", *FILTERS], "removed": [0, *removed.values()],
                           "remaining": [len(series) + malformed, *remaining.to_numpy()]})
    manifest = chosen[[*REQUIRED_COLUMNS, "pixel_spacing"]].sort_values(["pid", "screen_timepoint", "exam_id"])
    log.info("nlst: %d series in %d patient rows, %d kept", len(series) + malformed, len(patients), len(manifest))
    return manifest.reset_index(drop=True), counts, problems
