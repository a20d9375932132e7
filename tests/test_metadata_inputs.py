"""Bad input in the manifest and the tracking file: reported with a reason, the rest processed."""

import os
import pickle

import pandas as pd
import pytest
import torch

from conftest import lesion, make_manifest, manifest_row
from noduleflow.metadata.manifest import ManifestError, build_exam_series, exam_to_nifti
from noduleflow.metadata.nodules import TrackingFileError, build_tracking_table, load_tracking, tracking_from_table


def _reasons(problems) -> dict[str, str]:
    return {p.exam_id: p.reason for p in problems.problems}


def test_missing_required_column_fails_at_once_naming_it(tmp_path):
    path = make_manifest(tmp_path, [manifest_row("100001", 0, "a")])
    pd.read_csv(path).drop(columns=["slice_thickness"]).to_csv(path, index=False)
    with pytest.raises(ManifestError, match="slice_thickness"):
        build_exam_series(path)


def test_bad_manifest_rows_are_reported_and_the_rest_kept(tmp_path):
    good = [manifest_row("100001", 0, "a"), manifest_row("100001", 1, "a"), manifest_row("100002", 0, "a")]
    path = make_manifest(tmp_path, good)
    rows = good + [
        manifest_row("100003", 0, "missing"),  # image never written
        manifest_row("100004", 0, "x", image_path="notes.txt"),  # not an image
        manifest_row("100005", 0, "x", image_path="truncated.nii.gz"),
        manifest_row("../etc", 0, "x", exam_id="../etc0x"),
        manifest_row("100006", 0, "x", exam_id="a b"),
        manifest_row("100007", 0, "x", slice_thickness=-1),
        manifest_row("100001", 0, "a"),  # identical duplicate of a good row: one kept
        manifest_row("100008", 0, "d"),
        manifest_row("100008", 0, "d", days_since_baseline=10.0),  # conflicting duplicate: both rejected
    ]
    (tmp_path / "notes.txt").write_text("hello")
    intact = (tmp_path / good[0]["image_path"]).read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(intact[: len(intact) // 2])
    from conftest import write_volume
    write_volume(tmp_path / rows[-1]["image_path"])
    pd.DataFrame(rows).to_csv(path, index=False)

    series, problems = build_exam_series(path, threads=2)
    assert sorted(series["exam_id"]) == sorted(r["exam_id"] for r in good)
    reasons = _reasons(problems)
    assert "not found" in reasons["1000030missing"]
    assert "not a NIfTI" in reasons["1000040x"]
    assert "unreadable" in reasons["1000050x"]
    assert "unsafe pid and exam_id" in reasons["../etc0x"]
    assert "unsafe exam_id" in reasons["a b"]
    assert "slice_thickness" in reasons["1000070x"]
    assert "identical" in reasons["1000010a"]
    assert "conflicting" in reasons["1000080d"]
    assert set(exam_to_nifti(series)) == set(series["exam_id"])
    assert all(str(tmp_path) in p for p in exam_to_nifti(series).values())
    assert list(series["shape"].iloc[0]) == [20, 16, 60]


def _series(tmp_path):
    rows = [manifest_row("100001", 0, "a"), manifest_row("100001", 1, "a"), manifest_row("100002", 0, "a")]
    series, _ = build_exam_series(make_manifest(tmp_path, rows))
    return series


def test_tracking_problems_are_reported_and_the_rest_kept(tmp_path):
    series = _series(tmp_path)  # images are 20 x 16 x 60 (x, y, z): i < 16, j < 20, k < 60
    tracking = {
        "100001": {
            1: {0: lesion("1000010a"), 1: lesion("1000011a")},
            2: {0: lesion("1000010a", coords=(30, 40, 4, 6, 10, 12))},  # outside (i >= 16)
            3: {0: lesion("1000010a", coords=(10, 20, 4, 6, 10, 12))},  # partly outside: clipped
            4: {1: lesion("9999991z")},  # unknown exam
            5: {1: {"exam": "1000011a", "volume": 3.0}},  # malformed
        },
        "100002": {1: {0: lesion("1000011a")}},  # exam of another patient
    }
    table, problems = build_tracking_table(tracking, series)
    assert table[["pid", "nodule_group", "exam_idx"]].values.tolist() == [["100001", 1, 0], ["100001", 1, 1],
                                                                          ["100001", 3, 0]]
    assert list(table.loc[2, "coords"]) == [10, 15, 4, 6, 10, 12]
    by_group = {(p.pid, p.nodule_group): (p.severity, p.reason) for p in problems.problems}
    assert by_group[("100001", 2)][0] == "dropped" and "outside" in by_group[("100001", 2)][1]
    assert by_group[("100001", 3)][0] == "repaired" and "clipped" in by_group[("100001", 3)][1]
    assert "not a usable exam" in by_group[("100001", 4)][1]
    assert "missing key" in by_group[("100001", 5)][1]
    assert "another" not in by_group[("100002", 1)][1] and "belongs to patient 100001" in by_group[("100002", 1)][1]


def test_empty_tracking_file_is_reported(tmp_path):
    torch.save({}, tmp_path / "empty.pt")
    table, problems = build_tracking_table(load_tracking(tmp_path / "empty.pt"), _series(tmp_path))
    assert table.empty
    assert [p.reason for p in problems.problems] == ["the tracking file holds no nodules"]


def test_tracking_file_formats_and_hostile_pickles(tmp_path):
    tracking = {"100001": {1: {0: lesion("1000010a")}}}
    torch.save(tracking, tmp_path / "t.pt")
    (tmp_path / "t.p").write_bytes(pickle.dumps(list(tracking.items())))
    assert dict(load_tracking(tmp_path / "t.pt")) == dict(load_tracking(tmp_path / "t.p")) == tracking
    (tmp_path / "evil.p").write_bytes(b"cos\nsystem\n(S'echo owned'\ntR.")
    with pytest.raises(TrackingFileError, match="refusing"):
        load_tracking(tmp_path / "evil.p")
    (tmp_path / "junk.pt").write_text("not a torch file")
    with pytest.raises(TrackingFileError, match="cannot read"):
        load_tracking(tmp_path / "junk.pt")


def test_table_rebuilds_the_tracking_structure(tmp_path):
    tracking = {"100001": {1: {0: lesion("1000010a"), 1: lesion("1000011a", volume=50.5)}}}
    table, _ = build_tracking_table(tracking, _series(tmp_path))
    assert tracking_from_table(table) == tracking


class _RunsACommand:
    """Pickles to a call of os.system: what a hostile tracking file does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_pickle_that_calls_os_system_is_refused_and_runs_nothing(tmp_path, protocol):
    marker = tmp_path / "owned"
    tracking = {"100001": {1: {0: {**lesion("1000010a"), "volume": _RunsACommand(f"touch {marker}")}}}}
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(tracking, protocol=protocol))
    with pytest.raises(TrackingFileError, match=rf"refusing to load {os.name}\.system: only plain containers"):
        load_tracking(tmp_path / "evil.pkl")
    assert not marker.exists()
    pickle.loads((tmp_path / "evil.pkl").read_bytes())  # the same file through the standard unpickler runs it
    assert marker.exists()
