"""The demo pipeline on a real one-node SLURM cluster through profiles/slurm: jobs, GPUs, a cancelled training job."""

import contextlib
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, snakemake
from noduleflow.logs import log_to, slurm_placement
from slurm_cluster import Unavailable, single_node_cluster

PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
GPU_RULES = {"train_vae", "fm_pretrain", "fm_paired", "encode_latents", "evaluate_run", "train_vae_volumes",
             "encode_volumes"}
# How a cluster without accounting is run (the README's "Running on a SLURM cluster"), plus a fast first status check
NO_ACCOUNTING = ("--slurm-status-command", "squeue", "--slurm-no-account")


def test_slurm_placement_names_the_job_its_node_and_its_gpus(tmp_path, monkeypatch):
    assert slurm_placement({"CUDA_VISIBLE_DEVICES": "0"}) == ""
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    monkeypatch.setenv("SLURM_JOB_GPUS", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with log_to(tmp_path / "job.log"):
        pass
    assert "SLURM job: SLURM_JOB_ID=17 SLURM_JOB_GPUS=3 CUDA_VISIBLE_DEVICES=0" in (tmp_path / "job.log").read_text()


def _partitions():
    """The profile's partitions, the default one first."""
    profile = yaml.safe_load(PROFILE.read_text())
    default = profile["default-resources"]["slurm_partition"]
    others = {r["slurm_partition"] for r in profile["set-resources"].values() if "slurm_partition" in r}
    return (default, *sorted(others - {default}))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node cluster whose partitions are the profile's (skipped where none can be started)."""
    stack = contextlib.ExitStack()
    try:
        running = stack.enter_context(single_node_cluster(tmp_path_factory.mktemp("slurm"), _partitions()))
    except Unavailable as reason:
        pytest.skip(f"no SLURM cluster on this machine: {reason}")
    with stack:
        yield running


def test_a_second_cluster_on_the_same_machine_is_refused_with_a_reason(cluster, tmp_path):
    with pytest.raises(Unavailable, match="another test session"), single_node_cluster(tmp_path, ("other",)):
        pass
    assert cluster.partitions[0] in cluster.run("sinfo")  # the running cluster still answers


def _profile_for(cluster, folder):
    """profiles/slurm fitted to the test node: memory requests divided by 16 (32 GB GPU jobs become 2 GB, still
    scaled by `attempt`), CPUs per GPU capped at the node's CPUs. Everything else is the profile as shipped."""
    profile = yaml.safe_load(PROFILE.read_text())
    profile["set-resources"] = {rule: dict(resources) for rule, resources in profile["set-resources"].items()}
    for resources in [profile["default-resources"], *profile["set-resources"].values()]:
        resources["mem_mb"] = f"({resources['mem_mb']}) // 16"
        if "cpus_per_gpu" in resources:
            resources["cpus_per_gpu"] = min(resources["cpus_per_gpu"], cluster.cpus)
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def _cancel_when_checkpointed(cluster, process, checkpoint, rule):
    """Wait for `checkpoint`, then scancel the running job of `rule`; its SLURM job id."""
    deadline = time.time() + 600
    while not checkpoint.exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before the checkpoint appeared"
        time.sleep(0.1)
    running = dict(line.split() for line in cluster.run("squeue", "-h", "-t", "RUNNING", "-o", "%k %i").splitlines())
    cluster.run("scancel", running[f"rule_{rule}"])
    return running[f"rule_{rule}"]


@pytest.mark.slow
def test_the_demo_runs_as_slurm_jobs_and_a_cancelled_training_job_resumes(cluster, demo_run, tmp_path):
    workdir = tmp_path / "run"
    (workdir / "config").mkdir(parents=True)
    shutil.copy(demo_run / "config" / "config.yaml", workdir / "config" / "config.yaml")
    profile = _profile_for(cluster, tmp_path / "profile")
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--profile", str(profile),
               *NO_ACCOUNTING, "--slurm-init-seconds-before-status-checks", "1", "--max-threads", str(cluster.cpus)]
    output = tmp_path / "snakemake.out"
    with open(output, "w") as out, subprocess.Popen(command, cwd=workdir, stdout=out, stderr=out) as process:
        try:
            cancelled = _cancel_when_checkpointed(cluster, process,
                                                  workdir / "results/models/.work/vae/checkpoint.pt", "train_vae")
            assert process.wait(timeout=1800) == 0, output.read_text()[-6000:]
        finally:
            process.kill()
    text = output.read_text()

    # every job was an sbatch job on the cluster, on its rule's partition, with a GPU exactly for the GPU rules
    submitted = dict(re.findall(r"submitted with SLURM jobid (\d+) \(log: (\S+)\)\.", text))
    jobs = {job_id: cluster.job(job_id) for job_id in submitted}
    by_rule = {}
    for job_id, job in jobs.items():
        rule = job["Comment"].removeprefix("rule_").split("_wildcards_")[0]
        by_rule.setdefault(rule, []).append(job_id)
        gpu = rule in GPU_RULES
        assert job["Partition"] == ("gpu" if gpu else "cpu")
        assert (job.get("TresPerJob") == "gres:gpu:1") == gpu, job
    ran = {job_id for job_id, job in jobs.items() if job["JobState"] == "COMPLETED"}
    assert {job_id for job_id, job in jobs.items() if job["JobState"] != "COMPLETED"} == {cancelled}
    logs = sorted((workdir / "logs").rglob("*.log"))
    assert len(logs) == len(ran) == len(list((demo_run / "logs").rglob("*.log")))
    placements = {path: re.search(r"SLURM job: (.*)", path.read_text()).group(1) for path in logs}
    assert {re.search(r"SLURM_JOB_ID=(\d+)", p).group(1) for p in placements.values()} == ran
    assert all(("CUDA_VISIBLE_DEVICES=" in placement) == any(path.name.startswith(rule) for rule in GPU_RULES)
               for path, placement in placements.items())

    # the cancelled job was retried with twice the memory and resumed from its checkpoint; nothing used its outputs
    first, retry = sorted(by_rule["train_vae"], key=int)
    assert first == cancelled and jobs[first]["JobState"] == "CANCELLED"
    assert int(jobs[retry]["MinMemoryNode"].rstrip("M")) == 2 * int(jobs[first]["MinMemoryNode"].rstrip("M"))
    assert "resuming from step 15/60" in (workdir / "logs/models/train_vae.log").read_text()
    assert all(jobs[job_id]["SubmitTime"] >= jobs[retry]["EndTime"] for job_id in by_rule["encode_latents"])
    # its SLURM log (with the job's own output up to the cancel) is kept and named in Snakemake's error report
    assert submitted[cancelled] in text.split(f"SLURM-job '{cancelled}' failed")[1]
    failed_log = Path(submitted[cancelled]).read_text()
    assert "step 10/60" in failed_log and "CANCELLED" in failed_log
    assert not Path(submitted[retry]).exists()  # the plugin removes the logs of successful jobs

    # the same models as the local run of the same cohort, and nothing left to do
    for path in sorted((demo_run / "results" / "models").rglob("model.metrics.csv")):
        local = pd.read_csv(path).drop(columns="seconds")
        on_slurm = pd.read_csv(workdir / path.relative_to(demo_run)).drop(columns="seconds")
        pd.testing.assert_frame_equal(on_slurm, local, check_exact=True)
    result = snakemake(workdir, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr
