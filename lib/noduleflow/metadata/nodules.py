"""Nodule tracking annotations: read the tracking file, validate it against the exams, flatten to a table.

The tracking file maps pid -> nodule_group -> exam_idx -> lesion dict (or is a list of (pid, nodules) pairs).
Box coordinates are `(i_min, i_max, j_min, j_max, k_min, k_max)` in the exam's voxel indices, inclusive,
with i = row (Y), j = column (X), k = slice (Z).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import torch

from noduleflow.io import check_input_size, check_nesting, load_plain_pickle, short_repr
from noduleflow.limits import MAX_INDEX, MAX_VOLUME_MM3, integer, number
from noduleflow.problems import ProblemLog

log = logging.getLogger(__name__)

LESION_KEYS = ("exam", "volume", "coords", "center")

TRACKING_SCHEMA = pa.schema(
    [
        ("pid", pa.string()),
        ("nodule_group", pa.int64()),
        ("exam_idx", pa.int64()),
        ("exam", pa.string()),
        ("nodid_in_segmentation", pa.float64()),
        ("volume", pa.float64()),
        ("abnid_in_nlst", pa.list_(pa.int64())),
        ("coords", pa.list_(pa.int64())),
        ("center_i", pa.int64()),
        ("center_j", pa.int64()),
        ("center_k", pa.int64()),
        ("centers_past_i", pa.float64()),
        ("centers_past_j", pa.float64()),
        ("centers_past_k", pa.float64()),
        ("coords_past", pa.list_(pa.int64())),
        ("abn_prexist", pa.bool_()),
        ("screen_detected", pa.bool_()),
    ]
)


class TrackingFileError(ValueError):
    """The tracking file as a whole cannot be read."""


def load_tracking(path: str | os.PathLike[str]) -> list[tuple[Any, Any]]:
    """Load a tracking file safely as (pid, nodules) pairs: `.pt` with torch's weights-only loader, pickles with
    a plain-data unpickler, both within the size and nesting limits of noduleflow.io. Entries are checked one
    by one in build_tracking_table; only a file that cannot be read, or holds neither a dict nor a list, fails."""
    path = Path(path)
    try:
        if path.suffix == ".pt":
            check_input_size(path)
            data = torch.load(path, weights_only=True)
            check_nesting(data)
        elif path.suffix in {".p", ".pkl", ".pickle"}:
            data = load_plain_pickle(path)
        else:
            raise TrackingFileError(f"{path}: tracking file must be .pt, .p, .pkl or .pickle")
    except TrackingFileError:
        raise
    except Exception as error:
        raise TrackingFileError(f"{path}: cannot read tracking file ({type(error).__name__}: "
                                f"{str(error)[:500]})") from error
    if isinstance(data, Mapping):
        return list(data.items())
    if isinstance(data, list | tuple):
        return list(data)
    raise TrackingFileError(
        f"{path}: expected a dict pid -> nodules or a list of (pid, nodules), got {type(data).__name__}")


def _patients(tracking: Mapping[Any, Any] | Iterable[Any], problems: ProblemLog) -> dict[str, Mapping[Any, Any]]:
    """pid (as text) -> nodule groups; malformed entries and pids given twice (as 7 and "7") are reported."""
    pairs = list(tracking.items()) if isinstance(tracking, Mapping) else list(tracking)
    patients: dict[str, Mapping[Any, Any]] = {}
    seen: dict[str, int] = {}
    for index, item in enumerate(pairs):
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[1], Mapping | type(None))):
            problems.add(f"entry {short_repr(item)} is not a (pid, nodules) pair", item=f"tracking entry {index}")
            continue
        if isinstance(item[0], bool) or not isinstance(item[0], str | int):
            problems.add(f"pid {short_repr(item[0])} is neither text nor an integer", item=f"tracking entry {index}")
            continue
        pid = str(item[0])
        seen[pid] = seen.get(pid, 0) + 1
        patients[pid] = item[1] or {}
    for pid, count in seen.items():
        if count > 1:
            problems.add(f"patient given {count} times in the tracking file (e.g. as a number and as text); "
                         f"all its entries rejected", pid=pid)
            del patients[pid]
    return patients


def _indices(value: Any, name: str, count: int | None = None, integral: bool = True) -> list[Any]:
    """A list of voxel indices (integers, or numbers if not `integral`, within +-MAX_INDEX), of `count` values if
    given."""
    if not isinstance(value, list | tuple):
        raise ValueError(f"{name} must be a list of numbers, got {type(value).__name__}")
    if count is not None and len(value) != count:
        raise ValueError(f"{name} must have {count} values, got {len(value)}")
    check = integer if integral else number
    return [check(v, name, -MAX_INDEX, MAX_INDEX) for v in value]


def _optional_list(value: Any) -> list[int] | None:
    return None if value is None else [int(v) for v in value]


def _lesion_row(pid: str, group: Any, exam_idx: Any, lesion: Any) -> dict[str, Any]:
    """One table row from one lesion dict; raises KeyError/ValueError/TypeError on malformed or implausible input."""
    if not isinstance(lesion, Mapping):
        raise TypeError(f"lesion must be a dict, got {type(lesion).__name__}")
    missing = [key for key in LESION_KEYS if key not in lesion]
    if missing:
        raise KeyError(f"lesion is missing key(s) {', '.join(missing)}")
    if not isinstance(lesion["exam"], str):
        raise TypeError(f"exam must be an exam id (text), got {type(lesion['exam']).__name__}")
    coords = _indices(lesion["coords"], "coords", 6)
    center = _indices(lesion["center"], "center", 3)
    if any(coords[2 * a] > coords[2 * a + 1] for a in range(3)):
        raise ValueError(f"malformed box {coords}: a minimum exceeds its maximum")
    past = lesion.get("centers_in_past_exam_ijk_space")
    past = [None] * 3 if past is None else _indices(past, "centers_in_past_exam_ijk_space", 3, integral=False)
    coords_past = lesion.get("coords_in_past_exam_ijk_space")
    abnid = lesion.get("abnid_in_nlst")
    if abnid is not None and not isinstance(abnid, list | tuple):
        abnid = [abnid]
    nodid = lesion.get("nodid_in_segmentation")
    return {
        "pid": pid,
        "nodule_group": integer(group, "nodule_group", 0, MAX_INDEX),
        "exam_idx": integer(exam_idx, "exam_idx", 0, MAX_INDEX),
        "exam": lesion["exam"],
        "nodid_in_segmentation": None if nodid is None else number(nodid, "nodid_in_segmentation", 0, MAX_INDEX),
        "volume": number(lesion["volume"], "volume (mm^3)", 0.0, MAX_VOLUME_MM3, low_open=True),
        "abnid_in_nlst": None if abnid is None else _indices(abnid, "abnid_in_nlst"),
        "coords": coords,
        "center_i": center[0],
        "center_j": center[1],
        "center_k": center[2],
        "centers_past_i": past[0],
        "centers_past_j": past[1],
        "centers_past_k": past[2],
        "coords_past": None if coords_past is None else _indices(coords_past, "coords_in_past_exam_ijk_space", 6),
        "abn_prexist": _flag(lesion.get("abn_prexist", False), "abn_prexist"),
        "screen_detected": _flag(lesion.get("screen_detected", True), "screen_detected"),
    }


def _flag(value: Any, name: str) -> bool:
    """A yes/no field: a bool, or 0/1."""
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} {short_repr(value)} is not true or false")


def _check_box(row: dict[str, Any], shape_xyz: list[int], problems: ProblemLog) -> bool:
    """Check the box against the exam's shape: clip a box that sticks out, reject one that is outside."""
    ids = {"pid": row["pid"], "exam_id": row["exam"], "nodule_group": row["nodule_group"], "exam_idx": row["exam_idx"]}
    coords = row["coords"]
    limits = [shape_xyz[1], shape_xyz[1], shape_xyz[0], shape_xyz[0], shape_xyz[2], shape_xyz[2]]  # i=Y, j=X, k=Z
    if any(coords[a + 1] < 0 or coords[a] > limits[a] - 1 for a in (0, 2, 4)):
        problems.add(f"box {coords} lies outside the volume (shape x, y, z = {shape_xyz})", **ids)
        return False
    clipped = [min(max(value, 0), limit - 1) for value, limit in zip(coords, limits, strict=True)]
    if clipped != coords:
        problems.add(f"box {coords} extends beyond the volume (shape x, y, z = {shape_xyz}); clipped to {clipped}",
                     severity="repaired", **ids)
        row["coords"] = clipped
    return True


def _problem_ids(pid: str, group: Any, exam_idx: Any) -> dict[str, Any]:
    """Problem fields of a lesion entry: group and exam index as integers, or (malformed) named in `item`."""
    ids: dict[str, Any] = {"pid": pid}
    odd = []
    for name, value in (("nodule_group", group), ("exam_idx", exam_idx)):
        try:
            ids[name] = integer(value, name, 0, MAX_INDEX)
        except ValueError:
            odd.append(f"{name}={short_repr(value)}")
    if odd:
        ids["item"] = ", ".join(odd)
    return ids


def _entries(groups: Any, name: str) -> list[tuple[Any, Any]]:
    """The (key, value) pairs of a nodule-group or exam-index level; TypeError if it is not a dict."""
    if groups is None:
        return []
    if not isinstance(groups, Mapping):
        raise TypeError(f"{name} must be a dict, got {type(groups).__name__}")
    return list(groups.items())


def _check_exam_order(frame: pd.DataFrame, days: Mapping[str, float], problems: ProblemLog) -> pd.DataFrame:
    """Drop nodules whose exam_idx order contradicts their exams' dates (later index, same or earlier date)."""
    if frame.empty:
        return frame
    frame = frame.assign(_days=frame["exam"].map(days))
    bad = frame.groupby(["pid", "nodule_group"], sort=False)["_days"].transform(lambda d: (d.diff() <= 0).any())
    for (pid, group), rows in frame[bad].groupby(["pid", "nodule_group"], sort=True):
        order = ", ".join(f"exam_idx {i}: day {d:g}" for i, d in zip(rows["exam_idx"], rows["_days"], strict=True))
        problems.add(f"exam_idx order contradicts the exam dates ({order}); the nodule's rows rejected",
                     pid=pid, nodule_group=int(group))
    return frame[~bad].drop(columns="_days").reset_index(drop=True)


def build_tracking_table(tracking: Mapping[Any, Any] | Iterable[Any],
                         series: pd.DataFrame) -> tuple[pd.DataFrame, ProblemLog]:
    """One row per nodule per exam; rows for unknown exams or with unusable boxes are reported and left out.

    `tracking` is the dict pid -> nodules, or the (pid, nodules) pairs load_tracking returns.
    """
    problems = ProblemLog("nodules")
    shapes = dict(zip(series["exam_id"].astype(str), series["shape"], strict=True))
    pids = dict(zip(series["exam_id"].astype(str), series["pid"].astype(str), strict=True))
    days = dict(zip(series["exam_id"].astype(str), series["days_since_baseline"].astype(float), strict=True))
    rows = []
    for pid, groups in _patients(tracking, problems).items():
        try:
            group_items = _entries(groups, "nodule groups")
        except TypeError as error:
            problems.add(f"malformed patient entry: {error}", pid=pid)
            continue
        for group, exams in group_items:
            try:
                exam_items = _entries(exams, "exams of a nodule group")
            except TypeError as error:
                problems.add(f"malformed nodule group: {error}", **_problem_ids(pid, group, None))
                continue
            for exam_idx, lesion in exam_items:
                ids = _problem_ids(pid, group, exam_idx)
                try:
                    row = _lesion_row(pid, group, exam_idx, lesion)
                except Exception as error:  # the item boundary: whatever a malformed entry raises stays its own
                    problems.add(f"malformed lesion entry: {str(error)[:300]}", **ids)
                    continue
                ids["exam_id"] = row["exam"]
                if row["exam"] not in shapes:
                    problems.add("annotation for an exam that is not a usable exam of the manifest "
                                 "(unknown exam id, or rejected: see the manifest and dicom problems)", **ids)
                    continue
                if pids[row["exam"]] != pid:
                    problems.add(f"exam belongs to patient {pids[row['exam']]}, not to {pid}", **ids)
                    continue
                center = [row["center_i"], row["center_j"], row["center_k"]]
                if any(not row["coords"][2 * a] <= center[a] <= row["coords"][2 * a + 1] for a in range(3)):
                    # Kept: only the box places the nodule; the centre is carried along (NLST: inside in i only).
                    problems.add(f"center {center} lies outside its box {row['coords']}", severity="warning", **ids)
                if _check_box(row, list(shapes[row["exam"]]), problems):
                    rows.append(row)
    if not rows and not problems.problems:
        problems.add("the tracking file holds no nodules", item="tracking file")
    frame = pd.DataFrame(rows, columns=TRACKING_SCHEMA.names)
    frame = frame.sort_values(["pid", "nodule_group", "exam_idx"], kind="stable").reset_index(drop=True)
    duplicated = frame.duplicated(["pid", "nodule_group", "exam_idx"], keep="first")
    for row in frame[duplicated].itertuples(index=False):
        problems.add("nodule listed twice for the same exam index; first kept", pid=row.pid, exam_id=row.exam,
                     nodule_group=row.nodule_group, exam_idx=row.exam_idx)
    frame = _check_exam_order(frame[~duplicated].reset_index(drop=True), days, problems)
    log.info("nodules: %d nodule-exam rows from %d patients, %d problems",
             len(frame), frame["pid"].nunique(), len(problems.problems))
    return frame, problems


def tracking_from_table(frame: pd.DataFrame) -> dict[str, dict[int, dict[int, dict[str, Any]]]]:
    """Rebuild the tracking structure from the table (the inverse of build_tracking_table for valid rows)."""
    tracking: dict[str, dict[int, dict[int, dict[str, Any]]]] = {}
    for row in frame.to_dict("records"):
        past = [row[f"centers_past_{axis}"] for axis in "ijk"]
        lesion = {
            "exam": row["exam"],
            "nodid_in_segmentation": row["nodid_in_segmentation"],
            "volume": row["volume"],
            "abnid_in_nlst": _optional_list(row["abnid_in_nlst"]),
            "coords": [int(v) for v in row["coords"]],
            "center": [row["center_i"], row["center_j"], row["center_k"]],
            "centers_in_past_exam_ijk_space": None if any(pd.isna(v) for v in past) else past,
            "coords_in_past_exam_ijk_space": _optional_list(row["coords_past"]),
            "abn_prexist": bool(row["abn_prexist"]),
            "screen_detected": bool(row["screen_detected"]),
        }
        tracking.setdefault(row["pid"], {}).setdefault(int(row["nodule_group"]), {})[int(row["exam_idx"])] = lesion
    return tracking
