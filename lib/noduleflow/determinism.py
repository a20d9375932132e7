"""Determinism check: the same config and seed must give the same tables, caches and metrics.

`python -m noduleflow.determinism [--cores N] [--keep DIR] [snakemake args...]` runs the workflow twice in two
fresh folders (each with the config of the current folder) and compares a digest of every table (`.parquet`,
`.csv`, `.json`) and array (`.npy`) under `results/`. Wall-clock columns (`seconds`, `runtime_s`) are left out
of the digests, as are model files (torch's zip container is not byte-stable; the metrics they produce are
compared instead). Exit status 0 when both runs agree, 1 with the differing files listed otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

TIMING_COLUMNS = ("seconds", "runtime_s")
COMPARED_SUFFIXES = (".parquet", ".csv", ".json", ".npy")
SNAKEFILE = Path(__file__).resolve().parents[2] / "Snakefile"


def digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a result file; tables with wall-clock columns are hashed without them."""
    path = Path(path)
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        timing = [c for c in TIMING_COLUMNS if c in table.column_names]
        if timing:
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.drop(timing).schema) as writer:
                writer.write_table(table.drop(timing))
            return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()
    if path.suffix == ".csv":
        frame = pd.read_csv(path)
        timing = [c for c in TIMING_COLUMNS if c in frame.columns]
        if timing:
            buffer = io.StringIO()
            frame.drop(columns=timing).to_csv(buffer, index=False)
            return hashlib.sha256(buffer.getvalue().encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprints(workdir: str | os.PathLike[str]) -> dict[str, str]:
    """Digest of every compared file under `workdir/results`, keyed by its path relative to `workdir`."""
    root = Path(workdir)
    return {path.relative_to(root).as_posix(): digest(path) for path in sorted((root / "results").rglob("*"))
            if path.is_file() and path.suffix in COMPARED_SUFFIXES}


def differences(first: dict[str, str], second: dict[str, str]) -> list[str]:
    """Files missing from one run or with different content, sorted."""
    return sorted(name for name in first.keys() | second.keys() if first.get(name) != second.get(name))


def run_twice(config_dir: Path, cores: int, extra: list[str], keep: Path | None) -> list[str]:
    """Run the workflow in two fresh folders with the config of `config_dir`; return the differing files."""
    base = keep or Path(tempfile.mkdtemp(prefix="noduleflow-determinism-"))
    prints = []
    for name in ("first", "second"):
        workdir = base / name
        shutil.copytree(config_dir / "config", workdir / "config", dirs_exist_ok=True)
        command = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir),
                   "--cores", str(cores), *extra]
        subprocess.run(command, check=True)
        prints.append(fingerprints(workdir))
    if keep is None:
        shutil.rmtree(base)
    return differences(*prints)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="folder to keep both runs in (default: a temporary one)")
    args, extra = parser.parse_known_args(argv)
    changed = run_twice(Path.cwd(), args.cores, extra, args.keep)
    for name in changed:
        print(f"differs: {name}")
    print("deterministic" if not changed else f"{len(changed)} file(s) differ between two identical runs")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
