"""How noduleflow's plan scales to NLST: `snakemake -n` time, peak memory and jobs per rule, against a per-exam design.

Writes an NLST-sized synthetic cohort into a scratch folder: a manifest (one series per exam, 1-3 yearly exams per
patient), an empty placeholder file per image (planning only needs the files to exist; only `exam_table` reads
image headers) and a tracking file with nodules on about a third of the patients. Then, in one run, it times:

1. parse: `snakemake --list-rules`, the Snakefile alone (every SLURM job parses it again), next to
   `snakemake --version`, Snakemake's own start-up (the floor);
2. plan, fresh: `snakemake -n` before anything ran (the shard jobs wait on the split tables, a checkpoint: <TBD>);
3. plan, after the metadata stage: `snakemake -n` as a user sees it on NLST once `snakemake metadata` has run.
   `exam_table` cannot read placeholder headers, so its outputs are written here with made-up geometry; the rest
   of the metadata stage (tracking table, split tables, problems) runs for real;
4. baseline: the same plan for a one-job-per-exam design, a generated Snakefile with one registration job per
   follow-up exam and one patch job per exam, its exam lists read from the same split tables at parse time.

    .venv/bin/python benchmarks/dag_scale.py [--patients 26000] [--shards 140 20 40] [--seed 0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from noduleflow.ids import nlst_exam_id
from noduleflow.io import write_csv, write_parquet, write_pickle
from noduleflow.metadata.manifest import REQUIRED_COLUMNS, exam_to_nifti
from noduleflow.problems import ProblemLog

REPO = Path(__file__).resolve().parents[1]
SHAPE = [512, 512, 200]  # made-up geometry of every placeholder image (x, y, z voxels)
SPACING = [0.7, 0.7, 1.25]
NODULE_PATIENTS = 0.36  # NLST: 9,447 of ~26,000 patients have tracked nodules
NODULES_PER_PATIENT = (1, 6)  # physical nodules, inclusive
SEEN = 0.55  # chance that a nodule is annotated in each exam of its patient

PER_EXAM_SNAKEFILE = '''
import pandas as pd

SPLITS = ["train", "val", "test"]
EXAMS = {s: pd.read_parquet(f"results/metadata/{s}/exams.parquet") for s in SPLITS}
IMAGE = {e: p for t in EXAMS.values() for e, p in zip(t["exam_id"], t["image_path"])}
FIXED = {}  # exam -> the patient's first exam, its registration target
for table in EXAMS.values():
    for _, exams in table.groupby("pid", sort=True)["exam_id"]:
        FIXED.update({exam: exams.iloc[0] for exam in exams})
FOLLOW_UPS = {s: [e for e in t["exam_id"] if FIXED[e] != e] for s, t in EXAMS.items()}


rule all:
    input: expand("per_exam/cache/{split}/index.parquet", split=SPLITS)


rule register_exam:
    input: moving=lambda w: IMAGE[w.exam], fixed=lambda w: IMAGE[FIXED[w.exam]]
    output: "per_exam/registration/{split}/{exam}.parquet"
    shell: "touch {output}"


rule registration_qc:
    input: lambda w: expand("per_exam/registration/{split}/{exam}.parquet", split=w.split, exam=FOLLOW_UPS[w.split])
    output: "per_exam/{split}/exams_registered.parquet"
    shell: "touch {output}"


rule cache_exam:
    input: registered="per_exam/{split}/exams_registered.parquet", image=lambda w: IMAGE[w.exam]
    output: "per_exam/cache/{split}/{exam}.npy"
    shell: "touch {output}"


rule cache_index:
    input: lambda w: expand("per_exam/cache/{split}/{exam}.npy", split=w.split, exam=EXAMS[w.split]["exam_id"])
    output: "per_exam/cache/{split}/index.parquet"
    shell: "touch {output}"
'''


@dataclass
class Measurement:
    """One timed Snakemake call."""

    name: str
    seconds: float  # wall time
    cpu_seconds: float  # user + system: what the wall time would be on an idle core
    peak_mb: float
    jobs: dict[str, int]  # per rule, from Snakemake's job stats (empty without a plan)
    tbd: bool  # some inputs are unknown until a checkpoint ran


def write_cohort(folder: Path, patients: int, rng: np.random.Generator) -> dict[str, int]:
    """Manifest, placeholder images and tracking file of a synthetic NLST-sized cohort; counts of what was written."""
    images = folder / "images"
    images.mkdir(parents=True)
    rows, tracking, nodule_rows = [], {}, 0
    for index in range(patients):
        pid = str(100000 + index)
        timepoints = sorted(rng.choice(3, size=rng.choice([1, 2, 3], p=[0.04, 0.04, 0.92]), replace=False))
        exams = {}
        for timepoint in timepoints:
            series_uid = f"1.2.840.{index}.{timepoint}.{rng.integers(10**9, 10**10)}"
            exams[int(timepoint)] = exam_id = nlst_exam_id(pid, int(timepoint), series_uid)
            rows.append({"pid": pid, "exam_id": exam_id, "screen_timepoint": int(timepoint),
                         "days_since_baseline": 365.0 * timepoint + rng.integers(-30, 30),
                         "series_uid": series_uid, "slice_thickness": 1.25,
                         "image_path": f"images/{exam_id}.nii.gz"})
            (images / f"{exam_id}.nii.gz").touch()
        if rng.random() >= NODULE_PATIENTS:
            continue
        nodules = {}
        for group in range(1, rng.integers(NODULES_PER_PATIENT[0], NODULES_PER_PATIENT[1] + 1) + 1):
            seen = {t: e for t, e in exams.items() if rng.random() < SEEN}
            nodules[group] = {t: _lesion(e, rng) for t, e in seen.items()}
            nodule_rows += len(seen)
        tracking[pid] = {group: lesions for group, lesions in nodules.items() if lesions}
    pd.DataFrame(rows, columns=REQUIRED_COLUMNS).to_csv(folder / "manifest.csv", index=False)
    with open(folder / "nodules.pkl", "wb") as handle:
        pickle.dump(tracking, handle)
    return {"patients": patients, "exams": len(rows), "nodule rows": nodule_rows}


def _lesion(exam_id: str, rng: np.random.Generator) -> dict:
    i, j, k = (int(v) for v in rng.integers([150, 150, 40], [350, 350, 160]))
    return {"exam": exam_id, "volume": float(rng.uniform(10, 500)), "center": [i, j, k],
            "coords": [i - 4, i + 4, j - 4, j + 4, k - 2, k + 2]}


def write_exam_table(workdir: Path, manifest: Path) -> None:
    """exam_table's outputs for placeholder images: the manifest's rows with made-up geometry."""
    series = pd.read_csv(manifest, dtype={"pid": str, "exam_id": str, "series_uid": str})
    series["image_path"] = [os.path.normpath(manifest.parent / p) for p in series["image_path"]]
    series["pixel_spacing"] = SPACING[0]
    series["split"] = pd.Series(pd.NA, index=series.index, dtype="string")
    series["num_slices"] = SHAPE[2]
    for column, value in (("shape", SHAPE), ("spacing", SPACING), ("origin", [0.0, 0.0, 0.0]),
                          ("direction", [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])):
        series[column] = [value] * len(series)
    metadata = workdir / "results" / "metadata"
    write_parquet(series, metadata / "exam_series.parquet")
    write_pickle(exam_to_nifti(series), metadata / "exam_to_nifti.pkl")
    write_csv(ProblemLog("manifest").frame(), metadata / "problems" / "manifest.csv")


def run_snakemake(name: str, workdir: Path, *args: str) -> Measurement:
    """Run Snakemake in `workdir`; wall and CPU time, peak memory (max RSS) and the job stats of its plan."""
    log = workdir / f"{name}.out"
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "snakemake", *args], cwd=workdir, stdout=out,
                                   stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"snakemake {' '.join(args)} failed:\n{text[-4000:]}")
    return Measurement(name, seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, job_stats(text),
                       "<TBD>" in text)


def job_stats(text: str) -> dict[str, int]:
    """Jobs per rule from the `Job stats:` table of Snakemake's output."""
    if "Job stats:" not in text:
        return {}
    lines = text[text.index("Job stats:"):].split("\n\n")[0].splitlines()[3:]
    return {rule: int(count) for rule, count in (line.split() for line in lines) if rule != "total"}


def split_exams(workdir: Path) -> int:
    """Exams in the split tables: what both designs plan for."""
    return sum(len(pd.read_parquet(workdir / "results" / "metadata" / split / "exams.parquet", columns=["exam_id"]))
               for split in ("train", "val", "test"))


def check_baseline(baseline: Measurement, exams: int) -> None:
    """Fail when the one-job-per-exam baseline plans fewer jobs than there are exams: its ratio would mean nothing."""
    jobs = sum(baseline.jobs.values())
    if exams == 0 or jobs < exams:
        raise RuntimeError(f"the per-exam baseline planned {jobs:,} jobs for {exams:,} exams in the split tables "
                           f"({baseline.jobs}); the comparison would be meaningless")


def report(measurements: list[Measurement], cohort: dict[str, int], shards: dict[str, int]) -> str:
    """A markdown summary of the cohort and the measurements."""
    lines = [f"cohort: {', '.join(f'{v:,} {k}' for k, v in cohort.items())}; shards: {shards}", "",
             "| measurement | wall s | CPU s | peak MB | jobs | <TBD> |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {m.name} | {m.seconds:.2f} | {m.cpu_seconds:.2f} | {m.peak_mb:.0f} | {sum(m.jobs.values()):,} | "
              f"{'yes' if m.tbd else 'no'} |" for m in measurements]
    for m in measurements:
        if m.jobs:
            lines += ["", f"{m.name}: " + ", ".join(f"{rule} {count:,}" for rule, count in m.jobs.items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=26000)
    parser.add_argument("--shards", type=int, nargs=3, default=[140, 20, 40], metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="build in this (new) folder and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="dag_scale_"))
    data, workdir = root / "data", root / "run"
    started = time.perf_counter()
    cohort = write_cohort(data, args.patients, np.random.default_rng(args.seed))
    print(f"wrote the cohort in {time.perf_counter() - started:.0f} s: {cohort}", flush=True)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["data"].update(source="files", manifest=str(data / "manifest.csv"), nodules=str(data / "nodules.pkl"))
    config["shards"] = dict(zip(["train", "val", "test"], args.shards, strict=True))
    (workdir / "config").mkdir(parents=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    (workdir / "per_exam.smk").write_text(PER_EXAM_SNAKEFILE)
    snakefile = str(REPO / "Snakefile")
    load = os.getloadavg()[0]
    try:
        measurements = [run_snakemake("start-up (--version)", workdir, "--version"),
                        run_snakemake("parse (--list-rules)", workdir, "-s", snakefile, "--list-rules"),
                        run_snakemake("plan, fresh (-n)", workdir, "-s", snakefile, "-n")]
        # exam_table reads the manifest dicom_to_nifti writes (it only makes image paths absolute here); its
        # outputs are written after that one, so that the metadata stage keeps them.
        run_snakemake("input manifest", workdir, "-s", snakefile, "--cores", "2", "results/dicom/manifest.csv")
        write_exam_table(workdir, workdir / "results" / "dicom" / "manifest.csv")
        run_snakemake("metadata stage", workdir, "-s", snakefile, "--cores", "2", "metadata")
        measurements += [run_snakemake("plan after metadata (-n)", workdir, "-s", snakefile, "-n"),
                         run_snakemake("per-exam baseline (-n)", workdir, "-s", "per_exam.smk", "-n")]
        check_baseline(measurements[-1], split_exams(workdir))
    finally:
        if args.keep is None:
            shutil.rmtree(root)
    print(f"load average before the measurements: {load:.1f} on {os.cpu_count()} cores")
    print(report(measurements, cohort, config["shards"]))


if __name__ == "__main__":
    main()
