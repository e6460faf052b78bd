"""Collect the artefacts of docs/small_real.sh into figures and tables (`python -m docs.report`).

Reads the recipe's folders under --runs (each part optional: missing ones are listed and skipped) and writes to
--out fid.png, loss.png, eval_samples.png, reconstruction.png and interpolation.png (the generated images only,
rebuilt from synthetic.csv: ../shared/data is not redistributed), segment_maps.png (label maps with the
ground-truth lung contour), auc_vs_ratio.png, and tables.md (every number quoted in docs/results.md).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import cli
from data.readers import read_image
from data.transforms import preprocess_mask
from eval.figures import caption_grid, line_plot, overlay

SEGMENT_ROWS = [  # summary.json of segment.py: (row of the Dice table, key); {rule} is its dice_rule
    ("all-foreground (every pixel lung)", "mean_dice_baseline_all_foreground"),
    ("lung prior (leave-one-out mean mask)", "mean_dice_baseline_prior"),
    ("DiffSeg, t={timestep}, threshold {threshold}, grid {grid} ({rule} rule)", "mean_dice"),
    ("same, oracle best union of segments", "mean_dice_best_union"),
    ("same, Hungarian matching (DiffSeg protocol)", "mean_dice_hungarian"),
    ("as many square blocks as segments, {rule} rule (image-blind)", "mean_dice_baseline_blocks"),
]


def read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def curves(run: Path, out: Path, bins: int = 15) -> list[str]:
    """fid.png (FID at every evaluation), loss.png (mean loss per bin of steps), eval_samples.png -> markdown."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fid, loss = [r for r in records if "fid" in r], [r for r in records if "loss" in r]
    lines = []
    if fid:
        line_plot({"FID (random-init XRV DenseNet)": [r["fid"] for r in fid]}, [str(r["step"]) for r in fid],
                  out / "fid.png", title="FID vs held-out patients", xlabel="training step", ylabel="FID")
        lines += ["| step | FID | n |", "|---:|---:|---:|",
                  *(f"| {r['step']} | {r['fid']:.2f} | {r.get('fid_n', '')} |" for r in fid)]
    if loss:
        chunks = np.array_split(np.arange(len(loss)), min(bins, len(loss)))
        line_plot({"training loss (eps MSE)": [float(np.mean([loss[i]["loss"] for i in c])) for c in chunks]},
                  [str(loss[c[-1]]["step"]) for c in chunks], out / "loss.png", title="Training loss (mean per bin)",
                  xlabel="step", ylabel="loss")
        tail, speed = loss[-max(1, len(loss) // 10):], [r["img_per_s"] for r in loss if "img_per_s" in r]
        lines += ["", f"Mean loss over the last {len(tail)} logged steps (to step {loss[-1]['step']}): "
                      f"{np.mean([r['loss'] for r in tail]):.4f} (first logged: {loss[0]['loss']:.4f}).",
                  f"Throughput {speed[-1]:.1f} img/s (UNet steps, evaluation pauses included)." if speed else ""]
    if samples := sorted((run / "samples").glob("step_*.png")):  # the bottom row: generated (top: real held-out)
        grid = Image.open(samples[-1])
        grid.crop((0, grid.height // 2, grid.width, grid.height)).save(out / "eval_samples.png")
    return lines


def generated_grid(folder: Path, path: Path, max_rows: int = 8):
    """A captioned grid of sample.py's generated images only, from its synthetic.csv: one row per source image
    (reconstruction) or per pair (interpolation, each blend captioned with its r)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in read_csv_rows(folder / "synthetic.csv"):
        groups.setdefault((r["source"], r["source_b"]), []).append(r)
    chosen = list(groups.values())[:max_rows]
    pairs = any(rows[0]["source_b"] for rows in chosen)
    caption_grid([[read_image(folder / r["path"]) for r in rows] for rows in chosen],
                 [f"{'pair' if pairs else 'source'} {i + 1}" for i in range(len(chosen))], None,
                 [[f"r={float(r['r']):.2f}" if r["r"] else f"variation {k + 1}" for k, r in enumerate(rows)]
                  for rows in chosen],
                 title=("Interpolation: generated blends of pairs (a, b); r = 0 is a" if pairs else
                        "Reconstruction: generated variations of one real image each") + " (real images not shown)"
                 ).save(path)


def segment_maps(seg: Path, masks: Path, out: Path, count: int = 8):
    """segment_maps.png: DiffSeg label maps in colour with the ground-truth lung contour, over flat grey."""
    rows, tiles = read_csv_rows(seg / "dice.csv")[:count], []
    for r in rows:
        labels = torch.from_numpy(np.array(Image.open(seg / "labels" / f"{r['image']}.png")).astype(np.int64))
        mask = masks / f"{r['image']}.png"
        gt = preprocess_mask(read_image(mask), read_image(r["path"]), labels.shape[-1])[0].bool() \
            if mask.is_file() else None
        tiles.append(np.asarray(overlay(torch.full(labels.shape, 0.6), labels, gt)))
    captions = [f"{r['num_segments']} segments, Dice {float(r['dice']):.2f}" for r in rows]
    caption_grid([tiles[i:i + 4] for i in range(0, len(tiles), 4)], None, None,
                 [captions[i:i + 4] for i in range(0, len(tiles), 4)],
                 title="DiffSeg segments (colours), ground-truth lung contour (yellow)").save(out / "segment_maps.png")


def segmentation(seg: Path, search: Path, masks: Path, out: Path) -> list[str]:
    """The Dice table (DiffSeg against the image-blind baselines), segment_maps.png and the search table."""
    s = json.loads((seg / "summary.json").read_text())
    std = {"mean_dice": f" {s['std_dice']:.3f}"}  # of DiffSeg's own row only
    lines = ["| method | mean Dice | std |", "|---|---:|---:|"]
    lines += [f"| {name.format(rule=s['dice_rule'], **s['settings'])} | {s[key]:.3f} |{std.get(key, '')} |"
              for name, key in SEGMENT_ROWS]
    lines += ["", f"n = {s['n']} images, {s['mean_num_segments']:.1f} segments per image on average."]
    segment_maps(seg, masks, out)
    if (search / "summary.csv").is_file():
        rows = read_csv_rows(search / "summary.csv")
        keys = [k for k in ("timestep", "threshold", "grid") if k in rows[0]]
        lines += ["", "Search (best first; selected on the evaluated images):", "",
                  "| " + " | ".join(keys) + " | mean Dice (NMS) | same-count blocks (NMS) | Hungarian | segments |",
                  "|" + "---:|" * (len(keys) + 4)]
        lines += [f"| {' | '.join(r[k] for k in keys)} | {float(r['mean_dice']):.3f} | "
                  f"{float(r['mean_dice_baseline_blocks']):.3f} | {float(r['mean_dice_hungarian']):.3f} | "
                  f"{float(r['mean_num_segments']):.1f} |" for r in rows[:10]]
    return lines


def classification(cls: Path, out: Path) -> list[str]:
    """classify.py's own summary.md (title dropped, headings one level down) and auc_vs_ratio.png."""
    if (cls / "auc_vs_ratio.png").is_file():
        shutil.copy(cls / "auc_vs_ratio.png", out / "auc_vs_ratio.png")
    return ["#" + s if s.startswith("#") else s for s in (cls / "summary.md").read_text().splitlines()[1:]]


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--runs", default="runs", help="folder holding the recipe's outputs (docs/small_real.sh OUT)")
    p.add_argument("--out", default="runs/report", help="folder for the figures and tables.md")
    p.add_argument("--data", default="../shared/data", help="the data folder (lung masks for segment_maps.png)")
    args = p.parse_args(argv)
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    small, recon, interp, seg = (runs / f"small-real{x}" for x in ("", "-reconstruction", "-interpolation", "-segment"))
    parts = [  # (section title, or None for figures only; the file it needs; what makes it, from what)
        ("Training and FID", small / "metrics.jsonl", curves, (small, out)),
        (None, recon / "synthetic.csv", generated_grid, (recon, out / "reconstruction.png")),
        (None, interp / "synthetic.csv", generated_grid, (interp, out / "interpolation.png")),
        ("Lung segmentation (DiffSeg)", seg / "summary.json", segmentation,
         (seg, runs / "small-real-segment-search", Path(args.data) / "cxr-lungs" / "masks", out)),
        ("Classification with synthetic data (phantom labels, test mean AUC)", runs / "classify" / "summary.md",
         classification, (runs / "classify", out)),
    ]
    text, missing = ["# Small-real recipe: generated tables", ""], []
    for title, needed, make, inputs in parts:
        if not needed.is_file():
            missing.append(needed.relative_to(runs).as_posix())
            continue
        lines = make(*inputs)
        text += [f"## {title}", "", *lines, ""] if title else []
    text += ["Missing: " + ", ".join(missing), ""] if missing else []
    (out / "tables.md").write_text("\n".join(text))
    print(f"wrote {out}/tables.md" + (f" (missing: {', '.join(missing)})" if missing else ""))


if __name__ == "__main__":
    cli.main_guard(main)
