"""Does the truth of the screening preset's attached nodules match what the image can show?

For N patients of `synthetic.preset: screening` (the config's field of view), every nodule at its first exam: the
share of its true shape (sampled on a 0.25 mm grid) and of its truth mask (drawn on a 0.7 x 0.7 x 1.25 mm grid)
that lies outside the lungs (in the chest wall, mediastinum or diaphragm) or inside a large (> 2 mm radius) vessel
or airway, where the image cannot show it; and the mask volume against the true volume. Per attachment (free
nodules as the control).

    .venv/bin/python benchmarks/synthetic_attached.py [--patients 40] [--config config/quality.yaml]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from noduleflow.imaging import Geometry
from noduleflow.metadata.phantom import boundary_distances_mm, sample_anatomy
from noduleflow.metadata.synthetic import (
    _TIMEPOINT_P,
    _TIMEPOINT_PATTERNS,
    CohortConfig,
    _draw_days,
    _render_nodule,
    _sample_nodules,
)
from noduleflow.settings import from_config

ROOT = Path(__file__).resolve().parents[1]


def _shares(anatomy, points: np.ndarray) -> tuple[float, float]:
    """Shares of (N, 3) points outside the lungs and inside a large vessel or airway."""
    border = boundary_distances_mm(anatomy, points)
    return float(np.mean(border[:, 0] <= 0.0)), float(np.mean((border[:, 0] > 0.0) & (border[:, 1] <= 0.0)))


def measure(anatomy, track) -> dict[str, float]:
    """Hidden shares of one nodule's true shape and truth mask at its first exam, and its mask / true volume."""
    day = track.first_day
    scale = track.scale(day)
    reach = track.max_radius(scale)
    step = 0.25
    axis = np.arange(-reach, reach + step, step)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3) + track.center
    inside = grid[track.level(grid, scale) <= 1.0]
    wall, vessel = _shares(anatomy, inside)
    spacing = np.array([0.7, 0.7, 1.25])
    size = np.ceil(2 * (reach + 3.0) / spacing).astype(int)
    origin = track.center - (size - 1) * spacing / 2.0
    geometry = Geometry(tuple(int(v) for v in size), tuple(spacing), tuple(origin), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    labels = np.zeros(size[::-1], np.uint8)
    count, _, _ = _render_nodule(np.full(size[::-1], -850.0, np.float32), labels, track, day, geometry, np.eye(4))
    z, y, x = np.nonzero(labels)
    mask_wall, mask_vessel = _shares(anatomy, np.column_stack([x, y, z]) * spacing + origin)
    return {"true_mm3": track.volume(day), "grid_mm3": len(inside) * step**3,
            "mask_mm3": count * float(np.prod(spacing)),
            "wall": wall, "vessel": vessel, "mask_wall": mask_wall, "mask_vessel": mask_vessel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "quality.yaml")
    args = parser.parse_args()
    settings = {**yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["synthetic"],
                **(yaml.safe_load(args.config.read_text()).get("synthetic") or {})}
    config = replace(from_config(CohortConfig, settings), preset="screening")
    rows = []
    for index in range(args.patients):  # as generate_patient draws them
        rng = np.random.default_rng([config.seed, index])
        pattern = _TIMEPOINT_PATTERNS[int(rng.choice(len(_TIMEPOINT_PATTERNS), p=_TIMEPOINT_P))]
        all_days = _draw_days(rng, config)
        days = {tp: all_days[tp] for tp in pattern}
        anatomy = sample_anatomy(rng, config.fov_mm, fine=True)
        for track in _sample_nodules(rng, anatomy, config, days):
            rows.append({"attached": track.attached_to or "free", **measure(anatomy, track)})
    print(f"{args.patients} patients, field of view {config.fov_mm} mm, attached_fraction {config.attached_fraction}; "
          "shares of each nodule (median / 90th percentile) outside the lungs or in a large vessel or airway")
    print("| attached | nodules | true shape outside lungs | in a large vessel | mask outside lungs | "
          "mask in a large vessel | median abs(mask / true - 1) | median (shape / true - 1) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for group in ("free", "pleura", "vessel"):
        chosen = [row for row in rows if row["attached"] == group]
        if not chosen:
            continue

        def stat(key: str, chosen: list[dict[str, float]] = chosen) -> str:
            values = np.array([row[key] for row in chosen])
            return f"{np.median(values):.1%} / {np.percentile(values, 90):.1%}"

        mask_error = np.median([abs(row["mask_mm3"] / row["true_mm3"] - 1) for row in chosen])
        shape_error = np.median([row["grid_mm3"] / row["true_mm3"] - 1 for row in chosen])
        print(f"| {group} | {len(chosen)} | {stat('wall')} | {stat('vessel')} | {stat('mask_wall')} | "
              f"{stat('mask_vessel')} | {mask_error:.1%} | {shape_error:+.1%} |")


if __name__ == "__main__":
    main()
