"""Synthetic cohort generation time per patient: this checkout's renderer against an older one (by default the
renderer before the speed work of issue 14), same patients, same config, in one run.

The old renderer is `git archive`d from the baseline revision into a temporary folder; each patient is generated
by both in fresh subprocesses, alternating, so that load drifting during the run hits both alike. Reported per
renderer: wall and CPU seconds per patient (generation only, imports excluded), peak memory (max RSS) of a worker,
and how far the new images and masks are from the old ones.

    .venv/bin/python benchmarks/synthetic_speed.py [--patients 3] [--config config/config.yaml]
        [--set preset=screening fov_mm=260,210,300] [--baseline 7006dfa] [--new HEAD]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "7006dfa"  # main before issue 14's speed work
_WORKER = """
import json, resource, sys, time
from noduleflow.synthetic import CohortConfig, generate_patient
settings, index, out = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
config = CohortConfig.from_mapping(settings)
wall, cpu = time.perf_counter(), time.process_time()
generate_patient(config, index, out)
print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _settings(config_path: Path, overrides: list[str]) -> dict:
    settings = dict(yaml.safe_load(config_path.read_text())["synthetic"])
    for item in overrides:
        key, _, value = item.partition("=")
        parsed = [yaml.safe_load(v) for v in value.split(",")] if "," in value else yaml.safe_load(value)
        settings[key] = parsed
    return settings


def _archived_lib(revision: str, folder: Path) -> Path:
    archive = subprocess.run(["git", "archive", revision, "lib/noduleflow"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder / "lib"


def _run(lib: Path, settings: dict, index: int, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(lib)}
    result = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(settings), str(index), str(out)], env=env,
                            check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _differences(old: Path, new: Path) -> tuple[float, float, int, int]:
    """Largest and mean absolute HU difference over all images, and differing mask voxels out of all nodule voxels."""
    largest, total, count, masks_differ, mask_voxels = 0.0, 0.0, 0, 0, 0
    for path in sorted(old.rglob("*.nii.gz")):
        a = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        b = np.asarray(nib.load(new / path.relative_to(old)).dataobj, dtype=np.float32)
        if "masks" in path.parts:
            masks_differ += int((a != b).sum())
            mask_voxels += int((a > 0).sum())
        else:
            diff = np.abs(a - b)
            largest, total, count = max(largest, float(diff.max())), total + float(diff.sum()), count + diff.size
    return largest, total / max(count, 1), masks_differ, mask_voxels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override synthetic settings")
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the old renderer")
    parser.add_argument("--new", help="git revision of the new renderer (default: this working tree)")
    args = parser.parse_args()
    settings = _settings(args.config, args.set)
    results: dict[str, list[dict]] = {"old": [], "new": []}
    largest, total, masks_differ, mask_voxels = 0.0, 0.0, 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"old": _archived_lib(args.baseline, Path(tmp) / "baseline"),
                "new": _archived_lib(args.new, Path(tmp) / "new") if args.new else ROOT / "lib"}
        for index in range(args.patients):
            outs = {name: Path(tmp) / f"{name}{index}" for name in libs}
            for name, lib in libs.items():
                results[name].append(_run(lib, settings, index, outs[name]))
            big, mean, differ, voxels = _differences(outs["old"], outs["new"])
            largest, total = max(largest, big), total + mean
            masks_differ, mask_voxels = masks_differ + differ, mask_voxels + voxels
    print(f"synthetic settings: {json.dumps(settings)}; old {args.baseline}, new {args.new or 'working tree'}")
    print("| renderer | patients | wall s / patient | CPU s / patient | peak RSS MB | speed-up (CPU) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    cpu_old = np.sum([r["cpu"] for r in results["old"]])
    for name, rows in results.items():
        cpu = np.sum([r["cpu"] for r in rows])
        print(f"| {name} | {len(rows)} | {np.mean([r['wall'] for r in rows]):.1f} | {cpu / len(rows):.1f} | "
              f"{max(r['rss_mb'] for r in rows):.0f} | {cpu_old / cpu:.2f} |")
    print(f"new - old images: largest |difference| {largest:.0f} HU, mean {total / args.patients:.4f} HU; "
          f"mask voxels that differ: {masks_differ} of {mask_voxels} nodule voxels")


if __name__ == "__main__":
    main()
