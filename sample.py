"""Generate synthetic CXRs with a trained DiNO-Diffusion run: reconstruction and interpolation (paper Sec. 2.3).

The model was trained to rebuild an image from its DINO global tokens c_GLB alone, so c_GLB is a handle on
"this kind of image". Reconstruction keeps one real image's c_GLB and draws new noise: variations of that image.
Interpolation blends the c_GLB of two images that share a positive label, c = lerp/slerp(c_a, c_b, r), and the
synthetic image inherits the labels of the nearer source (a when r <= 0.5, else b): a labelled synthetic set
for classify.py from an unlabelled model.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import cli
import distributed
import hub
import pipeline
from data.datasets import open_dataset
from eval import figures
from generate import generate, interpolate, to_grayscale

EPILOG = """Writes OUT/images/<k>_<source stem>.png, synthetic.csv (path, source, source_b, r, seed, labels; for
classify.py --synthetic) and grid.png (each real source and its samples; per pair: real a, the blends, real b).
Sample k has seed --seed * 1000003 + k. A rerun into the same --out generates only the PNGs not there yet;
torchrun --nproc_per_node N -- sample.py ... deals sample k to rank k % N (the same images, whatever N)."""
RANDOM_RATIOS = (0.1, 0.9)  # interpolation fractions r without --ratios: r ~ U(0.1, 0.9), away from the sources
RUNTIME_FLAGS = ("out", "overwrite", "device", "batch_size", "compile")  # how fast, not what: a rerun continues


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG, formatter_class=cli.HelpFormatter)
    add = p.add_argument
    add("--run", required=True, help="run directory written by train.py")
    add("--mode", choices=["reconstruction", "interpolation"], required=True,
        help="reconstruction: variations of each image; interpolation: blends of image pairs")
    add("--images", required=True, help="folder of images, or CSV with a path column (+ labels)")
    add("--num", type=cli.positive_int, default=4, help="samples per source image, or per pair without --ratios")
    add("--out", required=True, help="output folder: images/, synthetic.csv, grid.png")
    add("--overwrite", action="store_true", help="empty an --out that holds samples of other settings, start clean")
    add("--steps", type=cli.positive_int, default=50, help="sampling steps (paper: DDIM 50)")
    add("--scheduler", choices=["ddim", "ddpm"], default="ddim", help="DDIM (paper, deterministic) or DDPM")
    add("--guidance", type=cli.positive_float, default=1.0,
        help="classifier-free guidance scale; 1 = paper (>1 needs a model trained with --cond-dropout)")
    add("--seed", type=cli.nonneg_int, default=0, help="seed of the pairs, ratios and noise (sample k: SEED*1000003+k)")
    add("--batch-size", type=cli.positive_int, default=8, help="samples per batch (the outputs do not depend on it)")
    add("--limit", type=cli.positive_int, help="use only the first N source images (default: all)")
    add("--num-pairs", type=cli.positive_int, default=8, help="interpolation: image pairs to draw")
    add("--ratios", type=cli.comma_list(cli.probability),
        help="interpolation: comma-separated r in [0,1] (default: --num r ~ U(0.1, 0.9) per pair; paper: random)")
    add("--method", choices=["lerp", "slerp"], default="lerp", help="how c_GLB is blended: linear or spherical")
    add("--labels", help="label columns of a labelled CSV (default: the paper labels it has, maybe none)")
    cli.add_data_flags(p, labels=True)
    add("--step", type=cli.nonneg_int, help="checkpoint step, e.g. the best-FID one (default: newest)")
    add("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    add("--mixed-precision", choices=list(pipeline.AUTOCAST), default="no",
        help="UNet autocast dtype (the VAE decodes in fp32)")
    add("--compile", action="store_true", help="torch.compile the UNet (faster on a GPU after minutes)")
    add("--device", help="cuda / cpu (default: cuda when available)")
    return p.parse_args(argv)


def draw_pairs(n_images: int, labels: np.ndarray | None, num_pairs: int, rng: random.Random):
    """Random pairs; with labels, both members share at least one positive label (paper Sec. 2.3)."""
    if n_images < 2:
        cli.fail("--images: interpolation needs at least two images")
    pairs = []
    for _ in range(100 * num_pairs):
        a, b = rng.sample(range(n_images), 2)
        if labels is None or np.nansum(labels[a] * labels[b]) > 0:  # nan: an ignored (uncertain) label
            pairs.append((a, b))
        if len(pairs) == num_pairs:
            return pairs
    cli.fail(f"--num-pairs: found only {len(pairs)} image pairs sharing a positive label (asked {num_pairs})")


def save_png(img: torch.Tensor, path: Path):
    """[1, H, W] (grey) or [3, H, W] (colour run) in [0, 1] -> an 8-bit L or RGB PNG, written atomically (a
    rerun trusts every PNG it finds)."""
    arr = (img.permute(1, 2, 0).squeeze(2).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    with hub.atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


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
    items = [dataset[i] for i in range(min(len(dataset), args.limit or len(dataset)))]
    sources = torch.stack([it["image"] for it in items])
    labels = np.stack([it["labels"].numpy() for it in items]) if "labels" in items[0] else None
    conds = torch.cat([pipeline.condition(dino, sources[i : i + args.batch_size].to(device))
                       for i in range(0, len(items), args.batch_size)])
    return sources, [it["path"] for it in items], labels, getattr(dataset, "label_names", None) or [], conds


def make_jobs(args, paths, labels, label_names):
    """-> one job per sample (source index a, source index b or None, r or None), its synthetic.csv row (in job
    order, whichever rank generates the image) and the pairs (None for reconstruction)."""
    if args.mode == "reconstruction":
        jobs, pairs = [(i, None, None) for i in range(len(paths)) for _ in range(args.num)], None
    else:
        rng = random.Random(args.seed)
        pairs = draw_pairs(len(paths), labels, args.num_pairs, rng)
        jobs = [(a, b, float(r)) for a, b in pairs
                for r in args.ratios or [rng.uniform(*RANDOM_RATIOS) for _ in range(args.num)]]
    rows = []
    for k, (a, b, r) in enumerate(jobs):
        stem = Path(paths[a]).stem + ("" if b is None else f"__{Path(paths[b]).stem}")
        rows.append({"path": f"images/{k:06d}_{stem}.png", "source": paths[a],
                     "source_b": "" if b is None else paths[b], "r": "" if r is None else f"{r:.4f}",
                     "seed": args.seed * 1_000_003 + k})
        if labels is not None:  # the nearer source's; an ignored label (nan) is written back as -1
            rows[-1] |= {name: -1 if np.isnan(v) else int(v)
                         for name, v in zip(label_names, labels[a if r is None or r <= 0.5 else b])}
    return jobs, rows, pairs


@torch.inference_mode()
def generate_missing(args, run, jobs, conds, rows, out: Path, world: distributed.World):
    """Generate this rank's jobs (k % N == rank) whose PNG is not there yet, --batch-size at a time."""
    todo = [k for k in distributed.mine(len(jobs), world) if not (out / rows[k]["path"]).is_file()]
    size, scheduler = run.config["image_size"], pipeline.make_scheduler(run.config, args.scheduler)
    bar = distributed.Progress(len(todo), world, args.mode)
    for start in range(0, len(todo), args.batch_size):
        ks = todo[start : start + args.batch_size]
        context = torch.stack([conds[a] if b is None else interpolate(conds[a], conds[b], r, args.method)
                               for a, b, r in (jobs[k] for k in ks)])
        imgs = generate(run.unet, run.vae, scheduler, context, seeds=[rows[k]["seed"] for k in ks], height=size,
                        width=size, steps=args.steps, guidance=args.guidance,
                        autocast_dtype=pipeline.AUTOCAST[args.mixed_precision]).cpu()
        for img, k in zip(imgs if pipeline.run_channels(run.config) == 3 else to_grayscale(imgs), ks):
            save_png(img, out / rows[k]["path"])  # a colour run writes colour
        bar.update(len(ks))
    bar.close()


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    world = distributed.init(args.device)
    if not Path(args.run, "config.json").is_file():
        cli.fail(f"--run {args.run}: not a run directory (no config.json; train.py writes one)")
    run = pipeline.load_run(args.run, ema=not args.no_ema, step=args.step, device=world.device)
    if args.compile:
        run.unet.compile()
    sources, paths, labels, label_names, conds = load_sources(args, run.config["image_size"], run.dino,
                                                               world.device, pipeline.run_channels(run.config))
    jobs, rows, pairs = make_jobs(args, paths, labels, label_names)
    # every input was checked: only now is --out claimed (same settings: continue; other: refused)
    distributed.claim_output(out, {k: v for k, v in vars(args).items() if k not in RUNTIME_FLAGS}, world,
                             overwrite=args.overwrite)
    generate_missing(args, run, jobs, conds, rows, out, world)
    distributed.barrier()  # every rank's PNGs are written
    if world.rank == 0:  # grid.png (read back from the PNGs it shows), then synthetic.csv: a finished job's mark
        shown = len(jobs) // len(pairs or paths) * min(len(pairs or paths), 8)  # jobs come source / pair by pair
        results = [(*jobs[k], load_png(out / rows[k]["path"])) for k in range(shown)]
        grid = (reconstruction_grid(sources, results, paths, args.num) if pairs is None else
                interpolation_grid(sources, results, pairs[:8]))
        grid.save(out / "grid.png")
        hub.write_csv_atomic(out / "synthetic.csv", rows)
        print(f"wrote {len(rows)} samples to {out} (synthetic.csv, grid.png)")
    distributed.close()


def _short(path, width: int = 18) -> str:
    stem = Path(path).stem
    return stem if len(stem) <= width else stem[: width - 1] + "~"


def reconstruction_grid(sources, results, paths, per_row: int, max_rows: int = 8):
    """One row per source image (at most `max_rows`): the real source, then its first `per_row` samples."""
    by_source: dict[int, list] = {}
    for a, _, _, img in results:
        by_source.setdefault(a, []).append(img)
    chosen = list(by_source.items())[:max_rows]
    return figures.caption_grid([[sources[a].cpu()] + imgs[:per_row] for a, imgs in chosen],
                                [_short(paths[a]) for a, _ in chosen],
                                ["real source"] + [f"generated {k + 1}" for k in range(per_row)],
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
