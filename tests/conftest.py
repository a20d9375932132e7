"""Shared test helpers: tiny NIfTI images, manifests, and running the workflow through Snakemake's CLI."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml

from noduleflow.imaging import Geometry, write_nifti
from noduleflow.settings import from_config, section

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())  # the one source of default settings
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def config_settings(cls, key: str, **overrides):
    """Settings `cls` from the default config's section `key` (dotted for a nested one: "registration.qc"; the keys
    `cls` reads), with `overrides`."""
    values = CONFIG
    for part in key.split("."):
        values = values[part]
    return from_config(cls, section(cls, values), **overrides)


def registration_settings(**overrides):
    """The default config's registration settings (`registration.method`, `.threads`, the seed), with `overrides`."""
    from noduleflow.registration.rigid import RegistrationSettings

    return config_settings(RegistrationSettings, "registration.method",
                           **{"threads": CONFIG["registration"]["threads"], "seed": CONFIG["seed"], **overrides})


def forecast_config(**overrides):
    """Forecast settings of the default config (`evaluation`, `models.sampler`, seed 0), with `overrides`."""
    from noduleflow.evaluation.forecast import forecast_settings

    return dataclasses.replace(forecast_settings(CONFIG["evaluation"], CONFIG["models"]["sampler"], 0), **overrides)


def run_settings(**overrides):
    """A paired run's settings: the default config's first run (with `models.sigma`), with `overrides`."""
    from noduleflow.models.settings import RunSettings

    models = CONFIG["models"]
    return from_config(RunSettings, {**next(iter(models["runs"].values())), "sigma": models["sigma"], **overrides})


def write_volume(path: Path, shape_xyz=(20, 16, 60), spacing=(0.7, 0.7, 2.0), value: int = -800) -> Geometry:
    """Write a small constant int16 volume and return its geometry."""
    geometry = Geometry(tuple(shape_xyz), tuple(spacing), (-10.0, -20.0, 30.0), IDENTITY)
    write_nifti(np.full(tuple(reversed(shape_xyz)), value, dtype=np.int16), geometry, path)
    return geometry


def manifest_row(pid: str, timepoint: int, series: str, thickness: float = 2.0, **extra) -> dict:
    """One manifest row whose exam id follows the NLST rule's spirit (pid + timepoint + series tag)."""
    row = {
        "pid": pid, "exam_id": f"{pid}{timepoint}{series}", "screen_timepoint": timepoint,
        "days_since_baseline": 365.0 * timepoint + 3, "series_uid": f"1.2.3.{pid}.{timepoint}.{series}",
        "slice_thickness": thickness, "image_path": f"images/{pid}_{timepoint}_{series}.nii.gz",
    }
    row.update(extra)
    return row


def make_manifest(folder: Path, rows: list[dict], images: bool = True) -> Path:
    """Write a manifest CSV (and, by default, a small image for each row) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    if images:
        for row in rows:
            write_volume(folder / row["image_path"])
    path = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def lesion(exam: str, coords=(5, 7, 4, 6, 10, 12), volume: float = 42.0) -> dict:
    """A lesion dict in the tracking-file layout."""
    return {
        "exam": exam, "nodid_in_segmentation": 1.0, "volume": volume, "abnid_in_nlst": [1], "coords": list(coords),
        "center": [(coords[0] + coords[1]) // 2, (coords[2] + coords[3]) // 2, (coords[4] + coords[5]) // 2],
        "centers_in_past_exam_ijk_space": None, "coords_in_past_exam_ijk_space": None, "abn_prexist": False,
        "screen_detected": True,
    }


def snakemake(workdir: Path, *args: str, check: bool = True, snakefile: Path = REPO / "Snakefile"
              ) -> subprocess.CompletedProcess:
    """Run the workflow through Snakemake's CLI in `workdir` (which holds config/config.yaml)."""
    command = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(workdir), *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def planned_jobs(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Job counts per rule from a dry-run's job stats (the target rule `all` left out); {} if nothing to do."""
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    stats = text[text.index("Job stats:"):].split("\n\n")[0].splitlines()[3:]
    return {name: int(count) for name, count in (line.split() for line in stats)
            if name not in ("total", "all")}


def kill_after_first_job(workdir: Path, target: str, rule: str) -> None:
    """Start the workflow towards `target`, SIGKILL it once a first `rule` job has finished, unlock the folder."""
    logs = workdir / ".snakemake" / "log"
    earlier = set(logs.glob("*.log"))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--cores", "2", target]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # finished, not just started: Snakemake has logged the job's end
        if any(f"(Rule: {rule})" in p.read_text() for p in set(logs.glob("*.log")) - earlier):
            break
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    snakemake(workdir, "--unlock")  # a SIGKILL leaves Snakemake's lock behind


def reconstruction_errors(vae, stack) -> tuple[float, float]:
    """Mean squared error of a VAE's reconstructions (from the encoder mean) of `stack`, and of its mean image."""
    import torch

    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(stack)[0])
    return (reconstruction - stack).pow(2).mean().item(), (stack.mean(0, keepdim=True) - stack).pow(2).mean().item()


def make_workdir(folder: Path, quick_models: bool = False, **overrides) -> Path:
    """A working directory with the default config, updated by `overrides` (top-level keys merged one level).

    quick_models: train every model for a few steps only (the tests check wiring and falling losses).
    """
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    if quick_models:
        models = config["models"]
        vaes = [models["vae"], models["vae_volumes"]]
        for section in [*vaes, *models["pretrain"].values(), *models["runs"].values()]:
            section["training"].update(steps=30, checkpoint_every=15, log_every=10)
        for section in vaes:
            section["training"]["steps"] = 60  # the latent models and the VAE tests need a VAE that works
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) \
            else value
    (folder / "config").mkdir(parents=True, exist_ok=True)
    (folder / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


# A cohort small enough for CI (2 cores) that still has every feature of the default one.
SMALL_COHORT = {
    "n_patients": 10,
    "seed": 11,
    "fov_mm": [220.0, 180.0, 130.0],
    "pixel_spacing_mm": [0.7, 0.8],
}


def pytest_collection_modifyitems(items):
    """A test that needs the demo run is slow: `pytest -m "not slow"` (the fast tier) must never start it."""
    unmarked = [item.nodeid for item in items
                if "demo_run" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError(f"tests using demo_run must be marked slow: {', '.join(unmarked)}")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """The workflow's default target run once on a small synthetic cohort; returns its working directory."""
    workdir = make_workdir(tmp_path_factory.mktemp("demo"), quick_models=True, synthetic=SMALL_COHORT)
    snakemake(workdir, "--cores", "2")
    return workdir



def write_dicom_series(folder: Path, raw_zyx: np.ndarray, positions, orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                       pixel_spacing=(0.8, 0.7), series_uid: str = "1.2.826.0.1.3680043.9.7.1", slope: float = 1.0,
                       intercept: float = 0.0, image_type=("ORIGINAL", "PRIMARY", "AXIAL"), seed: int = 0) -> None:
    """Write slice k of an int16 array at ImagePositionPatient positions[k] as CT DICOM files, under shuffled names."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    names = np.random.default_rng(seed).permutation(len(raw_zyx))
    study = f"{series_uid}.0"
    for k, pixels in enumerate(raw_zyx):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = f"{series_uid}.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series_uid, study
        ds.PatientID, ds.PatientName, ds.Modality, ds.StudyDate, ds.StudyTime = "100001", "Test^Phantom", "CT", \
            "20240101", "120000"
        ds.SeriesNumber, ds.AcquisitionNumber, ds.InstanceNumber = 2, 1, k + 1
        ds.ImageType = list(image_type)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
        ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
        ds.SliceThickness = "1.0"
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
        ds.save_as(folder / f"IM{names[k]:04d}", enforce_file_format=True)
