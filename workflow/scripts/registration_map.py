"""Rule registration_map: list precomputed transforms (noduleflow.registration.rigid)."""

from noduleflow.io import write_pickle
from noduleflow.logs import log_to
from noduleflow.plan import find_precomputed_transforms

with log_to(snakemake.log[0]):
    directory = snakemake.input.transforms if snakemake.input.get("transforms") else None
    write_pickle(find_precomputed_transforms(directory), snakemake.output.mapping)
