"""Forecasting a new patient (noduleflow.evaluation.predict, `noduleflow forecast`): round trip against evaluate_run,
the
output's place in the exam's space, DICOM input, portable model files and every kind of bad input."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, config_settings, forecast_config, make_workdir, run_settings, snakemake, write_dicom_series
from noduleflow.cache.datasets import NodulePairs
from noduleflow.cache.patches import PatchSettings, cache_shard
from noduleflow.cache.segmenter import HalfMaximumSegmenter
from noduleflow.cli import main
from noduleflow.evaluation.forecast import evaluate_run
from noduleflow.evaluation.predict import (
    ForecastInputError,
    ForecastJob,
    NoduleRequest,
    cut_prior,
    forecast_requests,
    load_portable_run,
    read_exam,
    sample_forecasts,
    voxel_box,
)
from noduleflow.hu import to_hu
from noduleflow.imaging import Geometry, geometry_columns, write_nifti
from noduleflow.models.flow import VelocityNet
from noduleflow.models.tasks import patch_geometry
from noduleflow.models.training import ModelFileError, read_model, save_model
from noduleflow.registration.boxes import boxes_in_registered_space
from noduleflow.settings import from_config

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
EXAM = Geometry((56, 48, 24), (0.75, 0.75, 1.5), (-20.0, 10.0, -100.0), IDENTITY)
CENTRE_XYZ = np.array([27.0, 22.0, 11.0])  # the sphere's centre in exam voxels (x, y, z)
PATCH = {"spacing_mm": [0.9, 0.9, 2.5], "size": [16, 16, 8], "hu_window": [-2000.0, 500.0], "dtype": "float32"}
SEGMENTER = config_settings(HalfMaximumSegmenter, "segmentation")
BOX = (19, 25, 24, 30, 9, 13)  # i0 i1 j0 j1 k0 k1 around the sphere (radius 3 mm)
HPARAMS = {"spatial_dims": 3, "data_channels": 1, "interval_dim": 8, "channels": [8, 8],
           "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 8, "norm_num_groups": 4}


def _geometry(patch: dict) -> dict:
    """What a model file records of a `patch` config section."""
    return patch_geometry(from_config(PatchSettings, patch))


def sphere_exam(radius_mm: float = 3.0) -> np.ndarray:
    """An int16 exam [z, y, x] on EXAM: parenchyma at -850 HU with mild texture, a 40 HU sphere at CENTRE_XYZ."""
    z, y, x = np.indices(tuple(reversed(EXAM.shape)))
    spacing = np.asarray(EXAM.spacing)
    distance = np.sqrt(sum(((c - c0) * s) ** 2 for c, c0, s in zip((x, y, z), CENTRE_XYZ, spacing, strict=True)))
    texture = np.random.default_rng(0).normal(0.0, 20.0, distance.shape)
    return np.where(distance <= radius_mm, 40.0, -850.0 + texture).astype(np.int16)


def save_run(path, run, seed=7, perturb=True, patch=PATCH) -> None:
    """A run of the tiny net in the portable format; `perturb` moves every weight so the velocity is not zero."""
    hparams = {**HPARAMS, "prior_channels": 0 if run["formulation"] == "bridge" else 1}
    torch.manual_seed(0)
    net = VelocityNet(hparams)
    if perturb:
        with torch.no_grad():
            for parameter in net.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    save_model(path, net, {**hparams, "run": run},
               meta={"patch": _geometry(patch), "sampler": {"method": "heun", "steps": 2}, "seed": seed})


NOISY = run_settings(space="raw", formulation="noisy_prior", start_noise=0.5, interval=True).record()
BRIDGE = run_settings(space="raw", formulation="bridge", interval=True).record()


def job(samples=2, seed=7) -> ForecastJob:
    return ForecastJob(samples, forecast_config(samples=samples, steps=2, seed=seed), SEGMENTER)


def one_pair_cache(tmp_path, prior_path, follow_up_path) -> NodulePairs:
    """The patch cache of one pair (prior = baseline, follow-up in the same space), cut by the pipeline's code."""
    columns = {**geometry_columns("fixed", EXAM), **geometry_columns("original", EXAM)}
    exams = pd.DataFrame([{"exam_id": exam_id, "qc_pass": True, "fixed_exam_id": "e0", "days_since_baseline": days,
                           "fixed_to_moving": [1.0, 0, 0, 0, 0, 1.0, 0, 0, 0, 0, 1.0, 0], "shard": 0,
                           "image_path": str(path), **columns}
                          for exam_id, days, path in (("e0", 0.0, prior_path), ("e1", 400.0, follow_up_path))])
    centre = {"center_i": (BOX[0] + BOX[1]) // 2, "center_j": (BOX[2] + BOX[3]) // 2,
              "center_k": (BOX[4] + BOX[5]) // 2}
    tracking = pd.DataFrame([{"pid": "p0", "nodule_group": 1, "exam": exam_id, "exam_idx": idx, "coords": list(BOX),
                              **centre} for idx, exam_id in enumerate(("e0", "e1"))])
    nodules = boxes_in_registered_space(exams, tracking, PATCH["spacing_mm"])
    index, skipped = cache_shard(exams=exams, nodules=nodules, split="test", shard=0,
                                 settings=from_config(PatchSettings, PATCH), patch_file=tmp_path / "000.npy",
                                 slice_file=tmp_path / "000_slices.npy")
    assert skipped.empty
    index.to_parquet(tmp_path / "index.parquet")
    pairs = pd.DataFrame({"pid": ["p0"], "nodule_group": [1], "exam_a": ["e0"], "exam_idx_a": [0],
                          "exam_b": ["e1"], "exam_idx_b": [1], "delta_days": [400.0]})
    return NodulePairs(tmp_path, pairs)


def test_a_test_pair_forecast_from_its_prior_exam_equals_its_evaluation_forecast(tmp_path):
    prior_path, follow_up_path = tmp_path / "e0.nii.gz", tmp_path / "e1.nii.gz"
    write_nifti(sphere_exam(3.0), EXAM, prior_path)
    write_nifti(sphere_exam(4.0), EXAM, follow_up_path)
    save_run(tmp_path / "model.pt", NOISY)
    raw = one_pair_cache(tmp_path, prior_path, follow_up_path)
    settings = forecast_config(samples=2, steps=2, examples=1, seed=7)
    evaluation = evaluate_run(model_path=tmp_path / "model.pt", raw=raw, model_data=raw, decode=None,
                              patch=from_config(PatchSettings, PATCH), segmenter=SEGMENTER, settings=settings,
                              run_name="noisy")

    run = load_portable_run(tmp_path / "model.pt")
    request = NoduleRequest("n1", str(prior_path), (400.0,), box=BOX)
    image = read_exam(prior_path)
    prior = cut_prior(image, *voxel_box(request, EXAM), run)
    np.testing.assert_array_equal(prior.image, raw[0]["prior"][0].numpy())  # the cache's patch, bit for bit
    # one forecast at a time, as evaluate_run draws them for a one-pair test split: its forecast, bit for bit
    samples = sample_forecasts(run, prior, 400.0, 0, 2, dataclasses.replace(settings, batch_size=1))
    np.testing.assert_array_equal(samples[0], evaluation.examples[0]["generated"])
    batched = sample_forecasts(run, prior, 400.0, 0, 2, settings)  # both samples in one batch: float rounding only
    np.testing.assert_allclose(batched, samples, atol=1e-5)
    assert not np.array_equal(samples[0], samples[1])  # each sample its own noise

    table = forecast_requests(run, [request], job(), tmp_path / "out", tmp_path / "out.csv")
    written = nib.load(table.at[0, "samples_file"]).get_fdata().transpose(3, 2, 1, 0)  # (n, z, y, x) HU
    np.testing.assert_allclose(written, to_hu(batched, run.patch.hu_window), atol=1e-3)
    row = table.iloc[0]
    assert row["size_q10"] <= row["size_q50"] <= row["size_q90"] and row["error"] == ""


def test_the_forecast_nifti_overlays_the_exam_and_sizes_match_the_sphere(tmp_path):
    """An untrained bridge run returns its start (MONAI zero-initialises the output), so the forecast is the
    prior patch: the sphere must sit at its world position in the written NIfTI, with its volume."""
    write_nifti(sphere_exam(3.0), EXAM, tmp_path / "exam.nii.gz")
    save_run(tmp_path / "model.pt", BRIDGE, perturb=False)
    run = load_portable_run(tmp_path / "model.pt")
    world = EXAM.matrix() @ np.r_[CENTRE_XYZ, 1.0]
    request = NoduleRequest("n1", str(tmp_path / "exam.nii.gz"), (365.0, 730.0), centre=tuple(world[:3]),
                            world=True, diameter_mm=8.0)
    table = forecast_requests(run, [request], job(), tmp_path / "out", tmp_path / "out.csv")
    assert list(table["days"]) == [365.0, 730.0] and table["error"].eq("").all()
    median = nib.load(table.at[0, "median"])
    hu = median.get_fdata()  # (x, y, z)
    index = np.argwhere(hu > -400).mean(axis=0)
    ras = median.affine @ np.r_[index, 1.0]
    lps = ras[:3] * [-1.0, -1.0, 1.0]
    assert np.all(np.abs(lps - world[:3]) <= np.asarray(PATCH["spacing_mm"]))  # within one voxel per axis
    sphere = 4 / 3 * np.pi * 3.0 ** 3
    assert table.at[0, "prior_size"] == pytest.approx(sphere, rel=0.25)
    assert table.at[0, "prior_forecast_size"] == pytest.approx(sphere, rel=0.25)
    assert table.at[0, "size_q50"] == table.at[0, "size_q90"] == table.at[0, "prior_forecast_size"]
    assert (tmp_path / "out" / "n1" / "365d_card.png").read_bytes().startswith(b"\x89PNG")
    assert nib.load(table.at[0, "samples_file"]).shape == (16, 16, 8, 1)  # the bridge samples once


def test_a_dicom_folder_gives_the_same_forecast_as_its_nifti(tmp_path):
    volume = sphere_exam(3.0)
    write_nifti(volume, EXAM, tmp_path / "exam.nii.gz")
    positions = [np.asarray(EXAM.origin) + [0.0, 0.0, k * EXAM.spacing[2]] for k in range(EXAM.shape[2])]
    write_dicom_series(tmp_path / "dicom", volume, positions, pixel_spacing=(0.75, 0.75))
    save_run(tmp_path / "model.pt", NOISY)
    run = load_portable_run(tmp_path / "model.pt")
    tables = [forecast_requests(run, [NoduleRequest("n1", str(tmp_path / source), (200.0,), box=BOX)], job(),
                                tmp_path / f"out_{source}", tmp_path / f"{source}.csv")
              for source in ("exam.nii.gz", "dicom")]
    for name in ("prior", "samples_file"):
        np.testing.assert_array_equal(*(nib.load(t.at[0, name]).get_fdata() for t in tables))
        np.testing.assert_array_equal(*(nib.load(t.at[0, name]).affine for t in tables))
    assert tables[0].at[0, "size_q50"] == tables[1].at[0, "size_q50"]


def test_boxes_in_world_millimetres_and_voxels_agree(tmp_path):
    low, high = EXAM.matrix() @ [BOX[2], BOX[0], BOX[4], 1.0], EXAM.matrix() @ [BOX[3], BOX[1], BOX[5], 1.0]
    world = tuple(v for pair in zip(low[:3], high[:3], strict=True) for v in pair)
    assert voxel_box(NoduleRequest("a", "x", (1.0,), box=world, world=True), EXAM)[0] == list(BOX)
    assert voxel_box(NoduleRequest("a", "x", (1.0,), box=BOX), EXAM)[0] == list(BOX)


@pytest.mark.parametrize("request_values, message", [
    ({"box": (19, 25, 24, 30, 20, 26)}, "not inside the image"),
    ({"box": (-3, 2, 24, 30, 9, 13)}, "not inside the image"),
    ({"centre": (1000.0, 0.0, 0.0), "world": True}, "not inside the image"),
])
def test_a_box_outside_the_image_is_refused(request_values, message):
    with pytest.raises(ForecastInputError, match=message):
        voxel_box(NoduleRequest("n1", "exam.nii.gz", (365.0,), **request_values), EXAM)


@pytest.mark.parametrize("values", [{"box": (1, 2, 3, 4, 5)}, {"box": (1, 2, 3, 4, 5, float("nan"))},
                                    {"centre": (1.0, 2.0)}, {}, {"box": BOX, "centre": (1.0, 2.0, 3.0)}])
def test_a_malformed_box_or_centre_is_refused(values):
    with pytest.raises(ForecastInputError, match="finite values|either a box or a centre"):
        NoduleRequest("n1", "exam.nii.gz", (365.0,), **values)


@pytest.mark.parametrize("days", [0.0, -30.0, 3653.0, 20000.0])
def test_an_interval_outside_zero_to_ten_years_is_refused(days):
    with pytest.raises(ForecastInputError, match=f"interval of {days:g} days"):
        NoduleRequest("n1", "exam.nii.gz", (365.0, days), box=BOX)


def test_missing_altered_old_and_mismatched_model_files_are_refused(tmp_path):
    with pytest.raises(ModelFileError, match="model file not found"):
        load_portable_run(tmp_path / "missing.pt")
    save_run(tmp_path / "model.pt", NOISY)
    stored = torch.load(tmp_path / "model.pt", weights_only=True)
    name = next(iter(stored["state_dict"]))
    stored["state_dict"][name] = stored["state_dict"][name] + 1e-3  # one tensor changed, the checksum kept
    torch.save(stored, tmp_path / "altered.pt")
    with pytest.raises(ModelFileError, match="altered or damaged"):
        load_portable_run(tmp_path / "altered.pt")
    torch.save({"hparams": stored["hparams"], "state_dict": stored["state_dict"]}, tmp_path / "old.pt")
    with pytest.raises(ModelFileError, match="format 1"):
        read_model(tmp_path / "old.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="not a readable model file"):
        read_model(tmp_path / "junk.pt")
    other = {**PATCH, "size": [32, 32, 8], "spacing_mm": [0.7, 0.7, 2.5]}
    mismatch = r"spacing_mm \[0.9, 0.9, 2.5\] in the model, \[0.7, 0.7, 2.5\] expected; size \[16, 16, 8\]"
    with pytest.raises(ModelFileError, match=mismatch):
        load_portable_run(tmp_path / "model.pt", expected_patch=other)
    assert load_portable_run(tmp_path / "model.pt", expected_patch=PATCH).patch.size == (16, 16, 8)


def test_the_command_reports_bad_input_without_a_traceback_and_forecasts_the_good_rows(tmp_path, capsys):
    write_nifti(sphere_exam(3.0), EXAM, tmp_path / "exam.nii.gz")
    save_run(tmp_path / "model.pt", NOISY)
    out = str(tmp_path / "out")
    assert main(["forecast", "--model", str(tmp_path / "nope.pt"), "--image", "exam.nii.gz", "--box",
                 *map(str, BOX), "--days", "365", "--out", out]) == 2
    assert "model file not found" in capsys.readouterr().err
    assert main(["forecast", "--model", str(tmp_path / "model.pt"), "--image", str(tmp_path / "exam.nii.gz"),
                 "--box", *map(str, BOX), "--days", "0", "--out", out]) == 2
    assert "interval of 0 days" in capsys.readouterr().err
    pd.DataFrame({"name": ["good", "outside", "nofile", "baddays"], "image": ["exam.nii.gz", "exam.nii.gz",
                  "missing.nii.gz", "exam.nii.gz"], "days": ["365 730", "365", "365", "-1"],
                  "box": [" ".join(map(str, BOX)), "0 5 0 5 30 32", " ".join(map(str, BOX)),
                          " ".join(map(str, BOX))]}).to_csv(tmp_path / "nodules.csv", index=False)
    assert main(["forecast", "--model", str(tmp_path / "model.pt"), "--table", str(tmp_path / "nodules.csv"),
                 "--samples", "3", "--out", out]) == 1
    table = pd.read_csv(tmp_path / "out" / "forecasts.csv").fillna({"error": ""})
    good = table[table["name"] == "good"]
    assert list(good["days"]) == [365.0, 730.0] and good["samples"].eq(3).all() and good["error"].eq("").all()
    errors = " ".join(table["error"])
    assert "not inside the image" in errors and "missing.nii.gz: exam image not found" in errors
    assert "interval of -1 days" in errors


def test_a_folder_with_several_series_needs_a_series_uid(tmp_path):
    volume = sphere_exam(3.0)[:4]
    positions = [np.asarray(EXAM.origin) + [0.0, 0.0, k * 1.5] for k in range(4)]
    write_dicom_series(tmp_path / "dicom", volume, positions, series_uid="1.2.3.1")
    write_dicom_series(tmp_path / "dicom" / "b", volume, positions, series_uid="1.2.3.2")
    with pytest.raises(ForecastInputError, match="2 image series"):
        read_exam(tmp_path / "dicom")
    assert read_exam(tmp_path / "dicom", "1.2.3.2").GetSize() == (56, 48, 4)


def test_a_latent_run_carries_its_vae_and_a_slice_run_forecasts_one_slice(tmp_path):
    from noduleflow.models.vae import build_vae

    write_nifti(sphere_exam(3.0), EXAM, tmp_path / "exam.nii.gz")
    vae_hparams = {"spatial_dims": 3, "channels": [4, 4], "latent_channels": 2, "num_res_blocks": 1,
                   "norm_num_groups": 2}
    torch.manual_seed(0)
    save_model(tmp_path / "vae.pt", build_vae(vae_hparams), vae_hparams, meta={"patch": _geometry(PATCH)})
    run = {**NOISY, "space": "latent"}
    hparams = {**HPARAMS, "data_channels": 2, "prior_channels": 2}
    meta = {"patch": _geometry(PATCH), "sampler": {"method": "euler", "steps": 2}, "seed": 3}
    save_model(tmp_path / "latent.pt", VelocityNet(hparams), {**hparams, "run": run}, meta=meta,
               vae=read_model(tmp_path / "vae.pt"))
    portable = load_portable_run(tmp_path / "latent.pt")
    assert portable.vae is not None and portable.seed == 3
    table = forecast_requests(portable, [NoduleRequest("n1", str(tmp_path / "exam.nii.gz"), (90.0,), box=BOX)],
                              job(), tmp_path / "latent", tmp_path / "latent.csv")
    assert nib.load(table.at[0, "samples_file"]).shape == (16, 16, 8, 2) and table.at[0, "error"] == ""

    other = {**PATCH, "size": [32, 32, 8]}
    save_model(tmp_path / "vae32.pt", build_vae(vae_hparams), vae_hparams, meta={"patch": _geometry(other)})
    save_model(tmp_path / "mixed.pt", VelocityNet(hparams), {**hparams, "run": run}, meta=meta,
               vae=read_model(tmp_path / "vae32.pt"))
    with pytest.raises(ModelFileError, match=r"VAE size \[32, 32, 8\], run \[16, 16, 8\]"):
        load_portable_run(tmp_path / "mixed.pt")

    slice_hparams = {**HPARAMS, "spatial_dims": 2, "prior_channels": 0}
    save_model(tmp_path / "slices.pt", VelocityNet(slice_hparams),
               {**slice_hparams, "run": {**BRIDGE, "space": "slices"}}, meta=meta)
    table = forecast_requests(load_portable_run(tmp_path / "slices.pt"),
                              [NoduleRequest("n1", str(tmp_path / "exam.nii.gz"), (90.0,), box=BOX)], job(),
                              tmp_path / "slices", tmp_path / "slices.csv")
    assert table.at[0, "unit"] == "mm^2" and table.at[0, "error"] == ""
    median = nib.load(table.at[0, "median"])
    assert median.shape == (16, 16, 1)
    offset = abs(median.affine[2, 3] - (EXAM.origin[2] + CENTRE_XYZ[2] * EXAM.spacing[2]))  # slice to sphere centre
    assert offset <= PATCH["spacing_mm"][2]  # the cache's slice: the patch slice through the box centre
    assert table.at[0, "prior_size"] == pytest.approx(np.pi * (3.0 ** 2 - offset ** 2), rel=0.15)


@pytest.mark.slow
def test_the_forecast_target_forecasts_the_config_table_and_refuses_a_model_of_another_patch(tmp_path):
    """`snakemake forecast` with a run's model file in place (only the forecast rules may run)."""
    patch = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["patch"]
    workdir = make_workdir(tmp_path / "work", forecast={"run": "raw3d_bridge", "table": "nodules.csv", "samples": 2},
                           models={"sampler": {"method": "euler", "steps": 2}})
    write_nifti(sphere_exam(3.0), EXAM, workdir / "exams" / "exam.nii.gz")
    pd.DataFrame({"name": ["n1"], "image": ["exams/exam.nii.gz"], "days": ["180 365"],
                  "box": [" ".join(map(str, BOX))]}).to_csv(workdir / "nodules.csv", index=False)
    model = workdir / "results" / "models" / "runs" / "raw3d_bridge" / "model.pt"
    save_run(model, BRIDGE, patch={**patch, "size": [32, 32, 8]})
    only = ("--cores", "1", "--allowed-rules", "forecast_patients", "forecast")
    failed = snakemake(workdir, "forecast", *only, check=False)
    assert failed.returncode != 0
    log = (workdir / "logs" / "forecast" / "forecast_patients_raw3d_bridge.log").read_text()
    assert "trained for another patch: size [32, 32, 8] in the model, [64, 64, 16] expected" in log
    save_run(model, BRIDGE, patch=patch)
    snakemake(workdir, "forecast", *only)
    table = pd.read_csv(workdir / "results" / "forecast" / "raw3d_bridge" / "forecasts.csv")
    assert list(table["days"]) == [180.0, 365.0] and table["samples"].eq(1).all()  # a bridge samples once
    assert nib.load(workdir / table.at[0, "median"]).shape == (64, 64, 16)  # paths relative to the workdir
    assert (workdir / "results" / "forecast" / "raw3d_bridge" / "nodules" / "n1" / "365d_card.png").exists()
