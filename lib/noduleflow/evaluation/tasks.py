"""The evaluation stage's steps, each from files to files: forecasts per run, growth rates, summaries, tables,
the segmenter's accuracy and VAE reconstructions. Rules call these; the logic lives in the modules they use.

torch, MONAI and the models are imported inside the steps that forecast or decode: the summaries, the tables and
the segmenter's accuracy are small jobs that would otherwise spend most of their time importing them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from noduleflow import figures
from noduleflow.cache.patches import PatchSettings
from noduleflow.cache.segmenter import Segmenter
from noduleflow.evaluation import metrics
from noduleflow.io import atomic_path, write_csv
from noduleflow.settings import from_config, section

if TYPE_CHECKING:
    from noduleflow.evaluation.forecast import ForecastSettings

UNITS = {2: "mm^2", 3: "mm^3"}


def forecast(*, run_name: str, space: str, model: str, raw_folder: str, model_folder: str, pairs_path: str,
             vae: str | None, truth: str | None, patch: PatchSettings, segmenter: Segmenter,
             settings: ForecastSettings, table_path: str, montage_path: str) -> None:
    """Forecast every pair of a split with one run; write the per-pair table and a montage of examples."""
    import torch

    from noduleflow import distributed
    from noduleflow.evaluation.forecast import evaluate_run
    from noduleflow.models.tasks import load_vae, paired_dataset

    slices = space == "slices"
    raw = paired_dataset(raw_folder, pairs_path, "slices" if slices else "raw")
    model_data = paired_dataset(model_folder, pairs_path, space) if space == "latent" else raw
    decode = None
    if space == "latent":
        vae_model = load_vae(vae).to(distributed.device())
        decode = torch.no_grad()(lambda latents: vae_model.decode(latents.to(next(vae_model.parameters()))))
    true_volumes = pd.read_parquet(truth).query("primary_series") if truth else None
    result = evaluate_run(model_path=model, raw=raw, model_data=model_data, decode=decode, patch=patch,
                          segmenter=segmenter, settings=settings, run_name=run_name, true_volumes=true_volumes)
    write_csv(result.table, table_path)
    figures.forecast_montage(result.examples, patch.hu_window,
                             f"{run_name}: prior, real and generated follow-up", montage_path)


def growth_rates(*, raw_folder: str, pairs_path: str, patch: PatchSettings, segmenter: Segmenter, path: str,
                 truth: str | None = None) -> None:
    """Median annual growth of nodule volume (3D) and central-slice area (2D) on the train split; with the synthetic
    `truth`, also per nodule kind (`by_kind`, for the kind-growth reference)."""
    from noduleflow.evaluation.forecast import pair_sizes
    from noduleflow.models.tasks import paired_dataset

    truth_table = pd.read_parquet(truth) if truth else None
    rates = {}
    for dims in (2, 3):
        space = "slices" if dims == 2 else "raw"
        pairs = paired_dataset(raw_folder, pairs_path, space)
        sizes = pair_sizes(pairs, patch, segmenter, dims == 2)
        annual = metrics.annual_growth_rates(sizes["prior_size"], sizes["real_size"], sizes["delta_days"])
        rates[str(dims)] = {"annual_rate": float(np.median(annual)) if annual.size else 1.0, "pairs": int(annual.size)}
        if truth_table is not None:
            kinds = nodule_kinds(truth_table, pairs.pairs["exam_a"], pairs.pairs["nodule_group"]).to_numpy()
            by_kind = {kind: metrics.annual_growth_rates(group["prior_size"], group["real_size"], group["delta_days"])
                       for kind, group in sizes.groupby(kinds, sort=True)}
            rates[str(dims)]["by_kind"] = {kind: float(np.median(r)) for kind, r in by_kind.items() if r.size}
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(rates, indent=2))


def nodule_kinds(truth: pd.DataFrame, exam_ids: pd.Series, nodule_groups: pd.Series) -> pd.Series:
    """The synthetic truth's kind of each (exam, nodule group)."""
    kind = truth.drop_duplicates(["exam_id", "nodule_group"]).set_index(["exam_id", "nodule_group"])["kind"]
    return pd.Series(kind.reindex(list(zip(exam_ids, nodule_groups, strict=True))).to_numpy(), index=exam_ids.index)


def summarise(*, run_name: str, table_path: str, rates_path: str, evaluation: dict[str, Any], seed: int,
              summary_path: str, scatter_path: str, interval_path: str) -> None:
    """Metrics of a run and its baselines with bootstrap intervals, and the two pictures of its errors."""
    pairs = pd.read_csv(table_path)
    dims = int(pairs["dims"].iloc[0]) if len(pairs) else 3
    rates = json.loads(Path(rates_path).read_text())[str(dims)]
    pairs = metrics.with_baselines(pairs, rates["annual_rate"], rates.get("by_kind"))
    settings = from_config(metrics.SummarySettings, section(metrics.SummarySettings, evaluation), seed=seed)
    summary = metrics.summarise(pairs, run_name, settings)
    if "true_size" in pairs and pairs["true_size"].notna().any():
        summary = pd.concat([summary, metrics.segmenter_truth_rows(pairs, run_name, settings)], ignore_index=True)
    summary.insert(2, "dims", dims)
    write_csv(summary, summary_path)
    unit = UNITS[dims]
    figures.change_scatter(pairs, unit, f"{run_name}: size change, predicted vs real", scatter_path)
    figures.error_by_interval(pairs, unit, f"{run_name}: error against the interval", interval_path)


def cross_run_table(summary_paths: list[str], path: str) -> None:
    """All runs and their baselines in one table, ranked by volume (or area) MAE within 2D and 3D."""
    summaries = pd.concat([pd.read_csv(p) for p in summary_paths], ignore_index=True)
    write_csv(metrics.ranking(summaries), path)


def segmenter_report(*, small_boxes: list[str], truth: str, min_volume: float, table_path: str,
                     plot_path: str) -> None:
    """The segmenter's volumes of every cached nodule against the synthetic truth, overall, per kind and per
    attachment (`metrics.segmenter_accuracy`)."""
    measured = pd.concat([pd.read_parquet(p) for p in small_boxes], ignore_index=True)
    true = pd.read_parquet(truth)
    write_csv(metrics.segmenter_accuracy(measured, true, min_volume), table_path)
    merged = metrics.with_truth(measured, true)
    figures.measured_vs_true(merged["nodule_volume"].to_numpy(), merged["true_volume_mm3"].to_numpy(),
                             "segmented vs true nodule volume", plot_path)


def vae_examples(*, vae: str, raw_folder: str, patch: PatchSettings, count: int, path: str) -> None:
    """The first `count` patches of a split (the rule gives val) and their VAE reconstructions."""
    import torch

    from noduleflow.cache.datasets import NodulePatches
    from noduleflow.models.tasks import load_vae

    patches = NodulePatches(raw_folder)
    images = torch.stack([patches[i]["image"] for i in range(min(count, len(patches)))])
    with torch.no_grad():
        model = load_vae(vae)
        reconstructions = model.reconstruct(images) if len(images) else images
    figures.reconstruction_examples(images[:, 0].numpy(), reconstructions[:, 0].clamp(-1, 1).numpy(),
                                    patch.hu_window, path)
