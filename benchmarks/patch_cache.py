"""Benchmark noduleflow's patch cutter (`patches.cut_patch`) against resampling the whole volume, then cropping.

Each exam is a synthetic chest of NLST-like size (512 x 512 x 160 voxels at 0.7 x 0.7 x 2.5 mm, int16 HU with
noise) written as `.nii.gz`, with a random rigid fixed -> moving transform (the fixed grid is the exam's own) and
3-5 nodules in the lungs, boxed in the registered grid. Per exam, in the same run and with the pipeline's reader
(`imaging.read_image`), it times: the floor (read only); noduleflow (read, then `cut_patch` per nodule); and the
whole-volume approach (read, one linear `sitk.Resample` of the full volume into the registered grid, crop every
patch with -1 padding). Each is repeated and the best time kept. Prints patches per second, the speed ratio, the
cost over the floor, and the largest difference between the two approaches' patches.

Nodules are chosen so that their patches lie inside the registered grid: beyond its edge `cut_patch` keeps the
image data while a crop of the whole-volume grid can only pad.

    .venv/bin/python benchmarks/patch_cache.py [--exams 3] [--seed 0] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml

from noduleflow.cache.patches import PatchSettings, cut_patch, patch_start
from noduleflow.hu import to_unit_range
from noduleflow.imaging import Geometry, read_image, write_nifti
from noduleflow.metadata.phantom import lung_depth_mm, render_anatomy, sample_anatomy
from noduleflow.registration.boxes import registered_grid
from noduleflow.registration.rigid import matrix_to_transform, transform_to_matrix
from noduleflow.settings import from_config

SIZE = (512, 512, 160)  # x, y, z voxels
SPACING = (0.7, 0.7, 2.5)  # mm
FOV_MM = (358.4, 358.4, 400.0)
ORIGIN = tuple(-(n - 1) * s / 2.0 for n, s in zip(SIZE, SPACING, strict=True))  # anatomy centred on the grid
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
MAX_ROTATION_DEG = 5.0  # per axis
MAX_TRANSLATION_MM = 15.0  # per axis
NOISE_HU = 20.0
NODULES = (3, 5)  # per exam, inclusive
MIN_LUNG_DEPTH_MM = 5.0
BOX_XY = (6, 10)  # nodule box extent in registered voxels (x and y), inclusive
NODULE_HU = 30.0
AGREEMENT = 1e-3


@dataclass(frozen=True)
class Exam:
    """A synthetic exam on disk, its fixed -> moving matrix and its nodule boxes in the registered grid."""

    path: Path
    fixed: Geometry
    fixed_to_moving: np.ndarray  # 4x4
    boxes: list[list[int]]  # (i_min, i_max, j_min, j_max, k_min, k_max) = (y, x, z), inclusive


def _rigid(rng: np.random.Generator) -> np.ndarray:
    """Random rigid fixed -> moving matrix about the grid centre (+-5 deg per axis, +-15 mm per axis)."""
    angles = np.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3))
    translation = rng.uniform(-MAX_TRANSLATION_MM, MAX_TRANSLATION_MM, 3)
    return transform_to_matrix(sitk.Euler3DTransform((0.0, 0.0, 0.0), *angles, tuple(translation)))


def _paint_nodule(volume: np.ndarray, centre_mm: np.ndarray, radius_mm: float) -> None:
    """Paint a solid sphere (NODULE_HU) into a [z, y, x] volume on the benchmark grid, in place."""
    centre = (centre_mm - np.asarray(ORIGIN)) / np.asarray(SPACING)
    reach = np.ceil(radius_mm / np.asarray(SPACING)).astype(int) + 1
    low = np.maximum(np.floor(centre).astype(int) - reach, 0)
    high = np.minimum(np.ceil(centre).astype(int) + reach + 1, SIZE)
    axes = [np.asarray(ORIGIN)[d] + SPACING[d] * np.arange(low[d], high[d]) - centre_mm[d] for d in range(3)]
    distance2 = axes[2][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[0][None, None, :] ** 2
    block = volume[low[2]:high[2], low[1]:high[1], low[0]:high[0]]
    block[distance2 <= radius_mm**2] = NODULE_HU


def make_exam(seed: int, index: int, folder: Path, settings: PatchSettings) -> Exam:
    """Exam `index` (deterministic in seed and index), written to `folder` as `.nii.gz`."""
    rng = np.random.default_rng((seed, index))
    anatomy = sample_anatomy(rng, FOV_MM)
    volume = render_anatomy(anatomy, SIZE, SPACING, ORIGIN)
    fixed = Geometry(SIZE, SPACING, ORIGIN, IDENTITY)
    grid = registered_grid(fixed, settings.spacing_mm)
    fixed_to_moving = _rigid(rng)
    to_grid = np.linalg.inv(grid.matrix()) @ np.linalg.inv(fixed_to_moving)  # moving mm -> registered voxel
    candidates = np.asarray(ORIGIN) + rng.uniform(0, 1, (20000, 3)) * (np.asarray(SIZE) - 1) * np.asarray(SPACING)
    candidates = candidates[lung_depth_mm(anatomy, candidates) > MIN_LUNG_DEPTH_MM]
    count = int(rng.integers(NODULES[0], NODULES[1] + 1))
    boxes: list[list[int]] = []
    for point in candidates:
        centre = (to_grid @ np.append(point, 1.0))[:3]
        extent_xy = int(rng.integers(BOX_XY[0], BOX_XY[1] + 1))
        extent_z = max(2, int(round(extent_xy * settings.spacing_mm[0] / settings.spacing_mm[2])) + 1)
        low = np.round(centre - (np.array([extent_xy, extent_xy, extent_z]) - 1) / 2.0).astype(int)
        high = low + np.array([extent_xy, extent_xy, extent_z]) - 1
        box = [int(low[1]), int(high[1]), int(low[0]), int(high[0]), int(low[2]), int(high[2])]
        start, _ = patch_start(box, settings.size)
        if (start < 0).any() or (start + np.asarray(settings.size) > np.asarray(grid.shape)).any():
            continue  # keep patches inside the registered grid (see the module docstring)
        _paint_nodule(volume, point, 0.5 * extent_xy * settings.spacing_mm[0])
        boxes.append(box)
        if len(boxes) == count:
            break
    if len(boxes) < count:
        raise RuntimeError(f"exam {index}: only {len(boxes)} of {count} nodules placed")
    noise = rng.standard_normal(volume.shape, dtype=np.float32) * np.float32(NOISE_HU)
    array = np.clip(np.round(volume + noise), -32768, 32767).astype(np.int16)
    del volume, noise
    path = folder / f"exam_{index}.nii.gz"
    write_nifti(array, fixed, path)
    return Exam(path, fixed, fixed_to_moving, boxes)


def run_floor(exam: Exam) -> float:
    """Seconds to read and decompress the exam."""
    start = time.perf_counter()
    read_image(exam.path)
    return time.perf_counter() - start


def run_noduleflow(exam: Exam, settings: PatchSettings) -> tuple[float, float, list[np.ndarray]]:
    """Seconds in all, seconds cutting, and the patches: read, then `cut_patch` for every nodule."""
    grid = registered_grid(exam.fixed, settings.spacing_mm)
    start = time.perf_counter()
    image = read_image(exam.path)
    read = time.perf_counter()
    patches = [cut_patch(image, grid, patch_start(box, settings.size)[0], exam.fixed_to_moving, settings)
               for box in exam.boxes]
    end = time.perf_counter()
    return end - start, end - read, patches


def _crop(volume: np.ndarray, start: np.ndarray, size: tuple[int, int, int], fill: float) -> np.ndarray:
    """The (Z, Y, X) block of a [z, y, x] volume at start (x, y, z) of `size` (x, y, z), `fill` outside."""
    begin = np.asarray(start)[::-1]
    shape = np.asarray(size)[::-1]
    out = np.full(tuple(shape), fill, dtype=volume.dtype)
    low = np.maximum(begin, 0)
    high = np.minimum(begin + shape, volume.shape)
    if (high > low).all():
        out[tuple(slice(a - b, c - b) for a, b, c in zip(low, begin, high, strict=True))] = \
            volume[tuple(slice(a, c) for a, c in zip(low, high, strict=True))]
    return out


def run_whole_volume(exam: Exam, settings: PatchSettings) -> tuple[float, float, list[np.ndarray]]:
    """Seconds in all, seconds after reading, and the patches: read, resample the whole volume, crop."""
    grid = registered_grid(exam.fixed, settings.spacing_mm)
    start = time.perf_counter()
    image = read_image(exam.path)
    read = time.perf_counter()
    low = settings.hu_window[0]
    resampled = sitk.Resample(image, grid.reference_image(), matrix_to_transform(exam.fixed_to_moving),
                              sitk.sitkLinear, low, sitk.sitkFloat32)
    volume = sitk.GetArrayViewFromImage(resampled)
    patches = [to_unit_range(_crop(volume, patch_start(box, settings.size)[0], settings.size, low),
                             settings.hu_window) for box in exam.boxes]
    end = time.perf_counter()
    return end - start, end - read, patches


@dataclass
class Times:
    """Best seconds per exam (in all, and without the read) of one approach."""

    total: list[float]
    work: list[float]

    def add(self, runs: list[tuple[float, float]]) -> None:
        """Keep the best of the repeated (total, work) runs of one exam."""
        self.total.append(min(total for total, _ in runs))
        self.work.append(min(work for _, work in runs))


def main() -> None:
    """Parse the flags, build the exams, time the three measurements per exam and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exams", type=int, default=3, help="synthetic exams (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the exams (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="ITK threads (default 1, as the cache_shard rule)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement, best kept (default 3)")
    args = parser.parse_args()
    if args.exams < 1 or args.threads < 1 or args.repeats < 1:
        parser.error("--exams, --threads and --repeats must be at least 1")
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    full = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "full.yaml").read_text())
    settings = from_config(PatchSettings, full["patch"])  # NLST-size patches (128 x 128 x 32)
    print(f"{args.exams} exams of {SIZE[0]} x {SIZE[1]} x {SIZE[2]} voxels at {SPACING[0]} x {SPACING[1]} x "
          f"{SPACING[2]} mm (int16 .nii.gz), {NODULES[0]}-{NODULES[1]} nodules each, seed {args.seed}; patches "
          f"{' x '.join(map(str, settings.size))} at {' x '.join(map(str, settings.spacing_mm))} mm; "
          f"{args.threads} ITK thread(s), {os.cpu_count()} CPUs; best of {args.repeats} runs per measurement")
    floor, noduleflow, whole = Times([], []), Times([], []), Times([], [])
    patches_total, largest_difference = 0, 0.0
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.exams):
            exam = make_exam(args.seed, index, Path(folder), settings)
            runs: dict[str, list[tuple[float, float]]] = {"floor": [], "noduleflow": [], "whole": []}
            for _ in range(args.repeats):  # interleaved, so that a busy machine slows all three alike
                seconds = run_floor(exam)
                runs["floor"].append((seconds, seconds))
                total, work, ours = run_noduleflow(exam, settings)
                runs["noduleflow"].append((total, work))
                total, work, theirs = run_whole_volume(exam, settings)
                runs["whole"].append((total, work))
            difference = max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True))
            largest_difference = max(largest_difference, difference)
            for times, name in ((floor, "floor"), (noduleflow, "noduleflow"), (whole, "whole")):
                times.add(runs[name])
            count = len(exam.boxes)
            patches_total += count
            print(f"exam {index + 1}: {exam.path.stat().st_size / 1e6:.1f} MB, {count} nodules; read "
                  f"{floor.total[-1]:.3f} s; noduleflow {noduleflow.total[-1]:.3f} s (cut "
                  f"{1e3 * noduleflow.work[-1] / count:.1f} ms/patch); whole volume {whole.total[-1]:.3f} s "
                  f"(resample + crop {1e3 * whole.work[-1] / count:.1f} ms/patch); max |difference| {difference:.2e}",
                  flush=True)
    seconds = {name: (sum(times.total), sum(times.work)) for name, times in
               (("read only (floor)", floor), ("noduleflow cut_patch", noduleflow), ("whole volume + crop", whole))}
    print()
    print(f"{'approach':<22}{'s/exam':>9}{'patches/s':>11}{'s/exam w/o read':>17}{'patches/s w/o read':>20}")
    for name, (total, work) in seconds.items():
        rate = f"{patches_total / total:11.1f}" if name != "read only (floor)" else f"{'-':>11}"
        rate_work = f"{patches_total / work:20.1f}" if name != "read only (floor)" else f"{'-':>20}"
        work_text = f"{work / args.exams:17.3f}" if name != "read only (floor)" else f"{'-':>17}"
        print(f"{name:<22}{total / args.exams:9.3f}{rate}{work_text}{rate_work}")
    ours_total, ours_work = seconds["noduleflow cut_patch"]
    theirs_total, theirs_work = seconds["whole volume + crop"]
    floor_total = seconds["read only (floor)"][0]
    print(f"noduleflow / whole volume, patches/s: {theirs_total / ours_total:.1f}x with the read, "
          f"{theirs_work / ours_work:.1f}x without it")
    print(f"noduleflow time / read time: {ours_total / floor_total:.3f}")
    print(f"max |noduleflow - whole volume| over {patches_total} patches: {largest_difference:.2e} "
          f"({'within' if largest_difference <= AGREEMENT else 'NOT within'} {AGREEMENT:g})")
    print("goals: noduleflow time / read time under 1.3; at least 15x the whole-volume approach's patches/s; "
          f"patches agree within {AGREEMENT:g}")


if __name__ == "__main__":
    main()
