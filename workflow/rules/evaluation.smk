# Evaluation (seed step 20): every paired run forecasts the val split (where runs and settings are compared);
# only `evaluation.test_runs`, the shipped ones, forecast the test split, and only through the `test_evaluation`
# target. Forecasts, the copy-the-prior and the growth baselines are measured on the same pairs; summaries, a
# cross-run table and pictures go to results/evaluation/{split}/ and into `snakemake --report report.html`.


rule evaluate_run:
    wildcard_constraints:
        split="val|test",
    input:
        unpack(evaluation_inputs),
    output:
        pairs="results/evaluation/{split}/{run}/pairs.csv",
        montage=report("results/evaluation/{split}/{run}/montage.png", category="Forecasts ({split})",
                       subcategory="{run}", caption="../report/montage.rst"),
    params:
        space=run_space,
        patch=config["patch"],
        segmentation=config["segmentation"],
        evaluation=config["evaluation"],
        sampler=config["models"]["sampler"],
        seed=config["models"]["seed"],
    threads: config["models"]["threads"]
    resources:
        **gpu_resources(mem_mb=8000, runtime=120),
    log:
        "logs/evaluation/evaluate_run_{split}_{run}.log",
    benchmark:
        "logs/benchmarks/evaluation/evaluate_run_{split}_{run}.tsv"
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/evaluate_run.py"


rule growth_rates:
    input:
        raw=output_path(rules.cache_index.output.index, split="train"),
        pairs=output_path(rules.nodule_pairs.output[0], split="train"),
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
    wildcard_constraints:
        split="val|test",
    input:
        pairs=rules.evaluate_run.output.pairs,
        rates=rules.growth_rates.output[0],
    output:
        summary=report("results/evaluation/{split}/{run}/summary.csv", category="Forecasts ({split})",
                       subcategory="{run}", caption="../report/summary.rst"),
        scatter=report("results/evaluation/{split}/{run}/change_scatter.png", category="Forecasts ({split})",
                       subcategory="{run}", caption="../report/change_scatter.rst"),
        interval=report("results/evaluation/{split}/{run}/error_by_interval.png", category="Forecasts ({split})",
                        subcategory="{run}", caption="../report/error_by_interval.rst"),
    params:
        evaluation=config["evaluation"],
        seed=config["seed"],
    log:
        "logs/evaluation/summarise_{split}_{run}.log",
    benchmark:
        "logs/benchmarks/evaluation/summarise_{split}_{run}.tsv"
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/summarise_run.py"


rule evaluation_table:
    wildcard_constraints:
        split="val|test",
    input:
        lambda wildcards: expand(rules.summarise_run.output.summary, split=wildcards.split,
                                 run=evaluated_runs(wildcards.split)),
    output:
        report("results/evaluation/{split}/runs.csv", category="Forecasts ({split})", caption="../report/runs.rst"),
    log:
        "logs/evaluation/evaluation_table_{split}.log",
    benchmark:
        "logs/benchmarks/evaluation/evaluation_table_{split}.tsv"
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/evaluation_table.py"


rule segmenter_accuracy:
    input:
        boxes=expand(rules.small_boxes.output[0], split=SPLITS),
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
        raw=output_path(rules.cache_index.output.index, split="val"),
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


# The test split, once, for the shipped runs (`evaluation.test_runs`); not part of `all`.
rule test_evaluation:
    input:
        run_evaluation_targets("test"),
