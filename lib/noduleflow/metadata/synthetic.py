"""Synthetic longitudinal lung-screening cohort with known ground truth (the pipeline's default data).

Each patient has one anatomy (see `phantom`) in an "anatomy frame" (LPS mm, centred on the chest). Every exam
sees it through a known pose: p_exam = R (B p_anatomy) + t, where R, t is a rigid misalignment (identity for the
patient's first exam) and B a small breathing scale. Nodules live in the anatomy frame and change volume
between exams with a doubling time that depends on their kind, size and fate; they are rendered into every exam
with partial-volume supersampling. As in the risk models radiologists use, a nodule's look announces its fate:
solid and part-solid nodules mostly grow, ground-glass ones mostly resolve (transient inflammation) and calcified
granulomas stay as they are, so a forecaster can learn the future from the prior image and the interval.

Written files (paths relative to the output folder):
- `manifest.csv`: one row per series (the exams manifest the pipeline reads);
- `nodules.pt`: tracking file pid -> nodule_group -> exam_idx -> lesion dict (annotated on the thinnest series);
- `images/<pid>/<exam_id>.nii.gz`: int16 HU volumes;
- `truth/exams.parquet`: each series' pose; `truth/nodules.parquet`: true volume and centre of every nodule in
  every series; `truth/masks/<exam_id>.nii.gz`: label maps (value = nodule_group).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from scipy import fft
from scipy.ndimage import gaussian_filter, gaussian_filter1d, map_coordinates

from noduleflow.ids import nlst_exam_id
from noduleflow.imaging import Geometry, homogeneous, write_nifti
from noduleflow.io import atomic_path, write_csv, write_parquet
from noduleflow.metadata.phantom import (
    ChestAnatomy,
    boundary_distances_mm,
    lung_depth_mm,
    render_anatomy,
    sample_anatomy,
)

log = logging.getLogger(__name__)

KINDS = ("solid", "part_solid", "ground_glass", "calcified")
_KIND_P = (0.4, 0.15, 0.25, 0.2)
FATES = ("growing", "stable", "shrinking")
# Probability of each fate per kind, and the range of |doubling time| in days for growing / shrinking nodules.
_FATE_P = {"solid": (0.9, 0.1, 0.0), "part_solid": (0.9, 0.1, 0.0), "ground_glass": (0.0, 0.15, 0.85),
           "calcified": (0.0, 1.0, 0.0)}
_DOUBLING_DAYS = {"solid": (120.0, 400.0), "part_solid": (250.0, 600.0), "ground_glass": (150.0, 400.0),
                  "calcified": (1.0, 1.0)}  # unused: calcified nodules are stable
_TISSUE_HU = {"solid": 35.0, "part_solid": -520.0, "ground_glass": -620.0, "calcified": 35.0}
_CORE_HU = {"part_solid": 35.0, "calcified": 600.0}  # solid core of part-solid nodules, calcified core
# Fate preset "screening": most nodules stable or slowly growing, a minority growing fast, some resolving. These
# proportions are this model's choice (see README, "The synthetic cohort"); a growing nodule is slow (doubling
# time 600-1500 days, NELSON's "no growth concern" range) with probability _SLOW_P[kind], else fast.
_FATE_P_SCREENING = {"solid": (0.35, 0.55, 0.1), "part_solid": (0.45, 0.4, 0.15), "ground_glass": (0.25, 0.45, 0.3),
                     "calcified": (0.0, 1.0, 0.0)}
_SLOW_P = {"solid": 0.7, "part_solid": 0.5, "ground_glass": 0.8, "calcified": 1.0}
_SLOW_DOUBLING_DAYS = (600.0, 1500.0)
# Fate preset "screening": the odds that a nodule grows fast rise with its volume at first appearance as NELSON's
# lung-cancer probability does per volume class (below 100, 100-300, from 300 mm^3: 0.6, 2.4 and 16.9 %; Horeweg et
# al., Lancet Oncol 2014): a fast grower's first volume is drawn from the classes weighted by these numbers.
_VOLUME_CLASS_EDGES_MM3 = (100.0, 300.0)
_FAST_CLASS_WEIGHTS = (0.6, 2.4, 16.9)
# Image preset "screening": in-plane point spread (Gaussian sigma, mm) and noise power peak (cycles/mm) of a sharp
# lung kernel, a model assumption; the noise level scales as 1 / sqrt(mAs x slice thickness).
_KERNEL_PSF_MM = 0.3
_KERNEL_NPS_PEAK = 0.5
_TIMEPOINT_PATTERNS = ((0, 1, 2), (0, 1), (0, 2), (1, 2), (0,))
_TIMEPOINT_P = (0.6, 0.14, 0.1, 0.06, 0.1)
_MIN_VOLUME, _MAX_VOLUME = 8.0, 6000.0


@dataclass(frozen=True)
class CohortConfig:
    """Parameters of the synthetic cohort (config key `synthetic`, built with `settings.from_config`).

    The defaults are the demo cohort of config/config.yaml (tests and benchmarks build small cohorts by changing a
    few of them); the fields without a config key are the generator's internal constants."""

    n_patients: int = 16
    seed: int = 2026
    first_pid: int = 100001
    fov_mm: tuple[float, float, float] = (220.0, 180.0, 130.0)
    pixel_spacing_mm: tuple[float, float] = (0.7, 0.8)
    slice_thicknesses_mm: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 2.5)
    second_series_fraction: float = 0.2
    reference_spacing_mm: tuple[float, float, float] = (0.75, 0.75, 1.0)
    max_rotation_deg: float = 5.0
    max_translation_mm: float = 15.0
    max_start_offset_mm: float = 0.0  # exams' scan ranges start up to this far apart along the body axis
    deformation_mm: float = 0.0  # largest smooth non-rigid displacement of a follow-up (0: rigid only)
    breathing_scale: float = 0.003
    nodules_per_patient: tuple[int, int] = (1, 4)
    initial_volume_mm3: tuple[float, float] = (15.0, 1500.0)
    late_nodule_fraction: float = 0.15
    noise_hu: tuple[float, float] = (12.0, 25.0)
    preset: str = "demo"  # "screening": nodules imaged with the anatomy, low-dose sharp-kernel noise, real margins
    fates: str = "learnable"  # "screening": mostly stable or slow nodules and 1-3 year intervals
    attached_fraction: float = 0.3  # preset "screening": nodules touching the pleura or a large vessel
    tube_current_mAs: tuple[float, float] = (40.0, 80.0)  # preset "screening": per exam (NLST's low-dose range)
    noise_hu_at_100mAs: tuple[float, float] = (60.0, 90.0)  # ... noise std of a 1 mm slice at 100 mAs

    def __post_init__(self) -> None:
        if self.preset not in ("demo", "screening"):
            raise ValueError(f"synthetic.preset must be demo or screening, not {self.preset!r}")
        if self.fates not in ("learnable", "screening"):
            raise ValueError(f"synthetic.fates must be learnable or screening, not {self.fates!r}")


@dataclass(frozen=True)
class Pose:
    """Mapping from the anatomy frame to one exam's physical space: p = R (B p_a) + t."""

    rotation: np.ndarray
    translation: np.ndarray
    breathing: np.ndarray

    def matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix anatomy -> exam."""
        out = np.eye(4)
        out[:3, :3] = self.rotation @ np.diag(self.breathing)
        out[:3, 3] = self.translation
        return out


@dataclass(frozen=True)
class Deformation:
    """Smooth non-rigid change of one exam's anatomy: its point x (before the pose) shows anatomy point x + u(x).

    u is a sum of sine waves, u(x) = sum_k a_k sin(k_k . x + phase_k), with wavelengths of 150-300 mm and
    |u| <= the sum of |a_k|; its gradient stays below 0.25, so the inverse is found by fixed-point iteration.
    No waves: the identity.
    """

    waves: np.ndarray  # (K, 7): wave vector (rad/mm, 3), amplitude (mm, 3), phase (rad)

    @classmethod
    def sample(cls, rng: np.random.Generator, amplitude_mm: float, count: int = 3) -> Deformation:
        """Random waves whose amplitudes add up to `amplitude_mm`."""
        directions = _unit_rows(rng.normal(size=(count, 3)))
        vectors = directions * (2 * np.pi / rng.uniform(150.0, 300.0, count))[:, None]
        amplitudes = _unit_rows(rng.normal(size=(count, 3))) * amplitude_mm / count
        return cls(np.column_stack([vectors, amplitudes, rng.uniform(0.0, 2 * np.pi, count)]))

    @classmethod
    def from_list(cls, values: list[float] | np.ndarray) -> Deformation:
        """The deformation stored in the truth table as a flat list."""
        return cls(np.reshape(np.asarray(values, dtype=float), (-1, 7)))

    def displacement(self, points: np.ndarray) -> np.ndarray:
        """u at (N, 3) points, mm."""
        vectors, amplitudes, phases = self.waves[:, :3], self.waves[:, 3:6], self.waves[:, 6]
        return np.sin(np.asarray(points, dtype=float) @ vectors.T + phases) @ amplitudes

    def to_anatomy(self, points: np.ndarray) -> np.ndarray:
        """Anatomy points seen at the exam's (pre-pose) points."""
        return np.asarray(points, dtype=float) + self.displacement(points)

    def reach_mm(self) -> float:
        """An upper bound of |u| (mm): the sum of the waves' amplitudes."""
        return float(np.linalg.norm(self.waves[:, 3:6], axis=1).sum())

    def from_anatomy(self, points: np.ndarray) -> np.ndarray:
        """Pre-pose exam points that show the given anatomy points (inverse of `to_anatomy`)."""
        points = np.asarray(points, dtype=float)
        x = points.copy()
        for _ in range(40):  # contraction with factor < 0.25: 40 steps reach float precision
            x = points - self.displacement(x)
        return x


def _unit_rows(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@dataclass(frozen=True)
class Clip:
    """Where an attached nodule can be seen: on the lung side of the lung border and outside large vessels and
    airways, i.e. where the smaller of `boundary_distances_mm`'s two distances is positive. That distance is sampled
    on a grid around the nodule's centre (anatomy frame) and interpolated linearly (continued with its edge values
    outside the grid); `lipschitz` bounds the interpolant's gradient (mm per mm)."""

    origin: np.ndarray  # anatomy-frame point of sample [0, 0, 0], mm
    spacing: float
    values: np.ndarray  # [x, y, z], mm
    lipschitz: float = field(init=False)

    def __post_init__(self) -> None:
        # in each cell, the interpolant's derivative along an axis is an average of the grid's differences there
        steps = [float(np.abs(np.diff(self.values, axis=d)).max(initial=0.0)) for d in range(3)]
        object.__setattr__(self, "lipschitz", math.hypot(*steps) / self.spacing)

    @classmethod
    def around(cls, anatomy: ChestAnatomy, centre: np.ndarray, radius: float, spacing: float = 1.0) -> Clip:
        """The clip of a nodule at `centre` within `radius` mm of it."""
        n = math.ceil(radius / spacing) + 1
        axis = np.arange(-n, n + 1) * spacing
        grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1) + centre
        values = boundary_distances_mm(anatomy, grid.reshape(-1, 3)).min(axis=1).reshape(grid.shape[:3])
        return cls(np.asarray(centre, dtype=float) - n * spacing, spacing, values)

    def distance(self, points: np.ndarray) -> np.ndarray:
        """The interpolated distance at (N, 3) anatomy-frame points: > 0 where the nodule can be seen."""
        coordinates = ((np.asarray(points, dtype=float) - self.origin) / self.spacing).T
        return map_coordinates(self.values, coordinates, order=1, mode="nearest")


@dataclass
class NoduleTrack:
    """One physical nodule followed over a patient's exams."""

    group: int
    kind: str
    fate: str
    center: np.ndarray  # anatomy frame, mm
    orientation: np.ndarray  # 3x3 rotation of the nodule's own axes
    axes: np.ndarray  # axis ratios with product 1
    lobe_directions: np.ndarray  # (K, 3) unit vectors
    lobe_amplitudes: np.ndarray  # (K,)
    first_day: float
    first_volume: float
    doubling_days: float  # positive grows, negative shrinks, inf stable
    core_fraction: float
    hu: float
    screen_detected: bool
    spike_directions: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (S, 3) spiculae, unit vectors
    spike_amplitudes: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (S,) their length / radius
    core_offset: np.ndarray = field(default_factory=lambda: np.zeros(3))  # solid core centre, in units of the scale
    attached_to: str = ""  # "pleura" or "vessel" when placed touching it
    clip: Clip | None = None  # attached nodules: only the part on the lung side, outside large vessels, exists
    hidden_levels: np.ndarray = field(default_factory=lambda: np.zeros(0))  # see `attach`
    hidden_cell: float = 0.0  # volume (mm^3) of each point of hidden_levels
    covered_scale: float = 0.0  # the largest scale up to which hidden_levels hold every hidden point
    unit_volume: float = field(init=False)
    max_lobulation: float = field(init=False)

    def __post_init__(self) -> None:
        lobulation = _lobulation(_sphere(), self)
        self.unit_volume = float(4.0 / 3.0 * np.pi * np.mean(lobulation**3) * np.prod(self.axes))
        self.max_lobulation = float(lobulation.max())

    def volume(self, day: float) -> float:
        """True volume in mm^3 at a given day (only meaningful from first_day on): that of the part the image shows."""
        volume = self.first_volume * 2.0 ** ((day - self.first_day) / self.doubling_days)
        return float(np.clip(volume, _MIN_VOLUME, _MAX_VOLUME))

    def scale(self, day: float) -> float:
        """Linear scale s of the shape so that its volume (an attached nodule's: the part not clipped) equals
        volume(day)."""
        volume = self.volume(day)
        scale = (volume / self.unit_volume) ** (1.0 / 3.0)
        if self.clip is None:
            return scale
        low, high = scale, self.covered_scale  # the clipped volume grows with the scale: bisection
        for _ in range(50):
            middle = 0.5 * (low + high)
            low, high = (middle, high) if self.clipped_volume(middle) < volume else (low, middle)
        return high

    def clipped_volume(self, scale: float) -> float:
        """Volume (mm^3) of the part of the shape at `scale` left by the clip (up to `covered_scale`)."""
        hidden = np.searchsorted(self.hidden_levels, scale, side="right") * self.hidden_cell
        return self.unit_volume * scale**3 - hidden

    def attach(self, anatomy: ChestAnatomy, volume: float, step: float = 0.25) -> None:
        """Clip the nodule to what the image can show around its (attached) centre, for volumes up to `volume`:
        the part in the chest wall, mediastinum or diaphragm or in a large vessel or airway does not exist.

        The volume hidden at a scale s is counted on a grid of `step` mm: hidden_levels are the sorted levels at
        scale 1 of its hidden points (a point is inside the shape at scale s when its level at scale 1 is <= s)."""
        radius = self.max_radius((volume / self.unit_volume) ** (1.0 / 3.0)) * 1.3
        while True:
            self.clip = Clip.around(anatomy, self.center, radius)
            n = math.floor(radius / step)
            axis = (np.arange(-n, n) + 0.5) * step
            hidden = []
            for x in axis:  # one plane at a time: the grid holds millions of points
                plane = np.stack(np.meshgrid([x], axis, axis, indexing="ij"), -1).reshape(-1, 3) + self.center
                plane = plane[self.clip.distance(plane) <= 0.0]
                hidden.append(self.shape_level(plane, 1.0))
            self.hidden_levels, self.hidden_cell = np.sort(np.concatenate(hidden)), step**3
            self.covered_scale = n * step / (self.max_radius(1.0))  # the shape at this scale fits in the grid's ball
            if self.clipped_volume(self.covered_scale) >= volume:
                return
            radius *= 1.3  # a nodule in a corner: look farther

    def max_radius(self, scale: float) -> float:
        """Radius of a sphere around the centre that contains the nodule at a given scale."""
        return scale * float(self.axes.max()) * self.max_lobulation * 1.05

    def shape_level(self, points: np.ndarray, scale: float) -> np.ndarray:
        """rho / (s L(direction)) for (N, 3) anatomy-frame points, without the clip."""
        local = (points - self.center) @ self.orientation / self.axes
        rho = np.linalg.norm(local, axis=1)
        direction = local / np.maximum(rho, 1e-9)[:, None]
        return rho / (scale * _lobulation(direction, self))

    def level(self, points: np.ndarray, scale: float) -> np.ndarray:
        """`shape_level`, infinite where clipped: <= 1 inside the nodule, core inside core_fraction."""
        level = self.shape_level(points, scale)
        if self.clip is not None:
            level[self.clip.distance(points) <= 0.0] = np.inf
        return level


    def level_bounds(self, points: np.ndarray, scale: float, reach: float) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds of `level` over balls around (N, 3) anatomy-frame points whose radius, in the
        nodule's own axis-scaled coordinates, is `reach`."""
        local = (points - self.center) @ self.orientation / self.axes
        rho = np.linalg.norm(local, axis=1)
        direction = local / np.maximum(rho, 1e-9)[:, None]
        spread = np.where(rho > reach, np.arcsin(np.minimum(reach / np.maximum(rho, 1e-9), 1.0)), np.pi)
        lobe_low, lobe_high = _lobulation_bounds(direction, spread, self)
        low, high = np.maximum(rho - reach, 0.0) / (scale * lobe_high), (rho + reach) / (scale * lobe_low)
        if self.clip is not None:  # the ball all seen, all clipped, or in between (then the upper bound is infinite)
            distance = self.clip.distance(points)
            margin = self.clip.lipschitz * reach * float(self.axes.min()) + 1e-6  # the ball's radius in mm: reach
            low[distance < -margin] = np.inf  # times the smallest axis ratio
            high[distance <= margin] = np.inf
        return low, high

    def core(self, points: np.ndarray, scale: float, level: np.ndarray) -> np.ndarray:
        """Whether (N, 3) points (whose `level` is given) lie in the solid core, centred at core_offset."""
        if not self.core_offset.any():
            return level <= self.core_fraction
        offset = self.orientation @ (self.core_offset * self.axes) * scale
        return (level <= 1.0) & (np.linalg.norm((points - self.center - offset) @ self.orientation / self.axes, axis=1)
                                 <= self.core_fraction * scale)


def _bumps(track: NoduleTrack) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """The terms of L(d) = 1 + sum a exp((d . b - 1) / width): (directions b, amplitudes a, width) of the smooth
    lobes and, if any, of the narrow spiculae (about 5 degrees wide)."""
    terms = [(track.lobe_directions, track.lobe_amplitudes, 0.15)]
    if len(track.spike_amplitudes):
        terms.append((track.spike_directions, track.spike_amplitudes, 0.004))
    return terms


def _lobulation(direction: np.ndarray, track: NoduleTrack) -> np.ndarray:
    """Radial factor L(d) >= 1: smooth bumps around the lobe directions."""
    factor = 1.0
    for directions, amplitudes, width in _bumps(track):
        factor = factor + np.exp((direction @ directions.T - 1.0) / width) @ amplitudes
    return factor


def _lobulation_bounds(direction: np.ndarray, spread: np.ndarray, track: NoduleTrack) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds of L over the directions within angle `spread` (radians) of each unit direction."""
    low, high = np.ones(len(direction)), np.ones(len(direction))
    for directions, amplitudes, width in _bumps(track):
        angle = np.arccos(np.clip(direction @ directions.T, -1.0, 1.0))
        spread_k = spread[:, None]
        low += np.exp((np.cos(np.minimum(angle + spread_k, np.pi)) - 1.0) / width) @ amplitudes
        high += np.exp((np.cos(np.maximum(angle - spread_k, 0.0)) - 1.0) / width) @ amplitudes
    return low, high


@functools.cache
def _sphere(n: int = 8192) -> np.ndarray:
    """Nearly uniform unit directions (Fibonacci sphere) for integrals over directions.

    The nodule shape is star-shaped, so its volume is (4 pi / 3) * mean(L^3) * prod(axes) at scale 1.
    """
    k = np.arange(n) + 0.5
    polar = np.arccos(1 - 2 * k / n)
    azimuth = np.pi * (1 + 5**0.5) * k
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], 1)


def _random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Rotation with each Euler angle uniform in [-max_deg, max_deg]."""
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _uniform_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3D rotation."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _life_radius(track: NoduleTrack, days: dict[int, float]) -> float:
    """Radius around the centre that holds the nodule at every exam from its first appearance on."""
    return max(track.max_radius(track.scale(day)) for day in days.values() if day >= track.first_day)


def _sample_nodules(rng: np.random.Generator, anatomy: ChestAnatomy, config: CohortConfig,
                    days: dict[int, float]) -> list[NoduleTrack]:
    """Place 1-4 nodules in lung parenchyma, far enough from the lung border, vessels and each other (preset
    "screening": a fraction `attached_fraction` touches the lung border or a large vessel instead)."""
    count = int(rng.integers(config.nodules_per_patient[0], config.nodules_per_patient[1] + 1))
    half = np.asarray(config.fov_mm) / 2.0 - np.array([35.0, 35.0, 30.0 + config.max_start_offset_mm / 2.0])
    candidates = rng.uniform(-half, half, size=(20000, 3))
    depth = lung_depth_mm(anatomy, candidates)
    screening = config.preset == "screening"
    border = boundary_distances_mm(anatomy, candidates) if screening else None
    tracks: list[NoduleTrack] = []
    for group in range(1, count + 1):
        track, _, attach = _draw_nodule(rng, config, days, group)
        for _ in range(4):  # no room for it: try smaller
            radius = _life_radius(track, days)
            free = depth > radius + 2.0
            if attach:  # the centre inside the lung, the nodule's smallest extent reaching the border or a vessel
                reach = track.scale(track.first_day) * float(track.axes.min())
                free = (border[:, 0] > 0) & (border.min(axis=1) > 0.4 * reach) & (border.min(axis=1) < 0.8 * reach)
            for other in tracks:
                free &= np.linalg.norm(candidates - other.center, axis=1) > radius + _life_radius(other, days) + 8.0
            if free.any():
                chosen = int(np.flatnonzero(free)[0])
                track.center = candidates[chosen]
                if attach:
                    track.attached_to = "pleura" if border[chosen, 0] <= border[chosen, 1] else "vessel"
                    track.attach(anatomy, max(track.volume(day) for day in days.values() if day >= track.first_day))
                tracks.append(track)
                break
            track.first_volume /= 3.0
    return tracks


def _draw_nodule(rng: np.random.Generator, config: CohortConfig, days: dict[int, float],
                 group: int) -> tuple[NoduleTrack, bool, bool]:
    """A nodule of a patient with exams on `days` (timepoint -> day), everything but its place: kind, fate,
    growth, first exam, shape and look; whether it grows slowly (fates "screening") and whether it is to touch the
    pleura or a vessel (preset "screening")."""
    timepoints = sorted(days)
    screening = config.preset == "screening"
    kind = str(rng.choice(KINDS, p=_KIND_P))
    fate, doubling, slow = _draw_fate(rng, config, kind)
    first_volume = _draw_first_volume(rng, config, fast=fate == "growing" and not slow)
    if fate == "growing":
        doubling *= (first_volume / 200.0) ** 0.15  # larger nodules grow a little more slowly
    elif fate == "shrinking":
        doubling = -doubling
    else:
        doubling = math.inf
    late = len(timepoints) > 1 and rng.random() < config.late_nodule_fraction
    first_tp = timepoints[int(rng.integers(1, len(timepoints)))] if late else timepoints[0]
    n_lobes = int(rng.integers(1, 3)) if kind == "ground_glass" else int(rng.integers(2, 6))
    axes = rng.uniform(0.75, 1.25, 3)
    lobes = rng.normal(size=(n_lobes, 3))
    track = NoduleTrack(
        group=group, kind=kind, fate=fate, center=np.zeros(3), orientation=_uniform_rotation(rng),
        axes=axes / np.prod(axes) ** (1 / 3), lobe_directions=lobes / np.linalg.norm(lobes, axis=1, keepdims=True),
        lobe_amplitudes=rng.uniform(0.08, 0.25, n_lobes), first_day=days[first_tp], first_volume=first_volume,
        doubling_days=doubling, core_fraction=float(rng.uniform(0.35, 0.6)),
        hu=_TISSUE_HU[kind] + float(rng.normal(0, 15)),
        screen_detected=bool(rng.random() < 0.85),
    )
    attach = screening and rng.random() < config.attached_fraction
    if screening:
        _screening_look(rng, track, fast=fate == "growing" and not slow)
    return track, slow, attach


def _draw_fate(rng: np.random.Generator, config: CohortConfig, kind: str) -> tuple[str, float, bool]:
    """A nodule's fate, its |doubling time| in days before the size scaling, and whether it grows slowly."""
    fate = str(rng.choice(FATES, p=(_FATE_P_SCREENING if config.fates == "screening" else _FATE_P)[kind]))
    slow = config.fates == "screening" and fate == "growing" and rng.random() < _SLOW_P[kind]
    return fate, float(rng.uniform(*(_SLOW_DOUBLING_DAYS if slow else _DOUBLING_DAYS[kind]))), slow


def _draw_first_volume(rng: np.random.Generator, config: CohortConfig, fast: bool) -> float:
    """A nodule's volume at first appearance: log-uniform over `initial_volume_mm3`; with fates "screening" a fast
    grower's is log-uniform within a NELSON volume class drawn with weights _FAST_CLASS_WEIGHTS times the class's
    share of the log range, so the odds of fast growth in a class are proportional to its weight."""
    low, high = np.log(config.initial_volume_mm3)
    if config.fates == "screening" and fast:
        edges = np.clip(np.log([config.initial_volume_mm3[0], *_VOLUME_CLASS_EDGES_MM3,
                                config.initial_volume_mm3[1]]), low, high)
        weights = np.diff(edges) * _FAST_CLASS_WEIGHTS
        chosen = int(rng.choice(len(weights), p=weights / weights.sum()))
        low, high = edges[chosen], edges[chosen + 1]
    return float(np.exp(rng.uniform(low, high)))


def _draw_schedule(rng: np.random.Generator, config: CohortConfig) -> tuple[tuple[int, ...], dict[int, float]]:
    """A patient's screening timepoints (some patients miss rounds) and their days since baseline."""
    pattern = _TIMEPOINT_PATTERNS[int(rng.choice(len(_TIMEPOINT_PATTERNS), p=_TIMEPOINT_P))]
    all_days = _draw_days(rng, config)
    return pattern, {tp: all_days[tp] for tp in pattern}


def _draw_days(rng: np.random.Generator, config: CohortConfig) -> dict[int, float]:
    """Days since baseline of the three screening rounds: yearly, or (fates "screening") every interval between
    two rounds 330-1095 days (about 1-3 years)."""
    days = {0: 0.0}
    for tp in (1, 2):
        days[tp] = days[tp - 1] + 365.0 + float(np.round(rng.normal(0, 25)))
    if config.fates == "screening":
        days[1] = float(np.round(rng.uniform(330.0, 730.0)))
        days[2] = float(np.round(rng.uniform(days[1] + 330.0, 1095.0)))
    return days


def _screening_look(rng: np.random.Generator, track: NoduleTrack, fast: bool) -> None:
    """Preset "screening": margins and solid cores that hint at the fate without giving it away.

    Fast-growing solid and part-solid nodules are more often spiculated and lobulated, with larger solid cores;
    part-solid cores sit off-centre.
    """
    if track.kind in ("solid", "part_solid") and rng.random() < (0.6 if fast else 0.15):
        count = int(rng.integers(6, 15))
        track.spike_directions = _unit_rows(rng.normal(size=(count, 3)))
        track.spike_amplitudes = rng.uniform(0.4, 0.9, count)
    if fast and track.kind != "calcified":
        track.lobe_amplitudes = track.lobe_amplitudes * rng.uniform(1.3, 1.8)
    if track.kind == "part_solid":
        track.core_fraction = float(rng.uniform(0.5, 0.65) if fast else rng.uniform(0.3, 0.5))
        track.core_offset = _unit_rows(rng.normal(size=(1, 3)))[0] * rng.uniform(0.15, 0.9 - track.core_fraction)
    track.__post_init__()  # the margins changed the volume of the unit shape


def _render_nodule(volume: np.ndarray, labels: np.ndarray, track: NoduleTrack, day: float,
                   geometry: Geometry, exam_from_anatomy: np.ndarray) -> tuple[int, list[int], list[int]]:
    """Draw one nodule into an exam (partial volume by 3x3x3 supersampling); return voxel count, box, centre."""
    scale = track.scale(day)
    spacing = np.asarray(geometry.spacing)
    origin = np.asarray(geometry.origin)
    anatomy_from_exam = np.linalg.inv(exam_from_anatomy)
    centre_index, low, high = _nodule_box(track, scale, geometry, exam_from_anatomy)
    grid = np.stack(np.meshgrid(*[np.arange(lo, hi + 1) for lo, hi in zip(low, high, strict=True)], indexing="ij"), -1)
    grid = grid.reshape(-1, 3)
    outer, core = _voxel_fractions(track, scale, grid, spacing, origin, anatomy_from_exam)
    core_hu = _CORE_HU.get(track.kind, 0.0)
    xs, ys, zs = grid.T
    background = volume[zs, ys, xs]
    tissue = np.maximum(background, track.hu)  # vessels stay visible through ground glass
    volume[zs, ys, xs] = background * (1 - outer) + (outer - core) * tissue + core * np.maximum(background, core_hu)
    inside = outer >= 0.5
    if not inside.any():  # a tiny nodule in thick slices: mark at least the centre voxel
        inside[np.argmin(np.linalg.norm(grid - centre_index, axis=1))] = True
    labels[zs[inside], ys[inside], xs[inside]] = track.group
    ix, iy, iz = xs[inside], ys[inside], zs[inside]
    box = [int(iy.min()), int(iy.max()), int(ix.min()), int(ix.max()), int(iz.min()), int(iz.max())]
    centre = [int(round(centre_index[1])), int(round(centre_index[0])), int(round(centre_index[2]))]
    return int(inside.sum()), box, centre


def _nodule_box(track: NoduleTrack, scale: float, geometry: Geometry,
                exam_from_anatomy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A nodule's centre in exam voxel indices (x, y, z; identity direction) and the first and last voxel indices
    of a box that holds it, clipped to the grid."""
    spacing, origin = np.asarray(geometry.spacing), np.asarray(geometry.origin)
    centre_index = (exam_from_anatomy[:3, :3] @ track.center + exam_from_anatomy[:3, 3] - origin) / spacing
    reach = (track.max_radius(scale) + spacing) / spacing
    low = np.maximum(np.floor(centre_index - reach).astype(int), 0)
    high = np.minimum(np.ceil(centre_index + reach).astype(int), np.asarray(geometry.shape) - 1)
    return centre_index, low, high


def _voxel_fractions(track: NoduleTrack, scale: float, grid: np.ndarray, spacing: np.ndarray, origin: np.ndarray,
                     anatomy_from_exam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of each voxel (rows of `grid`, exam indices x, y, z) inside the nodule and inside its solid core,
    from 3 x 3 x 3 samples per voxel.

    Only voxels near a boundary are sampled: bounds of the nodule's level over a ball holding a voxel's samples
    decide the others (all samples inside or all outside), with the same result as sampling them.
    """
    offsets = np.stack(np.meshgrid(*[np.array([-1, 0, 1]) / 3.0] * 3, indexing="ij"), -1).reshape(-1, 3)
    linear = anatomy_from_exam[:3, :3]
    reach = (np.linalg.norm(spacing / 3.0) * np.linalg.norm(linear, 2) / float(track.axes.min())) * (1 + 1e-6) + 1e-9
    low, high = track.level_bounds((grid * spacing + origin) @ linear.T + anatomy_from_exam[:3, 3], scale, reach)
    eps = 1e-6
    outer = (high < 1.0 - eps).astype(float)
    core = np.zeros(len(grid))
    todo = low <= 1.0 + eps  # not every sample outside
    if track.kind not in _CORE_HU:
        todo &= outer < 1.0
    elif not track.core_offset.any():  # a centred core is a level set too (off-centre ones: sample every voxel)
        in_core = high < track.core_fraction - eps
        core[in_core] = 1.0
        todo &= ~(in_core | ((low > track.core_fraction + eps) & (outer == 1.0)))
    samples = (grid[todo].reshape(-1, 1, 3) + offsets) * spacing + origin
    points = samples.reshape(-1, 3) @ linear.T + anatomy_from_exam[:3, 3]
    level = track.level(points, scale).reshape(-1, len(offsets))
    outer[todo] = (level <= 1.0).mean(axis=1)
    if track.kind in _CORE_HU:
        core[todo] = track.core(points, scale, level.ravel()).reshape(level.shape).mean(axis=1)
    return outer, core


@dataclass(frozen=True)
class Reference:
    """A patient's noise-free anatomy, rendered once on an axis-aligned grid larger than every exam's field of view:
    float32 HU [z, y, x], spacing and origin (x, y, z, mm). Exams see it through `image`, only the part they reach."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    # where exams' parts are written, reused by every exam: fresh memory costs more to fault in than to fill
    scratch: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        depth, rows, width = self.array.shape
        object.__setattr__(self, "scratch", np.empty((depth + 2) * (rows + 1) * width, np.float32))

    def above_air(self, low: np.ndarray, high: np.ndarray, sigma: float = 0.0) -> np.ndarray:
        """Voxels low to high - 1 (x, y, z indices) in HU + 1000 (air is 0), blurred along z by a Gaussian of `sigma`
        slices (continued with its end slices), [z, y, x] between borders of air for `_resample_anatomy`: a slice
        before the first and after the last, a row after each slice's last. In the scratch buffer, valid until the
        next call."""
        part = self.array[low[2]:high[2], low[1]:high[1], low[0]:high[0]]
        depth, rows, width = part.shape
        padded = self.scratch[:(depth + 2) * (rows + 1) * width].reshape(depth + 2, rows + 1, width)
        out = padded[1:-1, :rows]
        np.add(part, 1000.0, out=out)
        if sigma > 0:  # in place (scipy reads each line along z whole before writing it): faster than from `part`
            gaussian_filter1d(out, sigma, axis=0, output=out, mode="nearest")
        padded[[0, -1]] = 0.0
        padded[:, rows] = 0.0
        return padded


def _anatomy_image(anatomy: ChestAnatomy, config: CohortConfig) -> Reference:
    """Noise-free anatomy rendered once per patient on a grid larger than every exam's field of view."""
    spacing = np.asarray(config.reference_spacing_mm)
    reach = config.max_translation_mm + config.deformation_mm + 10.0
    margins = np.maximum([25.0, 25.0, 30.0], [reach, reach, reach + config.max_start_offset_mm / 2.0])
    extent = np.asarray(config.fov_mm) + 2 * margins
    size = np.ceil(extent / spacing).astype(int)
    origin = -(size - 1) * spacing / 2.0
    return Reference(render_anatomy(anatomy, tuple(int(v) for v in size), tuple(spacing), tuple(origin)),
                     tuple(float(v) for v in spacing), tuple(float(v) for v in origin))


def _exam_geometry(config: CohortConfig, pixel_spacing: float, thickness: float, start_offset: float = 0.0) -> Geometry:
    """Axial exam grid covering the field of view, centred on the scanner's isocentre shifted by `start_offset`
    along the body axis."""
    spacing = np.array([pixel_spacing, pixel_spacing, thickness])
    size = np.floor(np.asarray(config.fov_mm) / spacing).astype(int)
    origin = -(size - 1) * spacing / 2.0 + np.array([0.0, 0.0, start_offset])
    return Geometry(tuple(int(v) for v in size), tuple(float(v) for v in spacing), tuple(float(v) for v in origin),
                    (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def _slice_profile_sigma_mm(reference: Reference, thickness: float) -> float:
    """Gaussian sigma (mm) along z that turns the reference's slice profile into one of `thickness`."""
    ref_dz = reference.spacing[2]
    return math.sqrt(thickness**2 - ref_dz**2) / 2.355 if thickness > ref_dz else 0.0


def _render_exam(reference: Reference, geometry: Geometry, pose: Pose, thickness: float,
                 rng: np.random.Generator, noise_hu: float, deformation: Deformation | None = None) -> np.ndarray:
    """Anatomy seen through `pose` (and `deformation`) on the exam grid, blurred to the slice thickness, noisy.

    The noise is white noise smoothed in-plane (Gaussian, 0.7 pixels), scaled by the standard deviation that the
    smoothing gives in expectation, and added a few slices at a time (the draws are those of one volume)."""
    array = _anatomy_exam(reference, geometry, pose, thickness, deformation)
    impulse = np.zeros(15)
    impulse[7] = 1.0
    expected = float((gaussian_filter1d(impulse, 0.7) ** 2).sum())  # the std of white noise smoothed along y and x
    for start in range(0, len(array), 8):
        part = array[start:start + 8]
        noise = rng.normal(size=part.shape).astype(np.float32)
        gaussian_filter(noise, sigma=(0.0, 0.7, 0.7), output=noise)
        noise *= noise_hu / expected
        part += noise
    return array


def _anatomy_exam(reference: Reference, geometry: Geometry, pose: Pose, thickness: float,
                  deformation: Deformation | None, blocks: int = 4) -> np.ndarray:
    """Noise-free anatomy seen through `pose` (and `deformation`) on the exam grid, blurred to the slice thickness.

    Only the part of the reference that the exam's samples can reach is cut out and gets the slice profile (with as
    many slices more on each side as the blur reaches, so that the samples see the same values as if it all had),
    for `blocks` runs of the exam's slices one after the other: their parts overlap a little (more blur), but they
    take a quarter of the memory, and faulting in fresh memory costs more than that blur."""
    sigma = _slice_profile_sigma_mm(reference, thickness) / reference.spacing[2]
    radius = int(4.0 * sigma + 0.5) if sigma > 0 else 0  # scipy's blur radius
    out = np.empty(geometry.shape[::-1], np.float32)
    run = max(math.ceil(geometry.shape[2] / blocks), 16)
    for k0 in range(0, geometry.shape[2], run):
        k1 = min(k0 + run, geometry.shape[2])
        block = Geometry((*geometry.shape[:2], k1 - k0), geometry.spacing,
                         tuple((geometry.matrix() @ [0.0, 0.0, k0, 1.0])[:3]), geometry.direction)
        low, high = _footprint(reference, block, pose, deformation, radius)
        origin = np.asarray(reference.origin) + low * np.asarray(reference.spacing)
        _resample_anatomy(reference.above_air(low, high, sigma), origin, reference.spacing, block, pose, deformation,
                          out=out[k0:k1])
    return out


def _footprint(reference: Reference, geometry: Geometry, pose: Pose, deformation: Deformation | None,
               z_margin: int) -> tuple[np.ndarray, np.ndarray]:
    """First and past-the-last voxel indices (x, y, z) of the part of the (axis-aligned) reference that linear
    interpolation reads for the exam's samples through `pose` and `deformation`, with `z_margin` more slices on
    each side, clipped to the reference."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in geometry.shape], indexing="ij")).reshape(3, -1).T
    matrix = np.linalg.inv(pose.matrix()) @ geometry.matrix()
    points = corners @ matrix[:3, :3].T + matrix[:3, 3]
    spacing, origin = np.asarray(reference.spacing), np.asarray(reference.origin)
    reach = (deformation.reach_mm() if deformation is not None else 0.0) / spacing
    margin = np.array([1, 1, 1 + z_margin])
    low = np.floor((points.min(axis=0) - origin) / spacing - reach).astype(int) - margin
    high = np.ceil((points.max(axis=0) - origin) / spacing + reach).astype(int) + 1 + margin
    size = np.asarray(reference.array.shape[::-1])
    return np.clip(low, 0, size), np.clip(high, 0, size)


def _resample_anatomy(part: np.ndarray, origin: np.ndarray, spacing: tuple[float, float, float], geometry: Geometry,
                      pose: Pose, deformation: Deformation | None, voxels: int = 1 << 18,
                      out: np.ndarray | None = None) -> np.ndarray:
    """A noise-free part of the reference (`Reference.above_air`: HU + 1000 between borders of air; `origin`: its
    first voxel inside the borders, mm) seen through `pose` and `deformation` on an exam grid, in HU (air outside
    the part), by trilinear interpolation, a slab of about `voxels` exam voxels at a time, on one thread (patients
    are what runs in parallel).

    Every exam voxel (i, j, k) samples the anatomy point x + u(x), x = pose^-1 (its position). x is affine in
    (i, j, k) and each wave of u is sin(a i + b(j, k)) = sin(a i) cos(b) + cos(a i) sin(b), so a slab's sampling
    coordinates are one matrix product of a (j, k) factor and an i factor, exact (no lattice). The trilinear
    interpolation is two bilinear ones in one call of torch's vectorised 2D grid_sample: the part seen as one tall
    image of its slices, as two channels (the second one slice further on), at the row of the sample in the slice
    below it, blended by the sample's fraction along z; the air rows keep a bilinear one from reading across
    slices. The row index of that tall image limits the precision of the positions to about 1e-3 voxel. Written
    into `out` when given."""
    matrix = np.linalg.inv(pose.matrix()) @ geometry.matrix()  # exam index (i, j, k, 1) -> anatomy point x
    waves = deformation.waves if deformation is not None else np.zeros((0, 7))
    depth, rows, width = part.shape  # slices and rows with the air borders
    # to sampling coordinates: x normalised to grid_sample's [-1, 1], y and z in voxels (z from the air slice)
    scale = 1.0 / np.asarray(spacing) * np.array([2.0 / max(width - 1, 1), 1.0, 1.0])
    shift = -np.asarray(origin) * scale - np.array([1.0, 0.0, -1.0])
    nx, ny, nz = geometry.shape
    i = np.arange(nx, dtype=float)
    phase_i = np.outer(waves[:, :3] @ matrix[:3, 0], i)  # (W, nx)
    factors = [(matrix[:3, 0][:, None] * i + matrix[:3, 3][:, None]) * scale[:, None] + shift[:, None],
               np.repeat((matrix[:3, 1] * scale)[:, None], nx, 1), np.repeat((matrix[:3, 2] * scale)[:, None], nx, 1)]
    for w in range(len(waves)):  # the factors of cos(b) and sin(b)
        amplitude = (waves[w, 3:6] * scale)[:, None]
        factors += [amplitude * np.sin(phase_i[w]), amplitude * np.cos(phase_i[w])]
    factor_i = torch.from_numpy(np.stack([f.T.ravel() for f in factors]).astype(np.float32))  # (T, nx * 3)
    image = torch.from_numpy(part).view(-1)
    out = np.empty((nz, ny, nx), np.float32) if out is None else out
    chunk = max(1, voxels // (nx * ny))
    j = np.arange(ny, dtype=float)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for k0 in range(0, nz, chunk):
            k = np.arange(k0, min(k0 + chunk, nz), dtype=float)
            kk, jj = np.repeat(k, ny), np.tile(j, len(k))
            columns = [np.ones_like(kk), jj, kk]
            for w in range(len(waves)):
                phase = (waves[w, :3] @ matrix[:3, 1]) * jj + (waves[w, :3] @ matrix[:3, 2]) * kk
                phase += waves[w, :3] @ matrix[:3, 3] + waves[w, 6]
                columns += [np.cos(phase), np.sin(phase)]
            factor_jk = torch.from_numpy(np.stack(columns, axis=1).astype(np.float32))  # (len(k) ny, T)
            grid = torch.mm(factor_jk, factor_i).view(1, len(kk), nx, 3)
            fraction = grid[..., 2].clamp_(0.0, depth - 1)  # z; outside the part: the air slices
            below = torch.floor(fraction).clamp_(max=depth - 2)
            fraction -= below
            first, last = int(below.min()), int(below.max())  # the slices below the samples
            height = (last - first + 1) * rows
            row = grid[..., 1].clamp_(-1.0, rows - 1)  # y; past the part's rows: its air rows
            row.mul_(2.0 / max(height - 1, 1)).sub_(1.0)  # then the slice's rows (small values first: precision)
            row.add_(below.sub_(first), alpha=2.0 * rows / max(height - 1, 1))
            slices = image.as_strided((1, 2, height, width), (0, rows * width, width, 1),
                                      image.storage_offset() + first * rows * width)
            lower, upper = torch.nn.functional.grid_sample(slices, grid[..., :2], align_corners=True)[0]
            upper -= lower
            upper *= fraction[0]
            lower -= 1000.0
            np.add(upper.numpy(), lower.numpy(), out=out[k0:k0 + len(k)].reshape(upper.shape))
    finally:
        torch.set_num_threads(threads)
    return out


def _screening_exam(reference: Reference, geometry: Geometry, pose: Pose, deformation: Deformation,
                    nodules: list[tuple[NoduleTrack, np.ndarray]], day: float, rng: np.random.Generator,
                    noise_hu: float) -> tuple[np.ndarray, np.ndarray, list[tuple[int, list[int], list[int]]]]:
    """Preset "screening": one exam imaged as a whole, nodules included.

    The anatomy gets the slice profile, then is seen on the exam grid (as in `_render_exam`); each nodule (with its
    anatomy -> exam matrix) is drawn into the anatomy on a grid k times finer along z, only in its own box, and
    what it changes there gets the same slice profile. Then everything gets the in-plane point spread and
    kernel-shaped noise of std `noise_hu`. Returns the image, the label map on the exam grid and each nodule's
    voxel count, box and centre.
    """
    thickness = geometry.spacing[2]
    k = max(1, math.ceil(thickness / reference.spacing[2] - 1e-6))
    sigma = _slice_profile_sigma_mm(reference, thickness) / (thickness / k)  # in fine slices
    margin = (int(4.0 * sigma + 0.5) + k - 1) // k  # exam slices that the slice profile spreads a nodule over
    array = _anatomy_exam(reference, geometry, pose, thickness, deformation)
    labels, canvas = np.zeros(geometry.shape[::-1], np.uint8), np.zeros(geometry.shape[::-1], np.float32)
    found = []
    for track, exam_from_anatomy in nodules:
        found.append(_render_nodule(canvas, labels, track, day, geometry, exam_from_anatomy))
        _, low, high = _nodule_box(track, track.scale(day), geometry, exam_from_anatomy)
        low[2], high[2] = max(low[2] - margin, 0), min(high[2] + margin, geometry.shape[2] - 1)
        size = high - low + 1
        box = Geometry((int(size[0]), int(size[1]), int((size[2] - 1) * k + 1)), (*geometry.spacing[:2], thickness / k),
                       tuple(np.asarray(geometry.origin) + low * np.asarray(geometry.spacing)), geometry.direction)
        before = _anatomy_exam(reference, box, pose, 0.0, deformation)
        change = before.copy()
        _render_nodule(change, np.zeros(change.shape, np.uint8), track, day, box, exam_from_anatomy)
        change -= before
        if sigma > 0:
            change = gaussian_filter1d(change, sigma, axis=0, mode="constant")
        array[low[2]:high[2] + 1, low[1]:high[1] + 1, low[0]:high[0] + 1] += change[::k]
    _kernel_image(array, rng, geometry.spacing[0], noise_hu)
    return array, labels, found


def _kernel_image(array: np.ndarray, rng: np.random.Generator, pixel_mm: float, std: float,
                  chunk: int = 8) -> np.ndarray:
    """In place, `chunk` slices at a time: the in-plane point spread (Gaussian, _KERNEL_PSF_MM), then the float32
    noise of a sharp reconstruction kernel with standard deviation `std`: independent slices, in-plane power
    spectrum f exp(-(f / f0)^2) peaking at _KERNEL_NPS_PEAK cycles/mm (the ramp filter times the kernel's roll-off).

    The noise is drawn in the frequency domain: complex white noise shaped by the kernel, one inverse FFT per slice,
    scaled by the standard deviation this gives in expectation (so no pass over the whole volume is needed). The
    white noise's real and imaginary parts are uniform with unit variance (4 x cheaper to draw than normal ones);
    every voxel sums some 10^5 of them, so its noise is Gaussian all the same."""
    ny, nx = array.shape[1:]
    fy = np.fft.fftfreq(ny, pixel_mm)[:, None]
    fx = np.fft.rfftfreq(nx, pixel_mm)[None, :]
    radial = np.sqrt(fx * fx + fy * fy)
    power = radial * np.exp(-((radial / (_KERNEL_NPS_PEAK * math.sqrt(2.0))) ** 2))
    # irfft2 of a half spectrum of gain x (unit-variance real and imaginary parts): a column with a mirror image
    # (0 < fx < Nyquist) adds 4 |gain|^2 / (ny nx)^2 to every voxel's variance, the others |gain|^2 / (ny nx)^2
    weights = np.full(fx.size, 4.0)
    weights[0] = 1.0
    if nx % 2 == 0:
        weights[-1] = 1.0
    expected = math.sqrt(float((power * weights).sum())) / (ny * nx)
    gain = (np.sqrt(power) * (std / max(expected, 1e-12) * math.sqrt(12.0))).astype(np.float32)  # U(-1/2, 1/2)
    psf = (0.0, _KERNEL_PSF_MM / pixel_mm, _KERNEL_PSF_MM / pixel_mm)
    for start in range(0, len(array), chunk):
        part = array[start:start + chunk]
        gaussian_filter(part, sigma=psf, output=part, truncate=2.5)  # 3 taps at 0.7-0.8 mm: the next weigh < 1e-4
        spectrum = rng.random((len(part), *gain.shape, 2), dtype=np.float32)
        spectrum -= 0.5
        spectrum = spectrum.view(np.complex64)[..., 0]
        spectrum *= gain
        part += fft.irfft2(spectrum, s=(ny, nx), axes=(-2, -1), overwrite_x=True)
    return array


def _hu(volume: np.ndarray) -> np.ndarray:
    """int16 HU of a float image (rounded and clipped in place, then converted)."""
    np.round(volume, out=volume)
    np.clip(volume, -1024, 3071, out=volume)
    return volume.astype(np.int16)


def _exam_pose(config: CohortConfig, rng: np.random.Generator, index: int,
               position: int) -> tuple[Pose, float, Deformation]:
    """How the patient's `position`-th exam sees the anatomy: pose, scan-range offset and non-rigid change.

    The first exam has no misalignment and no deformation. Offset and deformation come from their own random
    stream, so that a cohort without them is the same as before they existed.
    """
    rotation = np.eye(3) if position == 0 else _random_rotation(rng, config.max_rotation_deg)
    translation = np.zeros(3) if position == 0 else rng.uniform(-1, 1, 3) * config.max_translation_mm
    breathing = 1.0 + np.array([0.0, *rng.uniform(-1, 1, 2)]) * config.breathing_scale
    geometry_rng = np.random.default_rng([config.seed, index, 1, position])
    start_offset = float(geometry_rng.uniform(-0.5, 0.5)) * config.max_start_offset_mm
    waves = position > 0 and config.deformation_mm > 0
    deformation = Deformation.sample(geometry_rng, config.deformation_mm) if waves else Deformation(np.zeros((0, 7)))
    return Pose(rotation, translation, breathing), start_offset, deformation


def exam_pair(config: CohortConfig, index: int, pixel_spacing: float, thickness: float,
              follow_up: np.ndarray | None = None,
              start_offsets: tuple[float, float] | None = None) -> tuple[sitk.Image, sitk.Image, pd.DataFrame,
                                                                       ChestAnatomy]:
    """A baseline and a follow-up of one synthetic patient, without nodules, for registration checks.

    Drawn as `generate_patient` draws its exams' geometry (pose, scan-range offset, non-rigid change), on grids
    of `pixel_spacing` x `pixel_spacing` x `thickness` mm; `follow_up` (a 4x4 anatomy -> exam matrix) and
    `start_offsets` (mm, baseline and follow-up) replace the drawn ones. Returns both int16 images, their truth
    rows (exam_id "baseline" and "follow_up", for `truth_map_points`) and the anatomy.
    """
    rng = np.random.default_rng([config.seed, index])
    anatomy = sample_anatomy(rng, config.fov_mm, fine=config.preset == "screening")
    reference = _anatomy_image(anatomy, config)
    images, truth = [], []
    for position, exam_id in enumerate(("baseline", "follow_up")):
        pose, start_offset, deformation = _exam_pose(config, rng, index, position)
        if position and follow_up is not None:
            pose = Pose(np.asarray(follow_up)[:3, :3], np.asarray(follow_up)[:3, 3], np.ones(3))
        start_offset = start_offset if start_offsets is None else start_offsets[position]
        geometry = _exam_geometry(config, pixel_spacing, thickness, start_offset)
        volume = _render_exam(reference, geometry, pose, thickness, rng, float(rng.uniform(*config.noise_hu)),
                              deformation)
        image = sitk.GetImageFromArray(_hu(volume))
        image.SetSpacing(geometry.spacing)
        image.SetOrigin(geometry.origin)
        images.append(image)
        truth.append({"exam_id": exam_id, "anatomy_to_exam": pose.matrix()[:3, :].ravel().tolist(),
                      "deformation": deformation.waves.ravel().tolist(), "start_offset_mm": start_offset})
    return images[0], images[1], pd.DataFrame(truth), anatomy


def generate_patient(config: CohortConfig, index: int, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Render every exam of one patient; return its manifest rows, tracking entry and truth rows."""
    out = Path(out_dir)
    rng = np.random.default_rng([config.seed, index])
    pid = str(config.first_pid + index)
    pattern, days = _draw_schedule(rng, config)
    anatomy = sample_anatomy(rng, config.fov_mm, fine=config.preset == "screening")
    tracks = _sample_nodules(rng, anatomy, config, days)
    reference = _anatomy_image(anatomy, config)

    manifest, truth_exams, truth_nodules = [], [], []
    tracking: dict[int, dict[int, dict[str, Any]]] = {}
    nodule_id = 0
    for position, tp in enumerate(pattern):
        pose, start_offset, deformation = _exam_pose(config, rng, index, position)
        rotation, translation = pose.rotation, pose.translation
        pixel_spacing = round(float(rng.uniform(*config.pixel_spacing_mm)), 4)
        thicknesses = [float(rng.choice(config.slice_thicknesses_mm))]
        if rng.random() < config.second_series_fraction:
            thicker = [t for t in (*config.slice_thicknesses_mm, 3.0, 5.0) if t > thicknesses[0]]
            thicknesses.append(float(rng.choice(thicker)))
        noise_hu = float(rng.uniform(*config.noise_hu))
        screening = config.preset == "screening"
        if screening:  # quantum noise: std ~ 1 / sqrt(mAs x slice thickness)
            dose_rng = np.random.default_rng([config.seed, index, 2, position])
            noise_ref = float(dose_rng.uniform(*config.noise_hu_at_100mAs))
            mas = float(dose_rng.uniform(*config.tube_current_mAs))
        for series_index, thickness in enumerate(thicknesses):
            series_uid = f"1.2.826.0.1.3680043.10.543.{pid}.{tp}.{series_index}.{int(rng.integers(10**11, 10**12))}"
            exam_id = nlst_exam_id(pid, tp, series_uid)
            geometry = _exam_geometry(config, pixel_spacing, thickness, start_offset)
            seen = []
            for track in tracks:
                if days[tp] >= track.first_day:
                    # a nodule is small next to the deformation's wavelength: it moves with its centre, unchanged
                    local = np.eye(4)
                    local[:3, 3] = deformation.from_anatomy(track.center[None])[0] - track.center
                    seen.append((track, pose.matrix() @ local))
            if screening:
                volume, labels, drawn = _screening_exam(reference, geometry, pose, deformation, seen, days[tp], rng,
                                                        noise_ref * math.sqrt(100.0 / mas / thickness))
            else:
                volume = _render_exam(reference, geometry, pose, thickness, rng, noise_hu, deformation)
                labels = np.zeros(volume.shape, dtype=np.uint8)
                drawn = [_render_nodule(volume, labels, track, days[tp], geometry, matrix) for track, matrix in seen]
            voxel_volume = float(np.prod(geometry.spacing))
            for (track, matrix), (count, box, centre) in zip(seen, drawn, strict=True):
                centre_exam = (matrix @ np.append(track.center, 1.0))[:3]
                truth_nodules.append({
                    "pid": pid, "nodule_group": track.group, "kind": track.kind, "fate": track.fate,
                    "doubling_days": track.doubling_days, "exam_id": exam_id, "screen_timepoint": tp,
                    "primary_series": series_index == 0, "days_since_baseline": days[tp],
                    "true_volume_mm3": track.volume(days[tp]), "mask_volume_mm3": count * voxel_volume,
                    "center_anatomy": track.center.tolist(), "center_exam": centre_exam.tolist(),
                    **({"attached_to": track.attached_to, "spiculated": bool(len(track.spike_amplitudes))}
                       if screening else {}),
                })
                if series_index == 0:
                    nodule_id += 1
                    tracking.setdefault(track.group, {})[tp] = {
                        "exam": exam_id, "nodid_in_segmentation": float(nodule_id), "volume": count * voxel_volume,
                        "abnid_in_nlst": [track.group] if track.screen_detected else None, "coords": box,
                        "center": centre, "centers_in_past_exam_ijk_space": None,
                        "coords_in_past_exam_ijk_space": None, "abn_prexist": days[tp] > track.first_day,
                        "screen_detected": track.screen_detected,
                    }
            hu = _hu(volume)
            image_path = Path("images") / pid / f"{exam_id}.nii.gz"
            write_nifti(hu, geometry, out / image_path)
            write_nifti(labels, geometry, out / "truth" / "masks" / f"{exam_id}.nii.gz")
            manifest.append({
                "pid": pid, "exam_id": exam_id, "screen_timepoint": tp, "days_since_baseline": days[tp],
                "series_uid": series_uid, "slice_thickness": thickness, "pixel_spacing": pixel_spacing,
                "image_path": image_path.as_posix(),
            })
            truth_exams.append({
                "pid": pid, "exam_id": exam_id, "screen_timepoint": tp, "primary_series": series_index == 0,
                "anatomy_to_exam": pose.matrix()[:3, :].ravel().tolist(),
                "deformation": deformation.waves.ravel().tolist(), "start_offset_mm": start_offset,
                "rotation_deg": np.rad2deg(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1))),
                "translation_mm": float(np.linalg.norm(translation)),
            })
    log.info("patient %s: %d exams, %d series, %d nodules", pid, len(pattern), len(manifest), len(tracks))
    return {"pid": pid, "manifest": manifest, "tracking": tracking, "truth_exams": truth_exams,
            "truth_nodules": truth_nodules}


def generate_cohort(config: CohortConfig, out_dir: str | os.PathLike[str], threads: int = 1) -> None:
    """Generate the whole cohort into `out_dir` (patients rendered in parallel, results independent of threads)."""
    out = Path(out_dir)
    indices = range(config.n_patients)
    if threads > 1:
        with ProcessPoolExecutor(max_workers=threads) as pool:
            patients = list(pool.map(generate_patient, [config] * len(indices), indices, [out] * len(indices)))
    else:
        patients = [generate_patient(config, index, out) for index in indices]
    write_csv(pd.DataFrame([row for p in patients for row in p["manifest"]]), out / "manifest.csv")
    write_parquet(pd.DataFrame([row for p in patients for row in p["truth_exams"]]), out / "truth" / "exams.parquet")
    write_parquet(pd.DataFrame([row for p in patients for row in p["truth_nodules"]]),
                  out / "truth" / "nodules.parquet")
    with atomic_path(out / "nodules.pt") as tmp:
        torch.save({p["pid"]: p["tracking"] for p in patients if p["tracking"]}, tmp)
    log.info("cohort: %d patients, %d series written to %s", len(patients),
             sum(len(p["manifest"]) for p in patients), out)


def _exam_frame(rows: pd.DataFrame, exam_id: str) -> tuple[np.ndarray, Deformation]:
    return homogeneous(rows.loc[exam_id, "anatomy_to_exam"]), Deformation.from_list(rows.loc[exam_id, "deformation"])


def truth_map_points(truth_exams: pd.DataFrame, from_exam_id: str, to_exam_id: str, points: np.ndarray) -> np.ndarray:
    """(N, 3) physical points of one exam mapped to the same anatomy in another, non-rigid change included."""
    rows = truth_exams.set_index("exam_id")
    pose, deformation = _exam_frame(rows, from_exam_id)
    anatomy = deformation.to_anatomy((np.asarray(points, dtype=float) - pose[:3, 3]) @ np.linalg.inv(pose[:3, :3]).T)
    pose, deformation = _exam_frame(rows, to_exam_id)
    return deformation.from_anatomy(anatomy) @ pose[:3, :3].T + pose[:3, 3]


def truth_transform(truth_exams: pd.DataFrame, fixed_exam_id: str, moving_exam_id: str) -> np.ndarray:
    """4x4 matrix mapping fixed-exam physical points to moving-exam physical points (ITK registration convention).

    The rigid part only: with a non-rigid change (`deformation_mm`), `truth_map_points` maps points exactly."""
    poses = {}
    for exam_id in (fixed_exam_id, moving_exam_id):
        poses[exam_id] = homogeneous(truth_exams.loc[truth_exams["exam_id"] == exam_id, "anatomy_to_exam"].iloc[0])
    return poses[moving_exam_id] @ np.linalg.inv(poses[fixed_exam_id])
