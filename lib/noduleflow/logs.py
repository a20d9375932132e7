"""Logging for pipeline steps: each Snakemake job writes its messages and any traceback to its log file."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def log_to(path: str | os.PathLike[str], level: int = logging.INFO) -> Iterator[logging.Logger]:
    """Send log records to `path` (and stderr) for the duration of the block; log an escaping exception."""
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
