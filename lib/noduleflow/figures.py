"""Pictures for visual quality control and the report."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from noduleflow.hu import to_hu  # noqa: E402
from noduleflow.io import atomic_path  # noqa: E402

LUNG_WINDOW = (-1350.0, 150.0)  # HU shown from black to white


def registration_figure(panels: Sequence[tuple[str, np.ndarray]], box: Sequence[int] | None, title: str,
                        path: str | os.PathLike[str]) -> None:
    """Axial slices side by side (e.g. fixed, moving before, moving after), with a nodule box drawn on each.

    `box` is (i_min, i_max, j_min, j_max) in the slices' row/column indices.
    """
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False)
    for axis, (name, image) in zip(axes[0], panels, strict=True):
        axis.imshow(image, cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1], interpolation="nearest")
        if box is not None:
            i0, i1, j0, j1 = box
            axis.add_patch(Rectangle((j0 - 0.5, i0 - 0.5), j1 - j0 + 1, i1 - i0 + 1, fill=False, color="tab:red"))
        axis.set_title(name)
        axis.set_axis_off()
    figure.suptitle(title)
    _save(figure, path)


def _save(figure: plt.Figure, path: str | os.PathLike[str]) -> None:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=80, format="png")
    plt.close(figure)


def _central(image: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """The axial slice (Y, X) through the box centre of a (Z, Y, X) image."""
    return image[min((box[4] + box[5]) // 2, image.shape[0] - 1)]


def forecast_montage(examples: Sequence[dict], hu_window: tuple[float, float], title: str,
                     path: str | os.PathLike[str]) -> None:
    """One row per pair: prior, real follow-up and generated follow-up (central slices, union box in red)."""
    columns = ("prior", "real", "generated")
    rows = max(len(examples), 1)
    figure, axes = plt.subplots(rows, 3, figsize=(7.5, 2.6 * rows), squeeze=False)
    for row, example in zip(axes, examples, strict=False):
        i0, i1, j0, j1 = example["box"][:4]
        for axis, name in zip(row, columns, strict=True):
            hu = to_hu(_central(example[name], example["box"]), hu_window)
            axis.imshow(hu, cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1], interpolation="nearest")
            axis.add_patch(Rectangle((j0 - 0.5, i0 - 0.5), j1 - j0 + 1, i1 - i0 + 1, fill=False, color="tab:red"))
            axis.set_title(f"{name}\n{example['title']}" if name == "prior" else name, fontsize=8)
            axis.set_axis_off()
    for axis in axes.ravel()[len(examples) * 3:]:
        axis.set_axis_off()
    figure.suptitle(title)
    _save(figure, path)


def forecast_card(prior_hu: np.ndarray, median_hu: np.ndarray, spread_hu: np.ndarray, box: Sequence[int],
                  title: str, path: str | os.PathLike[str]) -> None:
    """A forecast of one nodule: the prior, the median forecast and the spread of the samples (HU, 10-90 %
    range), central axial slices of (Z, Y, X) patches, with the prior's box in red."""
    figure, axes = plt.subplots(1, 3, figsize=(8.4, 3.3))
    i0, i1, j0, j1 = box[:4]
    panels = (("prior", prior_hu, "gray", LUNG_WINDOW), ("median forecast", median_hu, "gray", LUNG_WINDOW),
              ("spread (HU, 10-90 %)", spread_hu, "magma", (0.0, max(float(spread_hu.max()), 1.0))))
    for axis, (name, image, colours, (low, high)) in zip(axes, panels, strict=True):
        shown = axis.imshow(_central(image, box), cmap=colours, vmin=low, vmax=high, interpolation="nearest")
        axis.add_patch(Rectangle((j0 - 0.5, i0 - 0.5), j1 - j0 + 1, i1 - i0 + 1, fill=False, color="tab:red"))
        axis.set_title(name, fontsize=9)
        axis.set_axis_off()
    figure.colorbar(shown, ax=axes[2], fraction=0.046)
    figure.suptitle(title, fontsize=9)
    _save(figure, path)


def change_scatter(pairs, unit: str, title: str, path: str | os.PathLike[str]) -> None:
    """Predicted against real size change per method: the forecast minus the prior measured the same way
    (`prior_forecast_size`), the follow-up minus the prior in their own boxes; the diagonal is a perfect forecast."""
    figure, axis = plt.subplots(figsize=(5.5, 5))
    for method, frame in pairs.groupby("method", sort=False):
        axis.scatter(frame["real_size"] - frame["prior_size"], frame["predicted_size"] - frame["prior_forecast_size"],
                     s=14, alpha=0.7, label=method)
    change = (pairs["real_size"] - pairs["prior_size"]).to_numpy()
    span = [float(np.nanmin(change, initial=0.0)), float(np.nanmax(change, initial=1.0))]
    axis.plot(span, span, color="black", lw=0.8)
    axis.set_xlabel(f"real change ({unit})")
    axis.set_ylabel(f"predicted change ({unit})")
    axis.set_title(title)
    axis.legend(fontsize=8)
    _save(figure, path)


def error_by_interval(pairs, unit: str, title: str, path: str | os.PathLike[str]) -> None:
    """Absolute size error against the interval between the exams, per method."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for method, frame in pairs.groupby("method", sort=False):
        axis.scatter(frame["delta_days"], (frame["predicted_size"] - frame["real_size"]).abs(), s=14, alpha=0.7,
                     label=method)
    axis.set_xlabel("interval (days)")
    axis.set_ylabel(f"absolute error ({unit})")
    axis.set_title(title)
    axis.legend(fontsize=8)
    _save(figure, path)


def reconstruction_examples(originals: np.ndarray, reconstructions: np.ndarray, hu_window: tuple[float, float],
                            path: str | os.PathLike[str]) -> None:
    """Central axial slices of patches (N, Z, Y, X) in [-1, 1] and their VAE reconstructions, side by side."""
    count = max(len(originals), 1)
    figure, axes = plt.subplots(2, count, figsize=(2.4 * count, 5), squeeze=False)
    for column, (original, reconstruction) in enumerate(zip(originals, reconstructions, strict=True)):
        for row, (name, image) in enumerate((("patch", original), ("VAE", reconstruction))):
            hu = to_hu(image[image.shape[0] // 2], hu_window)
            axes[row, column].imshow(hu, cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1])
            axes[row, column].set_title(name, fontsize=8)
            axes[row, column].set_axis_off()
    _save(figure, path)


def measured_vs_true(measured: np.ndarray, true: np.ndarray, title: str, path: str | os.PathLike[str]) -> None:
    """Segmented against true nodule volume (log axes), with the identity line."""
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.scatter(true, measured, s=12, alpha=0.7)
    span = [max(float(np.min(true, initial=1.0)), 1.0), float(np.max(true, initial=10.0))]
    axis.plot(span, span, color="black", lw=0.8)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("true volume (mm^3)")
    axis.set_ylabel("segmented volume (mm^3)")
    axis.set_title(title)
    _save(figure, path)
