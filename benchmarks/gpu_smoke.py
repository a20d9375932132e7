"""GPU smoke benchmark: config/full.yaml's paired 3D run, trained for a bounded number of steps and sampled.

It builds the run's network from config/config.yaml updated by config/full.yaml (as `--configfile
config/full.yaml` does), trains it with the pipeline's own loop (`noduleflow.models.training.train`: AdamW, warm-up and
cosine schedule, gradient clipping, EMA; bf16 autocast on CUDA, `training.bf16`) and the run's own loss
(`models.tasks.paired_loss`) on synthetic sphere pairs of the full patch size, then draws a few forecasts with
the evaluation's sampler (`evaluation.forecast.forecast_batch`, `models.sampler`). It prints training steps/s
(synchronised step times after the first, warm-up, step), seconds per forecast, peak memory (CUDA: allocated by
torch; CPU: the process's peak RSS) and the CPU reference of benchmarks/README.md (the raw flow row of the
training table; a smaller net at batch 2, so the ratio printed is per training sample and flatters the CPU).

    .venv/bin/python benchmarks/gpu_smoke.py [--device cuda|cpu] [--steps 30] [--samples 4] [--sample-steps N]
        [--run raw3d_bridge] [--quick] [--max-seconds 240]

On one CUDA GPU the defaults take a few minutes at most: training stops at `--max-seconds` whatever `--steps`
says. `--quick` shrinks the net (8-16-16-32 channels), the patch (32 x 32 x 8) and the batch (2) so the script runs on
a CPU (`--device cpu --steps 2 --quick --samples 1 --sample-steps 2`, what tests/test_gpu_smoke.py runs).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
QUICK_NET = {"channels": [8, 16, 16, 32], "num_head_channels": 8, "norm_num_groups": 8}
QUICK_PATCH = [32, 32, 8]  # x, y, z
CPU_ROW = re.compile(r"^\| raw flow [^|]*\| *[\d.]+ *\| *([\d.]+) *\| *([\d.]+) *\|$", re.MULTILINE)


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `override`, recursively for mappings (what Snakemake does with --configfile)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def full_config() -> dict[str, Any]:
    """config/config.yaml updated by config/full.yaml."""
    return merged(*(yaml.safe_load((REPO / "config" / name).read_text()) for name in ("config.yaml", "full.yaml")))


def sphere_pairs(count: int, size_xyz: list[int], spacing_mm: list[float], window: list[float], seed: int
                 ) -> list[dict[str, Any]]:
    """Prior / follow-up patches (1, Z, Y, X) in [-1, 1] with a sphere that grows or shrinks, and its boxes."""
    import torch

    from noduleflow.hu import to_unit_range

    rng = np.random.default_rng(seed)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(size_xyz[::-1], spacing_mm[::-1], strict=True)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    distance = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    half = [n // 2 for n in size_xyz]
    items = []
    for _ in range(count):
        radii = rng.uniform(2.0, min(size_xyz[0] * spacing_mm[0], size_xyz[2] * spacing_mm[2]) / 4.0, 2)
        images, boxes = [], []
        for radius in radii:
            hu = np.where(distance <= radius, 40.0, -850.0) + rng.normal(0.0, 20.0, distance.shape)
            images.append(torch.from_numpy(to_unit_range(hu, tuple(window)).astype(np.float32))[None])
            r = [int(np.ceil(radius / s)) for s in spacing_mm]  # x, y, z voxels
            boxes.append(torch.tensor([half[1] - r[1], half[1] + r[1], half[0] - r[0], half[0] + r[0],
                                       half[2] - r[2], half[2] + r[2]]))
        items.append({"prior": images[0], "follow_up": images[1], "bbox_a": boxes[0], "bbox_b": boxes[1],
                      "delta_days": torch.tensor(float(rng.uniform(300.0, 800.0)))})
    return items


def cpu_reference() -> tuple[float, float] | None:
    """(train steps/s, sample s/patch) of the raw flow on CPU in benchmarks/README.md, if the row is there."""
    found = CPU_ROW.search((REPO / "benchmarks" / "README.md").read_text())
    return (float(found.group(1)), float(found.group(2))) if found else None


def peak_memory_gib(device: Any) -> tuple[float, str]:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30, "CUDA memory allocated by torch"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "process peak RSS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--run", default="raw3d_bridge", help="a raw-space paired run of config/full.yaml")
    parser.add_argument("--steps", type=int, default=30, help="training steps at most (>= 2)")
    parser.add_argument("--samples", type=int, default=4, help="forecasts drawn after training")
    parser.add_argument("--sample-steps", type=int, help="sampler steps (default: the config's models.sampler)")
    parser.add_argument("--max-seconds", type=float, default=240.0, help="stop training after this long")
    parser.add_argument("--quick", action="store_true", help="a small net and patch, batch 2 (CPU smoke run)")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is a warm-up)")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the pipeline's training loop takes a GPU whenever it sees one
    import torch

    from noduleflow import distributed
    from noduleflow.evaluation.forecast import forecast_batch, forecast_settings
    from noduleflow.models.flow import VelocityNet
    from noduleflow.models.growth import sample_level
    from noduleflow.models.settings import RunSettings
    from noduleflow.models.tasks import paired_loss, run_hparams
    from noduleflow.models.training import TrainSettings, seeded_model, train
    from noduleflow.settings import from_config

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_smoke: no CUDA GPU here; run with --device cpu (add --quick for a small net)")
    device = distributed.device()
    config = full_config()
    run = {**config["models"]["runs"][args.run], "sigma": config["models"]["sigma"]}
    if run["space"] != "raw":
        sys.exit(f"gpu_smoke: run {args.run!r} is in {run['space']!r} space; this script trains raw-space runs")
    patch = dict(config["patch"])
    if args.quick:
        run["net"] = {**run["net"], **QUICK_NET}
        patch["size"] = QUICK_PATCH
    batch = 2 if args.quick else int(run["training"]["batch_size"])
    settings = from_config(TrainSettings, run["training"], steps=args.steps, batch_size=batch,
                           checkpoint_every=args.steps, log_every=args.steps, seed=0)
    run = from_config(RunSettings, run)
    data = sphere_pairs(2 * batch, patch["size"], patch["spacing_mm"], patch["hu_window"], seed=0)
    hparams = run_hparams(run, 1)
    net = seeded_model(lambda: VelocityNet(hparams), 0)
    loss = paired_loss(run, (1.0, 1.0, 1.0))
    starts: list[float] = []

    def timed_loss(model: torch.nn.Module, items: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        starts.append(time.perf_counter())  # the previous step has finished
        if len(starts) > 2 and starts[-1] - starts[1] > args.max_seconds:
            raise TimeoutError
        return loss(model, items, generator)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as work_dir:
        try:
            model = train(net, timed_loss, data, settings, work_dir, {"smoke": True}).model
        except TimeoutError:
            model = net.eval()
    # steps 2 .. n-1 run between the second and the last step's start (the last one is followed by a checkpoint);
    # with 2 steps only the first, warm-up, step is timed
    first = 1 if len(starts) > 2 else 0
    timed = len(starts) - 1 - first
    steps_per_s = timed / (starts[-1] - starts[first])
    timed_what = f"{timed} steps after a warm-up step" if first else "the first step, warm-up included"
    train_peak, memory_kind = peak_memory_gib(device)

    sampler = {**config["models"]["sampler"], **({"steps": args.sample_steps} if args.sample_steps else {})}
    forecast = forecast_settings(config["evaluation"], sampler, 0)
    priors = torch.stack([item["prior"] for item in data[: args.samples]]).to(device)
    delta = torch.stack([item["delta_days"] for item in data[: args.samples]]).to(device)
    forecast_batch(model, run, priors[:1], delta[:1], [0], [0.5], forecast)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    forecasts = forecast_batch(model, run, priors, delta, list(range(len(priors))),
                               [sample_level(s, len(priors)) for s in range(len(priors))], forecast)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    per_forecast = (time.perf_counter() - started) / len(priors)
    peak, _ = peak_memory_gib(device)
    assert torch.isfinite(forecasts).all(), "a forecast is not finite"

    size = "x".join(str(n) for n in patch["size"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    precision = "bf16 autocast" if (settings.bf16 if device.type == "cuda" else settings.bf16_cpu) else "float32"
    params = sum(p.numel() for p in net.parameters()) / 1e6
    print(f"gpu_smoke: run {args.run}{' (quick)' if args.quick else ''} on {name}, {precision}, patch {size}, "
          f"batch {batch}, {params:.1f} M parameters")
    print(f"train: {steps_per_s:.3f} steps/s over {timed_what} "
          f"({steps_per_s * batch:.2f} samples/s); peak memory {train_peak:.2f} GiB ({memory_kind})")
    print(f"sample: {per_forecast:.2f} s per forecast ({sampler['method']} {sampler['steps']}, {len(priors)} "
          f"forecasts in one batch); peak memory {peak:.2f} GiB")
    reference = cpu_reference()
    if reference is None:
        print("CPU reference: the raw flow row of benchmarks/README.md's training table is missing")
    else:
        cpu_steps, cpu_sample = reference
        print(f"CPU reference (benchmarks/README.md, raw flow, a smaller net at batch 2, float32, 1 thread): "
              f"{cpu_steps} steps/s, {cpu_sample} s per forecast; here {steps_per_s * batch / (cpu_steps * 2):.1f}x "
              f"its training samples/s, {cpu_sample / per_forecast:.1f}x its sampling speed")


if __name__ == "__main__":
    main()
