"""benchmarks/gpu_smoke.py: its CPU smoke path runs the full config's paired 3D run end to end (tiny sizes)."""

import re
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow  # a subprocess that imports torch and MONAI and trains: 15-40 s on 2 busy cores
def test_the_gpu_smoke_benchmark_trains_samples_and_reports_on_cpu():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_smoke.py"), "--device", "cpu",
                             "--steps", "2", "--quick", "--samples", "1", "--sample-steps", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "run raw3d_bridge (quick) on CPU, float32, patch 32x32x8, batch 2" in out
    steps = float(re.search(r"train: ([\d.]+) steps/s over the first step", out).group(1))
    seconds = float(re.search(r"sample: ([\d.]+) s per forecast \(heun 2, 1 forecasts", out).group(1))
    memory = float(re.search(r"peak memory ([\d.]+) GiB \(process peak RSS\)", out).group(1))
    assert steps > 0 and seconds > 0 and 0.1 < memory < 16
    assert re.search(r"CPU reference \(benchmarks/README.md, raw flow.*: [\d.]+ steps/s, [\d.]+ s per forecast", out)
