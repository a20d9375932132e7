"""Forecast metrics: volume errors, growth direction, calibration, summaries with bootstrap intervals and paired
differences, and the baselines.

A forecast is judged by the size of the nodule it shows (volume in mm^3 for 3D, area in mm^2 for 2D slices)
against the segmented real follow-up, and by its image against the real follow-up image (Dice of the two
segmentations, SSIM and PSNR, computed in `noduleflow.evaluation.forecast`). Two baselines get the same
metrics on the same pairs: `copy_prior` (the nodule stays as it is) and `median_growth` (the prior size scaled
by the train split's median growth rate over the pair's interval). On the synthetic cohort a third row,
`kind_growth`, scales the prior by the median growth rate of the train nodules of the same kind (solid,
part-solid, ground-glass, calcified). It is a reference, not a forecaster: it is told the kind, which a forecaster
has to read off the image, and it shows how far knowing the kind gets under this measurement (what is left is
the spread of growth within a kind and the segmenter's error on both exams).

Definitions (every one of them is defined at zero size):
- relative error: |predicted - real| / ((predicted + real) / 2), 0 when both are 0 (bounded by 2);
- growth class of a change from `before` to `after`: +1 if after > (1 + band) * before, -1 if
  after < (1 - band) * before, else 0 (band 0.25: the NELSON volume-change criterion);
- growth-direction accuracy: the fraction of pairs whose predicted class equals the real class. The real class is
  the change from the prior to the follow-up, each measured in its own box (`prior_size`, `real_size`); the
  predicted class is the change from the prior measured as forecasts are (`prior_forecast_size`, the copy-prior
  forecast's size) to the forecast, so a forecast is compared with the prior through one measurement path;
- a forecast of a pair is a set of sizes (one per sample; one for point forecasts): its point forecast
  (`predicted_size`) is their median, its 80 % interval their 10 % and 90 % quantiles (`predicted_q10`,
  `predicted_q90`, only where there are two samples or more); `coverage_80` is the fraction of pairs whose real
  size lies in that interval. The quantiles use the Weibull plotting positions (the k-th of m sorted samples is
  the k / (m + 1) quantile), so a calibrated forecast covers the real size 80 % of the time in expectation
  (with 8 samples the interval is their range, which holds a ninth draw 7/9 = 78 % of the time; numpy's default
  interpolation would give 64 %);
- CRPS (continuous ranked probability score) of a pair: E|X - y| - E|X - X'| / 2 over the forecast's samples X,
  X' (the energy form, with the empirical distribution of the samples); for a point forecast it is the absolute
  error, so distributions and point forecasts (the baselines) compare directly. Lower is better;
- a run against a baseline on the same pairs: `<metric>_minus_<baseline>` is the run's metric minus the
  baseline's (MAE and CRPS: below 0 is better; direction accuracy: above 0), with a paired bootstrap interval
  (both computed on the same resampled pairs). A run beats a baseline on a metric when that interval excludes 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

DAYS_PER_YEAR = 365.25
COPY_PRIOR, MEDIAN_GROWTH, KIND_GROWTH = "copy_prior", "median_growth", "kind_growth"
SEGMENTED_FOLLOW_UP = "segmented_follow_up"
BASELINES = (COPY_PRIOR, MEDIAN_GROWTH, KIND_GROWTH)
IMAGE_METRICS = ("dice", "ssim", "psnr", "ssim_nodule", "psnr_nodule")
SUMMARY_COLUMNS = ["run", "method", "metric", "value", "ci_low", "ci_high", "n_pairs"]
PAIRED_METRICS = ("mae", "direction_accuracy", "crps")  # compared with every baseline on the same pairs
QUANTILES = (0.1, 0.9)  # the forecast's 80 % interval


def relative_error(predicted: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Symmetric relative error |p - r| / mean(p, r); 0 where both are 0."""
    predicted, real = np.asarray(predicted, dtype=float), np.asarray(real, dtype=float)
    mean = (predicted + real) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean > 0, np.abs(predicted - real) / np.where(mean > 0, mean, 1.0), 0.0)


def growth_class(before: np.ndarray, after: np.ndarray, band: float) -> np.ndarray:
    """+1 grew, -1 shrank, 0 stable: a change beyond `band` times the earlier size."""
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    return np.where(after > (1.0 + band) * before, 1, np.where(after < (1.0 - band) * before, -1, 0))


def r_squared(predicted: np.ndarray, real: np.ndarray) -> float:
    """Coefficient of determination of the real values by the predicted ones (NaN when the real ones are constant)."""
    predicted, real = np.asarray(predicted, dtype=float), np.asarray(real, dtype=float)
    total = float(np.sum((real - real.mean()) ** 2))
    return 1.0 - float(np.sum((predicted - real) ** 2)) / total if total > 0 else float("nan")


def annual_growth_rates(prior: np.ndarray, follow_up: np.ndarray, delta_days: np.ndarray) -> np.ndarray:
    """Per pair, the size factor per year (follow_up / prior)^(365.25 / days); pairs with a zero size are left out."""
    prior, follow_up, days = (np.asarray(v, dtype=float) for v in (prior, follow_up, delta_days))
    usable = (prior > 0) & (follow_up > 0) & (days > 0)
    return (follow_up[usable] / prior[usable]) ** (DAYS_PER_YEAR / days[usable])


def median_growth_forecast(prior: np.ndarray, delta_days: np.ndarray, annual_rate: float | np.ndarray) -> np.ndarray:
    """The growth baselines: prior size times the annual rate (one, or one per pair) to the power of the interval
    in years."""
    return np.asarray(prior, dtype=float) * annual_rate ** (np.asarray(delta_days, dtype=float) / DAYS_PER_YEAR)


def sample_crps(samples: np.ndarray, real: float) -> float:
    """CRPS of the empirical distribution of `samples` against the real value (energy form); one sample: |x - y|."""
    x = np.asarray(samples, dtype=float)
    return float(np.abs(x - real).mean() - np.abs(x[:, None] - x[None, :]).mean() / 2.0)


def forecast_distribution(sizes: np.ndarray, real: float) -> dict[str, float]:
    """A pair's forecast from its samples' sizes: median, 10 / 90 % quantiles (NaN for fewer than 2) and CRPS."""
    sizes = np.asarray(sizes, dtype=float)
    low, high = np.quantile(sizes, QUANTILES, method="weibull") if sizes.size > 1 else (np.nan, np.nan)
    return {"predicted_size": float(np.median(sizes)), "predicted_q10": float(low), "predicted_q90": float(high),
            "crps": sample_crps(sizes, real), "samples": int(sizes.size)}


@dataclass(frozen=True)
class SummarySettings:
    """How summaries are computed (config key `evaluation`)."""

    stable_band: float  # relative size change that still counts as stable
    bootstrap: int  # resamples of the pairs for the confidence intervals
    confidence: float
    seed: int


Columns = Mapping[str, np.ndarray]
Metric = Callable[[Columns, SummarySettings], float]
"""metric(columns, settings) -> value; columns are per-row numpy arrays (prior_size, real_size, ...)."""


def _size_metrics() -> dict[str, Metric]:
    def errors(c: Columns) -> np.ndarray:
        return np.abs(c["predicted_size"] - c["real_size"])

    def direction(c: Columns, settings: SummarySettings) -> float:
        real = growth_class(c["prior_size"], c["real_size"], settings.stable_band)
        predicted = growth_class(c["prior_forecast_size"], c["predicted_size"], settings.stable_band)
        return float(np.mean(predicted == real))

    return {
        "mae": lambda c, s: float(errors(c).mean()),
        "median_ae": lambda c, s: float(np.median(errors(c))),
        "rmse": lambda c, s: float(np.sqrt(np.mean(errors(c) ** 2))),
        "r2": lambda c, s: r_squared(c["predicted_size"], c["real_size"]),
        "direction_accuracy": direction,
        "mean_relative_error": lambda c, s: float(relative_error(c["predicted_size"], c["real_size"]).mean()),
        "median_relative_error": lambda c, s: float(np.median(relative_error(c["predicted_size"], c["real_size"]))),
        "crps": lambda c, s: float(np.mean(c["crps"])),
    }


def _interval_metrics() -> dict[str, Metric]:
    def coverage(c: Columns, settings: SummarySettings) -> float:
        return float(np.mean((c["predicted_q10"] <= c["real_size"]) & (c["real_size"] <= c["predicted_q90"])))

    return {"coverage_80": coverage}


def _truth_metrics() -> dict[str, Metric]:
    return {"mae_true": lambda c, s: float(np.abs(c["predicted_size"] - c["true_size"]).mean()),
            "median_relative_error_true": lambda c, s: float(np.median(relative_error(c["predicted_size"],
                                                                                      c["true_size"])))}


def _image_metrics() -> dict[str, Metric]:
    metrics: dict[str, Metric] = {"median_dice": lambda c, s: float(np.median(c["dice"]))}
    for name in IMAGE_METRICS:
        metrics[name] = lambda c, s, name=name: float(np.mean(c[name]))
    return metrics


SIZE_METRICS, TRUTH_METRICS, IMAGE_METRIC_FUNCTIONS = _size_metrics(), _truth_metrics(), _image_metrics()
INTERVAL_METRICS = _interval_metrics()
NUMERIC_COLUMNS = ("prior_size", "prior_forecast_size", "real_size", "predicted_size", "predicted_q10",
                   "predicted_q90", "crps", "true_size", *IMAGE_METRICS)


def _columns(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """The numeric columns of one forecast's rows, one row per pair (checked), ordered by pair."""
    if frame["pair"].duplicated().any():
        raise ValueError("a forecast has more than one row for a pair")
    frame = frame.sort_values("pair")
    return {name: frame[name].to_numpy(dtype=float) for name in NUMERIC_COLUMNS if name in frame}


def _bootstrap(statistic: Callable[[np.ndarray], float], pairs: int, settings: SummarySettings
               ) -> tuple[float, float, float]:
    """statistic(all pairs) and its percentile interval over resamples of whole pairs (statistic(row indices))."""
    value = statistic(np.arange(pairs))
    if pairs < 2 or settings.bootstrap < 1:
        return value, float("nan"), float("nan")
    rng = np.random.default_rng(settings.seed)
    estimates = [statistic(rng.integers(0, pairs, pairs)) for _ in range(settings.bootstrap)]
    tail = (1.0 - settings.confidence) / 2.0 * 100.0
    low, high = np.nanpercentile(np.asarray(estimates, dtype=float), [tail, 100.0 - tail])
    return value, float(low), float(high)


def bootstrap(frame: pd.DataFrame, metric: Metric, settings: SummarySettings) -> tuple[float, float, float]:
    """The metric of one forecast (one row per pair) and a percentile interval over resampled pairs."""
    columns = _columns(frame)
    return _bootstrap(lambda rows: metric({name: values[rows] for name, values in columns.items()}, settings),
                      len(frame), settings)


def paired_difference(run: pd.DataFrame, baseline: pd.DataFrame, metric: Metric, settings: SummarySettings
                      ) -> tuple[float, float, float]:
    """metric(run) - metric(baseline) on the same pairs, with a paired bootstrap interval: every resample draws
    whole pairs, and both forecasts are scored on the same draw."""
    if sorted(run["pair"]) != sorted(baseline["pair"]):
        raise ValueError("a run and a baseline are compared on different pairs")
    a, b = _columns(run), _columns(baseline)

    def difference(rows: np.ndarray) -> float:
        return metric({k: v[rows] for k, v in a.items()}, settings) - metric({k: v[rows] for k, v in b.items()},
                                                                            settings)

    return _bootstrap(difference, len(run), settings)


def with_baselines(pairs: pd.DataFrame, annual_rate: float,
                   kind_rates: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Per-pair rows of a run plus the growth baselines' rows, built from its copy-prior rows (no image, so no
    image metrics). A growth baseline scales the copy-prior forecast's size, the prior measured by the forecasts'
    own path (`forecast.forecast_size`), so it is measured as a model's forecast of an unchanged prior would be.

    `pairs` has the model's rows (method = the run) and one `copy_prior` row per pair. Where it also has the
    nodules' `kind` (synthetic cohort) and `kind_rates` (kind -> annual rate) are given, kind-growth rows are added
    too; a kind without a rate gets `annual_rate`.
    """
    copy = pairs[pairs["method"] == COPY_PRIOR]
    image_columns = [c for c in IMAGE_METRICS if c in copy]
    rates = {MEDIAN_GROWTH: np.full(len(copy), annual_rate)}
    if kind_rates and "kind" in copy:
        rates[KIND_GROWTH] = copy["kind"].map(lambda kind: kind_rates.get(kind, annual_rate)).to_numpy(dtype=float)
    baselines = []
    for method, rate in rates.items():
        predicted = median_growth_forecast(copy["predicted_size"], copy["delta_days"], rate)
        baseline = copy.assign(method=method, predicted_size=predicted, predicted_q10=np.nan, predicted_q90=np.nan,
                               crps=np.abs(predicted - copy["real_size"].to_numpy(dtype=float)))
        baseline.loc[:, image_columns] = np.nan
        baselines.append(baseline)
    return pd.concat([pairs, *baselines], ignore_index=True)


def summarise(pairs: pd.DataFrame, run: str, settings: SummarySettings) -> pd.DataFrame:
    """Every metric with its bootstrap interval, for the run and each baseline on the same pairs, and the run's
    paired differences with each baseline (`<metric>_minus_<baseline>`)."""
    rows = []
    for method, frame in pairs.groupby("method", sort=False):
        metrics = dict(SIZE_METRICS)
        if "true_size" in frame and frame["true_size"].notna().all():
            metrics.update(TRUTH_METRICS)
        if frame[list(IMAGE_METRICS)].notna().all().all():
            metrics.update(IMAGE_METRIC_FUNCTIONS)
        if frame[["predicted_q10", "predicted_q90"]].notna().all().all():
            metrics.update(INTERVAL_METRICS)
        for name, metric in metrics.items():
            value, low, high = bootstrap(frame, metric, settings)
            rows.append({"run": run, "method": method, "metric": name, "value": value, "ci_low": low,
                         "ci_high": high, "n_pairs": len(frame)})
    forecasts = pairs[pairs["method"] == run]
    for baseline in [m for m in BASELINES if m in set(pairs["method"])]:
        for name in PAIRED_METRICS:
            value, low, high = paired_difference(forecasts, pairs[pairs["method"] == baseline], SIZE_METRICS[name],
                                                 settings)
            rows.append({"run": run, "method": run, "metric": f"{name}_minus_{baseline}", "value": value,
                         "ci_low": low, "ci_high": high, "n_pairs": len(forecasts)})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def segmenter_truth_rows(pairs: pd.DataFrame, run: str, settings: SummarySettings) -> pd.DataFrame:
    """The segmenter's own error: the segmented real follow-up against the true follow-up size."""
    frame = pairs[pairs["method"] == COPY_PRIOR].assign(method=SEGMENTED_FOLLOW_UP)
    frame = frame.assign(predicted_size=frame["real_size"])
    rows = [{"run": run, "method": SEGMENTED_FOLLOW_UP, "metric": name,
             **dict(zip(("value", "ci_low", "ci_high"), bootstrap(frame, metric, settings), strict=True)),
             "n_pairs": len(frame)} for name, metric in TRUTH_METRICS.items()]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def ranking(summaries: pd.DataFrame, by: str = "mae") -> pd.DataFrame:
    """One row per forecast, metrics as columns, ranked by `by` (lower is better) within each dimension.

    The paired differences with the baselines (`<metric>_minus_<baseline>`) come with their interval
    (`..._low`, `..._high`). Runs evaluated on the same pairs share their baselines, which then appear once (under
    the first such run); the segmenter's own error rows stay in the per-run summaries.
    """
    forecasts = summaries[summaries["method"] != SEGMENTED_FOLLOW_UP]
    table = forecasts.pivot_table(index=["run", "method", "dims"], columns="metric", values="value",
                                  sort=False).reset_index()
    table.columns.name = None
    differences = forecasts[forecasts["metric"].str.contains("_minus_")]
    if len(differences):
        bounds = differences.pivot_table(index=["run", "method", "dims"], columns="metric",
                                         values=["ci_low", "ci_high"], sort=False)
        bounds.columns = [f"{metric}_{'low' if side == 'ci_low' else 'high'}" for side, metric in bounds.columns]
        table = table.merge(bounds.reset_index(), on=["run", "method", "dims"], how="left")
    metric_columns = [c for c in table.columns if c not in ("run", "method", "dims")]
    baseline = table["method"].isin(BASELINES)
    repeated = baseline & table.round(9).duplicated(subset=["dims", "method", *metric_columns])
    table = table[~repeated].sort_values(["dims", by, "run", "method"], kind="stable").reset_index(drop=True)
    table.insert(0, "rank", table.groupby("dims").cumcount() + 1)
    return table


def with_truth(measured: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Measured nodules joined with their synthetic truth (the primary series of each exam)."""
    return measured.merge(truth[truth["primary_series"]], on=["exam_id", "nodule_group"])


def segmenter_accuracy(measured: pd.DataFrame, truth: pd.DataFrame, min_volume: float) -> pd.DataFrame:
    """How close the segmented volumes of cached nodules above `min_volume` come to the true volumes (synthetic
    cohort): a row for all of them (group "all"), then one per kind and, where the truth records it (preset
    screening), one per attachment (group "attached_to": "none", "pleura" or "vessel").

    `measured`: small boxes (exam_id, nodule_group, nodule_volume); `truth`: the cohort's nodule truth.
    """
    merged = with_truth(measured, truth)
    large = merged[merged["true_volume_mm3"] > min_volume]
    error = (large["nodule_volume"] - large["true_volume_mm3"]) / large["true_volume_mm3"]
    parts = [("all", "all", error)]
    for column in ("kind", "attached_to"):
        if column in large:
            labels = large[column].replace("", "none") if column == "attached_to" else large[column]
            parts += [(column, str(value), part) for value, part in error.groupby(labels, sort=True)]
    return pd.DataFrame([{"group": group, "value": value, "nodules": len(part), "min_true_volume_mm3": min_volume,
                          "median_relative_error": float(part.median()),
                          "median_abs_relative_error": float(part.abs().median()),
                          "fraction_within_15_percent": float((part.abs() <= 0.15).mean()),
                          "fraction_within_25_percent": float((part.abs() <= 0.25).mean())}
                         for group, value, part in parts])
