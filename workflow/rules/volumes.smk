# The full-volume alternative (seed steps 16-17, `train_vae_3d` and `save_encoded_images`): every exam that passed
# registration QC as a fixed-size volume in registered space, sharded and indexed like the patch cache; the
# nodule VAE's architecture and training loop on random crops of the train volumes; the encoder mean of every
# whole volume. Targets `vae_volumes` and `encoded_volumes`; not part of the default target.


rule volume_shard:
    input:
        exams=rules.registration_qc.output.exams,
    output:
        volumes="results/cache/volumes/{split}/{shard}.npy",
        index="results/cache/volumes/{split}/{shard}.parquet",
    params:
        volumes=volume_settings(),
    log:
        "logs/volumes/{split}/{shard}.log",
    benchmark:
        "logs/benchmarks/volumes/{split}/{shard}.tsv"
    conda:
        "../../envs/registration.yaml"
    script:
        "../scripts/volume_shard.py"


rule volume_index:
    input:
        volumes=per_shard(rules.volume_shard.output.volumes),
        indexes=per_shard(rules.volume_shard.output.index),
    output:
        "results/cache/volumes/{split}/index.parquet",
    params:
        volumes=volume_settings(),
    log:
        "logs/volumes/index_{split}.log",
    benchmark:
        "logs/benchmarks/volumes/index_{split}.tsv"
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/volume_index.py"


rule train_vae_volumes:
    input:
        train=output_path(rules.volume_index.output[0], split="train"),
        val=output_path(rules.volume_index.output[0], split="val"),
    output:
        model=protected("results/models/vae_volumes/model.pt"),
        metrics="results/models/vae_volumes/model.metrics.csv",
        plot=report("results/models/vae_volumes/model.loss.png", category="Training", caption="../report/loss.rst"),
    params:
        vae=config["models"]["vae_volumes"],
        work_dir="results/models/.work/vae_volumes",
        seed=config["models"]["seed"],
    threads: config["models"]["threads"]
    resources:
        **training_resources(),
    log:
        "logs/models/train_vae_volumes.log",
    benchmark:
        "logs/benchmarks/models/train_vae_volumes.tsv"
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/train_vae.py"


# Whole volumes, one at a time (the encoder is fully convolutional).
rule encode_volumes:
    input:
        model=rules.train_vae_volumes.output.model,
        index=rules.volume_index.output[0],
    output:
        directory("results/cache/volumes_encoded/{split}"),
    params:
        batch_size=1,
    threads: config["models"]["threads"]
    resources:
        **gpu_resources(),
    log:
        "logs/models/encode_volumes_{split}.log",
    benchmark:
        "logs/benchmarks/models/encode_volumes_{split}.tsv"
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/encode_latents.py"
