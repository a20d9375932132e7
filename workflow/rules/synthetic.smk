# The demo cohort: chest phantoms with tracked nodules and known ground truth (lib/noduleflow/metadata/synthetic.py).


rule synthetic_cohort:
    output:
        manifest=f"{SYNTHETIC}/manifest.csv",
        nodules=f"{SYNTHETIC}/nodules.pt",
        images=directory(f"{SYNTHETIC}/images"),
        truth_exams=f"{SYNTHETIC}/truth/exams.parquet",
        truth_nodules=f"{SYNTHETIC}/truth/nodules.parquet",
        truth_masks=directory(f"{SYNTHETIC}/truth/masks"),
    params:
        cohort=config["synthetic"],
    threads: 8  # patients are rendered in parallel; Snakemake caps this at --cores
    log:
        "logs/synthetic_cohort.log",
    benchmark:
        "logs/benchmarks/synthetic_cohort.tsv"
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/synthetic_cohort.py"
