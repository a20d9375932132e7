"""Nodule boxes in registered space (seed step 9).

Registered space is the patient's baseline exam resampled to the patch spacing (0.703125 x 0.703125 x 2.5 mm by
default): same origin and direction as the baseline, a grid covering the same physical extent. A box is mapped
by its geometry, not by warping a mask: the eight corners of the box's physical extent in its own exam go
through the inverse registration transform into the baseline, and the registered-grid voxels they overlap form
the new box. Boxes are `(i_min, i_max, j_min, j_max, k_min, k_max)` with i = row (Y), j = column (X),
k = slice (Z), inclusive.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from noduleflow.imaging import Geometry, homogeneous

log = logging.getLogger(__name__)


def registered_grid(fixed: Geometry, spacing: Sequence[float]) -> Geometry:
    """The baseline's grid resampled to `spacing` (x, y, z), keeping origin and direction."""
    extent = np.asarray(fixed.shape) * np.asarray(fixed.spacing)
    shape = np.maximum(1, np.round(extent / np.asarray(spacing))).astype(int)
    return Geometry(tuple(int(v) for v in shape), tuple(float(v) for v in spacing), fixed.origin, fixed.direction)


def _ijk_to_xyz(box: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Continuous (x, y, z) index bounds of a box's extent (voxel faces, not centres)."""
    i0, i1, j0, j1, k0, k1 = box
    return np.array([j0, i0, k0]) - 0.5, np.array([j1, i1, k1]) + 0.5


def map_box(box: Sequence[int], center_ijk: Sequence[float], exam: Geometry, fixed_to_exam: np.ndarray,
            grid: Geometry) -> tuple[list[int] | None, list[float], bool]:
    """Map a box (and its centre voxel) of `exam` into `grid`; returns (box or None if outside, centre, clipped)."""
    low, high = _ijk_to_xyz(box)
    corners = np.array(list(itertools.product(*zip(low, high, strict=True))))
    to_grid = np.linalg.inv(grid.matrix()) @ np.linalg.inv(fixed_to_exam) @ exam.matrix()
    mapped = (to_grid @ np.c_[corners, np.ones(8)].T)[:3].T
    lo = np.floor(mapped.min(axis=0) + 0.5).astype(int)  # voxels the extent overlaps
    hi = np.ceil(mapped.max(axis=0) - 0.5).astype(int)
    hi = np.maximum(hi, lo)
    center = to_grid @ np.array([center_ijk[1], center_ijk[0], center_ijk[2], 1.0])
    limit = np.asarray(grid.shape) - 1
    if (hi < 0).any() or (lo > limit).any():
        return None, [float(center[1]), float(center[0]), float(center[2])], True
    clo, chi = np.clip(lo, 0, limit), np.clip(hi, 0, limit)
    clipped = bool((clo != lo).any() or (chi != hi).any())
    return ([int(clo[1]), int(chi[1]), int(clo[0]), int(chi[0]), int(clo[2]), int(chi[2])],
            [float(center[1]), float(center[0]), float(center[2])], clipped)


def boxes_in_registered_space(exams: pd.DataFrame, tracking: pd.DataFrame,
                              spacing: Sequence[float]) -> pd.DataFrame:
    """Every nodule of the exams that passed registration QC, with its box and centre in registered space.

    Adds `fixed_exam_id`, `days_since_baseline`, `coords_fixed`, `center_fixed` (i, j, k, continuous),
    `registered_shape` (x, y, z), `box_clipped` and `box_outside` (then `coords_fixed` is null).
    """
    good = exams[exams["qc_pass"]].set_index("exam_id")
    nodules = tracking[tracking["exam"].isin(good.index)].reset_index(drop=True)
    rows = []
    for nodule in nodules.itertuples(index=False):
        exam = good.loc[nodule.exam]
        grid = registered_grid(Geometry.from_columns(exam, "fixed"), spacing)
        fixed_to_exam = homogeneous(exam["fixed_to_moving"])
        box, center, clipped = map_box(nodule.coords, (nodule.center_i, nodule.center_j, nodule.center_k),
                                       Geometry.from_columns(exam, "original"), fixed_to_exam, grid)
        rows.append({"fixed_exam_id": exam["fixed_exam_id"], "days_since_baseline": exam["days_since_baseline"],
                     "coords_fixed": box, "center_fixed": center, "registered_shape": list(grid.shape),
                     "box_clipped": clipped, "box_outside": box is None})
        if clipped:
            log.warning("nodule %s/%s in exam %s: box %s", nodule.pid, nodule.nodule_group, nodule.exam,
                        "outside the registered volume" if box is None else f"clipped to {box}")
    out = pd.concat([nodules, pd.DataFrame(rows, index=nodules.index, columns=[
        "fixed_exam_id", "days_since_baseline", "coords_fixed", "center_fixed", "registered_shape", "box_clipped",
        "box_outside"])], axis=1)
    return out.sort_values(["pid", "nodule_group", "exam_idx"], kind="stable").reset_index(drop=True)
