"""segment.py's reports: dice.csv + summary.json per setting, the sweep/search table, overlays.png, and the
warning when most images end as one segment (segment.py's docstring describes every column)."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import hub
from eval import figures
from eval.segmentation import RULES


def write_report(folder: Path, rows: list[dict], meta: dict, rule: str) -> dict:
    """dice.csv (with masks) + summary.json in `folder` -> the summary."""
    summary = {"n": len(rows), "mean_num_segments": float(np.mean([r["num_segments"] for r in rows]))}
    if "dice" in rows[0]:
        with open(folder / "dice.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        d = np.array([r["dice"] for r in rows])
        summary |= {"mean_dice": float(d.mean()), "std_dice": float(d.std()), "dice_rule": rule}
        summary |= {f"mean_dice_{k}": float(np.mean([r[f"dice_{k}"] for r in rows])) for k in RULES}
        summary |= {f"mean_{k}": float(np.mean([r[k] for r in rows])) for k in rows[0] if "baseline" in k}
    summary |= meta
    hub.write_json_atomic(summary, folder / "summary.json")
    return summary


def report(folder: Path, rows: list[dict], baselines: dict, meta: dict, rule: str, images, masks) -> dict:
    """Everything one setting writes after its label maps: the baseline columns, dice.csv, summary.json,
    overlays.png, the one-segment warning and a printed line -> the summary."""
    for name, scores in baselines.items():
        for r, d in zip(rows, scores):
            r[f"dice_baseline_{name}"] = d
    s = write_report(folder, rows, meta, rule)
    overlay_grid(folder, rows, images, masks)
    warn_if_one_segment(folder, rows, meta["settings"]["threshold"])
    if "mean_dice" in s:
        blind = ", ".join(f"{k.removeprefix('mean_dice_baseline_')} {v:.4f}" for k, v in s.items()
                          if k.startswith("mean_dice_baseline_"))
        print(f"{folder}: mean Dice ({rule}) {s['mean_dice']:.4f} +- {s['std_dice']:.4f} over {s['n']} images; "
              f"image-blind baselines: {blind}; {s['mean_num_segments']:.1f} segments per image")
    return s


def write_table(out: Path, summaries: list[dict], columns: list[str]):
    """The sweep/search summary: one row per report, best mean Dice first."""
    rows = sorted(summaries, key=lambda s: -s.get("mean_dice", 0.0))
    keys = columns + [k for k in ("mean_dice", "std_dice", "mean_dice_best_union", "mean_dice_nms",
                                  "mean_dice_hungarian", "mean_dice_baseline_blocks", "mean_num_segments", "n")
                      if k in rows[0]]
    table = [{k: (r["settings"] | r)[k] for k in keys} for r in rows]
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(table)
    hub.write_json_atomic({"reports": table}, out / "summary.json")
    widths = [max(8, len(k)) for k in keys]
    for r in [dict(zip(keys, keys)), *table]:
        print("  ".join(f"{v:>{w}.4f}" if isinstance(v, float) else f"{v!s:>{w}}"
                        for v, w in zip(r.values(), widths)))


def warn_if_one_segment(folder: Path, rows: list[dict], threshold):
    """Loud, when most images end as one segment: blank label maps, Dice of 'every pixel lung' at best."""
    single = sum(r["num_segments"] == 1 for r in rows)
    if single * 2 > len(rows):
        hint = "a smaller --threshold" if threshold == "auto" else "--threshold auto or a smaller value"
        warnings.warn(f"{folder}: {single} of {len(rows)} images ended as ONE segment (blank label maps) at "
                      f"--threshold {threshold}, which does not suit this model: try {hint} "
                      "(--search threshold=... compares several)", stacklevel=2)


def overlay_grid(folder: Path, rows: list[dict], images, masks, count: int = 8):
    """overlays.png: the first `count` images, each above its DiffSeg overlay, captioned."""
    pick = rows[:count]
    by_stem = {r["image"]: i for i, r in enumerate(rows)}
    cxr = [images[by_stem[r["image"]], 0] for r in pick]
    over = [torch.from_numpy(np.array(Image.open(folder / "overlays" / f"{r['image']}.png"))).permute(2, 0, 1)
            .float() / 255 for r in pick]
    info = [f"{r['num_segments']} segments" + (f", Dice {r['dice']:.2f}" if "dice" in r else "") for r in pick]
    figures.caption_grid([cxr, over], ["image", "DiffSeg"], [r["image"] for r in pick], [[""] * len(pick), info],
                         title="DiffSeg segments in colour, ground-truth lung contour in yellow").save(
        folder / "overlays.png")
