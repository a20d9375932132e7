"""Benchmark noduleflow's rigid registration: speed against ANTsPy, and a misalignment sweep.

Pairs come from the synthetic generator (`noduleflow.metadata.synthetic.exam_pair`): one patient's baseline and
follow-up,
rendered through a known pose, scan-range offset along the body axis and (optionally) non-rigid change, each with
its own noise. The error (TRE) is measured over points inside the baseline's lungs that the follow-up also
covers, against `truth_map_points` (exact under the non-rigid change too).

- Speed: NLST-size pairs (512 x 512 x 160 voxels at 0.7 x 0.7 x 2.5 mm, rotations up to 5 deg, translations up
  to 15 mm per axis): seconds per pair of noduleflow (1 and 2 threads), of ANTsPy Rigid with its defaults and of
  ANTsPy Rigid on 2 mm copies; and the time to read a ~50 MB .nii.gz with `read_image` and with SimpleITK alone.
- Sweep (`--sweep N`): N coarse pairs (1.5 x 1.5 x 2.5 mm, 300 mm along the body axis) with rotations up to
  15 deg, translations up to 80 mm per axis and scan ranges up to 120 mm apart; success (mean TRE < 1 mm) and
  TRE per bin of rotation, translation and overlap, and what the QC makes of each; ANTsPy on `--ants-sweep`.

    .venv/bin/python benchmarks/registration.py [--pairs 2] [--ants-pairs 1] [--skip-ants] [--sweep 0]
        [--ants-sweep 0] [--deformation MM] [--seed 0] [--skip-ants-defaults]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import SimpleITK as sitk
import yaml

from noduleflow.imaging import Geometry, homogeneous, read_image, write_nifti
from noduleflow.metadata.phantom import lung_depth_mm
from noduleflow.metadata.synthetic import CohortConfig, exam_pair, truth_map_points
from noduleflow.registration.rigid import (
    QualityThresholds,
    RegistrationSettings,
    quality_reasons,
    register_exam,
    transform_to_matrix,
)
from noduleflow.settings import from_config

ants: ModuleType | None
try:
    import ants
except ImportError as error:  # optional: only the comparison needs it
    ants = None
    ANTS_MISSING = f"{type(error).__name__}: {error}"

NLST = CohortConfig(fov_mm=(358.4, 358.4, 400.0), reference_spacing_mm=(1.0, 1.0, 2.0), noise_hu=(20.0, 20.0))
NLST_SPACING = (0.7, 2.5)  # pixel spacing, slice thickness: 512 x 512 x 160 voxels
SWEEP = CohortConfig(fov_mm=(320.0, 280.0, 300.0), reference_spacing_mm=(1.5, 1.5, 2.0), noise_hu=(20.0, 20.0),
                     max_rotation_deg=15.0, max_translation_mm=80.0, max_start_offset_mm=120.0)
SWEEP_SPACING = (1.5, 2.5)
TRE_POINTS = 2000
MIN_LUNG_DEPTH_MM = 2.0
SUCCESS_MM = 1.0
NODULEFLOW_THREADS = (1, 2)

CONFIG = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "config.yaml").read_text())


@dataclass(frozen=True)
class Pair:
    """A baseline (fixed) and follow-up (moving) image, their truth and the TRE points."""

    fixed: sitk.Image
    moving: sitk.Image
    truth: pd.DataFrame  # truth rows "baseline" and "follow_up" (see truth_map_points)
    points: np.ndarray  # (N, 3) physical points (mm) inside the baseline's lungs, seen by both exams
    targets: np.ndarray  # (N, 3) their true positions in the follow-up
    overlap: float  # fraction of the baseline's grid whose anatomy the follow-up also shows


def _inside(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    index = (points - np.asarray(image.GetOrigin())) / np.asarray(image.GetSpacing())
    return np.all((index >= 0) & (index <= np.asarray(image.GetSize()) - 1), axis=1)


def make_pair(config: CohortConfig, spacing: tuple[float, float], seed: int, index: int) -> Pair:
    """Pair `index` of the generator with `config` (its seed replaced by `seed`), deterministic in both."""
    fixed, moving, truth, anatomy = exam_pair(CohortConfig(**{**config.__dict__, "seed": seed}), index, *spacing)
    rng = np.random.default_rng((seed, index))
    extent = np.asarray(fixed.GetSpacing()) * (np.asarray(fixed.GetSize()) - 1)
    grid = np.asarray(fixed.GetOrigin()) + rng.uniform(0.0, 1.0, (100 * TRE_POINTS, 3)) * extent
    mapped = truth_map_points(truth, "baseline", "follow_up", grid)
    seen = _inside(moving, mapped)
    lungs = seen & (lung_depth_mm(anatomy, grid) > MIN_LUNG_DEPTH_MM)  # baseline: no pose, no deformation
    if lungs.sum() < TRE_POINTS // 4:
        raise RuntimeError(f"pair {index}: only {lungs.sum()} lung points seen by both exams")
    points = grid[lungs][:TRE_POINTS]
    return Pair(fixed, moving, truth, points, mapped[lungs][:TRE_POINTS], float(seen.mean()))


def tre_mm(pair: Pair, estimate: np.ndarray) -> np.ndarray:
    """Distance (mm) between the estimated and the true image of each lung point."""
    return np.linalg.norm(np.c_[pair.points, np.ones(len(pair.points))] @ estimate[:3].T - pair.targets, axis=1)


def true_motion(pair: Pair) -> tuple[float, float]:
    """Rotation (deg) and translation (mm, at the baseline's centre) of the true rigid pose of the follow-up."""
    pose = homogeneous(pair.truth.set_index("exam_id").loc["follow_up", "anatomy_to_exam"])
    rotation = np.degrees(np.arccos(np.clip((np.trace(pose[:3, :3]) - 1.0) / 2.0, -1.0, 1.0)))
    return float(rotation), float(np.linalg.norm(pose[:3, 3]))


def run_noduleflow(pair: Pair, threads: int) -> tuple[float, np.ndarray, dict]:
    """Seconds, fixed -> moving matrix and QC numbers of `register_exam` with the default config's settings but
    `threads`."""
    settings = from_config(RegistrationSettings, CONFIG["registration"]["method"], threads=threads, seed=CONFIG["seed"])
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(settings.threads)  # as register_shard does
    start = time.perf_counter()
    result = register_exam(pair.fixed, pair.moving, settings)
    return time.perf_counter() - start, homogeneous(result["fixed_to_moving"]), result


def _to_ants(image: sitk.Image) -> ants.ANTsImage:
    """ANTs float image with the geometry of a SimpleITK image (ANTs arrays are indexed [x, y, z])."""
    array = sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0)
    return ants.from_numpy(array, origin=image.GetOrigin(), spacing=image.GetSpacing(),
                           direction=np.reshape(image.GetDirection(), (3, 3)))


def run_ants(pair: Pair, spacing_mm: float | None = None) -> tuple[float, np.ndarray]:
    """Seconds and fixed -> moving matrix of ANTsPy Rigid with its defaults (its forward transform).

    With `spacing_mm`, both images are first resampled to that isotropic spacing (timed too).
    """
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        fixed, moving = _to_ants(pair.fixed), _to_ants(pair.moving)
        if spacing_mm:
            fixed, moving = (ants.resample_image(image, [spacing_mm] * 3, use_voxels=False, interp_type=0)
                             for image in (fixed, moving))
        result = ants.registration(fixed, moving, type_of_transform="Rigid", outprefix=os.path.join(folder, "rigid_"))
        seconds = time.perf_counter() - start
        return seconds, transform_to_matrix(sitk.ReadTransform(result["fwdtransforms"][0]))


def _summary(seconds: float, errors: np.ndarray) -> str:
    return f"{seconds:7.1f} s   TRE mean {errors.mean():6.2f} mm   max {errors.max():6.2f} mm"


def reading(pair: Pair) -> None:
    """Seconds to read the baseline written as .nii.gz by noduleflow, with read_image and with SimpleITK alone."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "baseline.nii.gz")
        image = pair.fixed
        write_nifti(sitk.GetArrayFromImage(image), Geometry(image.GetSize(), image.GetSpacing(), image.GetOrigin(),
                                                            image.GetDirection()), path)
        timings = {}
        for name, read in (("SimpleITK ReadImage", lambda: sitk.ReadImage(path)),
                           ("read_image", lambda: read_image(path))):
            read()  # warm the page cache
            start = time.perf_counter()
            for _ in range(3):
                read()
            timings[name] = (time.perf_counter() - start) / 3
        print(f"reading a {os.path.getsize(path) / 1e6:.0f} MB .nii.gz: " +
              ", ".join(f"{name} {seconds:.2f} s" for name, seconds in timings.items()))


def speed(args: argparse.Namespace, ants_pairs: int) -> None:
    """NLST-size pairs: noduleflow against ANTsPy Rigid (defaults and on 2 mm copies)."""
    methods: dict[str, tuple[list[float], list[np.ndarray]]] = {}

    def record(method: str, seconds: float, errors: np.ndarray) -> None:
        methods.setdefault(method, ([], []))
        methods[method][0].append(seconds)
        methods[method][1].append(errors)
        print(f"  {method:<30}{_summary(seconds, errors)}", flush=True)

    size = np.round(np.asarray(NLST.fov_mm) / np.array([*NLST_SPACING[:1] * 2, NLST_SPACING[1]])).astype(int)
    print(f"speed: {args.pairs} pairs of {' x '.join(map(str, size))} voxels at {NLST_SPACING[0]} x {NLST_SPACING[0]}"
          f" x {NLST_SPACING[1]} mm, seed {args.seed}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    for index in range(args.pairs):
        pair = make_pair(NLST, NLST_SPACING, args.seed, index)
        if index == 0:
            reading(pair)
        rotation, translation = true_motion(pair)
        print(f"pair {index + 1}: rotation {rotation:.1f} deg, translation {translation:.1f} mm, overlap "
              f"{pair.overlap:.0%}, unregistered TRE mean {tre_mm(pair, np.eye(4)).mean():.1f} mm", flush=True)
        for threads in NODULEFLOW_THREADS:
            seconds, estimate, _ = run_noduleflow(pair, threads)
            record(f"noduleflow, {threads} thread(s)", seconds, tre_mm(pair, estimate))
        if index < ants_pairs and not args.skip_ants_defaults:
            seconds, estimate = run_ants(pair)
            record("ANTsPy Rigid (defaults)", seconds, tre_mm(pair, estimate))
        if ants_pairs:
            seconds, estimate = run_ants(pair, 2.0)
            record("ANTsPy Rigid on 2 mm copies", seconds, tre_mm(pair, estimate))
    print(f"\n{'method':<30}{'pairs':>6}{'s/pair':>8}{'TRE mean mm':>13}{'TRE max mm':>12}")
    for method, (seconds, errors) in methods.items():
        every = np.concatenate(errors)
        print(f"{method:<30}{len(seconds):>6}{np.mean(seconds):>8.1f}{every.mean():>13.2f}{every.max():>12.2f}")
    for method in ("ANTsPy Rigid (defaults)", "ANTsPy Rigid on 2 mm copies"):
        if method in methods:
            count = len(methods[method][0])
            theirs = np.mean(methods[method][0])
            ratios = ", ".join(f"{theirs / np.mean(methods[f'noduleflow, {t} thread(s)'][0][:count]):.1f}x with {t} "
                               "thread(s)" for t in NODULEFLOW_THREADS)
            print(f"speed ratio {method} / noduleflow on the same pairs: {ratios}")
    print("goals: <= 4 s per pair on 2 cores with TRE < 0.5 mm; >= 50x ANTsPy defaults, >= 4x ANTsPy on 2 mm copies")


def _bins(values: pd.Series, edges: list[float]) -> pd.Series:
    return pd.cut(values, edges, include_lowest=True).astype(str)


def sweep(args: argparse.Namespace, ants_pairs: int) -> None:
    """Coarse pairs over the whole plausible misalignment: success and TRE per bin, and the QC's verdicts."""
    config = CohortConfig(**{**SWEEP.__dict__, "deformation_mm": args.deformation})
    print(f"\nsweep: {args.sweep} pairs at {SWEEP_SPACING[0]} x {SWEEP_SPACING[0]} x {SWEEP_SPACING[1]} mm, "
          f"{config.fov_mm[2]:.0f} mm along the body axis, rotations up to {config.max_rotation_deg} deg, translations "
          f"up to {config.max_translation_mm} mm per axis, scan ranges up to {config.max_start_offset_mm} mm apart, "
          f"non-rigid change up to {config.deformation_mm} mm; load {os.getloadavg()[0]:.1f}")
    thresholds = from_config(QualityThresholds, CONFIG["registration"]["qc"])
    rows = []
    for index in range(args.sweep):
        pair = make_pair(config, SWEEP_SPACING, args.seed + 1, index)
        rotation, translation = true_motion(pair)
        runs = [("noduleflow", *run_noduleflow(pair, 1))]
        if index < ants_pairs:
            runs.append(("ANTsPy Rigid (defaults)", *run_ants(pair), None))
        for method, seconds, estimate, result in runs:
            errors = tre_mm(pair, estimate)
            reason = quality_reasons({"error": None, "is_fixed": False, **result}, thresholds) if result else None
            rows.append({"pair": index, "method": method, "rotation_deg": rotation, "translation_mm": translation,
                         "overlap": pair.overlap, "tre_mean": errors.mean(), "tre_max": errors.max(),
                         "seconds": seconds, "qc_pass": reason is None if result else np.nan, "qc_reason": reason})
            print(f"  pair {index + 1:>3} {method:<24} rot {rotation:5.1f} deg  trans {translation:5.1f} mm  overlap "
                  f"{pair.overlap:4.0%}  {_summary(seconds, errors)}  {reason or ('QC pass' if result else '')}",
                  flush=True)
    table = pd.DataFrame(rows)
    table["success"] = table["tre_mean"] < SUCCESS_MM
    table["rotation"] = _bins(table["rotation_deg"], [0, 5, 10, 15, 30])
    table["translation"] = _bins(table["translation_mm"], [0, 40, 80, 140])
    table["overlap_bin"] = _bins(table["overlap"], [0, 0.6, 0.8, 1.0])
    for column in ("rotation", "translation", "overlap_bin"):
        summary = table.groupby(["method", column]).agg(
            pairs=("success", "size"), success=("success", "mean"), tre_median=("tre_mean", "median"),
            tre_worst=("tre_mean", "max"))
        print(f"\nby {column} (success: mean TRE < {SUCCESS_MM} mm)\n{summary.to_string(float_format='%.2f')}")
    mine = table[table["method"] == "noduleflow"]
    goal = mine[(mine["overlap"] >= 0.6)]
    bad = mine[mine["tre_mean"] > 2.0]
    # good registrations whose true motion the QC allows (beyond its limits a flag is the QC doing its job)
    thresholds_ok = (mine["rotation_deg"] <= thresholds.max_rotation_deg) & \
        (mine["translation_mm"] <= thresholds.max_translation_mm)
    good = mine[(mine["tre_mean"] <= 2.0) & thresholds_ok]
    print(f"\nnoduleflow: {goal['success'].mean():.0%} of {len(goal)} pairs with overlap >= 60 % under {SUCCESS_MM} mm "
          f"(worst {goal['tre_mean'].max():.2f} mm); mean TRE over all pairs {mine['tre_mean'].mean():.2f} mm")
    print(f"QC: {int((~bad['qc_pass'].astype(bool)).sum())} of {len(bad)} registrations with TRE > 2 mm flagged, "
          f"{int((~good['qc_pass'].astype(bool)).sum())} of {len(good)} good ones within the QC's rotation and "
          "translation limits flagged")
    for reason in good.loc[~good["qc_pass"].astype(bool), "qc_reason"]:
        print(f"  good but flagged: {reason}")


def main() -> None:
    """Parse the flags and run the speed comparison and the sweep."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="NLST-size pairs for the speed comparison (2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairs (default 0)")
    parser.add_argument("--ants-pairs", type=int, default=1, help="pairs also run with ANTsPy defaults, slow (1)")
    parser.add_argument("--skip-ants", action="store_true", help="measure noduleflow only")
    parser.add_argument("--skip-ants-defaults", action="store_true",
                        help="run ANTsPy on 2 mm copies only (its defaults take minutes a pair)")
    parser.add_argument("--sweep", type=int, default=0, help="coarse pairs of the misalignment sweep (0)")
    parser.add_argument("--ants-sweep", type=int, default=0, help="sweep pairs also run with ANTsPy (0)")
    parser.add_argument("--deformation", type=float, default=0.0, help="non-rigid change in the sweep, mm (0)")
    args = parser.parse_args()
    if args.pairs < 0 or args.sweep < 0:
        parser.error("--pairs and --sweep must not be negative")
    use_ants = not args.skip_ants
    if ants is None and use_ants and (args.ants_pairs or args.ants_sweep):
        print(f"ANTsPy is not available ({ANTS_MISSING}); measuring noduleflow only. "
              "See benchmarks/README.md to install it.")
        use_ants = False
    if args.pairs:
        speed(args, min(args.ants_pairs, args.pairs) if use_ants else 0)
    if args.sweep:
        sweep(args, min(args.ants_sweep, args.sweep) if use_ants else 0)


if __name__ == "__main__":
    main()
