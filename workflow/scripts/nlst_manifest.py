"""Rule nlst_manifest: NLST metadata JSON -> exams manifest and filter counts (noduleflow.metadata.nlst)."""

from noduleflow.io import write_csv
from noduleflow.logs import log_to
from noduleflow.metadata.nlst import nlst_manifest
from noduleflow.metadata.tables import SeriesFilter
from noduleflow.settings import from_config

with log_to(snakemake.log[0]):
    series_filter = from_config(SeriesFilter, snakemake.params.series_filter)
    manifest, counts, problems = nlst_manifest(snakemake.input.json, series_filter)
    write_csv(manifest, snakemake.output.manifest)
    write_csv(counts, snakemake.output.filter_counts)
    write_csv(problems.frame(), snakemake.output.problems)
