# Evaluation (seed step 20): every paired run forecasts the test split; forecasts, the copy-the-prior and the
# median-growth baselines are measured on the same pairs; summaries, a cross-run table and pictures go to
# results/evaluation/ and into `snakemake --report report.html`.


rule evaluate_run:
    input:
        unpack(evaluation_inputs),
    output:
        pairs="results/evaluation/{run}/pairs.csv",
        montage=report("results/evaluation/{run}/montage.png", category="Forecasts", subcategory="{run}",
                       caption="../report/montage.rst"),
    params:
        space=run_space,
        patch=config["patch"],
        segmentation=config["segmentation"],
        evaluation=config["evaluation"],
        sampler=config["models"]["sampler"],
        seed=config["seed"],
    threads: config["models"]["threads"]
    resources:
        gpu=config["models"]["gpu"],
        mem_mb=8000,
        runtime=120,
    log:
        "logs/evaluation/evaluate_run_{run}.log",
    benchmark:
        "logs/benchmarks/evaluation/evaluate_run_{run}.tsv"
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/evaluate_run.py"


rule growth_rates:
    input:
        raw="results/cache/raw/train/index.parquet",
        pairs="results/metadata/train/paired_nodules.parquet",
        **synthetic_truth(),
    output:
        "results/evaluation/train_growth_rates.json",
    params:
        patch=config["patch"],
        segmentation=config["segmentation"],
    log:
        "logs/evaluation/growth_rates.log",
    benchmark:
        "logs/benchmarks/evaluation/growth_rates.tsv"
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/growth_rates.py"


rule summarise_run:
    input:
        pairs=rules.evaluate_run.output.pairs,
        rates=rules.growth_rates.output[0],
    output:
        summary=report("results/evaluation/{run}/summary.csv", category="Forecasts", subcategory="{run}",
                       caption="../report/summary.rst"),
        scatter=report("results/evaluation/{run}/change_scatter.png", category="Forecasts", subcategory="{run}",
                       caption="../report/change_scatter.rst"),
        interval=report("results/evaluation/{run}/error_by_interval.png", category="Forecasts",
                        subcategory="{run}", caption="../report/error_by_interval.rst"),
    params:
        evaluation=config["evaluation"],
        seed=config["seed"],
    log:
        "logs/evaluation/summarise_{run}.log",
    benchmark:
        "logs/benchmarks/evaluation/summarise_{run}.tsv"
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/summarise_run.py"


rule evaluation_table:
    input:
        expand(rules.summarise_run.output.summary, run=list(config["models"]["runs"])),
    output:
        report("results/evaluation/runs.csv", category="Forecasts", caption="../report/runs.rst"),
    log:
        "logs/evaluation/evaluation_table.log",
    benchmark:
        "logs/benchmarks/evaluation/evaluation_table.tsv"
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/evaluation_table.py"


rule segmenter_accuracy:
    input:
        boxes=expand("results/cache/raw/{split}/small_boxes.parquet", split=SPLITS),
        truth=f"{SYNTHETIC}/truth/nodules.parquet",
    output:
        table=report("results/evaluation/segmenter_accuracy.csv", category="Segmenter",
                     caption="../report/segmenter.rst"),
        plot=report("results/evaluation/segmenter_accuracy.png", category="Segmenter",
                    caption="../report/segmenter.rst"),
    params:
        min_volume=50.0,
    log:
        "logs/evaluation/segmenter_accuracy.log",
    benchmark:
        "logs/benchmarks/evaluation/segmenter_accuracy.tsv"
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/segmenter_accuracy.py"


rule vae_examples:
    input:
        model=rules.train_vae.output.model,
        raw="results/cache/raw/test/index.parquet",
    output:
        report("results/evaluation/vae_reconstructions.png", category="Training", caption="../report/vae.rst"),
    params:
        patch=config["patch"],
        examples=config["evaluation"]["examples"],
    log:
        "logs/evaluation/vae_examples.log",
    benchmark:
        "logs/benchmarks/evaluation/vae_examples.tsv"
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/vae_examples.py"
