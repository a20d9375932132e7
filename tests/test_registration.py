"""Registration against the synthetic truth: accuracy, boxes in registered space, QC flags, reruns, kills."""

import shutil
from base64 import urlsafe_b64encode

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from conftest import config_settings, kill_after_first_job, make_workdir, planned_jobs, registration_settings, snakemake
from noduleflow.ids import shard_name, shard_of
from noduleflow.imaging import Geometry, homogeneous, read_image, write_nifti
from noduleflow.io import load_plain_pickle
from noduleflow.metadata.phantom import render_anatomy, sample_anatomy
from noduleflow.metadata.synthetic import CohortConfig, Deformation, exam_pair, truth_map_points, truth_transform
from noduleflow.metadata.tables import computed_split
from noduleflow.plan import find_precomputed_transforms, shard_plan
from noduleflow.registration.boxes import map_box, registered_grid
from noduleflow.registration.rigid import (
    QualityThresholds,
    body_mask,
    matrix_to_transform,
    quality_reasons,
    register_exam,
    register_shard,
)

SPLITS = ("train", "val", "test")
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
QC = config_settings(QualityThresholds, "registration.qc")


def _rigid(angles_deg, translation):
    transform = sitk.Euler3DTransform()
    transform.SetRotation(*np.deg2rad(angles_deg))
    transform.SetTranslation(translation)
    matrix = np.eye(4)
    matrix[:3, :3] = np.reshape(transform.GetMatrix(), (3, 3))
    matrix[:3, 3] = translation
    return matrix


def test_shard_plan_lists_patients_then_timepoints_with_the_first_exam_as_baseline():
    exams = pd.DataFrame({"pid": ["2", "1", "1", "3"], "exam_id": ["2a", "1c", "1b", "3a"],
                          "screen_timepoint": [0, 2, 1, 1], "shard": [1, 0, 0, 0]})
    exams["image_path"] = exams["exam_id"] + ".nii.gz"
    plan = shard_plan(exams, {("1b", "1c"): {"fixed": "1c", "path": "1c__1b.tfm"}})
    listed = {shard: [(e.exam_id, e.fixed_exam_id, e.fixed_image_path) for e in exams] for shard, exams in plan.items()}
    assert listed == {0: [("1b", "1b", "1b.nii.gz"), ("1c", "1b", "1b.nii.gz"), ("3a", "3a", "3a.nii.gz")],
                      1: [("2a", "2a", "2a.nii.gz")]}
    assert plan[0][1].precomputed == "1c__1b.tfm" and plan[0][1].precomputed_inverted


def test_map_box_follows_a_known_translation():
    exam = Geometry((100, 100, 40), (0.7, 0.7, 2.0), (-35.0, -35.0, -40.0), IDENTITY)
    grid = registered_grid(exam, (0.703125, 0.703125, 2.5))
    assert grid.shape == (100, 100, 32)
    box = (40, 44, 50, 56, 10, 12)  # i (y), j (x), k (z)
    same, center, clipped = map_box(box, (42, 53, 11), exam, np.eye(4), grid)
    shifted_matrix = np.eye(4)
    shifted_matrix[:3, 3] = (7.03125, 0.0, 0.0)  # baseline point p is at p + 7 mm in x in this exam
    shifted, shifted_center, _ = map_box(box, (42, 53, 11), exam, shifted_matrix, grid)
    assert not clipped
    assert shifted[0:2] == same[0:2] and shifted[4:6] == same[4:6]
    assert [v - 10 for v in same[2:4]] == shifted[2:4]
    assert shifted_center[1] == pytest.approx(center[1] - 10)
    outside, _, flagged = map_box((1, 3, 1, 3, 0, 1), (2, 2, 0), exam, _rigid((0, 0, 0), (100.0, 0, 0)), grid)
    assert outside is None and flagged
    partly, _, flagged = map_box((1, 3, 1, 3, 0, 1), (2, 2, 0), exam, _rigid((0, 0, 0), (1.5, 0, 0)), grid)
    assert partly[2] == 0 and flagged


def test_quality_reasons_name_each_violated_threshold():
    good = {"error": None, "is_fixed": False, "lung_ncc_before": 0.2, "lung_ncc_after": 0.93, "rotation_deg": 4.0,
            "translation_mm": 12.0, "overlap": 0.55}
    assert quality_reasons(good, QC) is None
    assert "lung similarity" in quality_reasons({**good, "lung_ncc_after": 0.4}, QC)
    assert "worse" in quality_reasons({**good, "lung_ncc_before": 0.97}, QC)
    assert "rotation" in quality_reasons({**good, "rotation_deg": 40.0}, QC)
    assert "translation" in quality_reasons({**good, "translation_mm": 200.0}, QC)
    assert "failed: boom" in quality_reasons({**good, "error": "boom"}, QC)
    expected = "the follow-up covers 30% of the baseline's body < 40%"
    assert quality_reasons({**good, "overlap": 0.3}, QC) == expected


# --- robust start and fair QC on synthetic pairs (coarse grids, so each registration takes seconds) ---------

COARSE = CohortConfig(fov_mm=(240.0, 200.0, 180.0), reference_spacing_mm=(2.0, 2.0, 2.5), noise_hu=(20.0, 20.0))


def _pair_tre(fixed, truth, matrix, anatomy_points=2000):
    """Mean and max TRE (mm) of a fixed -> moving matrix over lung voxels of the baseline."""
    array = sitk.GetArrayViewFromImage(fixed)
    zyx = np.argwhere((array > -950) & (array < -700))
    zyx = zyx[np.random.default_rng(0).choice(len(zyx), size=min(anatomy_points, len(zyx)), replace=False)]
    points = np.asarray(fixed.GetOrigin()) + zyx[:, ::-1] * np.asarray(fixed.GetSpacing())
    target = truth_map_points(truth, "baseline", "follow_up", points)
    errors = np.linalg.norm(np.c_[points, np.ones(len(points))] @ matrix[:3].T - target, axis=1)
    return errors.mean(), errors.max()


def _register(fixed, moving):
    result = register_exam(fixed, moving, registration_settings())
    return result, homogeneous(result["fixed_to_moving"])


def test_the_body_mask_fills_the_lungs_in_every_slice_and_leaves_out_the_table():
    z, y, x = np.mgrid[:20, :40, :40]
    volume = np.full((20, 40, 40), -1000.0, np.float32)
    body = (y - 18) ** 2 + (x - 20) ** 2 < 15**2
    volume[body] = 0.0
    lungs = ((y - 18) ** 2 + (x - 13) ** 2 < 5**2) & (z < 15)  # open at the first slice, closed below
    volume[lungs] = -900.0
    volume[:, 36:38] = 0.0  # the table, apart from the body
    image = sitk.GetImageFromArray(volume)
    mask = sitk.GetArrayFromImage(body_mask(image, -500.0)).astype(bool)
    assert mask[lungs].all()  # filled, in the first slice too
    assert mask[1:-1][body[1:-1]].all()  # (the opening trims the rim of the end slices)
    assert not mask[~body].any()  # neither the table nor the air


def test_every_pyramid_level_needs_its_own_sampling_fraction():
    with pytest.raises(ValueError, match="one value per pyramid level"):
        registration_settings(shrink_factors=(2, 1), smoothing_sigmas_mm=(2.0, 0.0), sampling_fraction=(0.1,))


def test_a_follow_up_offset_60mm_along_the_body_axis_registers_within_1mm():
    truth_pose = _rigid((3.0, -2.0, 6.0), (8.0, -5.0, 60.0))
    fixed, moving, truth, _ = exam_pair(COARSE, 0, 2.0, 3.0, follow_up=truth_pose, start_offsets=(0.0, 0.0))
    result, matrix = _register(fixed, moving)
    mean, worst = _pair_tre(fixed, truth, matrix)
    assert mean < 1.0 and worst < 2.0, (mean, worst)
    assert quality_reasons({"error": None, "is_fixed": False, **result}, QC) is None


def test_a_pair_overlapping_60_percent_passes_qc_with_the_right_transform():
    """The old QC compared the whole baseline lungs, air where the follow-up ends, and flagged such pairs as
    badly registered (a false alarm); on the overlap the similarity is that of a good registration."""
    truth_pose = _rigid((-4.0, 3.0, -5.0), (-6.0, 9.0, 0.0))
    fixed, moving, truth, _ = exam_pair(COARSE, 1, 2.0, 3.0, follow_up=truth_pose, start_offsets=(-36.0, 36.0))
    result, matrix = _register(fixed, moving)
    mean, worst = _pair_tre(fixed, truth, matrix)
    assert mean < 1.0 and worst < 2.0, (mean, worst)
    assert 0.5 < result["overlap"] < 0.7
    assert quality_reasons({"error": None, "is_fixed": False, **result}, QC) is None
    # what the old QC measured: lung similarity over the whole baseline, air where the follow-up ends
    array = sitk.GetArrayFromImage(fixed).astype(float)
    moved = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, matrix_to_transform(matrix), sitk.sitkLinear,
                                                 -1024.0)).astype(float)
    lungs = array < -400
    assert np.corrcoef(array[lungs], moved[lungs])[0, 1] < result["lung_ncc_after"] - 0.05


def test_another_patients_exam_is_still_flagged():
    fixed, _, _, _ = exam_pair(COARSE, 2, 2.0, 3.0, follow_up=np.eye(4), start_offsets=(0.0, 0.0))
    _, other, _, _ = exam_pair(COARSE, 3, 2.0, 3.0, follow_up=_rigid((2.0, 0.0, 0.0), (0.0, 0.0, 20.0)))
    result, _ = _register(fixed, other)
    assert "lung similarity" in quality_reasons({"error": None, "is_fixed": False, **result}, QC)


def test_a_non_rigid_follow_up_registers_within_2mm_on_average():
    config = CohortConfig(**{**COARSE.__dict__, "deformation_mm": 5.0, "max_rotation_deg": 5.0,
                             "max_translation_mm": 30.0, "max_start_offset_mm": 40.0})
    fixed, moving, truth, _ = exam_pair(config, 4, 2.0, 3.0)
    assert len(truth.loc[1, "deformation"]) == 21
    _, matrix = _register(fixed, moving)
    rigid = truth_transform(truth, "baseline", "follow_up")
    mean, _ = _pair_tre(fixed, truth, matrix)
    assert mean < 2.0
    assert _pair_tre(fixed, truth, rigid)[0] > 0.5  # the deformation is there: the rigid pose alone is off


def test_the_truth_maps_points_exactly_under_the_non_rigid_change():
    deformation = Deformation.sample(np.random.default_rng(5), 6.0)
    points = np.random.default_rng(6).uniform(-150.0, 150.0, (500, 3))
    moved = deformation.to_anatomy(points)
    assert 0.5 < np.linalg.norm(moved - points, axis=1).max() <= 6.0
    np.testing.assert_allclose(deformation.from_anatomy(moved), points, atol=1e-9)
    pose = _rigid((3, 1, -2), (5, 6, 7))
    truth = pd.DataFrame({"exam_id": ["a", "b"], "anatomy_to_exam": [np.eye(4)[:3].ravel().tolist(),
                                                                     pose[:3].ravel().tolist()],
                          "deformation": [[], deformation.waves.ravel().tolist()]})
    there = truth_map_points(truth, "a", "b", points)
    np.testing.assert_allclose(truth_map_points(truth, "b", "a", there), points, atol=1e-9)
    before_pose = np.linalg.solve(pose, np.c_[there, np.ones(500)].T).T[:, :3]
    np.testing.assert_allclose(deformation.to_anatomy(before_pose), points, atol=1e-9)


def test_the_rendered_follow_up_shows_the_anatomy_where_the_truth_says():
    config = CohortConfig(**{**COARSE.__dict__, "deformation_mm": 6.0, "noise_hu": (0.0, 0.0)})
    pose = _rigid((2.0, 0.0, -3.0), (4.0, -3.0, 10.0))
    fixed, moving, truth, _ = exam_pair(config, 5, 2.0, 3.0, follow_up=pose, start_offsets=(0.0, 25.0))
    rigid_truth = truth.assign(deformation=[[], []])
    array = sitk.GetArrayViewFromImage(fixed)
    zyx = np.argwhere((array > -900) & (array < 200))[::50]
    points = np.asarray(fixed.GetOrigin()) + zyx[:, ::-1] * np.asarray(fixed.GetSpacing())
    errors = {}
    for name, table in (("non-rigid", truth), ("rigid only", rigid_truth)):
        mapped = truth_map_points(table, "baseline", "follow_up", points)
        index = np.round((mapped - np.asarray(moving.GetOrigin())) / np.asarray(moving.GetSpacing())).astype(int)
        inside = np.all((index >= 0) & (index < np.asarray(moving.GetSize())), axis=1)
        seen = sitk.GetArrayViewFromImage(moving)[tuple(index[inside][:, ::-1].T)].astype(float)
        errors[name] = np.abs(seen - array[tuple(zyx[inside].T)]).mean()
    assert errors["non-rigid"] < 0.5 * errors["rigid only"], errors


@pytest.fixture(scope="module")
def phantom_pair(tmp_path_factory):
    """A coarse phantom baseline and a follow-up misaligned by a known rigid transform."""
    folder = tmp_path_factory.mktemp("pair")
    anatomy = sample_anatomy(np.random.default_rng(3), (220.0, 180.0, 130.0))
    geometry = Geometry((160, 130, 60), (1.4, 1.4, 2.2), (-111.3, -90.3, -64.9), IDENTITY)
    baseline = render_anatomy(anatomy, geometry.shape, geometry.spacing, geometry.origin)
    write_nifti(np.round(baseline).astype(np.int16), geometry, folder / "fixed.nii.gz")
    truth = _rigid((2.0, -3.0, 4.0), (6.0, -8.0, 5.0))  # baseline -> follow-up
    image = sitk.GetImageFromArray(baseline)
    image.SetOrigin(geometry.origin)
    image.SetSpacing(geometry.spacing)
    moved = sitk.Resample(image, image, matrix_to_transform(np.linalg.inv(truth)), sitk.sitkLinear, -1000.0)
    write_nifti(np.round(sitk.GetArrayFromImage(moved)).astype(np.int16), geometry, folder / "moving.nii.gz")
    return folder, truth


def _lung_tre(fixed_path, estimated, truth):
    """Mean and max distance (mm) between two fixed -> moving transforms over lung voxels of the baseline."""
    image = read_image(fixed_path)
    array = sitk.GetArrayFromImage(image)
    rng = np.random.default_rng(0)
    zyx = np.argwhere((array > -950) & (array < -700))
    zyx = zyx[rng.choice(len(zyx), size=min(2000, len(zyx)), replace=False)]
    points = np.array([image.TransformIndexToPhysicalPoint([int(v) for v in p[::-1]]) for p in zyx])
    homogeneous = np.c_[points, np.ones(len(points))]
    error = np.linalg.norm((homogeneous @ estimated.T - homogeneous @ truth.T)[:, :3], axis=1)
    return error.mean(), error.max()


def _matrix(row):
    return homogeneous(row["fixed_to_moving"])


def test_registration_recovers_a_known_transform(phantom_pair, tmp_path):
    folder, truth = phantom_pair
    exams = pd.DataFrame({"pid": "100001", "exam_id": ["a", "b"], "screen_timepoint": [0, 1], "shard": 0,
                          "image_path": [str(folder / "fixed.nii.gz"), str(folder / "moving.nii.gz")]})
    table = register_shard(shard_plan(exams, {})[0], registration_settings(), tmp_path)
    follow_up = table.set_index("exam_id").loc["b"]
    assert follow_up["transform_source"] == "registered" and follow_up["error"] is None
    mean, worst = _lung_tre(folder / "fixed.nii.gz", _matrix(follow_up), truth)
    assert mean < 0.5 and worst < 1.0
    assert follow_up["lung_ncc_after"] > 0.9 > follow_up["lung_ncc_before"]
    assert sitk.ReadTransform(str(tmp_path / "a__b.tfm")).TransformPoint((1.0, 2.0, 3.0)) == pytest.approx(
        (_matrix(follow_up) @ [1.0, 2.0, 3.0, 1.0])[:3])


def test_precomputed_transforms_are_reused_and_inverted_when_stored_the_other_way(phantom_pair, tmp_path):
    folder, truth = phantom_pair
    stored = tmp_path / "stored"
    stored.mkdir()
    sitk.WriteTransform(matrix_to_transform(np.linalg.inv(truth)), str(stored / "b__a.tfm"))  # moving -> fixed
    (stored / "notes.txt").write_text("ignored")
    mapping = find_precomputed_transforms(stored)
    assert mapping == {("a", "b"): {"fixed": "b", "moving": "a", "filename": "b__a.tfm",
                                    "path": str(stored / "b__a.tfm")}}
    exams = pd.DataFrame({"pid": "100001", "exam_id": ["a", "b"], "screen_timepoint": [0, 1], "shard": 0,
                          "image_path": [str(folder / "fixed.nii.gz"), str(folder / "moving.nii.gz")]})
    plan = shard_plan(exams, mapping)[0]
    assert plan[1].precomputed_inverted
    row = register_shard(plan, registration_settings(), tmp_path / "out").set_index("exam_id").loc["b"]
    assert row["transform_source"] == "precomputed"
    np.testing.assert_allclose(_matrix(row), truth, atol=1e-6)


@pytest.mark.parametrize("damage", ["nan", "scaling", "mirror"])
def test_a_damaged_precomputed_transform_fails_only_its_exam_naming_the_file(phantom_pair, tmp_path, damage):
    folder, truth = phantom_pair
    stored = tmp_path / "stored"
    stored.mkdir()
    matrix = truth.copy()
    if damage == "nan":
        matrix[0, 3] = np.nan
    else:
        matrix[:3, :3] = matrix[:3, :3] @ np.diag([1.5, 1.0, 1.0] if damage == "scaling" else [-1.0, 1.0, 1.0])
    sitk.WriteTransform(matrix_to_transform(matrix), str(stored / "a__b.tfm"))
    exams = pd.DataFrame({"pid": "100001", "exam_id": ["a", "b"], "screen_timepoint": [0, 1], "shard": 0,
                          "image_path": [str(folder / "fixed.nii.gz"), str(folder / "moving.nii.gz")]})
    rows = register_shard(shard_plan(exams, find_precomputed_transforms(stored))[0], registration_settings(),
                          tmp_path / "out").set_index("exam_id")
    assert "a__b.tfm" in rows.at["b", "error"] and "not a finite rigid transform" in rows.at["b", "error"]
    assert pd.isna(rows.at["a", "error"]) and rows.at["a", "transform_source"] == "identity"


# --- the workflow on the small synthetic cohort -------------------------------------------------------------

def _split_table(workdir, name):
    return pd.concat([pd.read_parquet(workdir / "results" / "registration" / s / f"{name}.parquet") for s in SPLITS])


@pytest.mark.slow
def test_every_follow_up_is_registered_within_1mm(demo_run):
    truth = pd.read_parquet(demo_run / "results/synthetic/truth/exams.parquet")
    registered = _split_table(demo_run, "exams_registered")
    follow_ups = registered[~registered["is_fixed"]]
    assert len(follow_ups) >= 8 and registered["qc_pass"].all()
    for row in follow_ups.to_dict("records"):
        fixed_path = demo_run / registered.set_index("exam_id").loc[row["fixed_exam_id"], "image_path"]
        mean, worst = _lung_tre(fixed_path, _matrix(row), truth_transform(truth, row["fixed_exam_id"], row["exam_id"]))
        assert mean < 1.0 and worst < 2.0, (row["exam_id"], mean, worst)
    for split in SPLITS:
        assert pd.read_csv(demo_run / "results/registration" / split / "bad_exams.csv").empty


@pytest.mark.slow
def test_mapped_boxes_hold_the_true_centres_within_2mm(demo_run):
    truth_exams = pd.read_parquet(demo_run / "results/synthetic/truth/exams.parquet").set_index("exam_id")
    truth = pd.read_parquet(demo_run / "results/synthetic/truth/nodules.parquet")
    boxes = _split_table(demo_run, "nodules_fixed_bboxes")
    registered = _split_table(demo_run, "exams_registered").set_index("exam_id")
    spacing = np.array([0.703125, 0.703125, 2.5])
    assert len(boxes) == (truth["primary_series"]).sum() and not boxes["box_clipped"].any()
    for row in boxes.itertuples():
        anatomy = truth[(truth["pid"] == row.pid) & (truth["nodule_group"] == row.nodule_group)]
        pose = homogeneous(truth_exams.loc[row.fixed_exam_id, "anatomy_to_exam"])
        true_centre = (pose @ np.append(anatomy["center_anatomy"].iloc[0], 1.0))[:3]
        origin = np.asarray(registered.loc[row.fixed_exam_id, "fixed_origin"])
        index = (true_centre - origin) / spacing  # x, y, z in registered space
        mapped = origin + np.array([row.center_fixed[1], row.center_fixed[0], row.center_fixed[2]]) * spacing
        assert np.linalg.norm(mapped - true_centre) < 2.0
        i0, i1, j0, j1, k0, k1 = row.coords_fixed
        assert j0 - 0.5 <= index[0] <= j1 + 0.5 and i0 - 0.5 <= index[1] <= i1 + 0.5
        assert k0 - 0.5 <= index[2] <= k1 + 0.5
    pairs = _split_table(demo_run, "paired_nodules")
    assert (pairs["exam_idx_b"] > pairs["exam_idx_a"]).all() and (pairs["delta_days"] > 300).all()
    assert len(pairs) == len(boxes) - boxes.groupby(["pid", "nodule_group"]).ngroups


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_gathered_table(demo_run, tmp_path):
    workdir = tmp_path / "killed"
    shutil.copytree(demo_run, workdir, symlinks=True)
    folder = workdir / "results" / "registration" / "train"  # the shards' files, beside the tables they make
    target = "results/registration/train/exams_registered.parquet"
    for shard in folder.glob("[0-9][0-9][0-9].parquet"):
        shard.unlink()
    (workdir / target).unlink()
    kill_after_first_job(workdir, target, "register_shard")
    # finished = written and no longer marked incomplete (a shard killed between the two is rightly rerun)
    markers = workdir / ".snakemake" / "incomplete"
    done = sorted(p.name for p in folder.glob("[0-9][0-9][0-9].parquet")
                  if not (markers / urlsafe_b64encode(str(p.relative_to(workdir)).encode()).decode()).exists())
    assert 1 <= len(done) < 4, "the run should be killed while shards are still running"
    result = snakemake(workdir, "--cores", "2", "--rerun-incomplete", target)
    rerun = [line for line in result.stderr.splitlines() if "wildcards: split=train, shard=" in line]
    assert not any(name[:3] in line for name in done for line in rerun), "finished shards must not run again"
    assert (workdir / target).read_bytes() == (demo_run / target).read_bytes()


@pytest.fixture(scope="module")
def files_run(demo_run, tmp_path_factory):
    """The demo data as 'real' files, with one patient held back, a swapped follow-up and one with NaN voxels."""
    root = tmp_path_factory.mktemp("files")
    data = root / "data"
    shutil.copytree(demo_run / "results" / "synthetic", data, ignore=shutil.ignore_patterns("truth"))
    manifest = pd.read_csv(data / "manifest.csv", dtype={"pid": str, "exam_id": str})
    tracking = torch.load(data / "nodules.pt", weights_only=True)
    registered = _split_table(demo_run, "exams_registered")
    follow_ups = registered[~registered["is_fixed"]].drop_duplicates("pid")
    held_back, swapped, corrupted, donor = follow_ups["pid"].iloc[:4]
    by_exam = manifest.set_index("exam_id")
    swapped_exam = follow_ups.set_index("pid").loc[swapped, "exam_id"]
    donor_exam = follow_ups.set_index("pid").loc[donor, "exam_id"]
    shutil.copy(data / by_exam.loc[donor_exam, "image_path"], data / by_exam.loc[swapped_exam, "image_path"])
    corrupted_exam = follow_ups.set_index("pid").loc[corrupted, "exam_id"]
    image = read_image(data / by_exam.loc[corrupted_exam, "image_path"])
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array[array.shape[0] // 2, 100:110, 100:110] = np.nan
    geometry = Geometry(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    write_nifti(array, geometry, data / by_exam.loc[corrupted_exam, "image_path"])
    manifest[manifest["pid"] != held_back].to_csv(data / "manifest.csv", index=False)
    torch.save({pid: groups for pid, groups in tracking.items() if pid != held_back}, data / "nodules.pt")
    workdir = make_workdir(root / "run", data={"source": "files", "manifest": str(data / "manifest.csv"),
                                               "nodules": str(data / "nodules.pt")})
    snakemake(workdir, "--cores", "2", "registration")
    return {"workdir": workdir, "data": data, "manifest": manifest, "tracking": tracking, "held_back": held_back,
            "swapped": swapped_exam, "corrupted": corrupted_exam}


@pytest.mark.slow
def test_a_swapped_or_corrupted_follow_up_is_flagged_with_a_reason(files_run):
    workdir = files_run["workdir"]
    bad = pd.concat([pd.read_csv(workdir / "results/registration" / s / "bad_exams.csv", dtype=str) for s in SPLITS])
    reasons = dict(zip(bad["exam_id"], bad["reason"], strict=True))
    assert set(reasons) == {files_run["swapped"], files_run["corrupted"]}
    assert "lung similarity" in reasons[files_run["swapped"]]
    assert "NaN" in reasons[files_run["corrupted"]]
    boxes = _split_table(workdir, "nodules_fixed_bboxes")
    assert not boxes["exam"].isin(list(reasons)).any()
    assert len(boxes) > 0


@pytest.mark.slow
def test_reruns_touch_only_what_is_stale(files_run):
    workdir, data = files_run["workdir"], files_run["data"]
    nothing = snakemake(workdir, "-n", "registration")
    assert "Nothing to be done" in nothing.stdout + nothing.stderr

    # a changed QC threshold reruns QC and what follows, never registration
    config = workdir / "config" / "config.yaml"
    original = config.read_text()
    config.write_text(original.replace("min_lung_ncc: 0.7", "min_lung_ncc: 0.75"))
    plan = planned_jobs(snakemake(workdir, "-n", "registration"))
    assert plan["registration_qc"] == 3 and "register_shard" not in plan
    config.write_text(original)

    # edited annotations: once the split tables are rebuilt, no registration job is planned
    tracking = torch.load(data / "nodules.pt", weights_only=True)
    pid = next(iter(tracking))
    group = next(iter(tracking[pid]))
    lesion = next(iter(tracking[pid][group].values()))
    lesion["volume"] += 5.0
    torch.save(tracking, data / "nodules.pt")
    snakemake(workdir, "--cores", "2", "--until", "split_tables")
    plan = planned_jobs(snakemake(workdir, "-n", "registration"))
    assert "register_shard" not in plan and plan["nodule_boxes"] >= 1

    # one more patient: exactly that patient's shard is registered
    snakemake(workdir, "--cores", "2", "registration")
    held_back = files_run["held_back"]
    files_run["manifest"].to_csv(data / "manifest.csv", index=False)
    tracking[held_back] = files_run["tracking"][held_back]
    torch.save(tracking, data / "nodules.pt")
    snakemake(workdir, "--cores", "2", "--until", "split_tables")
    result = snakemake(workdir, "-n", "registration")
    assert planned_jobs(result)["register_shard"] == 1
    split = computed_split(held_back, 42, {"train": 0.7, "val": 0.1, "test": 0.2})
    shard = shard_name(shard_of(held_back, {"train": 4, "val": 1, "test": 2}[split]))
    assert f"results/registration/{split}/{shard}.parquet" in result.stdout + result.stderr


@pytest.mark.slow
def test_registered_niftis_line_up_with_their_baseline(demo_run):
    snakemake(demo_run, "--cores", "2", "registered_niftis")
    written = load_plain_pickle(demo_run / "results/registration/exam_to_nifti_transformed.pkl")
    registered = _split_table(demo_run, "exams_registered").set_index("exam_id")
    assert len(written) == 4
    for exam_id, path in written.items():
        assert (demo_run / "results/registration/qc" / f"{exam_id}.png").stat().st_size > 10_000
        follow_up = read_image(demo_run / path)
        baseline = read_image(demo_run / registered.loc[registered.loc[exam_id, "fixed_exam_id"], "image_path"])
        assert follow_up.GetSpacing() == pytest.approx((0.703125, 0.703125, 2.5))
        unregistered = read_image(demo_run / registered.loc[exam_id, "image_path"])
        a, b, c = (sitk.GetArrayFromImage(sitk.Resample(i, follow_up, sitk.Transform(), sitk.sitkLinear, -1024.0))
                   .astype(float) for i in (baseline, follow_up, unregistered))
        lungs = (a > -950) & (a < -600)
        aligned, before = np.corrcoef(a[lungs], b[lungs])[0, 1], np.corrcoef(a[lungs], c[lungs])[0, 1]
        assert aligned > 0.4 and aligned > before + 0.25, (aligned, before)
