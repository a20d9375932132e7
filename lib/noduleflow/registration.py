"""Rigid registration of follow-up exams to the patient's baseline exam.

This module holds the precomputed-transform lookup (seed step 2); transforms found there are reused instead of
being recomputed.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

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
