"""How close the synthetic nodules lie to pulmonary vessels: the demo anatomy against the fine one of
`synthetic.preset: screening` (vessel trees down to about 1 mm), for the same patient seeds.

Per anatomy: the thinnest vessel, the number of vessel segments, and the fraction of nodules whose surface (a
sphere of the nodule's volume at first sight) lies within 5 mm of a vessel's surface (negative gaps: a vessel runs
through the nodule), with the gap's median; and the share of nodules placed touching the pleura or a large vessel.

    .venv/bin/python benchmarks/synthetic_vessels.py [--patients 20] [--config config/config.yaml]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from noduleflow.metadata.phantom import sample_anatomy, vessel_distance_mm
from noduleflow.metadata.synthetic import CohortConfig, _draw_days, _sample_nodules
from noduleflow.settings import from_config

ROOT = Path(__file__).resolve().parents[1]


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
        gaps, attached = np.asarray(gaps), np.asarray(attached)
        print(f"| {'fine' if fine else 'demo'} | {min(thinnest):.1f} | {np.mean(segments):.0f} | {len(gaps)} | "
              f"{np.mean(gaps <= 5.0):.0%} | {np.median(gaps):.1f} | {np.mean(attached == 'pleura'):.0%} | "
              f"{np.mean(attached == 'vessel'):.0%} |")


if __name__ == "__main__":
    main()
