"""Logging for pipeline steps: each Snakemake job writes its messages and any traceback to its log file."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

# Where a SLURM job runs and which GPUs it was given, as SLURM sets them in the job's environment.
_PLACEMENT = ("SLURM_JOB_ID", "SLURM_JOB_PARTITION", "SLURMD_NODENAME", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS",
              "CUDA_VISIBLE_DEVICES")


def slurm_placement(environ: Mapping[str, str]) -> str:
    """`SLURM_JOB_ID=... SLURM_JOB_GPUS=...` of the placement variables that are set; empty outside SLURM jobs."""
    if "SLURM_JOB_ID" not in environ:
        return ""
    return " ".join(f"{name}={environ[name]}" for name in _PLACEMENT if name in environ)


@contextlib.contextmanager
def log_to(path: str | os.PathLike[str], level: int = logging.INFO) -> Iterator[logging.Logger]:
    """Send log records to `path` (and stderr) for the duration of the block; log an escaping exception.

    In a SLURM job the first line names the job, its node and its GPUs (see slurm_placement).
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(path, mode="w"), logging.StreamHandler(sys.stderr)]
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    previous_level = root.level
    root.setLevel(level)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    logger = logging.getLogger("noduleflow")
    placement = slurm_placement(os.environ)
    if placement:
        logger.info("SLURM job: %s", placement)
    try:
        yield logger
    except BaseException:
        logger.exception("step failed")
        raise
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(previous_level)
