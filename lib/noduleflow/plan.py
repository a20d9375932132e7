"""What the workflow plans when it builds its job graph: shard membership and precomputed transforms.

The Snakefile imports this module (and SLURM jobs re-parse the Snakefile), so it stays light: no imaging
libraries.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from noduleflow.ids import is_safe_id

log = logging.getLogger(__name__)

# ANTs files of the research code (rigid_f<fixed>_m<moving>.mat) and noduleflow's own (<fixed>__<moving>.tfm).
_ANTS_NAME = re.compile(r"^rigid_f(?P<fixed>\d+)_m(?P<moving>\d+)\.mat$")
_TFM_SUFFIX = ".tfm"


def _parse_transform_name(name: str) -> tuple[str, str] | None:
    """(fixed, moving) exam ids encoded in a transform file name, or None if the name is not a transform."""
    match = _ANTS_NAME.match(name)
    if match:
        return match["fixed"], match["moving"]
    if name.endswith(_TFM_SUFFIX):
        parts = name[: -len(_TFM_SUFFIX)].split("__")
        if len(parts) == 2 and all(is_safe_id(p) for p in parts):
            return parts[0], parts[1]
    return None


def find_precomputed_transforms(directory: str | os.PathLike[str] | None) -> dict[tuple[str, str], dict[str, str]]:
    """Sorted exam pair -> {fixed, moving, filename, path} for every transform file in `directory`.

    If both directions of a pair exist, the first file in name order wins. No directory gives an empty map.
    """
    mapping: dict[tuple[str, str], dict[str, str]] = {}
    if not directory:
        return mapping
    for path in sorted(Path(directory).iterdir()):
        parsed = _parse_transform_name(path.name)
        if parsed is None or not path.is_file():
            continue
        fixed, moving = parsed
        key = (min(fixed, moving), max(fixed, moving))
        if key in mapping:
            log.info("transform %s ignored: %s already covers exams %s", path.name, mapping[key]["filename"], key)
            continue
        mapping[key] = {"fixed": fixed, "moving": moving, "filename": path.name, "path": os.fspath(path)}
    log.info("found %d precomputed transforms in %s", len(mapping), directory)
    return mapping


@dataclass(frozen=True)
class ShardExam:
    """One exam of a registration shard and the baseline exam it is registered to."""

    exam_id: str
    pid: str
    image_path: str
    fixed_exam_id: str
    fixed_image_path: str
    precomputed: str | None = None  # transform file to reuse
    precomputed_inverted: bool = False  # the file maps the other way round


def transform_file(transform_dir: str | os.PathLike[str], fixed_exam_id: str, moving_exam_id: str) -> Path:
    """Where the transform of one exam pair is stored: <fixed>__<moving>.tfm."""
    return Path(transform_dir) / f"{fixed_exam_id}__{moving_exam_id}{_TFM_SUFFIX}"


def shard_plan(exams: pd.DataFrame,
               precomputed: Mapping[tuple[str, str], Mapping[str, str]]) -> dict[int, list[ShardExam]]:
    """Shard -> its exams, from a split's exams table: each exam with its baseline and any precomputed transform.

    The baseline is the patient's first exam in the table (the first exam that carries nodules). A shard lists its
    patients by pid and each patient's exams by timepoint. One pass over the table, so the workflow can plan
    every shard of an NLST-sized split at once.
    """
    rows = exams.sort_values(["pid", "screen_timepoint"], kind="stable")
    first = rows.groupby("pid", sort=False)[["exam_id", "image_path"]].transform("first")
    plan: dict[int, list[ShardExam]] = {}
    for shard, pid, exam_id, image_path, fixed_id, fixed_path in zip(
            rows["shard"], rows["pid"], rows["exam_id"], rows["image_path"], first["exam_id"], first["image_path"],
            strict=True):
        entry = precomputed.get(tuple(sorted((fixed_id, exam_id))))
        plan.setdefault(int(shard), []).append(ShardExam(
            exam_id=exam_id, pid=pid, image_path=image_path, fixed_exam_id=fixed_id, fixed_image_path=fixed_path,
            precomputed=entry["path"] if entry else None,
            precomputed_inverted=bool(entry) and entry["fixed"] != fixed_id))
    return plan


def space_geometry(space: str, vae: Mapping[str, object]) -> dict[str, object]:
    """Channels of a model's data and the factor from patch voxels to its grid (x, y, z).

    Latent models see the VAE's latent grid (downsampled 2^(levels - 1) times); the others see patches or slices.
    """
    if space != "latent":
        return {"channels": 1, "scale": [1.0, 1.0, 1.0]}
    factor = 1.0 / 2 ** (len(vae["channels"]) - 1)
    return {"channels": int(vae["latent_channels"]), "scale": [factor] * 3}
