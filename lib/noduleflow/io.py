"""File input/output shared by every stage: atomic writes, deterministic parquet, `.npy` arrays, safe pickles."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    A killed or failing writer therefore never leaves a half-written file under the final name.
    The temporary name keeps the final suffixes so that writers choosing a format by extension work.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_parquet(frame: pd.DataFrame, path: str | os.PathLike[str], schema: pa.Schema | None = None) -> None:
    """Write `frame` atomically as parquet, without the pandas index, so equal frames give equal bytes."""
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_array(path: str | os.PathLike[str], rows: Iterable[np.ndarray], shape: Sequence[int],
                dtype: str | np.dtype) -> None:
    """Write `rows` (each of shape `shape[1:]`) atomically as one `.npy` array of `shape` that readers memory-map.

    Rows are written as they come, so an array larger than memory (a shard of full CT volumes) can be written
    from a generator; fewer or more rows than `shape[0]` raise ValueError and leave no file behind.
    """
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))
        written = 0
        for row in rows:
            if written == len(out):
                raise ValueError(f"{path}: more than the {len(out)} rows announced")
            out[written] = row
            written += 1
        if written != len(out):
            raise ValueError(f"{path}: {written} rows written, {len(out)} announced")
        out.flush()
        del out


def write_csv(frame: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write `frame` atomically as CSV without the index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_pickle(obj: Any, path: str | os.PathLike[str]) -> None:
    """Pickle `obj` atomically. Only plain containers, strings and numbers are written by this project."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        pickle.dump(obj, handle, protocol=pickle.HIGHEST_PROTOCOL)


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global: only dicts, lists, tuples, sets, strings, numbers, bools, None."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: only plain containers and numbers are accepted"
        )


def load_plain_pickle(path: str | os.PathLike[str]) -> Any:
    """Load a pickle that may only hold plain data, so a hostile file cannot run code."""
    with open(path, "rb") as handle:
        return _PlainDataUnpickler(io.BufferedReader(handle)).load()
