"""The full-volume alternative: volumes in registered space, the VAE on their crops, and the encoded volumes."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import IDENTITY, config_settings, reconstruction_errors, snakemake
from noduleflow.cache.datasets import VolumeCrops
from noduleflow.cache.patches import CacheError, PatchSettings
from noduleflow.cache.volumes import centred_start, consolidate_volumes, crop_or_pad, exam_volume, volume_shard
from noduleflow.determinism import fingerprints
from noduleflow.hu import to_unit_range
from noduleflow.imaging import Geometry, geometry_columns, homogeneous, read_image, write_nifti
from noduleflow.io import write_array
from noduleflow.models.settings import VaeSettings
from noduleflow.models.tasks import load_vae, vae_datasets
from noduleflow.settings import from_config

SPLITS = ("train", "val", "test")
WINDOW = (-2000.0, 500.0)
# A 40 x 30 x 20 voxel exam at 1 x 1 x 2 mm; volumes at 2 x 2 x 4 mm (registered grid 20 x 15 x 10), cut to
# 16 x 20 x 10: x cropped by 4 (2 before), y padded by 5 (2 before, 3 after), z as it is.
EXAM = Geometry((40, 30, 20), (1.0, 1.0, 2.0), (-10.0, -20.0, 30.0), IDENTITY)
SETTINGS = config_settings(PatchSettings, "patch", spacing_mm=(2.0, 2.0, 4.0), size=(16, 20, 10), hu_window=WINDOW)


def _exam_image(path, shift_x_voxels=0):
    """Air-filled lungs (-1000 HU) with a 400 HU cube at x 20-29, y 10-19, z 8-15 (moved by `shift_x_voxels`)."""
    array = np.full((20, 30, 40), -1000, dtype=np.int16)
    array[8:16, 10:20, 20 + shift_x_voxels:30 + shift_x_voxels] = 400
    write_nifti(array, EXAM, path)
    return read_image(path)


def test_a_centred_crop_or_pad_gives_the_lower_side_the_smaller_half():
    assert centred_start((10, 3, 5), (3, 10, 5)).tolist() == [3, -3, 0]  # 7 cut: 3 before; 7 added: 3 before
    assert centred_start((9, 4), (4, 9)).tolist() == [2, -2]
    array = np.arange(5 * 6 * 9, dtype=np.float32).reshape(5, 6, 9)  # z, y, x
    out, start = crop_or_pad(array, (4, 9, 5), -1.0)  # x: cut 5 (2 before), y: add 3 (1 before, 2 after)
    assert out.shape == (5, 9, 4) and out.dtype == np.float32 and start.tolist() == [2, -1, 0]
    np.testing.assert_array_equal(out[:, 1:7], array[:, :, 2:6])
    assert (out[:, :1] == -1).all() and (out[:, 7:] == -1).all()


def test_an_exam_volume_has_the_configured_grid_padding_and_values(tmp_path):
    volume, geometry, start = exam_volume(_exam_image(tmp_path / "exam.nii.gz"), EXAM, np.eye(4), SETTINGS)
    assert volume.shape == (10, 20, 16) and start.tolist() == [2, -2, 0]
    assert geometry == Geometry((16, 20, 10), (2.0, 2.0, 4.0), (-10.0 + 4.0, -20.0 - 4.0, 30.0), IDENTITY)
    assert (volume[:, :2] == -1).all() and (volume[:, 17:] == -1).all()  # padding: 2 rows before, 3 after
    lungs, cube = to_unit_range(np.array([-1000.0, 400.0]), WINDOW)
    expected = np.full(volume.shape, lungs, dtype=np.float32)
    expected[:, :2] = expected[:, 17:] = -1.0
    expected[4:8, 5 + 2:10 + 2, 10 - 2:15 - 2] = cube  # registered voxel i samples exam voxel 2i (x, y) and 2k (z)
    np.testing.assert_allclose(volume, expected, atol=1e-5)


def test_a_follow_up_volume_is_resampled_through_its_transform(tmp_path):
    baseline, _, _ = exam_volume(_exam_image(tmp_path / "baseline.nii.gz"), EXAM, np.eye(4), SETTINGS)
    moved = _exam_image(tmp_path / "follow_up.nii.gz", shift_x_voxels=4)  # the anatomy 4 mm further along x
    fixed_to_moving = homogeneous([1, 0, 0, 4.0, 0, 1, 0, 0, 0, 0, 1, 0])
    registered, _, _ = exam_volume(moved, EXAM, fixed_to_moving, SETTINGS)
    unregistered, _, _ = exam_volume(moved, EXAM, np.eye(4), SETTINGS)
    np.testing.assert_allclose(registered, baseline, atol=1e-5)
    assert np.abs(unregistered - baseline).max() > 1.0


def _exams(tmp_path):
    """A split table of three patients' exams in two shards; one follow-up failed registration QC."""
    rows = []
    for pid, shard, timepoints in (("p1", 0, (0, 1, 2)), ("p2", 0, (0,)), ("p3", 1, (0, 1))):
        for t in timepoints:
            path = tmp_path / f"{pid}_{t}.nii.gz"
            _exam_image(path, shift_x_voxels=t)
            rows.append({"pid": pid, "exam_id": f"{pid}t{t}", "fixed_exam_id": f"{pid}t0", "is_fixed": t == 0,
                         "screen_timepoint": t, "days_since_baseline": 365.0 * t, "shard": shard,
                         "qc_pass": (pid, t) != ("p1", 1), "image_path": str(path),
                         "fixed_to_moving": [1, 0, 0, float(t), 0, 1, 0, 0, 0, 0, 1, 0],
                         **geometry_columns("fixed", EXAM)})
    return pd.DataFrame(rows)


def test_volume_shards_hold_every_good_exam_and_their_index_is_checked(tmp_path):
    exams = _exams(tmp_path)
    shards = [volume_shard(exams, "train", shard, SETTINGS, tmp_path / f"{shard:03d}.npy") for shard in (0, 1)]
    assert [s["exam_id"].tolist() for s in shards] == [["p1t0", "p1t2", "p2t0"], ["p3t0", "p3t1"]]
    index = consolidate_volumes(shards, tmp_path, SETTINGS)
    assert index["exam_id"].tolist() == ["p1t0", "p1t2", "p2t0", "p3t0", "p3t1"]
    arrays = np.load(tmp_path / "000.npy", mmap_mode="r")
    assert arrays.shape == (3, 1, 10, 20, 16) and arrays.dtype == np.float32
    np.testing.assert_allclose(arrays[1], arrays[0], atol=1e-5)  # a follow-up lines up with its baseline
    assert list(index.loc[1, "grid_start"]) == [2, -2, 0] and list(index.loc[1, "volume_shape"]) == [16, 20, 10]
    np.save(tmp_path / "001.npy", np.zeros((1, 1, 10, 20, 16), np.float32))  # one volume lost
    with pytest.raises(CacheError, match="holds 1 arrays"):
        consolidate_volumes(shards, tmp_path, SETTINGS)


def test_volume_crops_are_a_function_of_seed_and_item_and_stay_inside(tmp_path):
    exams = _exams(tmp_path)
    index = volume_shard(exams, "train", 0, SETTINGS, tmp_path / "000.npy")
    crops = VolumeCrops(tmp_path, (8, 6, 10), seed=3, per_volume=50, index=index)
    assert len(crops) == 150
    volumes = np.load(tmp_path / "000.npy")
    starts = set()
    for item in range(0, 150, 7):
        crop = crops[item]
        x, y, z = crop["start"].tolist()
        assert crop["exam_id"] == index["exam_id"][item % 3] and crop["image"].shape == (1, 10, 6, 8)
        np.testing.assert_array_equal(crop["image"].numpy(), volumes[item % 3, :, z:z + 10, y:y + 6, x:x + 8])
        assert torch.equal(VolumeCrops(tmp_path, (8, 6, 10), 3, 50, index)[item]["image"], crop["image"])
        starts.add((x, y))
    assert len(starts) > 10
    assert not torch.equal(VolumeCrops(tmp_path, (8, 6, 10), 4, 50, index)[0]["start"], crops[0]["start"])
    with pytest.raises(ValueError, match="larger than volumes"):
        VolumeCrops(tmp_path, (8, 6, 11), 3, 50, index)


def test_an_array_written_row_by_row_is_all_there_or_not_at_all(tmp_path):
    rows = [np.full((2, 3), i, np.float32) for i in range(3)]
    write_array(tmp_path / "a.npy", iter(rows), (3, 2, 3), "float16")
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.stack(rows).astype(np.float16))
    with pytest.raises(ValueError, match="2 rows written, 3 announced"):
        write_array(tmp_path / "b.npy", iter(rows[:2]), (3, 2, 3), "float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]


# --- the demo cohort --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def volumes_run(demo_run):
    """The demo run with the full-volume alternative built too."""
    snakemake(demo_run, "--cores", "2", "vae_volumes", "encoded_volumes")
    return demo_run


def _config(workdir):
    return yaml.safe_load((workdir / "config" / "config.yaml").read_text())


def _volumes(workdir, split):
    folder = workdir / "results" / "cache" / "volumes" / split
    index = pd.read_parquet(folder / "index.parquet")
    return index, {name: np.load(folder / name, mmap_mode="r") for name in index["shard_file"].unique()}


@pytest.mark.slow
def test_the_volume_cache_holds_every_good_exam_at_the_configured_size(volumes_run):
    config = _config(volumes_run)
    size_x, size_y, size_z = config["volumes"]["size"]
    for split in SPLITS:
        exams = pd.read_parquet(volumes_run / "results" / "registration" / split / "exams_registered.parquet")
        index, arrays = _volumes(volumes_run, split)
        assert sorted(index["exam_id"]) == sorted(exams.loc[exams["qc_pass"], "exam_id"]), split
        for row in index.itertuples():
            volume = arrays[row.shard_file][row.offset]
            assert volume.shape == (1, size_z, size_y, size_x) and volume.dtype == np.float32
            assert list(row.volume_spacing) == pytest.approx(config["volumes"]["spacing_mm"])
            for axis, first in zip((3, 2, 1), row.grid_start, strict=True):  # x, y, z: padding before is -1
                if first < 0:
                    assert (np.take(volume, range(-first), axis=axis) == -1).all(), (row.exam_id, axis)


@pytest.mark.slow
def test_registered_follow_up_volumes_line_up_with_their_baseline(volumes_run):
    """Correlation with the baseline over the voxels both hold image data in (air, body and lungs): the registered
    follow-up beats itself shifted by 4 voxels and the follow-up without its transform (demo: 0.99-1.0 against
    0.86-0.90 and 0.42-0.87)."""
    config = _config(volumes_run)
    settings = from_config(PatchSettings, {**config["patch"], **config["volumes"]})
    follow_ups = 0
    for split in SPLITS:
        index, arrays = _volumes(volumes_run, split)
        exams = pd.read_parquet(volumes_run / "results" / "registration" / split / "exams_registered.parquet")
        exams, rows = exams.set_index("exam_id"), index.set_index("exam_id")
        for exam_id, row in rows[~rows["is_fixed"]].iterrows():
            fixed = rows.loc[row["fixed_exam_id"]]
            baseline = np.asarray(arrays[fixed["shard_file"]][fixed["offset"], 0], dtype=float)
            follow_up = np.asarray(arrays[row["shard_file"]][row["offset"], 0], dtype=float)
            exam = exams.loc[exam_id]
            unregistered, _, _ = exam_volume(read_image(volumes_run / exam["image_path"]),
                                             Geometry.from_columns(exam, "fixed"), np.eye(4), settings)
            aligned, shifted, before = (_correlation(baseline, other) for other in (
                follow_up, np.roll(follow_up, 4, axis=2), unregistered.astype(float)))
            assert aligned > 0.98 and aligned > shifted + 0.05 and aligned > before + 0.1, \
                (exam_id, aligned, shifted, before)
            follow_ups += 1
    assert follow_ups >= 5


def _correlation(a, b):
    """Correlation of two volumes in [-1, 1] where both hold image data (padding and no data are -1)."""
    both = (a > -0.99) & (b > -0.99)
    return np.corrcoef(a[both], b[both])[0, 1]


@pytest.mark.slow
def test_the_volume_vae_reconstructs_val_crops_better_than_the_mean_crop(volumes_run):
    config = _config(volumes_run)
    folders = [volumes_run / "results" / "cache" / "volumes" / split for split in ("train", "val")]
    _, val = vae_datasets(from_config(VaeSettings, config["models"]["vae_volumes"]), *folders, config["seed"])
    history = pd.read_csv(volumes_run / "results/models/vae_volumes/model.metrics.csv")
    assert history["val_loss"].notna().any() and history["loss"].tail(5).mean() < history["loss"].head(5).mean()
    vae = load_vae(volumes_run / "results/models/vae_volumes/model.pt")
    error, baseline = reconstruction_errors(vae, torch.stack([val[i]["image"] for i in range(len(val))]))
    assert len(val) >= 4 and error < baseline / 3, (error, baseline)


@pytest.mark.slow
def test_encoded_volumes_are_the_latent_grid_of_every_volume(volumes_run):
    config = _config(volumes_run)
    vae = config["models"]["vae_volumes"]
    factor = 2 ** (len(vae["channels"]) - 1)
    size_x, size_y, size_z = config["volumes"]["size"]
    for split in SPLITS:
        index, _ = _volumes(volumes_run, split)
        folder = volumes_run / "results" / "cache" / "volumes_encoded" / split
        encoded = pd.read_parquet(folder / "index.parquet")
        pd.testing.assert_frame_equal(encoded, index)
        for name, rows in encoded.groupby("shard_file"):
            latents = np.load(folder / name)
            assert latents.shape == (len(rows), vae["latent_channels"], size_z // factor, size_y // factor,
                                     size_x // factor) and latents.dtype == np.float32
            assert np.isfinite(latents).all() and latents.std() > 0.01


@pytest.mark.slow
def test_the_same_config_and_seed_give_the_same_volumes_model_metrics_and_encodings(volumes_run, tmp_path):
    workdir = tmp_path / "again"
    shutil.copytree(volumes_run, workdir, symlinks=True)
    for path in ("results/cache/volumes", "results/cache/volumes_encoded", "results/models/vae_volumes",
                 "results/models/.work/vae_volumes"):
        shutil.rmtree(workdir / path)
    snakemake(workdir, "--cores", "2", "encoded_volumes")
    prefixes = ("results/cache/volumes", "results/models/vae_volumes")
    first, second = ({name: digest for name, digest in fingerprints(folder).items() if name.startswith(prefixes)}
                     for folder in (volumes_run, workdir))
    assert first == second and any(name.startswith("results/cache/volumes_encoded/") for name in first)
