"""Lung Dice of a zero-shot label map: deciding which unlabeled segments are "the lung".

DiffSeg (diffseg.py) splits an image into K segments with no names; the ground truth (GT) is one binary
lung mask. A rule must pick the lung segments before Dice can be computed. Three rules, for one image [H, W]:

1. `best_union_dice` (oracle upper bound): the union of segments with the highest Dice against GT. With
   a_k = |S_k & GT|, s_k = |S_k| and G = |GT|, the segments being disjoint, a union U scores
   Dice(U) = 2 A(U) / (S(U) + G). If U* is optimal with value d*, adding a segment k changes the
   value by the sign of 2 a_k - d* s_k and removing it by the opposite sign, so U* holds every segment with
   precision a_k / s_k > d* / 2 and none below: the optimum is a PREFIX of the segments sorted by precision.
   Scoring the K + 1 prefixes is therefore exact in O(K log K); no 2^K search or greedy heuristic is needed
   (the tests check it against brute-force enumeration).
2. `nms_dice`: DiNO-Diffusion (Sec. 2.4.4) says only that "candidate masks were evaluated by their Dice
   score and selected via non-maximum suppression"; its code is not public. Our reading, stated precisely:
   candidates = the K segments, ranked by the fraction of their pixels inside GT (precision, ties: more lung
   pixels, then lower label); walk the ranking and keep each candidate whose fraction exceeds `min_overlap`
   (0.5: a majority of its pixels are lung); the first one at or below it suppresses itself and every later
   one. The lung mask is the union of the kept segments. Segments of a label map are disjoint, so NMS's
   usual IoU suppression between kept candidates never fires and the rule equals per-segment majority voting.
   It is rule 1 with the cutoff min_overlap instead of d* / 2, hence never better than rule 1.
3. `hungarian_dice`: the DiffSeg benchmark protocol (google/diffseg, diffseg/utils.py `hungarian_matching`,
   after PiCIE): per image the histogram hist[c, k] = |GT_c & S_k| for the classes c in {background, lung};
   the assignment maximising the matched total gives each class one distinct segment (the rest stay
   unmatched) and the lung prediction is the segment matched to lung (two classes: a tiny exact rule).
   `criterion="iou"` matches on |GT_c & S_k| / |GT_c | S_k| instead. A GT class with no pixel is left out.

Also here: `mask_baselines` (image-blind reference scores) and `overlay` (a label map drawn in colour over
the CXR with the GT lung contour, segment.py's overlays).

Empty GT (no lung pixel) is accepted with a warning: every rule then selects no segment, and the empty
prediction scores 1.0 by `eval.metrics.dice`'s both-empty convention.
"""

from __future__ import annotations

import colorsys
import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from eval.metrics import dice


class Selection(NamedTuple):
    dice: float
    segments: tuple[int, ...]  # label values forming the predicted lung
    mask: torch.Tensor  # bool [H, W], the union of those segments


def _segments(labels, gt):
    """-> labels, gt (bool), ids [K], inverse [H*W], s_k [K] (pixels), a_k [K] (lung pixels), G."""
    labels, gt = torch.as_tensor(labels), torch.as_tensor(gt)
    if labels.shape != gt.shape or labels.ndim != 2:
        raise ValueError(f"labels {list(labels.shape)} and gt {list(gt.shape)} must be two [H, W] maps of "
                         "the same shape (diffseg(out_size=...) gives the label map the image size)")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer label map, got dtype {labels.dtype}")
    if gt.dtype != torch.bool:
        if not torch.all((gt == 0) | (gt == 1)):
            raise ValueError("gt must be a binary mask (bool or 0/1); threshold it first, e.g. mask > 127 "
                             "for a 0/255 PNG")
        gt = gt.bool()
    ids, inverse = torch.unique(labels.reshape(-1), return_inverse=True)
    sizes = torch.bincount(inverse, minlength=len(ids))
    inside = torch.bincount(inverse[gt.reshape(-1)], minlength=len(ids))
    g = int(gt.sum())
    if g == 0:
        warnings.warn("gt lung mask is empty: no segment is selected and the empty prediction scores 1.0",
                      stacklevel=3)
    return labels, gt, ids, sizes, inside, g


def _select(labels, gt, ids, chosen) -> Selection:
    chosen = sorted(int(ids[k]) for k in chosen)
    mask = torch.isin(labels, torch.tensor(chosen, dtype=labels.dtype, device=labels.device))
    return Selection(float(dice(mask, gt)), tuple(chosen), mask)


def _precision_order(sizes, inside) -> list[int]:
    """Segment indices by precision a_k / s_k, descending; ties: more lung pixels, then lower label."""
    return sorted(range(len(sizes)), key=lambda k: (-int(inside[k]) / int(sizes[k]), -int(inside[k]), k))


def best_union_dice(labels, gt) -> Selection:
    """The union of segments with the highest Dice vs gt (exact, module docstring). Ties: fewer segments."""
    labels, gt, ids, sizes, inside, g = _segments(labels, gt)
    order = _precision_order(sizes, inside)
    best, best_n, a, s = (1.0 if g == 0 else 0.0), 0, 0, 0  # the empty union first
    for n, k in enumerate(order, 1):
        a, s = a + int(inside[k]), s + int(sizes[k])
        d = 2 * a / (s + g)
        if d > best:
            best, best_n = d, n
    return _select(labels, gt, ids, order[:best_n])


def nms_dice(labels, gt, min_overlap: float = 0.5) -> Selection:
    """Keep segments, by descending fraction inside gt, while it exceeds min_overlap (module docstring, 2)."""
    labels, gt, ids, sizes, inside, g = _segments(labels, gt)
    kept = []
    for k in _precision_order(sizes, inside):
        if int(inside[k]) / int(sizes[k]) <= min_overlap:
            break  # this and every later candidate are suppressed
        kept.append(k)
    return _select(labels, gt, ids, kept)


def hungarian_dice(labels, gt, criterion: str = "overlap") -> Selection:
    """Match {background, lung} to distinct segments maximising overlap (or IoU); Dice of the lung's match.

    With two classes the optimal assignment needs no general Hungarian algorithm: each class wants its best
    segment (a for background, b for lung; first maximum); if they differ, that is the optimum. If both want
    the same one, the class that loses less by moving takes its best other segment j (the cheapest move over
    all j; ties: lung moves); with no other segment, the class with the larger score keeps it (ties:
    background). An optimal assignment, as scipy's `linear_sum_assignment(hist, maximize=True)` (tested), with
    ties resolved as the general Hungarian algorithm it replaces (Kuhn-Munkres, rows added in class order).
    """
    labels, gt, ids, sizes, inside, g = _segments(labels, gt)
    hist = torch.stack([sizes - inside, inside]).double()  # [2 classes, K segments]
    if criterion == "iou":
        hist = hist / (hist.sum(1, keepdim=True) + sizes.double()[None] - hist)
    elif criterion != "overlap":
        raise ValueError(f"criterion must be 'overlap' or 'iou', got {criterion!r}")
    bg, lung = hist.tolist()
    best = {name: max(range(len(row)), key=row.__getitem__) for name, row in (("bg", bg), ("lung", lung))}
    if g == 0:  # no lung pixel: lung is not matched
        return _select(labels, gt, ids, [])
    if g == labels.numel() or best["bg"] != best["lung"]:  # no background pixel, or no conflict
        return _select(labels, gt, ids, [best["lung"]])
    a = best["bg"]
    others = [j for j in range(len(bg)) if j != a]
    if not others:
        return _select(labels, gt, ids, [a] if lung[a] > bg[a] else [])
    j = min(others, key=lambda j: min(lung[a] - lung[j], bg[a] - bg[j]))  # the cheapest move, first minimum
    return _select(labels, gt, ids, [a] if bg[a] - bg[j] < lung[a] - lung[j] else [j])


RULES = {"best_union": best_union_dice, "nms": nms_dice, "hungarian": hungarian_dice}  # name -> rule


def lung_scores(labels, gt) -> dict:
    """All three rules on one image -> {"dice_best_union", "dice_nms", "dice_hungarian", "num_segments"}."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the empty-gt warning, once below instead of three times
        scores = {f"dice_{name}": rule(labels, gt).dice for name, rule in RULES.items()}
    if not torch.as_tensor(gt).bool().any():
        warnings.warn("gt lung mask is empty: every rule selects nothing and scores 1.0", stacklevel=2)
    scores["num_segments"] = len(torch.unique(torch.as_tensor(labels)))
    return scores


def mask_baselines(masks) -> dict[str, torch.Tensor]:
    """Per-image Dice of two segmenters that never look at the image, for masks bool [N, H, W] -> {name: [N]}.

    `all_foreground`: every pixel is lung (Dice = 2|GT| / (|GT| + HW), i.e. it rewards large lungs).
    `prior`: a fixed lung-shaped mask, the pixel-wise mean of the OTHER N - 1 masks thresholded at 0.5
    (leave-one-out, so an image's own mask never helps it); needs N >= 2.
    A segmenter that cannot beat `prior` has learned nothing about the particular image.
    """
    m = torch.as_tensor(masks).bool()
    if m.ndim != 3 or len(m) < 2:
        raise ValueError(f"mask_baselines: expected masks [N >= 2, H, W], got shape {list(m.shape)}")
    f = m.double()
    prior = (f.sum(0) - f) / (len(m) - 1) >= 0.5  # [N, H, W]: leave-one-out mean mask
    return {"all_foreground": dice(torch.ones_like(m), m), "prior": dice(prior, m)}


def block_partition(num_segments: int, height: int, width: int) -> torch.Tensor:
    """An image-blind label map [H, W] of about `num_segments` equal square-ish blocks (side round(sqrt(K))).

    The fair baseline for the GT-selected rules: with K small segments, majority voting (nms_dice) or the
    oracle union can trace the GT at the segments' resolution whatever the segments are. Scoring this
    partition with the same rule and the same K shows how much of a Dice comes from the segment count
    alone; segments that know the anatomy must beat it.
    """
    side = max(1, round(math.sqrt(num_segments)))
    rows = torch.arange(height) * side // height
    cols = torch.arange(width) * side // width
    return rows[:, None] * side + cols[None, :]


CONTOUR = (255, 255, 0)  # ground-truth lung contour colour in the overlays


def palette(k: int) -> np.ndarray:
    """k distinct colours uint8 [k, 3]: golden-ratio hue steps (deterministic, no colormap dependency)."""
    return np.array([colorsys.hsv_to_rgb((i * 0.618034) % 1, 0.7, 1.0) for i in range(k)]) * 255


def overlay(image: torch.Tensor, labels: torch.Tensor, gt: torch.Tensor | None) -> Image.Image:
    """CXR [S, S] in [0, 1] + label map [S, S] (+ lung mask) -> RGB: 45 % segment colour, GT contour."""
    gray = image.float().numpy()[..., None] * 255
    rgb = 0.55 * gray + 0.45 * palette(int(labels.max()) + 1)[labels.numpy()]
    if gt is not None:
        m = gt.float()[None, None]
        contour = (m - -F.max_pool2d(-m, 3, 1, 1))[0, 0].bool().numpy()  # mask minus its erosion
        rgb[contour] = CONTOUR
    return Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8))
