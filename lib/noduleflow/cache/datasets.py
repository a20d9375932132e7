"""Torch datasets over the sharded caches: single patches, prior/follow-up pairs of the same nodule, and crops
of full volumes.

Shard arrays are memory-mapped on first use in each process (so DataLoader workers open their own maps) and
kept in a small least-recently-used table.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from noduleflow.cache.patches import nodule_key


def cache_folder(path: str | os.PathLike[str]) -> Path:
    """The cache folder behind a rule input: a latent cache folder itself, or the folder of a raw index."""
    path = Path(path)
    return path if path.is_dir() else path.parent


class ShardArrays:
    """Memory-mapped `.npy` shard files of one cache folder, at most `max_open` at a time."""

    def __init__(self, folder: str | os.PathLike[str], max_open: int = 16) -> None:
        self.folder = Path(folder)
        self.max_open = max_open
        self._open: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, name: str, offset: int, region: tuple[slice, ...] = ()) -> torch.Tensor:
        """One array of a shard file (or the `region` of it), copied out of the map as a float32 tensor."""
        if name not in self._open:
            if len(self._open) >= self.max_open:
                self._open.popitem(last=False)
            self._open[name] = np.load(self.folder / name, mmap_mode="r", allow_pickle=False)
        self._open.move_to_end(name)
        return torch.from_numpy(np.array(self._open[name][(offset, *region)], dtype=np.float32))

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for DataLoader workers) without open maps; each worker opens its own."""
        return {"folder": self.folder, "max_open": self.max_open, "_open": OrderedDict()}


class NodulePatches(Dataset):
    """Single cached nodules: `image` (1, Z, Y, X), or (1, Y, X) with slices=True, plus ids and box."""

    def __init__(self, folder: str | os.PathLike[str], index: pd.DataFrame | None = None,
                 slices: bool = False) -> None:
        index = pd.read_parquet(Path(folder) / "index.parquet") if index is None else index
        self.index = index.reset_index(drop=True)
        self.column = "slice_file" if slices else "shard_file"
        self.arrays = ShardArrays(folder)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, Any]:
        row = self.index.iloc[item]
        return {"image": self.arrays.get(row[self.column], int(row["offset"])), "nodule_key": row["nodule_key"],
                "pid": row["pid"], "nodule_group": int(row["nodule_group"]), "exam_idx": int(row["exam_idx"]),
                "bbox": torch.tensor([int(v) for v in row["bbox"]])}


class NodulePairs(Dataset):
    """Prior and follow-up patches of the same nodule at consecutive exams, with the interval in days.

    Pairs whose two patches are not both cached are left out (`missing` lists them).
    """

    def __init__(self, folder: str | os.PathLike[str], pairs: pd.DataFrame, index: pd.DataFrame | None = None,
                 slices: bool = False) -> None:
        index = pd.read_parquet(Path(folder) / "index.parquet") if index is None else index
        self.index = index.set_index("nodule_key")
        keys = {side: [nodule_key(g, e, i) for g, e, i in zip(pairs["nodule_group"], pairs[f"exam_{side}"],
                                                               pairs[f"exam_idx_{side}"], strict=True)]
                for side in ("a", "b")}
        frame = pairs.assign(key_a=keys["a"], key_b=keys["b"])
        cached = frame["key_a"].isin(self.index.index) & frame["key_b"].isin(self.index.index)
        self.missing = frame.loc[~cached, ["key_a", "key_b"]].reset_index(drop=True)
        self.pairs = frame[cached].reset_index(drop=True)
        self.column = "slice_file" if slices else "shard_file"
        self.arrays = ShardArrays(folder)

    def __len__(self) -> int:
        return len(self.pairs)

    def _patch(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.index.loc[key]
        return self.arrays.get(row[self.column], int(row["offset"])), torch.tensor([int(v) for v in row["bbox"]])

    def __getitem__(self, item: int) -> dict[str, Any]:
        pair = self.pairs.iloc[item]
        prior, box_a = self._patch(pair["key_a"])
        follow_up, box_b = self._patch(pair["key_b"])
        return {"prior": prior, "follow_up": follow_up, "delta_days": torch.tensor(float(pair["delta_days"])),
                "bbox_a": box_a, "bbox_b": box_b, "nodule_key_a": pair["key_a"], "nodule_key_b": pair["key_b"],
                "pid": pair["pid"], "nodule_group": int(pair["nodule_group"])}


class VolumeCrops(Dataset):
    """Crops of `crop` (x, y, z) voxels from the full volumes of a cache folder: `image` (1, Z, Y, X), ids, start.

    Item i is volume i mod N at a corner drawn uniformly by `numpy.random.default_rng([seed, i])`, so every item is
    a pure function of (seed, i): the training loop's seeded batches then give seeded random crops, and a
    resumed run draws the same ones. `per_volume` crops per volume make the dataset's length.
    """

    def __init__(self, folder: str | os.PathLike[str], crop: tuple[int, int, int], seed: int, per_volume: int,
                 index: pd.DataFrame | None = None) -> None:
        index = pd.read_parquet(Path(folder) / "index.parquet") if index is None else index
        self.index = index.reset_index(drop=True)
        self.crop = np.asarray(crop[::-1])  # z, y, x
        self.seed, self.per_volume = seed, per_volume
        self.arrays = ShardArrays(folder)
        too_small = [tuple(shape) for shape in self.index["volume_shape"] if (np.asarray(shape) < crop).any()]
        if too_small:
            raise ValueError(f"crop {tuple(crop)} is larger than volumes of shape {too_small[0]} (x, y, z)")

    def __len__(self) -> int:
        return len(self.index) * self.per_volume

    def __getitem__(self, item: int) -> dict[str, Any]:
        row = self.index.iloc[item % len(self.index)]
        limit = np.asarray(row["volume_shape"])[::-1] - self.crop + 1  # z, y, x
        start = np.random.default_rng([self.seed, item]).integers(0, limit)
        region = tuple(slice(int(a), int(a + n)) for a, n in zip(start, self.crop, strict=True))
        return {"image": self.arrays.get(row["shard_file"], int(row["offset"]), (slice(None), *region)),
                "exam_id": row["exam_id"], "start": torch.from_numpy(start[::-1].copy())}
