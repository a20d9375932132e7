"""Rule exam_table: validate the manifest, read image headers, map exams to NIfTI (noduleflow.metadata.manifest)."""

from noduleflow.io import write_csv, write_parquet, write_pickle
from noduleflow.logs import log_to
from noduleflow.metadata.manifest import build_exam_series, exam_to_nifti

with log_to(snakemake.log[0]):
    series, problems = build_exam_series(snakemake.input.manifest, threads=snakemake.threads)
    write_parquet(series, snakemake.output.series)
    write_pickle(exam_to_nifti(series), snakemake.output.exam_to_nifti)
    write_csv(problems.frame(), snakemake.output.problems)
