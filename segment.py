"""Zero-shot lung segmentation with DiffSeg on the UNet's self-attention (DiNO-Diffusion Sec. 2.4.4).

Per image (DiffSeg, Tian et al. 2024; facts in diffseg.py):
1. Read and preprocess like training (`data.transforms.preprocess_cxr`: border removal, centre square, resize
   to --size, default the run's image_size): x [1, 1, S, S] in [0, 1].
2. Latent = VAE posterior MEAN * scaling_factor (`generate.encode_images`); no noise is added (as the DiffSeg
   reference). Context: the image's own c_GLB (`--context own`) or zeros [1, 1, cross_attention_dim]
   (`--context zeros`: the ablation, and the vanilla-SD mode's unconditional input).
3. ONE UNet forward at t = --timestep inside `unet.capture_self_attention(callback=aggregator)`: the 16
   head-averaged attn1 maps are folded into one [N, N] attention on the finest grid as they arrive
   (`diffseg.AttentionAggregator`, N = (S/8)^2), then anchors on a --grid x --grid lattice are merged
   with symmetric KL below --threshold for --iterations rounds (optionally k-means --refine), and every pixel
   takes its nearest object map: a label map [S, S] (--upsample bilinear as the reference, or nearest).
   --threshold auto (the default with --run) is set per image from its own anchor distances
   (`diffseg.auto_threshold`: a fixed value suits one model only); summary.json records the mean used
   (`mean_threshold_used`), and a warning names --threshold whenever most images end as one segment.
4. Written: `labels/<stem>.png` (ids 0..K-1; uint8, uint16 past 255 segments), `overlays/<stem>.png`
   (segments in colour over the CXR, the ground-truth lung contour in yellow when a mask is given) and
   `overlays.png` (the first 8 images above their overlays, captioned with segment count and Dice).

Scoring (with masks; `eval.segmentation.lung_scores`): the segments have no names, so a rule picks the lung.
`dice` (the headline, `--dice-rule`, default `nms`) is the paper's reading "candidate masks evaluated by their
Dice and selected via non-maximum suppression" = `eval.segmentation.nms_dice`: every segment whose majority
of pixels is lung is kept, their union is scored. Also written: dice_best_union (oracle upper bound),
dice_nms, dice_hungarian (the DiffSeg benchmark protocol) and num_segments. Masks are cropped and resized
exactly like their image (`preprocess_mask`, lung = above half the mask's maximum) and Dice is computed at
S x S. A mask whose stored size differs from its image's is an error unless --resize-masks (nearest resize
to the image size first). An empty mask gives a warning; every rule then selects nothing and scores 1.0
(eval.segmentation's documented rule). An unreadable image or mask is skipped with a warning and listed in
summary.json (`skipped`).

Reports: `dice.csv` (image, path, dice, dice_best_union, dice_nms, dice_hungarian, num_segments, and the
image-blind baselines: dice_baseline_blocks = the --dice-rule applied to as many square blocks as there are
segments (`eval.segmentation.block_partition`: how much Dice the segment count alone buys), and with 2+ masks
dice_baseline_all_foreground / dice_baseline_prior = every pixel lung / the leave-one-out mean lung mask
(`eval.segmentation.mask_baselines`)) and `summary.json` (mean_dice, std_dice (ddof 0), n, the per-rule and
baseline means, mean_num_segments, settings, step).
--checkpoints all (one report per checkpoint, `step_XXXXXXX/`) and --search (one report per combination,
e.g. `timestep300_threshold0.05_grid16/`; the UNet runs once per image, timestep and context, and the
aggregated attention is reused for every threshold/grid/iterations/upsample) add `summary.csv` and
`summary.json` at the top: one row per report, sorted by mean Dice (best first).

--out holds one job (`cli.claim_output`): its settings.json records the flags; a rerun with the same flags is
accepted, other flags are refused in one line unless --overwrite. Inputs, model and --grid are checked first,
so a failed start leaves no output folder.

Vanilla SD baseline (paper: SD 1.5, threshold 0.5, grid 32): --unet SOURCE --vae SOURCE instead of --run
(Hub id, diffusers folder or single file); context zeros; defaults threshold 0.5, grid 32, size 512.
Everything is deterministic: no noise is drawn anywhere.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import cli
import hub
import pipeline
from data.readers import ImageReadError, list_images, path_column_of, read_image, resolve_path
from data.transforms import preprocess_cxr, preprocess_mask
from diffseg import AttentionAggregator, auto_threshold, diffseg
from eval.segment_report import report, write_table
from eval.segmentation import RULES, block_partition, lung_scores, mask_baselines, overlay
from generate import encode_images

SEARCH_KEYS = {"timestep": int, "context": str, "threshold": lambda v: v if v == "auto" else float(v),
               "grid": int, "iterations": int, "upsample": str}
VALID = {"timestep": (lambda v: v >= 0, ">= 0"), "context": (lambda v: v in ("own", "zeros"), "own or zeros"),
         "threshold": (lambda v: v == "auto" or v > 0, "auto or > 0"), "grid": (lambda v: v >= 2, ">= 2"),
         "iterations": (lambda v: v >= 1, ">= 1"), "upsample": (lambda v: v in ("bilinear", "nearest"),
                                                               "bilinear or nearest")}
FORWARD_KEYS = ("timestep", "context")  # a UNet forward per value; the others reuse its attention


def threshold_value(text: str):
    """--threshold: 'auto' (diffseg.auto_threshold) or a number > 0."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number > 0, got {text}")
    return value


threshold_value.__name__ = "threshold"


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.",
                                formatter_class=cli.HelpFormatter)
    src = p.add_argument_group("model (either --run, or --unet and --vae for the vanilla-SD baseline)")
    src.add_argument("--run", metavar="RUN_DIR", help="run directory written by train.py (default: none, "
                     "then --unet and --vae)")
    src.add_argument("--step", type=cli.nonneg_int, help="checkpoint step (default: newest)")
    src.add_argument("--checkpoints", choices=["latest", "all"], default="latest",
                     help="latest: one report; all: one report per checkpoint of the run + a sweep summary")
    src.add_argument("--no-ema", action="store_true", help="raw UNet weights even when EMA weights exist")
    src.add_argument("--unet", help="vanilla mode: UNet source (Hub id, diffusers folder or weights file; "
                     "default: none, use --run)")
    src.add_argument("--unet-subfolder", help="subfolder of --unet holding the UNet ('' = none; default: 'unet' "
                     "for a Hub id or a folder that has one)")
    src.add_argument("--vae", help="vanilla mode: VAE source (default: none, use --run)")
    src.add_argument("--vae-subfolder", help="subfolder of --vae holding the VAE ('' = none; default: 'vae' for "
                    "a Hub id or a folder that has one)")
    io = p.add_argument_group("data")
    io.add_argument("--images", required=True, metavar="PATH",
                    help="folder of PNG/JPEG/DICOM, or CSV with an image column")
    io.add_argument("--masks", metavar="DIR", help="lung masks (255 = lung), matched to images by file stem "
                    "(default: none, no Dice)")
    io.add_argument("--image-column", help="CSV image column (default: 'path', else 'image')")
    cli.add_data_flags(io, labels=False)  # --path-column (as --image-column), --image-root
    io.add_argument("--mask-column", help="CSV mask column (default: 'mask' when present and no --masks)")
    io.add_argument("--resize-masks", action="store_true",
                    help="nearest-resize masks whose size differs from their image (default: error)")
    io.add_argument("--out", required=True, metavar="DIR",
                    help="output folder: labels/, overlays/, overlays.png, dice.csv, summary.json")
    io.add_argument("--overwrite", action="store_true",
                    help="empty an --out that holds outputs of other settings and start clean")
    io.add_argument("--limit", type=cli.positive_int, help="only the first N images (default: all)")
    ds = p.add_argument_group("DiffSeg")
    ds.add_argument("--size", type=cli.positive_int,
                    help="image side S (default: the run's image_size; vanilla 512)")
    ds.add_argument("--timestep", type=cli.nonneg_int, default=300, help="UNet timestep (paper: 300)")
    ds.add_argument("--context", choices=["own", "zeros"], help="c_GLB of the image (default) or zeros")
    ds.add_argument("--threshold", type=threshold_value,
                    help="KL merge threshold: a number, or 'auto' = the 0.1 quantile of the image's own "
                         "pairwise anchor KL distances, which follows the model's distance scale (rule: "
                         "diffseg.py) (default: auto; vanilla 0.5, the paper's SD 1.5 value)")
    ds.add_argument("--grid", type=cli.number(int, 2), help="anchor grid side M (default 16; vanilla 32)")
    ds.add_argument("--iterations", type=cli.positive_int, default=3, help="merge iterations (reference: 3)")
    ds.add_argument("--upsample", choices=["bilinear", "nearest"], default="bilinear",
                    help="maps -> image size: bilinear then argmax (reference), or argmax then nearest")
    ds.add_argument("--refine", action="store_true", help="k-means refinement of the object maps")
    ds.add_argument("--search", nargs="+", metavar="KEY=V1,V2",
                    help='grid search, e.g. "threshold=auto,0.05 grid=8,16 timestep=100,300" (default: none); '
                         "keys: " + ", ".join(SEARCH_KEYS))
    ds.add_argument("--dice-rule", choices=RULES, default="nms", help="rule behind the `dice` column")
    rt = p.add_argument_group("runtime")
    rt.add_argument("--batch-size", type=cli.positive_int, default=4, help="images per UNet forward")
    rt.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no",
                    help="UNet autocast dtype (no = float32)")
    rt.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    args = p.parse_args(argv)
    vanilla = args.unet is not None or args.vae is not None
    if vanilla == (args.run is not None) or (vanilla and not (args.unet and args.vae)):
        p.error("give either --run RUN_DIR, or both --unet and --vae (vanilla-SD baseline)")
    if vanilla and (args.step is not None or args.checkpoints == "all" or args.context == "own"):
        p.error("vanilla mode has no checkpoints and no DINO: --step, --checkpoints all, --context own "
                "need --run")
    if args.step is not None and args.checkpoints == "all":
        p.error("--step and --checkpoints all exclude each other")
    args.context = args.context or ("zeros" if vanilla else "own")
    args.threshold = args.threshold if args.threshold is not None else (0.5 if vanilla else "auto")
    args.grid = args.grid if args.grid is not None else (32 if vanilla else 16)
    return args


def settings_grid(args) -> tuple[list[dict], list[str]]:
    """-> every settings combination (dicts over SEARCH_KEYS) and the searched keys, in SEARCH_KEYS order."""
    values = {k: [getattr(args, k)] for k in SEARCH_KEYS}
    searched = []
    for token in " ".join(args.search or []).split():
        key, _, vals = token.partition("=")
        if key not in SEARCH_KEYS or not vals:
            raise SystemExit(f"--search {token!r}: expected KEY=V1,V2,... with KEY in {list(SEARCH_KEYS)}")
        try:
            values[key] = [SEARCH_KEYS[key](v) for v in vals.split(",")]
        except ValueError as e:
            raise SystemExit(f"--search {token!r}: {e}") from e
        searched.append(key)
    for key, vals in values.items():
        for v in vals:
            if not VALID[key][0](v):
                raise SystemExit(f"--{key} {v}: expected {VALID[key][1]}")
    if "own" in values["context"] and args.run is None:
        raise SystemExit("--context own needs --run (the vanilla mode has no DINO)")
    searched = [k for k in SEARCH_KEYS if k in searched]
    return [dict(zip(values, combo)) for combo in itertools.product(*values.values())], searched


def list_inputs(args) -> list[tuple[str, Path, Path | None]]:
    """(stem, image path, mask path or None) per input image, in sorted/CSV order."""
    src = Path(args.images)
    if src.suffix.lower() == ".csv" and src.is_file():
        with open(src, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        cols = list(rows[0]) if rows else []
        try:
            img_col = path_column_of(cols, args.path_column or args.image_column, f"--images {src}")
        except ValueError as e:
            raise SystemExit(str(e)) from e
        mask_col = args.mask_column or ("mask" if "mask" in cols and not args.masks else None)
        for c in (img_col, mask_col):
            if c is not None and c not in cols:
                raise SystemExit(f"--images {src}: no column {c!r} (columns: {cols})")
        root = Path(args.image_root) if args.image_root else src.parent
        images = [Path(resolve_path(r[img_col], root)) for r in rows]
        masks = [Path(resolve_path(r[mask_col], root)) if r[mask_col] else None for r in rows] if mask_col else None
    elif src.is_dir():
        images, masks = list_images(src), None
    else:
        raise SystemExit(f"--images {src}: expected a folder of images or a .csv file")
    images = images[: args.limit] if args.limit else images
    if not images:
        raise SystemExit(f"--images {src}: no images found")
    stems = [p.stem for p in images]
    if len(set(stems)) < len(stems):
        raise SystemExit(f"--images {src}: file stems must be unique (outputs are named by stem)")
    if args.masks:
        if not Path(args.masks).is_dir():
            raise SystemExit(f"--masks {args.masks}: not a folder")
        by_stem = {p.stem: p for p in list_images(args.masks)}
        masks = [by_stem.get(s) for s in stems]
    if masks is not None and None in masks:
        missing = [s for s, m in zip(stems, masks) if m is None]
        raise SystemExit(f"no mask for {len(missing)} image(s), e.g. {missing[:5]} "
                         f"(masks: {args.masks or src})")
    return list(zip(stems, images, masks or [None] * len(images)))


def load_inputs(items, size: int, resize_masks: bool):
    """-> kept items, images float32 [N, 1, S, S], masks bool [N, S, S] or None, skipped [(path, reason)]."""
    kept, images, masks, skipped = [], [], [], []
    for stem, path, mask_path in tqdm(items, desc="reading", leave=False):
        try:
            img = read_image(path)
            mask = None if mask_path is None else read_image(mask_path)
        except ImageReadError as e:
            warnings.warn(f"skipping {path}: {e}", stacklevel=2)
            skipped.append((str(path), str(e)))
            continue
        if mask is not None and mask.shape != img.shape:
            if not resize_masks:
                raise SystemExit(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {path} "
                                 f"is {img.shape[1]}x{img.shape[0]} (W x H); --resize-masks resizes masks")
            mask = np.array(Image.fromarray(mask).resize(img.shape[::-1], Image.NEAREST))
        images.append(preprocess_cxr(img, size))
        if mask is not None:
            masks.append(preprocess_mask(mask, img, size)[0].bool())
            if not masks[-1].any():
                warnings.warn(f"mask {mask_path} is empty: no segment is selected, Dice 1.0", stacklevel=2)
        kept.append((stem, path, mask_path))
    if not kept:
        raise SystemExit("no readable images: " + "; ".join(r for _, r in skipped[:3]))
    return kept, torch.stack(images), (torch.stack(masks) if masks else None), skipped


def _subfolder(source: str, given: str | None, default: str) -> str | None:
    """As given ('' = none); else `default`, except for a file or a local folder that lacks it."""
    path = Path(source).expanduser()
    if given is not None or path.is_file() or (path.is_dir() and not (path / default).is_dir()):
        return given or None
    return default


def load_models(args, device):
    """-> unet, vae, dino (None in vanilla mode), run config, checkpoint list [(step, path)] to evaluate."""
    if args.run is None:
        unet = pipeline.build_unet(args.unet, None, _subfolder(args.unet, args.unet_subfolder, "unet"))
        vae = pipeline.build_vae(args.vae, None, _subfolder(args.vae, args.vae_subfolder, "vae"))
        return pipeline.freeze(unet.to(device)), pipeline.freeze(vae.to(device)), None, {}, [(None, None)]
    if not Path(args.run, "config.json").is_file():
        raise SystemExit(f"--run {args.run}: not a run directory (no config.json)")
    found = pipeline.checkpoints(args.run)
    if args.step is not None:
        found = [c for c in found if c[0] == args.step]
    if not found:
        what = f"step {args.step}" if args.step is not None else "any checkpoint"
        raise SystemExit(f"--run {args.run}: checkpoints/ has no {what}")
    run = pipeline.load_run(args.run, ema=not args.no_ema, step=found[-1][0], device=device)
    return run.unet, run.vae, run.dino, run.config, found if args.checkpoints == "all" else found[-1:]


def unet_weights(path: Path, ema: bool) -> Path:
    """The file load_run would read for a checkpoint: its EMA twin when present and wanted."""
    twin = path.with_name(path.name.replace(".safetensors", ".ema.safetensors"))
    return twin if ema and twin.is_file() else path


@torch.inference_mode()
def self_attention(unet, latents, context, timestep: int, amp) -> tuple[torch.Tensor, tuple[int, int]]:
    """One UNet forward with capture -> aggregated attention [B, N, N] and its grid (h, w)."""
    agg = AttentionAggregator()
    with unet.capture_self_attention(callback=agg), amp:
        unet(latents, timestep, context)
    return agg.result(), agg.resolution


def segment_image(lab, image, gt, stem: str, path, folder: Path, rule: str) -> dict:
    """Save one label map [S, S] and its overlay -> the image's dice.csv row (scores when gt is given)."""
    lab = (torch.bincount(lab.flatten()) > 0).cumsum(0)[lab] - 1  # consecutive ids 0..K-1, order kept
    Image.fromarray(lab.numpy().astype(np.uint8 if lab.max() < 256 else np.uint16)).save(
        folder / "labels" / f"{stem}.png")
    overlay(image, lab, gt).save(folder / "overlays" / f"{stem}.png")
    if gt is None:
        return {"image": stem, "path": str(path), "num_segments": int(lab.max()) + 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty masks were reported, by name, while reading
        scores = lung_scores(lab, gt)
        blocks = block_partition(scores["num_segments"], *lab.shape)  # image-blind, same segment count
        scores["dice_baseline_blocks"] = RULES[rule](blocks, gt).dice
    return {"image": stem, "path": str(path), "dice": scores[f"dice_{rule}"]} | scores


def label_maps(attn, res, c: dict, size: int, refine: bool) -> tuple[torch.Tensor, list[float]]:
    """DiffSeg with the settings `c` on attention [B, N, N] -> label maps [B, S, S] and the thresholds used."""
    ts = [auto_threshold(a, res, c["grid"]) if c["threshold"] == "auto" else c["threshold"] for a in attn]
    labels = [diffseg(a[None], c["grid"], t, c["iterations"], (size, size), res, c["upsample"], refine)[0]
              for a, t in zip(attn, ts)]
    return torch.stack(labels), ts


def check_grid(combos, res, size):
    bad = sorted({c["grid"] for c in combos if not 2 <= c["grid"] <= min(res)})
    if bad:
        raise SystemExit(f"--grid {bad}: the attention grid at --size {size} is {res[0]}x{res[1]}; "
                         f"use a grid between 2 and {min(res)} or a larger --size")


def output_settings(args) -> dict:
    """The arguments that determine segment.py's outputs (cli.claim_output compares them)."""
    return {k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "device", "batch_size")}


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    combos, searched = settings_grid(args)
    try:
        unet, vae, dino, cfg, ckpts = load_models(args, device)
    except (FileNotFoundError, hub.CheckpointError) as e:
        raise SystemExit(f"cannot load the model: {e}") from e
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = args.size or cfg.get("image_size") or unet.config.sample_size * factor
    multiple = factor * 2 ** (len(unet.config.block_out_channels) - 1)
    if size % multiple:
        raise SystemExit(f"--size {size} must be a multiple of {multiple} (VAE factor x UNet downsampling)")
    items, images, masks, skipped = load_inputs(list_inputs(args), size, args.resize_masks)
    amp_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    batches = [slice(i, i + args.batch_size) for i in range(0, len(items), args.batch_size)]
    # latents and contexts once for every checkpoint and setting: [N, 4, S/8, S/8], [N, G, D]
    latents = torch.cat([encode_images(vae, images[b].to(device)) for b in batches])
    contexts = {"zeros": latents.new_zeros(len(items), 1, unet.config.cross_attention_dim)}
    if any(c["context"] == "own" for c in combos):
        contexts["own"] = torch.cat([pipeline.condition(dino, images[b].to(device)) for b in batches])
    baselines = {}  # Dice of image-blind segmenters, for scale (eval.segmentation.mask_baselines)
    if masks is not None and len(masks) >= 2:
        baselines = {k: v.tolist() for k, v in mask_baselines(masks).items()}
    out, sweep = Path(args.out), args.checkpoints == "all"
    # one image's forward tells the attention grid: --grid is checked, and only then is --out claimed
    _, res = self_attention(unet, latents[:1], contexts[combos[0]["context"]][:1], combos[0]["timestep"], amp)
    check_grid(combos, res, size)
    cli.claim_output(out, output_settings(args), overwrite=args.overwrite)
    summaries = []
    for step, path in ckpts:
        weights = None if path is None else unet_weights(path, not args.no_ema)
        if sweep:  # load_run loaded the newest; the sweep swaps the UNet weights in place
            unet.load_state_dict(hub.load_state_dict_file(weights), strict=True)
        prefix = [f"step_{step:07d}"] if sweep else []
        folders = [out.joinpath(*prefix, "_".join(f"{k}{c[k]}" for k in searched)) for c in combos]
        rows, used = [[] for _ in combos], [[] for _ in combos]
        forwards = sorted({tuple(c[k] for k in FORWARD_KEYS) for c in combos})
        desc = "segmenting" + (f" step {step}" if step is not None else "")
        for (timestep, ctx), b in tqdm(list(itertools.product(forwards, batches)), desc=desc):
            attn, res = self_attention(unet, latents[b], contexts[ctx][b], timestep, amp)
            for folder, sub in itertools.product(folders, ("labels", "overlays")):
                (folder / sub).mkdir(parents=True, exist_ok=True)
            for i, c in enumerate(combos):
                if (c["timestep"], c["context"]) == (timestep, ctx):  # reuse the attention
                    labels, ts = label_maps(attn, res, c, size, args.refine)
                    used[i] += ts
                    rows[i] += [segment_image(lab, images[j, 0], None if masks is None else masks[j],
                                              items[j][0], items[j][1], folders[i], args.dice_rule)
                                for j, lab in zip(range(len(items))[b], labels.cpu())]
        for i, c in enumerate(combos):
            meta = {"settings": c | {"step": step, "refine": args.refine, "size": size}, "step": step,
                    "run": args.run, "unet": args.unet, "vae": args.vae, "weights": weights and str(weights),
                    "ema": not args.no_ema, "skipped": skipped, "mean_threshold_used": float(np.mean(used[i]))}
            summaries.append(report(folders[i], rows[i], baselines, meta, args.dice_rule, images, masks))
    if sweep or searched:
        write_table(out, summaries, (["step"] if sweep else []) + searched)
    return summaries


if __name__ == "__main__":
    cli.main_guard(main)
