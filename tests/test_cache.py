"""The nodule patch cache: cutting, padding, consolidation checks, readers, and the cache of the demo run."""

import dataclasses
import itertools
import shutil

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
import yaml

from conftest import config_settings, kill_after_first_job, snakemake
from noduleflow.cache.datasets import NodulePairs, NodulePatches
from noduleflow.cache.patches import (
    CacheError,
    PatchSettings,
    box_in_patch,
    consolidate,
    cut_patch,
    patch_start,
    upsampled_box,
)
from noduleflow.cache.segmenter import HalfMaximumSegmenter
from noduleflow.hu import to_unit_range
from noduleflow.imaging import Geometry, homogeneous, read_image
from noduleflow.registration.boxes import registered_grid
from noduleflow.registration.rigid import matrix_to_transform

SPLITS = ("train", "val", "test")
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
SEGMENTER = config_settings(HalfMaximumSegmenter, "segmentation")
SMALL = config_settings(PatchSettings, "patch", size=(16, 12, 6))


def test_patch_grows_the_box_symmetrically_and_reports_boxes_in_patch_coordinates():
    start, cropped = patch_start([10, 13, 20, 22, 5, 5], (16, 12, 6))  # y 4 voxels, x 3, z 1
    assert not cropped and start.tolist() == [20 - 6, 10 - 4, 5 - 2]  # x spare 13 -> 6 before, y 8 -> 4, z 5 -> 2
    assert box_in_patch([10, 13, 20, 22, 5, 5], start, (16, 12, 6)) == [4, 7, 6, 8, 2, 2]
    assert upsampled_box([4, 7, 6, 8, 2, 2]) == [8, 15, 12, 17, 2, 2]
    start, cropped = patch_start([0, 30, 0, 2, 0, 0], (16, 12, 6))
    assert cropped and start[1] + 12 / 2 == pytest.approx(15.5, abs=0.5)  # a box taller than the patch: centred


def _volume(shape_zyx=(40, 60, 70), seed=0):
    rng = np.random.default_rng(seed)
    array = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(
        sitk.GetImageFromArray(rng.normal(0, 400, shape_zyx).astype(np.float32)), 2.0)) - 700
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((0.8, 0.8, 2.0))
    image.SetOrigin((-20.0, -30.0, -40.0))
    return image


def test_cutting_the_patch_grid_alone_equals_resampling_the_whole_volume():
    image = _volume()
    fixed = Geometry((70, 60, 40), (0.8, 0.8, 2.0), (-20.0, -30.0, -40.0), IDENTITY)
    grid = registered_grid(fixed, SMALL.spacing_mm)
    matrix = np.eye(4)
    angle = np.deg2rad(4.0)
    matrix[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    matrix[:3, 3] = (3.0, -2.0, 4.0)
    start = np.array([30, 25, 10])
    patch = cut_patch(image, grid, start, matrix, SMALL)
    whole = sitk.GetArrayFromImage(sitk.Resample(image, grid.reference_image(), matrix_to_transform(matrix),
                                                 sitk.sitkLinear, -2000.0, sitk.sitkFloat32))
    x, y, z = start
    expected = to_unit_range(whole[z:z + 6, y:y + 12, x:x + 16], SMALL.hu_window)
    assert patch.shape == (6, 12, 16)
    np.testing.assert_allclose(patch, expected, atol=1e-3)


def test_a_patch_at_the_volume_edge_is_padded_with_minus_one_on_that_side():
    image = _volume()
    fixed = Geometry((70, 60, 40), (0.8, 0.8, 2.0), (-20.0, -30.0, -40.0), IDENTITY)
    grid = registered_grid(fixed, SMALL.spacing_mm)
    start, _ = patch_start([20, 22, 0, 2, 12, 12], SMALL.size)  # the box touches the left edge (x = 0)
    assert start[0] < 0
    patch = cut_patch(image, grid, start, np.eye(4), SMALL)
    outside = -start[0]
    assert (patch[:, :, :outside] == -1).all()
    assert (patch[:, :, outside + 1:] > -1).all()


def _write_shard(folder, name, count, settings=SMALL):
    x, y, z = settings.size
    np.save(folder / f"{name}.npy", np.random.default_rng(0).uniform(-1, 1, (count, 1, z, y, x)).astype(np.float32))
    np.save(folder / f"{name}_slices.npy", np.zeros((count, 1, y, x), np.float32))
    return pd.DataFrame({"pid": "1", "nodule_group": range(count), "exam_id": f"e{name}", "exam_idx": 0,
                         "nodule_key": [f"{g}_e{name}_0" for g in range(count)], "split": "train",
                         "shard_file": f"{name}.npy", "slice_file": f"{name}_slices.npy", "offset": range(count),
                         "bbox": [[4, 7, 6, 8, 2, 2]] * count, "bbox_interp": [[8, 15, 12, 17, 2, 2]] * count,
                         "patch_start": [[0, 0, 0]] * count, "box_cropped": False})


def test_consolidation_fails_loudly_on_a_missing_truncated_or_misshapen_shard(tmp_path):
    index = consolidate([_write_shard(tmp_path, "000", 3), _write_shard(tmp_path, "001", 2)], tmp_path, SMALL)
    assert len(index) == 5
    shard = tmp_path / "001.npy"
    intact = shard.read_bytes()
    shard.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(CacheError, match="damaged"):
        consolidate([_write_shard(tmp_path, "000", 3), index[index["shard_file"] == "001.npy"]], tmp_path, SMALL)
    shard.unlink()
    with pytest.raises(CacheError, match="missing"):
        consolidate([index], tmp_path, SMALL)
    shard.write_bytes(intact)
    with pytest.raises(CacheError, match="shape"):
        consolidate([index], tmp_path, dataclasses.replace(SMALL, size=(16, 12, 8)))


def test_readers_return_patches_and_pairs_also_in_worker_processes(tmp_path):
    index = consolidate([_write_shard(tmp_path, "000", 3)], tmp_path, SMALL)
    index.to_parquet(tmp_path / "index.parquet")
    patches = NodulePatches(tmp_path)
    item = patches[2]
    assert item["image"].shape == (1, 6, 12, 16) and item["nodule_key"] == "2_e000_0"
    expected = np.load(tmp_path / "000.npy")[2]
    np.testing.assert_array_equal(item["image"].numpy(), expected)
    pairs = pd.DataFrame({"pid": "1", "nodule_group": [0, 1], "exam_a": "e000", "exam_b": "e000", "exam_idx_a": 0,
                          "exam_idx_b": [0, 5], "delta_days": [365.0, 400.0]})
    dataset = NodulePairs(tmp_path, pairs)
    assert len(dataset) == 1 and dataset.missing["key_b"].tolist() == ["1_e000_5"]
    loader = torch.utils.data.DataLoader(patches, batch_size=2, num_workers=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 1, 6, 12, 16)
    pair = dataset[0]
    assert pair["delta_days"].item() == 365.0 and pair["prior"].shape == pair["follow_up"].shape


def test_half_maximum_segmenter_measures_solid_and_ground_glass_spheres():
    zz, yy, xx = np.meshgrid(np.arange(32) * 2.5, np.arange(64) * 0.7, np.arange(64) * 0.7, indexing="ij")
    distance = np.sqrt((zz - 40) ** 2 + (yy - 22.4) ** 2 + (xx - 22.4) ** 2)
    segmenter = SEGMENTER
    for hu in (40.0, -600.0):
        inside = np.clip(4.5 - distance + 0.5, 0, 1)  # partial volume over one voxel-ish shell
        patch = -850.0 + inside * (hu + 850.0) + np.random.default_rng(1).normal(0, 15, distance.shape)
        box = [int(v) for v in (np.argwhere(distance <= 4.5).min(0).tolist() + np.argwhere(distance <= 4.5).max(0)
                                .tolist())]
        box = [box[1], box[4], box[2], box[5], box[0], box[3]]
        volume = segmenter(patch, box).sum() * 0.7 * 0.7 * 2.5
        assert volume == pytest.approx(4 / 3 * np.pi * 4.5**3, rel=0.2)
    assert not segmenter(np.full((8, 8, 8), -850.0), [2, 4, 2, 4, 2, 4]).any()


@pytest.mark.parametrize("hu", [40.0, -600.0])  # solid, ground glass
@pytest.mark.parametrize("depth", [1.0, 0.6])  # the wall's distance from the centre, in radii (< 1: sunk into it)
def test_a_nodule_against_the_chest_wall_is_measured_without_the_wall(depth, hu):
    """A solid or ground-glass sphere against a 40 HU wall: the component alone takes the wall in (solid) or the
    wall's density sets the threshold (ground glass)."""
    zz, yy, xx = np.meshgrid(np.arange(32) * 2.5, np.arange(64) * 0.7, np.arange(64) * 0.7, indexing="ij")
    distance = np.sqrt((zz - 40) ** 2 + (yy - 22.4) ** 2 + (xx - 22.4) ** 2)
    beyond = (xx + yy) / np.sqrt(2.0) - (44.8 / np.sqrt(2.0) + depth * 4.5)  # mm into an oblique wall
    inside = np.maximum(np.clip(4.5 - distance + 0.5, 0, 1) * (hu + 850.0), np.clip(beyond + 0.5, 0, 1) * 890.0)
    patch = -850.0 + inside + np.random.default_rng(3).normal(0, 15, distance.shape)
    corners = np.argwhere((distance <= 4.5) & (beyond < 0))  # the box holds a wedge of the wall
    low, high = corners.min(0), corners.max(0)
    box = [int(v) for v in (low[1], high[1], low[2], high[2], low[0], high[0])]
    cap = 4.5 * (1 - depth)
    visible = 4 / 3 * np.pi * 4.5**3 - np.pi * cap**2 * (3 * 4.5 - cap) / 3  # the sphere on the lung's side
    # a faint nodule's base loses more to the rolling disk: its half-maximum edge lies further into the nodule
    assert SEGMENTER(patch, box).sum() * 0.7 * 0.7 * 2.5 == pytest.approx(visible, rel=0.2 if hu > 0 else 0.25)
    if depth < 1 and hu > 0:
        with_wall = dataclasses.replace(SEGMENTER, pleura_disk=0.0)(patch, box).sum() * 0.7 * 0.7 * 2.5
        assert with_wall > 1.25 * visible


def test_a_loose_box_measures_a_small_nodule_as_its_own_box_does():
    """A nodule that shrank is measured in the union of its two boxes: most of that box is parenchyma."""
    zz, yy, xx = np.meshgrid(np.arange(16) * 2.5, np.arange(48) * 0.7, np.arange(48) * 0.7, indexing="ij")
    distance = np.sqrt((zz - 20) ** 2 + (yy - 16.8) ** 2 + (xx - 16.8) ** 2)
    for hu in (40.0, -300.0):  # solid; faint (part-solid)
        inside = np.clip(3.0 - distance + 0.5, 0, 1)
        patch = -850.0 + inside * (hu + 850.0) + np.random.default_rng(2).normal(0, 15, distance.shape)
        tight, loose = ([int(v) for v in (np.argwhere(distance <= r).min(0).tolist()
                                          + np.argwhere(distance <= r).max(0).tolist())] for r in (3.0, 5.0))
        tight, loose = ([b[1], b[4], b[2], b[5], b[0], b[3]] for b in (tight, loose))
        volume = {name: segmenter(patch, box).sum() * 0.7 * 0.7 * 2.5
                  for name, segmenter, box in (("tight", SEGMENTER, tight),
                                               ("loose", SEGMENTER, loose),
                                               ("unrefined", dataclasses.replace(SEGMENTER, refinements=0), loose))}
        assert volume["loose"] == pytest.approx(volume["tight"], rel=0.15)
        assert volume["loose"] == pytest.approx(4 / 3 * np.pi * 3.0**3, rel=0.15)
        assert volume["unrefined"] > 1.3 * volume["tight"]  # without the re-estimate the noise around it counts


# --- the cache of the demo run ---------------------------------------------------------------------------

def _cache(workdir, name, reader=pd.read_parquet):
    return pd.concat([reader(workdir / "results" / "cache" / "raw" / s / name) for s in SPLITS], ignore_index=True)


@pytest.mark.slow
def test_every_registered_nodule_is_cached_once_or_listed_with_a_reason(demo_run):
    index = _cache(demo_run, "index.parquet")
    skipped = _cache(demo_run, "skipped.csv", lambda p: pd.read_csv(p, dtype=str))
    boxes = pd.concat([pd.read_parquet(demo_run / "results/registration" / s / "nodules_fixed_bboxes.parquet")
                       for s in SPLITS])
    expected = {f"{g}_{e}_{i}" for g, e, i in zip(boxes["nodule_group"], boxes["exam"], boxes["exam_idx"], strict=True)}
    assert not index["nodule_key"].duplicated().any()
    assert set(index["nodule_key"]) | set(skipped["nodule_key"]) == expected
    assert set(index["nodule_key"]).isdisjoint(skipped["nodule_key"])


@pytest.mark.slow
def test_patch_centres_lie_in_the_true_nodule(demo_run):
    index = _cache(demo_run, "index.parquet")
    exams = pd.concat([pd.read_parquet(demo_run / "results/registration" / s / "exams_registered.parquet")
                       for s in SPLITS]).set_index("exam_id")
    truth = pd.read_parquet(demo_run / "results/synthetic/truth/nodules.parquet")
    truth = truth.set_index(["exam_id", "nodule_group"])["mask_volume_mm3"]
    checked = 0
    for row in index.itertuples():
        if truth[(row.exam_id, row.nodule_group)] < 20.0:
            continue  # a nodule of a few voxels: box rounding alone moves its centre out (see the 2 mm box test)
        checked += 1
        exam = exams.loc[row.exam_id]
        grid = registered_grid(Geometry.from_columns(exam, "fixed"), (0.703125, 0.703125, 2.5))
        mask = read_image(demo_run / "results/synthetic/truth/masks" / f"{row.exam_id}.nii.gz")
        y0, y1, x0, x1, z0, z1 = row.bbox
        # the centre of a box with an even extent lies between two voxels: one of them must be in the nodule
        centres = itertools.product(*[sorted({(lo + hi) // 2, (lo + hi + 1) // 2}) for lo, hi in
                                      ((x0, x1), (y0, y1), (z0, z1))])
        labels = []
        for centre in centres:
            point = grid.matrix() @ np.append(np.asarray(row.patch_start) + centre, 1.0)
            in_exam = homogeneous(exam["fixed_to_moving"]) @ point
            index_xyz = mask.TransformPhysicalPointToIndex(in_exam[:3])
            labels.append(sitk.GetArrayViewFromImage(mask)[tuple(reversed(index_xyz))])
        assert row.nodule_group in labels, row.nodule_key
    assert checked >= 0.8 * len(index)


@pytest.mark.slow
def test_paired_patches_show_the_same_anatomy_after_registration(demo_run):
    split = "train"
    folder = demo_run / "results/cache/raw" / split
    pairs = NodulePairs(folder, pd.read_parquet(demo_run / "results/registration" / split / "paired_nodules.parquet"))
    exams = pd.read_parquet(demo_run / "results/registration" / split / "exams_registered.parquet").set_index("exam_id")
    index = pd.read_parquet(folder / "index.parquet").set_index("nodule_key")
    assert len(pairs) > 3 and pairs.missing.empty
    gains = []
    for item in range(len(pairs)):
        pair = pairs[item]
        prior, follow_up = pair["prior"][0].numpy(), pair["follow_up"][0].numpy()
        row = index.loc[pair["nodule_key_b"]]
        exam = exams.loc[row["exam_id"]]
        grid = registered_grid(Geometry.from_columns(exam, "fixed"), (0.703125, 0.703125, 2.5))
        size = tuple(reversed(prior.shape))  # the configured patch size, x, y, z
        unregistered = cut_patch(read_image(demo_run / exam["image_path"]), grid, np.asarray(row["patch_start"]),
                                 np.eye(4), dataclasses.replace(SMALL, size=size))
        away = (prior > -1) & (follow_up > -1) & (unregistered > -1)  # both exams have image data here
        for box in (pair["bbox_a"], pair["bbox_b"]):
            y0, y1, x0, x1, z0, z1 = box.tolist()
            away[max(z0 - 2, 0):z1 + 3, max(y0 - 8, 0):y1 + 9, max(x0 - 8, 0):x1 + 9] = False
        registered = np.corrcoef(prior[away], follow_up[away])[0, 1]
        before = np.corrcoef(prior[away], unregistered[away])[0, 1]
        assert registered > 0.8, (pair["nodule_key_a"], registered)
        gains.append(registered - before)
    assert np.median(gains) > 0.2


@pytest.mark.slow
def test_reference_volumes_match_the_true_volumes(demo_run):
    boxes = _cache(demo_run, "small_boxes.parquet")
    truth = pd.read_parquet(demo_run / "results/synthetic/truth/nodules.parquet")
    merged = boxes.merge(truth[truth["primary_series"]], on=["exam_id", "nodule_group"])
    assert len(merged) == len(boxes)
    relative = (merged["nodule_volume"] - merged["true_volume_mm3"]) / merged["true_volume_mm3"]
    assert relative.abs().median() < 0.2 and abs(relative.median()) < 0.15


@pytest.mark.slow
def test_a_killed_cache_build_resumes_to_the_same_index_and_patch_size_reruns_only_the_cache(demo_run, tmp_path):
    workdir = tmp_path / "killed"
    shutil.copytree(demo_run, workdir, symlinks=True)
    shutil.rmtree(workdir / "results" / "cache" / "raw" / "train")
    target = "results/cache/raw/train/index.parquet"
    kill_after_first_job(workdir, target, "cache_shard")
    snakemake(workdir, "--cores", "2", "--rerun-incomplete", target)
    assert (workdir / target).read_bytes() == (demo_run / target).read_bytes()
    for shard in ("000", "001", "002", "003"):
        name = f"results/cache/raw/train/{shard}.npy"
        assert (workdir / name).read_bytes() == (demo_run / name).read_bytes()

    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    config["patch"]["size"] = [96, 96, 32]
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir, "-n")
    plan = result.stdout + result.stderr
    assert "cache_shard" in plan and "small_boxes" in plan and "register_shard" not in plan
