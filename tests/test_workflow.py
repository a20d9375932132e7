"""The metadata stage run end to end through Snakemake on a small synthetic cohort, checked against its truth."""

import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, make_workdir, planned_jobs, snakemake
from noduleflow.io import load_plain_pickle
from noduleflow.metadata.nodules import tracking_from_table

pytestmark = pytest.mark.slow
SPLITS = ("train", "val", "test")


def _manifest(workdir):
    return pd.read_csv(workdir / "results/synthetic/manifest.csv", dtype={"pid": str, "exam_id": str})


def _tables(workdir, name):
    return {split: pd.read_parquet(workdir / "results" / "metadata" / split / f"{name}.parquet") for split in SPLITS}


def test_lint_is_clean():
    result = snakemake(REPO, "--lint", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _planned_resources(workdir, *args):
    """rule -> {resource: value} of every job in the plan of `snakemake -n *args` (the last job of each rule)."""
    result = snakemake(workdir, "-n", *args)
    blocks = re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):\n(?:    .*\n)*?    resources: (.*)$", result.stdout,
                        re.M)
    return {rule: dict(item.split("=", 1) for item in resources.split(", ")) for rule, resources in blocks}


def test_the_slurm_profile_gives_exactly_the_gpu_rules_a_gpu_on_the_gpu_partition(tmp_path):
    """Planned in a fresh folder, where every rule has a job to plan (the full-volume alternative's too)."""
    assert not (REPO / "profiles" / "default").exists(), "Snakemake would load it over --profile and override keys"
    workdir = make_workdir(tmp_path)
    targets = ("all", "vae_volumes", "encoded_volumes")
    declared = _planned_resources(workdir, *targets, "--configfile", str(REPO / "config" / "full.yaml"))
    gpu_rules = {rule for rule, resources in declared.items() if resources.get("gpu") == "1"}
    assert gpu_rules >= {"train_vae", "fm_pretrain", "fm_paired", "train_vae_volumes", "encode_volumes"}
    planned = _planned_resources(workdir, *targets, "--profile", str(REPO / "profiles" / "slurm"))
    assert planned.keys() == declared.keys()
    for rule, resources in planned.items():
        gpu = rule in gpu_rules
        assert resources["slurm_partition"] == ("gpu" if gpu else "cpu"), rule
        assert resources.get("gpu", "0") == ("1" if gpu else "0"), rule
        assert ("cpus_per_gpu" in resources) == gpu and int(resources["runtime"]) >= 60, rule
        assert int(resources["mem_mb"]) >= (32000 if gpu else 4000), rule


def test_a_second_run_has_nothing_to_do(demo_run):
    result = snakemake(demo_run, "-n", "--cores", "1")
    assert "Nothing to be done" in result.stdout + result.stderr


def test_an_edited_library_module_reruns_exactly_the_rules_that_import_it(demo_run, tmp_path):
    """Planned from a copy of the code, so the edit never touches the checkout the other tests run."""
    checkout = tmp_path / "checkout"
    for name in ("workflow", "lib", "envs"):
        shutil.copytree(REPO / name, checkout / name, symlinks=True)
    shutil.copy2(REPO / "Snakefile", checkout / "Snakefile")
    snakefile = checkout / "Snakefile"
    assert planned_jobs(snakemake(demo_run, "-n", snakefile=snakefile)) == {}
    module = checkout / "lib" / "noduleflow" / "evaluation" / "metrics.py"
    module.touch()  # a newer file with the same code is no change
    assert planned_jobs(snakemake(demo_run, "-n", snakefile=snakefile)) == {}

    module.write_text(module.read_text() + "\n# an edit\n")
    plan = planned_jobs(snakemake(demo_run, "-n", snakefile=snakefile))
    users = {"evaluate_run", "growth_rates", "summarise_run", "evaluation_table", "segmenter_accuracy", "vae_examples"}
    assert set(plan) == users, plan
    changed = snakemake(demo_run, "--list-changes", "code", snakefile=snakefile).stdout.split()
    assert changed and all(path.startswith("results/evaluation/") for path in changed), changed
    assert "results/evaluation/segmenter_accuracy.csv" in changed
    assert snakemake(demo_run, "--list-changes", "code").stdout.split() == []  # the checkout itself is unchanged


def test_splits_are_disjoint_and_cover_every_patient_with_nodules(demo_run):
    exams = _tables(demo_run, "exams")
    pids = {split: set(frame["pid"]) for split, frame in exams.items()}
    assert not (pids["train"] & pids["val"]) and not (pids["train"] & pids["test"]) and not (pids["val"] & pids["test"])
    tracking = pd.read_parquet(demo_run / "results/metadata/nodule_tracking.parquet")
    assert set().union(*pids.values()) == set(tracking["pid"])
    assert all(pids.values()), "the small cohort should populate every split"


def test_one_exam_per_timepoint_the_thinnest_series(demo_run):
    manifest = _manifest(demo_run)
    for frame in _tables(demo_run, "exams").values():
        assert not frame.duplicated(["pid", "screen_timepoint"]).any()
        for row in frame.itertuples():
            same = manifest[(manifest["pid"] == row.pid) & (manifest["screen_timepoint"] == row.screen_timepoint)]
            assert row.slice_thickness == same["slice_thickness"].min()
    assert len(manifest) > len(manifest.drop_duplicates(["pid", "screen_timepoint"])), \
        "the cohort should contain timepoints with two series"


def test_pairs_are_consecutive_with_the_interval_between_exam_dates(demo_run):
    manifest = _manifest(demo_run).set_index("exam_id")
    exams = pd.concat(_tables(demo_run, "exams").values())
    pairs = pd.concat(_tables(demo_run, "paired_exams").values())
    assert len(pairs) == len(exams) - exams["pid"].nunique()
    for row in pairs.itertuples():
        timepoints = sorted(exams.loc[exams["pid"] == row.pid, "screen_timepoint"])
        assert timepoints.index(row.screen_timepoint_b) == timepoints.index(row.screen_timepoint_a) + 1
        days = manifest["days_since_baseline"]
        expected = days[row.exam_id_b] - days[row.exam_id_a]
        assert row.delta_days == pytest.approx(expected) and row.delta_days > 300


def test_tracking_parquet_round_trips_the_tracking_file(demo_run):
    table = pd.read_parquet(demo_run / "results/metadata/nodule_tracking.parquet")
    original = torch.load(demo_run / "results/synthetic/nodules.pt", weights_only=True)
    assert tracking_from_table(table) == original
    mapping = load_plain_pickle(demo_run / "results/metadata/exam_to_nifti.pkl")
    assert set(table["exam"]) <= set(mapping)


def test_nodule_boxes_contain_the_true_centres(demo_run):
    truth = pd.read_parquet(demo_run / "results/synthetic/truth/nodules.parquet")
    series = pd.read_parquet(demo_run / "results/metadata/exam_series.parquet").set_index("exam_id")
    table = pd.read_parquet(demo_run / "results/metadata/nodule_tracking.parquet")
    boxes = {(r.exam, r.nodule_group): list(r.coords) for r in table.itertuples()}
    primary = truth[truth["primary_series"]]
    assert len(primary) == len(boxes)
    for row in primary.itertuples():
        geometry = series.loc[row.exam_id]
        x, y, z = (np.asarray(row.center_exam) - np.asarray(geometry["origin"])) / np.asarray(geometry["spacing"])
        i0, i1, j0, j1, k0, k1 = boxes[(row.exam_id, row.nodule_group)]
        assert i0 - 0.5 <= y <= i1 + 0.5 and j0 - 0.5 <= x <= j1 + 0.5 and k0 - 0.5 <= z <= k1 + 0.5


def test_a_clean_cohort_reports_no_problems(demo_run):
    problems = pd.read_csv(demo_run / "results/metadata/input_problems.csv")
    assert problems.empty, problems.to_string()


def test_bad_inputs_are_reported_and_the_rest_processed(demo_run, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_run / "results" / "synthetic", data, ignore=shutil.ignore_patterns("truth"))
    manifest = pd.read_csv(data / "manifest.csv", dtype={"pid": str, "exam_id": str})
    tracking = torch.load(data / "nodules.pt", weights_only=True)
    annotated = pd.read_parquet(demo_run / "results/metadata/nodule_tracking.parquet")
    exams = annotated.drop_duplicates("exam")["exam"].tolist()
    missing, truncated = exams[0], exams[-1]
    (data / manifest.set_index("exam_id").loc[missing, "image_path"]).unlink()
    path = data / manifest.set_index("exam_id").loc[truncated, "image_path"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    untouched = manifest[~manifest["exam_id"].isin([missing, truncated])]
    conflicting = untouched["exam_id"].iloc[0]
    duplicate = untouched.iloc[[0]].assign(days_since_baseline=1.0)
    unsafe = untouched.iloc[[1]].assign(pid="../x", exam_id="../x0")
    pd.concat([manifest, duplicate, unsafe]).to_csv(data / "manifest.csv", index=False)
    lost = {missing, truncated, conflicting}
    victim = annotated[~annotated["exam"].isin(lost)].iloc[0]
    lesion = tracking[victim["pid"]][victim["nodule_group"]][victim["exam_idx"]]
    lesion["coords"] = [9000, 9010, 5, 6, 1, 2]
    tracking[victim["pid"]][999] = {0: {**lesion, "exam": "123456099999"}}
    torch.save(tracking, data / "nodules.pt")

    workdir = make_workdir(tmp_path / "run", data={"source": "files", "manifest": str(data / "manifest.csv"),
                                                   "nodules": str(data / "nodules.pt")})
    snakemake(workdir, "--cores", "2", "metadata")
    problems = pd.read_csv(workdir / "results/metadata/input_problems.csv", dtype=str)
    # every reason of an item, joined (a lesion may get a warning and an error)
    reason = problems.groupby(problems["exam_id"] + "/" + problems["stage"])["reason"].agg(" | ".join).to_dict()
    assert "not found" in reason[f"{missing}/manifest"]
    assert "truncated" in reason[f"{truncated}/manifest"]
    assert "conflicting" in reason[f"{conflicting}/manifest"]
    assert "unsafe" in reason["../x0/manifest"]
    assert "outside the volume" in reason[f"{victim['exam']}/nodules"]
    assert "not a usable exam" in reason["123456099999/nodules"]
    assert "not a usable exam" in reason[f"{missing}/nodules"]
    exams_after = pd.concat(_tables(workdir, "exams").values())
    exams_before = pd.concat(_tables(demo_run, "exams").values())
    assert set(exams_after["exam_id"]) == set(exams_before["exam_id"]) - lost - (
        {victim["exam"]} if (annotated["exam"] == victim["exam"]).sum() == 1 else set())
