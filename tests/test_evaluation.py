"""Evaluation: metric definitions, baselines, the segmenters, per-pair forecasts and the stage's outputs."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from conftest import config_settings, forecast_config, make_workdir, planned_jobs, run_settings, snakemake
from noduleflow.cache.datasets import NodulePairs
from noduleflow.cache.patches import PatchSettings
from noduleflow.cache.segmenter import HalfMaximumSegmenter, LearnedSegmenter, build_segmenter
from noduleflow.evaluation import metrics
from noduleflow.evaluation.forecast import (
    dice,
    evaluate_run,
    forecast_size,
    growth_region,
    image_scores,
    union_box,
)
from noduleflow.hu import to_unit_range
from noduleflow.models.flow import VelocityNet
from noduleflow.models.training import save_model

SEGMENTER = config_settings(HalfMaximumSegmenter, "segmentation")
SUMMARY = config_settings(metrics.SummarySettings, "evaluation", seed=0)
PATCH = config_settings(PatchSettings, "patch", spacing_mm=(0.7, 0.7, 2.5), size=(128, 128, 32))


def test_relative_error_is_symmetric_bounded_and_defined_at_zero():
    error = metrics.relative_error([0.0, 0.0, 100.0, 150.0, 50.0], [0.0, 10.0, 100.0, 50.0, 150.0])
    np.testing.assert_allclose(error, [0.0, 2.0, 0.0, 1.0, 1.0])


def test_growth_class_uses_the_stable_band_and_handles_zero_priors():
    before = np.array([100.0, 100.0, 100.0, 100.0, 0.0, 0.0])
    after = np.array([126.0, 124.0, 76.0, 74.0, 5.0, 0.0])
    assert metrics.growth_class(before, after, 0.25).tolist() == [1, 0, 0, -1, 1, 0]
    assert metrics.growth_class(before, after, 0.0).tolist() == [1, 1, -1, -1, 1, 0]


def test_r_squared_and_growth_rates_by_hand():
    assert metrics.r_squared([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0
    assert metrics.r_squared([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
    assert np.isnan(metrics.r_squared([1.0, 2.0], [5.0, 5.0]))
    rates = metrics.annual_growth_rates([100.0, 100.0, 0.0], [200.0, 50.0, 10.0], [365.25, 730.5, 365.25])
    np.testing.assert_allclose(rates, [2.0, 0.5 ** 0.5])  # the pair with a zero prior has no rate
    np.testing.assert_allclose(metrics.median_growth_forecast([100.0, 10.0], [365.25, 730.5], 2.0), [200.0, 40.0])


def _hand_table() -> pd.DataFrame:
    """Three pairs: a run's forecasts and copy-prior rows, with sizes chosen to make every number easy."""
    base = pd.DataFrame({"pair": [0, 1, 2], "prior_size": [100.0, 200.0, 50.0], "real_size": [150.0, 200.0, 20.0],
                         "delta_days": [365.25, 365.25, 730.5], "true_size": [140.0, 210.0, 25.0],
                         "prior_forecast_size": [110.0, 200.0, 50.0]})
    images = {"dice": [0.5, 1.0, 0.0], "ssim": [0.9, 1.0, 0.5], "psnr": [30.0, 40.0, 20.0],
              "ssim_nodule": [0.8, 1.0, 0.4], "psnr_nodule": [25.0, 35.0, 15.0]}
    model = base.assign(method="run", predicted_size=[160.0, 180.0, 30.0], predicted_q10=[140.0, 170.0, 10.0],
                        predicted_q90=[170.0, 210.0, 15.0], crps=[6.0, 12.0, 5.0], **images)
    copy = base.assign(method=metrics.COPY_PRIOR, predicted_size=base["prior_forecast_size"], predicted_q10=np.nan,
                       predicted_q90=np.nan, crps=[40.0, 0.0, 30.0], **images)
    return pd.concat([model, copy], ignore_index=True)


def _values(summary: pd.DataFrame, method: str) -> dict[str, float]:
    return summary[summary["method"] == method].set_index("metric")["value"].to_dict()


def test_baselines_and_summaries_reproduce_a_hand_built_table():
    pairs = metrics.with_baselines(_hand_table(), annual_rate=1.2)
    summary = metrics.summarise(pairs, "run", dataclasses.replace(SUMMARY, bootstrap=200, seed=3))
    model, copy, growth = (_values(summary, m) for m in ("run", metrics.COPY_PRIOR, metrics.MEDIAN_GROWTH))
    assert model["mae"] == pytest.approx((10 + 20 + 10) / 3)
    assert model["median_ae"] == pytest.approx(10.0)
    assert model["rmse"] == pytest.approx(np.sqrt((100 + 400 + 100) / 3))
    assert model["direction_accuracy"] == 1.0
    assert model["mae_true"] == pytest.approx((20 + 30 + 5) / 3)
    assert copy["mae"] == pytest.approx((40 + 0 + 30) / 3)
    assert copy["direction_accuracy"] == pytest.approx(1 / 3)  # only the stable pair
    forecast = np.array([110 * 1.2, 200 * 1.2, 50 * 1.44])  # the prior as forecasts measure it, scaled
    assert growth["mae"] == pytest.approx(np.mean(np.abs(forecast - [150.0, 200.0, 20.0])))
    assert "dice" not in growth and model["dice"] == pytest.approx(0.5) and model["median_dice"] == 0.5
    assert model["crps"] == pytest.approx(23 / 3) and model["coverage_80"] == pytest.approx(2 / 3)  # 20 > 15
    assert growth["crps"] == pytest.approx(growth["mae"]) and "coverage_80" not in growth  # a point forecast
    assert model["mae_minus_median_growth"] == pytest.approx(model["mae"] - growth["mae"])
    assert model["crps_minus_copy_prior"] == pytest.approx(23 / 3 - 70 / 3)
    assert model["direction_accuracy_minus_copy_prior"] == pytest.approx(2 / 3)
    rows = summary.dropna(subset=["ci_low"])
    assert ((rows["ci_low"] <= rows["value"] + 1e-9) & (rows["value"] <= rows["ci_high"] + 1e-9)).all()
    again = metrics.summarise(pairs, "run", dataclasses.replace(SUMMARY, bootstrap=200, seed=3))
    pd.testing.assert_frame_equal(summary, again)


def _two_forecasts(run_errors: np.ndarray, baseline_errors: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Point forecasts of a run and a baseline on the same pairs (real size 1000, priors 1000: all stable)."""
    base = pd.DataFrame({"pair": np.arange(len(run_errors)), "prior_size": 1000.0, "prior_forecast_size": 1000.0,
                         "real_size": 1000.0})
    run, baseline = (base.assign(predicted_size=1000.0 + e, crps=np.abs(e)) for e in (run_errors, baseline_errors))
    return run, baseline.sample(frac=1.0, random_state=0)  # rows in another order: pairs are matched, not rows


def test_the_paired_bootstrap_has_the_known_answer_on_a_hand_made_table():
    settings = dataclasses.replace(SUMMARY, bootstrap=300, seed=1)
    size = metrics.SIZE_METRICS
    errors = np.array([100.0, 10.0, -150.0, 80.0, 200.0, -20.0, 240.0, 60.0])  # all within the stable band
    run, baseline = _two_forecasts(np.sign(errors) * (np.abs(errors) - 5.0), errors)  # every pair 5 closer
    for name in ("mae", "crps"):  # the same difference in every resample of whole pairs
        assert metrics.paired_difference(run, baseline, size[name], settings) == pytest.approx((-5.0, -5.0, -5.0))
    assert metrics.paired_difference(run, baseline, size["direction_accuracy"], settings) == (0.0, 0.0, 0.0)
    # the baseline calls every stable nodule grown or shrunk, the run is exact: +1 direction, -300 mm^3
    run, baseline = _two_forecasts(np.zeros(8), np.where(errors > 0, 300.0, -300.0))
    assert metrics.paired_difference(run, baseline, size["direction_accuracy"], settings) == (1.0, 1.0, 1.0)
    assert metrics.paired_difference(run, baseline, size["mae"], settings) == pytest.approx((-300.0,) * 3)


def test_a_small_paired_difference_is_resolved_where_the_two_intervals_overlap():
    rng = np.random.default_rng(0)
    errors = rng.uniform(0.0, 1000.0, 60)
    run, baseline = _two_forecasts(errors * 0.95, errors)  # 5 % better on every pair
    settings = dataclasses.replace(SUMMARY, bootstrap=500, seed=2)
    mae = metrics.SIZE_METRICS["mae"]
    _, run_low, run_high = metrics.bootstrap(run, mae, settings)
    _, base_low, base_high = metrics.bootstrap(baseline, mae, settings)
    assert base_low < run_high  # the per-forecast intervals overlap: by eye, no difference
    value, low, high = metrics.paired_difference(run, baseline, mae, settings)
    assert value == pytest.approx(-0.05 * errors.mean()) and low < value < high < 0  # paired: the run is better
    with pytest.raises(ValueError, match="different pairs"):
        metrics.paired_difference(run, baseline.iloc[1:], mae, settings)


def test_crps_and_coverage_of_a_sampler_with_known_quantiles():
    rng = np.random.default_rng(4)
    # a normal forecast N(mu, sigma) against y: CRPS = sigma (z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi))
    mu, sigma, y = 100.0, 20.0, 130.0
    z = (y - mu) / sigma
    closed = sigma * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / np.sqrt(np.pi))
    assert metrics.sample_crps(rng.normal(mu, sigma, 4000), y) == pytest.approx(closed, rel=0.03)
    assert metrics.sample_crps(np.array([130.0]), 100.0) == 30.0  # a point forecast: the absolute error
    assert metrics.sample_crps(np.array([90.0, 110.0]), 100.0) == pytest.approx(10.0 - 10.0 / 2)
    # calibrated: the real size is one more draw from the forecast distribution -> 80 % coverage with many samples,
    # 7/9 with 8 (their range: a ninth draw falls outside it with probability 2/9)
    coverage = metrics.INTERVAL_METRICS["coverage_80"]
    for samples, expected in ((200, 0.8), (8, 7 / 9)):
        rows = []
        for pair in range(1000):
            centre = rng.uniform(50.0, 500.0)
            rows.append({"pair": pair, "real_size": rng.normal(centre, 30.0),
                         **metrics.forecast_distribution(rng.normal(centre, 30.0, samples), 0.0)})
        table = pd.DataFrame(rows)
        assert coverage({c: table[c].to_numpy() for c in table}, None) == pytest.approx(expected, abs=0.04)
    too_narrow = table.assign(predicted_q10=table["predicted_size"] - 5, predicted_q90=table["predicted_size"] + 5)
    assert coverage({c: too_narrow[c].to_numpy() for c in too_narrow}, None) < 0.3
    eight = metrics.forecast_distribution(np.arange(8.0), 3.0)
    assert eight["predicted_size"] == 3.5 and eight["samples"] == 8
    assert (eight["predicted_q10"], eight["predicted_q90"]) == (0.0, 7.0)
    assert metrics.forecast_distribution(np.arange(20.0), 3.0)["predicted_q10"] == pytest.approx(1.1)
    point = metrics.forecast_distribution(np.array([7.0]), 3.0)
    assert np.isnan(point["predicted_q10"]) and point["crps"] == 4.0


def test_the_kind_growth_reference_scales_each_prior_by_its_kinds_rate():
    table = _hand_table().assign(kind=["solid", "calcified", "ground_glass"] * 2)
    pairs = metrics.with_baselines(table, annual_rate=1.2, kind_rates={"solid": 2.0, "calcified": 1.0})
    kind = pairs[pairs["method"] == metrics.KIND_GROWTH].sort_values("pair")
    # ground glass has no rate of its own: the overall 1.2 per year, over two years
    assert kind["predicted_size"].tolist() == pytest.approx([220.0, 200.0, 50 * 1.44])
    assert kind["dice"].isna().all()
    summary = _values(metrics.summarise(pairs, "run", dataclasses.replace(SUMMARY, bootstrap=0)), metrics.KIND_GROWTH)
    assert summary["mae"] == pytest.approx((70 + 0 + 52) / 3)
    assert summary["direction_accuracy"] == pytest.approx(2 / 3)  # growth and stable right; 1.44x is no shrink
    assert metrics.KIND_GROWTH not in set(metrics.with_baselines(_hand_table(), 1.2, {"solid": 2.0})["method"])


def test_segmenter_accuracy_is_reported_overall_per_kind_and_per_attachment():
    truth = pd.DataFrame({"exam_id": ["a"] * 5 + ["b"], "nodule_group": [1, 2, 3, 4, 5, 1],
                          "primary_series": [True] * 5 + [False],
                          "true_volume_mm3": [100.0, 200.0, 400.0, 30.0, 100.0, 9.0],
                          "kind": ["solid", "solid", "ground_glass", "solid", "ground_glass", "solid"],
                          "attached_to": ["", "pleura", "vessel", "", "", ""]})
    measured = pd.DataFrame({"exam_id": ["a"] * 5 + ["b"], "nodule_group": [1, 2, 3, 4, 5, 1],
                             "nodule_volume": [110.0, 140.0, 400.0, 90.0, 80.0, 1.0]})
    table = metrics.segmenter_accuracy(measured, truth, min_volume=50.0).set_index(["group", "value"])
    # errors of the 4 nodules above 50 mm^3 (the 30 mm^3 one and the second series are left out): +0.1, -0.3, 0, -0.2
    assert table.loc[("all", "all"), "nodules"] == 4
    assert table.loc[("all", "all"), "median_abs_relative_error"] == pytest.approx(0.15)
    assert table.loc[("all", "all"), "median_relative_error"] == pytest.approx(-0.1)
    assert table.loc[("all", "all"), "fraction_within_15_percent"] == pytest.approx(0.5)
    assert table.loc[("kind", "solid"), "median_abs_relative_error"] == pytest.approx(0.2)
    assert table.loc[("kind", "ground_glass"), "fraction_within_25_percent"] == pytest.approx(1.0)
    assert list(table.loc["attached_to"].index) == ["none", "pleura", "vessel"]
    assert table.loc[("attached_to", "pleura"), "median_relative_error"] == pytest.approx(-0.3)
    assert table.loc[("attached_to", "none"), "nodules"] == 2
    without = metrics.segmenter_accuracy(measured, truth.drop(columns="attached_to"), min_volume=50.0)
    assert set(without["group"]) == {"all", "kind"}


def test_direction_of_the_hand_table():
    table = _hand_table()
    run = table[table["method"] == "run"]
    assert metrics.growth_class(run["prior_size"], run["real_size"], 0.25).tolist() == [1, 0, -1]
    assert metrics.growth_class(run["prior_forecast_size"], run["predicted_size"], 0.25).tolist() == [1, 0, -1]


def test_ranking_orders_forecasts_within_each_dimension_and_lists_shared_baselines_once():
    summaries = pd.DataFrame({
        "run": ["a", "a", "c", "c", "b", "b", "a"], "dims": [3, 3, 3, 3, 2, 2, 3],
        "method": ["a", "copy_prior", "c", "copy_prior", "b", "copy_prior", "segmented_follow_up"],
        "metric": ["mae"] * 6 + ["mae_true"], "value": [5.0, 7.0, 6.0, 7.0, 9.0, 3.0, 1.0]})
    table = metrics.ranking(summaries)
    assert table[["dims", "rank", "run", "method"]].values.tolist() == [
        [2, 1, "b", "copy_prior"], [2, 2, "b", "b"], [3, 1, "a", "a"], [3, 2, "c", "c"], [3, 3, "a", "copy_prior"]]


def test_dice_and_image_scores_on_edge_cases():
    empty, blob = np.zeros((4, 8, 8), bool), np.zeros((4, 8, 8), bool)
    blob[1:3, 2:5, 2:5] = True
    assert dice(empty, empty) == 1.0 and dice(blob, empty) == 0.0 and dice(blob, blob) == 1.0
    half = blob.copy()
    half[1] = False
    assert dice(half, blob) == pytest.approx(2 * 9 / (9 + 18))
    image = np.random.default_rng(0).uniform(-1, 1, (6, 24, 24)).astype(np.float32)
    ssim, psnr = image_scores(image, image)
    assert ssim == pytest.approx(1.0) and psnr == np.inf
    ssim, psnr = image_scores(image, image + 0.1)
    assert ssim < 1.0 and psnr == pytest.approx(10 * np.log10(4.0 / 0.01), rel=1e-4)
    assert image_scores(image[:1], image[:1] * 0.5)[0] < 1.0  # one slice: 2D SSIM
    assert union_box([1, 4, 2, 6, 0, 1], [2, 8, 0, 3, 1, 2]) == [1, 8, 0, 6, 0, 2]


def _sphere_patch(radius_mm: float, size=(32, 32, 8), spacing=(0.7, 0.7, 2.5), hu=40.0, shift=(0, 0, 0),
                  noise_hu=0.0) -> np.ndarray:
    """A (Z, Y, X) HU patch of parenchyma with a sphere in the middle, or `shift` (x, y, z voxels) from it (3x
    supersampled partial volume), plus seeded Gaussian noise of `noise_hu`."""
    fine = [np.arange(n * 3) / 3.0 - (n - 1) / 2.0 - 1 / 3.0 - s
            for n, s in zip(reversed(size), reversed(shift), strict=True)]
    z, y, x = np.meshgrid(*fine, indexing="ij")
    inside = ((x * spacing[0]) ** 2 + (y * spacing[1]) ** 2 + (z * spacing[2]) ** 2) <= radius_mm ** 2
    fraction = inside.reshape(size[2], 3, size[1], 3, size[0], 3).mean(axis=(1, 3, 5))
    return -850.0 + fraction * (hu + 850.0) + np.random.default_rng(0).normal(0.0, noise_hu, fraction.shape)


def _tight_box(patch_hu: np.ndarray) -> list[int]:
    """The annotated box (i0, i1, j0, j1, k0, k1) of the nodule in a noise-free sphere patch."""
    z, y, x = np.nonzero(patch_hu > -400.0)
    return [int(y.min()), int(y.max()), int(x.min()), int(x.max()), int(z.min()), int(z.max())]


@pytest.mark.parametrize(("prior_mm", "forecast_mm", "shift", "hu"), [
    (4.0, 5.5, (0, 0, 0), 40.0),  # grew past the prior's box: the box follows the nodule out
    (4.0, 8.0, (0, 0, 0), 40.0),  # grew far beyond the prior's box (the union-box measurement gave 0 mm^3)
    (4.0, 8.0, (0, 0, 0), -620.0),  # the same, ground glass
    (6.0, 3.0, (0, 0, 0), 40.0),  # shrank to a quarter of the prior's box
    (6.0, 3.0, (0, 0, 0), -620.0),  # the same, ground glass (the prior's box alone loses it)
    (4.0, 4.0, (8, 0, 0), 40.0),  # moved 5.6 mm, off the prior's box
    (4.0, 4.0, (6, -6, 1), -620.0),  # moved 6 mm in-plane and a slice
])
def test_forecast_size_measures_larger_smaller_and_shifted_forecasts_within_15_percent(prior_mm, forecast_mm, shift,
                                                                                      hu):
    patch = dataclasses.replace(PATCH, size=(48, 48, 12))
    prior_box = _tight_box(_sphere_patch(prior_mm, size=patch.size))
    forecast = to_unit_range(_sphere_patch(forecast_mm, size=patch.size, hu=hu, shift=shift, noise_hu=15.0),
                             patch.hu_window)
    size = forecast_size(forecast, prior_box, 365.0, patch, SEGMENTER, forecast_config())
    assert size == pytest.approx(4 / 3 * np.pi * forecast_mm ** 3, rel=0.15)


def test_forecast_size_only_looks_as_far_as_the_interval_allows():
    patch = dataclasses.replace(PATCH, size=(48, 48, 12))
    prior_box = _tight_box(_sphere_patch(2.0, size=patch.size))
    far = to_unit_range(_sphere_patch(3.0, size=patch.size, shift=(16, 0, 0)), patch.hu_window)  # 11 mm away
    quick, slow = forecast_config(shift_mm=2.0, fastest_doubling_days=30.0), forecast_config(shift_mm=2.0)
    assert forecast_size(far, prior_box, 30.0, patch, SEGMENTER, slow) == 0.0  # out of reach: gone
    assert forecast_size(far, prior_box, 365.0, patch, SEGMENTER, quick) > 0.0
    region = growth_region(prior_box, 0.0, patch.spacing_mm, (12, 48, 48), forecast_config(shift_mm=1.4))
    assert [(s.start, s.stop) for s in region] == [(prior_box[4] - 1, prior_box[5] + 2),
                                                   (prior_box[0] - 2, prior_box[1] + 3),
                                                   (prior_box[2] - 2, prior_box[3] + 3)]
    empty = to_unit_range(_sphere_patch(0.0, size=patch.size, noise_hu=15.0), patch.hu_window)
    assert forecast_size(empty, prior_box, 365.0, patch, SEGMENTER, forecast_config()) == 0.0


def test_forecast_size_leaves_out_anatomy_that_runs_out_of_the_patch():
    # a pleural nodule's patch: chest wall over half of it, with a rib. When the faint prior cannot be found, the
    # region a long interval allows is the whole patch, and looking for the nodule there found the wall's lung
    # side (882 mm^3 before components reaching the patch's border were left out)
    patch = dataclasses.replace(PATCH, size=(48, 48, 12))
    prior_box = _tight_box(_sphere_patch(2.0, size=patch.size))

    def chest(image: np.ndarray) -> np.ndarray:
        image[:, :, :26] = 40.0 + np.random.default_rng(1).normal(0.0, 15.0, image[:, :, :26].shape)
        image[:, 10:20, 2:8] = 300.0
        return to_unit_range(image, patch.hu_window)

    empty = chest(_sphere_patch(0.0, size=patch.size, noise_hu=15.0))
    assert forecast_size(empty, prior_box, 700.0, patch, SEGMENTER, forecast_config()) == 0.0


class _Threshold(torch.nn.Module):
    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        return (hu > -400.0).float()


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("file_format", ["torchscript", "export"])
def test_a_learned_segmenter_file_keeps_the_component_at_the_box(tmp_path, file_format):
    patch = _sphere_patch(4.0)
    patch[:, 1:4, 1:4] = 40.0  # a second bright blob far from the box
    if file_format == "torchscript":
        path = str(tmp_path / "segmenter.pt")
        torch.jit.script(_Threshold()).save(path)
    else:
        path = str(tmp_path / "segmenter.pt2")
        torch.export.save(torch.export.export(_Threshold(), (torch.zeros(1, 1, *patch.shape),)), path)
    segmenter = build_segmenter({"model": path, "threshold": 0.5, "margin_voxels": [20, 20, 4], "level": 0.5,
                                 "min_contrast_hu": 100})
    assert isinstance(segmenter, LearnedSegmenter)
    mask = segmenter(patch, [13, 18, 13, 18, 3, 4])
    assert mask.sum() == ((patch > -400) & (np.indices(patch.shape)[1] > 5)).sum() and not mask[:, 1:4, 1:4].any()


def _pairs_cache(folder, priors, follow_ups, box) -> NodulePairs:
    """A one-shard cache of prior/follow-up patches (unit range) with the pairs table NodulePairs reads."""
    patches = np.stack([p for pair in zip(priors, follow_ups, strict=True) for p in pair])[:, None]
    np.save(folder / "000.npy", patches.astype(np.float32))
    np.save(folder / "000_slices.npy", patches[:, :, patches.shape[2] // 2].astype(np.float32))
    count = len(priors)
    keys = [f"1_e{i}{side}_{j}" for i in range(count) for side, j in (("a", 0), ("b", 1))]
    pd.DataFrame({"nodule_key": keys, "shard_file": "000.npy", "slice_file": "000_slices.npy",
                  "offset": range(2 * count), "bbox": [box] * (2 * count)}).to_parquet(folder / "index.parquet")
    pairs = pd.DataFrame({"pid": [f"p{i}" for i in range(count)], "nodule_group": 1,
                          "exam_a": [f"e{i}a" for i in range(count)], "exam_idx_a": 0,
                          "exam_b": [f"e{i}b" for i in range(count)], "exam_idx_b": 1, "delta_days": 365.0})
    return NodulePairs(folder, pairs)


def _untrained_run(tmp_path, run):
    """Two sphere pairs (follow-up = prior, follow-up larger) and an untrained run saved as tmp_path/model.pt."""
    window = (-2000.0, 500.0)
    small, large = (to_unit_range(_sphere_patch(r), window) for r in (3.0, 4.5))
    raw = _pairs_cache(tmp_path, [small, small], [small, large], [12, 19, 12, 19, 2, 5])
    hparams = {"spatial_dims": 3, "data_channels": 1, "prior_channels": 0 if run["formulation"] == "bridge" else 1,
               "interval_dim": 8, "channels": [8, 8], "attention_levels": [False, True], "num_res_blocks": 1,
               "num_head_channels": 8, "norm_num_groups": 4}
    save_model(tmp_path / "model.pt", VelocityNet(hparams), {**hparams, "run": run_settings(**run).record()})
    return raw


def test_an_untrained_bridge_run_copies_the_prior_and_sizes_match_the_spheres(tmp_path):
    """MONAI zero-initialises the velocity net's output, so an untrained bridge flow returns its start: the prior."""
    raw = _untrained_run(tmp_path, {"space": "raw", "formulation": "bridge", "interval": True})
    result = evaluate_run(model_path=tmp_path / "model.pt", raw=raw, model_data=raw, decode=None, patch=PATCH,
                          segmenter=SEGMENTER, settings=forecast_config(steps=2, examples=1), run_name="untrained")
    table = result.table
    assert set(table["method"]) == {"untrained", metrics.COPY_PRIOR} and len(table) == 4
    for method in ("untrained", metrics.COPY_PRIOR):
        rows = table[table["method"] == method].set_index("pair")
        assert rows.loc[0, "dice"] == 1.0 and rows.loc[0, "psnr"] == np.inf  # follow-up == prior: Dice 1
        np.testing.assert_allclose(rows["predicted_size"], rows["prior_forecast_size"], rtol=1e-6)
        np.testing.assert_allclose(rows["predicted_size"], rows["prior_size"], rtol=0.05)  # both paths agree
        assert rows.loc[1, "dice"] < 0.8
    sizes = table.drop_duplicates("pair").set_index("pair")
    assert sizes.loc[0, "prior_size"] == pytest.approx(4 / 3 * np.pi * 3.0 ** 3, rel=0.15)
    assert sizes.loc[1, "real_size"] == pytest.approx(4 / 3 * np.pi * 4.5 ** 3, rel=0.15)
    assert table["dims"].eq(3).all() and len(result.examples) == 1


@pytest.mark.slow  # trains a run, then samples every pair several times
def test_a_noisy_prior_run_draws_seeded_samples_around_the_prior(tmp_path):
    """Untrained (zero velocity), a noisy_prior flow returns its start: the prior plus start_noise times the noise,
    so a pair whose follow-up equals its prior has PSNR 20 log10(2 / start_noise) against it, for every sample."""
    raw = _untrained_run(tmp_path, {"space": "raw", "formulation": "noisy_prior", "start_noise": 0.05,
                                    "interval": True})

    def evaluate():
        return evaluate_run(model_path=tmp_path / "model.pt", raw=raw, model_data=raw, decode=None, patch=PATCH,
                            segmenter=SEGMENTER, settings=forecast_config(samples=2, steps=2, examples=0),
                            run_name="noisy").table

    table = evaluate()
    forecasts = table[table["method"] == "noisy"].set_index("pair")
    assert forecasts["samples"].eq(2).all() and table.groupby("method")["pair"].nunique().eq(2).all()
    assert forecasts.loc[0, "psnr"] == pytest.approx(20 * np.log10(2 / 0.05), abs=0.3)  # mean over the samples
    assert (forecasts["predicted_q10"] < forecasts["predicted_q90"]).all()  # each sample has its own noise
    assert (forecasts["predicted_q10"] <= forecasts["predicted_size"]).all()
    assert (forecasts["predicted_size"] <= forecasts["predicted_q90"]).all()
    assert (forecasts["crps"] <= (forecasts["predicted_size"] - forecasts["real_size"]).abs() + 1e-9).all()
    pd.testing.assert_frame_equal(evaluate(), table)  # and the noise is seeded


@pytest.mark.slow
def test_the_evaluation_stage_writes_numbers_summaries_a_ranking_and_a_report(demo_run):
    folder = demo_run / "results" / "evaluation"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["val"]  # the test split stays untouched
    runs = sorted(p.name for p in (folder / "val").iterdir() if p.is_dir())
    assert runs == ["latent3d_noise", "raw3d_bridge", "slices2d_bridge"]
    val_pairs = pd.read_parquet(demo_run / "results" / "registration" / "val" / "paired_nodules.parquet")
    for run in runs:
        pairs = pd.read_csv(folder / "val" / run / "pairs.csv")
        assert len(pairs) > 0 and pd.api.types.is_float_dtype(pairs["predicted_size"])
        assert set(pairs["exam_b"].astype(str)) <= set(val_pairs["exam_b"].astype(str))
        assert pairs["dice"].between(0, 1).all() and pairs["ssim"].le(1).all()
        forecasts = pairs[pairs["method"] == run]
        assert forecasts["samples"].eq(8 if run == "latent3d_noise" else 1).all()
        assert forecasts["predicted_q10"].notna().all() == (run == "latent3d_noise")
        error = (forecasts["predicted_size"] - forecasts["real_size"]).abs()
        if run == "latent3d_noise":  # a spread of samples: CRPS = E|X - y| - E|X - X'| / 2, never negative
            assert forecasts["crps"].ge(0).all() and forecasts["crps"].notna().all()
        else:  # one forecast: CRPS is its absolute error
            assert forecasts["crps"].to_numpy() == pytest.approx(error.to_numpy())
        assert ("true_size" in pairs) == (run != "slices2d_bridge")
        assert set(pairs["kind"]) <= {"solid", "part_solid", "ground_glass", "calcified"}
        summary = pd.read_csv(folder / "val" / run / "summary.csv")
        assert {run, "copy_prior", "median_growth", "kind_growth"} <= set(summary["method"])
        copy, model = _values(summary, "copy_prior"), _values(summary, run)
        copy_rows = pairs.query("method == 'copy_prior'")
        assert copy["mae"] == pytest.approx((copy_rows["predicted_size"] - copy_rows["real_size"]).abs().mean())
        assert copy["crps"] == pytest.approx(copy["mae"])
        assert ("coverage_80" in model) == (run == "latent3d_noise")
        for baseline in ("copy_prior", "median_growth", "kind_growth"):
            for metric in ("mae", "direction_accuracy", "crps"):
                difference = summary.query(f"method == @run and metric == '{metric}_minus_{baseline}'").iloc[0]
                assert difference["value"] == pytest.approx(model[metric] - _values(summary, baseline)[metric])
    table = pd.read_csv(folder / "val" / "runs.csv")
    assert set(table["dims"]) == {2, 3} and table.groupby("dims")["rank"].min().eq(1).all()
    assert {"crps", "mae_minus_median_growth", "mae_minus_median_growth_low", "mae_minus_median_growth_high",
            "direction_accuracy_minus_kind_growth", "crps_minus_copy_prior"} <= set(table.columns)
    rates = json.loads((folder / "train_growth_rates.json").read_text())
    assert rates["3"]["pairs"] > 0 and 0.5 < rates["3"]["annual_rate"] < 4
    assert set(rates["3"]["by_kind"]) <= {"solid", "part_solid", "ground_glass", "calcified"}
    snakemake(demo_run, "--report", "report.html")
    report = (demo_run / "report.html").read_text(errors="replace")
    assert "montage.png" in report and "runs.csv" in report


def test_runs_are_compared_on_val_and_only_the_shipped_ones_reach_test(tmp_path):
    workdir = make_workdir(tmp_path, evaluation={"test_runs": ["raw3d_bridge"]})
    assert planned_jobs(snakemake(workdir, "-n", "evaluation"))["evaluate_run"] == 3
    plan = snakemake(workdir, "-n", "test_evaluation")
    assert planned_jobs(plan)["evaluate_run"] == 1 and "results/evaluation/test/raw3d_bridge/pairs.csv" in plan.stdout
    (workdir / "config" / "config.yaml").write_text((workdir / "config" / "config.yaml").read_text().replace(
        "- raw3d_bridge", "- no_such_run"))
    result = snakemake(workdir, "-n", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "evaluation.test_runs" in output and "no_such_run" in output


@pytest.mark.slow
def test_the_default_segmenter_measures_synthetic_nodules_within_15_percent(demo_run):
    accuracy = pd.read_csv(demo_run / "results" / "evaluation" / "segmenter_accuracy.csv").iloc[0]
    assert accuracy["nodules"] >= 20
    assert accuracy["median_abs_relative_error"] < 0.15 and abs(accuracy["median_relative_error"]) < 0.1
    assert accuracy["fraction_within_25_percent"] >= 0.75
