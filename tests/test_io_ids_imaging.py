"""Identifiers, safe file I/O and NIfTI geometry."""

import gzip
import pickle

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from noduleflow.ids import is_safe_id, nlst_exam_id, shard_of, stable_fraction
from noduleflow.imaging import Geometry, ImageHeaderError, read_geometry, read_image, write_nifti
from noduleflow.io import atomic_path, load_plain_pickle, write_parquet


@pytest.mark.parametrize("value", ["../x", "a/b", "with space", ".hidden", "", "a..b", None, 12, "x" * 200])
def test_unsafe_ids_are_rejected(value):
    assert not is_safe_id(value)


@pytest.mark.parametrize("value", ["100001", "12236123673323549", "pid_7-b.2"])
def test_safe_ids_are_accepted(value):
    assert is_safe_id(value)


def test_nlst_exam_id_uses_first_and_last_five_characters_of_the_last_uid_component():
    assert nlst_exam_id("122361", 2, "1.2.840.113654.2.55.3673312345323549") == "12236123673323549"


def test_shards_are_stable_and_cover_all_shards():
    pids = [str(100000 + i) for i in range(2000)]
    shards = [shard_of(pid, 8) for pid in pids]
    assert shards == [shard_of(pid, 8) for pid in pids]
    counts = np.bincount(shards, minlength=8)
    assert counts.min() > 180 and counts.max() < 320
    assert 0 <= stable_fraction("a", 1) < 1 and stable_fraction("a", 1) != stable_fraction("a", 2)


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_parquet_bytes_are_deterministic(tmp_path):
    frame = pd.DataFrame({"a": [1, 2], "b": [[1.0, 2.0], [3.0]]})
    write_parquet(frame, tmp_path / "1.parquet")
    write_parquet(frame, tmp_path / "2.parquet")
    assert (tmp_path / "1.parquet").read_bytes() == (tmp_path / "2.parquet").read_bytes()


def test_plain_pickle_loader_refuses_code(tmp_path):
    class Hostile:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "hostile.p"
    path.write_bytes(pickle.dumps({"pid": Hostile()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_plain_pickle(path)
    path.write_bytes(pickle.dumps({"1": {1: {0: {"coords": (1, 2), "volume": 3.5, "x": None}}}}))
    assert load_plain_pickle(path) == {"1": {1: {0: {"coords": (1, 2), "volume": 3.5, "x": None}}}}


def test_nifti_geometry_round_trips_and_matches_simpleitk(tmp_path):
    angle = np.deg2rad(10)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    geometry = Geometry((12, 10, 8), (0.7, 0.8, 2.5), (-100.0, 50.0, 20.0), tuple(direction.ravel()))
    array = np.arange(8 * 10 * 12, dtype=np.int16).reshape(8, 10, 12)
    write_nifti(array, geometry, tmp_path / "x.nii.gz")
    read = read_geometry(tmp_path / "x.nii.gz")
    assert read.shape == geometry.shape
    np.testing.assert_allclose(read.spacing, geometry.spacing, atol=1e-5)
    np.testing.assert_allclose(read.origin, geometry.origin, atol=1e-4)
    np.testing.assert_allclose(read.direction, geometry.direction, atol=1e-5)
    image = sitk.ReadImage(str(tmp_path / "x.nii.gz"))
    np.testing.assert_allclose(image.GetOrigin(), geometry.origin, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), geometry.direction, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    # voxel (x=3, y=2, z=1) sits where the geometry's matrix says it does
    point = image.TransformIndexToPhysicalPoint((3, 2, 1))
    np.testing.assert_allclose(point, (geometry.matrix() @ [3, 2, 1, 1])[:3], atol=1e-4)


def test_non_finite_voxels_are_reported_not_zeroed(tmp_path):
    geometry = Geometry((4, 5, 6), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    array = np.zeros((6, 5, 4), np.float32)
    write_nifti(array, geometry, tmp_path / "ok.nii.gz")
    assert read_image(tmp_path / "ok.nii.gz").GetSize() == (4, 5, 6)
    array[3, 2, 1] = np.nan
    write_nifti(array, geometry, tmp_path / "nan.nii.gz")
    with pytest.raises(ImageHeaderError, match="1 NaN"):
        read_image(tmp_path / "nan.nii.gz")


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_a_nii_gz_damaged_inside_is_refused_and_an_intact_one_read_exactly(tmp_path, dtype):
    """The gzip trailer (size, checksum) survives damage to the middle of the stream: the data must be checked."""
    geometry = Geometry((64, 48, 40), (0.7, 0.7, 2.5), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    array = np.random.default_rng(0).integers(-1000, 1000, (40, 48, 64)).astype(dtype)
    write_nifti(array, geometry, tmp_path / "ok.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(tmp_path / "ok.nii.gz")), array)
    data = bytearray((tmp_path / "ok.nii.gz").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    (tmp_path / "damaged.nii.gz").write_bytes(bytes(data))
    assert read_geometry(tmp_path / "damaged.nii.gz").shape == geometry.shape  # the header is intact
    with pytest.raises(ImageHeaderError, match="corrupt|unreadable"):
        read_image(tmp_path / "damaged.nii.gz")
    (tmp_path / "truncated.nii.gz").write_bytes(bytes(data[:middle]))
    with pytest.raises(ImageHeaderError, match="truncated"):
        read_image(tmp_path / "truncated.nii.gz")


def test_big_endian_and_scaled_images_read_as_nibabel_reads_them(tmp_path):
    array = np.random.default_rng(1).integers(-1000, 1000, (6, 5, 4)).astype(">i2")
    image = nib.Nifti1Image(array, np.diag([-1.0, -1.0, 2.0, 1.0]))
    image.header.set_slope_inter(2.0, -10.0)
    nib.save(image, tmp_path / "scaled.nii.gz")
    read = sitk.GetArrayFromImage(read_image(tmp_path / "scaled.nii.gz"))
    np.testing.assert_array_equal(read, (array.astype(np.float32) * 2.0 - 10.0).transpose(2, 1, 0))
    header = nib.Nifti1Header(endianness=">")
    header.set_data_dtype(">i2")
    nib.save(nib.Nifti1Image(array, np.diag([-1.0, -1.0, 2.0, 1.0]), header), tmp_path / "big_endian.nii")
    assert nib.load(tmp_path / "big_endian.nii").get_data_dtype() == np.dtype(">i2")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(tmp_path / "big_endian.nii")),
                                  array.transpose(2, 1, 0))


def _write_raw(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)


@pytest.mark.parametrize(
    "case, match",
    [
        ("four_d", "3D"),
        ("two_d", "3D"),
        ("zero_spacing", "spacing"),
        ("sheared", "orthogonal"),
        ("not_an_image", "readable"),
    ],
)
def test_invalid_headers_are_rejected_with_a_reason(tmp_path, case, match):
    path = tmp_path / "bad.nii.gz"
    if case == "four_d":
        _write_raw(path, np.zeros((4, 4, 4, 3), np.int16))
    elif case == "two_d":
        _write_raw(path, np.zeros((4, 4), np.int16))
    elif case == "zero_spacing":
        path = tmp_path / "bad.nii"
        _write_raw(path, np.zeros((4, 4, 4), np.int16))
        raw = bytearray(path.read_bytes())
        raw[88:92] = np.float32(0.0).tobytes()  # pixdim[3], the slice spacing
        raw[252:256] = np.int16(0).tobytes() * 2  # qform_code = sform_code = 0: geometry from pixdim alone
        path.write_bytes(bytes(raw))
    elif case == "sheared":
        affine = np.eye(4)
        affine[0, 1] = 0.5
        _write_raw(path, np.zeros((4, 4, 4), np.int16), affine=affine)
    else:
        path.write_bytes(gzip.compress(b"this is a text file, not an image"))
    with pytest.raises(ImageHeaderError, match=match):
        read_geometry(path)
