"""Pictures for visual quality control and the report."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

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
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=80)
    plt.close(figure)
