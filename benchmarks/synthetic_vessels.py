"""How close the synthetic nodules lie to pulmonary vessels: the demo anatomy against the fine one of
`synthetic.preset: screening` (vessel trees down to about 1 mm), for the same patient seeds.

Per anatomy: the thinnest vessel, the number of vessel segments, and the fraction of nodules whose surface (a
sphere of the nodule's volume at first sight) lies within 5 mm of a vessel's surface (negative gaps: a vessel runs
through the nodule), with the gap's median; and the share of nodules placed touching the pleura or a large vessel.

Then, for the fine anatomy, whether the truth of the nodules touching the pleura or a vessel matches what an image
can show: per attachment (free nodules as the control), the share of each nodule's true shape at its first sight
(sampled on a 0.25 mm grid) and of its truth mask (drawn on a 0.7 x 0.7 x 1.25 mm grid) that lies outside the
lungs (chest wall, mediastinum, diaphragm) or inside a large (> 2 mm radius) vessel or airway, and the mask's
volume against the true volume.

    .venv/bin/python benchmarks/synthetic_vessels.py [--patients 20] [--config config/config.yaml]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from noduleflow.imaging import Geometry
from noduleflow.metadata.phantom import boundary_distances_mm, sample_anatomy, vessel_distance_mm
from noduleflow.metadata.synthetic import CohortConfig, _draw_days, _render_nodule, _sample_nodules
from noduleflow.settings import from_config

ROOT = Path(__file__).resolve().parents[1]


def _shares(anatomy, points: np.ndarray) -> tuple[float, float]:
    """Shares of (N, 3) points outside the lungs and inside a large vessel or airway."""
    border = boundary_distances_mm(anatomy, points)
    return float(np.mean(border[:, 0] <= 0.0)), float(np.mean((border[:, 0] > 0.0) & (border[:, 1] <= 0.0)))


def hidden_shares(anatomy, track) -> dict[str, float]:
    """Hidden shares of one nodule's true shape and truth mask at its first sight, and its mask / true volume."""
    day = track.first_day
    scale = track.scale(day)
    reach = track.max_radius(scale)
    step = 0.25
    axis = np.arange(-reach, reach + step, step)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3) + track.center
    wall, vessel = _shares(anatomy, grid[track.level(grid, scale) <= 1.0])
    spacing = np.array([0.7, 0.7, 1.25])
    size = np.ceil(2 * (reach + 3.0) / spacing).astype(int)
    origin = track.center - (size - 1) * spacing / 2.0
    geometry = Geometry(tuple(int(v) for v in size), tuple(spacing), tuple(origin), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    labels = np.zeros(size[::-1], np.uint8)
    count, _, _ = _render_nodule(np.full(size[::-1], -850.0, np.float32), labels, track, day, geometry, np.eye(4))
    z, y, x = np.nonzero(labels)
    mask_wall, mask_vessel = _shares(anatomy, np.column_stack([x, y, z]) * spacing + origin)
    return {"attached": track.attached_to or "free",
            "mask_error": count * float(np.prod(spacing)) / track.volume(day) - 1,
            "wall": wall, "vessel": vessel, "mask_wall": mask_wall, "mask_vessel": mask_vessel}


def print_hidden(rows: list[dict]) -> None:
    print("\nshares of each nodule (median / 90th percentile) outside the lungs or in a large vessel or airway")
    print("| attached | nodules | true shape outside lungs | in a large vessel | mask outside lungs | "
          "mask in a large vessel | median abs(mask / true - 1) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for group in ("free", "pleura", "vessel"):
        chosen = [row for row in rows if row["attached"] == group]
        if chosen:
            cells = [f"{np.median(values):.1%} / {np.percentile(values, 90):.1%}"
                     for values in (np.array([row[key] for row in chosen])
                                    for key in ("wall", "vessel", "mask_wall", "mask_vessel"))]
            error = np.median([abs(row["mask_error"]) for row in chosen])
            print(f"| {group} | {len(chosen)} | {' | '.join(cells)} | {error:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml")
    args = parser.parse_args()
    settings = {**yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["synthetic"],
                **(yaml.safe_load(args.config.read_text()).get("synthetic") or {})}
    config = replace(from_config(CohortConfig, settings), preset="screening")
    print(f"field of view {config.fov_mm} mm, {args.patients} patients, attached_fraction {config.attached_fraction}")
    print("| anatomy | thinnest vessel mm | vessel segments | nodules | vessel within 5 mm | median gap mm | "
          "touching pleura | touching a vessel |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    hidden = []
    for fine in (False, True):
        gaps, attached, thinnest, segments = [], [], [], []
        for index in range(args.patients):
            rng = np.random.default_rng([config.seed, index])
            anatomy = sample_anatomy(rng, config.fov_mm, fine=fine)
            vessels = anatomy.tube_kind == 0
            thinnest.append(2.0 * anatomy.tube_radius[vessels].min())
            segments.append(int(vessels.sum()))
            for track in _sample_nodules(rng, anatomy, config, _draw_days(rng, config)):
                radius = (3.0 * track.volume(track.first_day) / (4.0 * math.pi)) ** (1.0 / 3.0)
                gaps.append(vessel_distance_mm(anatomy, track.center[None])[0] - radius)
                attached.append(track.attached_to)
                if fine:
                    hidden.append(hidden_shares(anatomy, track))
        gaps, attached = np.asarray(gaps), np.asarray(attached)
        print(f"| {'fine' if fine else 'demo'} | {min(thinnest):.1f} | {np.mean(segments):.0f} | {len(gaps)} | "
              f"{np.mean(gaps <= 5.0):.0%} | {np.median(gaps):.1f} | {np.mean(attached == 'pleura'):.0%} | "
              f"{np.mean(attached == 'vessel'):.0%} |")
    print_hidden(hidden)


if __name__ == "__main__":
    main()
