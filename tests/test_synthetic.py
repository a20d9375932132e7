"""The synthetic cohort against its own ground truth: determinism, nodule truth, misalignment truth."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from noduleflow.imaging import read_image
from noduleflow.metadata.synthetic import CohortConfig, generate_cohort, truth_transform

CONFIG = CohortConfig(n_patients=3, seed=5, fov_mm=(220.0, 180.0, 130.0), pixel_spacing_mm=(0.75, 0.8))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(CONFIG, out, threads=2)
    return out


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow  # generates the cohort a second time, on one thread
def test_same_seed_gives_identical_files_whatever_the_thread_count(cohort, tmp_path):
    generate_cohort(CONFIG, tmp_path, threads=1)
    again, first = _files(tmp_path), _files(cohort)
    assert again.keys() == first.keys()
    # torch.save stamps each file with a fresh serialization id, so the tracking file is compared by content
    assert [name for name in first if first[name] != again[name]] == [Path("nodules.pt")]
    assert torch.load(cohort / "nodules.pt", weights_only=True) == torch.load(tmp_path / "nodules.pt",
                                                                              weights_only=True)


def test_a_different_seed_gives_a_different_cohort(cohort, tmp_path):
    generate_cohort(CohortConfig(**{**CONFIG.__dict__, "seed": 6, "n_patients": 1}), tmp_path)
    first = pd.read_csv(cohort / "manifest.csv", dtype=str)
    other = pd.read_csv(tmp_path / "manifest.csv", dtype=str)
    assert other["exam_id"].iloc[0] != first["exam_id"].iloc[0]


def test_manifest_and_tracking_file_describe_the_images(cohort):
    manifest = pd.read_csv(cohort / "manifest.csv", dtype={"pid": str, "exam_id": str})
    tracking = torch.load(cohort / "nodules.pt", weights_only=True)
    assert set(tracking) <= set(manifest["pid"])
    for row in manifest.itertuples():
        image = read_image(cohort / row.image_path)
        assert image.GetPixelID() == sitk.sitkInt16
        assert image.GetSpacing()[2] == pytest.approx(row.slice_thickness)
        assert image.GetSpacing()[0] == pytest.approx(row.pixel_spacing, abs=1e-4)
    for groups in tracking.values():
        for exams in groups.values():
            for exam_idx, lesion in exams.items():
                assert manifest.set_index("exam_id").loc[lesion["exam"], "screen_timepoint"] == exam_idx


def test_masks_match_the_true_volume_and_centre(cohort):
    truth = pd.read_parquet(cohort / "truth" / "nodules.parquet")
    assert len(truth) > 0 and set(truth["kind"]) <= {"solid", "part_solid", "ground_glass", "calcified"}
    assert truth["true_volume_mm3"].between(8, 6000).all()
    for row in truth.itertuples():
        mask = read_image(cohort / "truth" / "masks" / f"{row.exam_id}.nii.gz")
        array = sitk.GetArrayFromImage(mask) == row.nodule_group
        voxel = np.prod(mask.GetSpacing())
        assert array.sum() * voxel == pytest.approx(row.mask_volume_mm3)
        if row.true_volume_mm3 > 40:
            assert row.mask_volume_mm3 == pytest.approx(row.true_volume_mm3, rel=0.2)
        zyx = np.argwhere(array).mean(axis=0)
        centroid = np.asarray(mask.TransformContinuousIndexToPhysicalPoint(zyx[::-1].tolist()))
        assert np.linalg.norm(centroid - np.asarray(row.center_exam)) < 0.5 * row.mask_volume_mm3 ** (1 / 3) + 1.5


def test_growth_follows_each_nodule_fate(cohort):
    truth = pd.read_parquet(cohort / "truth" / "nodules.parquet")
    primary = truth[truth["primary_series"]].sort_values("days_since_baseline")
    for (_, _), track in primary.groupby(["pid", "nodule_group"]):
        change = np.diff(track["true_volume_mm3"].to_numpy())
        fate = track["fate"].iloc[0]
        if fate == "growing":
            assert (change >= 0).all()
        elif fate == "shrinking":
            assert (change <= 0).all()
        else:
            assert np.allclose(change, 0)


def _body_ncc(fixed, moving):
    a, b = sitk.GetArrayFromImage(fixed).astype(float), sitk.GetArrayFromImage(moving).astype(float)
    inside = (a > -500) & (b > -1500)
    a, b = a[inside] - a[inside].mean(), b[inside] - b[inside].mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_known_misalignment_maps_follow_up_onto_baseline(cohort):
    manifest = pd.read_csv(cohort / "manifest.csv", dtype={"pid": str, "exam_id": str})
    exams = pd.read_parquet(cohort / "truth" / "exams.parquet")
    truth = pd.read_parquet(cohort / "truth" / "nodules.parquet")
    primary = exams[exams["primary_series"]]
    pid = primary["pid"].value_counts().index[0]
    fixed_id, moving_id = primary[primary["pid"] == pid].sort_values("screen_timepoint")["exam_id"].iloc[[0, 1]]
    fixed = read_image(cohort / manifest.set_index("exam_id").loc[fixed_id, "image_path"])
    moving = read_image(cohort / manifest.set_index("exam_id").loc[moving_id, "image_path"])
    matrix = truth_transform(exams, fixed_id, moving_id)
    transform = sitk.AffineTransform(matrix[:3, :3].ravel().tolist(), matrix[:3, 3].tolist())
    aligned = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, -2000)
    unaligned = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, -2000)
    assert _body_ncc(fixed, aligned) > 0.85
    assert _body_ncc(fixed, aligned) > _body_ncc(fixed, unaligned) + 0.1
    # nodule centres move with the known transform, up to the small breathing deformation
    for _, rows in truth[truth["exam_id"].isin([fixed_id, moving_id])].groupby("nodule_group"):
        if len(rows) == 2:
            centre = rows.set_index("exam_id")["center_exam"]
            mapped = matrix @ np.append(centre[fixed_id], 1.0)
            assert np.linalg.norm(mapped[:3] - np.asarray(centre[moving_id])) < 0.6
