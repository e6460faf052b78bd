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
continue where an earlier start stopped: a sample whose PNG exists (written atomically) is not generated
again, so a kill loses at most the batch in flight. `torchrun --nproc_per_node N -- sample.py ...` deals the
samples round-robin to N processes (`distributed.py`): the same images as one process, whatever N; rank 0
writes synthetic.csv and grid.png once all are done. A rerun with another N or --batch-size continues too.
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

# flags that change how fast, not what: a rerun with other values continues (so does one with another N)
RUNTIME_FLAGS = ("out", "overwrite", "device", "batch_size", "compile")


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
                   help="UNet autocast dtype (no = float32; bf16/fp16 for throughput on a GPU; the VAE "
                        "decodes in float32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (faster sampling on a GPU after a compile of minutes)")
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
    with hub.atomic_path(path) as tmp:
        Image.fromarray((img.permute(1, 2, 0).squeeze(2).clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(
            tmp, format="PNG")


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


def make_jobs(args, paths, labels):
    """-> one job per sample (source index a, source index b or None, r or None) and the pairs (or None)."""
    if args.mode == "reconstruction":
        return [(i, None, None) for i in range(len(paths)) for _ in range(args.num)], None
    rng = random.Random(args.seed)
    pairs = draw_pairs(len(paths), labels, args.num_pairs, rng)
    return [(a, b, float(r)) for a, b in pairs
            for r in args.ratios or [rng.uniform(*args.ratio_range) for _ in range(args.num)]], pairs


def make_rows(args, jobs, paths, labels, label_names) -> list[dict]:
    """synthetic.csv: one row per job, in job order (the same whichever rank generated the image)."""
    rows = []
    for k, (a, b, r) in enumerate(jobs):
        rows.append({"path": str(sample_path(k, paths[a], paths[b] if b is not None else None)),
                     "source": paths[a], "source_b": paths[b] if b is not None else "",
                     "r": "" if r is None else f"{r:.4f}", "seed": args.seed * 1_000_003 + k})
        if labels is not None:  # the nearer source's; an ignored label (nan) is written back as -1
            rows[-1] |= {name: -1 if np.isnan(v) else int(v)
                         for name, v in zip(label_names, labels[a if r is None or r <= 0.5 else b])}
    return rows


@torch.inference_mode()
def generate_missing(args, run, jobs, conds, rels, out: Path, world: distributed.World):
    """Generate this rank's jobs (k % N == rank) whose PNG is not there yet, --batch-size at a time."""
    todo = [k for k in distributed.mine(len(jobs), world) if not (out / rels[k]).is_file()]
    size = run.config["image_size"]
    scheduler = pipeline.make_scheduler(run.config, args.scheduler)
    amp = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    bar = distributed.Progress(len(todo), world, args.mode)
    for start in range(0, len(todo), args.batch_size):
        ks = todo[start : start + args.batch_size]
        context = torch.stack([conds[a] if b is None else interpolate(conds[a], conds[b], r, args.method)
                               for a, b, r in (jobs[k] for k in ks)])
        imgs = generate(run.unet, run.vae, scheduler, context, seeds=[args.seed * 1_000_003 + k for k in ks],
                        height=size, width=size, steps=args.steps, eta=args.eta, guidance=args.guidance,
                        autocast_dtype=amp).cpu()
        imgs = imgs if pipeline.run_channels(run.config) == 3 else to_grayscale(imgs)  # a colour run writes colour
        for img, k in zip(imgs, ks):
            save_png(img, out / rels[k])
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
    jobs, pairs = make_jobs(args, paths, labels)
    rows = make_rows(args, jobs, paths, labels, label_names)
    # every input was checked: only now is --out claimed (same settings: continue; other: refused)
    distributed.claim_output(out, {k: v for k, v in vars(args).items() if k not in RUNTIME_FLAGS}, world,
                             overwrite=args.overwrite)
    generate_missing(args, run, jobs, conds, [Path(r["path"]) for r in rows], out, world)
    distributed.barrier()  # every rank's PNGs are written
    if world.rank == 0:
        write_outputs(args, out, sources, jobs, pairs, rows, paths)
    distributed.close()


def write_outputs(args, out: Path, sources, jobs, pairs, rows, paths):
    """grid.png (read back from the PNGs it shows) and synthetic.csv, written last: a finished job's mark."""
    recon = args.mode == "reconstruction"
    groups = len(paths) if recon else len(pairs)  # jobs come source by source / pair by pair
    shown = len(jobs) // groups * min(groups, 8)
    results = [(*jobs[k], load_png(out / rows[k]["path"])) for k in range(shown)]
    (reconstruction_grid(sources, results, paths, args.num) if recon else
     interpolation_grid(sources, results, pairs[:8])).save(out / "grid.png")
    hub.write_csv_atomic(out / "synthetic.csv", rows)
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
