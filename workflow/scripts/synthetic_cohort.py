"""Rule synthetic_cohort: generate the demo cohort (logic: noduleflow.metadata.synthetic)."""

from pathlib import Path

from noduleflow.logs import log_to
from noduleflow.metadata.synthetic import CohortConfig, generate_cohort
from noduleflow.settings import from_config

with log_to(snakemake.log[0]):
    generate_cohort(
        from_config(CohortConfig, snakemake.params.cohort),
        Path(snakemake.output.manifest).parent,
        threads=snakemake.threads,
    )
