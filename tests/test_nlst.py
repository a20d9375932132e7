"""NLST metadata JSON -> exams manifest: filters, counts, the series choice; through the workflow with DICOM."""

import json
import pickle

import numpy as np
import pandas as pd
import pytest

from conftest import config_settings, lesion, make_workdir, snakemake, write_dicom_series
from noduleflow.ids import nlst_exam_id
from noduleflow.metadata.nlst import FILTERS, NlstError, nlst_manifest
from noduleflow.metadata.tables import SeriesFilter


def _series(folder: str, n: int, thickness, imageclass: int = 1, imagetype: str = "ORIGINAL|PRIMARY|AXIAL") -> dict:
    return {"paths": [f"{folder}/{k:03d}.dcm" for k in range(n)], "img_position": list(range(n)),
            "slice_thickness": thickness, "pixel_spacing": [0.7, 0.7],
            "series_data": {"imageclass": [imageclass], "imagetype": [imagetype]}}


def _patient(pid: str, accessions: list, scr_days=(0, 365, 730)) -> dict:
    metadata = {f"scr_days{t}": [d] for t, d in enumerate(scr_days)}
    return {"pid": pid, "split": "train", "pt_metadata": {**metadata, "candx_days": [-1], "fup_days": [2000]},
            "accessions": accessions}


def _exam(timepoint: int, series: dict) -> dict:
    return {"exam": f"x{timepoint}", "accession_number": "1", "screen_timepoint": timepoint, "image_series": series}


COHORT = [
    _patient("100001", [
        _exam(0, {"1.2.10.11111.22222": _series("p1/t0/thin", 60, 1.25),
                  "1.2.10.33333.44444": _series("p1/t0/thick", 80, 2.0),
                  "1.2.10.9": _series("p1/t0/scout", 60, 1.0, imageclass=0)}),
        _exam(1, {"1.2.11.55555.66666": _series("p1/t1/a", 70, 2.5),
                  "1.2.11.7": _series("p1/t1/b", 70, 5.0),
                  "1.2.11.8": _series("p1/t1/c", 49, 1.0),
                  "1.2.11.9": _series("p1/t1/d", 70, 1.0, imagetype="DERIVED|SECONDARY|TOP")}),
    ]),
    _patient("100002", [
        _exam(0, {"1.2.20.1": _series("p2/t0", 70, None)}),
        _exam(1, {"1.2.21.1": _series("p2/t1", 70, 1.0)}),
        _exam(2, {"1.2.22.1": {"slice_thickness": 1.0}}),  # no paths
    ], scr_days=(0, -1, 700)),
    {"split": "test", "accessions": []},  # no pid
]


def test_nlst_json_becomes_a_manifest_with_a_count_per_filter(tmp_path):
    (tmp_path / "nlst.json").write_text(json.dumps(COHORT))
    manifest, counts, problems = nlst_manifest(tmp_path / "nlst.json", config_settings(SeriesFilter, "series_filter"))
    assert manifest.to_dict("records") == [
        {"pid": "100001", "exam_id": nlst_exam_id("100001", 0, "1.2.10.11111.22222"), "screen_timepoint": 0,
         "days_since_baseline": 0.0, "series_uid": "1.2.10.11111.22222", "slice_thickness": 1.25,
         "image_path": str(tmp_path / "p1/t0/thin"), "pixel_spacing": 0.7},
        {"pid": "100001", "exam_id": "10000116666666666", "screen_timepoint": 1, "days_since_baseline": 365.0,
         "series_uid": "1.2.11.55555.66666", "slice_thickness": 2.5, "image_path": str(tmp_path / "p1/t1/a"),
         "pixel_spacing": 0.7},
    ]
    assert dict(zip(counts["filter"], counts["removed"], strict=True)) == {
        "input": 0, FILTERS[0]: 2, FILTERS[1]: 1, FILTERS[2]: 1, FILTERS[3]: 1, FILTERS[4]: 2, FILTERS[5]: 1,
        FILTERS[6]: 1}
    assert counts["remaining"].tolist() == [11, 9, 8, 7, 6, 4, 3, 2]
    assert sorted(p.reason.split(":")[0] for p in problems.problems) == ["malformed patient row", "malformed series"]


def test_nlst_json_that_is_not_a_list_of_patients_fails_at_once(tmp_path):
    (tmp_path / "nlst.json").write_text(json.dumps({"pid": "1"}))
    with pytest.raises(NlstError, match="expected a list of patient rows"):
        nlst_manifest(tmp_path / "nlst.json", config_settings(SeriesFilter, "series_filter"))


@pytest.mark.slow
def test_nlst_exams_as_dicom_run_through_the_metadata_stage(tmp_path):
    data = tmp_path / "data"
    rng = np.random.default_rng(5)
    uids = {(pid, t): f"1.2.826.0.1.3680043.9.7.{pid}.{t + 1}1234567" for pid in ("100001", "100002") for t in (0, 1)}
    for (pid, timepoint), uid in uids.items():
        raw = rng.integers(-1000, 500, size=(6, 12, 10)).astype(np.int16)
        z = [2.0 * k for k in range(6)] if (pid, timepoint) != ("100002", 1) else [0, 2, 4, 10, 12, 14]  # a gap
        write_dicom_series(data / pid / str(timepoint), raw, [(0.0, 0.0, v) for v in z], series_uid=uid)
    cohort = [_patient(pid, [_exam(t, {uids[pid, t]: {**_series(f"{pid}/{t}", 6, 2.0), "paths": [
        f"{pid}/{t}/{p.name}" for p in sorted((data / pid / str(t)).iterdir())]}}) for t in (0, 1)])
        for pid in ("100001", "100002")]
    (data / "nlst.json").write_text(json.dumps(cohort))
    exam_ids = {key: nlst_exam_id(key[0], key[1], uid) for key, uid in uids.items()}
    tracking = {pid: {1: {t: lesion(exam_ids[pid, t], coords=(2, 4, 3, 5, 1, 3)) for t in (0, 1)}}
                for pid in ("100001", "100002")}
    (data / "nodules.p").write_bytes(pickle.dumps(tracking))

    workdir = make_workdir(tmp_path / "run", data={"source": "nlst", "nlst_json": str(data / "nlst.json"),
                                                   "nodules": str(data / "nodules.p")},
                           series_filter={"min_slices": 5})
    snakemake(workdir, "--cores", "2", "results/metadata/input_problems.csv", "results/metadata/exam_to_nifti.pkl")
    mapping = pd.read_pickle(workdir / "results/metadata/exam_to_nifti.pkl")
    gap = exam_ids["100002", 1]
    assert sorted(mapping) == sorted(set(exam_ids.values()) - {gap})
    assert all(path.endswith(f"results/dicom/images/{exam}.nii.gz") for exam, path in mapping.items())
    problems = pd.read_csv(workdir / "results/metadata/input_problems.csv", dtype=str)
    rows = problems[problems["exam_id"] == gap]
    assert rows["stage"].tolist() == ["dicom", "nodules"] and "gap" in rows["reason"].iloc[0]
    counts = pd.read_csv(workdir / "results/nlst/filter_counts.csv")
    assert counts["remaining"].iloc[-1] == 4
