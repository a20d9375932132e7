"""Benchmark noduleflow's rigid registration against ANTsPy's `registration(type_of_transform="Rigid")`.

Each pair is a synthetic chest of NLST-like size (512 x 512 x 160 voxels at 0.7 x 0.7 x 2.5 mm, the baseline)
and the same anatomy seen through a known rigid transform (the follow-up), each with its own noise. Prints, per
method, seconds per pair (registration only) and the target registration error (TRE) over points inside the
lungs. ANTsPy is optional (see benchmarks/README.md); without it only noduleflow is measured.

    .venv/bin/python benchmarks/registration.py [--pairs 3] [--seed 0] [--ants-pairs 1] [--skip-ants]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import SimpleITK as sitk

from noduleflow.phantom import ChestAnatomy, lung_depth_mm, render_anatomy, sample_anatomy
from noduleflow.registration import RegistrationSettings, matrix_to_transform, register_exam, transform_to_matrix

ants: ModuleType | None
try:
    import ants
except ImportError as error:  # optional: only the comparison needs it
    ants = None
    ANTS_MISSING = f"{type(error).__name__}: {error}"

SIZE = (512, 512, 160)  # x, y, z voxels
SPACING = (0.7, 0.7, 2.5)  # mm
FOV_MM = (358.4, 358.4, 400.0)
ORIGIN = tuple(-(n - 1) * s / 2.0 for n, s in zip(SIZE, SPACING, strict=True))  # anatomy centred on the grid
MAX_ROTATION_DEG = 5.0  # per axis
MAX_TRANSLATION_MM = 15.0  # per axis
NOISE_HU = 20.0
TRE_POINTS = 2000
MIN_LUNG_DEPTH_MM = 2.0
NODULEFLOW_THREADS = (1, 2)


@dataclass(frozen=True)
class Pair:
    """A baseline (fixed) and follow-up (moving) image, the true fixed -> moving matrix and the TRE points."""

    fixed: sitk.Image
    moving: sitk.Image
    truth: np.ndarray  # 4x4, fixed physical point -> moving physical point
    points: np.ndarray  # (N, 3) physical points (mm) inside the baseline's lungs


def _image(array: np.ndarray) -> sitk.Image:
    """SimpleITK image of a [z, y, x] array on the benchmark grid."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    return image


def _noisy(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """int16 copy of the image with Gaussian noise added."""
    array = sitk.GetArrayViewFromImage(image)
    noise = rng.standard_normal(array.shape, dtype=np.float32) * np.float32(NOISE_HU)
    return _image(np.round(array + noise).astype(np.int16))


def _lung_points(anatomy: ChestAnatomy, rng: np.random.Generator) -> np.ndarray:
    """Random voxel centres of the grid lying more than MIN_LUNG_DEPTH_MM inside the lungs."""
    indices = rng.integers(0, SIZE, size=(50 * TRE_POINTS, 3))  # about 5 % of the grid is that deep in the lungs
    candidates = np.asarray(ORIGIN) + indices * np.asarray(SPACING)
    inside = candidates[lung_depth_mm(anatomy, candidates) > MIN_LUNG_DEPTH_MM]
    if len(inside) < TRE_POINTS:
        raise RuntimeError(f"only {len(inside)} lung points found, {TRE_POINTS} needed")
    return inside[:TRE_POINTS]


def make_pair(seed: int, index: int) -> Pair:
    """Pair `index`: a random anatomy and a rigid misalignment about the grid centre, deterministic in (seed, index)."""
    rng = np.random.default_rng((seed, index))
    anatomy = sample_anatomy(rng, FOV_MM)
    baseline = _image(render_anatomy(anatomy, SIZE, SPACING, ORIGIN))
    angles = np.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3))
    translation = rng.uniform(-MAX_TRANSLATION_MM, MAX_TRANSLATION_MM, 3)
    truth = transform_to_matrix(sitk.Euler3DTransform((0.0, 0.0, 0.0), *angles, tuple(translation)))
    # Resample maps output points to input points: follow-up point T(p) shows baseline point p
    follow_up = sitk.Resample(baseline, baseline, matrix_to_transform(np.linalg.inv(truth)), sitk.sitkLinear, -1000.0)
    points = _lung_points(anatomy, rng)
    return Pair(_noisy(baseline, rng), _noisy(follow_up, rng), truth, points)


def tre_mm(pair: Pair, estimate: np.ndarray) -> np.ndarray:
    """Distance (mm) between the estimated and the true image of each lung point."""
    homogeneous = np.c_[pair.points, np.ones(len(pair.points))]
    return np.linalg.norm(homogeneous @ (estimate - pair.truth)[:3].T, axis=1)


def run_noduleflow(pair: Pair, threads: int) -> tuple[float, np.ndarray]:
    """Seconds and fixed -> moving matrix of `register_exam` with default settings but `threads`."""
    settings = RegistrationSettings(threads=threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(settings.threads)  # as register_shard does
    start = time.perf_counter()
    result = register_exam(pair.fixed, pair.moving, settings)
    seconds = time.perf_counter() - start
    return seconds, np.vstack([np.reshape(result["fixed_to_moving"], (3, 4)), [0.0, 0.0, 0.0, 1.0]])


def _to_ants(image: sitk.Image) -> ants.ANTsImage:
    """ANTs float image with the geometry of a SimpleITK image (ANTs arrays are indexed [x, y, z])."""
    array = sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0)
    return ants.from_numpy(array, origin=image.GetOrigin(), spacing=image.GetSpacing(),
                           direction=np.reshape(image.GetDirection(), (3, 3)))


def run_ants(pair: Pair) -> tuple[float, np.ndarray]:
    """Seconds and fixed -> moving matrix of ANTsPy Rigid with its defaults (its forward transform)."""
    fixed, moving = _to_ants(pair.fixed), _to_ants(pair.moving)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        result = ants.registration(fixed, moving, type_of_transform="Rigid", outprefix=os.path.join(folder, "rigid_"))
        seconds = time.perf_counter() - start
        return seconds, transform_to_matrix(sitk.ReadTransform(result["fwdtransforms"][0]))


@dataclass
class Results:
    """Seconds per pair and TRE of every lung point of every pair, for one method."""

    seconds: list[float]
    errors: list[np.ndarray]

    def add(self, pair: Pair, seconds: float, estimate: np.ndarray) -> str:
        """Record one pair; returns its summary."""
        errors = tre_mm(pair, estimate)
        self.seconds.append(seconds)
        self.errors.append(errors)
        return f"{seconds:7.1f} s   TRE mean {errors.mean():6.2f} mm   max {errors.max():6.2f} mm"

    def row(self, method: str, threads: str) -> str:
        """Table row: method, threads, pairs, seconds per pair, TRE mean and max."""
        errors = np.concatenate(self.errors)
        seconds = f"{np.mean(self.seconds):8.1f}" if self.seconds else f"{'-':>8}"
        return (f"{method:<26}{threads:>12}{len(self.errors):>7}{seconds}"
                f"{errors.mean():>15.2f}{errors.max():>14.2f}")


def main() -> None:
    """Parse the flags, run every method on every pair and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="synthetic pairs (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairs (default 0)")
    parser.add_argument("--ants-pairs", type=int, default=1, help="pairs also run with ANTsPy, which is slow (1)")
    parser.add_argument("--skip-ants", action="store_true", help="measure noduleflow only")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    ants_pairs = 0 if args.skip_ants else min(args.ants_pairs, args.pairs)
    if ants is None and ants_pairs:
        print(f"ANTsPy is not available ({ANTS_MISSING}); measuring noduleflow only. "
              "See benchmarks/README.md to install it.")
        ants_pairs = 0
    print(f"{args.pairs} pairs of {SIZE[0]} x {SIZE[1]} x {SIZE[2]} voxels at {SPACING[0]} x {SPACING[1]} x "
          f"{SPACING[2]} mm, seed {args.seed}, {os.cpu_count()} CPUs; TRE over {TRE_POINTS} lung points per pair")
    initial = Results([], [])
    noduleflow = {threads: Results([], []) for threads in NODULEFLOW_THREADS}
    antspy = Results([], [])
    for index in range(args.pairs):
        pair = make_pair(args.seed, index)
        rotation = np.degrees(np.arccos(np.clip((np.trace(pair.truth[:3, :3]) - 1.0) / 2.0, -1.0, 1.0)))
        initial.errors.append(tre_mm(pair, np.eye(4)))
        print(f"pair {index + 1}: rotation {rotation:.1f} deg, translation {np.linalg.norm(pair.truth[:3, 3]):.1f} mm"
              f", unregistered TRE mean {initial.errors[-1].mean():.1f} mm", flush=True)
        for threads, results in noduleflow.items():
            print(f"  {f'noduleflow, {threads} thread(s)':<26}{results.add(pair, *run_noduleflow(pair, threads))}",
                  flush=True)
        if index < ants_pairs:
            print(f"  {'ANTsPy Rigid (defaults)':<26}{antspy.add(pair, *run_ants(pair))}", flush=True)
    print()
    print(f"{'method':<26}{'threads':>12}{'pairs':>7}{'s/pair':>8}{'TRE mean mm':>15}{'TRE max mm':>14}")
    print(initial.row("none (identity)", "-"))
    for threads, results in noduleflow.items():
        print(results.row("noduleflow", str(threads)))
    if antspy.seconds:
        print(antspy.row("ANTsPy Rigid (defaults)", "ITK default"))
        ratios = ", ".join(f"{np.mean(antspy.seconds) / np.mean(results.seconds):.1f}x with {threads} thread(s)"
                           for threads, results in noduleflow.items())
        print(f"speed ratio ANTsPy / noduleflow (s/pair): {ratios}")
    print("goals for noduleflow: mean TRE under 0.5 mm, at least 20x faster than ANTsPy Rigid")


if __name__ == "__main__":
    main()
