"""Benchmark `noduleflow forecast`: one nodule, one interval, 8 samples with the quality forecaster.

The run has `config/quality.yaml`'s architecture (`models.runs.raw3d_noisy_prior`, patch 36 x 36 x 12 at
0.9 x 0.9 x 2.5 mm) and the quality config's sampler (`models.sampler`, Heun 20 steps); its weights are untrained
(seeded), which costs the same time as trained ones. The exam is a synthetic CT of screening size
(512 x 512 x `--slices` at 0.7 x 0.7 x 1.25 mm, int16 NIfTI, gzip) with one nodule. Timed:

- `noduleflow forecast` as a user runs it, in a child process, twice (the second with the exam in the page
  cache): Python start-up and imports, loading and checking the model file, reading the exam, cutting the
  patch, sampling, measuring every sample, writing the NIfTI files, the card and the table;
- the baseline, in this process: the sampling alone (`forecast_batch` of the same 8 samples),

their ratio (what everything around the sampling adds), wall and CPU (user + system) seconds of each (on a
busy machine, a free one would take about the CPU seconds divided by up to the number of threads), and the peak
resident memory of the command (Python, torch and the exam included). CUDA when present. Goal: <= 60 s and
<= 2 GB on 2 CPU cores.

    .venv/bin/python benchmarks/forecast.py [--samples 8] [--slices 240] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from noduleflow.cache.patches import PatchSettings
from noduleflow.evaluation.forecast import forecast_batch, forecast_settings
from noduleflow.evaluation.predict import NoduleRequest, cut_prior, load_portable_run, read_exam, voxel_box
from noduleflow.imaging import Geometry, write_nifti
from noduleflow.models.flow import VelocityNet
from noduleflow.models.growth import sample_level
from noduleflow.models.settings import RunSettings
from noduleflow.models.tasks import patch_geometry, run_hparams
from noduleflow.models.training import derived_seed, save_model, seeded_model
from noduleflow.settings import from_config

REPO = Path(__file__).resolve().parents[1]
RUN = "raw3d_noisy_prior"


def _configs() -> tuple[dict, dict]:
    """The default config updated by config/quality.yaml (one level deep is enough for the keys used here)."""
    default = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    quality = yaml.safe_load((REPO / "config" / "quality.yaml").read_text())
    return default, quality


def _exam(path: Path, slices: int) -> tuple[Geometry, tuple[int, ...]]:
    """A 512 x 512 x `slices` int16 exam with a 6 mm nodule in its middle; returns its geometry and the nodule box."""
    geometry = Geometry((512, 512, slices), (0.7, 0.7, 1.25), (-180.0, -180.0, -300.0),
                        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    texture = np.random.default_rng(0).integers(-20, 20, size=(512, 512), dtype=np.int16)
    volume = np.empty((slices, 512, 512), dtype=np.int16)
    volume[:] = np.int16(-850) + texture
    z, y, x = np.ogrid[-12:13, -12:13, -12:13]
    centre = np.array([slices // 2, 256, 256])
    sphere = np.sqrt((z * 1.25) ** 2 + (y * 0.7) ** 2 + (x * 0.7) ** 2) <= 6.0
    block = volume[centre[0] - 12:centre[0] + 13, 244:269, 244:269]
    block[sphere] = 40
    write_nifti(volume, geometry, path)
    return geometry, (247, 265, 247, 265, slices // 2 - 6, slices // 2 + 6)


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _command(model: Path, exam: Path, box: tuple[int, ...], samples: int, out: Path,
             threads: int) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of `noduleflow forecast` run as a user runs it, in a child process
    (Python start-up included)."""
    command = [sys.executable, "-m", "noduleflow.cli", "forecast", "--model", str(model), "--image", str(exam),
               "--box", *map(str, box), "--days", "365", "--samples", str(samples), "--out", str(out)]
    started, cpu = time.perf_counter(), _cpu_seconds(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return time.perf_counter() - started, _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--slices", type=int, default=240)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default, quality = _configs()
    run = from_config(RunSettings, {**quality["models"]["runs"][RUN], "sigma": default["models"]["sigma"]})
    patch = {**default["patch"], **quality["patch"]}
    sampler = {**default["models"]["sampler"], **quality["models"].get("sampler", {})}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        hparams = run_hparams(run, 1)
        save_model(folder / "model.pt", seeded_model(lambda: VelocityNet(hparams), 0), {**hparams, "run": run.record()},
                   meta={"patch": patch_geometry(from_config(PatchSettings, patch)), "sampler": sampler, "seed": 0})
        geometry, box = _exam(folder / "exam.nii.gz", args.slices)
        timings = [_command(folder / "model.pt", folder / "exam.nii.gz", box, args.samples, folder / out,
                            args.threads) for out in ("warm-up", "timed")]
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # kB on Linux; the larger child
        portable = load_portable_run(folder / "model.pt")
        request = NoduleRequest("n1", str(folder / "exam.nii.gz"), (365.0,), box=box)
        prior = cut_prior(read_exam(folder / "exam.nii.gz"), *voxel_box(request, geometry), portable)
    device = portable.device
    priors = torch.from_numpy(prior.image)[None, None].expand(args.samples, 1, *prior.image.shape).to(device)
    settings = forecast_settings(default["evaluation"], portable.sampler, 0)
    started, cpu = time.perf_counter(), _cpu_seconds(resource.RUSAGE_SELF)
    forecast_batch(portable.net, portable.run, priors, torch.full((args.samples,), 365.0, device=device),
                   [derived_seed(0, "forecast", 0, s) for s in range(args.samples)],
                   [sample_level(s, args.samples) for s in range(args.samples)], settings)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sampling = (time.perf_counter() - started, _cpu_seconds(resource.RUSAGE_SELF) - cpu)
    print(f"device {device}, {args.threads} threads, {args.samples} samples, exam 512 x 512 x {args.slices}, "
          f"patch {patch['size']} at {patch['spacing_mm']} mm, {settings.sampler} {settings.steps} steps")
    print("| measurement | wall s | CPU s |\n| --- | ---: | ---: |")
    print(f"| `noduleflow forecast`, first run | {timings[0][0]:.2f} | {timings[0][1]:.2f} |")
    print(f"| `noduleflow forecast`, second run | {timings[1][0]:.2f} | {timings[1][1]:.2f} |")
    print(f"| baseline: sampling alone (`forecast_batch`, in this process) | {sampling[0]:.2f} | {sampling[1]:.2f} |")
    print(f"| ratio command / sampling | {timings[1][0] / sampling[0]:.2f} | {timings[1][1] / sampling[1]:.2f} |")
    print(f"peak resident memory of the command: {peak_mb:.0f} MB; goals <= 60 s and <= 2048 MB: "
          f"{'met' if timings[1][0] <= 60 and peak_mb <= 2048 else 'NOT met'} (wall time)")


if __name__ == "__main__":
    main()
