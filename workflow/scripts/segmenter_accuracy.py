"""Rule segmenter_accuracy: segmented against true nodule volumes on the synthetic cohort."""

from noduleflow.evaluation.tasks import segmenter_report
from noduleflow.logs import log_to

with log_to(snakemake.log[0]):
    segmenter_report(list(snakemake.input.boxes), snakemake.input.truth, snakemake.params.min_volume,
                     snakemake.output.table, snakemake.output.plot)
