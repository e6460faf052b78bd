"""segment.py's lung Dice: which unlabeled segments are "the lung", image-blind baselines, per-image outputs.

DiffSeg (diffseg.py) splits an image into K segments with no names; the ground truth (GT) is one binary lung
mask, so a rule must pick the lung segments before Dice can be computed (segment.py reports all three).
With a_k = |S_k & GT|, s_k = |S_k| and G = |GT| (segments are disjoint), for one image [H, W]:
1. `best_union_dice` (oracle upper bound): a union U scores Dice(U) = 2 A(U) / (S(U) + G). If U* is optimal with
   value d*, adding a segment k changes the value by the sign of 2 a_k - d* s_k and removing it by the opposite
   sign, so U* holds every segment with precision a_k / s_k > d* / 2 and none below: a PREFIX of the segments
   sorted by precision. Scoring the K + 1 prefixes is exact in O(K log K) (tested against brute force).
2. `nms_dice`, the headline `dice`: the paper says only that "candidate masks were evaluated by their Dice score
   and selected via non-maximum suppression". Our reading: rank the segments by precision (ties: more lung
   pixels, then lower label) and keep them while it exceeds 0.5 (a majority of lung pixels). Segments are
   disjoint, so NMS's IoU suppression never fires: per-segment majority voting, i.e. rule 1 with the cutoff
   0.5 instead of d* / 2, hence never better than rule 1.
3. `hungarian_dice`: the DiffSeg benchmark protocol (google/diffseg utils.py `hungarian_matching`, after PiCIE):
   background and lung each get one distinct segment, maximising the matched overlap |GT_c & S_k| (or IoU);
   the lung's segment is the prediction. A GT class with no pixel is left out.
An empty GT warns; every rule then selects nothing and scores 1.0 (`eval.metrics.dice`'s both-empty rule).
Also here: the image-blind baselines (`mask_baselines`, `block_partition`) and segment.py's per-image outputs
and reports (`segment_image`, `saved_result` for resuming, `report`, `write_table`).
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

import hub
from data import read_image
from eval.figures import caption_grid, overlay
from eval.metrics import dice


class Selection(NamedTuple):
    dice: float
    segments: tuple[int, ...]  # label values forming the predicted lung
    mask: torch.Tensor  # bool [H, W], the union of those segments


def _segments(labels, gt):
    """-> labels, gt (bool), ids [K], s_k [K] (pixels), a_k [K] (lung pixels), G, indices by precision."""
    labels, gt = torch.as_tensor(labels), torch.as_tensor(gt)
    if labels.shape != gt.shape or labels.ndim != 2:
        raise ValueError(f"labels {list(labels.shape)} and gt {list(gt.shape)} must be two [H, W] maps of "
                         "the same shape (diffseg(out_size=...) gives the label map the image size)")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer label map, got dtype {labels.dtype}")
    if gt.dtype != torch.bool and not torch.all((gt == 0) | (gt == 1)):
        raise ValueError("gt must be a binary mask (bool or 0/1); threshold it first, e.g. mask > 127 for a 0/255 PNG")
    gt = gt.bool()
    ids, inverse = torch.unique(labels.reshape(-1), return_inverse=True)
    s = torch.bincount(inverse, minlength=len(ids)).tolist()
    a = torch.bincount(inverse[gt.reshape(-1)], minlength=len(ids)).tolist()
    if not gt.any():
        warnings.warn("gt lung mask is empty: no segment is selected and the empty prediction scores 1.0", stacklevel=3)
    order = sorted(range(len(ids)), key=lambda k: (-a[k] / s[k], -a[k], k))  # precision, then lung pixels
    return labels, gt, ids, s, a, int(gt.sum()), order


def _select(labels, gt, ids, chosen) -> Selection:
    chosen = sorted(int(ids[k]) for k in chosen)
    mask = torch.isin(labels, torch.tensor(chosen, dtype=labels.dtype, device=labels.device))
    return Selection(float(dice(mask, gt)), tuple(chosen), mask)


def best_union_dice(labels, gt) -> Selection:
    """The union of segments with the highest Dice vs gt (rule 1: the best prefix by precision). Ties: fewer."""
    labels, gt, ids, s, a, g, order = _segments(labels, gt)
    best, best_n, lung, size = (1.0 if g == 0 else 0.0), 0, 0, 0  # the empty union first
    for n, k in enumerate(order, 1):
        lung, size = lung + a[k], size + s[k]
        if 2 * lung / (size + g) > best:
            best, best_n = 2 * lung / (size + g), n
    return _select(labels, gt, ids, order[:best_n])


def nms_dice(labels, gt, min_overlap: float = 0.5) -> Selection:
    """Keep segments, by descending precision, while it exceeds min_overlap (rule 2)."""
    labels, gt, ids, s, a, g, order = _segments(labels, gt)
    return _select(labels, gt, ids, list(itertools.takewhile(lambda k: a[k] / s[k] > min_overlap, order)))


def hungarian_dice(labels, gt, criterion: str = "overlap") -> Selection:
    """Rule 3: {background, lung} matched to distinct segments maximising overlap (or IoU); Dice of the lung's.

    Two classes need no general Hungarian algorithm: each class wants its best segment (first maximum); if
    they differ, that is the optimum. If both want the same one, the class that loses less by moving takes its
    best other segment (the cheapest move; ties: lung moves); with no other segment, the larger score keeps it
    (ties: background). An optimal assignment, as scipy's linear_sum_assignment (tested), with ties resolved
    as the Kuhn-Munkres algorithm it replaces (rows added in class order).
    """
    labels, gt, ids, s, a, g, _ = _segments(labels, gt)
    if criterion not in ("overlap", "iou"):
        raise ValueError(f"criterion must be 'overlap' or 'iou', got {criterion!r}")
    hist = torch.tensor([[si - ai for si, ai in zip(s, a)], a], dtype=torch.float64)  # [2 classes, K segments]
    if criterion == "iou":
        hist = hist / (hist.sum(1, keepdim=True) + torch.tensor(s, dtype=torch.float64)[None] - hist)
    bg, lung = hist.tolist()
    want_bg, want_lung = (max(range(len(row)), key=row.__getitem__) for row in (bg, lung))  # first maxima
    if g == 0 or g == labels.numel() or want_bg != want_lung:  # no lung; no background; or no conflict
        return _select(labels, gt, ids, [] if g == 0 else [want_lung])
    k, others = want_bg, [j for j in range(len(bg)) if j != want_bg]  # both want segment k
    if not others:
        return _select(labels, gt, ids, [k] if lung[k] > bg[k] else [])
    j = min(others, key=lambda j: min(lung[k] - lung[j], bg[k] - bg[j]))  # the cheapest move, to segment j
    return _select(labels, gt, ids, [k] if bg[k] - bg[j] < lung[k] - lung[j] else [j])  # background moves?


RULES = {"best_union": best_union_dice, "nms": nms_dice, "hungarian": hungarian_dice}  # name -> rule


def lung_scores(labels, gt) -> dict:
    """All three rules on one image -> {"dice_best_union", "dice_nms", "dice_hungarian", "num_segments"}."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the empty-gt warning, once below instead of three times
        scores = {f"dice_{name}": rule(labels, gt).dice for name, rule in RULES.items()}
    if not torch.as_tensor(gt).bool().any():
        warnings.warn("gt lung mask is empty: every rule selects nothing and scores 1.0", stacklevel=2)
    return scores | {"num_segments": len(torch.unique(torch.as_tensor(labels)))}


def mask_baselines(masks) -> dict[str, torch.Tensor]:
    """Per-image Dice of two image-blind segmenters, masks bool [N, H, W] -> {name: [N]}: `all_foreground`
    (every pixel lung: 2|GT| / (|GT| + HW), it rewards large lungs) and `prior` (the pixel-wise mean of the
    OTHER N - 1 masks at 0.5: leave-one-out, needs N >= 2). A segmenter that cannot beat `prior` has learned
    nothing about the particular image."""
    m = torch.as_tensor(masks).bool()
    if m.ndim != 3 or len(m) < 2:
        raise ValueError(f"mask_baselines: expected masks [N >= 2, H, W], got shape {list(m.shape)}")
    prior = (m.double().sum(0) - m.double()) / (len(m) - 1) >= 0.5  # [N, H, W]
    return {"all_foreground": dice(torch.ones_like(m), m), "prior": dice(prior, m)}


def block_partition(num_segments: int, height: int, width: int) -> torch.Tensor:
    """An image-blind label map [H, W] of round(sqrt(K))^2 equal blocks: with K small segments, majority voting
    or the oracle union trace the GT at the segments' resolution whatever they are, so the same rule on this
    partition shows how much Dice the segment count alone buys; segments that know the anatomy must beat it."""
    side = max(1, round(math.sqrt(num_segments)))
    return (torch.arange(height) * side // height)[:, None] * side + (torch.arange(width) * side // width)[None, :]


# ------------------------------------------------------------------------------------------- segment.py's outputs


def save_png(image: Image.Image, path: Path):
    """Atomic: a kill leaves the old file or none, never a truncated one."""
    with hub.atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def segment_image(lab, image, gt, stem: str, path, folder: Path, threshold: float) -> dict:
    """Save one label map [S, S], its overlay and then labels/<stem>.json (its row and the threshold used: the
    mark that the image is complete) -> the image's dice.csv row (scores when gt is given)."""
    lab = (torch.bincount(lab.flatten()) > 0).cumsum(0)[lab] - 1  # consecutive ids 0..K-1, order kept
    save_png(Image.fromarray(lab.numpy().astype(np.uint8 if lab.max() < 256 else np.uint16)),
             folder / "labels" / f"{stem}.png")
    save_png(overlay(image, lab, gt), folder / "overlays" / f"{stem}.png")
    row = {"image": stem, "path": str(path), "num_segments": int(lab.max()) + 1}
    if gt is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # empty masks were reported, by name, while reading
            scores = lung_scores(lab, gt)
            blocks = block_partition(scores["num_segments"], *lab.shape)  # image-blind, same segment count
            scores["dice_baseline_blocks"] = nms_dice(blocks, gt).dice
        row = {"image": stem, "path": str(path), "dice": scores["dice_nms"]} | scores
    hub.write_json_atomic({"threshold": float(threshold), "row": list(row.items())},  # pairs: column order kept
                          folder / "labels" / f"{stem}.json")
    return row


def saved_result(folder: Path, stem: str) -> tuple[float, dict] | None:
    """(threshold used, dice.csv row) of an image a previous run completed in `folder`, else None."""
    mark, outputs = folder / "labels" / f"{stem}.json", (folder / "labels", folder / "overlays")
    if not (mark.is_file() and all((sub / f"{stem}.png").is_file() for sub in outputs)):
        return None
    saved = json.loads(mark.read_text())
    return saved["threshold"], dict(saved["row"])


def report(folder: Path, rows: list[dict], meta: dict, images) -> dict:
    """dice.csv (with masks), summary.json, overlays.png, the one-segment warning and a printed line -> summary."""
    summary = {"n": len(rows), "mean_num_segments": float(np.mean([r["num_segments"] for r in rows]))}
    if "dice" in rows[0]:
        hub.write_csv_atomic(folder / "dice.csv", rows)
        d = np.array([r["dice"] for r in rows])
        summary |= {"mean_dice": float(d.mean()), "std_dice": float(d.std()), "dice_rule": "nms"}
        summary |= {f"mean_{k}": float(np.mean([r[k] for r in rows])) for k in rows[0] if k.startswith("dice_")}
    hub.write_json_atomic(summary | meta, folder / "summary.json")
    pick, index = rows[:8], {r["image"]: i for i, r in enumerate(rows)}  # overlays.png: the first 8 images
    over = [read_image(folder / "overlays" / f"{r['image']}.png", channels=3) for r in pick]
    info = [f"{r['num_segments']} segments" + (f", Dice {r['dice']:.2f}" if "dice" in r else "") for r in pick]
    grid = caption_grid([[images[index[r["image"]], 0] for r in pick], over], ["image", "DiffSeg"],
                        [r["image"] for r in pick], [[""] * len(pick), info],
                        title="DiffSeg segments in colour, ground-truth lung contour in yellow")
    grid.save(folder / "overlays.png")
    single, threshold = sum(r["num_segments"] == 1 for r in rows), meta["settings"]["threshold"]
    if single * 2 > len(rows):  # blank label maps: Dice of 'every pixel lung' at best
        hint = "a smaller --threshold" if threshold == "auto" else "--threshold auto or a smaller value"
        warnings.warn(f"{folder}: {single} of {len(rows)} images ended as ONE segment (blank label maps) at "
                      f"--threshold {threshold}, which does not suit this model: try {hint} "
                      "(--search threshold=... compares several)", stacklevel=2)
    if "mean_dice" in summary:
        blind = ", ".join(f"{k.removeprefix('mean_dice_baseline_')} {v:.4f}" for k, v in summary.items()
                          if k.startswith("mean_dice_baseline_"))
        print(f"{folder}: mean Dice (nms) {summary['mean_dice']:.4f} +- {summary['std_dice']:.4f} over "
              f"{len(rows)} images; image-blind baselines: {blind}; {summary['mean_num_segments']:.1f} segments")
    return summary | meta


def write_table(out: Path, summaries: list[dict], columns: list[str]):
    """The sweep/search summary (summary.csv, summary.json, printed): one row per report, best mean Dice first."""
    rows = sorted(summaries, key=lambda s: -s.get("mean_dice", 0.0))
    keys = columns + [k for k in ("mean_dice", "std_dice", "mean_dice_best_union", "mean_dice_nms",
                                  "mean_dice_hungarian", "mean_dice_baseline_blocks", "mean_num_segments", "n")
                      if k in rows[0]]
    table = [{k: (r["settings"] | r)[k] for k in keys} for r in rows]
    hub.write_csv_atomic(out / "summary.csv", table)
    hub.write_json_atomic({"reports": table}, out / "summary.json")
    widths = [max(8, len(k)) for k in keys]
    for r in [dict(zip(keys, keys)), *table]:
        print("  ".join(f"{v:>{w}.4f}" if isinstance(v, float) else f"{v!s:>{w}}" for v, w in zip(r.values(), widths)))
