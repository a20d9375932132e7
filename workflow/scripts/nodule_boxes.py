"""Rule nodule_boxes: nodule boxes in registered space (noduleflow.registration.boxes)."""

import pandas as pd

from noduleflow.io import write_parquet
from noduleflow.logs import log_to
from noduleflow.registration.boxes import boxes_in_registered_space

with log_to(snakemake.log[0]):
    table = boxes_in_registered_space(pd.read_parquet(snakemake.input.exams), pd.read_parquet(snakemake.input.tracking),
                                      snakemake.params.spacing)
    write_parquet(table, snakemake.output[0])
