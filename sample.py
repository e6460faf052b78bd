"""Generate synthetic CXRs with a trained DiNO-Diffusion run: reconstruction and interpolation (paper Sec. 2.3).

reconstruction: for each input image, c_GLB from the frozen ViT, then `--num` variations from new noise.
interpolation:  random pairs (a, b) of images (sharing a positive label when `--images` is a labelled CSV),
                condition c = lerp/slerp(c_a, c_b, r); the synthetic image inherits the labels of the
                nearer source (a when r <= 0.5, else b).
A colour run (`train.py --channels 3`, in its config.json) reads its sources, PNGs and grid in RGB.

Writes one PNG per sample under OUT/images/, `synthetic.csv` (path, source, source_b, r, seed, labels...;
ready for classify.py --synthetic) and `grid.png` (captioned: each real source followed by its generated
variations; for interpolation one row per pair: real a, the blends with their r, real b). Sample k of a run has
seed `--seed * 1_000_003 + k`, recorded in the CSV, so any one sample can be regenerated alone.
--out holds one job (`cli.claim_output`): other settings are refused unless --overwrite; the same settings
continue where an earlier start stopped (batches whose PNGs all exist are read back, not generated again).
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import cli
import pipeline
from data.datasets import open_dataset
from eval import figures
from generate import generate, interpolate, to_grayscale


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--run", required=True, help="run directory written by train.py")
    p.add_argument("--mode", choices=["reconstruction", "interpolation"], required=True,
                   help="reconstruction: variations of each image; interpolation: blends of image pairs")
    p.add_argument("--images", required=True, help="folder of images, or CSV with a path column (+ labels)")
    p.add_argument("--num", type=cli.positive_int, default=4,
                   help="samples per source image (reconstruction) or per pair without --ratios")
    p.add_argument("--out", required=True, help="output folder: images/, synthetic.csv, grid.png")
    p.add_argument("--overwrite", action="store_true",
                   help="empty an --out that holds samples of other settings and start clean")
    p.add_argument("--steps", type=cli.positive_int, default=50, help="sampling steps (paper: DDIM 50)")
    p.add_argument("--scheduler", choices=["ddim", "ddpm"], default="ddim",
                   help="sampler: DDIM (paper) or ancestral DDPM")
    p.add_argument("--eta", type=cli.nonneg_float, default=0.0, help="DDIM eta (0 = deterministic DDIM)")
    p.add_argument("--guidance", type=cli.positive_float, default=1.0,
                   help="classifier-free guidance scale; 1 = paper (>1 needs a model trained with --cond-dropout)")
    p.add_argument("--seed", type=cli.nonneg_int, default=0,
                   help="seed of the pairs, random ratios and noise: sample k has seed SEED * 1000003 + k")
    p.add_argument("--batch-size", type=cli.positive_int, default=8,
                   help="samples per sampling batch (the outputs do not depend on it)")
    p.add_argument("--limit", type=cli.positive_int, default=None,
                   help="use only the first N source images (default: all)")
    p.add_argument("--num-pairs", type=cli.positive_int, default=8, help="interpolation: image pairs to draw")
    p.add_argument("--ratios", type=cli.comma_list(cli.probability), default=None,
                   help="interpolation: comma-separated r values in [0,1] (default: --num values r ~ "
                        "U(--ratio-range) per pair)")
    p.add_argument("--ratio-range", type=cli.comma_list(cli.probability), default="0.1,0.9",
                   help="interpolation: range for random r (paper: random)")
    p.add_argument("--method", choices=["lerp", "slerp"], default="lerp",
                   help="how c_GLB is blended: lerp (linear) or slerp (spherical)")
    p.add_argument("--labels", default=None,
                   help="label columns of a labelled CSV (default: the paper labels it has, maybe none)")
    cli.add_data_flags(p, labels=True)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    p.add_argument("--step", type=cli.nonneg_int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no",
                   help="UNet autocast dtype on a GPU (no = float32)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    args = p.parse_args(argv)
    if len(args.ratio_range) != 2 or args.ratio_range[0] > args.ratio_range[1]:
        p.error(f"argument --ratio-range: expected two values, low to high, got {args.ratio_range}")
    return args


def draw_pairs(n_images: int, labels: np.ndarray | None, num_pairs: int, rng: random.Random):
    """Random pairs; with labels, both members share at least one positive label (paper Sec. 2.3)."""
    if n_images < 2:
        cli.fail("--images: interpolation needs at least two images")
    pairs = []
    for _ in range(100 * num_pairs):
        if len(pairs) == num_pairs:
            break
        a, b = rng.sample(range(n_images), 2)
        if labels is None or np.nansum(labels[a] * labels[b]) > 0:  # nan: an ignored (uncertain) label
            pairs.append((a, b))
    if len(pairs) < num_pairs:
        cli.fail(f"--num-pairs: found only {len(pairs)} image pairs sharing a positive label (asked {num_pairs})")
    return pairs


def sample_path(k: int, source: str, source_b: str | None) -> Path:
    """Where sample k goes, relative to --out: images/<k>_<stem of a>[__<stem of b>].png."""
    stem = Path(source).stem + (f"__{Path(source_b).stem}" if source_b is not None else "")
    return Path("images") / f"{k:06d}_{stem}.png"


def save_png(img: torch.Tensor, path: Path):
    """[1, H, W] (grey) or [3, H, W] (colour run) in [0, 1] -> an 8-bit L or RGB PNG, written atomically (a
    rerun trusts every PNG it finds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray((img.permute(1, 2, 0).squeeze(2).clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(
        tmp, format="PNG")
    os.replace(tmp, path)


def load_png(path: Path) -> torch.Tensor:
    """An 8-bit PNG -> [1, H, W] (L) or [3, H, W] (RGB) in [0, 1] (the inverse of save_png)."""
    arr = torch.from_numpy(np.array(Image.open(path), np.float32) / 255)
    return arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1)


def load_sources(args, size: int, dino, device, channels: int = 1):
    """--images (first --limit) -> (images [n, channels, S, S], paths, labels [n, C] or None, label names,
    c_GLB). `channels`: the run's (1 grey, 3 colour)."""
    wanted = args.labels.split(",") if args.labels else None  # None: the paper's labels the CSV has (maybe none)
    dataset = open_dataset(args.images, size, labels=wanted if str(args.images).endswith(".csv") else None,
                           uncertain=cli.UNCERTAIN[args.uncertain], path_column=args.path_column,
                           image_root=args.image_root, channels=channels)
    if len(dataset) == 0:
        cli.fail(f"--images {args.images}: no images")
    items = [dataset[i] for i in range(min(len(dataset), args.limit or len(dataset)))]
    sources = torch.stack([it["image"] for it in items])
    labels = np.stack([it["labels"].numpy() for it in items]) if "labels" in items[0] else None
    conds = torch.cat([pipeline.condition(dino, sources[i : i + args.batch_size].to(device))
                       for i in range(0, len(items), args.batch_size)])
    return sources, [it["path"] for it in items], labels, getattr(dataset, "label_names", None) or [], conds


def make_jobs(args, conds, paths, labels):
    """-> one job per sample (condition, source index a, source index b or None, r) and the pairs (or None)."""
    if args.mode == "reconstruction":
        return [(conds[i], i, None, None) for i in range(len(paths)) for _ in range(args.num)], None
    rng = random.Random(args.seed)
    pairs = draw_pairs(len(paths), labels, args.num_pairs, rng)
    return [(interpolate(conds[a], conds[b], r, args.method), a, b, float(r))
            for a, b in pairs for r in args.ratios or [rng.uniform(*args.ratio_range) for _ in range(args.num)]], pairs


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not Path(args.run, "config.json").is_file():
        cli.fail(f"--run {args.run}: not a run directory (no config.json; train.py writes one)")
    run = pipeline.load_run(args.run, ema=not args.no_ema, step=args.step, device=device)
    size, channels = run.config["image_size"], pipeline.run_channels(run.config)  # a colour run writes colour
    sources, paths, labels, label_names, conds = load_sources(args, size, run.dino, device, channels)
    jobs, pairs = make_jobs(args, conds, paths, labels)
    scheduler = pipeline.make_scheduler(run.config, args.scheduler)
    amp = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    # every input was checked: only now is --out claimed (same settings: continue; other: refused)
    cli.claim_output(out, {k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "device",
                                                                              "batch_size")},
                     overwrite=args.overwrite)
    rows, results = [], []
    for start in tqdm(range(0, len(jobs), args.batch_size), desc=args.mode):
        chunk = jobs[start : start + args.batch_size]
        seeds = [args.seed * 1_000_003 + start + k for k in range(len(chunk))]
        rels = [sample_path(start + k, paths[a], paths[b] if b is not None else None)
                for k, (_, a, b, _) in enumerate(chunk)]
        if all((out / rel).is_file() for rel in rels):  # a rerun continues: written by an earlier start
            imgs = torch.stack([load_png(out / rel) for rel in rels])
        else:
            imgs = generate(run.unet, run.vae, scheduler, torch.stack([j[0] for j in chunk]), seeds=seeds,
                            height=size, width=size, steps=args.steps, eta=args.eta, guidance=args.guidance,
                            autocast_dtype=amp).cpu()
            imgs = imgs if channels == 3 else to_grayscale(imgs)
            for img, rel in zip(imgs, rels):
                save_png(img, out / rel)
        for (_, a, b, r), seed, img, rel in zip(chunk, seeds, imgs, rels):
            rows.append({"path": str(rel), "source": paths[a], "source_b": paths[b] if b is not None else "",
                         "r": "" if r is None else f"{r:.4f}", "seed": seed})
            if labels is not None:  # the nearer source's; an ignored label (nan) is written back as -1
                rows[-1] |= {name: -1 if np.isnan(v) else int(v)
                             for name, v in zip(label_names, labels[a if r is None or r <= 0.5 else b])}
            results.append((a, b, r, img))
    recon = args.mode == "reconstruction"
    (reconstruction_grid(sources, results, paths, args.num) if recon else
     interpolation_grid(sources, results, pairs)).save(out / "grid.png")
    with open(out / ".synthetic.csv.tmp", "w", newline="") as f:  # written last: the mark of a finished job
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(out / ".synthetic.csv.tmp", out / "synthetic.csv")
    print(f"wrote {len(rows)} samples to {out} (synthetic.csv, grid.png: " + (
        "each row a real source image, then its generated variations)" if recon else
        "each row a pair: real image a, generated blends at r, real image b)"))


def _short(path, width: int = 18) -> str:
    stem = Path(path).stem
    return stem if len(stem) <= width else stem[: width - 1] + "~"


def reconstruction_grid(sources, results, paths, per_row: int, max_rows: int = 8):
    """One row per source image (at most `max_rows`): the real source, then its first `per_row` samples."""
    by_source: dict[int, list] = {}
    for a, _, _, img in results:
        by_source.setdefault(a, []).append(img)
    chosen = list(by_source.items())[:max_rows]
    cells = [[sources[a].cpu()] + imgs[:per_row] for a, imgs in chosen]
    cols = ["real source"] + [f"generated {k + 1}" for k in range(per_row)]
    return figures.caption_grid(cells, [_short(paths[a]) for a, _ in chosen], cols,
                                title="Reconstruction: a real image's c_GLB, new noise per variation")


def interpolation_grid(sources, results, pairs, max_rows: int = 8):
    """One row per pair (at most `max_rows`): real a, every blend of that pair with its r, real b."""
    per_pair = len(results) // len(pairs)  # results come pair by pair
    rows = [results[p * per_pair : (p + 1) * per_pair] for p in range(min(len(pairs), max_rows))]
    cells = [[sources[pairs[p][0]].cpu(), *(img for *_, img in row), sources[pairs[p][1]].cpu()]
             for p, row in enumerate(rows)]
    captions = [["a", *(f"r={r:.2f}" for _, _, r, _ in row), "b"] for row in rows]
    return figures.caption_grid(cells, [f"pair {p + 1}" for p in range(len(cells))],
                                ["real a"] + ["generated"] * per_pair + ["real b"], captions,
                                title="Interpolation: c = blend(c_GLB(a), c_GLB(b), r); r = 0 is a, r = 1 is b")


if __name__ == "__main__":
    cli.main_guard(main)
