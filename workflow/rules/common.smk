# Shared setup: config validation, input locations and target lists.
# Scripts import noduleflow from the installed package or, in --sdm conda environments, through the link
# workflow/scripts/noduleflow -> lib/noduleflow (Snakemake puts a script's folder on its import path).
from snakemake.utils import validate

import functools
import os
from dataclasses import asdict

import pandas as pd

from noduleflow.code_tracking import code_digest
from noduleflow.config_checks import check_config
from noduleflow.ids import shard_name
from noduleflow.plan import find_precomputed_transforms, shard_plan, space_geometry
from noduleflow.report import image_tag, runs_table  # called by the report's landing page (workflow.rst)


validate(config, "../schemas/config.schema.yaml")
check_config(config)  # what the schema cannot express: fractions summing to 0, reversed ranges, unknown test runs, ...

SPLITS = ["train", "val", "test"]
SYNTHETIC = "results/synthetic"


wildcard_constraints:
    split="|".join(SPLITS),
    shard=r"\d{3}",
    dims="2d|3d",
    run="[A-Za-z0-9_-]+",


def source_manifest():
    """The exams manifest as given: the one named in the config, or the one made from the NLST metadata JSON."""
    if config["data"]["source"] == "nlst":
        return "results/nlst/manifest.csv"
    return config["data"]["manifest"] or []


def manifest_path():
    """The exams manifest exam_table reads: the synthetic cohort's, or the given one with DICOM exams converted."""
    if config["data"]["source"] == "synthetic":
        return f"{SYNTHETIC}/manifest.csv"
    return "results/dicom/manifest.csv"


def input_stage_problems():
    """Problem tables of the input stages that run for this data source (none for the synthetic cohort)."""
    stages = {"synthetic": [], "files": ["dicom"], "nlst": ["nlst", "dicom"]}[config["data"]["source"]]
    return [f"results/metadata/problems/{stage}.csv" for stage in stages]


def nodules_path():
    """The nodule tracking file: the synthetic cohort's, or the one named in the config."""
    if config["data"]["source"] == "synthetic":
        return f"{SYNTHETIC}/nodules.pt"
    return config["data"]["nodules"]


def metadata_targets():
    """Every output of the metadata stage (seed steps 1-4)."""
    per_split = ["exams", "timelines", "paired_exams"]
    return [
        "results/metadata/exam_to_nifti.pkl",
        "results/metadata/mapping_registered_exams.pkl",
        "results/metadata/nodule_tracking.parquet",
        "results/metadata/input_problems.csv",
        *[f"results/metadata/{split}/{table}.parquet" for split in SPLITS for table in per_split],
    ]


def registration_targets():
    """Every default output of the registration stage (seed steps 5-12)."""
    per_split = ["exams_registered.parquet", "bad_exams.csv", "nodules_fixed_bboxes.parquet", "paired_nodules.parquet"]
    return [f"results/registration/{split}/{name}" for split in SPLITS for name in per_split]


def cache_targets():
    """Every default output of the patch cache (seed steps 13-15)."""
    per_split = ["index.parquet", "skipped.csv", "small_boxes.parquet"]
    return [f"results/cache/raw/{split}/{name}" for split in SPLITS for name in per_split]


def volume_settings():
    """Settings of the volume cache: the `volumes` grid with the patch cache's HU window and dtype."""
    return {**config["patch"], **config["volumes"]}


def shard_names(split):
    """All shard names of a split."""
    return [shard_name(shard) for shard in range(config["shards"][split])]


def output_path(pattern, **wildcards):
    """One path of an upstream rule's output `pattern` (e.g. rules.cache_index.output.index) for `wildcards`."""
    (path,) = expand(pattern, **wildcards)
    return path


def per_shard(pattern):
    """An input function: `pattern` (a per-shard output, e.g. rules.cache_shard.output.index) for every shard of the
    job's split."""
    return lambda wildcards: expand(pattern, split=wildcards.split, shard=shard_names(wildcards.split))


def gpu_resources(**limits):
    """The resources of a model job: its GPUs (`models.gpu`, the `gpu` resource of clusters), plus `limits`."""
    return {"gpu": config["models"]["gpu"], **limits}


def training_resources():
    """The resources of a training job: its GPUs, 8 GB and 10 minutes (cluster defaults; raise for full sizes)."""
    return gpu_resources(mem_mb=8000, runtime=600)


@functools.cache
def _precomputed():
    return find_precomputed_transforms(config["data"]["precomputed_transforms"])


@functools.lru_cache(maxsize=8)
def _shard_plan(path, mtime_ns):
    """Shard -> its exams as plain dicts, for one version of a split's exam table (planned once, not per job)."""
    plan = shard_plan(pd.read_parquet(path), _precomputed())
    return {shard: [asdict(exam) for exam in exams] for shard, exams in plan.items()}


def registration_shard(wildcards):
    """The exams of a shard as plain dicts (a params value), once the split's exam table exists."""
    path = checkpoints.split_tables.get(split=wildcards.split).output.exams
    return _shard_plan(path, os.stat(path).st_mtime_ns).get(int(wildcards.shard), [])


def registration_images(wildcards):
    """Images read by a shard job: its exams and their baselines."""
    return sorted({p for exam in registration_shard(wildcards) for p in (exam["image_path"], exam["fixed_image_path"])})


def forecast_targets():
    """The forecasts of the config's nodule table (`forecast`), if it names one."""
    if not config["forecast"]["table"]:
        return []
    return [f"results/forecast/{config['forecast']['run']}/forecasts.csv"]


def model_targets():
    """Every trained model of the default config."""
    return [
        rules.train_vae.output.model,
        *expand(rules.fm_pretrain.output.model, dims=config["models"]["pretrain"]),
        *expand(rules.fm_paired.output.model, run=config["models"]["runs"]),
        *expand(rules.small_boxes_encoded.output[0], split=SPLITS),
    ]


def evaluated_runs(split):
    """The runs evaluated on a split: every run on val, only `evaluation.test_runs` (the shipped ones) on test."""
    return list(config["models"]["runs"]) if split == "val" else list(config["evaluation"]["test_runs"])


def run_evaluation_targets(split):
    """The ranked table and every run's pictures of the evaluation on one split."""
    return [f"results/evaluation/{split}/runs.csv"] + [
        f"results/evaluation/{split}/{run}/{name}" for run in evaluated_runs(split)
        for name in ("montage.png", "change_scatter.png", "error_by_interval.png")]


def evaluation_targets():
    """Every default output of the evaluation stage (seed step 20, on val) and the report's pictures."""
    targets = [
        *run_evaluation_targets("val"),
        "results/evaluation/vae_reconstructions.png",
        "results/registration/qc",
    ]
    if config["data"]["source"] == "synthetic":
        targets.append("results/evaluation/segmenter_accuracy.csv")
    return targets


def space_folder(space, split):
    """The cache a model of this space reads: the raw cache (patches or slices) or the latent cache."""
    if space == "latent":
        return output_path(rules.encode_latents.output[0], split=split)
    return output_path(rules.cache_index.output.index, split=split)


def pretrained_input(wildcards):
    """The pretrained model a paired run starts from, if it asks for one."""
    run = config["models"]["runs"][wildcards.run]
    return output_path(rules.fm_pretrain.output.model, dims=run["pretrained"]) if run.get("pretrained") else []


def growth_volumes(wildcards, split):
    """The measured volumes of a split's cached nodules, for a run with a growth head (none otherwise)."""
    if not config["models"]["runs"][wildcards.run].get("growth"):
        return []
    return output_path(rules.small_boxes.output[0], split=split)


def run_space(wildcards):
    """The space (raw, latent or slices) of a paired run."""
    return config["models"]["runs"][wildcards.run]["space"]


def evaluation_inputs(wildcards):
    """What a run's forecasts on a split read: its model, the split's raw cache and its own cache, the VAE (latent
    runs), the truth (synthetic cohort)."""
    space, split = run_space(wildcards), wildcards.split
    inputs = {
        "model": output_path(rules.fm_paired.output.model, run=wildcards.run),
        "raw": output_path(rules.cache_index.output.index, split=split),
        "data": space_folder(space, split),
        "pairs": output_path(rules.nodule_pairs.output[0], split=split),
    }
    if space == "latent":
        inputs["vae"] = rules.train_vae.output.model
    return inputs | synthetic_truth()


def synthetic_truth():
    """{"truth": the synthetic cohort's nodule truth} where the data are synthetic, else {}."""
    return {"truth": f"{SYNTHETIC}/truth/nodules.parquet"} if config["data"]["source"] == "synthetic" else {}


def track_library_code():
    """Let Snakemake's code trigger see the noduleflow modules each rule's script imports.

    Snakemake records a script rule's code as its `script:` line and reruns it when the script file is newer than
    the outputs; a module the script imports is invisible to it. Appending a digest of those modules to the
    recorded code makes an edited module rerun exactly the rules that use it (`snakemake --list-changes code`
    lists them; `--rerun-triggers mtime params input software-env` turns it off with the rest of the code trigger).
    """
    package_dir = os.path.join(workflow.basedir, "lib", "noduleflow")
    for scripted in (r for r in workflow.rules if r.script):
        script = os.path.join(scripted.basedir.get_path_or_uri(secret_free=True), scripted.script)
        scripted.run_func_src = f"{scripted.run_func_src}# noduleflow modules {code_digest(script, package_dir)}\n"
