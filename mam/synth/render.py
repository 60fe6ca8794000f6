"""Render a 3D infant pose sequence as a video that BlazePose detects and tracks.

Input: float ``[T, 17, 3]`` metres, Human3.6M joint order, camera-aligned frame (x = image
right, y = image down, z = away from the camera, pelvis near the origin, infant supine with its
face toward -z); see :mod:`mam.synth.real_motion`. Output: an H.264 (libx264, yuv420p) video,
encoded frame by frame, and the ground-truth 2D projection of the 17 joints.

The recipe follows DESIGN.md ("Rendering a recording that BlazePose tracks"): a face texture
(eyes with iris and highlight, brows, nostrils, mouth, cheeks, hair) on a 3D head sphere with a
nose and ears, oriented per frame from the thorax, nose and head joints; limbs and trunk as
tapered capsules (swept spheres) in a depth buffer with Lambert shading; a diaper or a
bodysuit; a textured blanket with a drop shadow. Buffers are limited to the body's bounding box.
The figure is synthetic; it carries no clinical meaning.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import cv2
import numpy as np

from mam.skeleton import FPS, NUM_JOINTS

__all__ = [
    "BLAZEPOSE_FROM_H36M",
    "Appearance",
    "Camera",
    "RenderResult",
    "make_camera",
    "project",
    "render_frames",
    "render_video",
    "run_blazepose",
    "tracking_report",
]

# --- camera ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Camera:
    """Pinhole camera looking along +z of the camera-aligned pose frame.

    A point ``p`` goes to view coordinates ``(p - centre) @ rotation.T + (0, 0, distance)`` and
    to pixels ``focal * view_xy / view_z + principal``. ``rotation`` turns about the viewing
    axis only (in-plane rotation of the image, including the optional 90/180/270 degrees).
    """

    width: int
    height: int
    rotation: np.ndarray
    centre: np.ndarray
    distance: float
    focal: float
    principal: tuple[float, float]

    def to_view(self, points: np.ndarray) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64)
        v = (p - self.centre) @ self.rotation.T
        v[..., 2] += self.distance
        return v

    def view_to_pixels(self, view: np.ndarray) -> np.ndarray:
        z = np.maximum(view[..., 2:3], 1e-3)
        return self.focal * view[..., :2] / z + np.asarray(self.principal)


def project(joints: np.ndarray, camera: Camera) -> np.ndarray:
    """Ground-truth pixel positions ``[..., 17, 2]`` (x right, y down) of pose-frame joints."""
    return camera.view_to_pixels(camera.to_view(joints)).astype(np.float32)


def _rot_z(deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def make_camera(
    joints: np.ndarray,
    width: int = 1280,
    height: int = 720,
    *,
    seed: int = 0,
    rotation_deg: float = 0,
    tilt_deg: float | None = None,
    fill: float | None = None,
    distance: float | None = None,
) -> Camera:
    """Seeded camera placement that frames the whole sequence.

    ``rotation_deg`` (0/90/180/270 or any angle) is added to a small random in-plane tilt
    (``tilt_deg``, default uniform +-12 degrees). The scale makes the sequence's body extent
    (joints plus a body margin) fill ``fill`` (default uniform 0.62-0.8) of the limiting frame
    dimension; the camera distance (default 0.75-1.1 m) sets the perspective; the infant is
    placed off centre at random within the slack left.
    """
    rng = np.random.default_rng([int(seed), 7])
    tilt = float(rng.uniform(-12.0, 12.0)) if tilt_deg is None else float(tilt_deg)
    fill_ = float(rng.uniform(0.62, 0.8)) if fill is None else float(fill)
    dist = float(rng.uniform(0.75, 1.1)) if distance is None else float(distance)
    off = rng.uniform(-1.0, 1.0, size=2)
    rot = _rot_z(rotation_deg + tilt)
    j = np.asarray(joints, dtype=np.float64).reshape(-1, 3)
    centre0 = np.median(j, axis=0)
    v = (j - centre0) @ rot.T
    margin = 0.06  # head radius / limb thickness beyond the joints
    lo = np.percentile(v[:, :2], 0.5, axis=0) - margin
    hi = np.percentile(v[:, :2], 99.5, axis=0) + margin
    ext = np.maximum(hi - lo, 1e-3)
    px_per_m = fill_ * min(width / ext[0], height / ext[1])
    mid_view = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, 0.0])
    centre = centre0 + mid_view @ rot  # back to pose frame (rot is orthonormal)
    slack = np.array([width, height]) - px_per_m * ext
    principal = np.array([width / 2, height / 2]) + 0.4 * np.maximum(slack, 0) / 2 * off
    return Camera(
        width=int(width),
        height=int(height),
        rotation=rot,
        centre=centre,
        distance=dist,
        focal=px_per_m * dist,
        principal=(float(principal[0]), float(principal[1])),
    )


# --- appearance --------------------------------------------------------------------------------

_SKINS = [(247, 214, 190), (236, 192, 160), (222, 170, 135), (198, 140, 105), (160, 105, 75)]
_HAIRS = [(70, 50, 35), (110, 80, 50), (40, 30, 25), (150, 110, 70), (25, 20, 20)]
_IRIS = [(90, 60, 40), (70, 100, 140), (60, 45, 30), (100, 110, 80)]
_CLOTH = [(120, 170, 220), (240, 240, 235), (240, 180, 190), (150, 200, 150), (250, 220, 130)]
_BLANKET = [(150, 190, 230), (190, 220, 190), (235, 200, 210), (215, 215, 220), (240, 225, 170)]


@dataclass(frozen=True)
class Appearance:
    """Colours (RGB 0-255) and outfit of the rendered infant and its blanket."""

    skin: tuple[int, int, int] = _SKINS[1]
    hair: tuple[int, int, int] = _HAIRS[0]
    iris: tuple[int, int, int] = _IRIS[0]
    outfit: str = "diaper"  # "diaper" or "bodysuit"
    cloth: tuple[int, int, int] = _CLOTH[0]
    diaper: tuple[int, int, int] = (245, 245, 240)
    blanket: tuple[int, int, int] = _BLANKET[0]
    blanket_pattern: str = "checks"  # "checks", "stripes", "dots" or "plain"
    hair_amount: float = 0.6  # 0 (bald) .. 1

    @classmethod
    def random(cls, seed: int = 0) -> Appearance:
        rng = np.random.default_rng([int(seed), 11])

        def pick(options):
            return tuple(int(c) for c in options[int(rng.integers(len(options)))])

        blanket = pick(_BLANKET)
        cloth = pick([c for c in _CLOTH if np.abs(np.subtract(c, blanket)).sum() > 60])
        return cls(
            skin=pick(_SKINS),
            hair=pick(_HAIRS),
            iris=pick(_IRIS),
            outfit=("diaper", "bodysuit")[int(rng.integers(2))],
            cloth=cloth,
            blanket=blanket,
            blanket_pattern=("checks", "stripes", "dots", "plain")[int(rng.integers(4))],
            hair_amount=float(rng.uniform(0.3, 1.0)),
        )


# --- textures ----------------------------------------------------------------------------------

_TEX_H, _TEX_W = 256, 512  # equirectangular head texture: rows lat +90..-90, cols lon -180..180
_NOSE_LAT = -22.0  # degrees; the nose tip direction on the head sphere
HEAD_RADIUS = 0.062
_NOSE_OUT = 0.008  # the nose tip stands this far off the sphere


def _tex_xy(lon: float, lat: float) -> tuple[int, int]:
    return (
        round((lon + 180.0) / 360.0 * _TEX_W),
        round((90.0 - lat) / 180.0 * _TEX_H),
    )


def _tex_axes(dlon: float, dlat: float) -> tuple[int, int]:
    return max(1, round(dlon / 360.0 * _TEX_W)), max(1, round(dlat / 180.0 * _TEX_H))


def _head_texture(app: Appearance, rng: np.random.Generator) -> np.ndarray:
    """Face and hair painted on an equirectangular map; lon 0 = face forward, +lon = head left."""
    skin = np.array(app.skin, dtype=np.float32)
    tex = np.empty((_TEX_H, _TEX_W, 3), np.float32)
    tex[:] = skin
    lat = np.linspace(90, -90, _TEX_H, dtype=np.float32)[:, None]
    lon = np.linspace(-180, 180, _TEX_W, dtype=np.float32)[None, :]
    # cheeks: a soft blush
    blush = np.zeros((_TEX_H, _TEX_W), np.float32)
    for side in (-1, 1):
        cv2.ellipse(blush, _tex_xy(34 * side, -26), _tex_axes(13, 9), 0, 0, 360, 1.0, -1)
    blush = cv2.GaussianBlur(blush, (0, 0), 5)
    tex += blush[..., None] * (np.array([235, 120, 120], np.float32) - skin) * 0.25
    # hair: above a hairline that drops from the forehead to the nape
    hairline = 32.0 - 48.0 * (np.abs(lon) / 180.0) ** 1.2
    noise = cv2.GaussianBlur(rng.normal(0, 1, (_TEX_H, _TEX_W)).astype(np.float32), (0, 0), 1.5)
    hair = np.clip((lat - hairline) / 6.0 + 0.8 * noise, 0, 1) * app.hair_amount
    hair = np.clip(hair * 1.4, 0, 1)
    hair_col = np.array(app.hair, np.float32)[None, None] * (1 + 0.15 * noise[..., None])
    tex = tex * (1 - hair[..., None]) + hair_col * hair[..., None]
    img = np.clip(tex, 0, 255).astype(np.uint8)
    line = tuple(int(c) for c in (skin * 0.45))
    brow = tuple(int(c) for c in (0.5 * np.array(app.hair) + 0.5 * skin * 0.6))
    for side in (-1, 1):  # side +1 = the infant's left (head +lon)
        ex, ey = 27 * side, -1
        cv2.ellipse(img, _tex_xy(ex, ey), _tex_axes(20, 11), 0, 0, 360, (250, 250, 248), -1)
        cv2.circle(img, _tex_xy(ex, ey - 0.5), _tex_axes(8.5, 0)[0], app.iris, -1)
        cv2.circle(img, _tex_xy(ex, ey - 0.5), _tex_axes(4.0, 0)[0], (15, 12, 12), -1)
        cv2.circle(img, _tex_xy(ex - 2.5, ey + 2.5), _tex_axes(2.4, 0)[0], (255, 255, 255), -1)
        cv2.ellipse(img, _tex_xy(ex, ey), _tex_axes(21, 12), 0, 180, 360, (40, 30, 30), 2)
        cv2.ellipse(img, _tex_xy(ex, 13), _tex_axes(22, 6), 0, 190, 350, brow, 3)
        cv2.ellipse(img, _tex_xy(4.5 * side, _NOSE_LAT - 5), _tex_axes(3, 2), 0, 0, 360, line, -1)
    lips = (205, 110, 110)
    cv2.ellipse(img, _tex_xy(0, -41), _tex_axes(20, 8), 0, 0, 360, lips, -1)
    cv2.ellipse(img, _tex_xy(0, -41), _tex_axes(20, 3), 0, 0, 180, (120, 50, 55), 2)
    img = cv2.GaussianBlur(img, (3, 3), 0.8)
    return img.astype(np.float32)


def _blanket(width: int, height: int, app: Appearance, rng: np.random.Generator) -> np.ndarray:
    """Full-frame blanket: pattern, weave noise, soft folds and a light fall-off."""
    base = np.array(app.blanket, np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    s = min(width, height)
    img = np.empty((height, width, 3), np.float32)
    img[:] = base
    ang = rng.uniform(0, np.pi)
    u = xx * np.cos(ang) + yy * np.sin(ang)
    w = -xx * np.sin(ang) + yy * np.cos(ang)
    period = s * rng.uniform(0.06, 0.1)
    accent = np.clip(base * np.array(rng.uniform(0.75, 0.9, 3), np.float32), 0, 255)
    if app.blanket_pattern == "checks":
        a = (np.floor(u / period) + np.floor(w / period)) % 2
        img += (accent - base) * a[..., None] * 0.8
    elif app.blanket_pattern == "stripes":
        a = ((u / period) % 1.0) < 0.35
        img += (accent - base) * a[..., None]
    elif app.blanket_pattern == "dots":
        fu = (u / period) % 1.0 - 0.5
        fw = (w / period) % 1.0 - 0.5
        a = (fu * fu + fw * fw) < 0.04
        img += (np.array([255, 255, 255], np.float32) - base) * a[..., None] * 0.7
    weave = (np.sin(u * 1.7) * np.sin(w * 1.7)).astype(np.float32)
    img *= (1 + 0.03 * weave)[..., None]
    folds = np.zeros((height, width), np.float32)
    for _ in range(4):
        k = rng.uniform(2, 6) * 2 * np.pi / s
        a2 = rng.uniform(0, 2 * np.pi)
        folds += np.sin(k * (xx * np.cos(a2) + yy * np.sin(a2)) + rng.uniform(0, 6.3))
    img *= (1 + 0.05 * folds)[..., None]
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / float(width**2 + height**2)
    img *= (1.08 - 0.5 * r2)[..., None]
    img += rng.normal(0, 2.0, img.shape).astype(np.float32)
    # slightly out of focus, as a camera 1 m away sees fabric (and far cheaper to encode)
    return cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.uint8), (0, 0), 1.0)


# --- primitives --------------------------------------------------------------------------------

_LIGHT = np.array([-0.35, -0.45, -1.0])
_LIGHT = _LIGHT / np.linalg.norm(_LIGHT)  # toward the light, view frame (-z = toward camera)
_AMBIENT = 0.42
_DEPTH_GAIN = 2.5  # per metre: an overhead light makes nearer surfaces brighter (depth cue)


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-9)


class _Canvas:
    """Depth and colour buffers limited to a bounding box of the frame."""

    def __init__(
        self, x0: int, y0: int, x1: int, y1: int, focal: float, principal: tuple[float, float]
    ) -> None:
        self.x0, self.y0 = x0, y0
        self.cx, self.cy = principal
        self.z_ref = 0.0  # depth with unit brightness (the pelvis)
        self.w, self.h = x1 - x0, y1 - y0
        self.z = np.full((self.h, self.w), np.inf, np.float32)
        self.rgb = np.zeros((self.h, self.w, 3), np.float32)
        self.focal = focal

    def _box(self, cx0, cy0, cx1, cy1):
        bx0 = max(math.floor(cx0) - self.x0, 0)
        by0 = max(math.floor(cy0) - self.y0, 0)
        bx1 = min(math.ceil(cx1) + 1 - self.x0, self.w)
        by1 = min(math.ceil(cy1) + 1 - self.y0, self.h)
        if bx1 <= bx0 or by1 <= by0:
            return None
        return bx0, by0, bx1, by1

    def capsule(self, a, b, ra, rb, colour, shade_gain: float = 1.0) -> None:
        """Tapered capsule between view points ``a``, ``b`` (metres) with radii ``ra``, ``rb``."""
        f = self.focal
        sa = f * a[:2] / a[2]
        sb = f * b[:2] / b[2]
        pra, prb = f * ra / a[2], f * rb / b[2]
        box = self._box(
            min(sa[0] - pra, sb[0] - prb) + self.cx,
            min(sa[1] - pra, sb[1] - prb) + self.cy,
            max(sa[0] + pra, sb[0] + prb) + self.cx,
            max(sa[1] + pra, sb[1] + prb) + self.cy,
        )
        if box is None:
            return
        bx0, by0, bx1, by1 = box
        ax_, ay_ = sa[0] + self.cx - self.x0, sa[1] + self.cy - self.y0
        abx, aby = sb[0] - sa[0], sb[1] - sa[1]
        xs = np.arange(bx0, bx1, dtype=np.float32)[None, :] - np.float32(ax_)
        ys = np.arange(by0, by1, dtype=np.float32)[:, None] - np.float32(ay_)
        l2 = abx * abx + aby * aby
        if l2 > 1e-6:
            t = np.clip((xs * abx + ys * aby) * np.float32(1.0 / l2), 0.0, 1.0)
        else:
            t = np.zeros((by1 - by0, bx1 - bx0), np.float32)
        ex = xs - t * np.float32(abx)
        ey = ys - t * np.float32(aby)
        d2 = ex * ex + ey * ey
        r = np.float32(pra) + t * np.float32(prb - pra)
        inside = d2 < r * r
        if not inside.any():
            return
        zc = np.float32(a[2]) + t * np.float32(b[2] - a[2])
        zsub = self.z[by0:by1, bx0:bx1]
        hh = np.sqrt(np.maximum(r * r - d2, 0.0))
        z = zc - hh * zc / np.float32(f)
        m = inside & (z < zsub)
        if not m.any():
            return
        zsub[m] = z[m]
        rm = r[m]
        nx, ny, nz = ex[m] / rm, ey[m] / rm, -hh[m] / rm
        lam = np.maximum(nx * _LIGHT[0] + ny * _LIGHT[1] + nz * _LIGHT[2], 0.0)
        shade = (_AMBIENT + (1 - _AMBIENT) * lam) * shade_gain
        shade *= 1.0 + _DEPTH_GAIN * (self.z_ref - z[m])
        self.rgb[by0:by1, bx0:bx1][m] = shade[:, None] * np.asarray(colour, np.float32)[None]

    def sphere_textured(self, c, radius, axes, tex) -> None:
        """Sphere at view point ``c`` with an equirectangular texture in the frame ``axes``
        (rows left, up, forward of the head, in view coordinates)."""
        f = self.focal
        sc = f * c[:2] / c[2] + np.array([self.cx, self.cy])
        pr = f * radius / c[2]
        box = self._box(sc[0] - pr, sc[1] - pr, sc[0] + pr, sc[1] + pr)
        if box is None:
            return
        bx0, by0, bx1, by1 = box
        xs = (np.arange(bx0, bx1, dtype=np.float32)[None, :] + self.x0 - sc[0]) / pr
        ys = (np.arange(by0, by1, dtype=np.float32)[:, None] + self.y0 - sc[1]) / pr
        d2 = xs * xs + ys * ys
        inside = d2 < 1.0
        hh = np.sqrt(np.maximum(1.0 - d2, 0.0))
        z = np.float32(c[2]) - hh * np.float32(radius)
        zsub = self.z[by0:by1, bx0:bx1]
        m = inside & (z < zsub)
        if not m.any():
            return
        zsub[m] = z[m]
        n = np.stack([np.broadcast_to(xs, m.shape)[m], np.broadcast_to(ys, m.shape)[m], -hh[m]])
        local = axes.astype(np.float32) @ n  # (3, N): left, up, forward
        lon = np.arctan2(local[0], local[2])
        lat = np.arcsin(np.clip(local[1], -1.0, 1.0))
        col = ((lon + np.pi) * (_TEX_W / (2 * np.pi))).astype(np.int32) % _TEX_W
        row = np.clip(((np.pi / 2 - lat) * (_TEX_H / np.pi)).astype(np.int32), 0, _TEX_H - 1)
        lam = np.maximum(_LIGHT.astype(np.float32) @ n, 0.0)
        shade = (_AMBIENT + (1 - _AMBIENT) * lam) * (1.0 + _DEPTH_GAIN * (self.z_ref - z[m]))
        self.rgb[by0:by1, bx0:bx1][m] = tex[row, col] * shade[:, None]


def _torso_axes(v: np.ndarray) -> np.ndarray:
    """Rows (left, up, anterior) of the trunk in one frame of view-frame joints."""
    up = _unit(v[8] - v[0])
    left = (v[11] - v[14]) + (v[4] - v[1])
    left = _unit(left - left.dot(up) * up)
    return np.stack([left, up, np.cross(left, up)])


def _head_frame(v: np.ndarray, torso: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Head centre and axes (rows left, up, forward) from view-frame joints of one frame.

    The head keeps the trunk's up axis and turns about it with the yaw of the nose (its offset
    from the thorax -> head line); the sphere is placed so that the nose tip is joint 9."""
    t_left, t_up, t_ant = torso
    thorax, nose, head = v[8], v[9], v[10]
    axis = _unit(head - thorax)
    o = nose - thorax
    o = o - o.dot(axis) * axis
    yaw = math.atan2(float(o.dot(t_left)), float(o.dot(t_ant)))
    if np.linalg.norm(o) < 0.01:
        yaw = 0.0
    fwd = math.cos(yaw) * t_ant + math.sin(yaw) * t_left
    up = t_up
    left = np.cross(up, fwd)
    lat = math.radians(_NOSE_LAT)
    nose_dir = math.cos(lat) * fwd + math.sin(lat) * up
    centre = nose - (HEAD_RADIUS + _NOSE_OUT) * nose_dir
    return centre, np.stack([left, up, fwd])


@dataclass
class _Scene:
    camera: Camera
    app: Appearance
    tex: np.ndarray
    background: np.ndarray


def _draw_body(cv: _Canvas, v: np.ndarray, app: Appearance, tex: np.ndarray) -> None:
    skin = np.array(app.skin, np.float32)
    cloth = np.array(app.cloth, np.float32)
    diaper = np.array(app.diaper, np.float32)
    body = cloth if app.outfit == "bodysuit" else skin
    nappy = cloth * 0.95 if app.outfit == "bodysuit" else diaper
    cap = cv.capsule
    torso = _torso_axes(v)
    _, t_up, t_ant = torso
    # trunk: the axis runs behind the thorax joint (it sits at the front, between the clavicles)
    p0 = v[0] - 0.004 * t_ant
    p1 = v[7] - 0.01 * t_ant
    p2 = v[8] - 0.03 * t_ant - 0.012 * t_up
    cap(p0, p1, 0.056, 0.056, body)
    cap(p1, p2, 0.056, 0.042, body)
    for hip, sh in ((4, 11), (1, 14)):
        low = v[0] + 0.8 * (v[hip] - v[0])
        top = v[8] + 0.7 * (v[sh] - v[8]) - 0.015 * t_ant - 0.008 * t_up
        mid = low + 0.55 * (top - low)
        cap(low, mid, 0.04, 0.04, body)
        cap(mid, top, 0.04, 0.033, body)
    # front cues: nipples and navel (a skin-coloured trunk is otherwise the same front and back)
    if app.outfit != "bodysuit":
        t_left = torso[0]
        for side in (-1.0, 1.0):
            nip = v[8] + 0.3 * (v[7] - v[8]) + side * 0.03 * t_left + 0.018 * t_ant
            cap(nip, nip, 0.0055, 0.0055, skin * np.array([0.85, 0.62, 0.6], np.float32))
        nav = v[7] + 0.1 * (v[0] - v[7]) + 0.046 * t_ant
        cap(nav, nav, 0.005, 0.005, skin * 0.6)
    cap(v[11] - 0.012 * t_ant, v[14] - 0.012 * t_ant, 0.027, 0.027, body)
    centre, axes = _head_frame(v, torso)
    cap(v[8] - 0.02 * t_ant, centre, 0.028, 0.028, skin * 0.97)
    # diaper / bodysuit crotch
    cap(v[1], v[4], 0.05, 0.05, nappy)
    cap(v[0], v[0] + 0.2 * (v[7] - v[0]), 0.061, 0.06, nappy)
    for hip, knee in ((1, 2), (4, 5)):
        cap(v[hip], v[hip] + 0.28 * (v[knee] - v[hip]), 0.045, 0.04, nappy)
    # legs and feet
    torso_fwd = t_ant
    for hip, knee, ankle in ((1, 2, 3), (4, 5, 6)):
        cap(v[hip], v[knee], 0.034, 0.025, skin)
        cap(v[knee], v[ankle], 0.025, 0.018, skin)
        shin = _unit(v[ankle] - v[knee])
        thigh = _unit(v[knee] - v[hip])
        toe = thigh - thigh.dot(shin) * shin + 0.8 * (torso_fwd - torso_fwd.dot(shin) * shin)
        toe = _unit(_unit(toe) + 0.8 * shin)
        cap(v[ankle] - 0.006 * toe, v[ankle] + 0.05 * toe, 0.019, 0.018, skin)
    # arms and hands
    sleeve = app.outfit == "bodysuit"
    for sh, el, wr in ((11, 12, 13), (14, 15, 16)):
        if sleeve:
            cap(v[sh], v[sh] + 0.5 * (v[el] - v[sh]), 0.027, 0.025, cloth)
        cap(v[sh], v[el], 0.024, 0.02, skin)
        cap(v[el], v[wr], 0.02, 0.016, skin)
        fore = _unit(v[wr] - v[el])
        cap(v[wr] + 0.004 * fore, v[wr] + 0.026 * fore, 0.018, 0.019, skin)
    # head: textured sphere, nose, ears
    left, up, fwd = axes
    cv.sphere_textured(centre, HEAD_RADIUS, axes, tex)
    lat = math.radians(_NOSE_LAT)
    nose_dir = math.cos(lat) * fwd + math.sin(lat) * up
    tip = centre + (HEAD_RADIUS + _NOSE_OUT) * nose_dir
    cap(
        tip - 0.009 * nose_dir - 0.006 * up, tip - 0.009 * nose_dir + 0.004 * up, 0.009, 0.007, skin
    )
    for side in (-1.0, 1.0):
        ear_dir = _unit(side * left - 0.12 * up - 0.1 * fwd)
        ec = centre + (HEAD_RADIUS - 0.004) * ear_dir
        cap(ec - 0.009 * up, ec + 0.009 * up, 0.013, 0.012, skin * 0.93)


def _render_one(scene: _Scene, joints_t: np.ndarray) -> np.ndarray:
    cam, app = scene.camera, scene.app
    v = cam.to_view(joints_t)
    px = cam.view_to_pixels(v)
    reach = cam.focal * 0.085 / float(v[:, 2].min())  # head radius plus ears/nose margin
    shadow_off = cam.focal * 0.02 / cam.distance
    pad = int(reach + 2 * shadow_off + 4)
    x0 = max(int(px[:, 0].min()) - pad, 0)
    y0 = max(int(px[:, 1].min()) - pad, 0)
    x1 = min(int(px[:, 0].max()) + pad, cam.width)
    y1 = min(int(px[:, 1].max()) + pad, cam.height)
    frame = scene.background.copy()
    if x1 <= x0 or y1 <= y0:
        return frame
    cv = _Canvas(x0, y0, x1, y1, cam.focal, cam.principal)
    cv.z_ref = float(v[0, 2])
    _draw_body(cv, v, app, scene.tex)
    mask = np.isfinite(cv.z).astype(np.float32)
    # drop shadow: the body mask blurred at quarter resolution, shifted away from the light
    k = 4
    small = cv2.resize(mask, (max(cv.w // k, 1), max(cv.h // k, 1)), interpolation=cv2.INTER_AREA)
    sig = max(cam.focal * 0.012 / cam.distance / k, 0.5)
    small = cv2.GaussianBlur(small, (0, 0), sig)
    shift = np.float32([[1, 0, shadow_off * 0.6 / k], [0, 1, shadow_off / k]])
    small = cv2.warpAffine(small, shift, (small.shape[1], small.shape[0]))
    shadow = cv2.resize(small, (cv.w, cv.h), interpolation=cv2.INTER_LINEAR)
    edge = cv2.GaussianBlur(mask, (3, 3), 0.6)  # soft silhouette edge
    keep = (1.0 - 0.42 * shadow) * (1.0 - edge)
    region = frame[y0:y1, x0:x1] * keep[..., None] + cv.rgb * edge[..., None]
    frame[y0:y1, x0:x1] = np.clip(region, 0, 255).astype(np.uint8)
    return frame


def _check_joints(joints: np.ndarray) -> np.ndarray:
    j = np.asarray(joints, dtype=np.float64)
    if j.ndim != 3 or j.shape[1:] != (NUM_JOINTS, 3):
        raise ValueError(f"joints must be [T, {NUM_JOINTS}, 3], got {j.shape}")
    if not np.isfinite(j).all():
        raise ValueError("joints must be finite")
    return j


def render_frames(
    joints: np.ndarray,
    camera: Camera,
    appearance: Appearance | None = None,
    *,
    seed: int = 0,
) -> Iterator[np.ndarray]:
    """Yield RGB uint8 ``[H, W, 3]`` frames one at a time."""
    j = _check_joints(joints)
    app = appearance or Appearance.random(seed)
    rng = np.random.default_rng([int(seed), 13])
    scene = _Scene(
        camera=camera,
        app=app,
        tex=_head_texture(app, rng),
        background=_blanket(camera.width, camera.height, app, rng),
    )
    for t in range(j.shape[0]):
        yield _render_one(scene, j[t])


@dataclass
class RenderResult:
    """What ``render_video`` produced: ground truth for measuring a pose estimator."""

    keypoints_2d: np.ndarray  # [T, 17, 2] pixels (x right, y down) of the H36M joints
    camera: Camera
    appearance: Appearance
    frames: int
    seconds: float  # wall time spent rendering and encoding

    @property
    def fps(self) -> float:
        return self.frames / max(self.seconds, 1e-9)


def render_video(
    joints: np.ndarray,
    path: str | os.PathLike,
    *,
    width: int = 1280,
    height: int = 720,
    fps: float = FPS,
    seed: int = 0,
    crf: int = 23,
    rotation_deg: float = 0,
    preset: str = "medium",
    camera: Camera | None = None,
    appearance: Appearance | None = None,
    outfit: str | None = None,
    skin: tuple[int, int, int] | None = None,
    blanket_pattern: str | None = None,
) -> RenderResult:
    """Render ``joints`` ``[T, 17, 3]`` (metres, camera-aligned frame) to an H.264 video.

    The camera comes from ``make_camera(joints, width, height, seed=seed,
    rotation_deg=rotation_deg)`` unless given; the appearance from ``Appearance.random(seed)``
    unless given, with ``outfit`` / ``skin`` / ``blanket_pattern`` overriding it. Frames are
    rendered and encoded one at a time (libx264, yuv420p, ``crf``, ``preset``). Returns the
    ground-truth 2D joints (``project(joints, camera)``) and the settings used.
    """
    import av

    j = _check_joints(joints)
    if width % 2 or height % 2:
        raise ValueError("width and height must be even for yuv420p")
    cam = camera or make_camera(j, width, height, seed=seed, rotation_deg=rotation_deg)
    app = appearance or Appearance.random(seed)
    over = {
        k: val
        for k, val in (("outfit", outfit), ("skin", skin), ("blanket_pattern", blanket_pattern))
        if val is not None
    }
    if over:
        app = replace(app, **over)
    t0 = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rate = round(fps) if abs(fps - round(fps)) < 1e-9 else fps
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = cam.width, cam.height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        n = 0
        for img in render_frames(j, cam, app, seed=seed):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
            n += 1
        for packet in stream.encode():
            container.mux(packet)
    return RenderResult(
        keypoints_2d=project(j, cam),
        camera=cam,
        appearance=app,
        frames=n,
        seconds=time.perf_counter() - t0,
    )


# --- measuring tracking ------------------------------------------------------------------------

BLAZEPOSE_FROM_H36M: dict[int, int] = {
    9: 0,  # nose
    11: 11,  # left shoulder (the infant's left)
    14: 12,
    12: 13,  # left elbow
    15: 14,
    13: 15,  # left wrist
    16: 16,
    4: 23,  # left hip
    1: 24,
    5: 25,  # left knee
    2: 26,
    6: 27,  # left ankle
    3: 28,
}
"""H36M joint -> BlazePose landmark for the 13 joints with a direct landmark."""

_SWAP_H36M = {11: 14, 14: 11, 12: 15, 15: 12, 13: 16, 16: 13, 4: 1, 1: 4, 5: 2, 2: 5, 6: 3, 3: 6}


def run_blazepose(path: str | os.PathLike, model_complexity: int = 1) -> np.ndarray:
    """BlazePose (MediaPipe legacy API, tracking mode) on a video: ``[T, 33, 2]`` pixels, NaN
    where no pose was found."""
    import av
    import mediapipe as mp

    out = []
    with (
        av.open(os.fspath(path)) as container,
        mp.solutions.pose.Pose(
            static_image_mode=False, model_complexity=model_complexity, smooth_landmarks=True
        ) as pose,
    ):
        for frame in container.decode(video=0):
            img = frame.to_ndarray(format="rgb24")
            h, w = img.shape[:2]
            res = pose.process(img)
            if res.pose_landmarks is None:
                out.append(np.full((33, 2), np.nan, np.float32))
            else:
                lm = res.pose_landmarks.landmark
                out.append(np.array([[p.x * w, p.y * h] for p in lm], np.float32))
    return np.stack(out) if out else np.zeros((0, 33, 2), np.float32)


def tracking_report(landmarks: np.ndarray, keypoints_2d: np.ndarray) -> dict[str, float]:
    """Compare BlazePose landmarks ``[T, 33, 2]`` with ground truth ``[T, 17, 2]``.

    Returns detection rate, mean / median 2D error (px) over the 13 directly matched joints on
    detected frames, per-frame swap rate (a frame counts as swapped when mirroring left/right
    labels of the body lowers the error of the 12 limb joints by more than half) and the torso
    length in pixels for scale."""
    n = min(len(landmarks), len(keypoints_2d))
    lm, gt = landmarks[:n], keypoints_2d[:n]
    h36 = list(BLAZEPOSE_FROM_H36M)
    bp = [BLAZEPOSE_FROM_H36M[i] for i in h36]
    det = np.isfinite(lm[:, 0, 0])
    pred = lm[:, bp]
    err = np.linalg.norm(pred - gt[:, h36], axis=-1)  # [T, 13]
    limbs = [k for k, i in enumerate(h36) if i in _SWAP_H36M]
    swapped_gt = gt[:, [_SWAP_H36M.get(i, i) for i in h36]]
    err_sw = np.linalg.norm(pred - swapped_gt, axis=-1)
    e_l, e_s = err[:, limbs].mean(1), err_sw[:, limbs].mean(1)
    swap = det & (e_s < 0.5 * e_l)
    torso = np.linalg.norm(gt[:, 8] - gt[:, 0], axis=-1)
    d = det.sum()
    return {
        "frames": float(n),
        "detection_rate": float(det.mean()) if n else 0.0,
        "mean_px": float(err[det].mean()) if d else float("nan"),
        "median_px": float(np.median(err[det])) if d else float("nan"),
        "swap_rate": float(swap.sum() / d) if d else float("nan"),
        "torso_px": float(torso.mean()) if n else float("nan"),
        **{
            f"px_{name}": float(err[det][:, k].mean()) if d else float("nan")
            for k, name in enumerate(
                ["nose", "l_sh", "r_sh", "l_el", "r_el", "l_wr", "r_wr"]
                + ["l_hip", "r_hip", "l_knee", "r_knee", "l_ank", "r_ank"]
            )
        },
    }
