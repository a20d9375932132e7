"""What forecast accuracy the synthetic cohort allows at all, and how many patients it takes to show it.

No images and no anatomy: each patient's exam days and nodules are drawn with the generator's own functions
(`synthetic._draw_schedule`, `synthetic._draw_nodule`, with the settings of config/config.yaml's `synthetic`
section updated by --config's), nodules are followed over the exams where they are present (late ones from their
first exam on) and paired as the pipeline pairs them (consecutive exams of a nodule, `tables.consecutive_pairs`),
with true volumes `NoduleTrack.volume`. What the generator does and this does not: the nodules' places (the
placement's rare retries that shrink a nodule which finds no room are not modelled) and the images. The pipeline's
losses of pairs (a nodule outside a follow-up, registration QC) are not modelled either.

"Measured" volumes are the true ones times exp(sigma z), z standard normal, one draw per nodule and exam (the
pipeline measures an exam's nodule once and uses it as a follow-up and as the next prior). --measurement-error is
the median |measured / true - 1| (default 7.4 %: the segmenter's on the quality cohort, README "Patch cache");
sigma is the one whose log-normal error has that median (solved exactly, printed).

Patients are split by the pipeline's hash of (`seed`, pid) with the config's split fractions. Forecasters, each
fitted on the train pairs' measured volumes (or told more, where said) and scored on the test pairs' measured
follow-up, with the evaluation's own metric code (`noduleflow.evaluation.metrics`):
- `copy_prior`: the measured prior;
- `median_growth`: the train pairs' median annual growth (`metrics.with_baselines`, as the pipeline's baseline);
- `kind_growth`: the same per nodule kind (the pipeline's reference row, told the kind);
- `class_rate`: told the kind and the fate class (fast growing, slow growing, stable, shrinking): the class's median
  annual growth in a separate cohort of --reference-patients (measured as above);
- `oracle`: told the fate class and the look, a median regression on the reference cohort's pairs: the ceiling of
  reading the fate off the image;
- `look_ceiling`: the same regression on the look alone (what the images could show: measured prior volume, kind,
  spiculated, mean lobulation amplitude, solid-core fraction; and the interval): the best a forecaster reading
  the image can do, given unlimited training data;
- `look`: that regression fitted on the cohort's own train pairs, as a forecaster trained on them would be.
The regression is scikit-learn's HistGradientBoostingRegressor with quantile loss 0.5 on the log annual growth
(--look-target ratio: the log ratio over the interval), the forecast the prior times its growth.
Each of --trials cohorts (synthetic seeds seed, seed + 1, ...; the first N patients of a larger cohort are the
smaller cohort of the same trial) gives per forecaster its MAE (mm^3) and direction accuracy and the paired
bootstrap 95 % interval of MAE(forecaster) - MAE(median_growth) (`metrics.paired_difference`, whole pairs
resampled, the evaluation's bootstrap settings); printed are the means over trials and the share of trials whose
interval lies entirely below 0 ("beats"). Deterministic for the same arguments.

    .venv/bin/python benchmarks/forecast_ceiling.py --config config/quality.yaml --patients 100 300 --trials 10
        [--measurement-error 0.074] [--reference-patients 5000] [--seed SEED]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy.optimize import brentq
from scipy.stats import norm

from noduleflow.evaluation import metrics
from noduleflow.metadata.synthetic import KINDS, CohortConfig, NoduleTrack, _draw_nodule, _draw_schedule
from noduleflow.metadata.tables import computed_split, consecutive_pairs
from noduleflow.settings import from_config

ROOT = Path(__file__).resolve().parents[1]
FATE_CLASSES = ("fast", "slow", "stable", "shrinking")
KEYS = ["pid", "nodule_group", "kind", "fate_class", "spiculated", "lobulation", "core_fraction"]
FIELDS = ["screen_timepoint", "days_since_baseline", "true_volume", "measured_volume"]
FORECASTERS = ("copy_prior", "median_growth", "kind_growth", "class_rate", "oracle", "look_ceiling", "look")


def load_settings(path: Path) -> dict[str, Any]:
    """config/config.yaml with `path`'s keys over it, one level deep (as `snakemake --configfile` merges)."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    for key, value in (yaml.safe_load(path.read_text()) or {}).items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    return config


def log_sigma(median_abs_error: float) -> float:
    """sigma of a multiplicative error exp(sigma z) whose median |exp(sigma z) - 1| is `median_abs_error`:
    P(log(1 - m) <= sigma z <= log(1 + m)) = 1/2."""
    if median_abs_error <= 0:
        return 0.0
    low, high = math.log1p(-min(median_abs_error, 0.999)), math.log1p(median_abs_error)
    return brentq(lambda s: norm.cdf(high / s) - norm.cdf(low / s) - 0.5, 1e-6, 10.0)


def fate_class(track: NoduleTrack, slow: bool) -> str:
    """fast / slow growing, stable or shrinking."""
    if track.fate == "growing":
        return "slow" if slow else "fast"
    return track.fate


def nodule_rows(pid: str, track: NoduleTrack, days: dict[int, float], fate: str = "") -> list[dict[str, Any]]:
    """One row per exam (timepoint -> day) at which the nodule is present, with its true volume and its look."""
    core = track.core_fraction if track.kind in ("part_solid", "calcified") else 0.0
    look = {"kind": track.kind, "fate_class": fate, "spiculated": len(track.spike_amplitudes) > 0,
            "lobulation": float(np.mean(track.lobe_amplitudes)), "core_fraction": core}
    return [{"pid": pid, "nodule_group": track.group, **look, "screen_timepoint": tp, "days_since_baseline": day,
             "true_volume": track.volume(day)} for tp, day in sorted(days.items()) if day >= track.first_day]


def draw_nodules(config: CohortConfig) -> pd.DataFrame:
    """Rows of `nodule_rows` for the cohort's patients, drawn as the generator draws them (without places)."""
    rows = []
    for index in range(config.n_patients):
        rng = np.random.default_rng([config.seed, index])
        _, days = _draw_schedule(rng, config)
        count = int(rng.integers(config.nodules_per_patient[0], config.nodules_per_patient[1] + 1))
        for group in range(1, count + 1):
            track, slow, _ = _draw_nodule(rng, config, days, group)
            rows += nodule_rows(str(config.first_pid + index), track, days, fate_class(track, slow))
    return pd.DataFrame(rows)


def pairs_of(nodules: pd.DataFrame) -> pd.DataFrame:
    """Consecutive exams of each nodule, as the pipeline pairs them (`<field>_a` prior, `_b` follow-up)."""
    ordered = nodules.sort_values(["pid", "nodule_group", "screen_timepoint"], kind="stable").reset_index(drop=True)
    return consecutive_pairs(ordered, KEYS, [field for field in FIELDS if field in nodules])


def measured(nodules: pd.DataFrame, sigma: float, seed: int) -> pd.DataFrame:
    """The rows with `measured_volume`: true volume times a log-normal error (one draw per row)."""
    rng = np.random.default_rng(seed)
    return nodules.assign(measured_volume=nodules["true_volume"] * np.exp(sigma * rng.standard_normal(len(nodules))))


def median_rate(pairs: pd.DataFrame) -> float:
    """Median annual growth of the measured volume (as the `growth_rates` rule finds it; 1 without pairs)."""
    rates = metrics.annual_growth_rates(pairs["measured_volume_a"], pairs["measured_volume_b"], pairs["delta_days"])
    return float(np.median(rates)) if rates.size else 1.0


def median_rates(pairs: pd.DataFrame, by: str | list[str]) -> dict[Any, float]:
    """`median_rate` per group of pairs."""
    return {key: median_rate(group) for key, group in pairs.groupby(by)}


@dataclass(frozen=True)
class GrowthModel:
    """A fitted median regression of growth (`fit_growth`) and what it was fitted on."""

    regressor: Any
    told_fate: bool
    target: str  # "annual": log annual growth; "ratio": log ratio over the interval


def _features(pairs: pd.DataFrame, told_fate: bool) -> np.ndarray:
    """The look (measured prior volume, kind, spiculated, lobulation, core fraction), the interval and, for the
    oracle, the fate class."""
    columns = [np.log(pairs["measured_volume_a"]), pairs["kind"].map(KINDS.index), pairs["spiculated"].astype(float),
               pairs["lobulation"], pairs["core_fraction"], pairs["delta_days"]]
    return np.column_stack(columns + ([pairs["fate_class"].map(FATE_CLASSES.index)] if told_fate else []))


def fit_growth(pairs: pd.DataFrame, told_fate: bool, target: str, seed: int) -> GrowthModel:
    """A median regression of the growth of measured volumes on `_features`: the log annual growth (target
    "annual") or the log ratio over the pair's interval ("ratio")."""
    from sklearn.ensemble import HistGradientBoostingRegressor  # benchmarks only (pyproject extra "benchmarks")
    from threadpoolctl import threadpool_limits  # scikit-learn's

    log_ratio = np.log(pairs["measured_volume_b"] / pairs["measured_volume_a"])
    model = HistGradientBoostingRegressor(loss="quantile", quantile=0.5, max_iter=200, learning_rate=0.05,
                                          max_leaf_nodes=8, min_samples_leaf=10,
                                          categorical_features=[1, 6] if told_fate else [1],
                                          early_stopping=False, random_state=seed)
    scale = metrics.DAYS_PER_YEAR / pairs["delta_days"] if target == "annual" else 1.0
    with threadpool_limits(1):  # the fits are small; OpenMP threads on a busy machine cost far more than they save
        model.fit(_features(pairs, told_fate), log_ratio * scale)
    return GrowthModel(model, told_fate, target)


def growth_forecast(model: GrowthModel, pairs: pd.DataFrame) -> np.ndarray:
    """The prior's measured volume times the growth `model` predicts for the pair."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        growth = np.exp(model.regressor.predict(_features(pairs, model.told_fate)))
    if model.target == "annual":
        return metrics.median_growth_forecast(pairs["measured_volume_a"], pairs["delta_days"], growth)
    return pairs["measured_volume_a"].to_numpy() * growth


def fit_reference(pairs: pd.DataFrame, target: str, seed: int) -> dict[str, Any]:
    """What the forecasters told more than a network sees take from the reference cohort's `pairs`."""
    return {"class_rate": median_rates(pairs, ["kind", "fate_class"]), "oracle": fit_growth(pairs, True, target, seed),
            "look_ceiling": fit_growth(pairs, False, target, seed)}


def forecasts(train: pd.DataFrame, test: pd.DataFrame, reference: dict[str, Any], target: str,
              seed: int) -> pd.DataFrame:
    """Per test pair one row per forecaster, in the evaluation's columns (the baselines by `with_baselines`);
    `reference`: what the reference cohort gave (`class_rate`'s rates, the `oracle` and `look_ceiling` models)."""
    prior, real = test["measured_volume_a"].to_numpy(), test["measured_volume_b"].to_numpy()
    copy = pd.DataFrame({"pair": np.arange(len(test)), "method": metrics.COPY_PRIOR, "kind": test["kind"].to_numpy(),
                         "delta_days": test["delta_days"].to_numpy(), "prior_size": prior,
                         "prior_forecast_size": prior, "real_size": real, "predicted_size": prior,
                         "crps": np.abs(prior - real)})
    table = metrics.with_baselines(copy, median_rate(train), median_rates(train, "kind"))
    rates = [reference["class_rate"].get(key, 1.0) for key in zip(test["kind"], test["fate_class"], strict=True)]
    sizes = {"class_rate": metrics.median_growth_forecast(prior, test["delta_days"], np.asarray(rates))}
    for name, model in {"oracle": reference["oracle"], "look_ceiling": reference["look_ceiling"],
                        "look": fit_growth(train, False, target, seed)}.items():
        sizes[name] = growth_forecast(model, test)
    rows = [copy.assign(method=name, predicted_size=size, crps=np.abs(size - real)) for name, size in sizes.items()]
    return pd.concat([table, *rows], ignore_index=True)


def score(table: pd.DataFrame, settings: metrics.SummarySettings) -> list[dict[str, Any]]:
    """Per forecaster: test pairs, MAE, direction accuracy and the paired interval of MAE minus median_growth's."""
    baseline = table[table["method"] == metrics.MEDIAN_GROWTH]
    out = []
    for method, frame in table.groupby("method", sort=False):
        columns = {name: frame.sort_values("pair")[name].to_numpy(dtype=float)
                   for name in ("prior_size", "prior_forecast_size", "real_size", "predicted_size")}
        difference, low, high = metrics.paired_difference(frame, baseline, metrics.SIZE_METRICS["mae"], settings)
        out.append({"method": method, "pairs": len(frame), "mae": metrics.SIZE_METRICS["mae"](columns, settings),
                    "direction": metrics.SIZE_METRICS["direction_accuracy"](columns, settings),
                    "mae_minus_median_growth": difference, "low": low, "high": high})
    return out


def trial(cohort: CohortConfig, sigma: float, split_seed: int, fractions: dict[str, float], scored: str,
          reference: dict[str, Any], target: str, settings: metrics.SummarySettings) -> list[dict[str, Any]]:
    """One cohort: draw, measure, split, fit on train, score on the `scored` split."""
    pairs = pairs_of(measured(draw_nodules(cohort), sigma, cohort.seed))
    split = pairs["pid"].map(lambda pid: computed_split(pid, split_seed, fractions))
    return score(forecasts(pairs[split == "train"], pairs[split == scored].reset_index(drop=True), reference,
                           target, cohort.seed), settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "quality.yaml")
    parser.add_argument("--patients", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--measurement-error", type=float, default=0.074,
                        help="median |measured / true - 1| of a volume (default: the segmenter's, 7.4 %%)")
    parser.add_argument("--reference-patients", type=int, default=5000,
                        help="the reference cohort's size (class_rate, oracle, look_ceiling)")
    parser.add_argument("--split", choices=("val", "test"), default="test", help="the split scored")
    parser.add_argument("--look-target", choices=("annual", "ratio"), default="annual",
                        help="the learners' target: log annual growth or log ratio over the interval")
    parser.add_argument("--seed", type=int, default=None, help="first cohort's seed (default: synthetic.seed)")
    args = parser.parse_args()

    config = load_settings(args.config)
    base = from_config(CohortConfig, config["synthetic"])
    seed = base.seed if args.seed is None else args.seed
    evaluation = config["evaluation"]
    settings = metrics.SummarySettings(stable_band=evaluation["stable_band"], bootstrap=evaluation["bootstrap"],
                                       confidence=evaluation["confidence"], seed=config["seed"])
    fractions = config["splits"]["fractions"]
    sigma = log_sigma(args.measurement_error)
    started = time.perf_counter()
    cohort = CohortConfig(**{**base.__dict__, "n_patients": args.reference_patients, "seed": seed + 10**6})
    pairs = pairs_of(measured(draw_nodules(cohort), sigma, cohort.seed))
    reference = fit_reference(pairs, args.look_target, cohort.seed)
    print(f"config {args.config}: preset {base.preset}, fates {base.fates}; split fractions {fractions}, "
          f"split seed {config['seed']}; measurement error {args.measurement_error:.1%} median |error| -> log-normal "
          f"sigma {sigma:.4f}; reference cohort {args.reference_patients} patients (seed {cohort.seed}), "
          f"{len(pairs)} pairs; scored on {args.split}")
    results = []
    for patients in args.patients:
        for t in range(args.trials):
            cohort = CohortConfig(**{**base.__dict__, "n_patients": patients, "seed": seed + t})
            for row in trial(cohort, sigma, config["seed"], fractions, args.split, reference, args.look_target,
                             settings):
                results.append({"patients": patients, "trial": t, **row})
    table = pd.DataFrame(results)
    table["beats"] = table["high"] < 0
    table["worse"] = table["low"] > 0
    summary = table.groupby(["patients", "method"], sort=False).agg(
        trials=("trial", "size"), test_pairs=("pairs", "mean"), mae=("mae", "mean"), direction=("direction", "mean"),
        mae_minus_median_growth=("mae_minus_median_growth", "mean"), beats=("beats", "mean"),
        worse=("worse", "mean")).reset_index()
    summary["method"] = pd.Categorical(summary["method"], FORECASTERS)
    summary = summary.sort_values(["patients", "method"])
    print("| patients | forecaster | trials | mean scored pairs | mean MAE mm^3 | mean direction accuracy "
          "| mean MAE - median_growth | beats median_growth | worse |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in summary.itertuples(index=False):
        print(f"| {row.patients} | {row.method} | {row.trials} | {row.test_pairs:.1f} | {row.mae:.1f} | "
              f"{row.direction:.3f} | {row.mae_minus_median_growth:+.1f} | {row.beats:.0%} | {row.worse:.0%} |")
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
