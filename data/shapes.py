"""Analytic shapes the phantoms (data/phantom.py) are drawn from, in normalized coordinates (u, v in [0, 1]).

Generic: `soft` (an anti-aliased indicator of a signed distance), `noise` / `texture` (smooth value noise at
points / on a raster), `blur` (separable Gaussian), `ellipse` and `segment` (signed distances).
Lungs: `lung_sd` (a lung's outline), `hemidiaphragm` (one dome), `diaphragm` (both, blended at the midline);
a lung's parameters are the attributes `_anatomy` draws (lat, med, apex, base, dome, knob, wide, apx, peak, hy).
"""

from __future__ import annotations

import math

import numpy as np


def soft(sd, w):
    """Anti-aliased indicator of sd > 0 (sd: a signed distance, > 0 inside), ramp width w."""
    return np.clip(sd / w + 0.5, 0.0, 1.0)


def noise(g, u, v):
    """Smooth value noise: the random grid g [ny+1, nx+1] over [0,1]^2, smoothstep-interpolated at (u, v)."""
    ny, nx = g.shape[0] - 1, g.shape[1] - 1
    x, y = np.clip(u, 0, 0.9999) * nx, np.clip(v, 0, 0.9999) * ny
    i, j = x.astype(np.int32), y.astype(np.int32)
    fx, fy = x - i, y - j
    fx, fy, g, k = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy), g.ravel(), j * (nx + 1) + i
    top = g.take(k) * (1 - fx) + g.take(k + 1) * fx
    return top * (1 - fy) + (g.take(k + nx + 1) * (1 - fx) + g.take(k + nx + 2) * fx) * fy


def texture(g, ty, tx):
    """The same value noise on the raster of 1-D pixel coordinates ty, tx in [0, 1]; separable, so cheap."""
    def knots(t):
        t = np.clip(t, 0, 0.9999) * (g.shape[0] - 1)
        i = t.astype(np.int32)
        return i, (t - i) * (t - i) * (3 - 2 * (t - i))

    (i, f), (j, h) = knots(ty), knots(tx)
    rows = g[i] * (1 - f)[:, None] + g[i + 1] * f[:, None]
    return rows[:, j] * (1 - h) + rows[:, j + 1] * h


def blur(img, sigma):
    """Separable Gaussian blur (sigma in pixels) as a sum of shifted copies, edges replicated."""
    if sigma < 0.2:
        return img
    r, n = int(np.ceil(3 * sigma)), img.shape[0]
    w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    a = np.pad(img, ((r, r), (0, 0)), mode="edge")
    img = sum(wi * a[i:i + n] for i, wi in enumerate(w / w.sum()))
    a = np.pad(img, ((0, 0), (r, r)), mode="edge")
    return sum(wi * a[:, i:i + n] for i, wi in enumerate(w / w.sum()))


def ellipse(u, v, cx, cy, a, b, phi=0.0):
    """Approximate signed distance to a rotated ellipse (semi-axes a, b; phi rotates a toward +v)."""
    c, s = math.cos(phi), math.sin(phi)
    x, y = (u - cx) * c + (v - cy) * s, -(u - cx) * s + (v - cy) * c
    return (1 - np.sqrt((x / a) ** 2 + (y / b) ** 2)) * min(a, b)


def segment(u, v, x0, y0, length, angle, thick):
    """Signed distance to a straight band (a capsule) centred at (x0, y0)."""
    c, s = math.cos(angle), math.sin(angle)
    t, n = (u - x0) * c + (v - y0) * s, -(u - x0) * s + (v - y0) * c
    return thick / 2 - np.hypot(np.maximum(np.abs(t) - length / 2, 0), n)


def hemidiaphragm(lung, lateral):
    """Hemidiaphragm height at distance `lateral` from the midline: a dome peaking mid-lung, falling to
    lung.base at the wall."""
    w0 = 1.6 * (lung.peak - lung.med)  # medial half-width of the dome: it slopes gently toward the heart
    w = np.float32(w0) + np.float32(lung.lat - lung.peak - w0) * (lateral > lung.peak)
    return lung.base - lung.dome * np.clip(1 - ((lateral - lung.peak) / w) ** 2, 0, 1)


def lung_sd(lung, lateral, v):
    """Signed horizontal distance to a lung's outline (> 0 inside); lateral: distance from the midline to its side.

    Elliptic lateral and medial walls rise to a rounded apex (which sits over the medial third), the lateral
    wall bows in a little toward the base, the mediastinum bounds it medially and the hemidiaphragm below."""
    h = np.clip((v - lung.apex) / (lung.wide - lung.apex), 0, 1)
    hm = np.clip(2 * (v - lung.apex) / (lung.wide - lung.apex), 0, 1)
    lat = lung.apx + (lung.lat - lung.apx) * np.sqrt(1 - (1 - h) ** 2) - 0.35 * np.maximum(v - lung.wide, 0) ** 2
    med = lung.apx - (lung.apx - lung.med) * np.sqrt(1 - (1 - hm) ** 2)
    bulge = np.exp(-(((v - lung.apex - 0.13) / 0.035) ** 2)) + 0.6 * np.exp(-(((v - lung.hy + 0.03) / 0.04) ** 2))
    med = med + lung.knob * bulge  # aortic knob and pulmonary trunk indent the left lung
    dome = hemidiaphragm(lung, lateral)
    return np.minimum(np.minimum(lat - lateral, lateral - med), np.minimum(dome - v, v - lung.apex))


def diaphragm(p, u):
    """Diaphragm height across the whole width, the two domes blended at the midline."""
    w = np.clip(0.5 - (u - 0.5) / 0.08, 0, 1)
    return w * hemidiaphragm(p.lungs[0], 0.5 - u) + (1 - w) * hemidiaphragm(p.lungs[1], u - 0.5)
