"""Hostile inputs, one named case each: every bad item is reported with a reason (or its file refused with a
message naming it) and the good items around it come out exactly as in a clean run."""

from __future__ import annotations

import json
import pickle
import struct
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
import yaml

from conftest import REPO, config_settings, lesion, make_manifest, manifest_row, write_dicom_series, write_volume
from noduleflow.config_checks import ConfigError, check_config, config_problems
from noduleflow.ids import is_safe_id
from noduleflow.imaging import ImageHeaderError, read_geometry
from noduleflow.io import InputLimitError, load_json, load_plain_pickle
from noduleflow.metadata.dicom import convert_manifest
from noduleflow.metadata.manifest import ManifestError, build_exam_series
from noduleflow.metadata.nlst import NlstError, nlst_manifest
from noduleflow.metadata.nodules import TrackingFileError, build_tracking_table, load_tracking
from noduleflow.metadata.tables import SeriesFilter

GOOD_ROWS = [manifest_row("100001", 0, "a"), manifest_row("100001", 1, "a"), manifest_row("100002", 0, "a")]


def _clean_series(folder: Path) -> pd.DataFrame:
    series, problems = build_exam_series(make_manifest(folder, GOOD_ROWS))
    assert problems.problems == []
    return series


# --- manifest rows: (name, bad rows, expected {exam_id: (severity, words in the reason)}) ---------------------

def _bad(pid="100009", timepoint=0, series="x", **extra):
    return manifest_row(pid, timepoint, series, **extra)


MANIFEST_CASES = [
    ("timepoint_infinite", [_bad(screen_timepoint="inf")],
     {"1000090x": ("dropped", "screen_timepoint inf is not finite")}),
    ("timepoint_huge", [_bad(screen_timepoint=10**12)], {"1000090x": ("dropped", "outside the plausible range")}),
    ("timepoint_negative", [_bad(screen_timepoint=-1)], {"1000090x": ("dropped", "screen_timepoint -1")}),
    ("timepoint_fraction", [_bad(screen_timepoint=1.5)], {"1000090x": ("dropped", "not an integer")}),
    ("timepoint_text", [_bad(screen_timepoint="first")], {"1000090x": ("dropped", "not a number")}),
    ("days_infinite", [_bad(days_since_baseline="-inf")], {"1000090x": ("dropped", "days_since_baseline -inf")}),
    ("days_missing", [_bad(days_since_baseline="")], {"1000090x": ("dropped", "days_since_baseline")}),
    ("days_huge", [_bad(days_since_baseline=1e9)], {"1000090x": ("dropped", "outside the plausible range")}),
    ("thickness_zero", [_bad(thickness=0.0)], {"1000090x": ("dropped", "slice_thickness (mm) 0")}),
    ("thickness_kilometres", [_bad(thickness=1e6)], {"1000090x": ("dropped", "outside the plausible range")}),
    ("thickness_nan", [_bad(thickness=float("nan"))], {"1000090x": ("dropped", "slice_thickness")}),
    ("pixel_spacing_negative", [_bad(pixel_spacing=-0.7)], {"1000090x": ("dropped", "pixel_spacing (mm) -0.7")}),
    ("pixel_spacing_infinite", [_bad(pixel_spacing="inf")], {"1000090x": ("dropped", "pixel_spacing (mm) inf")}),
    ("pid_trailing_newline", [_bad(pid="100009\n", exam_id="1000090x")], {"1000090x": ("dropped", "unsafe pid")}),
    ("exam_id_parent_dir", [_bad(exam_id="../1000090x")], {"../1000090x": ("dropped", "unsafe exam_id")}),
    ("exam_id_slash", [_bad(exam_id="a/b")], {"a/b": ("dropped", "unsafe exam_id")}),
    ("image_path_empty", [_bad(image_path="")], {"1000090x": ("dropped", "image_path is empty")}),
    ("series_uid_empty", [_bad(series_uid=" ")], {"1000090x": ("dropped", "series_uid is empty")}),
    ("image_path_control_character", [_bad(image_path="images/a\tb.nii.gz")],
     {"1000090x": ("dropped", "control characters")}),
    ("image_missing", [_bad(image_path="images/never_written.nii.gz")], {"1000090x": ("dropped", "not found")}),
    ("image_not_nifti", [_bad(image_path="notes.txt")], {"1000090x": ("dropped", "not a NIfTI")}),
    ("same_series_uid_as_another_exam", [_bad(series_uid="1.2.3.100009.0.y"), _bad(series="y")],
     {"1000090x": ("dropped", "same series UID"), "1000090y": ("dropped", "same series UID")}),
    ("same_image_under_two_patients", [_bad(image_path="images/shared.nii.gz"),
                                       _bad(pid="100010", image_path="images/shared.nii.gz")],
     {"1000090x": ("dropped", "same image file"), "1000100x": ("dropped", "same image file")}),
    ("dates_contradict_timepoints", [_bad(days_since_baseline=400.0), _bad(timepoint=1, days_since_baseline=30.0)],
     {None: ("dropped", "dates contradict the timepoint order")}),
    ("one_timepoint_on_two_days", [_bad(), _bad(series="y", days_since_baseline=90.0)],
     {None: ("dropped", "dates contradict the timepoint order")}),
    ("conflicting_duplicate_exam", [_bad(), _bad(thickness=1.5)], {"1000090x": ("dropped", "conflicting values")}),
]


@pytest.mark.parametrize(("rows", "expected"), [c[1:] for c in MANIFEST_CASES], ids=[c[0] for c in MANIFEST_CASES])
def test_bad_manifest_row_is_reported_and_the_good_rows_are_unchanged(tmp_path, rows, expected):
    clean = _clean_series(tmp_path / "clean")
    folder = tmp_path / "bad"
    path = make_manifest(folder, GOOD_ROWS)
    (folder / "notes.txt").write_text("hello")
    for row in rows:
        if row["image_path"].endswith(".nii.gz") and "never" not in row["image_path"] and "\t" not in row["image_path"]:
            write_volume(folder / row["image_path"])
    pd.DataFrame(GOOD_ROWS + rows).to_csv(path, index=False)
    series, problems = build_exam_series(path)
    assert sorted(series["exam_id"]) == sorted(clean["exam_id"])
    pd.testing.assert_frame_equal(series.drop(columns="image_path"), clean.drop(columns="image_path"))
    found = {(p.exam_id if None not in expected else None): p for p in problems.problems}
    for exam_id, (severity, words) in expected.items():
        assert found[exam_id].severity == severity and words in found[exam_id].reason, problems.problems


REPAIR_CASES = [
    ("thickness_below_header_spacing", {"thickness": 0.5}, "slice_thickness", 2.0, "slice_thickness 0.5 mm"),
    ("pixel_spacing_contradicts_header", {"pixel_spacing": 5.0}, "pixel_spacing", 0.7, "pixel_spacing 5 mm"),
]


@pytest.mark.parametrize(("extra", "column", "value", "words"), [c[1:] for c in REPAIR_CASES],
                         ids=[c[0] for c in REPAIR_CASES])
def test_manifest_spacing_contradicting_the_header_is_repaired_from_the_header(tmp_path, extra, column, value, words):
    rows = [*GOOD_ROWS, _bad(**extra)]
    series, problems = build_exam_series(make_manifest(tmp_path, rows))
    assert series.set_index("exam_id").loc["1000090x", column] == pytest.approx(value)
    [problem] = problems.problems
    assert problem.severity == "repaired" and words in problem.reason


WHOLE_MANIFEST_CASES = [
    ("empty_file", "manifest.csv", b"", "empty"),
    ("header_only", "manifest.csv", b"pid,exam_id,screen_timepoint,days_since_baseline,series_uid,slice_thickness,"
                                    b"image_path\n", "no rows"),
    ("missing_column", "manifest.csv", b"pid,exam_id\n1,2\n", "missing required column"),
    ("wrong_extension", "manifest.xlsx", b"pid\n", "must be .csv"),
    ("garbage_parquet", "manifest.parquet", b"PAR1 not really", "cannot read manifest"),
]


@pytest.mark.parametrize(("name", "content", "words"), [c[1:] for c in WHOLE_MANIFEST_CASES],
                         ids=[c[0] for c in WHOLE_MANIFEST_CASES])
def test_unusable_manifest_fails_at_once_naming_the_file(tmp_path, name, content, words):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ManifestError, match=words) as error:
        build_exam_series(tmp_path / name)
    assert name in str(error.value)


# --- NIfTI headers --------------------------------------------------------------------------------------------

NIFTI_AFFINE = np.diag([0.7, 0.7, 2.0, 1])


def _nifti(path: Path, edit=None, data=None, gz=True, affine=NIFTI_AFFINE) -> Path:
    """A valid 8 x 8 x 8 int16 image (qform = sform = `affine`) with `edit(image)` applied before saving."""
    image = nib.Nifti1Image(np.zeros((8, 8, 8), np.int16) if data is None else data, affine)
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    if edit:
        edit(image)
    path = path.with_suffix(".nii.gz" if gz else ".nii")
    nib.save(image, path)
    return path


def _set(**fields):
    def edit(image):
        for key, value in fields.items():
            image.header[key] = value
    return edit


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _patch_raw(path: Path, offset: int, fmt: str, value, keep: int | None = None) -> Path:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(raw[:keep] if keep else raw))
    return path


def _tiny_gz_claiming_huge(tmp_path):
    path = _nifti(tmp_path / "img", gz=False)
    header = nib.Nifti1Header.from_fileobj(open(path, "rb"))
    header.set_data_shape((4000, 4000, 4000))
    import gzip
    out = tmp_path / "huge.nii.gz"
    out.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 100))
    return out


NIFTI_CASES = [
    ("truncated_nii_with_zero_offset", lambda d: _patch_raw(_nifti(d / "i", gz=False), 108, "<f", 0.0, keep=400),
     "vox_offset"),
    ("truncated_nii", lambda d: _patch_raw(_nifti(d / "i", gz=False), 0, "<i", 348, keep=600), "truncated"),
    ("truncated_nii_gz", lambda d: _write(d / "t.nii.gz", _nifti(d / "i").read_bytes()[:-12]),
     "unreadable|truncated|compressed"),
    ("tiny_gz_claiming_huge_image", _tiny_gz_claiming_huge, "cannot hold"),
    ("qform_sform_disagree_by_centimetres", lambda d: _nifti(d / "i", edit=lambda i: i.set_sform(
        np.diag([0.7, 0.7, 2.0, 1]) + _offset(30.0), code=1)), "qform and sform disagree"),
    ("qform_and_sform_unset", lambda d: _patch_raw(_patch_raw(_nifti(d / "i", gz=False), 252, "<h", 0), 254, "<h", 0),
     "both 0"),
    ("scl_slope_zero_with_intercept", lambda d: _nifti(d / "i", edit=_set(scl_slope=0.0, scl_inter=5.0)),
     "scl_slope 0"),
    ("scl_slope_infinite", lambda d: _nifti(d / "i", edit=_set(scl_slope=np.inf, scl_inter=0.0)), "infinite"),
    ("four_dimensional", lambda d: _nifti(d / "i", data=np.zeros((8, 8, 8, 2), np.int16)), "3D"),
    ("two_dimensional", lambda d: _nifti(d / "i", data=np.zeros((8, 8), np.int16)), "3D"),
    ("single_slice", lambda d: _nifti(d / "i", data=np.zeros((8, 8, 1), np.int16)), "shape"),
    ("slice_spacing_kilometres", lambda d: _nifti(d / "i", affine=np.diag([0.7, 0.7, 1e6, 1])),
     "implausible voxel spacing"),
    ("zero_spacing", lambda d: _patch_raw(_nifti(d / "i", gz=False), 84, "<f", 0.0), "spacing"),
    ("nan_spacing", lambda d: _patch_raw(_nifti(d / "i", gz=False), 84, "<f", float("nan")), "spacing"),
    ("origin_far_away", lambda d: _nifti(d / "i", affine=np.diag([0.7, 0.7, 2.0, 1]) + _offset(1e9)), "origin"),
    ("units_metres", lambda d: _nifti(d / "i", edit=lambda i: i.header.set_xyzt_units("meter", "sec")),
     "spatial unit 'meter'"),
    ("bitpix_contradicts_datatype", lambda d: _patch_raw(_nifti(d / "i", gz=False), 72, "<h", 8), "bitpix 8"),
    ("complex_voxels", lambda d: _nifti(d / "i", data=np.zeros((8, 8, 8), np.complex64)), "not a real number"),
    ("not_nifti_at_all", lambda d: _write(d / "x.nii.gz", b"hello"), "not a readable"),
]


def _offset(value: float) -> np.ndarray:
    out = np.zeros((4, 4))
    out[0, 3] = value
    return out


@pytest.mark.parametrize(("make", "words"), [c[1:] for c in NIFTI_CASES], ids=[c[0] for c in NIFTI_CASES])
def test_bad_nifti_header_is_refused_with_the_reason(tmp_path, make, words):
    assert read_geometry(_nifti(tmp_path / "good")).shape == (8, 8, 8)
    with pytest.raises(ImageHeaderError, match=words):
        read_geometry(make(tmp_path))


# --- tracking file entries -------------------------------------------------------------------------------------

def _with(**changes):
    return {**lesion("1000011a"), **changes}


TRACKING_CASES = [
    ("coords_infinite", {"1": {0: _with(coords=[5, float("inf"), 4, 6, 10, 12])}}, "coords inf is not finite"),
    ("coords_huge", {"1": {0: _with(coords=[5, 1e30, 4, 6, 10, 12])}}, "outside the plausible range"),
    ("coords_fraction", {"1": {0: _with(coords=[5.5, 7, 4, 6, 10, 12])}}, "not an integer"),
    ("coords_five_values", {"1": {0: _with(coords=[5, 7, 4, 6, 10])}}, "6 values"),
    ("coords_text", {"1": {0: _with(coords="5,7,4,6,10,12")}}, "must be a list of numbers"),
    ("box_min_above_max", {"1": {0: _with(coords=[7, 5, 4, 6, 10, 12])}}, "minimum exceeds"),
    ("box_outside_volume", {"1": {0: _with(coords=[30, 40, 4, 6, 10, 12], center=[35, 5, 11])}}, "outside the volume"),
    ("center_nan", {"1": {0: _with(center=[float("nan"), 5, 11])}}, "center nan is not finite"),
    ("volume_negative", {"1": {0: _with(volume=-3.0)}}, "volume (mm^3) -3"),
    ("volume_zero", {"1": {0: _with(volume=0.0)}}, "volume (mm^3) 0"),
    ("volume_nan", {"1": {0: _with(volume=float("nan"))}}, "volume (mm^3) nan"),
    ("volume_infinite", {"1": {0: _with(volume=float("inf"))}}, "not finite"),
    ("volume_text", {"1": {0: _with(volume="big")}}, "not a number"),
    ("exam_not_text", {"1": {0: _with(exam=1000011)}}, "exam must be an exam id"),
    ("lesion_not_a_dict", {"1": {0: [1, 2, 3]}}, "lesion must be a dict"),
    ("group_not_an_integer", {"x": {0: _with()}}, "nodule_group 'x'"),
    ("exam_idx_negative", {"1": {-1: _with()}}, "exam_idx -1"),
    ("exam_idx_infinite", {"1": {float("inf"): _with()}}, "exam_idx inf"),
    ("exams_not_a_dict", {"1": [_with()]}, "must be a dict"),
    ("flag_not_boolean", {"1": {0: _with(abn_prexist="maybe")}}, "abn_prexist"),
    ("flag_tensor_of_two_values", {"1": {0: _with(screen_detected=torch.tensor([1, 0]))}}, "ambiguous"),
    ("past_centre_infinite", {"1": {0: _with(centers_in_past_exam_ijk_space=[1, 2, float("inf")])}}, "not finite"),
    ("exam_idx_order_contradicts_dates", {"7": {0: _with(), 1: lesion("1000010a")}},
     "exam_idx order contradicts the exam dates"),
]


@pytest.mark.parametrize(("groups", "words"), [c[1:] for c in TRACKING_CASES], ids=[c[0] for c in TRACKING_CASES])
def test_bad_lesion_entry_is_reported_and_the_good_ones_are_unchanged(tmp_path, groups, words):
    series = _clean_series(tmp_path)
    good = {"100001": {1: {0: lesion("1000010a"), 1: lesion("1000011a")}}, "100002": {1: {0: lesion("1000020a")}}}
    clean, clean_problems = build_tracking_table(good, series)
    assert clean_problems.problems == [] and len(clean) == 3
    hostile = {"100001": {**good["100001"], **groups}, "100002": good["100002"]}
    table, problems = build_tracking_table(hostile, series)
    pd.testing.assert_frame_equal(table, clean)
    assert len(problems.problems) == 1 and words in problems.problems[0].reason, problems.problems


def test_a_centre_outside_its_box_is_kept_with_a_warning(tmp_path):
    series = _clean_series(tmp_path)
    table, problems = build_tracking_table({"100001": {1: {0: {**lesion("1000010a"), "center": [0, 0, 0]}}}}, series)
    assert table[["center_i", "center_j", "center_k"]].values.tolist() == [[0, 0, 0]]
    [problem] = problems.problems
    assert problem.severity == "warning" and "center [0, 0, 0] lies outside its box" in problem.reason


def test_the_same_pid_as_number_and_text_is_reported_not_overwritten(tmp_path):
    series = _clean_series(tmp_path)
    pairs = [(100001, {1: {0: lesion("1000010a")}}), ("100001", {2: {1: lesion("1000011a")}}),
             ("100002", {1: {0: lesion("1000020a")}}), ("not a pair",)]
    table, problems = build_tracking_table(pairs, series)
    assert table["exam"].tolist() == ["1000020a"]
    reasons = sorted(p.reason for p in problems.problems)
    assert "given 2 times" in reasons[1] and "not a (pid, nodules) pair" in reasons[0]


def _nested_pickle(levels: int) -> bytes:
    """A list holding the previous list twice, `levels` times: tiny on disk, 2^levels leaves when printed."""
    value: list = []
    for _ in range(levels):
        value = [value, value]
    return pickle.dumps(value)


def _deep_pickle(levels: int) -> bytes:
    # Written by hand: pickle.dumps itself recurses. EMPTY_LIST, then (MARK, EMPTY_LIST ... APPENDS) nesting.
    return b"\x80\x02" + b"]" * levels + b"a" * (levels - 1) + b"."


def test_152_byte_nested_pickle_is_refused_quickly_with_a_short_message(tmp_path):
    path = tmp_path / "nested.p"
    path.write_bytes(_nested_pickle(40))
    assert len(path.read_bytes()) < 400
    start = time.perf_counter()
    with pytest.raises(TrackingFileError) as error:
        load_tracking(path)
    assert time.perf_counter() - start < 2 and len(str(error.value)) < 1000 and "nested more than" in str(error.value)


def test_shallow_shared_pickle_entry_or_pid_is_reported_with_a_short_message(tmp_path):
    nested: list = []
    for _ in range(14):
        nested = [nested, nested]
    series = _clean_series(tmp_path)
    table, problems = build_tracking_table([nested, (nested, {}), ("100002", {1: {0: lesion("1000020a")}})], series)
    assert table["exam"].tolist() == ["1000020a"]
    assert len(problems.problems) == 2 and all(len(p.reason) < 500 for p in problems.problems)
    assert "neither text nor an integer" in problems.problems[1].reason


@pytest.mark.parametrize(("name", "content", "words"), [
    ("deep_pickle", _deep_pickle(5000), "nested"),
    ("cyclic_pickle", b"\x80\x02]q\x00h\x00a.", "holds itself"),
    ("not_a_container", pickle.dumps(42), "expected a dict"),
    ("garbage", b"\x00\x01\x02", "cannot read"),
], ids=["deep_pickle", "cyclic_pickle", "not_a_container", "garbage"])
def test_unusable_tracking_file_fails_naming_the_file(tmp_path, name, content, words):
    path = tmp_path / f"{name}.p"
    path.write_bytes(content)
    with pytest.raises(TrackingFileError, match=words) as error:
        load_tracking(path)
    assert path.name in str(error.value)


def test_pickle_and_json_size_limits(tmp_path):
    (tmp_path / "t.p").write_bytes(pickle.dumps({"1": {}}))
    (tmp_path / "t.json").write_text("[1, 2, 3]")
    with pytest.raises(InputLimitError, match="more than the limit"):
        load_plain_pickle(tmp_path / "t.p", max_bytes=4)
    with pytest.raises(InputLimitError, match="more than the limit"):
        load_json(tmp_path / "t.json", max_bytes=4)
    assert load_json(tmp_path / "t.json") == [1, 2, 3]


# --- NLST JSON --------------------------------------------------------------------------------------------------

def _nlst_patient(pid, timepoint=0, days=0, thickness=1.25, pixel=0.7, paths=None, uid="1.2.10.11111.22222"):
    return {"pid": pid, "pt_metadata": {"scr_days0": [days], "scr_days1": [365], "scr_days2": [730]},
            "accessions": [{"screen_timepoint": timepoint, "image_series": {uid: {
                "paths": [f"{pid}/{k:03d}.dcm" for k in range(60)] if paths is None else paths,
                "slice_thickness": thickness, "pixel_spacing": [pixel, pixel],
                "series_data": {"imageclass": [1], "imagetype": ["ORIGINAL|PRIMARY|AXIAL"]}}}}]}


NLST_CASES = [
    ("timepoint_infinite", _nlst_patient("9", timepoint=float("inf")), "screen_timepoint inf"),
    ("timepoint_huge", _nlst_patient("9", timepoint=1e20), "outside the plausible range"),
    ("timepoint_negative", _nlst_patient("9", timepoint=-2), "screen_timepoint -2"),
    ("days_infinite", _nlst_patient("9", days=float("inf")), "scr_days0 inf"),
    ("days_huge", _nlst_patient("9", days=1e12), "outside the plausible range"),
    ("thickness_kilometres", _nlst_patient("9", thickness=1e6), "slice_thickness (mm)"),
    ("thickness_infinite", _nlst_patient("9", thickness=float("inf")), "slice_thickness (mm) inf"),
    ("pixel_spacing_huge", _nlst_patient("9", pixel=500.0), "pixel_spacing (mm) 500"),
    ("paths_empty", _nlst_patient("9", paths=[]), "non-empty list"),
    ("paths_not_a_list", _nlst_patient("9", paths="9/a.dcm"), "non-empty list"),
    ("paths_repeated", _nlst_patient("9", paths=["9/a.dcm"] * 60), "twice"),
    ("patient_not_a_dict", ["9"], "patient row must be a dict"),
    ("accessions_not_a_list", {"pid": "9", "accessions": {"a": 1}}, "accessions must be a list"),
    ("series_not_a_dict", {"pid": "9", "accessions": [{"screen_timepoint": 0, "image_series": {"1.2.3": 5}}]},
     "series must be a dict"),
]


@pytest.mark.parametrize(("patient", "words"), [c[1:] for c in NLST_CASES], ids=[c[0] for c in NLST_CASES])
def test_bad_nlst_entry_is_reported_and_the_good_patients_are_kept(tmp_path, patient, words):
    good = [_nlst_patient("100001"), _nlst_patient("100002")]
    (tmp_path / "clean.json").write_text(json.dumps(good))
    clean, _, clean_problems = nlst_manifest(tmp_path / "clean.json", config_settings(SeriesFilter, "series_filter"))
    (tmp_path / "bad.json").write_text(json.dumps([good[0], patient, good[1]]))
    manifest, counts, problems = nlst_manifest(tmp_path / "bad.json", config_settings(SeriesFilter, "series_filter"))
    pd.testing.assert_frame_equal(manifest, clean)
    assert clean_problems.problems == [] and len(problems.problems) == 1
    assert words in problems.problems[0].reason, problems.problems
    assert counts.set_index("filter").loc["malformed entry", "removed"] == 1


def test_nlst_pid_as_number_and_text_rejects_both_rows(tmp_path):
    (tmp_path / "n.json").write_text(json.dumps([_nlst_patient(7), _nlst_patient("7"), _nlst_patient("8")]))
    manifest, _, problems = nlst_manifest(tmp_path / "n.json", config_settings(SeriesFilter, "series_filter"))
    assert manifest["pid"].tolist() == ["8"] and len(problems.problems) == 2


@pytest.mark.parametrize(("content", "words"), [
    ("[" * 100_000 + "]" * 100_000, "nested"),
    ("[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]", "nested more than"),
    ("", "not valid JSON"),
    ('{"pid": "1"}', "expected a list"),
    ("[]", "list of patient rows is empty"),
], ids=["json_nesting_overflows_the_parser", "json_deeper_than_the_limit", "json_empty", "json_not_a_list",
        "json_no_patients"])
def test_unusable_nlst_json_fails_naming_the_file(tmp_path, content, words):
    (tmp_path / "nlst.json").write_text(content)
    with pytest.raises(NlstError, match=words) as error:
        nlst_manifest(tmp_path / "nlst.json", config_settings(SeriesFilter, "series_filter"))
    assert "nlst.json" in str(error.value)


# --- DICOM ------------------------------------------------------------------------------------------------------

def _edit_first_slice(folder: Path, edit) -> None:
    path = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path)


def _setattr(**values):
    def edit(ds):
        for key, value in values.items():
            if value is None:
                delattr(ds, key)
            else:
                setattr(ds, key, value)
    return edit


def _patch_position(folder: Path, vr: bytes | None = None, letters: bool = False) -> None:
    """Overwrite, in the file's bytes, the VR of the first slice's ImagePositionPatient or its value with letters."""
    path = sorted(folder.iterdir())[0]
    raw = bytearray(path.read_bytes())
    at = raw.index(b"\x20\x00\x32\x00DS")  # (0020,0032), explicit VR little endian: tag, VR, 2-byte length
    if vr:
        raw[at + 4:at + 6] = vr
    if letters:
        length = int.from_bytes(raw[at + 6:at + 8], "little")
        raw[at + 8:at + 8 + length] = b"x" * length
    path.write_bytes(bytes(raw))


DICOM_CASES = [
    ("orientation_five_values", lambda f: _edit_first_slice(f, _setattr(ImageOrientationPatient=[1, 0, 0, 0, 1])),
     "ImageOrientationPatient has 5 value"),
    ("orientation_not_orthonormal",
     lambda f: _edit_first_slice(f, _setattr(ImageOrientationPatient=[1, 0, 0, 1, 0, 0])),
     "orthonormal|differ"),
    ("position_text", lambda f: _patch_position(f, letters=True), "malformed geometry tags"),
    ("position_missing", lambda f: _edit_first_slice(f, _setattr(ImagePositionPatient=None)),
     "without ImagePositionPatient"),
    ("pixel_spacing_zero", lambda f: _edit_first_slice(f, _setattr(PixelSpacing=[0, 0.7])), "PixelSpacing 0"),
    ("position_kilometres_away", lambda f: _edit_first_slice(f, _setattr(ImagePositionPatient=[0, 0, 1e9])),
     "outside the plausible range"),
    ("rescale_slope_zero", lambda f: _edit_first_slice(f, _setattr(RescaleSlope="0")), "RescaleSlope"),
    ("unknown_vr", lambda f: _patch_position(f, vr=b"ZZ"), "Unknown Value Representation"),
    ("rows_missing", lambda f: _edit_first_slice(f, _setattr(Rows=None)), "malformed geometry tags"),
    ("header_unparseable", lambda f: _write(sorted(f.iterdir())[-1], sorted(f.iterdir())[-1].read_bytes()[:200]),
     "cannot be read"),
    ("pixel_data_truncated", lambda f: _edit_first_slice(f, lambda ds: setattr(ds, "PixelData", ds.PixelData[:10])),
     "pixel data"),
]


def _dicom_manifest(folder: Path, bad=None) -> Path:
    rng = np.random.default_rng(3)
    rows = []
    for pid in ("100001", "100002"):
        raw = rng.integers(-1000, 500, size=(5, 6, 7)).astype(np.int16)
        uid = f"1.2.826.0.1.3680043.9.7.{pid}"
        write_dicom_series(folder / pid, raw, [(0.0, 0.0, 2.0 * k) for k in range(5)], series_uid=uid)
        rows.append(manifest_row(pid, 0, "a", series_uid=uid, image_path=pid))
    if bad:
        bad(folder / "100002")
    path = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.filterwarnings("ignore:The value length:UserWarning")  # pydicom on the overwritten values
@pytest.mark.parametrize(("bad", "words"), [c[1:] for c in DICOM_CASES], ids=[c[0] for c in DICOM_CASES])
def test_one_bad_dicom_slice_fails_only_its_exam(tmp_path, bad, words):
    convert_manifest(_dicom_manifest(tmp_path / "clean"), tmp_path / "clean/out.csv", tmp_path / "clean/images")
    problems = convert_manifest(_dicom_manifest(tmp_path / "bad", bad), tmp_path / "bad/out.csv",
                                tmp_path / "bad/images")
    [problem] = problems.problems
    assert problem.exam_id == "1000020a" and problem.stage == "dicom"
    assert any(w in problem.reason for w in words.split("|")), problem.reason
    good = "1000010a.nii.gz"
    assert (tmp_path / "bad/images" / good).read_bytes() == (tmp_path / "clean/images" / good).read_bytes()
    assert pd.read_csv(tmp_path / "bad/out.csv")["exam_id"].tolist() == ["1000010a"]


# --- ids and configuration ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["100001\n", "100001\r", "a\nb", "100001\x00"],
                         ids=["trailing_newline", "trailing_return", "inner_newline", "nul"])
def test_ids_with_line_breaks_are_unsafe(value):
    assert not is_safe_id(value)


def _config(**changes):
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    for path, value in changes.items():
        *parents, key = path.split("__")
        node = config
        for parent in parents:
            node = node[parent]
        node[key] = value
    return config


CONFIG_CASES = [
    ("split_fractions_all_zero", {"splits__fractions": {"train": 0, "val": 0, "test": 0}}, "sum to 0"),
    ("hu_window_reversed", {"patch__hu_window": [500.0, -2000.0]}, "patch.hu_window"),
    ("empty_string_path", {"data__manifest": ""}, "data.manifest is an empty string"),
    ("range_reversed", {"synthetic__nodules_per_patient": [4, 1]}, "synthetic.nodules_per_patient"),
    ("test_run_not_trained", {"evaluation__test_runs": ["no_such_run"]}, "evaluation.test_runs names runs"),
    ("pyramid_lengths_differ", {"registration__method__smoothing_sigmas_mm": [4.0, 2.0, 0.0]}, "one value per pyramid"),
]


@pytest.mark.parametrize(("changes", "words"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_semantics_beyond_the_schema(changes, words):
    assert config_problems(_config()) == []
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        check_config(_config(**changes))


# --- nothing good is lost: the metadata stage end to end -----------------------------------------------------------

BOX = (5, 7, 4, 6, 1, 3)  # inside both the NIfTI (20 x 16 x 60) and the DICOM (20 x 16 x 6) exams


def _metadata_inputs(data: Path, bad: bool) -> tuple[Path, Path]:
    """A tiny cohort (NIfTI and DICOM exams) and its tracking file; with `bad`, one hostile item of each kind added."""
    rng = np.random.default_rng(8)
    rows, tracking = [], {}
    for pid in ("100001", "100002", "100003"):
        for timepoint in (0, 1):
            row = manifest_row(pid, timepoint, "a", image_path=f"images/{pid}_{timepoint}.nii.gz")
            if pid == "100003":  # exams given as DICOM folders
                row.update(image_path=f"dicom/{pid}_{timepoint}",
                           series_uid=f"1.2.826.0.1.3680043.9.7.{pid}{timepoint}")
                write_dicom_series(data / row["image_path"], rng.integers(-1000, 500, (6, 16, 20)).astype(np.int16),
                                   [(0.0, 0.0, 2.0 * k) for k in range(6)], series_uid=row["series_uid"])
            else:
                write_volume(data / row["image_path"])
            rows.append(row)
        tracking[pid] = {1: {0: lesion(f"{pid}0a", coords=BOX), 1: lesion(f"{pid}1a", coords=BOX, volume=60.0)}}
    if bad:
        uid = "1.2.826.0.1.3680043.9.7.1000040"
        write_dicom_series(data / "dicom/bad", rng.integers(-1000, 500, (6, 16, 20)).astype(np.int16),
                           [(0.0, 0.0, 2.0 * k) for k in range(6)], series_uid=uid)
        _edit_first_slice(data / "dicom/bad", _setattr(ImageOrientationPatient=[1, 0, 0, 0, 1]))
        intact = (data / rows[0]["image_path"]).read_bytes()
        (data / "images/truncated.nii.gz").write_bytes(intact[: len(intact) // 2])
        rows += [manifest_row("100004", 0, "a", image_path="dicom/bad", series_uid=uid),
                 manifest_row("100005", 0, "a", image_path="images/truncated.nii.gz"),
                 manifest_row("100006", 0, "a", screen_timepoint="inf", image_path=rows[0]["image_path"])]
        tracking["100001"][2] = {0: lesion("1000010a", coords=(5, float("inf"), 4, 6, 10, 12))}
        tracking["100004"] = {1: {0: lesion("1000040a")}}
        tracking = [*tracking.items(), (100007, {1: {0: lesion("1000070a")}}), ("100007", {})]
    manifest = data / f"manifest{'_bad' if bad else ''}.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    nodules = data / f"nodules{'_bad' if bad else ''}.p"
    nodules.write_bytes(pickle.dumps(tracking if bad else list(tracking.items())))
    return manifest, nodules


@pytest.mark.slow
def test_bad_items_leave_every_good_output_of_the_metadata_stage_byte_identical(tmp_path):
    from conftest import make_workdir, snakemake

    data = tmp_path / "data"
    runs = {}
    for bad in (False, True):
        manifest, nodules = _metadata_inputs(data, bad)
        workdir = make_workdir(tmp_path / "run", data={"source": "files", "manifest": str(manifest),
                                                      "nodules": str(nodules)}, series_filter={"min_slices": 5})
        snakemake(workdir, "--cores", "2", "metadata")
        results = workdir / "results"
        outputs = sorted([*results.glob("metadata/**/*.parquet"), *results.glob("metadata/*.pkl"),
                          *results.glob("dicom/images/*.nii.gz")])
        runs[bad] = {str(p.relative_to(results)): p.read_bytes() for p in outputs}
        problems = pd.read_csv(results / "metadata/input_problems.csv", dtype=str)
        runs[bad, "problems"] = problems
    assert set(runs[True]) == set(runs[False]) and len(runs[False]) >= 12
    assert [name for name in runs[False] if runs[True][name] != runs[False][name]] == []
    assert runs[False, "problems"].empty
    problems = runs[True, "problems"]
    reported = set(zip(problems["stage"], problems["pid"], strict=True))
    assert {("dicom", "100004"), ("manifest", "100005"), ("manifest", "100006"), ("nodules", "100001"),
            ("nodules", "100004"), ("nodules", "100007")} <= reported


def test_a_split_with_no_patients_gives_empty_tables_with_their_columns(tmp_path):
    from noduleflow.metadata.tables import nodule_pairs, split_tables

    series = _clean_series(tmp_path)
    tracking, _ = build_tracking_table({"100001": {1: {0: lesion("1000010a"), 1: lesion("1000011a")}}}, series)
    fractions = {"train": 1.0, "val": 0.0, "test": 0.0}
    series_filter = config_settings(SeriesFilter, "series_filter", min_slices=5)
    full, _ = split_tables(series=series, nodules=tracking, split="train", seed=0, fractions=fractions, n_shards=2,
                           series_filter=series_filter)
    empty, problems = split_tables(series=series, nodules=tracking, split="val", seed=0, fractions=fractions,
                                   n_shards=1, series_filter=series_filter)
    assert problems.problems == []
    for name, table in empty.items():
        assert table.empty and list(table.columns) == list(full[name].columns), name
    assert str(empty["timelines"]["fixed_exam_id"].dtype) == str(full["timelines"]["fixed_exam_id"].dtype)
    boxes = tracking.iloc[:0].assign(days_since_baseline=pd.Series([], dtype=float),
                                     box_outside=pd.Series([], dtype=object))  # as read back from an empty parquet
    pairs = nodule_pairs(boxes)
    assert pairs.empty and {"pid", "nodule_group", "exam_idx_a", "exam_idx_b", "delta_days"} <= set(pairs.columns)
