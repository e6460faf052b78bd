"""The training configuration: one frozen dataclass, the presets, the command line and the run folder.

Every field of `TrainConfig` is a `train.py` flag (`vae_fit_steps` -> `--vae-fit-steps`) with a help sentence
in `HELP`; a preset (`tiny`, `small-real`, `sd15-dinov1`, `sd15-dinov2`) is a whole config, and the flags
given on the command line override its fields. The resolved config is saved as `RUN/config.json`, which is
what sample.py / segment.py rebuild the models from and what `--resume` continues.

A run folder holds one run (`prepare_run_dir`): an `--out` that holds one is refused unless `--resume`
(continue it, with only the `SAFE_ON_RESUME` flags allowed to change) or `--overwrite` (start clean).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import checkpoint
import cli


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "tiny"
    data: str | None = None  # folder / CSV / .tar shards; None = built-in phantom CXRs
    val_data: str | None = None  # held-out images for FID and sample grids; None = split off `data`
    val_group: str | None = None  # CSV --data: hold out whole groups of this column (e.g. patient_id)
    path_column: str | None = None  # CSV --data / --val-data: the image-path column (None: path, Path, image)
    image_root: str | None = None  # what relative CSV paths start from (None: the CSV's folder)
    out: str = "runs/tiny"
    image_size: int = 64
    # models: a pretrained source (Hub id / folder / file) or None = random init from the *_config dict
    vae: str | None = None
    vae_subfolder: str | None = None
    vae_config: dict = field(default_factory=dict)
    vae_fit_steps: int = 0  # random-init VAE only: fit it as an autoencoder for N steps, then freeze it
    vae_fit_batch_size: int = 0  # 0 = --batch-size
    unet: str | None = None
    unet_subfolder: str | None = None
    unet_config: dict = field(default_factory=dict)
    dino: str | None = None
    dino_config: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)  # noise schedule; {} = SD v1 (scaled_linear, 1000 steps)
    # optimisation (paper Sec. 3: 8-bit Adam, constant lr 1e-4 after 1000 warmup steps, batch 64 x 2 x 4 GPUs)
    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    mixed_precision: str = "no"
    ema_decay: float = 0.9999
    min_snr_gamma: float = 0.0
    cond_dropout: float = 0.0
    augment: bool = True
    cache_latents: bool = False
    cache_copies: int = 1
    gradient_checkpointing: bool = False
    compile: bool = False
    num_workers: int = 0
    phantom_count: int = 2000
    val_count: int = 32
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 500
    keep_last: int = 3
    fid_count: int = 32
    fid_features: str = "xrv"
    fid_weights: str | None = None
    fid_random_init: str = "densenet121"  # offline FID network when fid_weights is None: densenet121 | tiny
    sample_steps: int = 50
    grid_images: int = 4


HELP = {
    "preset": "starting configuration; every other flag overrides one of its fields",
    "data": "training images: a folder (PNG/JPEG/DICOM), a CSV with a path column, or .tar shards "
            "('shards-{000000..000099}.tar' or a folder of them); unset = the built-in phantom CXRs",
    "val_data": "held-out images for FID and sample grids; unset = held out of --data (see --val-count)",
    "val_group": "with a CSV --data: hold out whole groups of this column (e.g. patient_id), taking the last "
                 "groups in sorted order until there are at least --val-count images",
    "path_column": "CSV column that holds the image paths; unset = 'path', else 'Path', else 'image'",
    "image_root": "folder that relative CSV paths start from; unset = the CSV's folder (CheXpert: the folder "
                  "that holds CheXpert-v1.0/)",
    "out": "run directory: config.json, checkpoints/, metrics.jsonl, samples/, val.csv (the held-out images)",
    "image_size": "training resolution in pixels (square; a multiple of 8 for the VAE)",
    "vae": "pretrained VAE to load (Hub id, folder or file); unset = random init from --vae-config",
    "vae_subfolder": "subfolder of --vae that holds the VAE (e.g. vae for a diffusers pipeline repo)",
    "vae_config": "JSON object of VAEConfig fields for a random-init VAE",
    "vae_fit_steps": "random-init VAE only: steps of fitting it as an autoencoder before freezing it",
    "vae_fit_batch_size": "images per VAE-fit step; 0 = --batch-size",
    "unet": "pretrained UNet to start from (paper: SD v1.5); unset = random init from --unet-config",
    "unet_subfolder": "subfolder of --unet that holds the UNet (e.g. unet)",
    "unet_config": "JSON object of UNetConfig fields for a random-init UNet",
    "dino": "frozen DINO ViT that gives c_GLB (facebook/dino-vitb16, timm/vit_base_patch14_reg4_dinov2.lvd142m); "
            "unset = random init from --dino-config",
    "dino_config": "JSON object of DinoConfig fields for a random-init ViT",
    "scheduler": "JSON object of DDPMScheduler arguments (the training noise schedule); {} = SD v1's",
    "max_steps": "optimizer steps to train for (can be raised on --resume)",
    "batch_size": "images per process per micro-step",
    "grad_accum": "micro-steps per optimizer step (gradients are synchronised on the last one only)",
    "lr": "AdamW learning rate after warmup (can be changed on --resume)",
    "warmup_steps": "steps of linear learning-rate warmup, then constant",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradients are clipped to this global L2 norm",
    "optimizer": "adamw, or adamw8bit (8-bit AdamW, needs pip install bitsandbytes)",
    "mixed_precision": "no, fp16 (with a GradScaler) or bf16: autocast for the UNet",
    "ema_decay": "EMA of the UNet weights with decay min(ema_decay, (1+k)/(10+k)); 0 = no EMA",
    "min_snr_gamma": "min-SNR loss weighting gamma (Hang et al. 2023 use 5); 0 = unweighted",
    "cond_dropout": "probability of a zero condition per sample (enables classifier-free guidance); paper: 0",
    "augment": "the paper's augmentation: random sharpening + random affine",
    "cache_latents": "encode every image once (VAE mean/std and c_GLB) into OUT/cache and train from it",
    "cache_copies": "augmented copies of each image in the latent cache (with --augment)",
    "gradient_checkpointing": "recompute UNet activations in the backward pass to save memory",
    "compile": "torch.compile the UNet",
    "num_workers": "DataLoader worker processes per process (can be changed on --resume, except for shards)",
    "phantom_count": "number of built-in phantom training images (when --data is unset)",
    "val_count": "held-out images",
    "seed": "seed of every random choice (data order, noise, timesteps, augmentation, init)",
    "resume": "continue the run in --out from its newest complete checkpoint, exactly as if uninterrupted",
    "overwrite": "delete whatever --out holds and start a new run there",
    "log_every": "write loss, lr, grad norm and img/s to metrics.jsonl every K steps",
    "eval_every": "FID and a sample grid every K steps; 0 = only at the end",
    "save_every": "checkpoint every K steps (and at the last step)",
    "keep_last": "keep only the newest K checkpoints; 0 = keep all",
    "fid_count": "held-out images used for FID (paper: 5,000)",
    "fid_features": "FID feature space: xrv (XRV DenseNet-121, the paper's) or inception",
    "fid_weights": "FID network weights file; unset = random init (offline: FIDs comparable within a run only)",
    "fid_random_init": "the random-init FID network used without --fid-weights: densenet121 or tiny",
    "sample_steps": "DDIM steps for the evaluation samples",
    "grid_images": "held-out images shown in each sample grid",
}
# Numeric flags are checked when parsed (cli.py); choices are listed in --help.
TYPES = {
    **dict.fromkeys(["image_size", "max_steps", "batch_size", "grad_accum", "cache_copies", "phantom_count",
                     "val_count", "log_every", "save_every", "fid_count", "sample_steps", "grid_images"],
                    cli.positive_int),
    **dict.fromkeys(["vae_fit_steps", "vae_fit_batch_size", "warmup_steps", "num_workers", "eval_every",
                     "keep_last", "seed"], cli.nonneg_int),
    **dict.fromkeys(["lr", "max_grad_norm"], cli.positive_float),
    **dict.fromkeys(["weight_decay", "min_snr_gamma"], cli.nonneg_float),
    **dict.fromkeys(["ema_decay", "cond_dropout"], cli.probability),
}
CHOICES = {"optimizer": ["adamw", "adamw8bit"], "mixed_precision": ["no", "fp16", "bf16"],
           "fid_features": ["xrv", "inception"], "fid_random_init": ["densenet121", "tiny"]}
# What --resume may change: it does not alter what the run computes before the step it resumes from.
SAFE_ON_RESUME = ("max_steps", "lr", "log_every", "eval_every", "save_every", "keep_last", "num_workers")

PRESETS = {
    "tiny": TrainConfig(
        preset="tiny", image_size=64, out="runs/tiny",
        vae_config=dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8),
        vae_fit_steps=200,
        unet_config=dict(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=4,
        ),
        dino_config=dict(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=128, num_register_tokens=2),
        max_steps=500, batch_size=16, lr=1e-3, warmup_steps=50, ema_decay=0.995, save_every=250,
        fid_count=32, sample_steps=25, fid_random_init="tiny",
    ),
    "sd15-dinov1": TrainConfig(
        preset="sd15-dinov1", image_size=512, out="runs/sd15-dinov1",
        vae="stable-diffusion-v1-5/stable-diffusion-v1-5", vae_subfolder="vae",
        unet="stable-diffusion-v1-5/stable-diffusion-v1-5", unet_subfolder="unet",
        dino="facebook/dino-vitb16",
        max_steps=140_000, batch_size=64, grad_accum=2, lr=1e-4, warmup_steps=1000,
        optimizer="adamw8bit", mixed_precision="bf16", gradient_checkpointing=True, num_workers=8,
        save_every=2500, eval_every=2500, fid_count=5000, keep_last=5,
    ),
}
# Real CXRs on 2 CPU cores in about an hour (docs/results.md): the 243 unlabelled CXRs of ../shared/data, 40+
# held out by patient for FID; random-init models (no Hub offline): a VAE fitted here (f8: 128 px -> 16x16x4
# latents, like SD's 512 -> 64), a small frozen DINOv2-style ViT (CLS + 4 registers) and a 6M-parameter UNet.
PRESETS["small-real"] = TrainConfig(
    preset="small-real", image_size=128, out="runs/small-real",
    data="../shared/data/cxr-unlabeled/index.csv", val_group="patient_id", val_count=40,
    vae_config=dict(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8),
    vae_fit_steps=400, vae_fit_batch_size=8,
    unet_config=dict(
        sample_size=16, block_out_channels=(64, 128, 128), layers_per_block=1, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128,
        attention_head_dim=8,
    ),
    dino_config=dict(image_size=128, patch_size=16, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=512, num_register_tokens=4),
    max_steps=1500, batch_size=32, lr=5e-4, warmup_steps=100, ema_decay=0.999, cache_latents=True,
    cache_copies=4, eval_every=500, save_every=500, fid_count=64, sample_steps=25, grid_images=8,
)
PRESETS["sd15-dinov2"] = replace(PRESETS["sd15-dinov1"], preset="sd15-dinov2", out="runs/sd15-dinov2",
                                 dino="timm/vit_base_patch14_reg4_dinov2.lvd142m")


def _default_text(name: str) -> str:
    """'(default: <tiny>; small-real: ..., sd15: ...)' for one field: the tiny preset's value, and the other
    presets' where they differ (sd15-dinov1 and -dinov2 differ only in --dino)."""
    show = lambda v: "unset" if v is None else json.dumps(v) if isinstance(v, dict | list | tuple) else str(v)
    tiny = getattr(PRESETS["tiny"], name)
    others = {"small-real": PRESETS["small-real"], "sd15": PRESETS["sd15-dinov1"]}
    if name == "dino":
        others = {"small-real": PRESETS["small-real"], "sd15-dinov1": PRESETS["sd15-dinov1"],
                  "sd15-dinov2": PRESETS["sd15-dinov2"]}
    diff = [f"{k}: {show(getattr(c, name))}" for k, c in others.items() if getattr(c, name) != tiny]
    return f" (default: {show(tiny)}" + "".join(f"; {d}" for d in diff) + ")"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description="Train DiNO-Diffusion: a latent diffusion UNet "
                                "conditioned on the DINO global tokens of the same image.",
                                epilog="Defaults are the tiny preset's; other presets' values are listed where "
                                       "they differ. A run directory holds one run: an --out that holds one is "
                                       "refused unless --resume or --overwrite is given.")
    for f in fields(TrainConfig):
        flag, help_ = "--" + f.name.replace("_", "-"), HELP[f.name] + _default_text(f.name)
        if f.name == "preset":
            p.add_argument(flag, choices=sorted(PRESETS), default=None, help=HELP["preset"] + " (default: tiny)")
        elif f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif f.type == "dict":
            p.add_argument(flag, type=json.loads, default=None, help=help_, metavar="JSON")
        else:
            kind = TYPES.get(f.name, {"int": int, "float": float}.get(f.type, str))
            p.add_argument(flag, type=kind, choices=CHOICES.get(f.name), default=None, help=help_)
    return p


def parse_flags(argv=None) -> tuple[TrainConfig, dict]:
    """(config, the flags given on the command line as {field: value}; an unset --preset is not given, so
    `--resume` alone continues a run of any preset)."""
    args = vars(parser().parse_args(argv))
    given = {k: v for k, v in args.items() if v is not None}
    base = PRESETS[args["preset"] or "tiny"]
    return replace(base, **{k: v for k, v in given.items() if k != "preset"}), given


def parse_args(argv=None) -> TrainConfig:
    return parse_flags(argv)[0]


# ---------------------------------------------------------------------------------------------- run folder


def _json(v):
    return json.loads(json.dumps(v, default=list))


def resume_config(cfg: TrainConfig, given: dict, out: Path) -> TrainConfig:
    """The run's saved config, with the flags that are safe to change on resume applied; any other given
    flag that differs from config.json stops the run with one line naming them."""
    saved = json.loads((out / "config.json").read_text())
    known = {f.name for f in fields(TrainConfig)}
    base = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    differ = [k for k, v in given.items() if k not in SAFE_ON_RESUME + ("resume", "overwrite", "out")
              and _json(v) != _json(getattr(base, k))]
    if differ:
        flags = ", ".join(f"--{k.replace('_', '-')} {given[k]} (run: {getattr(base, k)})" for k in differ)
        cli.fail(f"--resume: {flags} differ from {out}/config.json; on resume only "
                 f"{', '.join('--' + k.replace('_', '-') for k in SAFE_ON_RESUME)} can change")
    return replace(base, resume=True, out=cfg.out, **{k: given[k] for k in SAFE_ON_RESUME if k in given})


def _same_run(cfg: TrainConfig, out: Path) -> bool:
    saved = json.loads((out / "config.json").read_text())
    ignore = ("resume", "overwrite")
    return all(_json(getattr(cfg, f.name)) == _json(saved.get(f.name)) for f in fields(TrainConfig)
               if f.name not in ignore)


def prepare_run_dir(cfg: TrainConfig, given: dict, out: Path) -> TrainConfig:
    """Make --out this run's folder (rank 0): refuse another run without --resume/--overwrite, clean what
    killed writes left, and on resume take the saved config (see `resume_config`)."""
    # frozen models put in place by hand (vae/, dino/ without a config.json) are used as they are
    holds = out.is_dir() and any(p.name not in ("vae", "dino") or (out / "config.json").is_file()
                                 for p in out.iterdir())
    if cfg.overwrite and holds:
        cli.empty_folder(out)
    elif holds and not cfg.resume:
        if (out / "config.json").is_file() and not checkpoint.weight_steps(out):  # a start that never got far
            if _same_run(cfg, out):
                return prepare_run_dir(replace(cfg, resume=True), given, out)
            print(f"{out}: removing an unfinished start (no checkpoint) made with other settings", file=sys.stderr)
            cli.empty_folder(out)
        else:
            what = "a run (config.json)" if (out / "config.json").is_file() else "files of something else"
            cli.fail(f"--out {out} already holds {what}: pass --resume to continue it or --overwrite to start "
                     "clean")
    for p in checkpoint.clean(out) if out.is_dir() else []:
        print(f"removed {p}, left by an interrupted write", file=sys.stderr)
    if cfg.resume and (out / "config.json").is_file():
        cfg = resume_config(cfg, given, out)
    elif cfg.resume and holds:
        cli.fail(f"--resume: {out} has no config.json, so it holds no run; pass --overwrite to start one there")
    return cfg
