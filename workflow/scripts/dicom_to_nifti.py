"""Rule dicom_to_nifti: exams given as DICOM folders -> NIfTI, and the manifest pointing at them
(noduleflow.metadata.dicom)."""

from noduleflow.io import write_csv
from noduleflow.logs import log_to
from noduleflow.metadata.dicom import convert_manifest

with log_to(snakemake.log[0]):
    problems = convert_manifest(snakemake.input.manifest, snakemake.output.manifest, snakemake.output.images,
                                threads=snakemake.threads)
    write_csv(problems.frame(), snakemake.output.problems)
