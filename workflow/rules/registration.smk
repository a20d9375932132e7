# Registration stage (seed steps 5-12): follow-ups into baseline space, QC, boxes in registered space, pairs.
# A shard job depends only on its images and on the list of exams it holds (a params value known once the
# split tables exist), so new annotations or QC thresholds never re-register, and a new patient re-registers
# only its own shard.
import functools
import os
from dataclasses import asdict

import pandas as pd

from noduleflow.ids import shard_name
from noduleflow.plan import find_precomputed_transforms, shard_exams


wildcard_constraints:
    shard=r"\d{3}",


def shard_names(split):
    """All shard names of a split."""
    return [shard_name(shard) for shard in range(config["shards"][split])]


@functools.cache
def _precomputed():
    return find_precomputed_transforms(config["data"]["precomputed_transforms"])


@functools.lru_cache(maxsize=8)
def _split_exams(path, mtime_ns):
    return pd.read_parquet(path)


def registration_shard(wildcards):
    """The exams of a shard as plain dicts (a params value), once the split's exam table exists."""
    path = checkpoints.split_tables.get(split=wildcards.split).output.exams
    exams = _split_exams(path, os.stat(path).st_mtime_ns)
    return [asdict(exam) for exam in shard_exams(exams, int(wildcards.shard), _precomputed())]


def registration_images(wildcards):
    """Images read by a shard job: its exams and their baselines."""
    return sorted({p for exam in registration_shard(wildcards) for p in (exam["image_path"], exam["fixed_image_path"])})


rule register_shard:
    input:
        images=registration_images,
    output:
        "results/registration/{split}/{shard}.parquet",
    params:
        exams=registration_shard,
        method=config["registration"]["method"],
        seed=config["seed"],
        transform_dir="results/registration/transforms",
    threads: 2
    log:
        "logs/registration/{split}/{shard}.log",
    benchmark:
        "benchmarks/registration/{split}/{shard}.tsv"
    conda:
        "../../envs/registration.yaml"
    script:
        "../scripts/register_shard.py"


rule registration_qc:
    input:
        exams="results/metadata/{split}/exams.parquet",
        shards=lambda wildcards: expand(rules.register_shard.output[0], split=wildcards.split,
                                        shard=shard_names(wildcards.split)),
    output:
        exams="results/metadata/{split}/exams_registered.parquet",
        bad="results/metadata/{split}/bad_exams.csv",
    params:
        qc=config["registration"]["qc"],
    log:
        "logs/registration/qc_{split}.log",
    conda:
        "../../envs/registration.yaml"
    script:
        "../scripts/registration_qc.py"


rule nodule_boxes:
    input:
        exams=rules.registration_qc.output.exams,
        tracking=rules.nodule_tracking.output.tracking,
    output:
        "results/metadata/{split}/nodules_fixed_bboxes.parquet",
    params:
        spacing=config["patch"]["spacing_mm"],
    log:
        "logs/registration/nodule_boxes_{split}.log",
    conda:
        "../../envs/registration.yaml"
    script:
        "../scripts/nodule_boxes.py"


rule nodule_pairs:
    input:
        rules.nodule_boxes.output[0],
    output:
        "results/metadata/{split}/paired_nodules.parquet",
    log:
        "logs/registration/nodule_pairs_{split}.log",
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/nodule_pairs.py"
