"""File input/output shared by every stage: atomic writes, deterministic parquet, `.npy` arrays, safe pickles
and JSON.

Input files from outside (tracking pickles, NLST JSON) are read with a size limit, and what they hold with a
nesting-depth limit: a file of a few hundred bytes can describe a structure that is exponentially large when
printed or walked naively (shared references), so structures are walked once per distinct object and described
in error messages with `reprlib` (bounded length).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import reprlib
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


MAX_INPUT_BYTES = 2 * 1024**3  # an NLST metadata JSON is about 1 GB; a tracking file a few MB
MAX_NESTING_DEPTH = 16  # legitimate inputs nest about 8 deep (NLST JSON: patients > patient > exams > ... > list)

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 60, 60


class InputLimitError(ValueError):
    """An input file, or the structure it holds, exceeds a size or nesting-depth limit."""


def short_repr(value: Any) -> str:
    """A repr of at most a few hundred characters, whatever the size or sharing of `value`."""
    return _SHORT.repr(value)


def check_input_size(path: str | os.PathLike[str], max_bytes: int = MAX_INPUT_BYTES) -> None:
    """Raise InputLimitError if the file at `path` is larger than `max_bytes`."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise InputLimitError(f"{path}: {size} bytes, more than the limit of {max_bytes}")


def check_nesting(value: Any, max_depth: int = MAX_NESTING_DEPTH, source: str | os.PathLike[str] = "") -> None:
    """Raise InputLimitError (naming `source`) if containers in `value` nest deeper than `max_depth` or refer to
    themselves.

    Each distinct container is visited once (iteratively), so shared references cannot make this exponential.
    """
    try:
        _walk(value, max_depth)
    except InputLimitError as error:
        raise InputLimitError(f"{source}: {error}" if source else str(error)) from None


def _walk(value: Any, max_depth: int) -> None:
    depth_of: dict[int, int] = {}  # id -> depth below it, once finished
    active: set[int] = set()  # containers on the current path (a second visit is a cycle)
    keep_alive = []  # ids stay unique while the walk runs
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        item, finished = stack.pop()
        children = _children(item)
        if children is None:
            continue
        key = id(item)
        if finished:
            active.discard(key)
            depth_of[key] = 1 + max((depth_of.get(id(c), 0) for c in children), default=0)
            if depth_of[key] > max_depth:
                raise InputLimitError(f"containers nested more than {max_depth} deep")
            continue
        if key in depth_of:
            continue
        if key in active:
            raise InputLimitError("a container holds itself (a cyclic structure)")
        active.add(key)
        keep_alive.append(item)
        stack.append((item, True))
        if len(active) > max_depth:
            raise InputLimitError(f"containers nested more than {max_depth} deep")
        stack.extend((child, False) for child in children)


def _children(item: Any) -> list[Any] | None:
    if isinstance(item, dict):
        return [*item.keys(), *item.values()]
    if isinstance(item, list | tuple | set | frozenset):
        return list(item)
    return None


def load_json(path: str | os.PathLike[str], max_bytes: int = MAX_INPUT_BYTES,
              max_depth: int = MAX_NESTING_DEPTH) -> Any:
    """Parse a JSON file within size and nesting limits; ValueError (or InputLimitError) names the file."""
    check_input_size(path, max_bytes)
    try:
        data = json.loads(Path(path).read_bytes())
    except RecursionError as error:
        raise InputLimitError(f"{path}: JSON nested too deeply to parse") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    check_nesting(data, max_depth, path)
    return data


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global: only dicts, lists, tuples, sets, strings, numbers, bools, None."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: only plain containers and numbers are accepted"
        )


def load_plain_pickle(path: str | os.PathLike[str], max_bytes: int = MAX_INPUT_BYTES,
                      max_depth: int = MAX_NESTING_DEPTH) -> Any:
    """Load a pickle that may only hold plain data, so a hostile file cannot run code; size and depth limited."""
    check_input_size(path, max_bytes)
    with open(path, "rb") as handle:
        try:
            data = _PlainDataUnpickler(io.BufferedReader(handle)).load()
        except RecursionError as error:
            raise InputLimitError(f"{path}: pickle nested too deeply to load") from error
    check_nesting(data, max_depth, path)
    return data
