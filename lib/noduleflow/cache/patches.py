"""Nodule patch cache (seed steps 13-15): patches cut in registered space, sharded `.npy` files, one index.

A patch is a `size` (x, y, z) block of registered space (the baseline's grid at the patch spacing) centred on
the nodule's registered box. It is cut with one resampling of the patch grid alone through the exam's
transform (each exam is read once per shard), HU are clipped to `hu_window` and scaled to [-1, 1], and voxels
without image data are -1. A shard stores its patches as one array (N, 1, Z, Y, X) and the axial slices through
the nodule centres as (N, 1, Y, X), in `.npy` files that readers memory-map; its index says which row holds
which nodule. Boxes are (i_min, i_max, j_min, j_max, k_min, k_max) = (y, x, z), inclusive.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from noduleflow.hu import to_hu, to_unit_range
from noduleflow.imaging import Geometry, homogeneous, read_image
from noduleflow.io import write_array
from noduleflow.registration.boxes import registered_grid
from noduleflow.registration.rigid import matrix_to_transform

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["pid", "nodule_group", "exam_id", "exam_idx", "nodule_key", "split", "shard_file",
                 "slice_file", "offset", "bbox", "bbox_interp", "patch_start", "box_cropped"]
SKIPPED_COLUMNS = ["pid", "nodule_group", "exam_id", "exam_idx", "nodule_key", "split", "reason"]


@dataclass(frozen=True)
class PatchSettings:
    """Patch geometry and intensity scaling (config key `patch`; built by noduleflow.settings.from_config)."""

    spacing_mm: tuple[float, float, float]
    size: tuple[int, int, int]  # x, y, z voxels
    hu_window: tuple[float, float]
    dtype: str


def nodule_key(nodule_group: int, exam_id: str, exam_idx: int) -> str:
    """The key naming one nodule at one exam: '<nodule_group>_<exam>_<exam_idx>'."""
    return f"{int(nodule_group)}_{exam_id}_{int(exam_idx)}"


def patch_start(box: list[int], size: tuple[int, int, int]) -> tuple[np.ndarray, bool]:
    """First registered-grid voxel (x, y, z) of the patch around a box, and whether the box is larger than it.

    The box grows symmetrically to the patch size (the smaller half before it); a box larger than the patch is
    centred and cut.
    """
    low = np.array([box[2], box[0], box[4]])
    extent = np.array([box[3], box[1], box[5]]) - low + 1
    spare = np.asarray(size) - extent
    return low - spare // 2, bool((spare < 0).any())


def box_in_patch(box: list[int], start: np.ndarray, size: tuple[int, int, int]) -> list[int]:
    """A registered-grid box (i, j, k) in patch coordinates, clipped to the patch."""
    x0, y0, z0 = start
    shifted = [box[0] - y0, box[1] - y0, box[2] - x0, box[3] - x0, box[4] - z0, box[5] - z0]
    limits = [size[1], size[1], size[0], size[0], size[2], size[2]]
    return [int(min(max(v, 0), limit - 1)) for v, limit in zip(shifted, limits, strict=True)]


def upsampled_box(box: list[int]) -> list[int]:
    """The box after 2x in-plane upsampling of the patch (y and x doubled, z unchanged)."""
    y0, y1, x0, x1, z0, z1 = box
    return [2 * y0, 2 * y1 + 1, 2 * x0, 2 * x1 + 1, z0, z1]


def good_exams(exams: pd.DataFrame, shard: int) -> pd.DataFrame:
    """The exams of one shard that passed registration QC (the only ones any cache holds)."""
    return exams[(exams["shard"] == shard) & exams["qc_pass"]]


def patch_grid(grid: Geometry, start: np.ndarray, settings: PatchSettings) -> Geometry:
    """The grid of the patch that starts at voxel `start` (x, y, z) of `grid` (the registered grid)."""
    direction = np.reshape(grid.direction, (3, 3))
    origin = np.asarray(grid.origin) + direction @ (np.asarray(start) * np.asarray(settings.spacing_mm))
    return Geometry(tuple(settings.size), tuple(settings.spacing_mm), tuple(float(v) for v in origin), grid.direction)


def cut_patch(image: sitk.Image, grid: Geometry, start: np.ndarray, fixed_to_moving: np.ndarray,
              settings: PatchSettings) -> np.ndarray:
    """One patch (Z, Y, X) in [-1, 1]: the patch grid alone resampled through the exam's transform."""
    low = settings.hu_window[0]
    resampled = sitk.Resample(image, patch_grid(grid, start, settings).reference_image(),
                              matrix_to_transform(fixed_to_moving),
                              sitk.sitkLinear, low, sitk.sitkFloat32)
    return to_unit_range(sitk.GetArrayFromImage(resampled), settings.hu_window)


def cache_shard(*, exams: pd.DataFrame, nodules: pd.DataFrame, split: str, shard: int, settings: PatchSettings,
                patch_file: str | os.PathLike[str],
                slice_file: str | os.PathLike[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cut every nodule of one shard's registered exams; write the patch and slice arrays.

    Returns the shard's index (one row per cached patch) and the nodules that could not be cached, with why.
    """
    in_shard = good_exams(exams, shard).set_index("exam_id")
    rows = nodules[nodules["exam"].isin(in_shard.index)].sort_values(["exam", "nodule_group"], kind="stable")
    index, skipped, patches = [], [], []
    for exam_id, group in rows.groupby("exam", sort=True):
        exam = in_shard.loc[exam_id].to_dict()
        grid = registered_grid(Geometry.from_columns(exam, "fixed"), settings.spacing_mm)
        fixed_to_moving = homogeneous(exam["fixed_to_moving"])
        image = None
        for nodule in group.to_dict("records"):
            ids = {"pid": nodule["pid"], "nodule_group": int(nodule["nodule_group"]), "exam_id": exam_id,
                   "exam_idx": int(nodule["exam_idx"]),
                   "nodule_key": nodule_key(nodule["nodule_group"], exam_id, nodule["exam_idx"]), "split": split}
            if nodule["box_outside"]:
                skipped.append({**ids, "reason": "nodule box lies outside the registered volume"})
                continue
            image = image if image is not None else read_image(exam["image_path"])  # read once per exam
            box = list(nodule["coords_fixed"])
            start, cropped = patch_start(box, settings.size)
            patches.append(cut_patch(image, grid, start, fixed_to_moving, settings))
            in_patch = box_in_patch(box, start, settings.size)
            index.append({**ids, "shard_file": Path(patch_file).name, "slice_file": Path(slice_file).name,
                          "offset": len(patches) - 1, "bbox": in_patch, "bbox_interp": upsampled_box(in_patch),
                          "patch_start": [int(v) for v in start], "box_cropped": cropped})
            if cropped:
                log.warning("nodule %s is larger than the patch; its box is cut", ids["nodule_key"])
    size_x, size_y, size_z = settings.size
    stack = np.stack(patches)[:, None] if patches else np.zeros((0, 1, size_z, size_y, size_x))
    stack = stack.astype(settings.dtype)
    centre_z = [(row["bbox"][4] + row["bbox"][5]) // 2 for row in index]
    slices = stack[np.arange(len(index)), :, centre_z] if index else np.zeros((0, 1, size_y, size_x), stack.dtype)
    for array, path in ((stack, patch_file), (slices, slice_file)):
        write_array(path, array, array.shape, array.dtype)
    log.info("%s shard %d: %d patches, %d skipped", split, shard, len(index), len(skipped))
    return pd.DataFrame(index, columns=INDEX_COLUMNS), pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)


class CacheError(RuntimeError):
    """The patch cache is incomplete or damaged."""


def _array_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a `.npy` file, checking that the file holds all the data its header promises."""
    if not path.exists():
        raise CacheError(f"missing cache file {path}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as error:
        raise CacheError(f"damaged cache file {path}: {error}") from error
    return array.shape, array.dtype


def gather_index(shard_indexes: list[pd.DataFrame], folder: str | os.PathLike[str], columns: list[str],
                 shapes: dict[str, tuple[int, ...]], dtype: str, key: str, order: list[str]) -> pd.DataFrame:
    """One index of a sharded cache from its shard indexes, sorted by `order`; fails loudly (CacheError) if any
    indexed array is missing, truncated or not of `shapes[file column]` and `dtype`, or a `key` is cached twice.
    """
    index = pd.concat([i for i in shard_indexes if not i.empty] or [pd.DataFrame(columns=columns)],
                      ignore_index=True)
    for column, shape in shapes.items():
        for name, rows in index.groupby(column, sort=True):
            found, found_dtype = _array_header(Path(folder) / name)
            if found[1:] != shape or found_dtype != np.dtype(dtype):
                raise CacheError(f"{name}: arrays of shape {found[1:]} and {found_dtype}, expected {shape} and "
                                 f"{dtype}")
            if rows["offset"].max() >= found[0] or len(rows) != found[0]:
                raise CacheError(f"{name}: holds {found[0]} arrays, its index lists {len(rows)} "
                                 f"(largest offset {rows['offset'].max()})")
    duplicated = index[key].duplicated()
    if duplicated.any():
        raise CacheError(f"{key} cached twice: {index.loc[duplicated, key].tolist()[:5]}")
    return index.sort_values(order, kind="stable").reset_index(drop=True)


def consolidate(shard_indexes: list[pd.DataFrame], folder: str | os.PathLike[str],
                settings: PatchSettings) -> pd.DataFrame:
    """One index for a split; fails loudly if any indexed patch is missing, truncated or of the wrong shape."""
    size_x, size_y, size_z = settings.size
    return gather_index(shard_indexes, folder, INDEX_COLUMNS,
                        {"shard_file": (1, size_z, size_y, size_x), "slice_file": (1, size_y, size_x)},
                        settings.dtype, "nodule_key", ["pid", "nodule_group", "exam_idx"])


def small_boxes(index: pd.DataFrame, folder: str | os.PathLike[str], settings: PatchSettings, segmenter: Any,
                decode: Callable[[np.ndarray], np.ndarray] | None = None) -> pd.DataFrame:
    """Per cached nodule: its box in the patch, the 2x in-plane box, and the segmented reference volume (mm^3).

    With `decode` (a VAE decoder from a latent array to a patch in [-1, 1]) the folder holds latents, and the
    volumes are those of the decoded patches (`save_small_bboxes_encoded`).
    """
    voxel_mm3 = float(np.prod(settings.spacing_mm))
    volumes = []
    for shard_file, rows in index.groupby("shard_file", sort=False):
        arrays = np.load(Path(folder) / shard_file, mmap_mode="r", allow_pickle=False)
        for row in rows.itertuples():
            patch = arrays[row.offset] if decode is None else decode(np.asarray(arrays[row.offset]))
            hu = to_hu(patch[0], settings.hu_window)
            volumes.append((row.Index, float(segmenter(hu, list(row.bbox)).sum()) * voxel_mm3))
    out = index[["pid", "nodule_group", "exam_id", "exam_idx", "nodule_key", "split", "bbox", "bbox_interp"]].copy()
    out["nodule_volume"] = pd.Series(dict(volumes), dtype="float64")
    return out
