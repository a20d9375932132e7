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

from noduleflow.io import load_plain_pickle
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


def load_tracking(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a tracking file safely: `.pt` with torch's weights-only loader, pickles with a plain-data unpickler."""
    path = Path(path)
    try:
        if path.suffix == ".pt":
            data = torch.load(path, weights_only=True)
        elif path.suffix in {".p", ".pkl", ".pickle"}:
            data = load_plain_pickle(path)
        else:
            raise TrackingFileError(f"{path}: tracking file must be .pt, .p, .pkl or .pickle")
    except TrackingFileError:
        raise
    except Exception as error:
        raise TrackingFileError(f"{path}: cannot read tracking file ({type(error).__name__}: {error})") from error
    if isinstance(data, Mapping):
        items: Iterable[Any] = data.items()
    elif isinstance(data, list | tuple):
        items = data
    else:
        raise TrackingFileError(
            f"{path}: expected a dict pid -> nodules or a list of (pid, nodules), got {type(data).__name__}")
    tracking: dict[str, Any] = {}
    for item in items:
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[1], Mapping)):
            raise TrackingFileError(f"{path}: entry {str(item)[:80]!r} is not a (pid, nodules) pair")
        tracking[str(item[0])] = item[1]
    return tracking


def _optional_list(value: Any) -> list[int] | None:
    return None if value is None else [int(v) for v in value]


def _lesion_row(pid: str, group: Any, exam_idx: Any, lesion: Mapping[str, Any]) -> dict[str, Any]:
    """One table row from one lesion dict; raises KeyError/ValueError/TypeError on malformed input."""
    missing = [key for key in LESION_KEYS if key not in lesion]
    if missing:
        raise KeyError(f"lesion is missing key(s) {', '.join(missing)}")
    coords = [int(v) for v in lesion["coords"]]
    center = [int(v) for v in lesion["center"]]
    if len(coords) != 6 or len(center) != 3:
        raise ValueError(f"coords must have 6 values and center 3, got {len(coords)} and {len(center)}")
    past = lesion.get("centers_in_past_exam_ijk_space")
    past = [None] * 3 if past is None else [float(v) for v in past]
    abnid = lesion.get("abnid_in_nlst")
    if abnid is not None and not isinstance(abnid, list | tuple):
        abnid = [abnid]
    nodid = lesion.get("nodid_in_segmentation")
    return {
        "pid": pid,
        "nodule_group": int(group),
        "exam_idx": int(exam_idx),
        "exam": str(lesion["exam"]),
        "nodid_in_segmentation": None if nodid is None else float(nodid),
        "volume": float(lesion["volume"]),
        "abnid_in_nlst": _optional_list(abnid),
        "coords": coords,
        "center_i": center[0],
        "center_j": center[1],
        "center_k": center[2],
        "centers_past_i": past[0],
        "centers_past_j": past[1],
        "centers_past_k": past[2],
        "coords_past": _optional_list(lesion.get("coords_in_past_exam_ijk_space")),
        "abn_prexist": bool(lesion.get("abn_prexist", False)),
        "screen_detected": bool(lesion.get("screen_detected", True)),
    }


def _check_box(row: dict[str, Any], shape_xyz: list[int], problems: ProblemLog) -> bool:
    """Check the box against the exam's shape: clip a box that sticks out, reject one that is outside or malformed."""
    ids = {"pid": row["pid"], "exam_id": row["exam"], "nodule_group": row["nodule_group"], "exam_idx": row["exam_idx"]}
    coords = row["coords"]
    limits = [shape_xyz[1], shape_xyz[1], shape_xyz[0], shape_xyz[0], shape_xyz[2], shape_xyz[2]]  # i=Y, j=X, k=Z
    if any(coords[a] > coords[a + 1] for a in (0, 2, 4)):
        problems.add(f"malformed box {coords}: a minimum exceeds its maximum", **ids)
        return False
    if any(coords[a + 1] < 0 or coords[a] > limits[a] - 1 for a in (0, 2, 4)):
        problems.add(f"box {coords} lies outside the volume (shape x, y, z = {shape_xyz})", **ids)
        return False
    clipped = [min(max(value, 0), limit - 1) for value, limit in zip(coords, limits, strict=True)]
    if clipped != coords:
        problems.add(f"box {coords} extends beyond the volume (shape x, y, z = {shape_xyz}); clipped to {clipped}",
                     severity="repaired", **ids)
        row["coords"] = clipped
    return True


def build_tracking_table(tracking: Mapping[str, Any], series: pd.DataFrame) -> tuple[pd.DataFrame, ProblemLog]:
    """One row per nodule per exam; rows for unknown exams or with unusable boxes are reported and left out."""
    problems = ProblemLog("nodules")
    shapes = dict(zip(series["exam_id"].astype(str), series["shape"], strict=True))
    pids = dict(zip(series["exam_id"].astype(str), series["pid"].astype(str), strict=True))
    rows = []
    for pid, groups in tracking.items():
        for group, exams in (groups or {}).items():
            for exam_idx, lesion in (exams or {}).items():
                ids = {"pid": pid, "nodule_group": group, "exam_idx": exam_idx}
                try:
                    row = _lesion_row(pid, group, exam_idx, lesion)
                except (KeyError, ValueError, TypeError) as error:
                    problems.add(f"malformed lesion entry: {error}", **ids)
                    continue
                ids["exam_id"] = row["exam"]
                if row["exam"] not in shapes:
                    problems.add("annotation for an exam that is not a usable exam of the manifest "
                                 "(unknown exam id, or rejected: see the manifest and dicom problems)", **ids)
                    continue
                if pids[row["exam"]] != pid:
                    problems.add(f"exam belongs to patient {pids[row['exam']]}, not to {pid}", **ids)
                    continue
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
    frame = frame[~duplicated].reset_index(drop=True)
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
