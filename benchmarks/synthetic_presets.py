"""Synthetic cohort generation time per patient: the opt-in "screening" image preset against the demo renderer.

Both presets render the same patients (same seed, field of view and spacings) in one process, alternating, so the
ratio does not depend on the machine's load drifting between two runs.

    .venv/bin/python benchmarks/synthetic_presets.py [--patients 2] [--fov 260 210 130] [--seed 2026]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

import numpy as np

from noduleflow.metadata.synthetic import CohortConfig, generate_patient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=2)
    parser.add_argument("--fov", type=float, nargs=3, default=(260.0, 210.0, 130.0))
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    demo = CohortConfig(seed=args.seed, fov_mm=tuple(args.fov))
    presets = {"demo": demo, "screening": replace(demo, preset="screening")}
    wall: dict[str, list[float]] = {name: [] for name in presets}
    cpu: dict[str, list[float]] = {name: [] for name in presets}
    for index in range(args.patients):
        for name, config in presets.items():
            with tempfile.TemporaryDirectory() as out:
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                generate_patient(config, index, out)
                wall[name].append(time.perf_counter() - start_wall)
                cpu[name].append(time.process_time() - start_cpu)
    print("| preset | patients | wall s / patient | CPU s / patient | CPU ratio to demo |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in presets:
        ratio = np.sum(cpu[name]) / np.sum(cpu["demo"])
        print(f"| {name} | {args.patients} | {np.mean(wall[name]):.1f} | {np.mean(cpu[name]):.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
