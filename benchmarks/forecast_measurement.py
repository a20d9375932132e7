"""How a forecast is measured: `evaluation.forecast.forecast_size` against the alternatives it was chosen over.

A forecast may be measured only with what is known at the prior exam. Three ways to do that are compared, all
with the default segmenter:
- `forecast_size` (the evaluation's): the forecast's bright component in the prior's box grown by the fastest
  growth the interval allows, measured by the segmenter in that component's bounding box;
- the segmenter in the prior's box (what a forecast of an unchanged nodule would need);
- the segmenter given the whole growth region as its box.
The union of the prior's and the real follow-up's box (the former yardstick, which reads the follow-up's box)
is listed as well on real pairs.

Part 1, sphere forecasts: a 48 x 48 x 12 patch at 0.7 x 0.7 x 2.5 mm, 15 HU noise, the prior a sphere in the
middle, the forecast a sphere that grew, shrank or moved, one year later; relative error against the true sphere
volume. Part 2 (`--workdir` of a finished run, e.g. the demo): a perfect forecast, the real follow-up image of
every 3D pair of the cache, measured each way, against the real follow-up segmented in its own box (the
evaluation's reference) and, on the synthetic cohort, against the true volume.

    .venv/bin/python benchmarks/forecast_measurement.py [--workdir .]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from noduleflow.cache.patches import PatchSettings
from noduleflow.cache.segmenter import build_segmenter
from noduleflow.evaluation.forecast import (
    ForecastSettings,
    forecast_settings,
    forecast_size,
    growth_region,
    union_box,
    voxel_size,
)
from noduleflow.hu import to_hu, to_unit_range
from noduleflow.models.tasks import paired_dataset
from noduleflow.settings import from_config

DEFAULT_CONFIG = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "config.yaml").read_text())
SPHERE_PATCH = from_config(PatchSettings, DEFAULT_CONFIG["patch"], spacing_mm=(0.7, 0.7, 2.5), size=(48, 48, 12))
CASES = [  # prior radius mm, forecast radius mm, shift (x, y, z voxels), HU
    ("grew 4 -> 5.5 mm, solid", 4.0, 5.5, (0, 0, 0), 40.0),
    ("grew 4 -> 8 mm, solid", 4.0, 8.0, (0, 0, 0), 40.0),
    ("grew 4 -> 8 mm, ground glass", 4.0, 8.0, (0, 0, 0), -620.0),
    ("shrank 6 -> 3 mm, solid", 6.0, 3.0, (0, 0, 0), 40.0),
    ("shrank 6 -> 3 mm, ground glass", 6.0, 3.0, (0, 0, 0), -620.0),
    ("4 mm, moved 5.6 mm in-plane", 4.0, 4.0, (8, 0, 0), 40.0),
    ("4 mm ground glass, moved 6 mm and a slice", 4.0, 4.0, (6, -6, 1), -620.0),
]


def sphere(radius: float, shift=(0, 0, 0), hu: float = 40.0, noise: float = 15.0) -> np.ndarray:
    """A (Z, Y, X) HU patch with a partial-volume sphere (3x supersampled) and seeded noise."""
    size, spacing = SPHERE_PATCH.size, SPHERE_PATCH.spacing_mm
    fine = [np.arange(n * 3) / 3.0 - (n - 1) / 2.0 - 1 / 3.0 - s for n, s in zip(size[::-1], shift[::-1], strict=True)]
    z, y, x = np.meshgrid(*fine, indexing="ij")
    inside = (x * spacing[0]) ** 2 + (y * spacing[1]) ** 2 + (z * spacing[2]) ** 2 <= radius ** 2
    fraction = inside.reshape(size[2], 3, size[1], 3, size[0], 3).mean(axis=(1, 3, 5))
    return -850.0 + fraction * (hu + 850.0) + np.random.default_rng(0).normal(0.0, noise, fraction.shape)


def box_of(mask: np.ndarray) -> list[int]:
    z, y, x = np.nonzero(mask)
    return [int(y.min()), int(y.max()), int(x.min()), int(x.max()), int(z.min()), int(z.max())]


def sizes(image: np.ndarray, prior_box: list[int], days: float, patch: PatchSettings, segmenter,
          settings: ForecastSettings, real_box: list[int] | None = None) -> dict[str, float]:
    """The size of the nodule in a forecast image (unit range), measured each way."""
    hu, unit = to_hu(image, patch.hu_window), voxel_size(patch, False)
    region = growth_region(prior_box, days, patch.spacing_mm, hu.shape, settings)
    region_box = [region[1].start, region[1].stop - 1, region[2].start, region[2].stop - 1, region[0].start,
                  region[0].stop - 1]
    out = {"forecast_size": forecast_size(image, prior_box, days, patch, segmenter, settings),
           "prior box": float(segmenter(hu, prior_box).sum()) * unit,
           "growth region as box": float(segmenter(hu, region_box).sum()) * unit}
    if real_box is not None:
        out["union box (former, reads the follow-up's box)"] = float(segmenter(hu, union_box(prior_box,
                                                                                             real_box)).sum()) * unit
    return out


def config_settings(config: dict) -> tuple[ForecastSettings, object]:
    """The forecast settings and the segmenter of a config (its `evaluation`, `models` and `segmentation`)."""
    models = config["models"]
    return forecast_settings(config["evaluation"], models["sampler"], models["seed"]), \
        build_segmenter(config["segmentation"])


def sphere_table() -> pd.DataFrame:
    settings, segmenter = config_settings(DEFAULT_CONFIG)
    rows = []
    for name, prior_mm, forecast_mm, shift, hu in CASES:
        prior_box = box_of(sphere(prior_mm, noise=0.0) > -400.0)
        image = to_unit_range(sphere(forecast_mm, shift, hu), SPHERE_PATCH.hu_window)
        true = 4.0 / 3.0 * np.pi * forecast_mm ** 3
        measured = sizes(image, prior_box, 365.0, SPHERE_PATCH, segmenter, settings)
        rows.append({"forecast": name, **{k: f"{(v / true - 1) * 100:+.1f} %" for k, v in measured.items()}})
    return pd.DataFrame(rows)


def perfect_forecasts(workdir: Path) -> pd.DataFrame:
    """Every 3D pair's real follow-up measured each way, with its reference size and true volume."""
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    patch = from_config(PatchSettings, config["patch"])
    settings, segmenter = config_settings(config)
    truth_path = workdir / "results" / "synthetic" / "truth" / "nodules.parquet"
    truth = pd.read_parquet(truth_path).query("primary_series").set_index(["exam_id", "nodule_group"]) \
        if truth_path.exists() else None
    rows = []
    for split in ("train", "val", "test"):
        pairs = paired_dataset(workdir / "results" / "cache" / "raw" / split,
                               workdir / "results" / "registration" / split / "paired_nodules.parquet", "raw")
        for item in range(len(pairs)):
            pair = pairs[item]
            real = pair["follow_up"][0].numpy()
            prior_box, real_box = pair["bbox_a"].tolist(), pair["bbox_b"].tolist()
            reference = float(segmenter(to_hu(real, patch.hu_window), real_box).sum()) * voxel_size(patch, False)
            row = {"split": split, "reference": reference,
                   **sizes(real, prior_box, float(pair["delta_days"]), patch, segmenter, settings, real_box)}
            if truth is not None:
                row["true"] = float(truth.at[(pairs.pairs.at[item, "exam_b"], pair["nodule_group"]),
                                             "true_volume_mm3"])
            rows.append(row)
    return pd.DataFrame(rows)


def agreement(table: pd.DataFrame, against: str) -> pd.DataFrame:
    methods = [c for c in table.columns if c not in ("split", "reference", "true")]
    rows = []
    for method in methods:
        error = (table[method] - table[against]).abs() / table[against]
        rows.append({"measured": method, "median |error|": f"{error.median() * 100:.1f} %",
                     "within 15 %": f"{(error <= 0.15).mean() * 100:.0f} %",
                     "within 25 %": f"{(error <= 0.25).mean() * 100:.0f} %"})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="a finished run's folder (its config and results/)")
    args = parser.parse_args()
    print("Sphere forecasts, one year after the prior: error against the true volume")
    print(sphere_table().to_markdown(index=False))
    if args.workdir is None:
        return
    table = perfect_forecasts(args.workdir)
    usable = table[table["reference"] > 0]
    print(f"\nThe real follow-up as a perfect forecast, {len(usable)} 3D pairs (of {len(table)}; the rest have an "
          "empty reference): against the follow-up segmented in its own box")
    print(agreement(usable, "reference").to_markdown(index=False))
    if "true" in table:
        large = table[table["true"] > 50.0]
        print(f"\nthe same, {len(large)} pairs whose true follow-up volume is above 50 mm^3: against the true volume")
        own = large.rename(columns={"reference": "the follow-up's own box (the reference)"})
        print(agreement(own, "true").to_markdown(index=False))


if __name__ == "__main__":
    main()
