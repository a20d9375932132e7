# noduleflow: from longitudinal chest CT with tracked nodules to a trained, evaluated nodule forecaster.
# All logic lives in lib/noduleflow; the rules below only wire files to it.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


# The report opens on this page (rendered with Jinja): the runs table, the headline figures, what a good result is.
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/synthetic.smk"
include: "workflow/rules/inputs.smk"
include: "workflow/rules/metadata.smk"
include: "workflow/rules/registration.smk"
include: "workflow/rules/cache.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/evaluation.smk"
include: "workflow/rules/volumes.smk"
include: "workflow/rules/forecast.smk"


rule all:
    default_target: True
    input:
        metadata_targets(),
        registration_targets(),
        cache_targets(),
        model_targets(),
        evaluation_targets(),


# One target per stage: `snakemake metadata` builds seed steps 1-4 only.
rule metadata:
    input:
        metadata_targets(),


rule registration:
    input:
        registration_targets(),


rule cache:
    input:
        cache_targets(),


rule models:
    input:
        model_targets(),


rule evaluation:
    input:
        evaluation_targets(),


# The full-volume alternative (not part of `all`): the VAE on full volumes, and every split's encoded volumes.
rule vae_volumes:
    input:
        rules.train_vae_volumes.output.model,


rule encoded_volumes:
    input:
        expand(rules.encode_volumes.output[0], split=SPLITS),


track_library_code()
