# Shared setup: config validation, input locations and target lists.
# Scripts import noduleflow from the installed package or, in --sdm conda environments, through the link
# workflow/scripts/noduleflow -> lib/noduleflow (Snakemake puts a script's folder on its import path).
from snakemake.utils import validate


validate(config, "../schemas/config.schema.yaml")

SPLITS = ["train", "val", "test"]
SYNTHETIC = "results/synthetic"


wildcard_constraints:
    split="|".join(SPLITS),


def manifest_path():
    """The exams manifest: the synthetic cohort's, or the one named in the config."""
    if config["data"]["source"] == "synthetic":
        return f"{SYNTHETIC}/manifest.csv"
    return config["data"]["manifest"]


def nodules_path():
    """The nodule tracking file: the synthetic cohort's, or the one named in the config."""
    if config["data"]["source"] == "synthetic":
        return f"{SYNTHETIC}/nodules.pt"
    return config["data"]["nodules"]


def metadata_targets():
    """Every output of the metadata stage (seed steps 1-4)."""
    per_split = ["exams", "timelines", "paired_exams"]
    return [
        "results/metadata/exam_to_nifti.pkl",
        "results/metadata/mapping_registered_exams.pkl",
        "results/metadata/nodule_tracking.parquet",
        "results/metadata/input_problems.csv",
        *[f"results/metadata/{split}/{table}.parquet" for split in SPLITS for table in per_split],
    ]


def registration_targets():
    """Every default output of the registration stage (seed steps 5-12)."""
    per_split = ["exams_registered.parquet", "bad_exams.csv", "nodules_fixed_bboxes.parquet", "paired_nodules.parquet"]
    return [f"results/metadata/{split}/{name}" for split in SPLITS for name in per_split]
