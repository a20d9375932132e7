"""benchmarks/forecast_ceiling.py: its nodules and pairs are the generator's, and its oracle wins where it must."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from noduleflow.evaluation.metrics import SummarySettings
from noduleflow.metadata.phantom import sample_anatomy
from noduleflow.metadata.synthetic import CohortConfig, _draw_schedule, _sample_nodules, generate_patient

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("forecast_ceiling", REPO / "benchmarks" / "forecast_ceiling.py")
ceiling = sys.modules[SPEC.name] = importlib.util.module_from_spec(SPEC)  # registered: it defines a dataclass
SPEC.loader.exec_module(ceiling)

# the quality cohort's nodules and schedule on small, coarse images (the benchmark draws no image)
SCREENING = CohortConfig(n_patients=2, seed=3, fov_mm=(200.0, 170.0, 120.0), pixel_spacing_mm=(1.4, 1.5),
                         slice_thicknesses_mm=(2.5,), second_series_fraction=0.0, preset="screening",
                         fates="screening", nodules_per_patient=(3, 4), late_nodule_fraction=0.3)


def test_pairs_and_true_volumes_are_those_of_the_generated_cohort(tmp_path):
    found, expected = [], []
    for index in range(SCREENING.n_patients):
        patient = generate_patient(SCREENING, index, tmp_path)
        truth = pd.DataFrame(patient["truth_nodules"]).sort_values(["nodule_group", "screen_timepoint"])
        for _, rows in truth.groupby("nodule_group"):  # consecutive exams of each nodule, from the truth
            rows = rows.to_dict("records")
            expected += [(a["pid"], a["nodule_group"], a["screen_timepoint"], b["screen_timepoint"],
                          b["days_since_baseline"] - a["days_since_baseline"], a["true_volume_mm3"],
                          b["true_volume_mm3"]) for a, b in zip(rows, rows[1:], strict=False)]
        # the same patient's nodules as the generator draws them (with its anatomy, for their places)
        rng = np.random.default_rng([SCREENING.seed, index])
        pattern, days = _draw_schedule(rng, SCREENING)
        tracks = _sample_nodules(rng, sample_anatomy(rng, SCREENING.fov_mm, fine=True), SCREENING, days)
        found += [row for track in tracks for row in ceiling.nodule_rows(patient["pid"], track, days)]
        # the benchmark's own draw without anatomy has the generator's exams
        exams = {(row["screen_timepoint"], row["days_since_baseline"]) for row in patient["manifest"]}
        drawn = ceiling.draw_nodules(SCREENING)
        drawn = drawn[drawn["pid"] == patient["pid"]]
        assert set(zip(drawn["screen_timepoint"], drawn["days_since_baseline"], strict=True)) <= exams
    pairs = ceiling.pairs_of(pd.DataFrame(found))
    got = sorted(zip(pairs["pid"], pairs["nodule_group"], pairs["screen_timepoint_a"], pairs["screen_timepoint_b"],
                     pairs["delta_days"], pairs["true_volume_a"], pairs["true_volume_b"], strict=True))
    expected = sorted(expected)
    assert len(expected) >= 8 and any(pair[2] > 0 for pair in expected)  # pairs from a later exam too
    assert [pair[:5] for pair in got] == [pair[:5] for pair in expected]
    assert np.allclose([pair[5:] for pair in got], [pair[5:] for pair in expected], rtol=1e-9, atol=0.0)  # mm^3


def test_log_sigma_gives_the_requested_median_error():
    sigma = ceiling.log_sigma(0.082)
    errors = np.abs(np.exp(sigma * np.random.default_rng(0).standard_normal(400_000)) - 1.0)
    assert np.median(errors) == pytest.approx(0.082, abs=0.001)
    assert ceiling.log_sigma(0.0) == 0.0


def test_the_oracle_beats_median_growth_on_a_large_cohort_and_the_draw_repeats():
    config = CohortConfig(n_patients=400, seed=1, preset="screening", fates="screening")
    sigma = ceiling.log_sigma(0.082)
    pairs = ceiling.pairs_of(ceiling.measured(ceiling.draw_nodules(config), sigma, config.seed))
    reference = ceiling.fit_reference(pairs, "annual", 1)
    settings = SummarySettings(stable_band=0.25, bootstrap=200, confidence=0.95, seed=0)
    cohort = CohortConfig(n_patients=250, seed=2, preset="screening", fates="screening")
    fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
    rows = {row["method"]: row for row in ceiling.trial(cohort, sigma, 42, fractions, "test", reference, "annual",
                                                        settings)}
    assert set(rows) == set(ceiling.FORECASTERS) and rows["oracle"]["pairs"] > 120
    assert rows["oracle"]["high"] < 0 < rows["oracle"]["direction"] - rows["median_growth"]["direction"]
    assert rows["oracle"]["mae"] < rows["look"]["mae"]
    assert rows["median_growth"]["mae_minus_median_growth"] == 0.0
    assert ceiling.draw_nodules(cohort).equals(ceiling.draw_nodules(cohort))
