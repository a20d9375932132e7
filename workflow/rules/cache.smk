# Nodule patch cache (seed steps 13-15): patches cut in registered space per shard, one index per split,
# small boxes with reference volumes.


rule cache_shard:
    input:
        exams=rules.registration_qc.output.exams,
        nodules=rules.nodule_boxes.output[0],
    output:
        patches="results/cache/raw/{split}/{shard}.npy",
        slices="results/cache/raw/{split}/{shard}_slices.npy",
        index="results/cache/raw/{split}/{shard}.parquet",
        skipped="results/cache/raw/{split}/{shard}_skipped.csv",
    params:
        patch=config["patch"],
    log:
        "logs/cache/{split}/{shard}.log",
    benchmark:
        "logs/benchmarks/cache/{split}/{shard}.tsv"
    conda:
        "../../envs/registration.yaml"
    script:
        "../scripts/cache_shard.py"


rule cache_index:
    input:
        patches=per_shard(rules.cache_shard.output.patches),
        slices=per_shard(rules.cache_shard.output.slices),
        indexes=per_shard(rules.cache_shard.output.index),
        skipped=per_shard(rules.cache_shard.output.skipped),
    output:
        index="results/cache/raw/{split}/index.parquet",
        skipped="results/cache/raw/{split}/skipped.csv",
    params:
        patch=config["patch"],
    log:
        "logs/cache/index_{split}.log",
    benchmark:
        "logs/benchmarks/cache/index_{split}.tsv"
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/cache_index.py"


rule small_boxes:
    input:
        index=rules.cache_index.output.index,
        patches=rules.cache_index.input.patches,
    output:
        "results/cache/raw/{split}/small_boxes.parquet",
    params:
        patch=config["patch"],
        segmentation=config["segmentation"],
    log:
        "logs/cache/small_boxes_{split}.log",
    benchmark:
        "logs/benchmarks/cache/small_boxes_{split}.tsv"
    conda:
        "../../envs/registration.yaml"
    script:
        "../scripts/small_boxes.py"
