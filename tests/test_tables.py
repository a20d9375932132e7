"""Patient-level splits, one exam per timepoint, timelines and consecutive exam pairs."""

import numpy as np
import pandas as pd

from conftest import config_settings
from noduleflow.metadata.tables import SeriesFilter, assign_splits, computed_split, split_tables
from noduleflow.problems import ProblemLog

SERIES_FILTER = config_settings(SeriesFilter, "series_filter")

FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


def _series(rows):
    frame = pd.DataFrame(rows)
    defaults = {"pixel_spacing": 0.7, "num_slices": 120, "image_path": "x.nii.gz", "shape": [[10, 10, 120]],
                "spacing": [[0.7, 0.7, 1.0]], "origin": [[0.0, 0.0, 0.0]], "direction": [[1.0, 0, 0, 0, 1, 0, 0, 0, 1]],
                "split": pd.NA}
    for key, value in defaults.items():
        if key not in frame:
            frame[key] = value * len(frame) if isinstance(value, list) else value
    frame["series_uid"] = frame["exam_id"]
    return frame


def _row(pid, tp, exam_id, thickness=1.0, days=None, **extra):
    return {"pid": pid, "exam_id": exam_id, "screen_timepoint": tp, "slice_thickness": thickness,
            "days_since_baseline": float(365 * tp + 5 if days is None else days), **extra}


def _nodules(exam_ids):
    return pd.DataFrame({"pid": [e[:6] for e in exam_ids], "exam": exam_ids, "nodule_group": 1,
                         "exam_idx": 0})


def test_split_is_independent_of_row_order_and_of_other_patients():
    pids = [str(200000 + i) for i in range(3000)]
    splits = {pid: computed_split(pid, 42, FRACTIONS) for pid in pids}
    frame = pd.DataFrame({"pid": pids, "split": pd.NA})
    shuffled = frame.sample(frac=1.0, random_state=3)
    assert assign_splits(shuffled.iloc[:100], 42, FRACTIONS, ProblemLog("t")) == \
        {pid: splits[pid] for pid in shuffled["pid"].iloc[:100]}
    counts = pd.Series(splits).value_counts(normalize=True)
    for name, fraction in FRACTIONS.items():
        assert abs(counts[name] - fraction) < 0.025
    assert splits != {pid: computed_split(pid, 43, FRACTIONS) for pid in pids}


def test_provided_split_wins_and_a_patient_never_spans_two_splits():
    series = _series([_row("100001", 0, "a", split="test"), _row("100001", 1, "b", split="train"),
                      _row("100002", 0, "c")])
    problems = ProblemLog("t")
    splits = assign_splits(series, 42, FRACTIONS, problems)
    assert splits["100001"] == "train" and len(problems.problems) == 1
    assert splits["100002"] == computed_split("100002", 42, FRACTIONS)


def test_one_exam_per_timepoint_thinnest_first_and_consecutive_pairs():
    pid = "100001"
    rows = [
        _row(pid, 0, "1000010thick", 2.5), _row(pid, 0, "1000010thin", 1.0),
        _row(pid, 1, "1000011b", 1.25, days=372), _row(pid, 1, "1000011a", 1.25, days=372),  # tie: smaller id
        _row(pid, 2, "1000012x", 3.0),  # too thick: filtered
        _row(pid, 2, "1000012y", 2.0, days=741),
    ]
    series = _series(rows)
    series.loc[series["exam_id"] == "1000011b", "num_slices"] = 100  # the tie-break prefers more slices first
    nodules = _nodules(["1000010thin", "1000010thick", "1000011a", "1000011b", "1000012x", "1000012y"])
    split = computed_split(pid, 42, FRACTIONS)
    tables, problems = split_tables(series=series, nodules=nodules, split=split, seed=42, fractions=FRACTIONS,
                                    n_shards=4, series_filter=SERIES_FILTER)
    exams = tables["exams"]
    assert exams["exam_id"].tolist() == ["1000010thin", "1000011a", "1000012y"]
    assert exams["split"].unique().tolist() == [split]
    timeline = tables["timelines"].iloc[0]
    assert timeline["n_exams"] == 3 and timeline["fixed_exam_id"] == "1000010thin"
    assert list(timeline["exam_id"]) == exams["exam_id"].tolist()
    pairs = tables["paired_exams"]
    assert pairs[["exam_id_a", "exam_id_b"]].values.tolist() == [["1000010thin", "1000011a"],
                                                                 ["1000011a", "1000012y"]]
    np.testing.assert_allclose(pairs["delta_days"], [372 - 5, 741 - 372])
    dropped = {p.exam_id: p.reason for p in problems.problems}
    assert set(dropped) == {"1000010thick", "1000011b", "1000012x"}
    assert "thickness 3.0" in dropped["1000012x"]


def test_only_exams_with_nodules_are_kept_and_a_missing_timepoint_pairs_across_it():
    rows = [_row("100001", 0, "e0"), _row("100001", 1, "e1"), _row("100001", 2, "e2", days=800)]
    series = _series(rows)
    split = computed_split("100001", 42, FRACTIONS)
    nodules = pd.DataFrame({"pid": "100001", "exam": ["e0", "e2"], "nodule_group": 1, "exam_idx": [0, 2]})
    tables, _ = split_tables(series=series, nodules=nodules, split=split, seed=42, fractions=FRACTIONS, n_shards=2,
                             series_filter=SERIES_FILTER)
    assert tables["exams"]["exam_id"].tolist() == ["e0", "e2"]
    pair = tables["paired_exams"].iloc[0]
    assert (pair["exam_id_a"], pair["exam_id_b"], pair["delta_days"]) == ("e0", "e2", 795.0)
    other = next(name for name in FRACTIONS if name != split)
    empty, _ = split_tables(series=series, nodules=nodules, split=other, seed=42, fractions=FRACTIONS, n_shards=2,
                            series_filter=SERIES_FILTER)
    assert all(table.empty for table in empty.values())
