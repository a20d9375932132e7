"""Benchmark training and sampling speed of the 3D models, and the sampling error of Heun vs Euler.

At the full config's sizes (patches 1 x 32 x 128 x 128, latents 8 x 8 x 32 x 32) it times, for the 3D VAE, the
3D latent flow model (bridge, interval-conditioned) and the raw 3D flow model: training steps per second
(forward + backward + AdamW on random data, bf16 autocast on CUDA) and sampling seconds per patch (VAE: decoding
a latent; flow models: Heun with 20 steps, in latent space for the latent model; bf16 autocast on CUDA). Where a
model is too slow for the per-measurement time budget (`--budget`, e.g. on CPU) fewer steps are timed, at least 2
training steps after the warm-up, and the sampling time is scaled from fewer Heun steps (each step costs the
same); the table says so.

The sampling error is measured on a small velocity net at the latent size fitted for 150 steps to a synthetic
paired task (the follow-up is the prior shifted and scaled by the interval, plus a random smooth field, so that
paths cross), so that its velocity field is not trivial (an untrained net's is nearly constant in t). From the
same starts it compares Heun 10, Heun 20 and Euler 20 with Euler 100, and every sampler with the ODE's solution
(Heun 400), in float32 (TF32 off), and prints how much the velocity changes over dt = 0.005 at a fixed x (its
roughness in t, which limits Heun's order). Goal: Heun 20 within 1 % of Euler 100, i.e. 5x fewer steps (2.5x
fewer network evaluations: a Heun step takes two) for the same forecast. Euler 100 itself is off the solution by
about a quarter of Euler 20's distance to it (Euler's error is proportional to the step), which bounds how close
an accurate sampler can come to it.

The precision part times training steps of `config/quality.yaml`'s forecaster (1 x 12 x 36 x 36 patches, batch 8)
in float32 and with bf16 autocast on the chosen device, and prints the ratio (what `training.bf16_cpu` buys on a
CPU; a CPU without bf16 units, AVX512-BF16 or AMX, may be slower with it). The growth part times the same
forecaster without and with `raw3d_growth`'s growth head (the flow conditioned on a log ratio, plus the head's
loss) and prints the ratio.

    .venv/bin/python benchmarks/training.py [--device cuda|cpu] [--quick] [--batch 2] [--seed 0] [--budget 30]
        [--threads N] [--parts vae latent raw error precision growth]

On a free 2-core CPU the full sizes take about 5 minutes (the raw flow net needs about 30 s per training step and
at least 3 are run); on a busy CPU two threads can be many times slower than one (`--threads 1`). `--quick`
shrinks every channel count and halves the patch (1 x 16 x 64 x 64, latents 8 x 4 x 16 x 16) and the error fit
for a smoke run (about 30 s on CPU).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from noduleflow.models.flow import VelocityNet, flow_matching_loss, sample
from noduleflow.models.vae import build_vae, vae_loss

LATENT_CHANNELS = 8
PATCH = (1, 32, 128, 128)  # C, Z, Y, X
LATENT = (LATENT_CHANNELS, 8, 32, 32)  # the full VAE's latent grid: patch / 2^(levels - 1)
QUICK_PATCH = (1, 16, 64, 64)
QUICK_LATENT = (LATENT_CHANNELS, 4, 16, 16)
KL_WEIGHT = 1.0e-6
SAMPLE_STEPS = 20  # Heun steps of a timed sample (the config's sampler)
MAX_TIMED_STEPS = 20
DAYS = (300.0, 800.0)  # interval range of the random and synthetic pairs
GOAL = 0.01

FULL: dict[str, dict[str, Any]] = {
    "vae": {"spatial_dims": 3, "channels": [32, 64, 64], "latent_channels": LATENT_CHANNELS, "num_res_blocks": 1,
            "norm_num_groups": 16},
    "latent": {"spatial_dims": 3, "data_channels": LATENT_CHANNELS, "prior_channels": 0, "channels": [64, 128, 256],
               "attention_levels": [False, True, True], "num_res_blocks": 2, "num_head_channels": 32,
               "norm_num_groups": 16, "interval_dim": 128},
    "raw": {"spatial_dims": 3, "data_channels": 1, "prior_channels": 0, "channels": [32, 64, 128, 256],
            "attention_levels": [False, False, False, True], "num_res_blocks": 1, "num_head_channels": 32,
            "norm_num_groups": 16, "interval_dim": 128},
}
QUICK: dict[str, dict[str, Any]] = {
    "vae": {**FULL["vae"], "channels": [8, 16, 16], "norm_num_groups": 8},
    "latent": {**FULL["latent"], "channels": [16, 32, 64], "num_res_blocks": 1, "num_head_channels": 16,
               "norm_num_groups": 8, "interval_dim": 32},
    "raw": {**FULL["raw"], "channels": [8, 16, 32, 64], "num_head_channels": 16, "norm_num_groups": 8,
            "interval_dim": 32},
}
# config/quality.yaml's raw 3D forecaster (noisy_prior: the prior is concatenated), its patch and batch
QUALITY_NET: dict[str, Any] = {"spatial_dims": 3, "data_channels": 1, "prior_channels": 1, "channels": [16, 32, 64],
                               "attention_levels": [False, False, True], "num_res_blocks": 1, "num_head_channels": 16,
                               "norm_num_groups": 8, "interval_dim": 64}
QUALITY_PATCH, QUALITY_BATCH = (1, 12, 36, 36), 8
QUALITY_GROWTH: dict[str, Any] = {"channels": [16, 32], "crop": [18, 18, 6]}  # quality.yaml's raw3d_growth head
ERROR_NET: dict[str, Any] = {"spatial_dims": 3, "data_channels": LATENT_CHANNELS, "prior_channels": 0,
                             "channels": [16, 32], "attention_levels": [False, True], "num_res_blocks": 1,
                             "num_head_channels": 16, "norm_num_groups": 8, "interval_dim": 32}
ERROR_FIT: dict[str, float] = {"steps": 150, "batch": 4, "lr": 2.0e-3}  # quick: half the steps
ERROR_STARTS = 4
ERROR_METHODS = (("heun", 10), ("heun", 20), ("euler", 20), ("euler", 100))
REFERENCE = ("euler", 100)
EXACT = ("heun", 400)  # the ODE's solution, near enough: Heun's error falls with the square of the step
ROUGHNESS_DT = 0.005
ROUGHNESS_TIMES = 8


@dataclass
class Row:
    """One model's timings."""

    model: str
    params: int
    train_steps_per_s: float
    train_steps: int
    sample_s_per_patch: float
    sample_note: str
    peak_gib: float | None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, bf16: bool | None = None) -> torch.autocast:
    """bf16 autocast: on CUDA by default, anywhere when `bf16` says so."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda" if bf16 is None else bf16)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of fn takes, synchronised."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def time_training(model: nn.Module, loss_fn: Callable[[torch.Generator], torch.Tensor], device: torch.device,
                  warmup: int, budget: float, bf16: bool | None = None) -> tuple[float, int]:
    """Training steps per second (forward + backward + AdamW) and how many steps were timed after the warm-up.

    Times MAX_TIMED_STEPS steps, or fewer (at least 2) where the last warm-up step says they exceed `budget` s.
    `bf16`: autocast or not (default: on CUDA only).
    """
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0e-4, fused=device.type == "cuda")
    generator = torch.Generator(device).manual_seed(0)

    def step() -> None:
        with _autocast(device, bf16):
            loss = loss_fn(generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    last = math.inf
    for _ in range(warmup):
        last = _timed(step, device)
    steps = max(2, min(MAX_TIMED_STEPS, int(budget / last)))
    seconds = _timed(lambda: [step() for _ in range(steps)], device)
    return steps / seconds, steps


@torch.no_grad()
def time_flow_sampling(net: VelocityNet, x0: torch.Tensor, delta_days: torch.Tensor, device: torch.device,
                       budget: float) -> tuple[float, str]:
    """Seconds per patch of a Heun sample with SAMPLE_STEPS steps, and a note on how it was measured.

    One network evaluation warms up; where SAMPLE_STEPS Heun steps (2 evaluations each) would exceed twice
    `budget` s, fewer steps are timed and the time is scaled to SAMPLE_STEPS (every step costs the same).
    """
    net.eval()
    t = torch.zeros(x0.shape[0], device=device)
    with _autocast(device):
        evaluation = _timed(lambda: net(x0, t, None, delta_days), device)
        steps = SAMPLE_STEPS if 2 * evaluation * SAMPLE_STEPS <= 2 * budget else max(1, int(budget / (2 * evaluation)))
        repeats = max(1, min(3, int(budget / (2 * evaluation * steps))))
        seconds = _timed(lambda: [sample(net, x0, steps, "heun", None, delta_days) for _ in range(repeats)], device)
    per_patch = seconds / repeats * SAMPLE_STEPS / steps / x0.shape[0]
    if steps == SAMPLE_STEPS:
        return per_patch, f"heun {SAMPLE_STEPS}, {repeats} run(s)"
    return per_patch, f"heun {SAMPLE_STEPS} scaled from {steps} timed step(s) (over budget)"


@torch.no_grad()
def time_decoding(model: nn.Module, latents: torch.Tensor, device: torch.device, budget: float) -> tuple[float, str]:
    """Seconds per patch of decoding latents (one warm-up, then up to 5 timed calls within `budget` s)."""
    model.eval()
    with _autocast(device):
        last = _timed(lambda: model.decode(latents), device)
        repeats = max(1, min(5, int(budget / last)))
        seconds = _timed(lambda: [model.decode(latents) for _ in range(repeats)], device)
    return seconds / repeats / latents.shape[0], f"decode, {repeats} run(s)"


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _fresh(device: torch.device) -> None:
    """Free what earlier models left and restart the GPU's peak memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    """Peak GPU memory since `_fresh` (GiB; None on CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _days(batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return DAYS[0] + (DAYS[1] - DAYS[0]) * torch.rand(batch, generator=generator, device=device)


def bench_vae(hparams: dict[str, Any], patch: tuple[int, ...], latent: tuple[int, ...], batch: int,
              device: torch.device, warmup: int, budget: float, seed: int) -> Row:
    """Train steps/s on random patches and decoding time per patch of the 3D VAE."""
    _fresh(device)
    torch.manual_seed(seed)
    model = build_vae(hparams).to(device)
    generator = torch.Generator(device).manual_seed(seed)
    images = torch.randn(batch, *patch, generator=generator, device=device)
    rate, steps = time_training(model, lambda g: vae_loss(model, images, g, KL_WEIGHT), device, warmup, budget)
    latents = torch.randn(batch, *latent, generator=generator, device=device)
    seconds, note = time_decoding(model, latents, device, budget)
    return Row("vae", _params(model), rate, steps, seconds, note, _peak_gib(device))


def bench_flow(name: str, hparams: dict[str, Any], shape: tuple[int, ...], batch: int, device: torch.device,
               warmup: int, budget: float, seed: int) -> Row:
    """Train steps/s (bridge flow matching with interval) and Heun sampling time per patch of a velocity net."""
    _fresh(device)
    torch.manual_seed(seed)
    net = VelocityNet(hparams).to(device)
    generator = torch.Generator(device).manual_seed(seed)
    x0 = torch.randn(batch, *shape, generator=generator, device=device)
    x1 = torch.randn(batch, *shape, generator=generator, device=device)
    days = _days(batch, generator, device)
    rate, steps = time_training(net, lambda g: flow_matching_loss(net, x0, x1, g, 0.0, None, days), device,
                                warmup, budget)
    seconds, note = time_flow_sampling(net, x0, days, device, budget)
    return Row(name, _params(net), rate, steps, seconds, note, _peak_gib(device))


def bench_precision(device: torch.device, warmup: int, budget: float, seed: int) -> tuple[float, float]:
    """Training steps/s of the quality config's forecaster in float32 and with bf16 autocast (same weights, data)."""
    rates = []
    for bf16 in (False, True):
        _fresh(device)
        torch.manual_seed(seed)
        net = VelocityNet(QUALITY_NET).to(device)
        generator = torch.Generator(device).manual_seed(seed)
        prior, x1 = (torch.randn(QUALITY_BATCH, *QUALITY_PATCH, generator=generator, device=device) for _ in "ab")
        days = _days(QUALITY_BATCH, generator, device)
        x0 = prior + 0.5 * torch.randn(prior.shape, generator=generator, device=device)
        rates.append(time_training(net, lambda g: flow_matching_loss(net, x0, x1, g, 0.0, prior, days), device,
                                   warmup, budget, bf16)[0])
    return rates[0], rates[1]


def bench_growth(device: torch.device, warmup: int, budget: float, seed: int) -> tuple[float, float]:
    """Training steps/s of the quality config's forecaster without and with its growth head (`raw3d_growth`: the
    flow conditioned on a log ratio plus the head's negative log-likelihood), float32, same data."""
    rates = []
    for growth in (None, QUALITY_GROWTH):
        _fresh(device)
        torch.manual_seed(seed)
        net = VelocityNet({**QUALITY_NET, "growth": growth}).to(device)
        generator = torch.Generator(device).manual_seed(seed)
        prior, x1 = (torch.randn(QUALITY_BATCH, *QUALITY_PATCH, generator=generator, device=device) for _ in "ab")
        days = _days(QUALITY_BATCH, generator, device)
        x0 = prior + 0.5 * torch.randn(prior.shape, generator=generator, device=device)
        ratio = None if growth is None else torch.randn(QUALITY_BATCH, generator=generator, device=device)
        rates.append(time_training(net, _growth_loss(net, x0, x1, prior, days, ratio), device, warmup, budget,
                                   False)[0])
    return rates[0], rates[1]


def _growth_loss(net: VelocityNet, x0: torch.Tensor, x1: torch.Tensor, prior: torch.Tensor, days: torch.Tensor,
                 ratio: torch.Tensor | None) -> Callable[[torch.Generator], torch.Tensor]:
    """A paired run's loss on fixed data: flow matching, with a growth head conditioned on `ratio` plus its loss."""
    def loss(generator: torch.Generator) -> torch.Tensor:
        flow = flow_matching_loss(net, x0, x1, generator, 0.0, prior, days, None, ratio)
        return flow if ratio is None else flow + net.growth_head.nll(prior, days, ratio)

    return loss


def smooth_field(shape: tuple[int, ...], batch: int, generator: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """Random smooth fields (coarse noise, trilinearly upsampled to the C, Z, Y, X shape), unit standard deviation."""
    coarse = torch.randn(batch, shape[0], *(max(2, n // 6 + 1) for n in shape[1:]), generator=generator,
                         device=device)
    field = F.interpolate(coarse, size=shape[1:], mode="trilinear", align_corners=True)
    return field / field.std(dim=(1, 2, 3, 4), keepdim=True)


def synthetic_pairs(shape: tuple[int, ...], batch: int, generator: torch.Generator,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prior, follow-up, interval): the follow-up is the prior shifted 2 voxels in x and y, scaled by
    1 + 0.4 * years, plus 0.5 times an independent smooth field (so paths cross and the flow is curved)."""
    x0 = smooth_field(shape, batch, generator, device)
    days = _days(batch, generator, device)
    scale = (1.0 + 0.4 * days / 365.0).view(-1, 1, 1, 1, 1)
    x1 = scale * torch.roll(x0, shifts=(2, 2), dims=(3, 4)) + 0.5 * smooth_field(shape, batch, generator, device)
    return x0, x1, days


@contextmanager
def _no_tf32() -> Iterator[None]:
    """Full float32 matmuls and convolutions on CUDA (TF32 would blur a 1 % comparison)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def sampling_error(shape: tuple[int, ...], device: torch.device, seed: int,
                   fit_steps: int) -> tuple[list[tuple[str, float, float, float]], list[str]]:
    """Fit ERROR_NET to the synthetic pairs, then the error of each sampler vs Euler 100 from the same starts.

    Returns (label, ||x - x_ref|| / ||x_ref - x0||, ||x - x_ref|| / ||x_ref||, ||x - x_exact|| / ||x_exact - x0||)
    per sampler, where x_exact is the EXACT sampler's solution, and notes on the fit and on the velocity's
    roughness in t.
    """
    _fresh(device)
    torch.manual_seed(seed)
    net = VelocityNet(ERROR_NET).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=ERROR_FIT["lr"])
    generator = torch.Generator(device).manual_seed(seed + 1)
    losses = []
    started = time.perf_counter()
    with _no_tf32():
        for _ in range(fit_steps):
            x0, x1, days = synthetic_pairs(shape, int(ERROR_FIT["batch"]), generator, device)
            loss = flow_matching_loss(net, x0, x1, generator, 0.0, None, days)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        losses_cpu = torch.stack(losses).cpu()
        window = max(1, min(10, fit_steps // 5))
        notes = [f"fit {fit_steps} steps (batch {ERROR_FIT['batch']:g}) in {time.perf_counter() - started:.0f} s, "
                 f"flow-matching loss {losses_cpu[:window].mean():.3f} -> {losses_cpu[-window:].mean():.3f} "
                 f"(mean of first/last {window} steps)"]
        net.eval()
        starts, _, days = synthetic_pairs(shape, ERROR_STARTS, torch.Generator(device).manual_seed(seed + 2), device)
        with torch.no_grad():
            changes = []
            for t in torch.linspace(0.0, 1.0 - ROUGHNESS_DT, ROUGHNESS_TIMES).tolist():
                before = net(starts, torch.full((ERROR_STARTS,), t, device=device), None, days)
                after = net(starts, torch.full((ERROR_STARTS,), t + ROUGHNESS_DT, device=device), None, days)
                changes.append(float(torch.linalg.vector_norm(after - before) / torch.linalg.vector_norm(before)))
        notes.append(f"velocity roughness in t: |v(x0, t + {ROUGHNESS_DT}) - v(x0, t)| / |v(x0, t)| = "
                     f"{sum(changes) / len(changes):.2%} mean, {max(changes):.2%} max over {ROUGHNESS_TIMES} t "
                     "(MONAI's timestep embedding sees 1000 t)")
        reference = sample(net, starts, REFERENCE[1], REFERENCE[0], None, days)
        exact = sample(net, starts, EXACT[1], EXACT[0], None, days)
        displacement = torch.linalg.vector_norm(reference - starts)
        size = torch.linalg.vector_norm(reference)
        exact_displacement = torch.linalg.vector_norm(exact - starts)
        results = []
        for method, steps in ERROR_METHODS:
            forecast = sample(net, starts, steps, method, None, days)
            difference = torch.linalg.vector_norm(forecast - reference)
            error = torch.linalg.vector_norm(forecast - exact) / exact_displacement
            results.append((f"{method} {steps}", float(difference / displacement), float(difference / size),
                            float(error)))
    return results, notes


def main() -> None:
    """Parse the flags, run the chosen parts and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--quick", action="store_true",
                        help="shrink channels, halve the patch and the error fit: a smoke run")
    parser.add_argument("--batch", type=int, default=2, help="batch of the timed training steps and samples (2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and data (default 0)")
    parser.add_argument("--budget", type=float, default=30.0,
                        help="seconds one timing aims at; fewer steps are timed beyond it (default 30)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: torch's default)")
    parser.add_argument("--parts", nargs="+", choices=("vae", "latent", "raw", "error", "precision", "growth"),
                        default=["vae", "latent", "raw", "error", "precision", "growth"],
                        help="what to run (default: all)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    warmup = 3 if device.type == "cuda" else 1
    sizes, patch, latent = (QUICK, QUICK_PATCH, QUICK_LATENT) if args.quick else (FULL, PATCH, LATENT)
    precision = "bf16 autocast" if device.type == "cuda" else "float32"
    name = (torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    mode = "quick (shrunk channels, half-size patch)" if args.quick else "full config sizes"
    print(f"device {device} ({name}), {precision}, batch {args.batch}, seed {args.seed}, {mode}: patch {patch}, "
          f"latent {latent}; {warmup} warm-up step(s), budget {args.budget:.0f} s per timing", flush=True)
    if device.type == "cpu" and torch.get_num_threads() > 1 and os.getloadavg()[0] + 1 > (os.cpu_count() or 1):
        print("warning: the CPU is shared; multi-threaded timings on a busy CPU can be many times slower than on a "
              "free one (try --threads 1)", flush=True)

    rows: list[Row] = []
    if "vae" in args.parts:
        rows.append(bench_vae(sizes["vae"], patch, latent, args.batch, device, warmup, args.budget, args.seed))
        print(f"  vae done ({rows[-1].train_steps_per_s:.3g} steps/s)", flush=True)
    for part, shape in (("latent", latent), ("raw", patch)):
        if part in args.parts:
            rows.append(bench_flow(part, sizes[part], shape, args.batch, device, warmup, args.budget, args.seed))
            print(f"  {part} done ({rows[-1].train_steps_per_s:.3g} steps/s)", flush=True)
    if rows:
        print()
        print(f"{'model':<8}{'params M':>10}{'train steps/s':>15}{'timed':>7}{'sample s/patch':>16}"
              f"{'peak GiB':>10}  notes")
        for row in rows:
            peak = f"{row.peak_gib:.1f}" if row.peak_gib is not None else "-"
            notes = [row.sample_note]
            if row.train_steps < MAX_TIMED_STEPS:
                notes.insert(0, f"{row.train_steps} of {MAX_TIMED_STEPS} train steps timed (over budget)")
            print(f"{row.model:<8}{row.params / 1e6:>10.2f}{row.train_steps_per_s:>15.3g}{row.train_steps:>7}"
                  f"{row.sample_s_per_patch:>16.3g}{peak:>10}  {'; '.join(notes)}")
        print("vae: train = MSE + KL on random patches, sample = decoding a latent. latent, raw: bridge flow "
              "matching with interval conditioning, sample = Heun in the model's own space (latent: decoding not "
              f"included). Training steps timed after {warmup} warm-up step(s): up to {MAX_TIMED_STEPS}, at least 2.")

    if "precision" in args.parts:
        float32, bf16 = bench_precision(device, warmup, args.budget, args.seed)
        print()
        print(f"precision: config/quality.yaml's forecaster {QUALITY_NET['channels']}, patch {QUALITY_PATCH}, batch "
              f"{QUALITY_BATCH}, noisy_prior flow matching on {device.type}: float32 {float32:.3g} steps/s, bf16 "
              f"autocast {bf16:.3g} steps/s, ratio {bf16 / float32:.2f} (training.bf16_cpu: true on a CPU, "
              "bf16: true on CUDA)")

    if "growth" in args.parts:
        plain, growth = bench_growth(device, warmup, args.budget, args.seed)
        print()
        print(f"growth head: config/quality.yaml's forecaster, patch {QUALITY_PATCH}, batch {QUALITY_BATCH}, float32 "
              f"on {device.type}: without a head {plain:.3g} steps/s, with raw3d_growth's head "
              f"{QUALITY_GROWTH['channels']} {growth:.3g} steps/s, ratio {growth / plain:.2f}")

    if "error" in args.parts:
        fit_steps = int(ERROR_FIT["steps"]) // (2 if args.quick else 1)
        print()
        print(f"sampling error: velocity net {ERROR_NET['channels']} at latent size {latent}, synthetic pairs, "
              f"{ERROR_STARTS} starts, float32", flush=True)
        results, notes = sampling_error(latent, device, args.seed, fit_steps)
        for note in notes:
            print(f"  {note}")
        ref, exact = f"{REFERENCE[0]} {REFERENCE[1]}", f"{EXACT[0]} {EXACT[1]}"
        print(f"{'sampler':<10}{'evals':>7}{f'|x - {ref}| / |{ref} - x0|':>38}{f'|x - {ref}| / |{ref}|':>30}"
              f"{f'|x - {exact}| / |{exact} - x0|':>38}")
        for label, displacement, size, error in results:
            method, steps = label.split()
            evals = int(steps) * (2 if method == "heun" else 1)
            print(f"{label:<10}{evals:>7}{displacement:>38.3e}{size:>30.3e}{error:>38.3e}")
        by_label = {label: (displacement, error) for label, displacement, _, error in results}
        heun20, euler100 = by_label["heun 20"], by_label[ref]
        verdict = "met" if heun20[0] <= GOAL else "not met"
        print(f"goal: Heun 20 (40 evals) within {GOAL:.0%} of Euler 100 (100 evals) relative to the displacement, "
              f"|x_heun20 - x_euler100| / |x_euler100 - x0| <= {GOAL:g}: {verdict} ({heun20[0]:.2e}); against "
              f"the ODE's solution ({exact}) Heun 20 is off by {heun20[1]:.2e} and Euler 100 by {euler100[1]:.2e}")


if __name__ == "__main__":
    main()
