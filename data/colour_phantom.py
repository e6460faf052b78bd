"""Built-in colour phantoms: endoscopy-like frames with one coloured lesion and its mask (`--channels 3`).

The grey phantoms (data/phantom.py) let the CXR presets run offline; these do the same for colour modalities.
A frame is drawn like what a colonoscope shows, in normalized coordinates (u, v in [0, 1]):
- the scope's round field of view, black outside (a soft edge);
- mucosa: a tissue colour with two octaves of smooth texture, darker redder vessels, the light of the scope's
  tip falling off from a point near the centre, and the dark lumen (the bowel's continuation) somewhere;
- one lesion, which is the mask: a polyp (a raised, paler dome, lit from the front) or an ulcer (a whitish-
  yellow fibrin base inside a red rim); a third of the frames also show bleeding (dark red spots);
- a few specular highlights (saturated white), as the wet mucosa reflects the light.
Colour carries information here, as in real endoscopy: two thirds of the frames are white light (pink-red
mucosa, red dominant) and a third narrow-band imaging, NBI (blue and green light only: teal mucosa, brown
vessels), so a model that lost colour could not tell them apart. Labels: polyp, ulcer, bleeding, nbi (0/1).
"""

from __future__ import annotations

import numpy as np

from .shapes import texture

COLOUR_LABELS = ("polyp", "ulcer", "bleeding", "nbi")
# Mucosa and vessel colours (RGB in [0, 1]), picked by eye from public colonoscopy frames (white light, NBI)
MUCOSA = {False: (0.85, 0.42, 0.36), True: (0.30, 0.62, 0.58)}
VESSEL = {False: (0.55, 0.12, 0.12), True: (0.40, 0.25, 0.12)}


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise [size, size] in [0, 1] (shapes.texture) on a random (cells+1)^2 grid."""
    pixels = (np.arange(size, dtype=np.float32) + 0.5) / size
    return texture(rng.random((cells + 1, cells + 1), dtype=np.float32), pixels, pixels)


def _blob(u, v, cx, cy, r):
    """Gaussian bump of radius r at (cx, cy)."""
    return np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / (2 * r * r))


def _lesion(rng, u, v, nbi: bool, edge: float):
    """-> (mask [S, S] bool, colour [S, S, 3], weight [S, S] in [0, 1], kind): one polyp or ulcer."""
    ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.25)
    cx, cy = 0.5 + dist * np.cos(ang), 0.5 + dist * np.sin(ang)
    a, b, phi = rng.uniform(0.07, 0.16), rng.uniform(0.06, 0.13), rng.uniform(0, np.pi)
    c, s = np.cos(phi), np.sin(phi)
    x, y = (u - cx) * c + (v - cy) * s, -(u - cx) * s + (v - cy) * c
    r = np.sqrt((x / a) ** 2 + (y / b) ** 2)  # 1 on the outline
    weight = np.clip((1 - r) * min(a, b) / edge + 0.5, 0, 1)
    kind = "polyp" if rng.random() < 0.6 else "ulcer"
    mucosa = np.array(MUCOSA[nbi], np.float32)
    if kind == "polyp":  # a dome: paler than the mucosa, brighter where it faces the light
        dome = np.sqrt(np.clip(1 - r * r, 0, 1))[..., None]
        colour = (mucosa * 0.8 + 0.2) * (0.75 + 0.45 * dome) * rng.uniform(0.9, 1.1)
    else:  # fibrin base (whitish yellow) inside a red rim
        base = np.array((0.88, 0.82, 0.55) if not nbi else (0.70, 0.80, 0.62), np.float32)
        rim = np.array(VESSEL[nbi], np.float32) * 1.3
        colour = np.where((r < 0.65)[..., None], base, rim) * (1 + 0.1 * (rng.random() - 0.5))
    return weight > 0.5, colour.astype(np.float32), weight, kind


def make_colour_phantom(seed: int, size: int = 256):
    """One colour phantom frame: (image uint8 [size, size, 3], lesion mask bool [size, size], labels)."""
    if not 32 <= size <= 4096:
        raise ValueError(f"make_colour_phantom: size must be in [32, 4096] pixels, got {size}")
    rng = np.random.default_rng(seed)
    v, u = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    edge = max(0.003, 1.0 / size)
    nbi = bool(rng.random() < 1 / 3)
    tissue = np.array(MUCOSA[nbi], np.float32) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    texture = 0.6 * _noise(rng, size, 5) + 0.4 * _noise(rng, size, 17)
    img = tissue * (0.8 + 0.4 * texture)[..., None]  # [S, S, 3]
    vessels = np.clip(1 - np.abs(_noise(rng, size, 9) - 0.5) / 0.03, 0, 1) * 0.7
    img = img * (1 - vessels[..., None]) + np.array(VESSEL[nbi], np.float32) * vessels[..., None]
    mask, colour, weight, kind = _lesion(rng, u, v, nbi, edge)
    img = img * (1 - weight[..., None]) + colour * weight[..., None]
    bleeding = bool(rng.random() < 1 / 3)
    if bleeding:  # dark red spots near the lesion and elsewhere
        spots = sum(_blob(u, v, *rng.uniform(0.2, 0.8, 2), rng.uniform(0.01, 0.03)) for _ in range(rng.integers(2, 6)))
        spots = np.clip(spots, 0, 1)[..., None]
        img = img * (1 - spots) + np.array((0.35, 0.03, 0.04), np.float32) * spots
    lx, ly = 0.5 + rng.uniform(-0.1, 0.1, 2)
    light = np.clip(1.15 - 1.6 * ((u - lx) ** 2 + (v - ly) ** 2), 0.25, 1.15)
    ang = rng.uniform(0, 2 * np.pi)
    lumen = _blob(u, v, 0.5 + 0.3 * np.cos(ang), 0.5 + 0.3 * np.sin(ang), rng.uniform(0.06, 0.12))
    img = img * (light * (1 - 0.85 * lumen))[..., None]
    glints = sum(_blob(u, v, *rng.uniform(0.15, 0.85, 2), rng.uniform(0.004, 0.012)) for _ in range(rng.integers(2, 6)))
    img = img + np.clip(glints, 0, 1)[..., None]
    fov = np.clip((0.47 - np.sqrt((u - 0.5) ** 2 + (v - 0.5) ** 2)) / edge + 0.5, 0, 1)
    image = np.rint(np.clip(img * fov[..., None], 0, 1) * 255).astype(np.uint8)
    labels = {"polyp": int(kind == "polyp"), "ulcer": int(kind == "ulcer"), "bleeding": int(bleeding),
              "nbi": int(nbi)}
    return image, mask & (fov > 0.5), labels


if __name__ == "__main__":  # python -m data.colour_phantom: data/phantom.py's CLI with the colour maker
    from functools import partial

    from cli import main_guard
    from data.phantom import phantom_cli

    main_guard(partial(phantom_cli, make=make_colour_phantom, label_names=COLOUR_LABELS, name="colour_phantom",
                       what="endoscopy-like RGB phantoms"))
