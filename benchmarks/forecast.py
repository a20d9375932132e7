"""Benchmark `noduleflow forecast`: one nodule, one interval, 8 samples with the quality forecaster.

The run has `config/quality.yaml`'s architecture (`models.runs.raw3d_noisy_prior`, patch 36 x 36 x 12 at
0.9 x 0.9 x 2.5 mm) and the default sampler (`models.sampler`, Heun 20 steps); its weights are untrained (seeded),
which costs the same time as trained ones. The exam is a synthetic CT of screening size (512 x 512 x `--slices`
at 0.7 x 0.7 x 1.25 mm, int16 NIfTI, gzip) with one nodule. Timed in this process, after a warm-up forecast:

- the whole forecast as the command runs it (load and check the model file, read the exam, cut the patch,
  sample, measure every sample, write the NIfTI files, the card and the table), and
- the baseline: the sampling alone (`forecast_batch` of the same 8 samples),

and their ratio (what reading, cutting, measuring and writing add to sampling), and the peak resident memory
of the process (Python, torch and the exam included). Goal: <= 60 s and <= 2 GB on 2 CPU cores.

    .venv/bin/python benchmarks/forecast.py [--samples 8] [--slices 240] [--threads 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from noduleflow.evaluation.forecast import ForecastSettings, forecast_batch
from noduleflow.evaluation.segmenter import build_segmenter
from noduleflow.imaging import Geometry, write_nifti
from noduleflow.models.flow import VelocityNet
from noduleflow.models.tasks import patch_geometry, run_hparams
from noduleflow.predict import (ForecastJob, NoduleRequest, cut_prior, forecast_requests, load_portable_run,
                                read_exam, voxel_box)
from noduleflow.training import derived_seed, save_model, seeded_model

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
    z, y, x = np.ogrid[:slices, :512, :512]
    centre = np.array([slices // 2, 256, 256])
    distance = np.sqrt(((z - centre[0]) * 1.25) ** 2 + ((y - centre[1]) * 0.7) ** 2 + ((x - centre[2]) * 0.7) ** 2)
    texture = (np.random.default_rng(0).integers(-20, 20, size=(1, 512, 512))).astype(np.int16)
    volume = np.where(distance <= 6.0, np.int16(40), np.int16(-850) + texture)
    write_nifti(volume.astype(np.int16), geometry, path)
    return geometry, (247, 265, 247, 265, slices // 2 - 6, slices // 2 + 6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--slices", type=int, default=240)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default, quality = _configs()
    run = {**quality["models"]["runs"][RUN], "sigma": default["models"]["sigma"]}
    patch = {**default["patch"], **quality["patch"]}
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        hparams = run_hparams(run, 1)
        save_model(folder / "model.pt", seeded_model(lambda: VelocityNet(hparams), 0), {**hparams, "run": run},
                   meta={"patch": patch_geometry(patch), "sampler": default["models"]["sampler"], "seed": 0})
        geometry, box = _exam(folder / "exam.nii.gz", args.slices)
        request = NoduleRequest("n1", str(folder / "exam.nii.gz"), (365.0,), box=box)
        segmenter = build_segmenter(default["segmentation"])

        def forecast(out: str) -> float:
            started = time.perf_counter()
            portable = load_portable_run(folder / "model.pt", expected_patch=patch, device=device)
            settings = ForecastSettings(steps=portable.sampler["steps"], sampler=portable.sampler["method"])
            forecast_requests(portable, [request], ForecastJob(args.samples, settings, segmenter), folder / out,
                              folder / f"{out}.csv")
            return time.perf_counter() - started

        forecast("warm-up")
        whole = forecast("timed")
        portable = load_portable_run(folder / "model.pt", device=device)
        prior = cut_prior(read_exam(folder / "exam.nii.gz"), *voxel_box(request, geometry), portable)
        priors = torch.from_numpy(prior.image)[None, None].expand(args.samples, 1, *prior.image.shape).to(device)
        settings = ForecastSettings(steps=portable.sampler["steps"], sampler=portable.sampler["method"])
        started = time.perf_counter()
        forecast_batch(portable.net, portable.run, priors, torch.full((args.samples,), 365.0, device=device),
                       [derived_seed(0, "forecast", 0, s) for s in range(args.samples)], settings)
        if device.type == "cuda":
            torch.cuda.synchronize()
        sampling = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(f"device {device}, {args.threads} threads, {args.samples} samples, exam 512 x 512 x {args.slices}, "
          f"patch {patch['size']} at {patch['spacing_mm']} mm, Heun {default['models']['sampler']['steps']} steps")
    print("| measurement | seconds |\n| --- | ---: |")
    print(f"| whole forecast (`noduleflow forecast`) | {whole:.2f} |")
    print(f"| baseline: sampling alone (`forecast_batch`) | {sampling:.2f} |")
    print(f"| ratio whole / sampling | {whole / sampling:.2f} |")
    print(f"peak resident memory of the process: {peak_mb:.0f} MB; goals: <= 60 s and <= 2048 MB: "
          f"{'met' if whole <= 60 and peak_mb <= 2048 else 'NOT met'}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
