"""Identifiers: the exam-id rule, safety of ids used in file names, stable hashes for splits and shards."""

from __future__ import annotations

import hashlib
import re

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def is_safe_id(value: object) -> bool:
    """True if `value` can be used as a file-name component: letters, digits, '.', '_', '-', no leading dot."""
    return isinstance(value, str) and bool(_SAFE_ID.fullmatch(value)) and ".." not in value


def nlst_exam_id(pid: str, screen_timepoint: int, series_uid: str) -> str:
    """The NLST exam id: pid + timepoint + first 5 and last 5 characters of the series UID's last component."""
    last = series_uid.split(".")[-1]
    return f"{pid}{int(screen_timepoint)}{last[:5]}{last[-5:]}"


def stable_fraction(*parts: object) -> float:
    """A number in [0, 1) that depends only on `parts` (not on row order, process or platform)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def shard_of(pid: str, n_shards: int) -> int:
    """The shard (0 .. n_shards-1) that holds every exam of patient `pid`."""
    return int(stable_fraction("shard", pid) * n_shards)


def shard_name(shard: int) -> str:
    """File-name form of a shard number."""
    return f"{shard:03d}"
