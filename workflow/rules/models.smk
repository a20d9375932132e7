# Models (seed steps 15-19): the 3D VAE and its latent cache, unconditional flow-matching pretraining (2D on
# slices, 3D on latents) and paired forecasting runs (config `models.runs`, one `{run}` each). Resumable
# checkpoints live in results/models/.work/ (not declared outputs, so Snakemake never deletes them); trained
# models are protected.


rule train_vae:
    input:
        train=output_path(rules.cache_index.output.index, split="train"),
        val=output_path(rules.cache_index.output.index, split="val"),
    output:
        model=protected("results/models/vae/model.pt"),
        metrics="results/models/vae/model.metrics.csv",
        plot=report("results/models/vae/model.loss.png", category="Training", caption="../report/loss.rst"),
    params:
        vae=config["models"]["vae"],
        patch=config["patch"],
        work_dir="results/models/.work/vae",
        seed=config["models"]["seed"],
    threads: config["models"]["threads"]
    priority: 10  # heads the longest chain (latents, 3D pretraining, the latent run, its evaluation): start it first
    resources:
        **training_resources(),
    log:
        "logs/models/train_vae.log",
    benchmark:
        "logs/benchmarks/models/train_vae.tsv"
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/train_vae.py"


rule encode_latents:
    input:
        model=rules.train_vae.output.model,
        index=rules.cache_index.output.index,
    output:
        directory("results/cache/latent/{split}"),
    threads: config["models"]["threads"]
    resources:
        **gpu_resources(),
    log:
        "logs/models/encode_latents_{split}.log",
    benchmark:
        "logs/benchmarks/models/encode_latents_{split}.tsv"
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/encode_latents.py"


rule fm_pretrain:
    input:
        train=lambda wildcards: space_folder(config["models"]["pretrain"][wildcards.dims]["space"], "train"),
        val=lambda wildcards: space_folder(config["models"]["pretrain"][wildcards.dims]["space"], "val"),
    output:
        model=protected("results/models/pretrain_{dims}/model.pt"),
        metrics="results/models/pretrain_{dims}/model.metrics.csv",
        plot=report("results/models/pretrain_{dims}/model.loss.png", category="Training",
                    caption="../report/loss.rst"),
    params:
        pretrain=lambda wildcards: {**config["models"]["pretrain"][wildcards.dims],
                                    "sigma": config["models"]["sigma"]},
        data=lambda wildcards: space_geometry(config["models"]["pretrain"][wildcards.dims]["space"],
                                              config["models"]["vae"]),
        work_dir="results/models/.work/pretrain_{dims}",
        seed=config["models"]["seed"],
    threads: config["models"]["threads"]
    resources:
        **training_resources(),
    log:
        "logs/models/fm_pretrain_{dims}.log",
    benchmark:
        "logs/benchmarks/models/fm_pretrain_{dims}.tsv"
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/fm_pretrain.py"


rule fm_paired:
    input:
        train=lambda wildcards: space_folder(config["models"]["runs"][wildcards.run]["space"], "train"),
        val=lambda wildcards: space_folder(config["models"]["runs"][wildcards.run]["space"], "val"),
        train_pairs=output_path(rules.nodule_pairs.output[0], split="train"),
        val_pairs=output_path(rules.nodule_pairs.output[0], split="val"),
        pretrained=pretrained_input,
        vae=lambda wildcards: rules.train_vae.output.model if run_space(wildcards) == "latent" else [],
        # a growth head learns the log volume ratio the segmenter measures on the raw cache
        train_volumes=lambda wildcards: growth_volumes(wildcards, "train"),
        val_volumes=lambda wildcards: growth_volumes(wildcards, "val"),
    output:
        model=protected("results/models/runs/{run}/model.pt"),
        metrics="results/models/runs/{run}/model.metrics.csv",
        plot=report("results/models/runs/{run}/model.loss.png", category="Training",
                    caption="../report/loss.rst"),
    params:
        run=lambda wildcards: {**config["models"]["runs"][wildcards.run], "sigma": config["models"]["sigma"]},
        data=lambda wildcards: space_geometry(config["models"]["runs"][wildcards.run]["space"],
                                              config["models"]["vae"]),
        patch=config["patch"],
        sampler=config["models"]["sampler"],
        work_dir="results/models/.work/runs/{run}",
        seed=config["models"]["seed"],
    threads: config["models"]["threads"]
    resources:
        **training_resources(),
    log:
        "logs/models/fm_paired_{run}.log",
    benchmark:
        "logs/benchmarks/models/fm_paired_{run}.tsv"
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/fm_paired.py"


# save_small_bboxes_encoded: reference volumes of the VAE-decoded patches (what latent models can reproduce).
rule small_boxes_encoded:
    input:
        model=rules.train_vae.output.model,
        latents=rules.encode_latents.output[0],
    output:
        "results/cache/latent/{split}_small_boxes.parquet",
    params:
        patch=config["patch"],
        segmentation=config["segmentation"],
    log:
        "logs/models/small_boxes_encoded_{split}.log",
    benchmark:
        "logs/benchmarks/models/small_boxes_encoded_{split}.tsv"
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/small_boxes_encoded.py"
