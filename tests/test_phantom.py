"""Synthetic chest CT phantom: determinism, HU realism, lung depth, fitting a field of view, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from noduleflow.metadata.phantom import ChestAnatomy, lung_depth_mm, render_anatomy, sample_anatomy

FOV = (300.0, 240.0, 140.0)
SMALL_FOV = (220.0, 180.0, 120.0)


def centred_grid(fov, spacing):
    """(size, spacing, origin) of an axis-aligned grid covering fov, centred at 0."""
    size = tuple(int(round(f / s)) for f, s in zip(fov, spacing, strict=True))
    origin = tuple(-(n - 1) * s / 2.0 for n, s in zip(size, spacing, strict=True))
    return size, tuple(spacing), origin


def voxel_centres(index_zyx, spacing, origin):
    """Physical (x, y, z) of [z, y, x] voxel indices."""
    k, j, i = np.asarray(index_zyx).T
    return np.column_stack([origin[0] + i * spacing[0], origin[1] + j * spacing[1], origin[2] + k * spacing[2]])


@pytest.fixture(scope="module")
def chest():
    anatomy = sample_anatomy(np.random.default_rng(11), FOV)
    size, spacing, origin = centred_grid(FOV, (1.2, 1.2, 1.5))
    return anatomy, render_anatomy(anatomy, size, spacing, origin), spacing, origin


def test_same_seed_same_phantom_other_seed_differs():
    size, spacing, origin = centred_grid(SMALL_FOV, (2.0, 2.0, 2.0))
    first = sample_anatomy(np.random.default_rng(5), SMALL_FOV)
    again = sample_anatomy(np.random.default_rng(5), SMALL_FOV)
    other = sample_anatomy(np.random.default_rng(6), SMALL_FOV)
    assert isinstance(first, ChestAnatomy)
    np.testing.assert_array_equal(first.tube_p0, again.tube_p0)
    volume = render_anatomy(first, size, spacing, origin)
    assert volume.dtype == np.float32 and volume.shape == size[::-1]
    np.testing.assert_array_equal(volume, render_anatomy(again, size, spacing, origin))
    assert np.abs(volume - render_anatomy(other, size, spacing, origin)).mean() > 20.0


def test_hu_values_are_realistic(chest):
    anatomy, volume, spacing, origin = chest
    index = np.stack(np.meshgrid(*[np.arange(0, n, 2) for n in volume.shape], indexing="ij"), -1).reshape(-1, 3)
    deep = lung_depth_mm(anatomy, voxel_centres(index, spacing, origin)) > 3.0
    assert deep.sum() > 10_000
    assert -900.0 <= np.median(volume[tuple(index[deep].T)]) <= -780.0
    corners = volume[np.ix_([0, -1], [0, -1], [0, -1])]
    assert np.all(corners == -1000.0)
    bone = np.mean(volume > 500.0)
    assert 0.001 < bone < 0.05
    body = volume > -500.0
    soft = (volume >= -150.0) & (volume <= 150.0)
    assert 0.6 < soft.sum() / body.sum() < 0.97
    assert 0.02 < np.mean((volume > -130.0) & (volume < -70.0)) < 0.3  # subcutaneous and mediastinal fat
    assert np.mean(volume < -980.0) > 0.1  # air around the body and in the trachea


def test_table_lies_behind_the_body_across_the_field_of_view(chest):
    _, volume, _, _ = chest
    for slab in (volume[0], volume[len(volume) // 2], volume[-1]):
        for column in (slab[:, 5], slab[:, slab.shape[1] // 2], slab[:, -5]):
            solid = np.flatnonzero(column > -900.0)
            runs = np.split(solid, np.flatnonzero(np.diff(solid) > 1) + 1)
            table = runs[-1]
            assert len(table) >= 4 and 0.0 <= np.median(column[table]) <= 200.0
            assert table[-1] < len(column) - 1  # the table ends inside the field of view
        centre = slab[:, slab.shape[1] // 2]
        solid = np.flatnonzero(centre > -900.0)
        runs = np.split(solid, np.flatnonzero(np.diff(solid) > 1) + 1)
        assert len(runs) >= 2 and runs[-1][0] > runs[-2][-1] + 1  # an air gap separates body and table


def test_lung_depth_agrees_with_the_rendering(chest):
    anatomy, volume, spacing, origin = chest
    rng = np.random.default_rng(0)
    index = np.column_stack([rng.integers(0, n, 20_000) for n in volume.shape])
    depth = lung_depth_mm(anatomy, voxel_centres(index, spacing, origin))
    values = volume[tuple(index.T)]
    inside = depth > 0.0
    assert inside.sum() > 1000
    assert np.mean(values[inside] < -600.0) > 0.9  # the rest: small vessels and partial-volume edges
    assert np.mean(values[depth > 2.0] < -600.0) > 0.95
    assert values[inside].max() < 100.0  # never bone
    # the mediastinum (centre of the chest, heart, trachea, aorta, oesophagus) is not lung
    z = np.linspace(-FOV[2] / 2, FOV[2] / 2, 141)
    centre_line = np.column_stack([np.zeros_like(z), np.zeros_like(z), z])
    heart, trachea, aorta, esophagus = anatomy.heart, anatomy.trachea, anatomy.aorta, anatomy.esophagus
    organs = np.array([heart[:3], [trachea[0], trachea[1], trachea[4] + 10.0], [aorta[2], aorta[3], heart[2]],
                       [esophagus[0], esophagus[1], 0.0]])
    assert np.all(lung_depth_mm(anatomy, np.concatenate([centre_line, organs])) <= 0.0)
    # axes of large vessels and points outside the body are not lung either
    big = (anatomy.tube_kind == 0) & (anatomy.tube_radius.min(axis=1) > 2.0)
    assert big.any()
    midpoints = 0.5 * (anatomy.tube_p0[big] + anatomy.tube_p1[big])
    assert np.all(lung_depth_mm(anatomy, midpoints) <= 0.0)
    assert np.all(lung_depth_mm(anatomy, np.array([[0.0, -119.0, 0.0], [149.0, 0.0, 0.0]])) < 0.0)


def test_anatomy_is_asymmetric_with_vessel_trees_in_both_lungs(chest):
    anatomy, volume, spacing, origin = chest
    assert anatomy.domes[0][2] > anatomy.domes[1][2]  # right hemidiaphragm higher
    index = np.stack(np.meshgrid(*[np.arange(0, n, 3) for n in volume.shape], indexing="ij"), -1).reshape(-1, 3)
    points = voxel_centres(index, spacing, origin)
    inside = lung_depth_mm(anatomy, points) > 0.0
    assert (inside & (points[:, 0] < 0)).sum() > 1.02 * (inside & (points[:, 0] > 0)).sum()  # right lung larger
    vessels = anatomy.tube_kind == 0
    middle = 0.5 * (anatomy.tube_p0[vessels] + anatomy.tube_p1[vessels])
    for count in ((middle[:, 0] < 0).sum(), (middle[:, 0] > 0).sum()):
        assert 100 <= count <= 320
    radii = anatomy.tube_radius[vessels]
    assert radii.min() >= 0.69 and 4.0 <= radii.max() <= 6.0
    mirrored = volume[:, :, ::-1]
    body = (volume > -950.0) | (mirrored > -950.0)
    assert np.abs(volume - mirrored)[body].mean() > 50.0  # no left-right mirror symmetry
    profile = (volume > 200.0).mean(axis=(1, 2))  # bone changes along z (vertebrae, discs, ribs)
    assert profile.std() > 0.1 * profile.mean()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_body_fits_a_small_field_of_view(seed):
    anatomy = sample_anatomy(np.random.default_rng(seed), SMALL_FOV)
    size, spacing, origin = centred_grid(SMALL_FOV, (1.5, 1.5, 2.0))
    volume = render_anatomy(anatomy, size, spacing, origin)
    xs = origin[0] + spacing[0] * np.arange(size[0])
    ys = origin[1] + spacing[1] * np.arange(size[1])
    y_top, _, curvature = anatomy.table
    above_table = ys[:, None] < (y_top - curvature * xs[None, :] ** 2) - 1.0
    border = np.zeros(size[1::-1], bool)
    border[:3, :] = border[:, :3] = border[:, -3:] = True
    assert np.all(volume[:, border & above_table] == -1000.0)  # body clear of the in-plane border
    assert np.all(volume[:, -1, :] == -1000.0)  # the table ends inside the field of view
    assert np.all(np.where(above_table, -1000.0, volume).max(axis=1) > 0.0)  # table under every column
    # both lungs, apex to costophrenic recesses, lie inside the field of view
    z, y, x = np.meshgrid(np.linspace(-60.0, 60.0, 61), np.arange(-70.0, 71.0, 4.0), np.arange(-90.0, 91.0, 4.0),
                          indexing="ij")
    lung = (lung_depth_mm(anatomy, np.column_stack([x.ravel(), y.ravel(), z.ravel()])) > 0).reshape(z.shape)
    lung_slices = np.flatnonzero(lung.any(axis=(1, 2)))
    assert lung[x < 0].any() and lung[x > 0].any()
    assert lung_slices.min() > 0 and lung_slices.max() < len(lung) - 1


def test_render_time_of_a_typical_grid():
    anatomy = sample_anatomy(np.random.default_rng(3), FOV)
    size, spacing = (343, 286, 140), (0.7, 0.7, 1.0)
    origin = tuple(-(n - 1) * s / 2.0 for n, s in zip(size, spacing, strict=True))
    start = time.perf_counter()
    volume = render_anatomy(anatomy, size, spacing, origin)
    print(f"render_anatomy {size} at {spacing} mm: {time.perf_counter() - start:.2f} s")
    assert volume.shape == (140, 286, 343) and np.isfinite(volume).all()
