"""HU <-> the models' unit range: every cache holds HU clipped to a window (`patch.hu_window`) and scaled to
[-1, 1]; measurements and pictures turn them back into HU. Written once, here."""

from __future__ import annotations

import numpy as np


def to_unit_range(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """HU clipped to the window and scaled linearly to [-1, 1]."""
    low, high = window
    return (np.clip(hu, low, high) - low) / (high - low) * 2.0 - 1.0


def to_hu(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Inverse of to_unit_range (inside the window)."""
    low, high = window
    return (np.asarray(values, dtype=np.float64) + 1.0) / 2.0 * (high - low) + low
