"""Plausible ranges of the numbers read from input files, and the checks every reader shares.

A value outside its range is an error in the input, not a fact about a patient: a screening timepoint of 10^9, a
slice spacing of a kilometre or a nodule volume of -3 mm^3 is reported with its field name and dropped. The
limits are generous (they only exclude impossible values); they are not filters of usable data.
"""

from __future__ import annotations

import math
from typing import Any

MAX_TIMEPOINT = 100  # screening rounds per patient
MAX_ABS_DAYS = 36_525.0  # days from a per-patient reference date: within a century
MAX_SLICE_MM = 20.0  # slice thickness or spacing of a CT series
MAX_PIXEL_MM = 10.0  # in-plane pixel spacing
MAX_POSITION_MM = 100_000.0  # |coordinate| of an image position or origin (100 m)
MAX_VOXELS_PER_AXIS = 4096  # image size along one axis
MAX_INDEX = 1_000_000  # voxel index in a nodule box or a nodule group / exam index
MAX_VOLUME_MM3 = 1.0e6  # a nodule (a litre)


def number(value: Any, name: str, low: float, high: float, *, low_open: bool = False) -> float:
    """`value` as a finite float in [low, high] (or (low, high] with low_open); ValueError naming `name` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} {value!r} is not a number")
    try:
        result = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} {str(value)[:60]!r} is not a number") from None
    if not math.isfinite(result):
        raise ValueError(f"{name} {result} is not finite")
    if result < low or result > high or (low_open and result == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} {result:g} is outside the plausible range {interval}")
    return result


def integer(value: Any, name: str, low: int, high: int) -> int:
    """`value` as an int in [low, high]; a float must be integral (3.0 is 3, 3.5 is an error)."""
    result = number(value, name, low, high)
    if result != int(result):
        raise ValueError(f"{name} {result:g} is not an integer")
    return int(result)
