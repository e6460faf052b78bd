"""Zero-shot lung segmentation with DiffSeg on the UNet's self-attention (DiNO-Diffusion Sec. 2.4.4), scored by Dice.

A diffusion model that can denoise a CXR must know which pixels belong together, and its self-attention says
so: the rows of the attention of pixels on one lung look alike. Per image: the VAE posterior mean as latent
(no noise, as the DiffSeg reference), ONE UNet forward at t = --timestep conditioned on the image's own c_GLB
(or zeros: the ablation, and vanilla SD's unconditional input), then DiffSeg (diffseg.py) merges the attention
of a grid of anchors into K unnamed segments. A rule picks the lung segments (segment_lungs.py: `dice` is
the paper's NMS reading, next to an oracle, the DiffSeg benchmark's Hungarian matching and image-blind
baselines that say what the segment count alone buys).
"""

from __future__ import annotations

import argparse
import itertools
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import checkpoint
import cli
import distributed
import hub
import pipeline
from data.datasets import open_dataset
from data.readers import ImageReadError, read_image
from data.transforms import preprocess_cxr, preprocess_mask
from diffseg import auto_threshold, diffseg, self_attention
from generate import encode_images
from segment_lungs import mask_baselines, report, saved_result, segment_image, write_table

EPILOG = """Writes labels/<stem>.png (segment ids 0..K-1), overlays/<stem>.png (segments in colour, the lung mask's
contour in yellow), overlays.png (the first 8) and, with masks, dice.csv and summary.json (means of every
rule and baseline, the settings, the mean threshold used). --checkpoints all (step_XXXXXXX/) and --search
(e.g. timestep300_threshold0.05_grid16/) write one report per setting and summary.csv at the top, best first.
A rerun into the same --out segments only the images that some setting lacks; torchrun
--nproc_per_node N -- segment.py ... deals image j to rank j % N."""


def threshold_value(text: str):
    """--threshold: 'auto' (diffseg.auto_threshold) or a number > 0."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return cli.positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto or > 0, got {text!r}") from None


def one_of(*options):
    """An argparse type: one of `options`."""
    def parse(text: str) -> str:
        if text not in options:
            raise argparse.ArgumentTypeError(f"expected {' or '.join(options)}, got {text!r}")
        return text
    return parse


# The DiffSeg settings --search can vary: (flag type, default, default in vanilla mode (the paper's SD 1.5
# setting), help). The UNet runs once per (timestep, context); the other settings reuse its attention.
SEARCH = {
    "timestep": (cli.nonneg_int, 300, 300, "UNet timestep (paper: 300)"),
    "context": (one_of("own", "zeros"), "own", "zeros", "condition: the image's own c_GLB, or zeros"),
    "threshold": (threshold_value, "auto", 0.5, "KL merge threshold: a number, or auto = the 0.1 quantile of the "
                  "image's own anchor-anchor KL distances, which follows the model's distance scale (diffseg.py)"),
    "grid": (cli.number(int, 2), 16, 32, "anchor grid side M"),
    "iterations": (cli.positive_int, 3, 3, "merge iterations (reference: 3)"),
    "upsample": (one_of("bilinear", "nearest"), "bilinear", "bilinear",
                 "maps -> image size: bilinear then argmax (reference), or nearest: argmax then repeat"),
}


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG, formatter_class=cli.HelpFormatter)
    m = p.add_argument_group("model (either --run, or --unet and --vae for the vanilla-SD baseline)")
    m.add_argument("--run", metavar="RUN_DIR", help="run directory written by train.py (default: none, then --unet)")
    m.add_argument("--step", type=cli.nonneg_int, help="checkpoint step (default: newest)")
    m.add_argument("--checkpoints", choices=["latest", "all"], default="latest",
                   help="latest: one report; all: one report per checkpoint of the run + a sweep summary")
    m.add_argument("--no-ema", action="store_true", help="raw UNet weights even when EMA weights exist")
    for name in ("unet", "vae"):
        m.add_argument(f"--{name}", help=f"vanilla mode (paper: SD 1.5, 512 px): {name.upper()} source (Hub id, "
                       "diffusers folder or weights file; default: none, use --run)")
        m.add_argument(f"--{name}-subfolder", help=f"subfolder of --{name} holding it ('' = none; default: "
                       f"'{name}' for a Hub id or a folder that has one)")
    d = p.add_argument_group("data")
    d.add_argument("--images", required=True, metavar="PATH", help="folder of PNG/JPEG/DICOM, or a CSV")
    d.add_argument("--masks", metavar="DIR", help="lung masks (255 = lung), the images' relative paths and stems "
                   "(default: none; a CSV's 'mask' column)")
    d.add_argument("--image-column", help="CSV image column (default: 'path', else 'Path', else 'image')")
    cli.add_data_flags(d, labels=False)  # --path-column (as --image-column), --image-root
    d.add_argument("--mask-column", help="CSV mask column (default: 'mask' when present)")
    d.add_argument("--resize-masks", action="store_true", help="nearest-resize masks of another size than "
                   "their image (default: error)")
    d.add_argument("--out", required=True, metavar="DIR", help="output folder: labels/, overlays/, dice.csv, ...")
    d.add_argument("--overwrite", action="store_true", help="empty an --out of other settings and start clean")
    d.add_argument("--limit", type=cli.positive_int, help="only the first N images (default: all)")
    s = p.add_argument_group("DiffSeg")
    s.add_argument("--size", type=cli.positive_int, help="image side S (default: the run's image_size; vanilla 512)")
    for key, (kind, default, vanilla, text) in SEARCH.items():
        other = f"; vanilla: {vanilla}" if vanilla != default else ""
        s.add_argument(f"--{key}", type=kind, help=f"{text} (default: {default}{other})")
    s.add_argument("--refine", action="store_true", help="k-means refinement of the object maps")
    s.add_argument("--search", nargs="+", metavar="KEY=V1,V2", help='grid search, e.g. "threshold=auto,0.05 '
                   'grid=8,16 timestep=100,300" (default: none); keys: ' + ", ".join(SEARCH))
    s.add_argument("--batch-size", type=cli.positive_int, default=4, help="images per UNet forward")
    s.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    args = p.parse_args(argv)
    vanilla = args.unet is not None or args.vae is not None
    if vanilla == (args.run is not None) or (vanilla and not (args.unet and args.vae)):
        p.error("give either --run RUN_DIR, or both --unet and --vae (vanilla-SD baseline)")
    if vanilla and (args.step is not None or args.checkpoints == "all" or args.context == "own"):
        p.error("vanilla mode has no checkpoints and no DINO: --step, --checkpoints all, --context own need --run")
    if args.step is not None and args.checkpoints == "all":
        p.error("--step and --checkpoints all exclude each other")
    for key, (_, default, vanilla_default, _) in SEARCH.items():
        if getattr(args, key) is None:
            setattr(args, key, vanilla_default if vanilla else default)
    return args


def settings_grid(args) -> tuple[list[dict], list[str]]:
    """-> every combination of the --search values (dicts over SEARCH; a key not searched keeps its flag's
    value) and the searched keys, in SEARCH order."""
    values, searched = {k: [getattr(args, k)] for k in SEARCH}, []
    for token in " ".join(args.search or []).split():
        key, _, texts = token.partition("=")
        if key not in SEARCH or not texts:
            cli.fail(f"--search {token!r}: expected KEY=V1,V2,... with KEY in {list(SEARCH)}")
        values[key], searched = [], searched + [key]
        for text in texts.split(","):
            try:
                values[key].append(SEARCH[key][0](text))
            except argparse.ArgumentTypeError as e:
                cli.fail(f"--{key} {text}: {e}")
    if "own" in values["context"] and args.run is None:
        cli.fail("--context own needs --run (the vanilla mode has no DINO)")
    combos = [dict(zip(values, combo)) for combo in itertools.product(*values.values())]
    return combos, [k for k in SEARCH if k in searched]


def read_inputs(args, size: int, channels: int):
    """-> items [(stem, image path, mask path or None)], images float32 [N, channels, S, S] (3: a colour run's
    RGB), masks bool [N, S, S] or None, skipped [(path, reason)]. `open_dataset` lists the images and pairs the
    masks (--masks DIR, or a CSV's --mask-column); masks are cropped and resized like their image."""
    src = Path(args.images)
    if not (src.is_dir() or (src.suffix.lower() == ".csv" and src.is_file())):
        cli.fail(f"--images {src}: expected a folder of images or a .csv file")
    try:
        data = open_dataset(src, None, masks=args.masks, mask_column=args.mask_column or None,
                            path_column=args.path_column or args.image_column, image_root=args.image_root)
    except (ValueError, OSError) as e:
        cli.fail(f"--images {src}: {e}")
    mask_paths = data.masks  # None where a --mask-column cell is blank
    items = [(Path(p).stem, str(p), m and str(m)) for p, m in zip(data.paths, mask_paths or [None] * len(data.paths))]
    items = items[: args.limit]
    if len({stem for stem, _, _ in items}) < len(items):
        cli.fail(f"--images {src}: file stems must be unique (outputs are named by stem)")
    missing = [stem for stem, _, m in items if mask_paths and m is None]
    if missing:
        cli.fail(f"no mask for {len(missing)} image(s), e.g. {missing[:5]} (--mask-column {args.mask_column})")
    kept, images, masks, skipped = [], [], [], []
    for stem, path, mask_path in tqdm(items, desc="reading", leave=False):
        try:
            img, mask = read_image(path, channels), None if mask_path is None else read_image(mask_path)
        except ImageReadError as e:
            warnings.warn(f"skipping {path}: {e}", stacklevel=2)
            skipped.append((path, str(e)))
            continue
        if mask is not None and mask.shape != img.shape[:2]:
            if not args.resize_masks:
                cli.fail(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {path} "
                         f"is {img.shape[1]}x{img.shape[0]} (W x H); --resize-masks resizes masks")
            mask = np.array(Image.fromarray(mask).resize(img.shape[1::-1], Image.NEAREST))
        images.append(preprocess_cxr(img, size))
        if mask is not None:
            masks.append(preprocess_mask(mask, img, size)[0].bool())
            if not masks[-1].any():
                warnings.warn(f"mask {mask_path} is empty: no segment is selected, Dice 1.0", stacklevel=2)
        kept.append((stem, path, mask_path))
    if not kept:
        cli.fail("no readable images: " + "; ".join(r for _, r in skipped[:3]))
    return kept, torch.stack(images), (torch.stack(masks) if masks else None), skipped


def load_models(args, device):
    """-> unet, vae, dino (None in vanilla mode), run config, checkpoint steps to evaluate ([None]: vanilla)."""
    if args.run is None:
        def sub(source, given, default):  # as given ('' = none); else default, unless a file or a folder without it
            path = Path(source).expanduser()
            no_default = path.is_file() or (path.is_dir() and not (path / default).is_dir())
            return given or None if given is not None or no_default else default

        unet = pipeline.build_unet(args.unet, None, sub(args.unet, args.unet_subfolder, "unet"))
        vae = pipeline.build_vae(args.vae, None, sub(args.vae, args.vae_subfolder, "vae"))
        return pipeline.freeze(unet.to(device)), pipeline.freeze(vae.to(device)), None, {}, [None]
    run = pipeline.load_run(args.run, ema=not args.no_ema, step=args.step, device=device)
    steps = [s for s, _ in pipeline.checkpoints(args.run)] if args.checkpoints == "all" else [run.step]
    return run.unet, run.vae, run.dino, run.config, steps


class Inputs(NamedTuple):
    items: list  # (stem, image path, mask path or None), every rank's images
    images: torch.Tensor  # [N, channels, S, S]
    masks: torch.Tensor | None  # [N, S, S] bool
    skipped: list  # unreadable images: (path, reason)
    mine: list[int]  # this rank's image indices (j % N == rank): the rows of latents and contexts
    latents: torch.Tensor  # [n, 4, S/8, S/8]
    contexts: dict  # {"zeros" / "own": [n, G, D]}


def prepare(args, combos, world: distributed.World):
    """-> UNet, checkpoint steps, size and the Inputs, encoded once for every setting; --size and --grid are
    checked and only then --out claimed (a failed start leaves no output folder)."""
    try:
        unet, vae, dino, cfg, steps = load_models(args, world.device)
    except (FileNotFoundError, hub.CheckpointError) as e:
        cli.fail(f"cannot load the model: {e}")
    factor = vae.config.downsample_factor
    size = args.size or cfg.get("image_size") or unet.config.sample_size * factor
    multiple = factor * 2 ** (len(unet.config.block_out_channels) - 1)
    if size % multiple:
        cli.fail(f"--size {size} must be a multiple of {multiple} (VAE factor x UNet downsampling)")
    items, images, masks, skipped = read_inputs(args, size, pipeline.run_channels(cfg))
    mine = distributed.mine(len(items), world)
    js = mine or [0]  # [0]: a rank without images (N > images) still checks --grid
    batches = [images[js[i : i + args.batch_size]].to(world.device) for i in range(0, len(js), args.batch_size)]
    latents = torch.cat([encode_images(vae, x) for x in batches])
    contexts = {"zeros": latents.new_zeros(len(js), 1, unet.config.cross_attention_dim)}
    if any(c["context"] == "own" for c in combos):
        contexts["own"] = torch.cat([pipeline.condition(dino, x) for x in batches])
    _, res = self_attention(unet, latents[:1], contexts[combos[0]["context"]][:1], combos[0]["timestep"])
    bad = sorted({c["grid"] for c in combos if c["grid"] > min(res)})
    if bad:
        cli.fail(f"--grid {bad}: the attention grid at --size {size} is {res[0]}x{res[1]}; "
                 f"use a grid between 2 and {min(res)} or a larger --size")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "device", "batch_size")}
    distributed.claim_output(args.out, settings, world, overwrite=args.overwrite)
    return unet, steps, size, Inputs(items, images, masks, skipped, mine, latents, contexts)


def segment_mine(args, unet, combos, folders, size, x: Inputs, world, desc):
    """DiffSeg on this rank's images for every setting -> per setting [(image index, threshold used, row)] of
    every rank. An image a previous run completed in every setting of its forward is read back, not redone."""
    done = [[] for _ in combos]
    for timestep, ctx in sorted({(c["timestep"], c["context"]) for c in combos}):  # one forward each
        group = [i for i, c in enumerate(combos) if (c["timestep"], c["context"]) == (timestep, ctx)]
        todo = []  # positions in x.mine (the rows of latents and contexts) of the images to segment
        for p, j in enumerate(x.mine):
            saved = [saved_result(folders[i], x.items[j][0]) for i in group]
            if None in saved:
                todo.append(p)
            else:
                for i, (t, row) in zip(group, saved):
                    done[i].append((j, t, row))
        bar = distributed.Progress(len(todo), world, f"{desc} t={timestep} {ctx}")
        for b in (todo[p : p + args.batch_size] for p in range(0, len(todo), args.batch_size)):
            attn, res = self_attention(unet, x.latents[b], x.contexts[ctx][b], timestep)
            for i in group:  # every setting of this forward reuses its attention
                c = combos[i]
                for j, a in zip([x.mine[p] for p in b], attn):
                    t = auto_threshold(a, res, c["grid"]) if c["threshold"] == "auto" else c["threshold"]
                    lab = diffseg(a[None], c["grid"], t, c["iterations"], size, res, c["upsample"], args.refine)
                    gt = None if x.masks is None else x.masks[j]
                    done[i].append((j, t, segment_image(lab[0].cpu(), x.images[j, 0], gt, *x.items[j][:2],
                                                        folders[i], t)))
            bar.update(len(b))
        bar.close()
    return [sorted(distributed.gather(d), key=lambda e: e[0]) for d in done]  # every rank's, in image order


def main(argv=None):
    args = parse_args(argv)
    world = distributed.init(args.device)
    combos, searched = settings_grid(args)
    unet, steps, size, x = prepare(args, combos, world)
    baselines = mask_baselines(x.masks) if x.masks is not None and len(x.masks) >= 2 else {}  # image-blind Dice
    out, sweep, summaries = Path(args.out), args.checkpoints == "all", []
    for step in steps:
        weights = None if step is None else checkpoint.unet_file(args.run, step, ema=not args.no_ema)  # as load_run
        if sweep:  # load_run loaded the newest; the sweep swaps the UNet weights in place
            unet.load_state_dict(hub.load_state_dict_file(weights), strict=True)
        folders = [out.joinpath(*([f"step_{step:07d}"] if sweep else []), "_".join(f"{k}{c[k]}" for k in searched))
                   for c in combos]
        done = segment_mine(args, unet, combos, folders, size, x, world,
                            "segmenting" + (f" step {step}" if sweep else ""))
        for i, c in enumerate(combos if world.rank == 0 else []):  # rank 0 writes the reports
            rows = [row | {f"dice_baseline_{name}": s[j].item() for name, s in baselines.items()}
                    for j, _, row in done[i]]
            meta = {"settings": c | {"step": step, "refine": args.refine, "size": size}, "step": step,
                    "run": args.run, "unet": args.unet, "vae": args.vae, "weights": weights and str(weights),
                    "ema": not args.no_ema, "skipped": x.skipped,
                    "mean_threshold_used": float(np.mean([t for _, t, _ in done[i]]))}
            summaries.append(report(folders[i], rows, meta, x.images))
    if (sweep or searched) and world.rank == 0:
        write_table(out, summaries, (["step"] if sweep else []) + searched)
    distributed.close()
    return summaries


if __name__ == "__main__":
    cli.main_guard(main)
