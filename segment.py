"""Zero-shot lung segmentation with DiffSeg on the UNet's self-attention (DiNO-Diffusion Sec. 2.4.4), scored by Dice.

Per image: preprocess like training (`data.transforms.preprocess_cxr`, side --size, default the run's
image_size); latent = VAE posterior MEAN * scaling_factor (`generate.encode_images`; no noise, as the DiffSeg
reference); ONE UNet forward at t = --timestep with the image's own c_GLB (--context own) or zeros (the ablation,
and vanilla SD's unconditional input), its self-attention maps aggregated as they arrive; then DiffSeg (step by
step in diffseg.py): --grid anchors merged by symmetric KL below --threshold (auto, the default with --run: set
per image, `diffseg.auto_threshold`; summary.json records the mean used) for --iterations rounds, every pixel to
its nearest object map. Written: labels/<stem>.png (ids 0..K-1), overlays/<stem>.png (segments in colour, the
ground-truth lung contour in yellow), overlays.png (the first 8); a warning names --threshold whenever most
images end as one segment. Masks are cropped and resized like their image (`preprocess_mask`; another size is
an error unless --resize-masks); an unreadable image is skipped with a warning and listed (summary.json skipped).

The segments have no names, so a rule picks the lung (`eval.segmentation` explains three): `dice` is `nms_dice`,
the paper's "candidate masks evaluated by their Dice score and selected via non-maximum suppression" (segments
whose majority of pixels is lung). dice.csv: image, path, dice, dice_best_union (oracle), dice_nms,
dice_hungarian (the DiffSeg benchmark protocol), num_segments and the image-blind baselines dice_baseline_blocks
(rule nms on as many square blocks as segments: what the count alone buys) and, with 2+ masks,
dice_baseline_all_foreground / dice_baseline_prior (every pixel lung / the leave-one-out mean mask).
summary.json: mean_dice, std_dice (ddof 0), n, the per-rule and baseline means, mean_num_segments, settings.
--checkpoints all (step_XXXXXXX/) and --search (e.g. timestep300_threshold0.05_grid16/; the UNet runs once per
image, timestep and context) write one report per setting and summary.csv/.json at the top, best first.
--out holds one job (`cli.claim_output`), claimed after inputs, model and --grid are checked. Resumable: files are
written atomically, labels/<stem>.json (the image's dice.csv row and threshold used) last, so a rerun into
the same --out reads back the images complete in every setting of their forward and segments only the rest.
Vanilla SD (paper: SD 1.5, threshold 0.5, grid 32, 512 px): --unet and --vae instead of --run.
`torchrun --nproc_per_node N -- segment.py ...` deals image j to rank j % N; rank 0 writes the same reports.
No noise is drawn anywhere.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import cli
import distributed
import hub
import pipeline
from data.readers import ImageReadError, list_images, path_column_of, read_image, resolve_path
from data.transforms import preprocess_cxr, preprocess_mask
from diffseg import auto_threshold, diffseg, self_attention
from eval.segmentation import mask_baselines, report, saved_result, segment_image, write_table
from generate import encode_images

# ---------------------------------------------------------------------------------------------- flags


def threshold_value(text: str):
    """--threshold: 'auto' (diffseg.auto_threshold) or a number > 0."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return cli.positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number > 0, got {text!r}") from None


# --search KEY: (parse one value, valid?, what is valid); the UNet runs once per (timestep, context)
SEARCH = {"timestep": (int, lambda v: v >= 0, ">= 0"),
          "context": (str, lambda v: v in ("own", "zeros"), "own or zeros"),
          "threshold": (lambda v: v if v == "auto" else float(v), lambda v: v == "auto" or v > 0, "auto or > 0"),
          "grid": (int, lambda v: v >= 2, ">= 2"), "iterations": (int, lambda v: v >= 1, ">= 1"),
          "upsample": (str, lambda v: v in ("bilinear", "nearest"), "bilinear or nearest")}


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.",
                           formatter_class=cli.HelpFormatter)
    m = p.add_argument_group("model (either --run, or --unet and --vae for the vanilla-SD baseline)")
    m.add_argument("--run", metavar="RUN_DIR", help="run directory written by train.py (default: none, then --unet)")
    m.add_argument("--step", type=cli.nonneg_int, help="checkpoint step (default: newest)")
    m.add_argument("--checkpoints", choices=["latest", "all"], default="latest",
                   help="latest: one report; all: one report per checkpoint of the run + a sweep summary")
    m.add_argument("--no-ema", action="store_true", help="raw UNet weights even when EMA weights exist")
    for name in ("unet", "vae"):
        m.add_argument(f"--{name}", help=f"vanilla mode: {name.upper()} source (Hub id, diffusers folder or "
                       "weights file; default: none, use --run)")
        m.add_argument(f"--{name}-subfolder", help=f"subfolder of --{name} holding it ('' = none; default: "
                       f"'{name}' for a Hub id or a folder that has one)")
    d = p.add_argument_group("data")
    d.add_argument("--images", required=True, metavar="PATH", help="folder of PNG/JPEG/DICOM, or a CSV")
    d.add_argument("--masks", metavar="DIR", help="lung masks (255 = lung) matched by file stem (default: none)")
    d.add_argument("--image-column", help="CSV image column (default: 'path', else 'image')")
    cli.add_data_flags(d, labels=False)  # --path-column (as --image-column), --image-root
    d.add_argument("--mask-column", help="CSV mask column (default: 'mask' when present and no --masks)")
    d.add_argument("--resize-masks", action="store_true", help="nearest-resize masks of another size than "
                   "their image (default: error)")
    d.add_argument("--out", required=True, metavar="DIR", help="output folder: labels/, overlays/, dice.csv, ...")
    d.add_argument("--overwrite", action="store_true", help="empty an --out of other settings and start clean")
    d.add_argument("--limit", type=cli.positive_int, help="only the first N images (default: all)")
    s = p.add_argument_group("DiffSeg")
    s.add_argument("--size", type=cli.positive_int, help="image side S (default: the run's image_size; vanilla 512)")
    s.add_argument("--timestep", type=cli.nonneg_int, default=300, help="UNet timestep (paper: 300)")
    s.add_argument("--context", choices=["own", "zeros"], help="c_GLB of the image (default) or zeros")
    s.add_argument("--threshold", type=threshold_value, help="KL merge threshold: a number, or 'auto' = the 0.1 "
                   "quantile of the image's own pairwise anchor KL distances, which follows the model's distance "
                   "scale (rule: diffseg.py) (default: auto; vanilla 0.5, the paper's SD 1.5 value)")
    s.add_argument("--grid", type=cli.number(int, 2), help="anchor grid side M (default 16; vanilla 32)")
    s.add_argument("--iterations", type=cli.positive_int, default=3, help="merge iterations (reference: 3)")
    s.add_argument("--upsample", choices=["bilinear", "nearest"], default="bilinear",
                   help="maps -> image size: bilinear then argmax (reference), or argmax then nearest")
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
    args.context = args.context or ("zeros" if vanilla else "own")
    args.threshold = args.threshold if args.threshold is not None else (0.5 if vanilla else "auto")
    args.grid = args.grid if args.grid is not None else (32 if vanilla else 16)
    return args


def settings_grid(args) -> tuple[list[dict], list[str]]:
    """-> every combination of the --search values (dicts over SEARCH) and the searched keys, in SEARCH order."""
    values, searched = {k: [getattr(args, k)] for k in SEARCH}, set()
    for token in " ".join(args.search or []).split():
        key, _, vals = token.partition("=")
        if key not in SEARCH or not vals:
            raise SystemExit(f"--search {token!r}: expected KEY=V1,V2,... with KEY in {list(SEARCH)}")
        try:
            values[key] = [SEARCH[key][0](v) for v in vals.split(",")]
        except ValueError as e:
            raise SystemExit(f"--search {token!r}: {e}") from e
        searched.add(key)
    for key, vals in values.items():
        for v in vals:
            if not SEARCH[key][1](v):
                raise SystemExit(f"--{key} {v}: expected {SEARCH[key][2]}")
    if "own" in values["context"] and args.run is None:
        raise SystemExit("--context own needs --run (the vanilla mode has no DINO)")
    combos = [dict(zip(values, combo)) for combo in itertools.product(*values.values())]
    return combos, [k for k in SEARCH if k in searched]


# ---------------------------------------------------------------------------------------------- inputs, models


def list_inputs(args) -> list[tuple[str, Path, Path | None]]:
    """(stem, image path, mask path or None) per input image, in sorted/CSV order."""
    src, masks = Path(args.images), None
    if src.suffix.lower() == ".csv" and src.is_file():
        with open(src, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        cols = list(rows[0]) if rows else []
        try:
            img_col = path_column_of(cols, args.path_column or args.image_column, f"--images {src}")
        except ValueError as e:
            raise SystemExit(str(e)) from e
        mask_col = args.mask_column or ("mask" if "mask" in cols and not args.masks else None)
        if mask_col is not None and mask_col not in cols:
            raise SystemExit(f"--images {src}: no column {mask_col!r} (columns: {cols})")
        root = Path(args.image_root) if args.image_root else src.parent
        images = [Path(resolve_path(r[img_col], root)) for r in rows]
        masks = [Path(resolve_path(r[mask_col], root)) if r[mask_col] else None for r in rows] if mask_col else None
    elif src.is_dir():
        images = list_images(src)
    else:
        raise SystemExit(f"--images {src}: expected a folder of images or a .csv file")
    images = images[: args.limit] if args.limit else images
    stems = [p.stem for p in images]
    if not images:
        raise SystemExit(f"--images {src}: no images found")
    if len(set(stems)) < len(stems):
        raise SystemExit(f"--images {src}: file stems must be unique (outputs are named by stem)")
    if args.masks:
        if not Path(args.masks).is_dir():
            raise SystemExit(f"--masks {args.masks}: not a folder")
        by_stem = {p.stem: p for p in list_images(args.masks)}
        masks = [by_stem.get(s) for s in stems]
    missing = [s for s, m in zip(stems, masks or stems) if m is None]
    if missing:
        raise SystemExit(f"no mask for {len(missing)} image(s), e.g. {missing[:5]} (masks: {args.masks or src})")
    return list(zip(stems, images, masks or [None] * len(images)))


def load_inputs(items, size: int, resize_masks: bool, channels: int = 1):
    """-> kept items, images float32 [N, channels, S, S] (3: a colour run's RGB), masks bool [N, S, S] or None,
    skipped [(path, reason)]."""
    kept, images, masks, skipped = [], [], [], []
    for stem, path, mask_path in tqdm(items, desc="reading", leave=False):
        try:
            img, mask = read_image(path, channels), None if mask_path is None else read_image(mask_path)
        except ImageReadError as e:
            warnings.warn(f"skipping {path}: {e}", stacklevel=2)
            skipped.append((str(path), str(e)))
            continue
        if mask is not None and mask.shape != img.shape[:2]:
            if not resize_masks:
                raise SystemExit(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {path} "
                                 f"is {img.shape[1]}x{img.shape[0]} (W x H); --resize-masks resizes masks")
            mask = np.array(Image.fromarray(mask).resize(img.shape[1::-1], Image.NEAREST))
        images.append(preprocess_cxr(img, size))
        if mask is not None:
            masks.append(preprocess_mask(mask, img, size)[0].bool())
            if not masks[-1].any():
                warnings.warn(f"mask {mask_path} is empty: no segment is selected, Dice 1.0", stacklevel=2)
        kept.append((stem, path, mask_path))
    if not kept:
        raise SystemExit("no readable images: " + "; ".join(r for _, r in skipped[:3]))
    return kept, torch.stack(images), (torch.stack(masks) if masks else None), skipped


def load_models(args, device):
    """-> unet, vae, dino (None in vanilla mode), run config, checkpoint list [(step, path)] to evaluate."""
    if args.run is None:
        def sub(source, given, default):  # as given ('' = none); else default, unless a file or a folder without it
            path = Path(source).expanduser()
            no_default = path.is_file() or (path.is_dir() and not (path / default).is_dir())
            return given or None if given is not None or no_default else default

        unet = pipeline.build_unet(args.unet, None, sub(args.unet, args.unet_subfolder, "unet"))
        vae = pipeline.build_vae(args.vae, None, sub(args.vae, args.vae_subfolder, "vae"))
        return pipeline.freeze(unet.to(device)), pipeline.freeze(vae.to(device)), None, {}, [(None, None)]
    if not Path(args.run, "config.json").is_file():
        raise SystemExit(f"--run {args.run}: not a run directory (no config.json)")
    found = [c for c in pipeline.checkpoints(args.run) if args.step is None or c[0] == args.step]
    if not found:
        what = "any checkpoint" if args.step is None else f"step {args.step}"
        raise SystemExit(f"--run {args.run}: checkpoints/ has no {what}")
    run = pipeline.load_run(args.run, ema=not args.no_ema, step=found[-1][0], device=device)
    return run.unet, run.vae, run.dino, run.config, found if args.checkpoints == "all" else found[-1:]


# ---------------------------------------------------------------------------------------------- main


class Inputs(NamedTuple):
    items: list  # (stem, image path, mask path or None), every rank's images
    images: torch.Tensor  # [N, 1, S, S]
    masks: torch.Tensor | None  # [N, S, S] bool
    skipped: list  # unreadable images: (path, reason)
    mine: list[int]  # this rank's image indices (torchrun: j % N == rank), the rows of latents and contexts
    latents: torch.Tensor  # [n, 4, S/8, S/8]
    contexts: dict  # {"zeros" / "own": [n, G, D]}


def prepare(args, combos, world: distributed.World):
    """-> UNet, checkpoints, size and the Inputs, encoded once for every setting; --size and --grid checked and
    only then --out claimed (a failed start leaves no output folder)."""
    try:
        unet, vae, dino, cfg, ckpts = load_models(args, world.device)
    except (FileNotFoundError, hub.CheckpointError) as e:
        raise SystemExit(f"cannot load the model: {e}") from e
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = args.size or cfg.get("image_size") or unet.config.sample_size * factor
    multiple = factor * 2 ** (len(unet.config.block_out_channels) - 1)
    if size % multiple:
        raise SystemExit(f"--size {size} must be a multiple of {multiple} (VAE factor x UNet downsampling)")
    items, images, masks, skipped = load_inputs(list_inputs(args), size, args.resize_masks, pipeline.run_channels(cfg))
    mine = distributed.mine(len(items), world)  # image j -> rank j % N (plain python: all of them)

    def encode(js):  # latents and contexts of images js, --batch-size at a time
        batches = [images[js[i : i + args.batch_size]].to(world.device) for i in range(0, len(js), args.batch_size)]
        z = torch.cat([encode_images(vae, x) for x in batches])
        own = any(c["context"] == "own" for c in combos)
        return z, {"zeros": z.new_zeros(len(js), 1, unet.config.cross_attention_dim)} | (
            {"own": torch.cat([pipeline.condition(dino, x) for x in batches])} if own else {})

    latents, contexts = encode(mine or [0])  # [0]: a rank without images (N > images) still checks --grid
    _, res = self_attention(unet, latents[:1], contexts[combos[0]["context"]][:1], combos[0]["timestep"])
    bad = sorted({c["grid"] for c in combos if not 2 <= c["grid"] <= min(res)})
    if bad:
        raise SystemExit(f"--grid {bad}: the attention grid at --size {size} is {res[0]}x{res[1]}; "
                         f"use a grid between 2 and {min(res)} or a larger --size")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "device", "batch_size")}
    distributed.claim_output(args.out, settings, world, overwrite=args.overwrite)
    return unet, ckpts, size, Inputs(items, images, masks, skipped, mine, latents, contexts)


def segment_mine(args, unet, combos, folders, size, x: Inputs, world, desc):
    """DiffSeg on this rank's images for every setting, but for those a previous run completed (an image is
    redone when any setting of its forward lacks it) -> per setting [(image index, threshold used, row)]."""
    done = [[] for _ in combos]
    for timestep, ctx in sorted({(c["timestep"], c["context"]) for c in combos}):  # one forward each
        group = [i for i, c in enumerate(combos) if (c["timestep"], c["context"]) == (timestep, ctx)]
        saved = [[saved_result(folders[i], x.items[j][0]) for i in group] for j in x.mine]  # [image][setting]
        todo = [p for p, r in enumerate(saved) if None in r]  # positions in x.mine: rows of latents, contexts
        for j, r in zip(x.mine, saved):
            for i, (t, row) in zip(group, r if None not in r else []):  # complete: every setting's outputs
                done[i].append((j, t, row))
        bar = distributed.Progress(len(todo), world, f"{desc} t={timestep} {ctx}")
        for b in (todo[p : p + args.batch_size] for p in range(0, len(todo), args.batch_size)):
            attn, res = self_attention(unet, x.latents[b], x.contexts[ctx][b], timestep)
            for c, i in ((combos[i], i) for i in group):  # every setting of this forward reuses its attention
                for j, a in zip([x.mine[p] for p in b], attn):
                    t = auto_threshold(a, res, c["grid"]) if c["threshold"] == "auto" else c["threshold"]
                    lab = diffseg(a[None], c["grid"], t, c["iterations"], (size, size), res, c["upsample"],
                                  args.refine)[0].cpu()
                    done[i].append((j, t, segment_image(lab, x.images[j, 0], None if x.masks is None else
                                                        x.masks[j], *x.items[j][:2], folders[i], t)))
            bar.update(len(b))
        bar.close()
    return [sorted(distributed.gather(d), key=lambda e: e[0]) for d in done]  # every rank's, in image order


def main(argv=None):
    args = parse_args(argv)
    world = distributed.init(args.device)
    combos, searched = settings_grid(args)
    unet, ckpts, size, x = prepare(args, combos, world)
    baselines = mask_baselines(x.masks) if x.masks is not None and len(x.masks) >= 2 else {}  # image-blind Dice
    out, sweep, summaries = Path(args.out), args.checkpoints == "all", []
    for step, path in ckpts:
        weights = None  # the file load_run read: the EMA twin when present and wanted
        if path is not None:
            twin = path.with_name(path.name.replace(".safetensors", ".ema.safetensors"))
            weights = twin if not args.no_ema and twin.is_file() else path
        if sweep:  # load_run loaded the newest; the sweep swaps the UNet weights in place
            unet.load_state_dict(hub.load_state_dict_file(weights), strict=True)
        folders = [out.joinpath(*([f"step_{step:07d}"] if sweep else []), "_".join(f"{k}{c[k]}" for k in searched))
                   for c in combos]
        for folder, sub in itertools.product(folders, ("labels", "overlays")):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        done = segment_mine(args, unet, combos, folders, size, x, world,
                            "segmenting" + (f" step {step}" if sweep else ""))
        for i, c in enumerate(combos if distributed.is_main() else []):  # rank 0 writes the reports
            rows = [row | {f"dice_baseline_{name}": s[j].item() for name, s in baselines.items()}
                    for j, _, row in done[i]]
            meta = {"settings": c | {"step": step, "refine": args.refine, "size": size}, "step": step,
                    "run": args.run, "unet": args.unet, "vae": args.vae, "weights": weights and str(weights),
                    "ema": not args.no_ema, "skipped": x.skipped,
                    "mean_threshold_used": float(np.mean([t for _, t, _ in done[i]]))}
            summaries.append(report(folders[i], rows, meta, x.images))
    if (sweep or searched) and distributed.is_main():
        write_table(out, summaries, (["step"] if sweep else []) + searched)
    distributed.close()
    return summaries


if __name__ == "__main__":
    cli.main_guard(main)
