# Metadata stage (seed steps 1-4): exam -> image map, precomputed transforms, nodule table, split tables.


rule exam_table:
    input:
        manifest=manifest_path(),
    output:
        series="results/metadata/exam_series.parquet",
        exam_to_nifti="results/metadata/exam_to_nifti.pkl",
        problems="results/metadata/problems/manifest.csv",
    threads: 2
    log:
        "logs/metadata/exam_table.log",
    benchmark:
        "logs/benchmarks/metadata/exam_table.tsv"
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/exam_table.py"


rule registration_map:
    input:
        transforms=config["data"]["precomputed_transforms"] or [],
    output:
        mapping="results/metadata/mapping_registered_exams.pkl",
    log:
        "logs/metadata/registration_map.log",
    benchmark:
        "logs/benchmarks/metadata/registration_map.tsv"
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/registration_map.py"


rule nodule_tracking:
    input:
        nodules=nodules_path(),
        series=rules.exam_table.output.series,
    output:
        tracking="results/metadata/nodule_tracking.parquet",
        problems="results/metadata/problems/nodules.csv",
    log:
        "logs/metadata/nodule_tracking.log",
    benchmark:
        "logs/benchmarks/metadata/nodule_tracking.tsv"
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/nodule_tracking.py"


checkpoint split_tables:
    input:
        series=rules.exam_table.output.series,
        tracking=rules.nodule_tracking.output.tracking,
    output:
        exams="results/metadata/{split}/exams.parquet",
        timelines="results/metadata/{split}/timelines.parquet",
        paired_exams="results/metadata/{split}/paired_exams.parquet",
        problems="results/metadata/problems/tables_{split}.csv",
    params:
        seed=config["seed"],
        fractions=config["splits"]["fractions"],
        n_shards=lambda wildcards: config["shards"][wildcards.split],
        series_filter=config["series_filter"],
    log:
        "logs/metadata/split_tables_{split}.log",
    benchmark:
        "logs/benchmarks/metadata/split_tables_{split}.tsv"
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/split_tables.py"


rule input_problems:
    input:
        input_stage_problems(),
        rules.exam_table.output.problems,
        rules.nodule_tracking.output.problems,
        expand(rules.split_tables.output.problems, split=SPLITS),
    output:
        "results/metadata/input_problems.csv",
    log:
        "logs/metadata/input_problems.log",
    benchmark:
        "logs/benchmarks/metadata/input_problems.tsv"
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/input_problems.py"
