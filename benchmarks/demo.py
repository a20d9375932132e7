"""The README's first command, timed: the default pipeline from a clean folder, its wall time and peak memory.

Copies the repository's tracked files (as they are in the working tree) into a fresh folder and runs
`snakemake --profile profiles/local` there, as the README's first command does after the install. While it runs,
the memory of the whole process tree (Snakemake and every job it starts) is sampled; afterwards the rules'
`benchmark:` records (logs/benchmarks/) say where the CPU time went. The last line is the result, in the form

    demo: <minutes> min wall, <CPU seconds> CPU-s, peak memory <GB> GB (process tree RSS), <jobs> jobs; load ...

    .venv/bin/python benchmarks/demo.py [--cores N] [--keep DIR] [--top 12]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil

REPO = Path(__file__).resolve().parents[1]


def copy_checkout(target: Path) -> None:
    """The tracked files of the working tree (no results, logs or caches) in `target`."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file() and not source.is_symlink():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
        elif source.is_symlink():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(source), target / name)


class TreeMemory:
    """Peak of the summed resident memory of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, every_s: float = 0.25) -> None:
        self.root, self.every_s, self.peak_bytes = psutil.Process(pid), every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            for process in processes:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass  # ended between listing and reading
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(self.every_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_bytes


def rule_cpu(workdir: Path) -> pd.DataFrame:
    """CPU seconds, wall seconds and jobs per rule from the benchmark records (logs/benchmarks/**/*.tsv)."""
    rows = []
    for path in sorted((workdir / "logs" / "benchmarks").rglob("*.tsv")):
        record = pd.read_csv(path, sep="\t")
        relative = path.relative_to(workdir / "logs" / "benchmarks").with_suffix("")
        rows.append({"record": str(relative), "cpu_s": float(record["cpu_time"].iloc[0]),
                     "wall_s": float(record["s"].iloc[0]), "max_rss_mb": float(record["max_rss"].iloc[0])})
    return pd.DataFrame(rows, columns=["record", "cpu_s", "wall_s", "max_rss_mb"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cores", help="passed to snakemake (default: the profile's, every core)")
    parser.add_argument("--keep", type=Path, help="run in this (new) folder and keep it")
    parser.add_argument("--top", type=int, default=12, help="benchmark records listed, most CPU first")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="noduleflow_demo_"))
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        sys.exit(f"{root} is not empty: the demo is measured from a clean folder")
    copy_checkout(root)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "lib"),
                                                                      os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "snakemake", "--profile", "profiles/local"]
    if args.cores:
        command += ["--cores", args.cores]
    load = os.getloadavg()[0]
    log = root / "demo.out"
    finished = False  # a failed run's folder is kept for its logs
    try:
        started = time.perf_counter()
        with open(log, "w") as out:
            process = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
            memory = TreeMemory(process.pid)
            _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        peak = memory.stop()
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"the demo failed (log: {log}):\n{log.read_text()[-4000:]}")
        records = rule_cpu(root)
        jobs = log.read_text().count("Finished jobid")
        finished = True
    finally:
        if args.keep is None and finished:
            shutil.rmtree(root)
    cpu = usage.ru_utime + usage.ru_stime
    print(records.sort_values("cpu_s", ascending=False).head(args.top).to_string(index=False, float_format="%.1f"))
    print(f"benchmark records: {records['cpu_s'].sum():.0f} CPU-s in {len(records)} jobs")
    print(f"demo: {seconds / 60:.1f} min wall, {cpu:.0f} CPU-s, peak memory {peak / 1e9:.2f} GB (process tree RSS), "
          f"{jobs} jobs; load {load:.1f} on {os.cpu_count()} cores before")


if __name__ == "__main__":
    main()
