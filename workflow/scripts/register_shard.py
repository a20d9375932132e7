"""Rule register_shard: register the exams of one shard to their baselines (noduleflow.registration.rigid)."""

from noduleflow.io import write_parquet
from noduleflow.logs import log_to
from noduleflow.plan import ShardExam
from noduleflow.registration.rigid import RegistrationSettings, register_shard
from noduleflow.settings import from_config

with log_to(snakemake.log[0]):
    settings = from_config(RegistrationSettings, snakemake.params.method, seed=snakemake.params.seed,
                           threads=snakemake.threads)
    table = register_shard([ShardExam(**exam) for exam in snakemake.params.exams], settings,
                           snakemake.params.transform_dir)
    write_parquet(table, snakemake.output[0])
