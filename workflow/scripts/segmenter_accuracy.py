"""Rule segmenter_accuracy: segmented against true nodule volumes on the synthetic cohort."""

from noduleflow.evaluation.tasks import segmenter_report
from noduleflow.logs import log_to

with log_to(snakemake.log[0]):
    segmenter_report(small_boxes=list(snakemake.input.boxes), truth=snakemake.input.truth,
                     min_volume=snakemake.params.min_volume, table_path=snakemake.output.table,
                     plot_path=snakemake.output.plot)
