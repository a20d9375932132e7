"""Full registered volumes (seed step 17's input): every good exam of a shard on one fixed-size grid.

A volume is the exam resampled into registered space (the baseline's grid at `volumes.spacing_mm`, through the
exam's transform, as patches are cut) and then cropped or padded about its centre to `volumes.size` (x, y, z);
where the difference is odd, the lower side (voxel 0) gets the smaller half. HU are clipped and scaled to
[-1, 1] as in the patch cache; padding and voxels without image data are -1. A shard stores its volumes as one
`(N, 1, Z, Y, X)` `.npy` array, written one volume at a time; its index says which row holds which exam and
the volume's own geometry (`volume_shape`, `_spacing`, `_origin`, `_direction`, LPS).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from noduleflow.cache.patches import PatchSettings, cut_patch, gather_index, good_exams
from noduleflow.imaging import Geometry, geometry_columns, homogeneous, read_image
from noduleflow.io import write_array
from noduleflow.registration.boxes import registered_grid

log = logging.getLogger(__name__)

EXAM_COLUMNS = ["pid", "exam_id", "fixed_exam_id", "is_fixed", "screen_timepoint", "days_since_baseline"]
INDEX_COLUMNS = [*EXAM_COLUMNS, "split", "shard_file", "offset", "grid_start", "volume_shape", "volume_spacing",
                 "volume_origin", "volume_direction"]


def centred_start(shape: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    """First voxel of `shape` at voxel 0 of a centred crop or pad to `size` (negative: padding), per axis.

    The lower side gets the floor of half the difference: cropping 7 voxels cuts 3 before and 4 after, padding 7
    adds 3 before and 4 after.
    """
    difference = np.asarray(shape) - np.asarray(size)
    return np.where(difference >= 0, difference // 2, -((-difference) // 2))


def crop_or_pad(array_zyx: np.ndarray, size: tuple[int, int, int], fill: float) -> tuple[np.ndarray, np.ndarray]:
    """`array_zyx` cropped or padded about its centre to `size` (x, y, z) with `fill`; also the start (x, y, z)."""
    start = centred_start(array_zyx.shape[::-1], size)
    out = np.full(size[::-1], fill, dtype=array_zyx.dtype)
    source, target = [], []
    for first, length, n in zip(start[::-1], size[::-1], array_zyx.shape, strict=True):  # z, y, x
        low, high = max(first, 0), min(first + length, n)
        source.append(slice(low, high))
        target.append(slice(low - first, high - first))
    out[tuple(target)] = array_zyx[tuple(source)]
    return out, start


def exam_volume(image: sitk.Image, fixed: Geometry, fixed_to_moving: np.ndarray,
                settings: PatchSettings) -> tuple[np.ndarray, Geometry, np.ndarray]:
    """One exam in registered space, cropped or padded to `settings.size`: array (Z, Y, X) in [-1, 1] (padding -1),
    its geometry, and the registered-grid voxel (x, y, z) at its voxel 0."""
    grid = registered_grid(fixed, settings.spacing_mm)
    registered = cut_patch(image, grid, np.zeros(3), fixed_to_moving, replace(settings, size=grid.shape))
    volume, start = crop_or_pad(registered, settings.size, -1.0)
    direction = np.reshape(grid.direction, (3, 3))
    origin = np.asarray(grid.origin) + direction @ (start * np.asarray(grid.spacing))
    geometry = Geometry(tuple(settings.size), grid.spacing, tuple(float(v) for v in origin), grid.direction)
    return volume, geometry, start


def volume_shard(exams: pd.DataFrame, split: str, shard: int, settings: PatchSettings,
                 volume_file: str | os.PathLike[str]) -> pd.DataFrame:
    """Write the volume of every exam of one shard that passed registration QC; return the shard's index."""
    chosen = good_exams(exams, shard).sort_values(["pid", "screen_timepoint", "exam_id"], kind="stable")
    index = []

    def volumes() -> Iterator[np.ndarray]:
        for offset, exam in enumerate(chosen.to_dict("records")):
            volume, geometry, start = exam_volume(read_image(exam["image_path"]), Geometry.from_columns(exam, "fixed"),
                                                  homogeneous(exam["fixed_to_moving"]), settings)
            index.append({key: exam[key] for key in EXAM_COLUMNS} | {
                "split": split, "shard_file": Path(volume_file).name, "offset": offset,
                "grid_start": [int(v) for v in start], **geometry_columns("volume", geometry)})
            yield volume[None]

    size_x, size_y, size_z = settings.size
    write_array(volume_file, volumes(), (len(chosen), 1, size_z, size_y, size_x), settings.dtype)
    log.info("%s shard %d: %d volumes", split, shard, len(index))
    return pd.DataFrame(index, columns=INDEX_COLUMNS)


def consolidate_volumes(shard_indexes: list[pd.DataFrame], folder: str | os.PathLike[str],
                        settings: PatchSettings) -> pd.DataFrame:
    """One index of a split's volumes; fails loudly if any indexed volume is missing, truncated or misshapen."""
    size_x, size_y, size_z = settings.size
    return gather_index(shard_indexes, folder, INDEX_COLUMNS, {"shard_file": (1, size_z, size_y, size_x)},
                        settings.dtype, "exam_id", ["pid", "screen_timepoint", "exam_id"])
