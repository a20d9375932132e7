"""NIfTI images and their geometry, in one place.

Geometry is always expressed in ITK's LPS convention (what SimpleITK uses): `spacing` and `shape` in
(x, y, z) order, `origin` the LPS position of voxel (0, 0, 0), `direction` the 3x3 matrix whose columns are
the LPS directions of the x, y and z voxel axes (row-major when flattened). Arrays are indexed [z, y, x].
NIfTI stores RAS; the conversion happens here and nowhere else.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from noduleflow.io import atomic_path

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a 3D image (LPS, x/y/z order)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major 3x3

    def matrix(self) -> np.ndarray:
        """4x4 matrix mapping voxel indices (x, y, z, 1) to LPS millimetres."""
        out = np.eye(4)
        out[:3, :3] = np.asarray(self.direction).reshape(3, 3) @ np.diag(self.spacing)
        out[:3, 3] = self.origin
        return out

    @classmethod
    def from_columns(cls, row: Mapping[str, Any], prefix: str) -> Geometry:
        """The geometry stored in a table row as <prefix>_shape, _spacing, _origin and _direction."""
        return cls(*(tuple(row[f"{prefix}_{name}"]) for name in ("shape", "spacing", "origin", "direction")))

    def reference_image(self) -> sitk.Image:
        """An empty SimpleITK image on this grid (a resampling target that needs no pixel data)."""
        image = sitk.Image([int(v) for v in self.shape], sitk.sitkUInt8)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def geometry_columns(prefix: str, geometry: Geometry | None) -> dict[str, Any]:
    """A geometry as the table columns <prefix>_shape, _spacing, _origin and _direction (None: all null)."""
    fields = ("shape", "spacing", "origin", "direction")
    return {f"{prefix}_{name}": None if geometry is None else list(getattr(geometry, name)) for name in fields}


def homogeneous(matrix_3x4: Sequence[float]) -> np.ndarray:
    """4x4 matrix from the 12 row-major values [A | b] of an affine map stored in a table."""
    return np.vstack([np.reshape(matrix_3x4, (3, 4)), [0.0, 0.0, 0.0, 1.0]])


class ImageHeaderError(ValueError):
    """A NIfTI file whose header cannot describe a valid 3D CT volume."""


def write_nifti(array_zyx: np.ndarray, geometry: Geometry, path: str | os.PathLike[str]) -> None:
    """Write an array indexed [z, y, x] (or [n, z, y, x]: a 4D series of volumes) on `geometry` as NIfTI
    (atomically), keeping the array's dtype."""
    if array_zyx.ndim not in (3, 4) or array_zyx.shape[-3:] != tuple(reversed(geometry.shape)):
        raise ValueError(f"array shape {array_zyx.shape} does not match geometry shape {geometry.shape} (x, y, z)")
    affine = np.eye(4)
    affine[:3, :] = _LPS_FROM_RAS @ geometry.matrix()[:3, :]
    image = nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(*reversed(range(array_zyx.ndim)))), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        nib.save(image, tmp)


def read_geometry(path: str | os.PathLike[str]) -> Geometry:
    """Read only the header of a NIfTI file and return its LPS geometry; raise ImageHeaderError if invalid."""
    try:
        image = nib.load(os.fspath(path))
    except Exception as error:  # nibabel raises many types for damaged files
        raise ImageHeaderError(f"not a readable NIfTI image ({type(error).__name__}: {error})") from error
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise ImageHeaderError(f"not a NIfTI image but {type(image).__name__}")
    shape = image.shape
    if len(shape) != 3:
        raise ImageHeaderError(f"expected a 3D image, got {len(shape)}D with shape {tuple(shape)}")
    if min(shape) < 2:
        raise ImageHeaderError(f"degenerate image shape {tuple(shape)}")
    with nib.openers.ImageOpener(os.fspath(path)) as handle:  # nibabel silently sets a zero spacing to 1
        zooms = np.asarray(type(image.header).from_fileobj(handle, check=False)["pixdim"][1:4], dtype=float)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise ImageHeaderError(f"invalid voxel spacing {zooms.tolist()} (must be finite and positive)")
    lps = _LPS_FROM_RAS @ np.asarray(image.affine, dtype=float)[:3, :]
    columns = lps[:, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if not np.all(np.isfinite(lps)) or np.any(spacing <= 1e-6):
        raise ImageHeaderError("affine is not finite or has a zero-length axis")
    direction = columns / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise ImageHeaderError("direction cosines are not orthogonal (sheared or skewed affine)")
    _check_data_size(os.fspath(path), int(image.header.get_data_offset()) + int(np.prod(shape)) *
                     image.header.get_data_dtype().itemsize)
    return Geometry(
        shape=tuple(int(v) for v in shape),
        spacing=tuple(float(v) for v in spacing),
        origin=tuple(float(v) for v in lps[:, 3]),
        direction=tuple(float(v) for v in direction.ravel()),
    )


def _check_data_size(path: str, expected: int) -> None:
    """Raise ImageHeaderError if the file holds fewer bytes than its header promises (a truncated file).

    For .nii.gz the gzip trailer's size field answers in O(1); only when it disagrees (truncation, or a
    multi-member gzip) is the stream decompressed to count its bytes.
    """
    if not path.endswith(".gz"):
        actual = os.path.getsize(path)
    else:
        with open(path, "rb") as handle:
            handle.seek(-4, os.SEEK_END)
            if int.from_bytes(handle.read(4), "little") == expected % 2**32:
                return
        actual = 0
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 22):
                    actual += len(chunk)
        except (EOFError, OSError, zlib.error) as error:
            raise ImageHeaderError(f"compressed data is truncated or corrupt ({error})") from error
    if actual < expected:
        raise ImageHeaderError(f"image data truncated: {actual} of {expected} bytes")


def read_image(path: str | os.PathLike[str]) -> sitk.Image:
    """Read a NIfTI file as a SimpleITK image on its LPS geometry; raise ImageHeaderError if it is unusable.

    Integer images (all CT exports) are read by ITK, which decompresses about 3x faster than nibabel; floating
    point images are read by nibabel, because ITK's reader silently turns NaN into 0, and non-finite voxels
    are reported.
    """
    geometry = read_geometry(path)
    header = nib.load(os.fspath(path))
    if header.get_data_dtype().kind == "f":
        array = np.asanyarray(header.dataobj)
        if not np.isfinite(array).all():
            raise ImageHeaderError(f"image contains {int((~np.isfinite(array)).sum())} NaN or infinite voxels")
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    else:
        image = sitk.ReadImage(os.fspath(path))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image
