"""DICOM to NIfTI: voxel values and world positions against the DICOM headers and against dcm2niix; bad series."""

import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from conftest import make_manifest, manifest_row, write_dicom_series
from noduleflow.imaging import read_geometry
from noduleflow.metadata.dicom import DicomSeriesError, convert_manifest, convert_series, read_series
from noduleflow.metadata.manifest import build_exam_series

UID = "1.2.826.0.1.3680043.9.7.1"
TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent
REAL_SERIES = TEST_FILES / "dicomdirtests" / "98892001" / "CT5N"  # 5 real axial CT slices, 2.5 mm apart
REAL_LOCALIZERS = TEST_FILES / "dicomdirtests" / "98892001" / "CT2N"  # 2 real LOCALIZER images
REAL_GAP = TEST_FILES / "dicomdirtests" / "77654033" / "CT2"  # 4 real slices: one 202.5 mm before 3 at 1.25 mm


@pytest.fixture(scope="module")
def dcm2niix() -> str:
    """The dcm2niix executable; installed with apt-get (Debian package dcm2niix) when missing and running as root."""
    if shutil.which("dcm2niix") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "dcm2niix"]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
            subprocess.run(install, env=env, capture_output=True)
    path = shutil.which("dcm2niix")
    if path is None:
        pytest.skip("dcm2niix is not installed and could not be installed (needs root and apt-get): "
                    "the comparison with dcm2niix did not run")
    return path


def _truth(files) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel of the given DICOM files: its LPS position (N, 3) and its HU, straight from the standard."""
    worlds, values = [], []
    for path in files:
        ds = pydicom.dcmread(path)
        row, column = np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
        r, c = np.indices((ds.Rows, ds.Columns)).reshape(2, -1)
        dy, dx = (float(v) for v in ds.PixelSpacing)
        worlds.append(np.array(ds.ImagePositionPatient, float) + np.outer(c * dx, row) + np.outer(r * dy, column))
        values.append(ds.pixel_array.ravel() * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0)))
    return np.concatenate(worlds), np.concatenate(values)


def _lookup(path: Path, worlds_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Values of a NIfTI file's voxels nearest to LPS points, those voxels' centres (LPS) and their indices."""
    image = nib.load(path)
    flip = np.array([-1.0, -1.0, 1.0])
    continuous = (np.linalg.inv(image.affine) @ np.c_[worlds_lps * flip, np.ones(len(worlds_lps))].T)[:3]
    index = np.rint(continuous).astype(int)
    assert (index >= 0).all() and (index < np.array(image.shape)[:, None]).all()
    centres = ((image.affine[:3, :3] @ index).T + image.affine[:3, 3]) * flip
    return image.get_fdata()[tuple(index)], centres, index


def _run_dcm2niix(executable: str, folder: Path, out: Path) -> Path:
    out.mkdir()
    subprocess.run([executable, "-z", "y", "-b", "n", "-f", "series", "-o", str(out), str(folder)], check=True,
                   capture_output=True)
    (result,) = out.glob("series*.nii.gz")
    return result


def _compare(tmp_path: Path, dcm2niix: str, folder: Path, series_uid: str, files) -> dict[str, float]:
    """Convert with noduleflow and with dcm2niix; check both against the DICOM truth voxel by voxel."""
    ours = tmp_path / "ours.nii.gz"
    convert_series(folder, series_uid, ours)
    theirs = _run_dcm2niix(dcm2niix, folder, tmp_path / "dcm2niix")
    worlds, hu = _truth(files)
    ours_values, ours_centres, ours_index = _lookup(ours, worlds)
    theirs_values, theirs_centres, _ = _lookup(theirs, worlds)
    assert nib.load(ours).shape == nib.load(theirs).shape
    assert len({tuple(i) for i in ours_index.T}) == len(hu) == np.prod(nib.load(ours).shape)  # one voxel per pixel
    return {
        "value_vs_truth": float(np.abs(ours_values - hu).max()),
        "value_vs_dcm2niix": float(np.abs(ours_values - theirs_values).max()),
        "mm_vs_truth": float(np.linalg.norm(ours_centres - worlds, axis=1).max()),
        "mm_vs_dcm2niix": float(np.linalg.norm(ours_centres - theirs_centres, axis=1).max()),
    }


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    out = np.eye(3)
    out[i, i], out[i, j], out[j, i], out[j, j] = c, -s, s, c
    return out


ORIENTATIONS = {
    "axial": np.eye(3),
    "left_right_flipped": np.diag([-1.0, -1.0, 1.0]),
    "rows_along_y": np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]),  # slice normal towards feet
    "rotated_and_tilted": _rotation(0, 12.0) @ _rotation(2, 30.0),
}


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize(("order", "slope", "intercept"), [("head_first", 1.0, -1024.0), ("feet_first", 2.0, -1000.0),
                                                           ("head_first", 0.5, -1024.25)])
def test_synthetic_series_match_the_headers_and_dcm2niix(tmp_path, dcm2niix, orientation, order, slope, intercept):
    axes = ORIENTATIONS[orientation]  # columns: row direction, column direction, normal
    raw = np.random.default_rng(7).integers(0, 1500, size=(6, 7, 9)).astype(np.int16)  # no symmetry to hide a flip
    step = 2.5 if order == "feet_first" else -2.5
    positions = [np.array([-40.0, 25.0, -110.0]) + k * step * axes[:, 2] for k in range(len(raw))]
    folder = tmp_path / "dicom"
    write_dicom_series(folder, raw, positions, orientation=(*axes[:, 0], *axes[:, 1]), slope=slope,
                       intercept=intercept, series_uid=UID)
    differences = _compare(tmp_path, dcm2niix, folder, UID, sorted(folder.iterdir()))
    exact = float(slope).is_integer() and float(intercept).is_integer()
    assert differences["value_vs_truth"] <= (0 if exact else 1e-3)
    assert differences["value_vs_dcm2niix"] <= (0 if exact else 1e-3)
    assert differences["mm_vs_truth"] < 1e-3 and differences["mm_vs_dcm2niix"] < 1e-3
    geometry = read_geometry(tmp_path / "ours.nii.gz")
    assert geometry.shape == (9, 7, 6) and np.allclose(geometry.spacing, (0.7, 0.8, 2.5), atol=1e-5)
    assert nib.load(tmp_path / "ours.nii.gz").get_data_dtype() == (np.int16 if exact else np.float32)


def test_real_pydicom_ct_series_matches_the_headers_and_dcm2niix_and_its_localizers_are_left_out(tmp_path, dcm2niix):
    folder = tmp_path / "exam"
    shutil.copytree(REAL_SERIES, folder / "CT5N")
    shutil.copytree(REAL_LOCALIZERS, folder / "CT2N")
    uid = str(pydicom.dcmread(next(REAL_SERIES.iterdir())).SeriesInstanceUID)
    only_series = tmp_path / "series"
    shutil.copytree(REAL_SERIES, only_series)
    ours = tmp_path / "from_exam.nii.gz"
    convert_series(folder, uid, ours)
    differences = _compare(tmp_path, dcm2niix, only_series, uid, sorted(REAL_SERIES.iterdir()))
    assert differences == {"value_vs_truth": 0.0, "value_vs_dcm2niix": 0.0, "mm_vs_truth": pytest.approx(0, abs=1e-3),
                           "mm_vs_dcm2niix": pytest.approx(0, abs=1e-3)}
    assert np.array_equal(nib.load(ours).get_fdata(), nib.load(tmp_path / "ours.nii.gz").get_fdata())
    assert read_geometry(ours).shape == (16, 16, 5) and read_geometry(ours).spacing[2] == pytest.approx(2.5)

    localizer_uid = str(pydicom.dcmread(next(REAL_LOCALIZERS.iterdir())).SeriesInstanceUID)
    with pytest.raises(DicomSeriesError, match="0 axial image"):
        read_series(folder, localizer_uid)


def test_a_localizer_inside_the_series_is_dropped(tmp_path):
    raw = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    positions = [(0.0, 0.0, 2.0 * k) for k in range(4)]
    write_dicom_series(tmp_path / "clean", raw, positions, series_uid=UID)
    write_dicom_series(tmp_path / "mixed", raw, positions, series_uid=UID)
    scout = np.full((1, 5, 6), 999, dtype=np.int16)
    write_dicom_series(tmp_path / "mixed" / "scout", scout, [(0.0, -200.0, 300.0)], series_uid=UID,
                       orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    clean, clean_geometry = read_series(tmp_path / "clean", UID)
    mixed, mixed_geometry = read_series(tmp_path / "mixed", UID)
    assert mixed.shape == (4, 5, 6) and np.array_equal(mixed, raw) and np.array_equal(mixed, clean)
    assert mixed_geometry == clean_geometry


def test_real_single_slice_is_refused_as_not_a_volume(tmp_path):
    shutil.copy(TEST_FILES / "CT_small.dcm", tmp_path)
    uid = str(pydicom.dcmread(TEST_FILES / "CT_small.dcm").SeriesInstanceUID)
    with pytest.raises(DicomSeriesError, match="1 axial image.*not a volume"):
        read_series(tmp_path, uid)


def test_real_series_with_a_gap_is_refused(tmp_path):
    uid = str(pydicom.dcmread(next(REAL_GAP.iterdir())).SeriesInstanceUID)
    with pytest.raises(DicomSeriesError, match=r"gap: about 161 slice\(s\) missing .*step 1.250 mm"):
        read_series(REAL_GAP, uid)


@pytest.mark.parametrize(("z", "shift", "message"), [
    ([0.0, 2.0, 2.0, 4.0, 6.0], 0.0, "1 duplicate slice position"),
    ([0.0, 2.0, 4.0, 8.0, 10.0], 0.0, r"gap: about 1 slice\(s\) missing"),
    ([0.0, 2.0, 4.0, 6.6, 8.6], 0.0, "non-uniform slice spacing"),
    ([0.0, 2.0, 4.0, 6.0, 8.0], 0.5, "gantry tilt"),
])
def test_bad_slice_stacks_are_refused_with_the_reason(tmp_path, z, shift, message):
    raw = np.zeros((len(z), 4, 4), dtype=np.int16)
    write_dicom_series(tmp_path, raw, [(0.0, shift * k, zk) for k, zk in enumerate(z)], series_uid=UID)
    with pytest.raises(DicomSeriesError, match=message):
        read_series(tmp_path, UID)


def test_unknown_series_lists_what_the_folder_holds(tmp_path):
    write_dicom_series(tmp_path, np.zeros((2, 4, 4), np.int16), [(0, 0, 0), (0, 0, 1)], series_uid=UID)
    (tmp_path / "notes.txt").write_text("not DICOM")
    with pytest.raises(DicomSeriesError, match=rf"not found .*found: {UID} \(2 files\)"):
        read_series(tmp_path, "1.2.3")


def test_manifest_exams_given_as_dicom_folders_are_converted_and_bad_ones_reported(tmp_path):
    rows = [manifest_row("100001", 0, "a"),
            manifest_row("100001", 1, "d", image_path="dicom/good", series_uid=f"{UID}.11"),
            manifest_row("100002", 0, "d", image_path="dicom/gap", series_uid=f"{UID}.20"),
            manifest_row("100003", 0, "d", image_path="dicom/good", series_uid=f"{UID}.11", exam_id="../x")]
    path = make_manifest(tmp_path / "data", rows[:1])
    pd.DataFrame(rows).to_csv(path, index=False)
    raw = np.random.default_rng(3).integers(-1000, 1000, size=(5, 6, 7)).astype(np.int16)
    write_dicom_series(tmp_path / "data/dicom/good", raw, [(1.0, 2.0, 3.0 + 1.25 * k) for k in range(5)],
                       series_uid=rows[1]["series_uid"])
    write_dicom_series(tmp_path / "data/dicom/gap", raw, [(1.0, 2.0, z) for z in (0, 1, 2, 5, 6)],
                       series_uid=rows[2]["series_uid"])

    out = tmp_path / "results" / "manifest.csv"
    problems = convert_manifest(path, out, tmp_path / "results" / "images", threads=2)
    assert [(p.exam_id, p.reason.split(":")[1].strip()) for p in problems.problems] == [("1000020d", "gap")]
    series, manifest_problems = build_exam_series(out)
    assert list(series["exam_id"]) == ["1000010a", "1000011d"]
    assert series["image_path"].iloc[1] == str(tmp_path / "results/images/1000011d.nii.gz")
    assert list(series["shape"].iloc[1]) == [7, 6, 5] and series["spacing"].iloc[1][2] == pytest.approx(1.25)
    assert [(p.exam_id, "unsafe" in p.reason) for p in manifest_problems.problems] == [("../x", True)]
    volume, _ = read_series(tmp_path / "data/dicom/good", rows[1]["series_uid"])
    assert np.array_equal(np.asarray(nib.load(series["image_path"].iloc[1]).dataobj).transpose(2, 1, 0), volume)


def test_a_truncated_file_is_refused_with_the_reason(tmp_path):
    write_dicom_series(tmp_path, np.zeros((3, 8, 8), np.int16), [(0, 0, 0), (0, 0, 1), (0, 0, 2)], series_uid=UID)
    victim = sorted(tmp_path.iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:-40])
    with pytest.raises(DicomSeriesError, match=rf"{victim.name}: cannot read pixel data"):
        read_series(tmp_path, UID)
