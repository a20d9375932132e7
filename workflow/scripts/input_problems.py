"""Rule input_problems: gather every stage's problems into one table (noduleflow.problems)."""

import pandas as pd

from noduleflow.io import write_csv
from noduleflow.logs import log_to
from noduleflow.problems import sort_problems

with log_to(snakemake.log[0]):
    frames = [pd.read_csv(path, dtype=str) for path in snakemake.input]
    write_csv(sort_problems(pd.concat(frames, ignore_index=True)), snakemake.output[0])
