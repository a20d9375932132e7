"""Fast synthetic adult chest CT phantom: anatomy only (no nodules, no noise), values in HU.

Physical coordinates are millimetres in LPS (+x patient left, +y posterior, +z superior) and the chest is
centred at (0, 0, 0). Arrays are indexed [z, y, x]; voxel [k, j, i] lies at origin + (i*sx, j*sy, k*sz)
(identity direction). Smooth organs are approximate signed-distance functions (negative inside) that are
separable in x and y, evaluated slice by slice; tubes (pulmonary vessels, airways, great vessels, ribs) are
capsules rasterised only inside their own bounding boxes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

_AIR, _FAT, _MEDIASTINAL_FAT, _MUSCLE = -1000.0, -100.0, -90.0, 40.0
_FISSURE_HU, _FISSURE_MM = -400.0, 0.3  # fissure density and half thickness
_PLEURA_MM = 2.5  # gap kept between the lungs and the mediastinal organs
_SAFE_MM = 3.0  # lung_depth_mm: extra clearance from the mediastinum and from large vessels / airways
_VESSEL, _AIRWAY, _GREAT, _RIB = 0, 1, 2, 3  # tube kinds
_RIGHT, _LEFT = 0, 1

_Vec = tuple[float, ...]
_SdFunc = Callable[[np.ndarray, np.ndarray, "np.ndarray | float"], np.ndarray]


@dataclass(frozen=True, eq=False)
class ChestAnatomy:
    """All parameters of one synthetic patient's chest (mm, LPS, HU). Lung tuples are (right, left)."""

    body_axes: _Vec  # body outline semi-axes at z = 0: x, y anterior, y posterior (centre (0, 0))
    body_wobble: _Vec  # relative semi-axis modulation along z: amplitude, wavelength, phase
    body_shift: _Vec  # lateral shift of the body along z: amplitude, wavelength, phase
    fat_mm: float  # subcutaneous fat thickness (70 % of it on the back)
    wall_mm: _Vec  # chest wall from fat to pleural cavity: lateral, anterior, posterior
    lung_caps: tuple[_Vec, _Vec]  # apex ellipsoid per lung: x, y, z of its equator, semi-axes x, y, z
    domes: tuple[_Vec, _Vec]  # hemidiaphragm z = z_top - kx (x - xd)^2 - ky (y - yd)^2: xd, yd, z_top, kx, ky
    mediastinum: _Vec  # x_mid, junction half-width, z_low, z_high, then below z_low and above z_high an oval:
    # y centre, right and left half-widths, AP semi-axis (interpolated in between)
    lung_hu: _Vec  # parenchyma mean HU, anterior-posterior gradient amplitude, its y centre and half-extent
    texture: np.ndarray  # (K, 5) low-frequency waves: kx, ky, kz (rad/mm), amplitude (HU), phase
    heart: _Vec  # x, y, z, semi-axes a, b, c, rotation about z (rad)
    aorta: _Vec  # ascending x, y, descending x, y, radius, ascending bottom z, arch base z
    svc: _Vec  # superior vena cava x, y, radius, bottom z
    trachea: _Vec  # x, y, outer radius, wall thickness, carina z
    esophagus: _Vec  # x, y, radius
    spine: _Vec  # vertebral body centre x, y, body radius, canal radius, spinous length, period, z phase
    sternum: _Vec  # half-width, half-thickness, lower end z
    scapula: _Vec  # medial and lateral border |x|, distance outside the pleural cavity, thickness, lower tip z
    stomach: _Vec  # x, y, z, semi-axes a, b, c
    liver_x: float  # below the diaphragm the liver fills x < liver_x
    table: _Vec  # top y at x = 0, thickness, upward curvature (1/mm)
    tube_p0: np.ndarray  # (N, 3) tube start points
    tube_p1: np.ndarray  # (N, 3) tube end points
    tube_radius: np.ndarray  # (N, 2) radius at start and end
    tube_hu: np.ndarray  # (N, 2) HU of the tube and of its core
    tube_core: np.ndarray  # (N,) core radius as a fraction of the radius (0: solid tube)
    tube_kind: np.ndarray  # (N,) 0 pulmonary vessel, 1 airway, 2 great vessel, 3 rib / cartilage
    # (F, 7) interlobar fissures, surfaces z = z0 + gy y + gx x + c (x - xc)^2 inside one lung: side, z0, gy, gx, c,
    # xc, and the row of a fissure above which this one lies (-1: none)
    fissures: np.ndarray = field(default_factory=lambda: np.zeros((0, 7)))


class _Organ(NamedTuple):
    """A smooth structure: bounding box of its inside, signed distance, paint layers, kept out of the lungs?"""

    box: _Vec  # x0, x1, y0, y1, z0, z1
    sd: _SdFunc
    layers: tuple[tuple[float, float], ...]  # (inset mm, HU), painted in order
    excluded: bool


def _scalar(value: np.ndarray | float) -> np.ndarray | float:
    """Python float for 0-d values (keeps float32 slice arithmetic in float32)."""
    return float(value) if np.ndim(value) == 0 else value


def _smoothstep(t: np.ndarray | float) -> np.ndarray | float:
    t = np.clip(t, 0.0, 1.0)
    return _scalar(t * t * (3.0 - 2.0 * t))


def _ellipsoid_sd(dx: np.ndarray, dy: np.ndarray, dz: np.ndarray | float, a: float, b: np.ndarray | float,
                  c: float = 1.0) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipsoid, (f - 1) / |grad f| with f the ellipsoid norm."""
    u, v, w = dx / a, dy / b, dz / c
    q = u * u + (v * v + w * w)
    g2 = (u / a) ** 2 + ((v / b) ** 2 + (w / c) ** 2)
    return (np.sqrt(q) - 1.0) * np.sqrt((q + 1e-12) / (g2 + 1e-12 / (a * a)))  # f / |grad f| -> a at the centre


def _oval_sd(dx: np.ndarray, dy: np.ndarray, a: float, b_ant: float, b_post: float) -> np.ndarray:
    """Signed distance to an ellipse whose anterior (y < 0) and posterior semi-axes differ."""
    return _ellipsoid_sd(dx, dy, 0.0, a, _either(dy < 0, b_ant, b_post, dy))


def _either(condition: np.ndarray, a: np.ndarray | float, b: np.ndarray | float, like: np.ndarray) -> np.ndarray:
    """np.where in the dtype of `like` (float32 slices stay float32 when a and b are Python floats)."""
    return np.where(condition, a, b).astype(like.dtype, copy=False)


def _circle_sd(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    return np.sqrt(dx * dx + dy * dy) - r


def _body_frame(a: ChestAnatomy, z: np.ndarray | float) -> tuple:
    """Body centre x and semi-axes (x, y anterior, y posterior) at height z."""
    amp, wavelength, phase = a.body_wobble
    grow = 1.0 + amp * np.sin(2 * np.pi * z / wavelength + phase)
    s_amp, s_wavelength, s_phase = a.body_shift
    cx = s_amp * np.sin(2 * np.pi * z / s_wavelength + s_phase)
    return tuple(_scalar(v) for v in (cx, a.body_axes[0] * grow, a.body_axes[1] * grow, a.body_axes[2] * grow))


def _cavity_frame(a: ChestAnatomy, z: np.ndarray | float) -> tuple:
    """Pleural cavity centre x and semi-axes (x, y anterior, y posterior) at height z."""
    cx, ax, b_ant, b_post = _body_frame(a, z)
    lateral, anterior, posterior = a.wall_mm
    return cx, ax - a.fat_mm - lateral, b_ant - a.fat_mm - anterior, b_post - 0.7 * a.fat_mm - posterior


def _dome_sd(dome: _Vec, x: np.ndarray, y: np.ndarray, z: np.ndarray | float) -> np.ndarray:
    """Signed distance to a paraboloid hemidiaphragm, positive below it."""
    xd, yd, z_top, kx, ky = dome
    dx, dy = x - xd, y - yd
    return ((z_top - kx * dx * dx) - (ky * dy * dy + z)) / np.sqrt((1.0 + 4.0 * (kx * dx) ** 2) + 4.0 * (ky * dy) ** 2)


def _mediastinal_oval(a: ChestAnatomy, z: np.ndarray | float) -> tuple:
    """Central mediastinal oval at height z: y centre, right and left half-widths, AP semi-axis."""
    z_low, z_high = a.mediastinum[2:4]
    t = _smoothstep((z - z_low) / (z_high - z_low))
    low, high = a.mediastinum[4:8], a.mediastinum[8:12]
    return tuple(_scalar(lo + t * (hi - lo)) for lo, hi in zip(low, high, strict=True))


def _lung_sds(a: ChestAnatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray | float, cavity: np.ndarray,
              domes: tuple[np.ndarray, np.ndarray], extra: float) -> list[np.ndarray]:
    """Signed distance to each lung before the mediastinal organs are cut out (extra widens the mediastinum)."""
    x_mid, junction = a.mediastinum[:2]
    y_c, hw_right, hw_left, b = _mediastinal_oval(a, z)
    dx = x - x_mid
    oval = extra - _ellipsoid_sd(dx, y - y_c, 0.0, _either(dx < 0, hw_right, hw_left, dx), b)
    medial = (np.maximum(dx + (junction + extra), oval), np.maximum((junction + extra) - dx, oval))
    out = []
    for side in (_RIGHT, _LEFT):
        xc, yc, z_eq, cax, cay, caz = a.lung_caps[side]
        dz = np.maximum(z - z_eq, 0.0) if np.ndim(z) else max(z - z_eq, 0.0)
        cap = _ellipsoid_sd(x - xc, y - yc, dz, cax, cay, caz)
        out.append(np.maximum(np.maximum(cavity, cap), np.maximum(medial[side], domes[side])))
    return out


def _organs(a: ChestAnatomy) -> list[_Organ]:
    """Mediastinal and abdominal organs, in painting order."""
    inf = math.inf
    hx, hy, hz, ha, hb, hc, angle = a.heart
    cos_h, sin_h = math.cos(angle), math.sin(angle)
    asc_x, asc_y, desc_x, desc_y, r_ao, z_asc, z_arch = a.aorta
    svc_x, svc_y, r_svc, z_svc = a.svc
    tx, ty, rt, wall_t, z_carina = a.trachea
    ex, ey, re = a.esophagus
    sx, sy, rb = a.spine[:3]
    st_hw, st_ht, st_bottom = a.sternum
    gx, gy, gz, ga, gb, gc = a.stomach
    grow, shift = 1.0 + a.body_wobble[0], a.body_shift[0]
    st_x = shift + st_hw
    reach_h = max(ha, hb)

    def heart(x, y, z):
        dx, dy = x - hx, y - hy
        return _ellipsoid_sd(cos_h * dx + sin_h * dy, cos_h * dy - sin_h * dx, z - hz, ha, hb, hc)

    def heart_base(x, y, z):  # pericardial fat and vena cava between the heart and the diaphragm
        dx, dy = x - hx, y - hy
        return np.maximum(_ellipsoid_sd(cos_h * dx + sin_h * dy, cos_h * dy - sin_h * dx, 0.0, ha, hb), z - hz)

    def descending(x, y, z):
        return np.maximum(_circle_sd(x - desc_x, y - desc_y, r_ao), z - z_arch)

    def ascending(x, y, z):
        return np.maximum(_circle_sd(x - asc_x, y - asc_y, r_ao), np.maximum(z - z_arch, z_asc - z))

    def vena_cava(x, y, z):
        return np.maximum(_circle_sd(x - svc_x, y - svc_y, r_svc), z_svc - z)

    def trachea(x, y, z):
        return np.maximum(_circle_sd(x - tx, y - ty, rt), z_carina - z)

    def esophagus(x, y, z):
        return _circle_sd(x - ex, y - ey, re)

    def vertebra(x, y, z):
        return _ellipsoid_sd(x - sx, y - sy, 0.0, 1.3 * rb, rb)

    def rib_necks(x, y, z):
        return _ellipsoid_sd(x - sx, y - (sy + 0.5 * rb), 0.0, 1.9 * rb, 0.75 * rb)

    def stomach(x, y, z):
        return _ellipsoid_sd(x - gx, y - gy, z - gz, ga, gb, gc)

    def stomach_air(x, y, z):  # supine: gas floats anteriorly, above an air-fluid level
        return np.maximum(stomach(x, y, z) + 3.0, y - (gy - 0.25 * gb))

    sc_in, sc_out, sc_off, sc_t, sc_bottom = a.scapula

    def scapula(sign: float) -> _SdFunc:
        def sd(x, y, z):
            cx, ax, b_ant, b_post = _cavity_frame(a, z)
            shell = np.abs(_oval_sd(x - cx, y, ax + sc_off, b_ant + sc_off, b_post + sc_off)) - 0.5 * sc_t
            lateral = sc_in + (sc_out - sc_in) * _smoothstep((z - sc_bottom) / 40.0)  # pointed lower angle
            rel = sign * (x - cx)
            return np.maximum(np.maximum(shell, np.maximum(sc_in - rel, rel - lateral)), np.maximum(-y, sc_bottom - z))
        return sd

    def sternum(x, y, z):
        cx, _, b_ant, _ = _cavity_frame(a, z)
        return np.maximum(_ellipsoid_sd(x - cx, y + (b_ant + st_ht + 1.0), 0.0, st_hw, st_ht), st_bottom - z)

    return [
        _Organ((gx - ga, gx + ga, gy - gb, gy + gb, gz - gc, gz + gc), stomach, ((0.0, 35.0),), False),
        _Organ((gx - ga, gx + ga, gy - gb, gy + gb, gz - gc, gz + gc), stomach_air, ((0.0, _AIR),), False),
        _Organ((hx - reach_h, hx + reach_h, hy - reach_h, hy + reach_h, hz - hc, hz + hc), heart,
               ((0.0, 40.0), (8.0, 52.0)), True),
        _Organ((hx - reach_h, hx + reach_h, hy - reach_h, hy + reach_h, -inf, hz), heart_base, (), True),
        _Organ((desc_x - r_ao, desc_x + r_ao, desc_y - r_ao, desc_y + r_ao, -inf, z_arch), descending,
               ((0.0, 45.0),), True),
        _Organ((asc_x - r_ao, asc_x + r_ao, asc_y - r_ao, asc_y + r_ao, z_asc, z_arch), ascending,
               ((0.0, 45.0),), True),
        _Organ((svc_x - r_svc, svc_x + r_svc, svc_y - r_svc, svc_y + r_svc, z_svc, inf), vena_cava,
               ((0.0, 38.0),), True),
        _Organ((tx - rt, tx + rt, ty - rt, ty + rt, z_carina, inf), trachea, ((0.0, 40.0), (wall_t, _AIR)), True),
        _Organ((ex - re, ex + re, ey - re, ey + re, -inf, inf), esophagus, ((0.0, 40.0), (re - 1.5, -600.0)), True),
        _Organ((sx - 1.3 * rb, sx + 1.3 * rb, sy - rb, sy + rb, -inf, inf), vertebra, (), True),
        _Organ((sx - 1.9 * rb, sx + 1.9 * rb, sy - 0.25 * rb, sy + 1.25 * rb, -inf, inf), rib_necks, (), True),
        _Organ((-st_x, st_x, -a.body_axes[1] * grow, 0.0, st_bottom, inf), sternum, ((0.0, 650.0), (1.5, 260.0)),
               False),
        _Organ((-sc_out - shift, -sc_in + shift, 0.0, a.body_axes[2] * grow, sc_bottom, inf), scapula(-1.0),
               ((0.0, 600.0),), False),
        _Organ((sc_in - shift, sc_out + shift, 0.0, a.body_axes[2] * grow, sc_bottom, inf), scapula(1.0),
               ((0.0, 600.0),), False),
    ]


def _blend(img: np.ndarray, hu: np.ndarray | float, sd: np.ndarray, w: float, weight: float = 1.0) -> None:
    """Paint hu over img in place where sd < 0, with a linear partial-volume edge of width w."""
    alpha = sd * (-1.0 / w)  # in place from here on: the same values as 0.5 - sd / w, clipped, without temporaries
    alpha += 0.5
    np.clip(alpha, 0.0, 1.0, out=alpha)
    if weight != 1.0:
        alpha *= weight
    alpha *= hu - img
    img += alpha


def _span(coords: np.ndarray, lo: float, hi: float) -> tuple[int, int]:
    """Index range of the sorted grid coordinates inside [lo, hi]."""
    return int(np.searchsorted(coords, lo, "left")), int(np.searchsorted(coords, hi, "right"))


def _phase_weight(phase: float, start: float, stop: float, period: float, w: float) -> float:
    """Partial-volume weight of the z interval [start, stop] (in units of the period) at a given phase."""
    return float(np.clip(min(phase - start, stop - phase) * period / w + 0.5, 0.0, 1.0))


def _paint_spine(a: ChestAnatomy, img: np.ndarray, xs: np.ndarray, ys: np.ndarray, z: float, w: float) -> None:
    """Vertebra at height z: body (cortex, cancellous bone, discs), arch, transverse and spinous processes, canal."""
    sx, sy, rb, rc, lsp, period, z_phase = a.spine
    canal_y = sy + rb + rc + 1.0
    i0, i1 = _span(xs, sx - rc - 40.0, sx + rc + 40.0)
    j0, j1 = _span(ys, sy - rb - 2.0 * w, canal_y + rc + lsp + 6.0 + 2.0 * w)
    if i1 <= i0 or j1 <= j0:
        return
    x, y, sub = xs[None, i0:i1] - sx, ys[j0:j1, None], img[j0:j1, i0:i1]
    phase = ((z - z_phase) / period) % 1.0
    into_bone = min(phase - 0.18, 1.0 - phase) * period  # mm from the nearest disc, negative inside a disc
    bone = float(np.clip(into_bone / w + 0.5, 0.0, 1.0))
    core_hu = 230.0 + 160.0 * math.exp(-max(into_bone, 0.0) / 1.5)  # denser end plates
    body = _ellipsoid_sd(x, y - sy, 0.0, 1.15 * rb, rb)
    _blend(sub, 90.0 + bone * 600.0, body, w)
    _blend(sub, 90.0 + bone * (core_hu - 90.0), body + 2.0, w)
    arch = _phase_weight(phase, 0.3, 0.97, period, w)
    if arch > 0.0:
        _blend(sub, 560.0, _circle_sd(x, y - canal_y, rc + 4.0), w, arch)
    transverse = _phase_weight(phase, 0.5, 0.9, period, w)
    if transverse > 0.0:
        for sign in (-1.0, 1.0):
            _blend(sub, 480.0, _ellipsoid_sd(x - sign * (rc + 14.0), y - (canal_y - 2.0), 0.0, 13.0, 4.5), w,
                   transverse)
    spinous = _phase_weight(phase, 0.45, 1.0, period, w)
    if spinous > 0.0:
        _blend(sub, 520.0, _ellipsoid_sd(x, y - (canal_y + rc + 2.0 + 0.5 * lsp), 0.0, 3.5, 0.5 * lsp + 2.0), w,
               spinous)
    _blend(sub, 20.0, _circle_sd(x, y - canal_y, rc), w)


class _Grid(NamedTuple):
    """Per-render constants shared by all slices."""

    xs: np.ndarray
    ys: np.ndarray
    w: float
    base: np.ndarray  # air and table
    fat: np.ndarray  # (ny, 1) subcutaneous fat thickness
    abdomen: np.ndarray  # (1, nx) HU below the diaphragm (liver on the right)
    lung: np.ndarray  # (ny, 1) parenchyma HU without texture
    tex_cos: np.ndarray  # (K, nx) real and imaginary parts of the texture factors along x
    tex_sin: np.ndarray
    tex_y: np.ndarray  # (ny, K) complex texture factors along y
    tex_kz: np.ndarray  # (K,)
    organs: list[_Organ]


def _make_grid(a: ChestAnatomy, xs: np.ndarray, ys: np.ndarray, w: float) -> _Grid:
    x, y = xs[None, :], ys[:, None]
    y_top, thickness, curvature = a.table
    top = y_top - curvature * x * x
    slab = np.maximum(top - y, y - (top + thickness))
    base = np.full((len(ys), len(xs)), _AIR, np.float32)
    _blend(base, 180.0, slab, w)
    _blend(base, 10.0, slab + 2.5, w)
    fat = a.fat_mm * (1.0 - 0.3 * np.clip(y / (0.5 * a.body_axes[2]), 0.0, 1.0))
    abdomen = 42.0 + 16.0 * np.clip((a.liver_x - x) / 6.0 + 0.5, 0.0, 1.0)
    mean, amplitude, y_mid, half = a.lung_hu
    lung = mean + amplitude * np.clip((y - y_mid) / half, -1.0, 1.0)
    kx, ky, kz, amp, phase = a.texture.T
    angle = np.outer(kx, xs)
    tex_y = (amp * np.exp(1j * (np.outer(ys, ky) + phase))).astype(np.complex64)
    return _Grid(xs, ys, w, base, fat.astype(np.float32), abdomen.astype(np.float32), lung.astype(np.float32),
                 np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32), tex_y, kz, _organs(a))


def _window(xs: np.ndarray, ys: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
    """(rows, columns) of the grid inside the physical box [x0, x1] x [y0, y1] (possibly empty)."""
    (i0, i1), (j0, j1) = _span(xs, x0, x1), _span(ys, y0, y1)
    return slice(j0, max(j0, j1)), slice(i0, max(i0, i1))


def _render_slice(a: ChestAnatomy, g: _Grid, z: float) -> np.ndarray:
    """One axial slice (ny, nx) of everything except the tubes; each part is evaluated inside its own box."""
    xs, ys, w = g.xs, g.ys, g.w
    img = g.base.copy()
    pad = 2.0 * w + 1.0
    cx, ax, b_ant, b_post = _body_frame(a, z)
    rows, cols = _window(xs, ys, cx - ax - pad, cx + ax + pad, -b_ant - pad, b_post + pad)
    body = _oval_sd(xs[None, cols] - cx, ys[rows, None], ax, b_ant, b_post)
    _blend(img[rows, cols], _FAT, body, w)
    _blend(img[rows, cols], _MUSCLE, body + g.fat[rows], w)
    cx, ax, b_ant, b_post = _cavity_frame(a, z)
    c_rows, c_cols = _window(xs, ys, cx - ax - pad, cx + ax + pad, -b_ant - pad, b_post + pad)
    x, y, cavity_img = xs[None, c_cols], ys[c_rows, None], img[c_rows, c_cols]
    cavity = _oval_sd(x - cx, y, ax, b_ant, b_post)
    domes = (_dome_sd(a.domes[_RIGHT], x, y, z), _dome_sd(a.domes[_LEFT], x, y, z))
    diaphragm = np.where(x < a.mediastinum[0], domes[_RIGHT], domes[_LEFT])
    _blend(cavity_img, _MEDIASTINAL_FAT, np.maximum(cavity, diaphragm), w)
    _blend(cavity_img, g.abdomen[:, c_cols], np.maximum(cavity, 4.0 - diaphragm), w)
    lung = np.minimum(*_lung_sds(a, x, y, z, cavity, domes, 0.0))
    pad += _PLEURA_MM + 1.0
    for organ in g.organs:
        x0, x1, y0, y1, z0, z1 = organ.box
        if not z0 - pad <= z <= z1 + pad:
            continue
        o_rows, o_cols = _window(xs, ys, x0 - pad, x1 + pad, y0 - pad, y1 + pad)
        sd = organ.sd(xs[None, o_cols], ys[o_rows, None], z)
        for inset, hu in organ.layers:
            _blend(img[o_rows, o_cols], hu, sd + inset, w)
        if organ.excluded and sd.size:  # cut the organ (plus pleura) out of the lungs where the boxes overlap
            r0, r1 = max(o_rows.start, c_rows.start), min(o_rows.stop, c_rows.stop)
            k0, k1 = max(o_cols.start, c_cols.start), min(o_cols.stop, c_cols.stop)
            if r1 > r0 and k1 > k0:
                view = lung[r0 - c_rows.start:r1 - c_rows.start, k0 - c_cols.start:k1 - c_cols.start]
                cut = sd[r0 - o_rows.start:r1 - o_rows.start, k0 - o_cols.start:k1 - o_cols.start]
                np.maximum(view, _PLEURA_MM - cut, out=view)
    _paint_spine(a, img, xs, ys, z, w)
    if lung.size and lung.min() < 0.5 * w:
        _blend(cavity_img, _lung_hu(g, c_rows, c_cols, z), lung, w)
        _paint_fissures(a, cavity_img, x, y, z, lung, w)
    return img


def _lung_hu(g: _Grid, rows: slice, cols: slice, z: float) -> np.ndarray:
    """Parenchyma HU with its texture, the real part of sum_k tex_y[:, k] exp(i kz_k z) exp(i kx_k x), on a window
    of a slice. Summed term by term: as a complex matrix product it would go through BLAS, whose threads spin
    for this small product on a busy machine (up to 80 x slower)."""
    factors = g.tex_y[rows] * np.exp(1j * g.tex_kz * z).astype(np.complex64)
    out = np.repeat(g.lung[rows], cols.stop - cols.start, axis=1)
    term = np.empty_like(out)
    for k in range(len(g.tex_kz)):
        np.multiply(factors[:, k:k + 1].real, g.tex_cos[k:k + 1, cols], out=term)
        out += term
        np.multiply(factors[:, k:k + 1].imag, g.tex_sin[k:k + 1, cols], out=term)
        out -= term
    return out


def _fissure_height(row: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Height z of a fissure over (x, y), and the factor that turns a height difference into a distance."""
    _, z0, gy, gx, curvature, xc, _ = row
    height = z0 + gy * y + gx * x + curvature * (x - xc) ** 2
    return height, np.sqrt(1.0 + gy * gy + (gx + 2.0 * curvature * (x - xc)) ** 2)


def _paint_fissures(a: ChestAnatomy, img: np.ndarray, x: np.ndarray, y: np.ndarray, z: float, lung: np.ndarray,
                    w: float) -> None:
    """Thin denser sheets between the lobes, inside their own lung only, painted in the rows they cross."""
    x_mid = a.mediastinum[0]
    for row in a.fissures:
        _, z0, gy, gx, curvature, xc, _ = row
        across = gx * x + curvature * (x - xc) ** 2  # height change along x
        steepest = float(np.abs(gx + 2.0 * curvature * (x - xc)).max())
        reach = (_FISSURE_MM + 0.5 * w) * math.sqrt(1.0 + gy * gy + steepest**2)  # farthest |z - height| painted
        level = z - z0 - gy * y[:, 0]
        near = np.flatnonzero((level >= across.min() - reach) & (level <= across.max() + reach))
        if not len(near):
            continue
        rows = slice(int(near[0]), int(near[-1]) + 1)
        height, slope = _fissure_height(row, x, y[rows])
        sd = np.maximum(np.abs(z - height) / slope - _FISSURE_MM, lung[rows])
        sd = np.maximum(sd, (x - x_mid) if row[0] == _RIGHT else (x_mid - x))
        if row[6] >= 0:  # only above the fissure it ends on
            sd = np.maximum(sd, _fissure_height(a.fissures[int(row[6])], x, y[rows])[0] - height)
        _blend(img[rows], _FISSURE_HU, sd, w)


def _paint_capsule(vol: np.ndarray, axes: tuple[np.ndarray, np.ndarray, np.ndarray], box: np.ndarray, p0: np.ndarray,
                   p1: np.ndarray, r0: float, r1: float, hu: float, w: float) -> None:
    """Paint a tapered capsule p0 -> p1 into vol, only inside its bounding box (index ranges i0, i1, j0, j1, k0, k1
    along x, y, z)."""
    i0, i1, j0, j1, k0, k1 = (int(v) for v in box)
    d = (p1 - p0).astype(np.float32)
    x = axes[0][i0:i1] - np.float32(p0[0])
    y = axes[1][j0:j1, None] - np.float32(p0[1])
    z = axes[2][k0:k1, None, None] - np.float32(p0[2])
    t = np.clip(((z * d[2] + y * d[1]) + x * d[0]) * np.float32(1.0 / max(float(d @ d), 1e-9)), 0.0, 1.0)
    dist = np.sqrt(((x - t * d[0]) ** 2 + (y - t * d[1]) ** 2) + (z - t * d[2]) ** 2)
    _blend(vol[k0:k1, j0:j1, i0:i1], hu, dist - (r0 + (r1 - r0) * t), w)


def _paint_tubes(a: ChestAnatomy, vol: np.ndarray, axes: tuple[np.ndarray, np.ndarray, np.ndarray],
                 w: float) -> None:
    """Rasterise every tube, then every tube core (so chained pieces keep open lumens); long tubes are split
    into short pieces so that oblique ones keep tight bounding boxes (all pieces and their boxes found at once)."""
    for core_pass in (False, True):
        chosen = np.flatnonzero(a.tube_core > 0.0) if core_pass else np.arange(len(a.tube_core))
        scale = a.tube_core[chosen] if core_pass else np.ones(len(chosen))
        p0, p1, radius = a.tube_p0[chosen], a.tube_p1[chosen], a.tube_radius[chosen]
        pieces = np.maximum(1, np.ceil(np.linalg.norm(p1 - p0, axis=1) / np.maximum(3.0 * radius.max(axis=1), 6.0)))
        tube = np.repeat(np.arange(len(chosen)), pieces.astype(int))
        k = np.arange(len(tube)) - np.repeat(np.cumsum(pieces) - pieces, pieces.astype(int))
        t0, t1 = k / pieces[tube], (k + 1) / pieces[tube]
        step, r_step = p1[tube] - p0[tube], radius[tube, 1] - radius[tube, 0]
        starts, stops = p0[tube] + t0[:, None] * step, p0[tube] + t1[:, None] * step
        r_start = scale[tube] * (radius[tube, 0] + t0 * r_step)
        r_stop = scale[tube] * (radius[tube, 0] + t1 * r_step)
        reach = np.maximum(r_start, r_stop)[:, None] + w
        lo, hi = np.minimum(starts, stops) - reach, np.maximum(starts, stops) + reach
        boxes = np.column_stack([np.searchsorted(c, bound[:, d], side) for d, c in enumerate(axes)
                                 for bound, side in ((lo, "left"), (hi, "right"))])
        values = a.tube_hu[chosen, int(core_pass)]
        for n in np.flatnonzero((boxes[:, 1::2] > boxes[:, 0::2]).all(axis=1)):
            _paint_capsule(vol, axes, boxes[n], starts[n], stops[n], r_start[n], r_stop[n], float(values[tube[n]]), w)


def render_anatomy(anatomy: ChestAnatomy, size_xyz: tuple[int, int, int], spacing_xyz: tuple[float, float, float],
                   origin_xyz: tuple[float, float, float]) -> np.ndarray:
    """float32 HU array [z, y, x] on the axis-aligned grid given (origin = physical centre of voxel 0)."""
    axes = tuple((float(o) + float(s) * np.arange(int(n))).astype(np.float32)
                 for n, s, o in zip(size_xyz, spacing_xyz, origin_xyz, strict=True))
    w = 0.5 * (float(spacing_xyz[0]) + float(spacing_xyz[1]))
    grid = _make_grid(anatomy, axes[0], axes[1], w)
    vol = np.empty((len(axes[2]), len(axes[1]), len(axes[0])), np.float32)
    for k, z in enumerate(axes[2]):
        vol[k] = _render_slice(anatomy, grid, float(z))
    _paint_tubes(anatomy, vol, axes, w)
    return vol


def _lung_sd_points(a: ChestAnatomy, points: np.ndarray, extra: float) -> np.ndarray:
    """(N, 2) signed distance of (N, 3) points to the right and left lung, organs cut out."""
    x, y, z = (np.ascontiguousarray(points[:, d]) for d in range(3))
    cx, ax, b_ant, b_post = _cavity_frame(a, z)
    cavity = _oval_sd(x - cx, y, ax, b_ant, b_post)
    domes = (_dome_sd(a.domes[_RIGHT], x, y, z), _dome_sd(a.domes[_LEFT], x, y, z))
    sd = np.stack(_lung_sds(a, x, y, z, cavity, domes, extra), axis=1)
    for organ in _organs(a):
        if organ.excluded:
            sd = np.maximum(sd, (_PLEURA_MM + extra - organ.sd(x, y, z))[:, None])
    return sd


def _tube_clearance(a: ChestAnatomy, points: np.ndarray, chosen: np.ndarray | None = None) -> np.ndarray:
    """Distance from each point to the surface of the nearest chosen tube (default: the large (radius > 2 mm)
    vessels and airways)."""
    if chosen is None:
        chosen = (a.tube_kind != _RIB) & (a.tube_radius.max(axis=1) > 2.0)
    p0, d, radius = a.tube_p0[chosen], a.tube_p1[chosen] - a.tube_p0[chosen], a.tube_radius[chosen]
    out = np.full(len(points), np.inf)
    for start in range(0, len(points), 2048):
        rel = points[start:start + 2048, None, :] - p0[None]
        t = np.clip(np.einsum("nmk,mk->nm", rel, d) / np.maximum(np.einsum("mk,mk->m", d, d), 1e-9), 0.0, 1.0)
        dist = np.linalg.norm(rel - t[..., None] * d[None], axis=2) - (radius[:, 0] + t * (radius[:, 1] - radius[:, 0]))
        out[start:start + 2048] = dist.min(axis=1, initial=np.inf)
    return out


def lung_depth_mm(anatomy: ChestAnatomy, points_xyz: np.ndarray) -> np.ndarray:
    """For (N, 3) physical points: approximate distance in mm to the nearest lung boundary, positive inside a lung.

    Points within a few mm of the mediastinum or of a large vessel / airway (radius > 2 mm) count as outside.
    """
    points = np.asarray(points_xyz, dtype=float).reshape(-1, 3)
    depth = -_lung_sd_points(anatomy, points, _SAFE_MM).min(axis=1)
    inside = depth > 0.0
    if inside.any():
        depth[inside] = np.minimum(depth[inside], _tube_clearance(anatomy, points[inside]) - _SAFE_MM)
    return depth


def boundary_distances_mm(anatomy: ChestAnatomy, points_xyz: np.ndarray) -> np.ndarray:
    """(N, 2) distances in mm from (N, 3) lung points to the lung's border (pleura, mediastinum, diaphragm) and to
    the surface of the nearest large (radius > 2 mm) vessel or airway; the first is negative outside the lungs."""
    points = np.asarray(points_xyz, dtype=float).reshape(-1, 3)
    return np.column_stack([-_lung_sd_points(anatomy, points, 0.0).min(axis=1), _tube_clearance(anatomy, points)])


def vessel_distance_mm(anatomy: ChestAnatomy, points_xyz: np.ndarray) -> np.ndarray:
    """Distance in mm from (N, 3) points to the surface of the nearest pulmonary vessel, whatever its size."""
    points = np.asarray(points_xyz, dtype=float).reshape(-1, 3)
    return _tube_clearance(anatomy, points, anatomy.tube_kind == _VESSEL)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class _Tubes:
    """Accumulates tube rows in painting order."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []

    def add(self, p0: np.ndarray, p1: np.ndarray, r0: np.ndarray | float, r1: np.ndarray | float, hu: float,
            core_hu: float, core: np.ndarray | float, kind: int) -> None:
        p0, p1 = np.atleast_2d(p0), np.atleast_2d(p1)
        n = len(p0)
        cols = [np.broadcast_to(np.asarray(v, float), (n,)) for v in (r0, r1, hu, core_hu, core, kind)]
        self.rows.append(np.column_stack([p0, p1, *cols]))

    def path(self, points: np.ndarray, radii: np.ndarray, hu: float, core_hu: float, core: float, kind: int) -> None:
        self.add(points[:-1], points[1:], radii[:-1], radii[1:], hu, core_hu, core, kind)

    def fields(self) -> dict[str, np.ndarray]:
        rows = np.concatenate(self.rows)
        out = {"tube_p0": rows[:, 0:3], "tube_p1": rows[:, 3:6], "tube_radius": rows[:, 6:8],
               "tube_hu": rows[:, 8:10], "tube_core": rows[:, 10], "tube_kind": rows[:, 11].astype(np.int8)}
        for value in out.values():
            value.setflags(write=False)
        return out


def _push_into_lung(a: ChestAnatomy, point: np.ndarray, side: int, need: float, drop: float = 0.0) -> np.ndarray:
    """Move a hilar point laterally (and `drop` mm down per mm) until it is at least `need` mm inside the lung."""
    sign = -1.0 if side == _RIGHT else 1.0
    steps = point + np.outer(np.arange(0.0, 90.0, 1.5), _unit(np.array([sign, 0.0, -drop])))
    depth = -_lung_sd_points(a, steps, 0.0)[:, side]
    ok = depth >= need
    return steps[int(np.argmax(ok))] if ok.any() else steps[int(np.argmax(depth))]


def _lung_points(rng: np.random.Generator, a: ChestAnatomy, side: int, n: int, depth: float) -> np.ndarray:
    """n random points at least `depth` mm inside one lung (rejection sampling in its bounding box)."""
    xc, _, z_eq, cax, _, caz = a.lung_caps[side]
    y_mid, half = a.lung_hu[2:4]
    lo, hi = np.array([xc - cax, y_mid - half, z_eq - 0.5 * caz]), np.array([xc + cax, y_mid + half, z_eq + caz])
    found = np.zeros((0, 3))
    for _ in range(20):
        candidates = rng.uniform(lo, hi, size=(4 * n, 3))
        inside = -_lung_sd_points(a, candidates, 0.0)[:, side] >= depth
        found = np.concatenate([found, candidates[inside]])
        if len(found) >= n:
            break
    return found[:n]


def _grow_tree(rng: np.random.Generator, a: ChestAnatomy, side: int, root: np.ndarray, n_targets: int,
               step: float, r_leaf: float, r_root: float, cap: int) -> np.ndarray:
    """Space-colonisation tree from a hilar root filling one lung; rows (x0, y0, z0, x1, y1, z1, r0, r1).

    Nodes grow `step` mm towards the random target points nearest to them; targets are consumed once reached.
    Radii grow linearly with the number of leaves downstream, from r_leaf (a leaf) to r_root.
    """
    targets = _lung_points(rng, a, side, n_targets, 3.0)
    pos, parent, blocked = root[None].copy(), [-1], [False]
    kill = 1.3 * step
    while len(pos) < cap and len(targets):
        diff = targets[:, None, :] - pos[None]
        dist = np.linalg.norm(diff, axis=2)
        targets, diff, dist = (v[dist.min(axis=1) > kill] for v in (targets, diff, dist))
        dist[:, np.asarray(blocked)] = np.inf
        near = np.argmin(dist, axis=1) if len(targets) else np.zeros(0, int)
        d_near = dist[np.arange(len(targets)), near]
        active = np.isfinite(d_near)
        if not active.any():
            break
        pull = np.zeros_like(pos)
        np.add.at(pull, near[active], diff[active, near[active]] / d_near[active, None])
        grow = np.flatnonzero(np.linalg.norm(pull, axis=1) > 0.5)
        if not len(grow):
            break
        closest = {}  # each node's nearest target, aimed at when the mean pull leads out of the lung
        for t in np.argsort(d_near):
            closest.setdefault(int(near[t]), int(t))
        direction, length = _unit(_unit(pull[grow]) + 0.25 * rng.normal(size=(len(grow), 3))), step
        for attempt in range(2):
            if attempt:
                direction, length = _unit(np.array([diff[closest[i], i] for i in grow])), 0.6 * step
            new = pos[grow] + length * direction
            clear = -_lung_sd_points(a, np.concatenate([new, pos[grow] + 0.5 * length * direction]), 0.0)[:, side]
            ok = (clear[:len(grow)] >= r_leaf + 1.0) & (clear[len(grow):] >= r_leaf + 1.0)
            take = grow[ok][:cap - len(pos)]
            pos = np.concatenate([pos, new[ok][:len(take)]])
            parent += take.tolist()
            blocked += [False] * len(take)
            grow = grow[~ok]
            if not len(grow):
                break
        for i in grow:
            blocked[i] = True
    parent_arr = np.asarray(parent)
    leaves = np.zeros(len(pos))
    has_child = np.zeros(len(pos), bool)
    has_child[parent_arr[1:]] = True
    leaves[~has_child] = 1.0
    for i in range(len(pos) - 1, 0, -1):  # children always come after their parent
        leaves[parent_arr[i]] += leaves[i]
    largest = max(leaves[1:].max(initial=2.0) - 1.0, 1.0)
    radius = r_leaf + (r_root - r_leaf) * (leaves[1:] - 1.0) / largest
    return np.column_stack([pos[parent_arr[1:]], pos[1:], radius, radius])


def _dome_curvature(cav_a: float, half: float, y_mid: float, xd: float, yd: float, x_medial: float,
                    sign: float, cap: _Vec) -> float:
    """Largest normalised paraboloid depth ((x-xd)/(cav_a/2))^2 + ((y-yd)/half)^2 over the lung base."""
    gx, gy = np.meshgrid(np.linspace(-cav_a, cav_a, 61), np.linspace(y_mid - half, y_mid + half, 41))
    inside = (gx / cav_a) ** 2 + ((gy - y_mid) / half) ** 2 <= 1.0
    inside &= sign * (gx - x_medial) > 0
    inside &= ((gx - cap[0]) / cap[3]) ** 2 + ((gy - cap[1]) / cap[4]) ** 2 <= 1.0
    q = ((gx - xd) / (0.5 * cav_a)) ** 2 + ((gy - yd) / half) ** 2
    return float(q[inside].max())


def sample_anatomy(rng: np.random.Generator, fov_mm: tuple[float, float, float], fine: bool = False) -> ChestAnatomy:
    """Random patient anatomy that fits inside a field of view of fov_mm (x, y, z extent, centred at 0).

    fine: denser pulmonary vessel trees whose smallest branches are about 1 mm across, and interlobar fissures
    (without it, the sparser anatomy of the demo cohort, unchanged)."""
    fx, fy, fz = (float(v) for v in fov_mm)
    u = rng.uniform
    # body outline of an adult, then one scale factor so that body and table fit the field of view
    ax0, b_ant0 = u(140.0, 170.0), u(100.0, 120.0)
    b_post0 = b_ant0 * u(0.93, 1.03)
    wobble = (u(0.02, 0.04), u(250.0, 450.0), u(0.0, 2 * math.pi))
    shift0 = (u(1.0, 4.0), u(300.0, 600.0), u(0.0, 2 * math.pi))
    gap, thickness = u(3.0, 8.0), u(8.0, 12.0)
    grow = 1.0 + wobble[0]
    s = min(1.0, (0.5 * fx - max(4.0, 0.03 * fx)) / (ax0 * grow + shift0[0]),
            (0.5 * fy - max(4.0, 0.03 * fy)) / (b_ant0 * grow), (0.5 * fy - 2.0 - gap - thickness) / (b_post0 * grow))
    ax, b_ant, b_post = s * ax0, s * b_ant0, s * b_post0
    fat = s * u(8.0, 25.0)
    rb, rc, lsp = s * u(14.0, 18.0), s * u(6.5, 8.5), s * u(12.0, 18.0)
    walls = (s * u(12.0, 18.0), s * u(10.0, 16.0), 0.1 * rb + 2.0 * rc + lsp + 8.0 * s)
    cav_a, cav_ant, cav_post = ax - fat - walls[0], b_ant - fat - walls[1], b_post - 0.7 * fat - walls[2]
    y_mid, half = 0.5 * (cav_post - cav_ant), 0.5 * (cav_post + cav_ant)  # pleural cavity AP centre, half-extent
    sx, sy = s * u(-2.0, 2.0), cav_post - 0.9 * rb
    # heights: the lungs (apex to deepest recess) fit the field of view
    margin_z = max(5.0, 0.05 * fz)
    height = min(s * u(220.0, 260.0), fz - 2.0 * margin_z)
    z_mid = u(-1.0, 1.0) * max(0.0, 0.5 * fz - margin_z - 0.5 * height)
    z_base, z_apex = z_mid - 0.5 * height, z_mid + 0.5 * height
    dome_top = (z_base + u(0.33, 0.40) * height, z_base + u(0.25, 0.31) * height)
    z_carina = z_base + u(0.62, 0.68) * height
    # mediastinum
    x_mid = s * u(5.0, 10.0)
    re, rt, r_ao = s * u(6.0, 8.0), s * u(8.0, 10.0), s * u(11.0, 14.0)
    ex, ey = x_mid - 4.0 * s, sy - rb - re - 2.0 * s
    tx, ty = x_mid - 3.0 * s, ey - re - rt - 2.0 * s
    desc_x, desc_y = sx + rb + 0.75 * r_ao, sy - 0.75 * rb - 0.45 * r_ao
    asc_x, asc_y = x_mid - s * u(8.0, 13.0), ty - rt - r_ao - s * u(6.0, 12.0)
    z_arch = z_carina + u(0.05, 0.08) * height
    arch_top = z_arch + max(1.3 * r_ao, 0.05 * height)
    hx, hy, hz = x_mid + s * u(12.0, 22.0), y_mid - u(0.3, 0.4) * half, dome_top[_LEFT] + u(0.05, 0.1) * height
    ha, hb, hc = u(0.42, 0.5) * cav_a, u(0.45, 0.55) * half, u(0.17, 0.21) * height
    r_svc = s * u(8.0, 10.0)
    svc = (asc_x - r_ao - r_svc - 1.5 * s, asc_y + 0.5 * r_ao, r_svc, hz + 0.3 * hc)
    z_high = z_arch - r_ao - 2.0
    y_c, b_high = 0.5 * (asc_y + desc_y), 0.5 * (desc_y - asc_y) + r_ao + 4.0 * s

    def reach(px: float, py: float, r: float) -> float:  # oval half-width that keeps this circle inside
        return (abs(px - x_mid) + r + 2.0) / math.sqrt(max(1.0 - ((py - y_c) / b_high) ** 2, 0.25))

    mediastinum = (x_mid, s * u(2.0, 4.0), min(svc[3], z_high - 0.1 * height), z_high,
                   ey - s * u(4.0, 8.0), s * u(14.0, 18.0), s * u(12.0, 15.0), s * u(22.0, 28.0),
                   y_c, max(reach(asc_x, asc_y, r_ao), reach(*svc[:3])),
                   max(reach(tx + rt + r_ao + 3.0 * s, ty, r_ao), reach(desc_x, desc_y, r_ao)), b_high)
    caps, domes = [], []
    for side, sign in ((_RIGHT, -1.0), (_LEFT, 1.0)):
        apex = z_apex - (0.0 if side == _RIGHT else u(0.0, 0.03) * height)
        z_eq = z_base + u(0.25, 0.35) * height
        cap = (0.3 * x_mid + sign * u(0.5, 0.56) * cav_a, y_mid + u(0.05, 0.15) * half, z_eq,
               u(0.7, 0.76) * cav_a * (1.0 if side == _RIGHT else 0.9), u(1.15, 1.25) * half, apex - z_eq)
        xd, yd = 0.3 * x_mid + sign * 0.5 * cav_a, y_mid - 0.1 * half
        q_max = _dome_curvature(cav_a, half, y_mid, xd, yd, x_mid + sign * mediastinum[5 + side], sign, cap)
        k = (dome_top[side] - z_base) / q_max
        caps.append(cap)
        domes.append((xd, yd, dome_top[side], k / (0.5 * cav_a) ** 2, k / half**2))
    # abdomen: stomach under the left dome, its top kept 5 mm below the diaphragm
    gx, gy = x_mid + u(0.4, 0.55) * cav_a, y_mid - u(0.0, 0.2) * half
    ga, gb, gc = u(0.22, 0.3) * cav_a, u(0.3, 0.4) * half, max(10.0 * s, u(0.08, 0.12) * height)
    angles = np.linspace(0.0, 2 * math.pi, 24, endpoint=False)
    rim = [(gx + f * ga * math.cos(t), gy + f * gb * math.sin(t), gc * math.sqrt(1 - f * f))
           for f in (0.0, 0.5, 0.8, 0.95) for t in angles]
    xd, yd, z_top, kx, ky = domes[_LEFT]
    gz = min(z_top - kx * (px - xd) ** 2 - ky * (py - yd) ** 2 - 5.0 - h for px, py, h in rim)
    texture = np.column_stack([
        _unit(rng.normal(size=(8, 3))) * (2 * math.pi / rng.uniform(12.0, 45.0, 8))[:, None],
        rng.uniform(3.0, 6.0, 8), rng.uniform(0.0, 2 * math.pi, 8)])
    texture.setflags(write=False)
    empty = {name: np.zeros((0, 3)) for name in ("tube_p0", "tube_p1")}
    shape = ChestAnatomy(
        body_axes=(ax, b_ant, b_post), body_wobble=wobble, body_shift=(s * shift0[0], *shift0[1:]), fat_mm=fat,
        wall_mm=walls, lung_caps=(caps[0], caps[1]), domes=(domes[0], domes[1]), mediastinum=mediastinum,
        lung_hu=(u(-870.0, -840.0), u(10.0, 25.0), y_mid, half), texture=texture,
        heart=(hx, hy, hz, ha, hb, hc, -math.radians(u(25.0, 45.0))),
        aorta=(asc_x, asc_y, desc_x, desc_y, r_ao, hz, z_arch),
        svc=svc,
        trachea=(tx, ty, rt, 2.0 * s, z_carina), esophagus=(ex, ey, re),
        spine=(sx, sy, rb, rc, lsp, u(25.0, 29.0), u(0.0, 30.0)),
        sternum=(s * u(13.0, 19.0), s * u(5.0, 7.0), hz - u(0.0, 0.15) * height),
        scapula=(u(0.42, 0.5) * cav_a, u(0.78, 0.85) * cav_a, 16.0 * s, s * u(3.0, 4.5), z_base + u(0.3, 0.4) * height),
        stomach=(gx, gy, gz, ga, gb, gc), liver_x=x_mid + s * u(10.0, 30.0),
        table=(b_post * grow + gap, thickness, u(0.0, 8.0) / 150.0**2),
        **empty, tube_radius=np.zeros((0, 2)), tube_hu=np.zeros((0, 2)), tube_core=np.zeros(0),
        tube_kind=np.zeros(0, np.int8))
    shape = replace(shape, **_sample_tubes(rng, shape, s, height, z_carina, arch_top, fz, fine))
    return replace(shape, fissures=_sample_fissures(rng, shape, z_base, height, dome_top)) if fine else shape


def _sample_fissures(rng: np.random.Generator, a: ChestAnatomy, z_base: float, height: float,
                     dome_top: tuple[float, float]) -> np.ndarray:
    """An oblique fissure in each lung (high at the back, down to the diaphragm in front) and the right lung's
    horizontal fissure, which ends on the oblique one."""
    u = rng.uniform
    y_mid, half = a.lung_hu[2:4]
    rows = []
    for side in (_RIGHT, _LEFT):
        z_back, z_front = z_base + u(0.68, 0.78) * height, dome_top[side] + u(0.0, 0.06) * height
        gy = (z_back - z_front) / (2.0 * half)
        rows.append((side, z_front - gy * (y_mid - half), gy, u(-0.1, 0.1), u(0.0005, 0.002), a.lung_caps[side][0], -1))
    rows.append((_RIGHT, z_base + u(0.48, 0.56) * height, u(-0.05, 0.05), u(-0.05, 0.05), 0.0, 0.0, 0))
    out = np.asarray(rows, dtype=float)
    out.setflags(write=False)
    return out


def _sample_tubes(rng: np.random.Generator, a: ChestAnatomy, s: float, height: float, z_carina: float,
                  arch_top: float, fz: float, fine: bool = False) -> dict[str, np.ndarray]:
    """Great vessels, pulmonary vessel trees (fine: denser, down to about 1 mm), airways and ribs, in painting
    order."""
    u = rng.uniform
    tubes = _Tubes()
    asc_x, asc_y, desc_x, desc_y, r_ao, _, z_arch = a.aorta
    tx, ty, rt, _, _ = a.trachea
    hx, hy, hz, ha, hb, hc, _ = a.heart
    x_mid = a.mediastinum[0]
    # aortic arch: from the ascending to the descending aorta, passing left of the trachea, with three branches
    t = np.linspace(0.0, 1.0, 9)[:, None]
    start, stop = np.array([asc_x, asc_y]), np.array([desc_x, desc_y])
    control = 2.0 * np.array([tx + rt + r_ao + 3.0 * s, ty]) - 0.5 * (start + stop)
    xy = (1 - t) ** 2 * start + 2 * t * (1 - t) * control + t**2 * stop
    arch = np.column_stack([xy, z_arch + (arch_top - z_arch) * np.sin(np.pi * t[:, 0])])
    tubes.path(arch, np.full(9, r_ao), 45.0, 45.0, 0.0, _GREAT)
    for index, (dx, dy, r) in zip((2, 4, 6), ((-8.0, -2.0, 6.5), (0.0, 2.0, 4.5), (6.0, 4.0, 5.0)), strict=True):
        tubes.add(arch[index], arch[index] + [dx * s, dy * s, 0.5 * fz + 60.0 - arch[index, 2]], r * s, r * s,
                  45.0, 45.0, 0.0, _GREAT)
    # pulmonary arteries and veins from the heart to the hila; trees grow from the hila into the lungs
    hw = lambda z: _mediastinal_oval(a, z)[1:3]  # noqa: E731
    vessel_hu = u(32.0, 48.0)
    r_pa = s * u(11.0, 14.0)
    fork = np.array([x_mid + s * u(12.0, 18.0), asc_y + s * u(6.0, 10.0), z_carina - 0.07 * height])
    tubes.add(np.array([hx + 0.2 * ha, hy - 0.45 * hb, hz + 0.55 * hc]), fork, r_pa, r_pa, 45.0, 45.0, 0.0, _GREAT)
    atrium = np.array([hx - 0.15 * ha, hy + 0.5 * hb, hz + 0.15 * hc])
    bronchi = []
    # branches per tree (arteries, veins), their length and the radius of the finest ones
    count, step, r_leaf = ((1000, 800), 5.0 * math.sqrt(s), 0.45) if fine else ((160, 130), 9.0 * math.sqrt(s), 0.7)
    for side, sign in ((_RIGHT, -1.0), (_LEFT, 1.0)):
        z_a = z_carina - (0.09 if side == _RIGHT else 0.03) * height
        hilum_a = np.array([x_mid + sign * (hw(z_a)[side] + 6.0 * s), ty + (-3.0 if side == _RIGHT else 6.0) * s, z_a])
        root = _push_into_lung(a, hilum_a, side, 6.0)
        tubes.path(np.stack([fork, hilum_a, root]), np.full(3, (0.8 if side == _RIGHT else 0.75) * r_pa),
                   45.0, 45.0, 0.0, _GREAT)
        arteries = _grow_tree(rng, a, side, root, count[0], step, r_leaf, u(4.8, 5.5), count[0])
        z_v = hz + (0.35 if side == _RIGHT else 0.2) * hc
        hilum_v = np.array([x_mid + sign * (hw(z_v)[side] + 6.0 * s), hy + 0.45 * hb, z_v])
        root = _push_into_lung(a, hilum_v, side, 6.0)
        tubes.path(np.stack([atrium, hilum_v, root]), np.full(3, s * 7.0), 45.0, 45.0, 0.0, _GREAT)
        veins = _grow_tree(rng, a, side, root, count[1], step, r_leaf, u(4.4, 5.1), count[1])
        for tree in (arteries, veins):
            tubes.add(tree[:, 0:3], tree[:, 3:6], tree[:, 6], tree[:, 7], vessel_hu, vessel_hu, 0.0, _VESSEL)
        z_b = z_carina - (0.1 if side == _RIGHT else 0.13) * height
        end = np.array([x_mid + sign * 0.5 * hw(z_b)[side], ty + (3.0 if side == _RIGHT else 6.0) * s, z_b])
        bronchi.append((side, end, _push_into_lung(a, end, side, 0.55 * rt + 1.5, 0.6 if side == _RIGHT else 0.4)))
    # airways: main bronchi from the carina, then bronchial trees
    carina = np.array([tx, ty, z_carina + 0.5 * rt])
    r_main = 0.72 * rt
    for side, end, root in bronchi:
        tubes.path(np.stack([carina, end, root]), np.full(3, r_main), 30.0, _AIR, 1.0 - 2.0 * s / r_main, _AIRWAY)
        tree = _grow_tree(rng, a, side, root, 40, 10.0 * math.sqrt(s), 1.3, 0.55 * rt, 40)
        tubes.add(tree[:, 0:3], tree[:, 3:6], tree[:, 6], tree[:, 7], 20.0, _AIR, 0.7, _AIRWAY)
    _add_ribs(rng, a, tubes, s, fz)
    return tubes.fields()


def _add_ribs(rng: np.random.Generator, a: ChestAnatomy, tubes: _Tubes, s: float, fz: float) -> None:
    """Rib pairs (one per vertebra) curving around the pleural cavity, slanting down, with costal cartilages."""
    u = rng.uniform
    sx, sy, rb, rc, _, period, z_phase = a.spine
    cortex, marrow, cartilage = u(650.0, 760.0), u(200.0, 280.0), u(110.0, 160.0)
    r_rib, drop = s * u(3.8, 4.6), s * u(80.0, 110.0)
    offset = r_rib + 1.5
    k_lo = math.floor((-0.5 * fz - 60.0 - z_phase) / period)
    k_hi = math.ceil((0.5 * fz + 60.0 + drop + period - z_phase) / period)
    param = np.linspace(0.0, 1.0, 13)
    bone = param <= 0.8
    for k in range(k_lo, k_hi + 1):
        z_k = z_phase + (k + 0.09) * period
        zr = z_k - 0.25 * period - drop * param * param * (3.0 - 2.0 * param)
        cx, cax, cb_ant, cb_post = _cavity_frame(a, zr)
        theta0 = np.arcsin(np.minimum(0.95, (rc + 28.0 * s) / (cax + offset)))
        theta1 = np.pi - np.arcsin((a.sternum[0] + 3.0 * s) / (cax + offset))
        theta = theta0 + param * (theta1 - theta0)
        cos = np.cos(theta)
        y = np.where(cos > 0, cb_post + offset, cb_ant + offset) * cos
        for sign in (-1.0, 1.0):
            ring = np.column_stack([cx + sign * (cax + offset) * np.sin(theta), y, zr])
            neck = np.array([[sx + sign * 1.05 * rb, sy + 0.3 * rb, z_k],
                             [sx + sign * (rc + 20.0 * s), sy + 0.95 * rb + 3.0 * s, z_k - 0.2 * period]])
            path = np.concatenate([neck, ring[bone]])
            radii = r_rib * np.concatenate([[0.8, 1.0], 1.0 - 0.15 * param[bone]])
            tubes.path(path, radii, cortex, marrow, 1.0 - 1.3 / r_rib, _RIB)
            tubes.path(ring[~bone | np.roll(~bone, -1)], np.full(int((~bone).sum()) + 1, 0.8 * r_rib), cartilage,
                       cartilage, 0.0, _RIB)
