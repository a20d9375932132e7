# Forecasts for new patients (not part of `all`): `snakemake forecast` forecasts every nodule of the table named
# by `forecast.table` with the trained run `forecast.run` (noduleflow.evaluation.predict; the same as `noduleflow forecast`).


rule forecast_patients:
    input:
        model=rules.fm_paired.output.model,
        table=config["forecast"]["table"] or [],
    output:
        table="results/forecast/{run}/forecasts.csv",
        nodules=directory("results/forecast/{run}/nodules"),
    params:
        patch=config["patch"],
        segmentation=config["segmentation"],
        evaluation=config["evaluation"],
        sampler=config["models"]["sampler"],
        seed=config["models"]["seed"],
        samples=config["forecast"]["samples"],
    threads: config["models"]["threads"]
    resources:
        **gpu_resources(mem_mb=4000),
    log:
        "logs/forecast/forecast_patients_{run}.log",
    benchmark:
        "logs/benchmarks/forecast/forecast_patients_{run}.tsv"
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/forecast_patients.py"


rule forecast:
    input:
        forecast_targets(),
