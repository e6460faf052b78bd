"""Generate synthetic CXRs with a trained DiNO-Diffusion run: reconstruction and interpolation (paper Sec. 2.3).

reconstruction: for each input image, c_GLB from the frozen ViT, then `--num` variations from new noise.
interpolation:  pairs (a, b) of images (from `--pairs`, or drawn so that both share a positive label when
                `--images` is a labelled CSV), condition c = lerp/slerp(c_a, c_b, r); the synthetic image
                inherits the labels of the nearer source (a when r <= 0.5, else b).

Writes one PNG per sample under OUT/images/, `synthetic.csv` (path, source, source_b, r, seed, labels...;
ready for classify.py --synthetic) and `grid.png` (each source next to its variations). Sample k of a run has
seed `--seed * 1_000_003 + k`, recorded in the CSV, so any one sample can be regenerated alone.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import cli
import pipeline
from data.datasets import open_dataset
from generate import generate, interpolate, to_grayscale


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory written by train.py")
    p.add_argument("--mode", choices=["reconstruction", "interpolation"], required=True)
    p.add_argument("--images", required=True, help="folder of images, or CSV with a path column (+ labels)")
    p.add_argument("--num", type=int, default=4, help="samples per source image (reconstruction) or per pair")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (paper: DDIM 50)")
    p.add_argument("--scheduler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic DDIM)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale; 1 = paper (>1 needs a model trained with --cond-dropout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="use only the first N source images")
    p.add_argument("--pairs", default=None, help="interpolation: CSV with columns a,b (paths as in --images)")
    p.add_argument("--num-pairs", type=int, default=8, help="interpolation: pairs to draw when --pairs is not given")
    p.add_argument("--ratios", default=None,
                   help="interpolation: comma-separated r values in [0,1]; default r ~ U(--ratio-range)")
    p.add_argument("--ratio-range", default="0.1,0.9", help="interpolation: range for random r (paper: random)")
    p.add_argument("--method", choices=["lerp", "slerp"], default="lerp", help="interpolation of c_GLB")
    p.add_argument("--labels", default=None,
                   help="label columns of a labelled CSV (default: the paper labels it has, maybe none)")
    cli.add_data_flags(p, labels=True)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="UNet autocast (GPU)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    return p.parse_args(argv)


def parse_ratios(args) -> tuple[list[float] | None, tuple[float, float]]:
    ratios = [float(r) for r in args.ratios.split(",")] if args.ratios else None
    lo, hi = (float(v) for v in args.ratio_range.split(","))
    for r in (ratios or []) + [lo, hi]:
        if not 0.0 <= r <= 1.0:
            raise SystemExit(f"interpolation ratio {r} is outside [0, 1]")
    return ratios, (lo, hi)


def draw_pairs(n_images: int, labels: np.ndarray | None, num_pairs: int, rng: random.Random):
    """Random pairs; with labels, both members share at least one positive label (paper Sec. 2.3)."""
    if n_images < 2:
        raise SystemExit("interpolation needs at least two images")
    pairs = []
    for _ in range(100 * num_pairs):
        if len(pairs) == num_pairs:
            break
        a, b = rng.sample(range(n_images), 2)
        if labels is None or np.nansum(labels[a] * labels[b]) > 0:  # nan: an ignored (uncertain) label
            pairs.append((a, b))
    if len(pairs) < num_pairs:
        raise SystemExit(f"found only {len(pairs)} image pairs sharing a positive label (asked {num_pairs})")
    return pairs


def save_png(img: torch.Tensor, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = pipeline.load_run(args.run, ema=not args.no_ema, step=args.step, device=device)
    size = run.config["image_size"]
    wanted = args.labels.split(",") if args.labels else None  # None: the paper's labels the CSV has (maybe none)
    dataset = open_dataset(args.images, size, labels=wanted if str(args.images).endswith(".csv") else None,
                           uncertain=cli.UNCERTAIN[args.uncertain], path_column=args.path_column,
                           image_root=args.image_root)
    label_names = getattr(dataset, "label_names", None) or []
    n = min(len(dataset), args.limit or len(dataset))
    items = [dataset[i] for i in range(n)]
    sources = torch.stack([it["image"] for it in items])
    paths = [it["path"] for it in items]
    labels = np.stack([it["labels"].numpy() for it in items]) if "labels" in items[0] else None
    scheduler = pipeline.make_scheduler(run.config, args.scheduler)
    amp = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    conds = torch.cat([pipeline.condition(run.dino, sources[i : i + args.batch_size].to(device))
                       for i in range(0, n, args.batch_size)])

    # one job per sample: (condition, source index a, source index b or None, r)
    rng = random.Random(args.seed)
    jobs = []
    if args.mode == "reconstruction":
        jobs = [(conds[i], i, None, None) for i in range(n) for _ in range(args.num)]
    else:
        ratios, (lo, hi) = parse_ratios(args)
        if args.pairs:
            index = {p: i for i, p in enumerate(paths)} | {Path(p).name: i for i, p in enumerate(paths)}
            with open(args.pairs, newline="") as f:
                rows = list(csv.DictReader(f))
            try:
                pairs = [(index[r["a"]], index[r["b"]]) for r in rows]
            except KeyError as e:
                raise SystemExit(f"--pairs {args.pairs}: image {e} not found in --images") from e
        else:
            pairs = draw_pairs(n, labels, args.num_pairs, rng)
        for a, b in pairs:
            for r in ratios or [rng.uniform(lo, hi) for _ in range(args.num)]:
                jobs.append((interpolate(conds[a], conds[b], r, args.method), a, b, float(r)))

    rows, results = [], []
    for start in tqdm(range(0, len(jobs), args.batch_size), desc=args.mode):
        chunk = jobs[start : start + args.batch_size]
        seeds = [args.seed * 1_000_003 + start + k for k in range(len(chunk))]
        imgs = generate(run.unet, run.vae, scheduler, torch.stack([j[0] for j in chunk]), seeds=seeds,
                        height=size, width=size, steps=args.steps, eta=args.eta, guidance=args.guidance,
                        autocast_dtype=amp)
        for (_, a, b, r), seed, img in zip(chunk, seeds, to_grayscale(imgs).cpu()):
            k = len(rows)
            stem = Path(paths[a]).stem + (f"__{Path(paths[b]).stem}" if b is not None else "")
            rel = Path("images") / f"{k:06d}_{stem}.png"
            save_png(img, out / rel)
            row = {"path": str(rel), "source": paths[a], "source_b": paths[b] if b is not None else "",
                   "r": "" if r is None else f"{r:.4f}", "seed": seed}
            if labels is not None:
                nearer = a if r is None or r <= 0.5 else b
                # an ignored label (nan) is written back as uncertain (-1): classify.py --uncertain decides
                row |= {name: -1 if np.isnan(v) else int(v) for name, v in zip(label_names, labels[nearer])}
            rows.append(row)
            results.append((a, img))
    with open(out / "synthetic.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_grid(sources, results, out / "grid.png", per_row=args.num)
    print(f"wrote {len(rows)} samples to {out} (synthetic.csv, grid.png)")


def write_grid(sources: torch.Tensor, results, path: Path, per_row: int, max_rows: int = 8):
    """One row per source image: the source, then its first `per_row` samples."""
    by_source: dict[int, list] = {}
    for a, img in results:
        by_source.setdefault(a, []).append(img)
    rows = []
    for a, imgs in list(by_source.items())[:max_rows]:
        cells = [sources[a].cpu()] + imgs[:per_row]
        cells += [torch.zeros_like(cells[0])] * (per_row + 1 - len(cells))
        rows.append(torch.cat(cells, dim=2))
    save_png(torch.cat(rows, dim=1), path)


if __name__ == "__main__":
    main()
