# Registration stage (seed steps 5-12): follow-ups into baseline space, QC, boxes in registered space, pairs.
# A shard job depends only on its images and on the list of exams it holds (a params value known once the
# split tables exist), so new annotations or QC thresholds never re-register, and a new patient re-registers
# only its own shard.


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
    threads: config["registration"]["threads"]
    log:
        "logs/registration/{split}/{shard}.log",
    benchmark:
        "logs/benchmarks/registration/{split}/{shard}.tsv"
    conda:
        "../../envs/registration.yaml"
    script:
        "../scripts/register_shard.py"


rule registration_qc:
    input:
        exams=rules.split_tables.output.exams,
        shards=per_shard(rules.register_shard.output[0]),
    output:
        exams="results/registration/{split}/exams_registered.parquet",
        bad="results/registration/{split}/bad_exams.csv",
    params:
        qc=config["registration"]["qc"],
    log:
        "logs/registration/qc_{split}.log",
    benchmark:
        "logs/benchmarks/registration/qc_{split}.tsv"
    conda:
        "../../envs/registration.yaml"
    script:
        "../scripts/registration_qc.py"


rule nodule_boxes:
    input:
        exams=rules.registration_qc.output.exams,
        tracking=rules.nodule_tracking.output.tracking,
    output:
        "results/registration/{split}/nodules_fixed_bboxes.parquet",
    params:
        spacing=config["patch"]["spacing_mm"],
    log:
        "logs/registration/nodule_boxes_{split}.log",
    benchmark:
        "logs/benchmarks/registration/nodule_boxes_{split}.tsv"
    conda:
        "../../envs/registration.yaml"
    script:
        "../scripts/nodule_boxes.py"


rule nodule_pairs:
    input:
        rules.nodule_boxes.output[0],
    output:
        "results/registration/{split}/paired_nodules.parquet",
    log:
        "logs/registration/nodule_pairs_{split}.log",
    benchmark:
        "logs/benchmarks/registration/nodule_pairs_{split}.tsv"
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/nodule_pairs.py"


# Optional target (`snakemake registered_niftis`): a few follow-ups written in registered space, with pictures.
rule registered_niftis:
    input:
        exams=expand(rules.registration_qc.output.exams, split=SPLITS),
        nodules=expand(rules.nodule_boxes.output[0], split=SPLITS),
    output:
        mapping="results/registration/exam_to_nifti_transformed.pkl",
        niftis=directory("results/registration/registered"),
        pictures=report(directory("results/registration/qc"), patterns=["{name}.png"], category="Registration",
                        caption="../report/registration_qc.rst"),
    params:
        how_many=config["registration"]["registered_niftis"],
        spacing=config["patch"]["spacing_mm"],
    log:
        "logs/registration/registered_niftis.log",
    benchmark:
        "logs/benchmarks/registration/registered_niftis.tsv"
    conda:
        "../../envs/registration.yaml"
    script:
        "../scripts/registered_niftis.py"
