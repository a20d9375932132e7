"""Same config and seed, same tables, caches and metrics (noduleflow.determinism)."""

import shutil

import pandas as pd
import pytest

from conftest import snakemake
from noduleflow.determinism import differences, digest, fingerprints


def test_digests_ignore_wall_clock_columns_and_see_every_other_change(tmp_path):
    frame = pd.DataFrame({"step": [1, 2], "loss": [0.5, 0.25], "seconds": [0.1, 0.2]})
    frame.to_csv(tmp_path / "a.metrics.csv", index=False)
    frame.assign(seconds=[9.0, 9.5]).to_csv(tmp_path / "b.metrics.csv", index=False)
    frame.assign(loss=[0.5, 0.26]).to_csv(tmp_path / "c.metrics.csv", index=False)
    assert digest(tmp_path / "a.metrics.csv") == digest(tmp_path / "b.metrics.csv")
    assert digest(tmp_path / "a.metrics.csv") != digest(tmp_path / "c.metrics.csv")
    table = pd.DataFrame({"exam_id": ["a", "b"], "pairs": [["x"], ["y", "z"]], "runtime_s": [1.0, 2.0]})
    table.to_parquet(tmp_path / "a.parquet")
    table.assign(runtime_s=[3.0, 4.0]).to_parquet(tmp_path / "b.parquet")
    table.assign(pairs=[["x"], ["y"]]).to_parquet(tmp_path / "c.parquet")
    assert digest(tmp_path / "a.parquet") == digest(tmp_path / "b.parquet") != digest(tmp_path / "c.parquet")
    assert differences({"x": "1", "y": "2"}, {"x": "1", "y": "3", "z": "4"}) == ["y", "z"]


@pytest.mark.slow
def test_a_second_run_of_the_demo_gives_identical_results(demo_run, tmp_path):
    """The determinism command's check, against the session's demo run: every table, cache and metric."""
    shutil.copytree(demo_run / "config", tmp_path / "config")
    snakemake(tmp_path, "--cores", "2")
    first, second = fingerprints(demo_run), fingerprints(tmp_path)
    assert any(name.endswith("index.parquet") for name in first)
    assert any(name.endswith("metrics.csv") for name in first) and any(name.endswith("pairs.csv") for name in first)
    assert differences(first, second) == []
