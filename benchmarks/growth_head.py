"""How far a run's growth head alone gets on val: its forecast of the measured volume, scored like a run's.

A flow conditioned on the head's ratios can at best carry the head's forecast into its images, so the head alone
shows, in minutes instead of a whole run's training, whether the look of a prior tells its growth on a cohort.
This trains only the head of `--run` (a run of `--config` with a `growth` block, raw or slices space) on the
train pairs of a workflow's results folder (`--results`, the folder holding `results/`) that has its patch cache
(`results/cache/raw/{train,val}/`; volumes from its `small_boxes.parquet`, measured here where that is not
written yet) and pairs (`results/registration/{split}/paired_nodules.parquet`), with the run's training
settings (steps: `--steps`, default the run's) and `models.seed`. Then, on the val pairs, each pair gets
`evaluation.samples` ratios taken as a forecast takes them (at the levels `growth.sample_level`), turned into
follow-up volumes (prior + floor) x exp(ratio) - floor, and the evaluation's metrics
(`noduleflow.evaluation.metrics.summarise`: MAE, direction accuracy, CRPS, 80 % coverage and the paired
differences with `copy_prior` and `median_growth`, whose rate is the train pairs' median) are printed. Volumes
are the segmenter's in each nodule's own box for the prior, the follow-up and the baselines alike (the evaluation
measures forecasts and the baselines' prior in the prior's box grown for the interval), so the numbers compare
the head with the baselines, not with a run's summary.

    .venv/bin/python benchmarks/growth_head.py --results RESULTS_PARENT --config config/quality.yaml \
        --run raw3d_growth [--steps 500] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from noduleflow.cache.datasets import NodulePairs
from noduleflow.cache.patches import PatchSettings, small_boxes
from noduleflow.cache.segmenter import build_segmenter
from noduleflow.evaluation import metrics
from noduleflow.models.growth import GrowthHead, WithLogRatio, measured_volumes, sample_level
from noduleflow.models.settings import RunSettings
from noduleflow.models.training import seeded_model, train
from noduleflow.settings import from_config, section


def split_data(results: Path, split: str, run: RunSettings,
               config: dict[str, Any]) -> tuple[WithLogRatio, dict[str, float]]:
    """A split's pairs with their measured log ratios, and the measured volumes by nodule key (the small_boxes
    table, or where the workflow has not written it yet, the same measurement made here)."""
    folder = results / "results" / "cache" / "raw" / split
    pairs = NodulePairs(folder, pd.read_parquet(results / "results" / "registration" / split
                                                / "paired_nodules.parquet"), slices=run.space == "slices")
    if (folder / "small_boxes.parquet").is_file():
        table = pd.read_parquet(folder / "small_boxes.parquet")
    else:
        table = small_boxes(pd.read_parquet(folder / "index.parquet"), folder,
                            from_config(PatchSettings, config["patch"]), build_segmenter(config["segmentation"]))
    volumes = measured_volumes(table)
    return WithLogRatio(pairs, volumes, run.growth.floor_mm3), volumes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="the folder holding a workflow's results/")
    parser.add_argument("--config", type=Path, default=Path("config/quality.yaml"))
    parser.add_argument("--run", default="raw3d_growth")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the run's)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = yaml.safe_load(Path("config/config.yaml").read_text())
    for key, value in yaml.safe_load(args.config.read_text()).items():  # as --configfile merges: one level deep
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    models = config["models"]
    run = from_config(RunSettings, {**models["runs"][args.run], "sigma": models["sigma"]})
    if run.growth is None or run.space == "latent":
        raise SystemExit(f"{args.run}: needs a growth block and the raw or slices space")
    seed = models["seed"]
    training = dataclasses.replace(run.training, seed=seed, steps=args.steps or run.training.steps,
                                   checkpoint_every=args.steps or run.training.steps)
    train_set, train_volumes = split_data(args.results, "train", run, config)
    val_set, val_volumes = split_data(args.results, "val", run, config)

    head = seeded_model(lambda: GrowthHead(2 if run.space == "slices" else 3, 1, run.growth.channels,
                                          run.growth.crop), seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        result = train(head, lambda m, b, g: m.nll(b["prior"], b["delta_days"], b["log_ratio"]), train_set,
                       training, work, {"growth_head": args.run})
    seconds = time.perf_counter() - started

    samples, floor, rows = config["evaluation"]["samples"], run.growth.floor_mm3, []
    for item in range(len(val_set)):
        pair = val_set[item]
        prior_size, real_size = (val_volumes[pair[k]] for k in ("nodule_key_a", "nodule_key_b"))
        ratios = result.model.draw(pair["prior"][None].expand(samples, *pair["prior"].shape),
                                   pair["delta_days"].expand(samples),
                                   [sample_level(s, samples) for s in range(samples)]).numpy()
        sizes = np.maximum((prior_size + floor) * np.exp(ratios) - floor, 0.0)
        ids = {"pair": item, "delta_days": float(pair["delta_days"]), "prior_size": prior_size,
               "prior_forecast_size": prior_size, "real_size": real_size,
               **dict.fromkeys(metrics.IMAGE_METRICS, np.nan)}
        rows.append({**ids, "method": metrics.COPY_PRIOR,
                     **metrics.forecast_distribution(np.array([prior_size]), real_size)})
        rows.append({**ids, "method": "growth_head", **metrics.forecast_distribution(sizes, real_size)})

    train_pairs = train_set.pairs.pairs  # median_growth's rate, as the growth_rates rule finds it
    annual = metrics.annual_growth_rates(train_pairs["key_a"].map(train_volumes),
                                         train_pairs["key_b"].map(train_volumes), train_pairs["delta_days"])
    annual_rate = float(np.median(annual)) if annual.size else 1.0
    pairs = metrics.with_baselines(pd.DataFrame(rows), annual_rate)
    settings = from_config(metrics.SummarySettings, section(metrics.SummarySettings, config["evaluation"]),
                           seed=config["seed"])
    summary = metrics.summarise(pairs, "growth_head", settings)
    print(f"{args.run}'s growth head: {training.steps} steps on {len(train_set)} train pairs in {seconds:.0f} s "
          f"({args.threads} threads); final loss (mean of the last 50 steps) "
          f"{result.history['loss'].tail(50).mean():.3f}; val: {len(val_set)} pairs, {samples} samples each; "
          f"median_growth's yearly factor {annual_rate:.3f}")
    shown = summary[summary["metric"].isin(["mae", "direction_accuracy", "crps", "coverage_80"])
                    | summary["metric"].str.contains("_minus_")]
    print(shown.drop(columns="run").to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
