"""NIfTI images and their geometry, in one place.

Geometry is always expressed in ITK's LPS convention (what SimpleITK uses): `spacing` and `shape` in
(x, y, z) order, `origin` the LPS position of voxel (0, 0, 0), `direction` the 3x3 matrix whose columns are
the LPS directions of the x, y and z voxel axes (row-major when flattened). Arrays are indexed [z, y, x].
NIfTI stores RAS; the conversion happens here and nowhere else.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from isal import igzip, isal_zlib

from noduleflow.io import atomic_path
from noduleflow.limits import MAX_PIXEL_MM, MAX_POSITION_MM, MAX_SLICE_MM, MAX_VOXELS_PER_AXIS

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
GZIP_LEVEL = 1  # nibabel's default level too; isal compresses at it about 4x faster than zlib


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
    image = nib.Nifti1Image(array_zyx.transpose(*reversed(range(array_zyx.ndim))), affine)  # F-ordered: no copy
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        if os.fspath(path).endswith(".gz"):  # isal's gzip: about 4x faster than zlib at the same level
            with open(tmp, "wb") as handle, igzip.IGzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL,
                                                            fileobj=handle, mtime=0) as stream:
                image.to_stream(stream)  # no name or time in the gzip header: same image, same bytes
        else:
            nib.save(image, tmp)


QFORM_SFORM_TOLERANCE_MM = 1.0  # qform and sform may place a corner of the volume this far apart
MAX_DEFLATE_RATIO = 1032  # the most that DEFLATE can compress: a .nii.gz smaller than data / 1032 is truncated


def read_geometry(path: str | os.PathLike[str]) -> Geometry:
    """Read only the header of a NIfTI file and return its LPS geometry; raise ImageHeaderError if invalid.

    Checked: a 3D image of a real numeric type (bitpix agreeing), of plausible size, spacing and position, in mm;
    the data offset past the header; the file holding as many bytes as the header promises; a qform or an sform
    set, and the two agreeing when both are (nibabel reads the sform, ITK may read the qform); an intensity
    scaling that nibabel and ITK read alike (scl_slope 0 with an intercept: nibabel ignores both, ITK adds the
    intercept).
    """
    try:
        return _read_geometry(os.fspath(path))
    except ImageHeaderError:
        raise
    except Exception as error:  # a damaged header can make nibabel fail anywhere
        raise ImageHeaderError(f"unreadable NIfTI header ({type(error).__name__}: {str(error)[:200]})") from error


def _read_geometry(path: str) -> Geometry:
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises many types for damaged files
        raise ImageHeaderError(f"not a readable NIfTI image ({type(error).__name__}: {error})") from error
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise ImageHeaderError(f"not a NIfTI image but {type(image).__name__}")
    header = image.header
    shape = image.shape
    if len(shape) != 3:
        raise ImageHeaderError(f"expected a 3D image, got {len(shape)}D with shape {tuple(shape)}")
    if min(shape) < 2 or max(shape) > MAX_VOXELS_PER_AXIS:
        raise ImageHeaderError(f"implausible image shape {tuple(shape)} (each axis 2 to {MAX_VOXELS_PER_AXIS})")
    dtype = header.get_data_dtype()
    if dtype.kind not in "iuf" or dtype.fields is not None:
        raise ImageHeaderError(f"voxel type {dtype} is not a real number type")
    with nib.openers.ImageOpener(path) as handle:  # nibabel silently sets a zero spacing to 1
        raw = type(header).from_fileobj(handle, check=False)
    zooms = np.asarray(raw["pixdim"][1:4], dtype=float)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise ImageHeaderError(f"invalid voxel spacing {zooms.tolist()} (must be finite and positive)")
    if int(raw["bitpix"]) != dtype.itemsize * 8:
        raise ImageHeaderError(f"bitpix {int(raw['bitpix'])} contradicts the voxel type {dtype} "
                               f"({dtype.itemsize * 8} bits)")
    units = raw.get_xyzt_units()[0]
    if units not in ("mm", "unknown"):
        raise ImageHeaderError(f"spatial unit {units!r}: nibabel reads the numbers as mm, ITK converts them; "
                               f"only mm (or unset) is accepted")
    _check_scaling(raw)
    _check_forms(header, shape)
    lps = _LPS_FROM_RAS @ np.asarray(image.affine, dtype=float)[:3, :]
    columns = lps[:, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if not np.all(np.isfinite(lps)) or np.any(spacing <= 1e-6):
        raise ImageHeaderError("affine is not finite or has a zero-length axis")
    if np.any(spacing > [MAX_PIXEL_MM, MAX_PIXEL_MM, MAX_SLICE_MM]):
        raise ImageHeaderError(f"implausible voxel spacing {spacing.round(4).tolist()} mm (at most {MAX_PIXEL_MM} "
                               f"in plane and {MAX_SLICE_MM} between slices)")
    if np.any(np.abs(lps[:, 3]) > MAX_POSITION_MM):
        raise ImageHeaderError(f"implausible origin {lps[:, 3].tolist()} mm")
    direction = columns / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise ImageHeaderError("direction cosines are not orthogonal (sheared or skewed affine)")
    offset = int(raw.get_data_offset())  # the file's vox_offset (a loaded image's header reports 0)
    if not path.endswith((".hdr", ".hdr.gz", ".img", ".img.gz")):
        minimum = int(raw.sizeof_hdr) + 4  # the header and its extension flag come first in a .nii
        if offset < minimum:
            raise ImageHeaderError(f"data offset (vox_offset) {offset} lies inside the {minimum}-byte header")
    _check_data_size(path, offset + int(np.prod(shape)) * dtype.itemsize)
    return Geometry(
        shape=tuple(int(v) for v in shape),
        spacing=tuple(float(v) for v in spacing),
        origin=tuple(float(v) for v in lps[:, 3]),
        direction=tuple(float(v) for v in direction.ravel()),
    )


def _check_scaling(header: Any) -> None:
    """Reject an intensity scaling that readers interpret differently, or that is not finite."""
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if np.isinf(slope) or np.isinf(inter):
        raise ImageHeaderError(f"infinite intensity scaling (scl_slope {slope}, scl_inter {inter})")
    if (slope == 0 or np.isnan(slope)) and np.isfinite(inter) and inter != 0:
        raise ImageHeaderError(f"scl_slope {slope} with scl_inter {inter}: nibabel applies no scaling, ITK adds "
                               f"the intercept; set scl_slope to 1")


def _check_forms(header: Any, shape: Sequence[int]) -> None:
    """Reject a header with neither qform nor sform, or with both placing the volume differently."""
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if not qcode and not scode:
        raise ImageHeaderError("qform_code and sform_code are both 0: the image has no position in space")
    if qcode and scode:
        corners = np.array([[x, y, z, 1.0] for x in (0, shape[0] - 1) for y in (0, shape[1] - 1)
                            for z in (0, shape[2] - 1)]).T
        with np.errstate(invalid="ignore", over="ignore"):  # a non-finite form gives a NaN distance: refused
            distance = float(np.max(np.linalg.norm((qform - sform)[:3] @ corners, axis=0)))
        if not distance <= QFORM_SFORM_TOLERANCE_MM:
            raise ImageHeaderError(f"qform and sform disagree: a corner of the volume lies {distance:.2f} mm apart "
                                   f"(readers differ in which they use)")


def _check_data_size(path: str, expected: int) -> None:
    """Raise ImageHeaderError if the file holds fewer bytes than its header promises (a truncated file).

    For .nii.gz a file smaller than the data over DEFLATE's largest ratio is rejected at once, and the gzip
    trailer's size field answers in O(1); only when it disagrees (truncation, a multi-member gzip, data of 4 GiB
    or more) is the stream decompressed to count its bytes.
    """
    if not path.endswith(".gz"):
        actual = os.path.getsize(path)
    else:
        compressed = os.path.getsize(path)
        if compressed < 18 or expected > compressed * MAX_DEFLATE_RATIO:
            raise ImageHeaderError(f"a {compressed}-byte compressed file cannot hold the {expected} bytes its header "
                                   f"promises")
        if expected < 2**32 and _gzip_size(path) == expected:
            return
        actual = 0
        try:
            with igzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 22):
                    actual += len(chunk)
        except (EOFError, OSError, isal_zlib.error) as error:
            raise ImageHeaderError(f"compressed data is truncated or corrupt ({error})") from error
    if actual < expected:
        raise ImageHeaderError(f"image data truncated: {actual} of {expected} bytes")


def read_image(path: str | os.PathLike[str]) -> sitk.Image:
    """Read a NIfTI file as a SimpleITK image on its LPS geometry; raise ImageHeaderError if it is unusable.

    The header is checked once (`read_geometry`). A .nii.gz is decompressed once, by isal (about twice as fast as
    zlib), which checks the gzip checksum: damaged data is refused, where ITK's own reader returns it without
    complaint. Voxels keep their stored type unless the header scales them (then float32); NaN or infinite
    voxels are refused (ITK would turn NaN into 0).
    """
    geometry = read_geometry(path)
    path = os.fspath(path)
    image = nib.load(path)
    data = Path(path).read_bytes()
    if path.endswith(".gz"):
        try:
            data = igzip.decompress(data)
        except (EOFError, OSError, isal_zlib.error) as error:
            raise ImageHeaderError(f"compressed data is truncated or corrupt ({error})") from error
    proxy = image.dataobj
    if proxy.slope == 1 and proxy.inter == 0:  # the stored voxels as they are, without a copy
        array = np.frombuffer(data, image.get_data_dtype(), int(np.prod(proxy.shape)), proxy.offset)
        array = array.reshape(proxy.shape, order="F")
    else:
        array = np.asanyarray(type(image).from_bytes(data).dataobj)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ImageHeaderError(f"image contains {int((~np.isfinite(array)).sum())} NaN or infinite voxels")
    if array.dtype == np.float64 and image.get_data_dtype() != np.float64:  # scaled integers: float32 holds them
        array = array.astype(np.float32)
    result = sitk.GetImageFromArray(array.astype(array.dtype.newbyteorder("="), copy=False).T)
    result.SetSpacing(geometry.spacing)
    result.SetOrigin(geometry.origin)
    result.SetDirection(geometry.direction)
    return result


def _gzip_size(path: str) -> int:
    """The size modulo 2**32 of the last member's uncompressed data, from a gzip file's trailer."""
    with open(path, "rb") as handle:
        handle.seek(-4, os.SEEK_END)
        return struct.unpack("<I", handle.read(4))[0]
