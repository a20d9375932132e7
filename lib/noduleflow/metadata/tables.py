"""Patient-level splits and the per-split exam tables: exams, timelines and consecutive exam pairs (seed step 4).

Splits are by patient: a split given in the manifest wins, otherwise a stable hash of (seed, pid) picks the
split, so the assignment depends neither on row order nor on the other patients. One series is kept per
(patient, timepoint): the thinnest slices, then the most slices, then the smallest exam id. Only exams that
carry tracked nodules are kept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd

from noduleflow.ids import shard_of, stable_fraction
from noduleflow.problems import ProblemLog

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
EXAM_COLUMNS = [
    "pid", "exam_id", "screen_timepoint", "days_since_baseline", "series_uid", "slice_thickness",
    "pixel_spacing", "num_slices", "image_path", "shape", "spacing", "origin", "direction",
    "split", "shard", "n_nodules",
]
TIMELINE_LISTS = ["exam_id", "screen_timepoint", "days_since_baseline", "series_uid", "slice_thickness", "image_path"]
PAIR_FIELDS = ["exam_id", "screen_timepoint", "days_since_baseline", "series_uid", "slice_thickness", "image_path",
               "n_nodules"]


@dataclass(frozen=True)
class SeriesFilter:
    """Which series may represent an exam (config key `series_filter`)."""

    max_slice_thickness: float
    min_slices: int

    def rejects(self, series: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
        """Masks of the series that are too thick and of those with too few slices (`num_slices`)."""
        return (series["slice_thickness"] > self.max_slice_thickness,
                series["num_slices"] < self.min_slices)


def choose_series(candidates: pd.DataFrame) -> pd.DataFrame:
    """One series per (pid, screen_timepoint): the thinnest slices, then the most slices, then the smallest exam id."""
    ordered = candidates.assign(_minus_slices=-candidates["num_slices"]).sort_values(
        ["pid", "screen_timepoint", "slice_thickness", "_minus_slices", "exam_id"], kind="stable")
    return ordered.drop_duplicates(["pid", "screen_timepoint"], keep="first").drop(columns="_minus_slices")


def computed_split(pid: str, seed: int, fractions: Mapping[str, float]) -> str:
    """The split of a patient from a stable hash of (seed, pid) and the split fractions."""
    total = sum(fractions[name] for name in SPLITS)
    u = stable_fraction("split", seed, pid) * total
    edge = 0.0
    for name in SPLITS:
        edge += fractions[name]
        if u < edge:
            return name
    return SPLITS[-1]


def assign_splits(series: pd.DataFrame, seed: int, fractions: Mapping[str, float],
                  problems: ProblemLog) -> dict[str, str]:
    """pid -> split; a provided split wins, patients with conflicting provided splits take the first in order."""
    splits = {}
    for pid, group in series.groupby("pid", sort=True):
        provided = sorted(set(group["split"].dropna()), key=SPLITS.index)
        if len(provided) > 1:
            problems.add(f"patient has rows in splits {provided}; all its exams go to {provided[0]!r}",
                         severity="repaired", pid=pid)
        splits[pid] = provided[0] if provided else computed_split(pid, seed, fractions)
    return splits


def select_exams(series: pd.DataFrame, nodules: pd.DataFrame, series_filter: SeriesFilter,
                 problems: ProblemLog) -> pd.DataFrame:
    """One series per (pid, timepoint) among those passing the filter, restricted to exams with nodules."""
    too_thick, too_few = series_filter.rejects(series)
    log.info("series filter: %d series, %d thicker than %.2f mm, %d with fewer than %d slices",
             len(series), int(too_thick.sum()), series_filter.max_slice_thickness, int(too_few.sum()),
             series_filter.min_slices)
    reasons = {}
    for row in series[too_thick].itertuples(index=False):
        reasons[row.exam_id] = f"series filtered out: slice thickness {row.slice_thickness} mm > " \
                               f"{series_filter.max_slice_thickness} mm"
    for row in series[too_few & ~too_thick].itertuples(index=False):
        reasons[row.exam_id] = f"series filtered out: {row.num_slices} slices < {series_filter.min_slices}"
    candidates = series[~(too_thick | too_few)]
    chosen = choose_series(candidates)
    for row in candidates[~candidates.index.isin(chosen.index)].itertuples(index=False):
        reasons[row.exam_id] = "another series of the same timepoint was selected (thinner slices)"

    counts = nodules.groupby("exam").size()
    annotated = set(counts.index)
    for exam_id in sorted(annotated & set(reasons)):
        rows = nodules[nodules["exam"] == exam_id]
        problems.add(f"{len(rows)} nodule annotation(s) dropped: {reasons[exam_id]}",
                     pid=rows["pid"].iloc[0], exam_id=exam_id)
    chosen = chosen[chosen["exam_id"].isin(annotated)].copy()
    chosen["n_nodules"] = chosen["exam_id"].map(counts).astype("int64")
    return chosen


def consecutive_pairs(frame: pd.DataFrame, keys: list[str], fields: list[str]) -> pd.DataFrame:
    """Each row with the next row of the same `keys` group (`frame` sorted by keys, then time).

    `keys` appear once; `fields` twice, as `<field>_a` (earlier) and `<field>_b` (later); `delta_days` is the
    difference of `days_since_baseline` (which `fields` must include).
    """
    later = frame.groupby(keys, sort=False)[fields].shift(-1)
    has_next = later[fields[0]].notna()
    pairs = pd.concat([frame[keys], frame[fields].add_suffix("_a"), later.add_suffix("_b")], axis=1)[has_next]
    for field in fields:
        pairs[f"{field}_b"] = pairs[f"{field}_b"].astype(frame[field].dtype)
    pairs["delta_days"] = pairs["days_since_baseline_b"] - pairs["days_since_baseline_a"]
    return pairs.reset_index(drop=True)


def nodule_pairs(nodules: pd.DataFrame) -> pd.DataFrame:
    """Consecutive exams of the same physical nodule (pid + nodule_group) among those inside registered space."""
    inside = ~nodules["box_outside"].astype(bool)  # boolean also when empty (an empty object mask selects columns)
    usable = nodules[inside].sort_values(["pid", "nodule_group", "exam_idx"], kind="stable")
    fields = [c for c in usable.columns if c not in ("pid", "nodule_group")]
    pairs = consecutive_pairs(usable.reset_index(drop=True), ["pid", "nodule_group"], fields)
    log.info("nodule pairs: %d from %d nodules", len(pairs), usable.groupby(["pid", "nodule_group"]).ngroups)
    return pairs


def split_tables(*, series: pd.DataFrame, nodules: pd.DataFrame, split: str, seed: int,
                 fractions: Mapping[str, float], n_shards: int,
                 series_filter: SeriesFilter) -> tuple[dict[str, pd.DataFrame], ProblemLog]:
    """exams, timelines and paired_exams tables of one split, and the problems found on the way."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    problems = ProblemLog(f"tables_{split}")
    pid_split = assign_splits(series, seed, fractions, problems)
    in_split = series["pid"].map(pid_split) == split
    exams = select_exams(series[in_split], nodules[nodules["pid"].map(pid_split) == split], series_filter,
                         problems)
    exams["split"] = split
    exams["shard"] = [shard_of(pid, n_shards) for pid in exams["pid"]]
    exams["shard"] = exams["shard"].astype("int64")
    exams = exams[EXAM_COLUMNS].sort_values(["pid", "screen_timepoint"], kind="stable").reset_index(drop=True)

    groups = exams.groupby("pid", sort=True)
    timelines = groups[TIMELINE_LISTS].agg(list).reset_index()
    timelines.insert(1, "n_exams", groups.size().to_numpy().astype("int64"))
    timelines.insert(2, "fixed_exam_id", [ids[0] for ids in timelines["exam_id"]])
    timelines.insert(3, "shard", groups["shard"].first().to_numpy())

    timelines["fixed_exam_id"] = timelines["fixed_exam_id"].astype(str)  # text also when the split is empty
    # Dates increase with the timepoint (noduleflow.metadata.manifest rejects patients where they do not):
    # delta_days > 0.
    pairs = consecutive_pairs(exams, ["pid", "shard"], PAIR_FIELDS)

    log.info("%s: %d patients, %d exams, %d exam pairs, %d shards", split, len(timelines), len(exams), len(pairs),
             n_shards)
    return {"exams": exams, "timelines": timelines, "paired_exams": pairs}, problems
