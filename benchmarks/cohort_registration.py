"""Registration error on a whole synthetic cohort, as the workflow registered it, against the generator's truth.

For every follow-up series the workflow registered to its patient's baseline
(`results/registration/{split}/exams_registered.parquet`), each nodule seen in both exams is mapped from the
baseline through the estimated `fixed_to_moving` transform and compared with its true centre in the follow-up
(`results/synthetic/truth/nodules.parquet`, exact under the non-rigid change too: a nodule moves with its centre).
Reported: the target registration error (TRE) at the nodule centres of the exams that passed QC, the exams
that passed QC with a TRE over 2 mm (registration issue's goal: none) and the good exams (TRE <= 2 mm) that QC
flagged (goal: <= 5 %), with the flagged exams' reasons.

    .venv/bin/python benchmarks/cohort_registration.py --workdir RUN_FOLDER [--bad-mm 2.0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from noduleflow.imaging import homogeneous


def nodule_errors(registered: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """One row per nodule seen in a follow-up and its baseline: the TRE (mm) of the exam's registration there."""
    follow_ups = registered[~registered["is_fixed"].astype(bool) & registered["fixed_to_moving"].notna()]
    centres = truth.set_index(["exam_id", "nodule_group"])["center_exam"]
    rows = []
    for exam in follow_ups.itertuples():
        matrix = homogeneous(exam.fixed_to_moving)
        moving = truth[truth["exam_id"] == exam.exam_id]
        for nodule in moving.itertuples():
            key = (exam.fixed_exam_id, nodule.nodule_group)
            if key not in centres.index:  # the nodule appeared after the baseline
                continue
            mapped = matrix @ np.append(np.asarray(centres.loc[key], dtype=float), 1.0)
            rows.append({"pid": exam.pid, "exam_id": exam.exam_id, "nodule_group": nodule.nodule_group,
                         "qc_pass": bool(exam.qc_pass), "qc_reason": exam.qc_reason,
                         "tre_mm": float(np.linalg.norm(mapped[:3] - np.asarray(nodule.center_exam, dtype=float)))})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="a finished run's folder (holds results/)")
    parser.add_argument("--bad-mm", type=float, default=2.0, help="a registration worse than this is bad (2 mm)")
    args = parser.parse_args()
    results = args.workdir / "results"
    tables = sorted(results.glob("registration/*/exams_registered.parquet"))
    registered = pd.concat([pd.read_parquet(p) for p in tables], ignore_index=True)
    truth = pd.read_parquet(results / "synthetic" / "truth" / "nodules.parquet")
    errors = nodule_errors(registered, truth)
    if errors.empty:
        raise SystemExit(f"{args.workdir}: no follow-up with a nodule seen in its baseline")
    exams = errors.groupby("exam_id").agg(qc_pass=("qc_pass", "first"), qc_reason=("qc_reason", "first"),
                                          tre_mm=("tre_mm", "max"))
    passed = errors[errors["qc_pass"]]
    good = exams["tre_mm"] <= args.bad_mm
    print(f"{len(exams)} registered follow-ups with nodules seen in their baseline ({len(errors)} nodules), "
          f"{int(exams['qc_pass'].sum())} passed QC")
    print(f"TRE at the nodule centres of the exams that passed QC (mm): median {passed['tre_mm'].median():.2f}, "
          f"mean {passed['tre_mm'].mean():.2f}, 95th percentile {passed['tre_mm'].quantile(0.95):.2f}, "
          f"max {passed['tre_mm'].max():.2f}")
    print(f"passed QC with a TRE over {args.bad_mm:g} mm: {int((exams['qc_pass'] & ~good).sum())} exams (goal 0)")
    print(f"good exams (TRE <= {args.bad_mm:g} mm) flagged by QC: {int((~exams['qc_pass'] & good).sum())} of "
          f"{int(good.sum())} (goal <= 5 %)")
    flagged = exams[~exams["qc_pass"]]
    for exam_id, row in flagged.iterrows():
        print(f"  flagged {exam_id}: TRE {row['tre_mm']:.1f} mm, {row['qc_reason']}")


if __name__ == "__main__":
    main()
