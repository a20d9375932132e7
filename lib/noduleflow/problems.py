"""Input problems: every row the pipeline rejects or repairs is recorded with its reason, never dropped silently."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import pandas as pd

PROBLEM_COLUMNS = ["stage", "severity", "pid", "exam_id", "nodule_group", "exam_idx", "item", "reason"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """One bad input: which stage found it, what it concerns and why.

    severity: 'dropped' (the item is left out), 'repaired' (kept after a correction) or 'warning' (kept as is).
    """

    stage: str
    reason: str
    severity: str = "dropped"
    pid: str | None = None
    exam_id: str | None = None
    nodule_group: int | None = None
    exam_idx: int | None = None
    item: str | None = None


class ProblemLog:
    """Collects the problems found by one stage and logs each one as it is found."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.problems: list[Problem] = []

    def add(self, reason: str, *, severity: str = "dropped", **fields: object) -> None:
        """Record a problem (fields: pid, exam_id, nodule_group, exam_idx, item)."""
        problem = Problem(stage=self.stage, reason=reason, severity=severity, **fields)  # type: ignore[arg-type]
        self.problems.append(problem)
        where = ", ".join(f"{key}={value}" for key, value in fields.items() if value is not None)
        log.warning("%s: %s (%s) [%s]", self.stage, reason, where, severity)

    def frame(self) -> pd.DataFrame:
        """The problems as a table with the standard columns, in a deterministic order."""
        frame = pd.DataFrame([asdict(p) for p in self.problems], columns=PROBLEM_COLUMNS)
        return sort_problems(frame)


def sort_problems(frame: pd.DataFrame) -> pd.DataFrame:
    """Problems ordered by stage and the ids they concern, typed consistently."""
    frame = frame.reindex(columns=PROBLEM_COLUMNS)
    for column in ("nodule_group", "exam_idx"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    for column in ("stage", "severity", "pid", "exam_id", "item", "reason"):
        frame[column] = frame[column].astype("string")
    return frame.sort_values(PROBLEM_COLUMNS, na_position="first", kind="stable").reset_index(drop=True)
