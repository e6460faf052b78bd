"""Procedural chest X-ray phantoms: the built-in data set for tiny presets, demos and tests.

`make_phantom(seed, size)` draws a posteroanterior (PA) chest radiograph from analytic shapes (data/shapes.py),
white = dense, black = air, patient right on the image left. Shapes live in normalized anatomical coordinates
(u to the image right, v down, in [0, 1]; the film spans ~40 cm, so 0.01 = 4 mm), and every random choice is
drawn from np.random.default_rng(seed) before any pixel exists (`_anatomy`): anatomy and labels do not depend
on `size`, only rasterization and film grain do. Attenuation A is summed and developed as 1 - exp(-kA):
- body: trunk, arms, neck and sloping shoulders; lungs: dark fields with domed apices and bases (the
  hemidiaphragms, the right one higher over the liver), darker toward their centre; mediastinum with spine,
  trachea and carina, aortic knob; heart: a tilted ellipse, two thirds left of the midline;
- bones: posterior and fainter anterior ribs, S-shaped clavicles, humeral heads; hila and vessels fading
  toward the periphery; a gastric bubble; film blur, texture, grain, gamma, vignetting, small rotation/zoom.

Findings and labels (independent draws; a seed may have none or several):
- Cardiomegaly: cardiothoracic ratio (widest heart / widest inner thorax) > 0.5 (Danzer 1919), measured.
- Pleural Effusion: fluid fills a lung base up to a meniscus climbing the lateral wall.
- Pneumothorax: the lung collapses toward its hilum; a bright visceral pleural line, black air beyond it.
- Consolidation: a fluffy focal opacity, or a lobar one filling a lung zone up to a straight fissure;
  Pneumonia: the lobar one (labelled Consolidation and Pneumonia).
- Atelectasis: plate-like bands in a lower zone plus volume loss (that hemidiaphragm raised).
- Edema: bilateral perihilar "bat-wing" haze, diffuse haze and Kerley B lines at the bases.
The lung mask is the anatomical field of both lungs (chest wall, apices, mediastinum, heart, diaphragm),
whatever fills it; atelectatic volume loss shrinks it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from data import LABELS

from .shapes import blur, diaphragm, ellipse, hemidiaphragm, lung_sd, noise, segment, soft, texture

# Prevalences: chosen in the 10-35 % range these findings have in CheXpert/MIMIC-CXR-like sets.
P_CARDIOMEGALY, P_EFFUSION, P_PNEUMOTHORAX, P_ATELECTASIS, P_EDEMA = 0.2, 0.2, 0.13, 0.2, 0.15
P_LOBAR, P_PATCHY = 0.13, 0.14  # lobar -> Consolidation + Pneumonia, patchy -> Consolidation
CTR_LIMIT = 0.5  # cardiothoracic ratio above which a PA heart is enlarged (Danzer 1919)


class _Params(dict):
    """A dict with attribute access, for the drawn parameters."""

    __getattr__, __setattr__ = dict.__getitem__, dict.__setitem__


def _anatomy(rng):
    """Every random choice, before any pixel exists: geometry, findings (with their labels), noise grids."""
    def u(lo, hi):  # Python floats keep the float32 pixel math in float32
        return float(rng.uniform(lo, hi))

    p = _Params(rot=u(-0.04, 0.04), zoom=u(0.97, 1.1), dx=u(-0.025, 0.025), dy=u(-0.03, 0.02))
    lat, med, apex, base = u(0.36, 0.42), u(0.05, 0.065), u(0.13, 0.18), u(0.79, 0.86)
    lungs = []
    for side in (0, 1):  # 0: patient right (image left, wider, dome 1-2 cm higher over the liver), 1: left
        lung = _Params(lat=lat - side * u(0.0, 0.03), med=med + side * u(0.0, 0.015), apex=apex + u(-0.01, 0.01),
               base=base + side * u(0.01, 0.04), dome=u(0.07, 0.11), knob=side * u(0.015, 0.03))
        lung.wide = lung.apex + u(0.3, 0.4)  # level where the lung is widest
        span = lung.lat - lung.med
        lung.apx, lung.peak = lung.med + 0.4 * span, lung.med + 0.45 * span  # apex, dome peak
        lung.hy = lung.apex + u(0.36, 0.44) * (lung.base - lung.apex)  # hilum level
        lungs.append(lung)
    p.lungs, p.shoulder, p.neck = lungs, u(-0.06, 0.0), u(0.09, 0.12)
    p.trunk = max(lungs[0].lat, lungs[1].lat) + u(0.04, 0.07)
    f = _Params(ctr=u(0.53, 0.64) if rng.random() < P_CARDIOMEGALY else u(0.38, 0.48))
    if rng.random() < P_ATELECTASIS:  # plates in a lower zone + raised hemidiaphragm (volume loss)
        s = int(rng.integers(2))
        lungs[s].base -= u(0.03, 0.06)
        f.atel = (s, [(u(0.3, 0.7), u(0.55, 0.8), u(0.14, 0.24), u(-0.3, 0.3), u(0.014, 0.022))  # centre
                      for _ in range(int(rng.integers(1, 3)))])  # (across, down), length, angle, thickness
    if rng.random() < P_EFFUSION:
        sides = (0, 1) if rng.random() < 0.25 else (int(rng.integers(2)),)
        f.eff = [(s, u(0.07, 0.2), u(0.06, 0.12)) for s in sides]  # side, fluid height, meniscus rise
    if rng.random() < P_PNEUMOTHORAX:
        f.ptx = (int(rng.integers(2)), u(0.6, 0.8))  # side, linear size of the collapsed lung
    r = rng.random()
    if r < P_LOBAR:  # side, fissure position (fraction of lung height), tilt, upper (True) or lower zone
        f.lobar = (int(rng.integers(2)), u(0.4, 0.55), u(-0.1, 0.1), bool(rng.random() < 0.5))
    elif r < P_LOBAR + P_PATCHY:  # side, centre (fraction across, fraction down), radius
        f.patchy = (int(rng.integers(2)), u(0.3, 0.7), u(0.35, 0.75), u(0.08, 0.13))
    if rng.random() < P_EDEMA:
        f.edema = u(0.6, 0.9)
    # Heart: widest span = CTR * thoracic width, about a third of it right of the midline (Gray's Anatomy);
    # long axis tilted down to the patient's left.
    width, phi, hb = f.ctr * (lungs[0].lat + lungs[1].lat), u(0.4, 0.7), u(0.11, 0.135)
    ha = np.sqrt((width / 2) ** 2 - (hb * np.sin(phi)) ** 2) / np.cos(phi)  # so the widest chord = width
    hx = 0.5 - u(0.27, 0.35) * width + width / 2
    low = np.sqrt((ha * np.sin(phi)) ** 2 + (hb * np.cos(phi)) ** 2)  # centre to lowest point
    p.heart = (hx, float(hemidiaphragm(lungs[1], hx - 0.5) - low + u(0.05, 0.08)), float(ha), hb, phi)  # _ellipse args
    p.spine, p.bubble, p.marker = u(0.028, 0.036), rng.random() < 0.7, rng.random() < 0.5
    p.breast = rng.random() < 0.4
    p.ribs = (u(0.035, 0.05), u(0.056, 0.064), u(0.018, 0.024))  # first rib offset, spacing, width (~8 mm)
    p.film = (u(1.3, 1.9), u(0.85, 1.15), u(0.0, 0.25))  # response k, gamma, vignetting
    shapes = ((10, 10), (34, 34), (7, 33), (7, 33), (18, 18), (26, 26))  # texture, vessels, findings
    p.grids, p.f = [rng.standard_normal(s).astype(np.float32) for s in shapes], f
    return p


def _ctr(p):
    """Measured cardiothoracic ratio: widest heart span above the diaphragm / widest inner thorax."""
    v, u = np.mgrid[0.35:0.95:121j, 0.2:0.9:141j]  # 0.005 steps
    cols = u[(ellipse(u, v, *p.heart) > 0) & (v < diaphragm(p, u))]
    return 0.0 if cols.size == 0 else (cols.max() - cols.min()) / (p.lungs[0].lat + p.lungs[1].lat)


def _findings(p, side, lung, lateral, v, in_lung, textures, edge):
    """The findings on one side: air replaced (opac, 0..1), extra density `extra`, the visible (possibly collapsed)
    lung and the coordinates its vessels are drawn in."""
    f, opac, extra, md, mv, visible = p.f, np.zeros_like(lateral), np.zeros_like(lateral), lateral, v, in_lung
    t, q = (v - lung.apex) / (lung.base - lung.apex), np.clip((lateral - lung.med) / (lung.lat - lung.med), 0, 1)
    if "ptx" in f and f.ptx[0] == side:  # the lung collapses toward the hilum and the medial base
        k, ax, ay = f.ptx[1], lung.med + 0.03, lung.hy + 0.3 * (lung.base - lung.hy)
        md, mv = ax + (lateral - ax) / k, ay + (v - ay) / k
        visible = soft(lung_sd(lung, md, mv), edge) * in_lung
        inner = soft(lung_sd(lung, ax + (lateral - ax) / (k - 0.012), ay + (v - ay) / (k - 0.012)), edge)
        extra += 0.05 * (visible - inner) * in_lung  # the visceral pleural line
        opac += 0.25 * visible
    if "atel" in f and f.atel[0] == side:  # plate-like bands
        for q0, t0, ln, a0, th in f.atel[1]:
            x0, y0 = lung.med + q0 * (lung.lat - lung.med), lung.apex + t0 * (lung.base - lung.apex)
            band = segment(lateral, v, x0, y0, ln, a0, th)
            opac += 0.9 * in_lung * soft(band, 2 * edge)
    for es, h, rise in f.get("eff", []):
        if es == side:  # fluid up to a meniscus that climbs the lateral wall
            wet = in_lung * soft(v - (lung.base - h - rise * q**3), 0.02)
            opac, extra = opac + wet, extra + 0.03 * wet
    if "lobar" in f and f.lobar[0] == side:  # a lung zone filled up to a straight fissure
        _, tf, tilt, upper = f.lobar
        sdf = (tf - t) + tilt * (q - 0.5)  # > 0 above the fissure
        opac += in_lung * soft(sdf if upper else -sdf, 2 * edge) * (0.85 + 0.1 * np.tanh(textures[1]))
    if "patchy" in f and f.patchy[0] == side:  # a fluffy focal opacity
        _, q0, t0, rad = f.patchy
        cx, cy = lung.med + q0 * (lung.lat - lung.med), lung.apex + t0 * (lung.base - lung.apex)
        blob = soft(ellipse(lateral, v, cx, cy, rad, 0.8 * rad) + 0.02 * textures[1], 0.06)
        opac += in_lung * np.clip(1.6 * blob, 0, 1) * (0.75 + 0.2 * np.tanh(textures[0]))
    if "edema" in f:  # perihilar bat wings, diffuse haze, Kerley B lines at the lateral bases
        bat = np.exp(-(((lateral - lung.med - 0.08) / 0.16) ** 2 + ((v - lung.hy) / 0.15) ** 2))
        kv = v * 60 - np.floor(v * 60)  # Kerley B: short horizontal septal lines ~7 mm apart
        kerley = soft(0.004 - np.abs(kv - 0.5) / 60, edge) * soft(0.035 - (lung.lat - lateral), 0.01)
        kerley *= soft(t - 0.55, 0.05)
        opac += in_lung * (f.edema * (bat * (0.75 + 0.25 * np.tanh(textures[0])) + 0.25) + 0.7 * kerley)
    return opac, extra, md, mv, visible


def _body(p, u, v, mid_dist, edge):
    """Soft tissue: trunk and arms below the sloping shoulders, the neck, abdomen and breast shadows.
    Returns the attenuation so far, the body and below-diaphragm indicators and the diaphragm height."""
    sh = p.shoulder + 0.1 * np.sqrt(np.clip((mid_dist - p.neck) / 0.3, 0, 1))  # trapezius slope ...
    sh += 4 * np.maximum(mid_dist - p.trunk, 0) ** 2  # ... rounding over the shoulder joints
    body = np.maximum(np.minimum(p.trunk + 0.2 - mid_dist, v - sh), p.neck - mid_dist)  # trunk + arms, neck
    thick = np.sqrt(np.clip(1 - (mid_dist / (p.trunk + 0.03)) ** 2, 0, 1))  # thicker in the middle and at the top
    inbody, trunk = soft(body, 0.02), soft(p.trunk - mid_dist, 0.03)
    atten = 0.03 + inbody * (0.21 + trunk * (0.04 + 0.1 * thick) + 0.06 * np.exp(-np.maximum(v - sh, 0) / 0.1))
    dia = diaphragm(p, u)
    below = soft(v - dia, edge)
    atten += 0.04 * below * trunk  # abdomen (liver, spleen) below the domes
    if p.breast:  # breast shadows over the lower zones
        for sg in (-1, 1):
            atten += 0.04 * soft(ellipse(u, v, 0.5 + sg * 0.27, p.lungs[0].base - 0.06, 0.18, 0.13), 0.03)
    return atten, inbody, below, dia


def _lung_field(p, side, lung, lateral, v, sd, in_lung, ty, tx, fine, edge):
    """Inside one lung's bounding box: air (darker mid-lung), parenchymal texture, findings and vessels.
    Returns the box, the attenuation change there and how clear (unopacified) the lung is."""
    rows, cs = np.flatnonzero(in_lung.any(1)), np.flatnonzero(in_lung.any(0))
    box = (slice(rows[0], rows[-1] + 1), slice(cs[0], cs[-1] + 1))
    box_lateral, box_v, box_lung, ty, tx = lateral[box], v[box], in_lung[box], ty[box[0]], tx[box[1]]
    textures = [texture(g, ty, tx) for g in p.grids[4:]] if {"lobar", "patchy", "edema"} & set(p.f) else None
    opac, extra, md, mv, visible = _findings(p, side, lung, box_lateral, box_v, box_lung, textures, edge)
    opac = np.clip(opac, 0, 1)
    # Vessels: ridges of angular noise around the hilum, thinning and fading toward the periphery.
    hx, hy = md - lung.med - 0.03, mv - lung.hy
    rr = np.sqrt(hx * hx + hy * hy)
    ang = 0.5 + 0.5 * hy / (np.abs(hx) + np.abs(hy) + 1e-6)  # a cheap monotonic stand-in for the angle
    ridge = np.clip(1 - np.abs(noise(p.grids[2 + side], ang, rr * 1.6)) * (2 + 25 * rr), 0, 1) ** 2
    vessels = visible * (ridge * np.exp(-rr / 0.22) + 0.8 * np.exp(-((rr / 0.05) ** 2)))
    extra += (0.11 * (1 - opac) - 0.03 * np.clip(opac - 0.5, 0, 0.5)) * vessels  # air bronchograms in opacity
    depth = np.sqrt(np.clip(sd[box] / 0.1, 0, 1))  # more air in the middle of a lung than at its edges
    extra -= box_lung * ((1 - opac) * (0.26 * depth - 0.012 * texture(fine, ty, tx))) + 0.04 * (box_lung - visible)
    return box, extra, box_lung * (1 - opac)


def _chest_wall(p, lung, lateral, v, dia, clear, edge):
    """Bones over one side: posterior ribs rise from the spine, then curve down the chest wall (lower ones
    more); fainter anterior ribs slope down medially; the clavicle and humeral head. Bone shows more over
    air (`clear`) than over soft tissue."""
    off, gap, th = p.ribs
    qq = np.clip(lateral / lung.lat, 0, 1.2)
    ph = (v - lung.apex + off - lung.lat * (-0.3 * qq + 0.6 * qq**3) * (0.75 + 0.04 * (v - lung.apex) / gap)) / gap
    dist = np.abs(ph - np.floor(ph) - 0.5) * gap
    rib = soft(th / 2 - dist, edge) * (ph > 0) * (ph < 11)  # ~10 above the dome at full inspiration
    cortex = rib - soft(th / 2 - 0.005 - dist, edge)
    wall = soft(lateral - 0.03, 0.01) * soft(lung.lat + 0.03 - lateral, 0.015) * soft(dia + 0.02 - v, 0.04)
    ant = (v - lung.apex - 0.12 - 0.5 * np.clip(lung.lat - lateral, 0, 1)) / gap
    ant_rib = soft(0.22 - np.abs(ant - np.floor(ant) - 0.5), 0.06) * (ant > 0) * (ant < 5)
    ant_rib *= soft(lateral - 0.5 * lung.lat, 0.05)  # the costal cartilage of the medial half does not show
    bone = wall * (0.3 + 0.7 * clear) * (0.02 * rib + 0.03 * cortex + 0.02 * ant_rib)
    cq = np.clip((lateral - 0.035) / (lung.lat + 0.06), 0, 1)
    cd = np.abs(v - lung.apex - 0.06 + 0.07 * cq - 0.012 * np.sin(2 * math.pi * cq))  # S-shaped clavicle
    clav = np.minimum(np.minimum(0.013 - cd, lateral - 0.035), lung.lat + 0.09 - lateral)
    clavicle = soft(clav, 2 * edge) * (0.04 + 0.03 * soft(cd - 0.008, edge))
    humerus = 0.08 * soft(ellipse(lateral, v, lung.lat + 0.13, lung.apex + 0.03, 0.065, 0.07), 2 * edge)
    return bone, clavicle, humerus


def _mediastinum(p, u, v, mid_dist, heart, below, inbody, edge):
    """The central band's attenuation change: mediastinum, spine (bodies, disc spaces, pedicles), trachea
    and main bronchi."""
    medi = soft(p.lungs[0].med + 0.015 - mid_dist, 0.02) * soft(v - p.lungs[0].apex, 0.08) * (1 - below)
    sp, vp = p.spine, v / 0.05 - np.floor(v / 0.05)
    ped = soft(0.01 - np.sqrt((mid_dist - 0.7 * sp) ** 2 + (0.05 * (vp - 0.35)) ** 2), 2 * edge)
    spine = soft(sp - mid_dist, 2 * edge) * (0.02 - 0.008 * soft(0.1 - np.abs(vp - 0.9), edge)) + 0.008 * ped
    carina = p.lungs[1].hy - 0.07
    air = np.minimum(0.017 - np.abs(u - 0.503), carina - v)
    for sg in (-1, 1):
        air = np.maximum(air, segment(u, v, 0.5 + sg * 0.04, carina + 0.03, 0.09, -sg * 0.9, 0.022))
    return spine + 0.09 * np.maximum(medi - heart, 0) - 0.07 * soft(air, 2 * edge) * (1 - heart) * inbody


def _film(p, rng, atten, x, y, size):
    """Blur, grain, response curve 1 - exp(-kA), gamma, vignetting -> uint8."""
    k, gamma, vig = p.film
    atten = blur(atten, 0.0028 * size) + 0.007 * rng.standard_normal(atten.shape, dtype=np.float32)
    img = (1 - np.exp(-k * np.clip(atten, 0, None))) / (1 - math.exp(-k * 0.7))
    img = np.clip(img, 0, 1) ** gamma * (1 - vig * ((x - 0.5) ** 2 + (y - 0.5) ** 2))
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def make_phantom(seed: int, size: int = 256):
    """One phantom CXR: (image uint8 [size, size], lung_mask bool [size, size], labels {label: 0/1})."""
    if not 32 <= size <= 4096:
        raise ValueError(f"make_phantom: size must be in [32, 4096] pixels, got {size}")
    rng = np.random.default_rng(seed)
    p = _anatomy(rng)
    f, edge = p.f, max(0.003, 1.0 / size)  # edge ramp, ~1 px at 256 and the same anatomy-relative blur above
    y, x = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    c, s = math.cos(p.rot), math.sin(p.rot)
    xs, ys = (x - 0.5 - p.dx) / p.zoom, (y - 0.5 - p.dy) / p.zoom
    u, v = 0.5 + c * xs + s * ys, 0.5 - s * xs + c * ys  # anatomical coordinates of every pixel
    mid_dist = np.abs(u - 0.5)
    atten, inbody, below, dia = _body(p, u, v, mid_dist, edge)
    heart_sd = ellipse(u, v, *p.heart)
    heart = soft(heart_sd, 2 * edge) * (1 - below)
    knots = (np.arange(34, dtype=np.float32) + 0.5) / 34
    fine = p.grids[1] + 0.8 * texture(p.grids[0], knots, knots)  # two octaves of parenchymal texture
    # Each side on its half of the image (the midline column +- a margin for rotation and zoom), and the
    # lung's own work (interior, vessels, findings) only inside the lung's bounding box.
    field, pixel_t = np.zeros_like(u), (np.arange(size, dtype=np.float32) + 0.5) / size
    mid, pad = int((0.5 + p.dx) * size), int(0.04 * size) + 2
    for side, lung in enumerate(p.lungs):
        cols = slice(0, mid + pad) if side == 0 else slice(max(mid - pad, 0), size)
        us, vs = u[:, cols], v[:, cols]
        lateral = us - 0.5 if side else 0.5 - us  # distance from the midline toward this lung's side
        sd = np.minimum(lung_sd(lung, lateral, vs), -heart_sd[:, cols])
        in_lung, extra, clear = soft(sd, edge), np.zeros_like(us), np.zeros_like(us)
        box, extra_box, clear_box = _lung_field(p, side, lung, lateral, vs, sd, in_lung, pixel_t, pixel_t[cols],
                                                fine, edge)
        extra[box], clear[box] = extra_box, clear_box
        for bone in _chest_wall(p, lung, lateral, vs, dia[:, cols], clear, edge):  # ribs, clavicle, humerus
            extra += bone
        atten[:, cols] += extra  # everything above is 0 within 0.03 of the midline, so the halves add up
        field[:, cols] += in_lung
    atten += 0.09 * heart
    central = slice(max(mid - int(0.15 * size), 0), mid + int(0.15 * size))
    band = [a[:, central] for a in (u, v, mid_dist, heart, below, inbody)]
    atten[:, central] += _mediastinum(p, *band, edge)
    if p.bubble:  # gastric air under the left dome
        left = p.lungs[1]
        atten -= 0.07 * soft(ellipse(u, v, 0.5 + left.peak, hemidiaphragm(left, left.peak) + 0.06, 0.05, 0.03), 0.01)
    if p.marker:  # lead "L" side marker beside the patient's left shoulder
        stem = np.minimum(0.008 - np.abs(x - 0.86), 0.025 - np.abs(y - 0.1))
        foot = np.minimum(0.018 - np.abs(x - 0.87), 0.005 - np.abs(y - 0.12))
        atten += 0.5 * soft(np.maximum(stem, foot), edge)
    found = {"Atelectasis": "atel" in f, "Cardiomegaly": _ctr(p) > CTR_LIMIT, "Edema": "edema" in f,
             "Consolidation": "lobar" in f or "patchy" in f, "Pleural Effusion": "eff" in f,
             "Pneumonia": "lobar" in f, "Pneumothorax": "ptx" in f}
    return _film(p, rng, atten, x, y, size), field > 0.5, {k: int(found[k]) for k in LABELS}


def phantom_grid(n: int = 4, size: int = 256, seed: int = 0, make=None) -> np.ndarray:
    """An n x n mosaic of phantoms seed, seed+1, ... of `make` (default make_phantom): uint8 [n*size, n*size(, 3)]."""
    tiles = [(make or make_phantom)(seed + i, size)[0] for i in range(n * n)]
    return np.concatenate([np.concatenate(tiles[r * n:(r + 1) * n], 1) for r in range(n)], 0)


def phantom_cli(argv, make, label_names, name: str, what: str):
    """`python -m data.phantom` / `python -m data.colour_phantom`: write `images/NAME_SEED.png`,
    `masks/NAME_SEED.png` (255 = lung or lesion) and `labels.csv` (path, mask, one 0/1 column per label; paths
    relative to the CSV's folder) for phantoms `make(seed, size)` of seeds --seed .. --seed + n - 1."""
    from tqdm import tqdm

    import cli
    import hub

    ap = cli.ArgumentParser(prog=f"python -m data.{name}", formatter_class=cli.HelpFormatter,
                            description=f"Write {what}, their masks and labels.")
    ap.add_argument("--out", required=True, help="output folder (images/, masks/, labels.csv)")
    ap.add_argument("-n", type=cli.nonneg_int, default=100, help="number of phantoms")
    ap.add_argument("--size", type=cli.number(int, 32, 4096), default=256, help="side in pixels, 32 to 4096")
    ap.add_argument("--seed", type=cli.nonneg_int, default=0, help="phantom i uses seed + i; train.py trains on "
                    "seeds 0 .. phantom_count-1 and holds out 10000000 + i, so e.g. 5000000 gives unseen phantoms")
    ap.add_argument("--grid", help="also write a 4x4 example mosaic PNG to this path (default: none)")
    args = ap.parse_args(argv)
    out, rows = Path(args.out), []
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(args.n), desc=name):
        image, mask, labels = make(args.seed + i, args.size)
        file = f"{name}_{args.seed + i:06d}.png"
        Image.fromarray(image).save(out / "images" / file)
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / file)
        rows.append({"path": f"images/{file}", "mask": f"masks/{file}", **labels})
    hub.write_csv_atomic(out / "labels.csv", rows, ["path", "mask", *label_names])
    if args.grid:
        Image.fromarray(phantom_grid(4, args.size, args.seed, make)).save(args.grid)


def main(argv=None):
    phantom_cli(argv, make_phantom, LABELS, "phantom", "procedural phantom chest X-rays")


if __name__ == "__main__":
    from cli import main_guard

    main_guard(main)
