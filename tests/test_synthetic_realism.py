"""The realistic synthetic presets (synthetic.preset / synthetic.fates "screening") against their own truth."""

import hashlib
import math

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy.ndimage import binary_erosion

from noduleflow.imaging import Geometry
from noduleflow.metadata.phantom import (
    _fissure_height,
    boundary_distances_mm,
    lung_depth_mm,
    render_anatomy,
    sample_anatomy,
    vessel_distance_mm,
)
from noduleflow.metadata.synthetic import (
    Clip,
    CohortConfig,
    Deformation,
    NoduleTrack,
    Pose,
    Reference,
    _anatomy_exam,
    _anatomy_image,
    _draw_days,
    _draw_fate,
    _draw_first_volume,
    _exam_geometry,
    _kernel_image,
    _random_rotation,
    _render_nodule,
    _resample_anatomy,
    _sample_nodules,
    _screening_exam,
    _screening_look,
    _slice_profile_sigma_mm,
    _uniform_rotation,
    _voxel_fractions,
    generate_cohort,
    generate_patient,
)

SCREENING = CohortConfig(n_patients=1, seed=3, fov_mm=(200.0, 170.0, 120.0), pixel_spacing_mm=(0.7, 0.8),
                         slice_thicknesses_mm=(1.25,), preset="screening", fates="screening")


def _track(center: np.ndarray, kind: str = "solid", volume: float = 1500.0) -> NoduleTrack:
    return NoduleTrack(group=1, kind=kind, fate="stable", center=center, orientation=np.eye(3), axes=np.ones(3),
                       lobe_directions=np.array([[0.0, 0.0, 1.0]]), lobe_amplitudes=np.array([0.1]), first_day=0.0,
                       first_volume=volume, doubling_days=math.inf, core_fraction=0.5, hu=35.0, screen_detected=True)


@pytest.fixture(scope="module")
def anatomy():
    return sample_anatomy(np.random.default_rng(3), SCREENING.fov_mm)


@pytest.fixture(scope="module")
def scene(anatomy):
    """The noise-free reference of `anatomy`, the lung point farthest from its borders, and a still pose."""
    candidates = np.random.default_rng(0).uniform(-60.0, 60.0, (4000, 3))
    return (_anatomy_image(anatomy, SCREENING), candidates[np.argmax(lung_depth_mm(anatomy, candidates))],
            Pose(np.eye(3), np.zeros(3), np.ones(3)), Deformation(np.zeros((0, 7))))


def test_noise_inside_a_nodule_matches_the_same_tissue_outside(anatomy, scene):
    reference, center, pose, still = scene
    geometry = _exam_geometry(SCREENING, 0.75, 1.25)
    image, labels, [(count, _, _)] = _screening_exam(reference, geometry, pose, still, [(_track(center), np.eye(4))],
                                                     0.0, np.random.default_rng(1), 80.0)
    assert count * float(np.prod(geometry.spacing)) == pytest.approx(1500.0, rel=0.1)
    inside = binary_erosion(labels == 1, np.ones((3, 5, 5), bool))
    assert inside.sum() > 100
    # soft tissue of the same density outside: the middle of the heart (uniform 52 HU in the noise-free anatomy)
    k, j, i = np.round((np.asarray(anatomy.heart[:3]) - geometry.origin) / geometry.spacing)[::-1].astype(int)
    heart = image[k - 3:k + 4, j - 8:j + 9, i - 8:i + 9]
    assert abs(heart.mean() - 52.0) < 10.0
    ratio = image[inside].std() / heart.std()
    assert 0.8 <= ratio <= 1.2
    assert heart.std() == pytest.approx(80.0, rel=0.2)


def test_a_nodule_gets_the_slice_profile_and_keeps_its_excess_density(scene):
    reference, center, pose, still = scene
    geometry = _exam_geometry(SCREENING, 0.75, 2.5)
    track = _track(center, volume=300.0)
    images = [_screening_exam(reference, geometry, pose, still, drawn, 0.0, np.random.default_rng(1), 0.0)
              for drawn in ([(track, np.eye(4))], [])]
    change, labels = images[0][0] - images[1][0], images[0][1]
    # the blurs move the nodule's excess density around without losing or adding any: its sum is that of the
    # nodule drawn straight into the exam grid
    sharp = images[1][0].copy()
    _render_nodule(sharp, np.zeros(sharp.shape, np.uint8), track, 0.0, geometry, np.eye(4))
    assert change.sum() == pytest.approx((sharp - images[1][0]).sum(), rel=0.03)
    slices = np.flatnonzero(np.abs(change).max(axis=(1, 2)) > 5.0)
    labelled = np.flatnonzero(labels.any(axis=(1, 2)))
    assert slices.min() < labelled.min() and slices.max() > labelled.max()  # spread along z by the slice profile


def test_an_exam_sees_the_anatomy_as_if_the_whole_reference_had_the_slice_profile(scene):
    # only the part of the reference an exam can see is blurred: a tilted, shifted, deformed exam gets the same
    # values as from the whole reference blurred (a reference of white noise: an error anywhere would show)
    rng = np.random.default_rng(4)
    reference = Reference(rng.normal(0.0, 100.0, scene[0].array.shape).astype(np.float32), scene[0].spacing,
                          scene[0].origin)
    pose = Pose(_random_rotation(rng, 5.0), np.array([12.0, -9.0, 4.0]), np.array([1.0, 1.003, 0.997]))
    for thickness, deformation in ((2.5, Deformation(np.zeros((0, 7)))), (1.5, Deformation.sample(rng, 4.0))):
        geometry = _exam_geometry(SCREENING, 0.8, thickness, start_offset=-5.0)
        sigma = _slice_profile_sigma_mm(reference, thickness) / reference.spacing[2]
        whole = reference.above_air(np.zeros(3, int), np.asarray(reference.array.shape[::-1]), sigma)
        expected = _resample_anatomy(whole, np.asarray(reference.origin), reference.spacing, geometry, pose,
                                     deformation)
        seen = _anatomy_exam(reference, geometry, pose, thickness, deformation)
        assert (expected != -1000.0).mean() > 0.9  # the exam lies (almost) inside the reference
        # the same sampling positions, up to the float32 precision of the stacked slices' row index (about 1e-3
        # voxel, a fraction of an HU on this white noise); a wrong footprint or blur would err by tens of HU
        assert np.abs(seen - expected).max() < 0.5


def test_the_kernel_noise_has_the_requested_level_and_a_sharp_kernel_texture():
    image = np.zeros((24, 240, 288), np.float32)
    _kernel_image(image, np.random.default_rng(2), 0.75, 50.0)
    assert image.std() == pytest.approx(50.0, rel=0.02)  # the expected level, no pass over the volume needed
    assert abs(image.mean()) < 0.5
    assert abs(np.mean((image / image.std()) ** 4) - 3.0) < 0.05  # Gaussian (kurtosis 3), whatever the draws
    assert abs(np.corrcoef(image[:-1].ravel(), image[1:].ravel())[0, 1]) < 0.02  # independent slices
    power = (np.abs(np.fft.rfft2(image)) ** 2).mean(axis=0)  # in-plane power spectrum, peaking at 0.5 cycles/mm
    fy, fx = np.fft.fftfreq(240, 0.75)[:, None], np.fft.rfftfreq(288, 0.75)[None, :]
    radial = np.hypot(fx, fy)
    bins = np.round(radial / 0.05).astype(int)
    profile = np.bincount(bins.ravel(), power.ravel()) / np.maximum(np.bincount(bins.ravel()), 1)
    assert 0.4 <= 0.05 * np.argmax(profile[:14]) <= 0.6


def test_a_configured_fraction_of_nodules_touches_the_pleura_or_a_vessel(anatomy):
    measured = {}
    for fraction in (0.0, 0.4):
        config = CohortConfig(**{**SCREENING.__dict__, "attached_fraction": fraction, "nodules_per_patient": (4, 4)})
        touching, flagged = [], []
        for seed in range(6):
            for track in _sample_nodules(np.random.default_rng(seed), anatomy, config, {0: 0.0, 1: 400.0}):
                gap = boundary_distances_mm(anatomy, track.center[None])[0]
                assert gap[0] > 0  # the centre lies in a lung
                touching.append(gap.min() < track.scale(track.first_day) * track.axes.min())
                flagged.append(bool(track.attached_to))
        assert touching == flagged
        measured[fraction] = np.mean(touching)
    assert measured[0.0] == 0.0
    assert 0.25 <= measured[0.4] <= 0.6


def test_fine_anatomy_puts_a_vessel_within_5_mm_of_most_nodules():
    config = CohortConfig(**{**SCREENING.__dict__, "nodules_per_patient": (4, 4)})
    near, thinnest = {}, {}
    for fine in (False, True):
        gaps = []
        for seed in range(3):
            anatomy = sample_anatomy(np.random.default_rng(seed), config.fov_mm, fine=fine)
            thinnest[fine] = 2.0 * anatomy.tube_radius[anatomy.tube_kind == 0].min()
            for track in _sample_nodules(np.random.default_rng(seed), anatomy, config, {0: 0.0, 1: 400.0}):
                radius = (3.0 * track.volume(0.0) / (4.0 * math.pi)) ** (1.0 / 3.0)
                gaps.append(vessel_distance_mm(anatomy, track.center[None])[0] - radius)
        near[fine] = np.mean(np.asarray(gaps) <= 5.0)
    assert thinnest[True] <= 1.0 < thinnest[False]
    assert near[True] >= 0.8


@pytest.mark.parametrize("fine", [False, True])
def test_fine_anatomy_draws_the_fissures_as_thin_dense_sheets(fine):
    anatomy = sample_anatomy(np.random.default_rng(3), SCREENING.fov_mm, fine=fine)
    oblique = sample_anatomy(np.random.default_rng(3), SCREENING.fov_mm, fine=True).fissures[0]
    x = anatomy.lung_caps[0][0]
    candidates = [np.array([x, y, _fissure_height(oblique, x, y)[0]]) for y in np.linspace(-60.0, 60.0, 41)]
    clear = [min(lung_depth_mm(anatomy, p[None])[0], vessel_distance_mm(anatomy, p[None])[0]) for p in candidates]
    point = candidates[int(np.argmax(clear))]
    assert max(clear) > 3.0  # inside the lung, away from vessels
    spacing = (0.5, 0.5, 0.25)
    block = render_anatomy(anatomy, (3, 3, 33), spacing, tuple(point - np.array([0.5, 0.5, 4.0])))
    profile = np.median(block.reshape(33, -1), axis=1)  # along z, through the fissure at the middle
    parenchyma = np.median(np.r_[profile[:8], profile[-8:]])
    assert -900.0 < parenchyma < -780.0
    assert (profile[14:19].max() - parenchyma > 150.0) == fine


def test_screening_fates_are_mostly_stable_or_slow_and_intervals_span_1_to_3_years():
    rng = np.random.default_rng(0)
    for kind in ("solid", "part_solid", "ground_glass"):
        draws = [_draw_fate(rng, SCREENING, kind) for _ in range(3000)]
        fast = np.mean([fate == "growing" and not slow for fate, _, slow in draws])
        calm = np.mean([fate == "stable" or slow for fate, _, slow in draws])
        assert calm > 0.5 and 0.02 < fast < 0.3
        assert np.mean([fate == "shrinking" for fate, _, _ in draws]) > 0.05
        assert all(600.0 <= doubling <= 1500.0 for _, doubling, slow in draws if slow)
    intervals = []
    for _ in range(500):
        days = _draw_days(rng, SCREENING)
        intervals += [days[1] - days[0], days[2] - days[1], days[2] - days[0]]
    assert 330.0 <= min(intervals) and max(intervals) <= 1095.0
    assert np.percentile(intervals, 90) - np.percentile(intervals, 10) > 300.0


def test_screening_fast_growers_are_larger_at_first_appearance_as_in_nelson():
    # the odds of fast growth per volume class (< 100, 100-300, >= 300 mm^3) follow NELSON's cancer probabilities,
    # 0.6 : 2.4 : 16.9; the fate's own proportions do not change, and fates "learnable" keep size and fate apart
    rng = np.random.default_rng(1)
    edges = [15.0, 100.0, 300.0, 1500.0]
    for config in (SCREENING, CohortConfig(fates="learnable")):
        fast = [_draw_first_volume(rng, config, fast=True) for _ in range(40000)]
        calm = [_draw_first_volume(rng, config, fast=False) for _ in range(40000)]
        assert 15.0 <= min(fast + calm) and max(fast + calm) <= 1500.0
        ratio = np.histogram(fast, edges)[0] / np.histogram(calm, edges)[0]  # odds of fast, up to one factor
        if config.fates == "learnable":
            assert np.allclose(ratio, 1.0, atol=0.06)
        else:
            assert np.allclose(ratio / ratio[0], [1.0, 4.0, 16.9 / 0.6], rtol=0.15)


def test_the_look_hints_at_the_fate_without_giving_it_away():
    rng = np.random.default_rng(0)
    spiculated = {}
    for fast in (True, False):
        looks = []
        for _ in range(300):
            track = _track(np.zeros(3), kind="part_solid")
            _screening_look(rng, track, fast)
            looks.append(len(track.spike_amplitudes) > 0)
            offset = np.linalg.norm(track.core_offset)
            assert offset > 0 and offset + track.core_fraction <= 0.9  # off-centre, inside the nodule
        spiculated[fast] = np.mean(looks)
    assert 0.0 < spiculated[False] < spiculated[True] < 1.0


def test_attached_nodules_are_drawn_on_the_lung_side_with_their_true_volume(anatomy):
    # the part of an attached nodule in the chest wall or a large vessel would be invisible (its HU under the
    # background's): it is clipped, and the true volume is that of the rest, which the mask holds
    config = CohortConfig(**{**SCREENING.__dict__, "attached_fraction": 1.0, "nodules_per_patient": (3, 3)})
    spacing = np.array([0.7, 0.7, 1.25])
    checked = []
    for seed in range(4):
        for track in _sample_nodules(np.random.default_rng(seed), anatomy, config, {0: 0.0, 1: 700.0}):
            if not track.attached_to:
                continue
            for day in (track.first_day, 700.0):
                scale = track.scale(day)
                size = np.ceil(2 * (track.max_radius(scale) + 3.0) / spacing).astype(int)
                origin = track.center - (size - 1) * spacing / 2.0 + 0.3  # voxel centres off the nodule's centre
                geometry = Geometry(tuple(int(v) for v in size), tuple(spacing), tuple(origin),
                                    (1, 0, 0, 0, 1, 0, 0, 0, 1))
                labels = np.zeros(size[::-1], np.uint8)
                count, _, _ = _render_nodule(np.zeros(size[::-1], np.float32), labels, track, day, geometry, np.eye(4))
                z, y, x = np.nonzero(labels)
                distances = boundary_distances_mm(anatomy, np.column_stack([x, y, z]) * spacing + origin)
                # a mask voxel is at least half nodule: its centre within half a voxel's diagonal of the lung side
                assert distances.min() > -0.5 * np.linalg.norm(spacing)
                assert count * spacing.prod() == pytest.approx(track.volume(day), rel=0.1, abs=8.0)  # mm^3
                assert track.clipped_volume(scale) == pytest.approx(track.volume(day), abs=0.05)
                checked.append(track.clipped_volume(scale) < track.unit_volume * scale**3 - 1.0)  # something cut off
    assert len(checked) >= 10 and np.mean(checked) > 0.5


@pytest.mark.parametrize("kind", ["solid", "part_solid", "calcified", "ground_glass"])
def test_voxel_fractions_equal_sampling_every_voxel(kind):
    # the bounds skip sampling only where all 27 samples of a voxel agree: the fractions are those of full sampling
    rng = np.random.default_rng(5)
    offsets = np.stack(np.meshgrid(*[np.array([-1, 0, 1]) / 3.0] * 3, indexing="ij"), -1).reshape(-1, 3)
    for fast, clipped in ((True, False), (False, False), (True, True), (False, True)):
        track = _track(np.array([1.0, -2.0, 3.0]), kind=kind, volume=float(rng.uniform(20.0, 800.0)))
        track.orientation, track.axes = _uniform_rotation(rng), np.array([0.8, 1.0, 1.25])
        _screening_look(rng, track, fast)
        if kind == "calcified" and fast:
            track.core_offset = np.zeros(3)
        scale = track.scale(0.0)
        if clipped:  # the nodule cut by a vessel-like ball, its distance sampled on a 1 mm grid
            axis = np.arange(-20.0, 21.0)
            grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1) + track.center
            ball = track.center + _uniform_rotation(rng)[0] * 5.0
            track.clip = Clip(track.center - 20.0, 1.0, np.linalg.norm(grid - ball, axis=-1) - 4.0)
        pose = np.eye(4)
        pose[:3, :3] = _uniform_rotation(rng) * 1.003
        spacing, origin = np.array([0.7, 0.7, rng.choice([1.0, 2.5])]), np.array([-14.0, -16.0, -12.0])
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in (45, 45, 30 if spacing[2] < 2 else 12)],
                                    indexing="ij"), -1).reshape(-1, 3)
        outer, core = _voxel_fractions(track, scale, grid, spacing, origin, pose)
        points = ((grid[:, None] + offsets) * spacing + origin).reshape(-1, 3) @ pose[:3, :3].T
        level = track.level(points, scale)
        assert np.array_equal(outer, (level <= 1.0).reshape(-1, 27).mean(axis=1))
        assert 0 < (outer == 1.0).sum() and 0 < ((outer > 0) & (outer < 1)).sum()
        assert clipped == ((track.shape_level(points, scale) <= 1.0) & np.isinf(level)).any()  # the clip cuts it
        if kind in ("part_solid", "calcified"):
            expected = track.core(points, scale, level).reshape(-1, 27).mean(axis=1)
            assert np.array_equal(core, expected) and core.max() == 1.0


@pytest.mark.slow
def test_the_screening_generator_is_deterministic_for_a_seed(tmp_path):
    first = generate_patient(SCREENING, 0, tmp_path / "a")
    again = generate_patient(SCREENING, 0, tmp_path / "b")
    assert pd.DataFrame(first["truth_nodules"]).equals(pd.DataFrame(again["truth_nodules"]))
    assert first["manifest"] == again["manifest"]
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.nii.gz"))
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


@pytest.mark.slow
def test_the_default_presets_keep_the_demo_cohort_unchanged(tmp_path):
    # digest of this cohort since exams are sampled with torch's grid_sample (issue 14's speed work); the ITK
    # resampler before (commit b6cd8d0) made it with digest 5bd44f88..., differing by at most 1 HU in rare voxels
    # (benchmarks/synthetic_speed.py --baseline b6cd8d0 on the default cohort: mean |difference| 0.002 HU, no mask
    # voxel changed); the generator before the presets existed (commit 3166a06) made it with digest a7a21e0d...
    config = CohortConfig(n_patients=1, seed=11, fov_mm=(180.0, 150.0, 120.0), pixel_spacing_mm=(0.9, 1.0),
                          slice_thicknesses_mm=(2.0,))
    generate_cohort(config, tmp_path)
    digest = hashlib.sha256()
    for path in sorted(tmp_path.rglob("*.nii.gz")):
        digest.update(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).tobytes())
    digest.update(pd.read_parquet(tmp_path / "truth" / "nodules.parquet").to_csv().encode())
    assert digest.hexdigest() == "abc5cf8d2b3574404eb3327016500b80b14abc1ccf364ea8b85aa40544d4ebd7"
