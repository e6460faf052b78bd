"""Train DiNO-Diffusion: a latent diffusion UNet conditioned on the DINO global tokens of the same image.

For each training image x (DiNO-Diffusion, Sec. 2):
    c  = c_GLB(x)                      frozen DINO ViT: [CLS, pooler?, registers], patch tokens excluded
    z0 = VAE.encode(x).sample() * 0.18215                   frozen SD v1 VAE (scaling factor: SD v1 config)
    t ~ U{0..999},  eps ~ N(0, I),  x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps      (Ho et al. 2020, eq. 4)
    loss = || eps - UNet(x_t, t, c) ||^2                                              (Ho et al. 2020, eq. 14)
No labels or reports are used: the image conditions on itself, so the model learns p(image | its own DINO
summary), which later allows reconstruction (new noise, same c) and interpolation (blended c).

Runs as `python train.py` or `torchrun --nproc_per_node N train.py` (DDP: NCCL on GPU, gloo on CPU). Every
sample's noise, timestep and augmentation come from generators keyed by (seed, step, global position), so
N ranks with batch B train like one process with batch N*B, and a resumed run continues exactly like an
uninterrupted one. Presets: `tiny` (CPU, random-init small models, phantom CXRs), `sd15-dinov1` and
`sd15-dinov2` (the paper's setting, Sec. 3); every field of a preset can be overridden by its flag.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

import checkpoint
import cli
import hub
import pipeline
from data.loader import (
    Batches,
    CachedLatents,
    KeyedImages,
    StreamBatches,
    cache_path,
    seeded,
    split_data,
    write_image_list,
)
from ddpm import DDPMScheduler
from generate import encode_images, generate, to_grayscale


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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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


# ---------------------------------------------------------------------------------------------- run dir


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


def newest_checkpoint(out: Path, model, ema, optimizer, scaler) -> tuple[int, dict]:
    """Load the newest checkpoint that reads completely into the models (unreadable newer ones are set aside
    with a warning naming them). Returns (step, its metadata); (0, {}) when there is none."""
    for step in reversed(checkpoint.complete_steps(out)):
        p = checkpoint.paths(out, step)
        try:
            state = hub.load_state_dict_file(p["weights"])
            hub.check_state_dict(model, state, source=str(p["weights"]))
            ema_state = hub.load_state_dict_file(p["ema"]) if ema is not None else None
            _, meta = checkpoint.restore(p["state"], optimizer=optimizer, scaler=scaler)
        except (hub.CheckpointError, OSError, ValueError) as e:
            for f in p.values():
                with contextlib.suppress(FileNotFoundError):  # absent, or set aside by another DDP rank
                    checkpoint.set_aside(f)
            warnings.warn(f"checkpoint step {step} is unreadable ({str(e).splitlines()[0]}); set aside as "
                          f"*.unreadable, falling back to an older one", stacklevel=2)
            continue
        model.load_state_dict(state)
        if ema is not None:
            ema.load_state_dict({k: v.to(ema.state_dict()[k].dtype) for k, v in ema_state.items()})
        return step, meta
    return 0, {}


def truncate_metrics(out: Path, step: int):
    """Keep the metrics of steps <= `step` (a resume re-logs the steps after its checkpoint); a line torn by a
    kill mid-write is dropped."""

    def line_step(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return float("inf")

    path = out / "metrics.jsonl"
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line_step(line) <= step]
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- objective


def diffusion_loss(forward, scheduler, z0, c, t, eps, min_snr_gamma: float, amp_dtype) -> torch.Tensor:
    """Per-sample denoising loss (Ho et al. 2020, eq. 14), for the scheduler's prediction type:
        x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps                                      (eq. 4)
        target = eps | v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0 (Salimans & Ho 2022) | z0
    Min-SNR weighting (Hang et al. 2023, eq. 8) w = min(SNR, gamma) / SNR in epsilon units: divided by SNR
    for eps targets, by SNR + 1 for v, not at all for z0 (the three losses differ by those factors)."""
    kind = scheduler.config.prediction_type
    x_t = scheduler.add_noise(z0, eps, t)
    target = {"epsilon": eps, "v_prediction": None, "sample": z0}[kind]
    if target is None:
        target = scheduler.get_velocity(z0, eps, t)
    with torch.autocast(z0.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        pred = forward(x_t, t, c)
    loss = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma > 0:
        snr = scheduler.snr(t)
        clipped = snr.clamp(max=min_snr_gamma)
        loss = loss * {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[kind]
    return loss


# ---------------------------------------------------------------------------------------------- main


def main(argv=None):
    cfg, given = parse_flags(argv)
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local_rank = 0, 1, 0
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    master, out = rank == 0, Path(cfg.out)
    if master:
        cfg = prepare_run_dir(cfg, given, out)
    if ddp:  # every rank runs the config rank 0 settled on
        box = [asdict(cfg)]
        dist.broadcast_object_list(box)
        cfg = TrainConfig(**box[0])
    amp_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]

    # ------------------------------------------------------------------ models
    train_set, val_set = split_data(cfg, rank, world)
    if cfg.cache_latents and not hasattr(train_set, "__len__"):
        raise ValueError(f"--cache-latents: --data {cfg.data} is .tar shards, which are streamed, not cached; "
                         "use --no-cache-latents, or a folder or CSV --data")
    torch.manual_seed(cfg.seed)
    vae = pipeline.build_vae(cfg.vae, cfg.vae_config, cfg.vae_subfolder).to(device)
    dino = pipeline.freeze(pipeline.build_dino(cfg.dino, cfg.dino_config).to(device))
    unet = pipeline.build_unet(cfg.unet, cfg.unet_config, cfg.unet_subfolder).to(device)
    if dino.config.hidden_size != unet.config.cross_attention_dim:
        raise ValueError(f"DINO width {dino.config.hidden_size} != UNet cross_attention_dim "
                         f"{unet.config.cross_attention_dim}: choose matching --dino / --unet-config")
    scheduler = DDPMScheduler.from_config(cfg.scheduler)
    if len(val_set) < 2:
        raise ValueError(f"FID needs at least 2 readable held-out images, {len(val_set)} remain: raise --val-count")
    if master:
        hub.write_json_atomic(asdict(cfg) | {"unet_config_resolved": asdict(unet.config)}, out / "config.json")
        write_image_list(val_set, out / "val.csv")
        if not cfg.dino and not (out / "dino").is_dir():
            pipeline.save_local(dino, out / "dino", "model.safetensors")
        if not cfg.vae and not (out / "vae").is_dir():
            if cfg.vae_fit_steps:
                fit_vae(vae, train_set, cfg, device)
            pipeline.save_local(vae, out / "vae", "diffusion_pytorch_model.safetensors")
    if ddp:
        dist.barrier()
    if not cfg.vae:  # every rank uses the frozen VAE/ViT exactly as saved
        vae = pipeline.load_local(type(vae), type(vae.config), out / "vae", "diffusion_pytorch_model.safetensors",
                                  device)
    if not cfg.dino:
        dino = pipeline.load_local(type(dino), type(dino.config), out / "dino", "model.safetensors", device)
    vae, dino = pipeline.freeze(vae), pipeline.freeze(dino)
    train_loop(cfg, unet, vae, dino, scheduler, train_set, val_set, out, device, rank, world, amp_dtype)
    if ddp:
        dist.destroy_process_group()


def make_batches(cfg: TrainConfig, train_set, vae, dino, out: Path, device, rank: int, world: int, meta: dict):
    """The micro-batch source for this rank: latent cache, map-style images, or streamed shards."""
    start = meta.get("extra", {}).get("micro_step", 0)
    if cfg.cache_latents:
        path = cache_path(out, cfg)
        if rank == 0 and not path.is_file():
            cache_latents(train_set, vae, dino, cfg, path, device)
        if world > 1:
            dist.barrier()
        return Batches(CachedLatents(hub.load_state_dict_file(path)), cfg.batch_size, rank=rank, world=world,
                       seed=cfg.seed, start=start)
    if hasattr(train_set, "__len__"):
        return Batches(KeyedImages(train_set, cfg.seed, cfg.augment), cfg.batch_size, rank=rank, world=world,
                       seed=cfg.seed, start=start, num_workers=cfg.num_workers)
    stream = meta.get("extra", {}).get("stream")
    if stream is not None and (stream["world"], stream["num_workers"]) != (world, cfg.num_workers):
        raise ValueError(f"--resume of a shard run: it was read by {stream['world']} process(es) x "
                         f"{stream['num_workers']} worker(s), now {world} x {cfg.num_workers}; the shard order "
                         "depends on them, so resume with the same --num-workers and process count")
    train_set.augment = cfg.augment
    return StreamBatches(train_set, cfg.batch_size, rank=rank, world=world, num_workers=cfg.num_workers,
                         state=stream["positions"][rank] if stream else None)


def stream_state(batches, cfg: TrainConfig, world: int) -> dict | None:
    """Every rank's shard position (gathered to rank 0), for the checkpoint; None for map-style data."""
    if not isinstance(batches, StreamBatches):
        return None
    positions = [batches.state()]
    if world > 1:
        positions = [None] * world
        dist.all_gather_object(positions, batches.state())
    return {"positions": positions, "world": world, "num_workers": cfg.num_workers}


def train_loop(cfg, unet, vae, dino, scheduler, train_set, val_set, out, device, rank, world, amp_dtype):
    master, ddp = rank == 0, world > 1
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    model = unet
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    forward = torch.compile(model) if cfg.compile else model
    optimizer = make_optimizer(cfg, unet)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    ema = pipeline.freeze(copy.deepcopy(unet)).float() if cfg.ema_decay > 0 else None
    step, meta = newest_checkpoint(out, unet, ema, optimizer, scaler)
    for group in optimizer.param_groups:  # the lr may change on resume: LambdaLR scales `initial_lr`
        group["lr"] = group["initial_lr"] = cfg.lr
    if master:
        truncate_metrics(out, step)
        if step:
            print(f"resumed from step {step} of {out}", file=sys.stderr)
    if step >= cfg.max_steps:
        cli.fail(f"{out} is at step {step}, not before --max-steps {cfg.max_steps}: raise --max-steps to go on")
    warmup = lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    first_step = step  # LambdaLR counts from 0 at construction: offset by the resumed step
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup(s + first_step))
    batches = make_batches(cfg, train_set, vae, dino, out, device, rank, world, meta)

    def shared_randn(shape, *keys) -> torch.Tensor:
        """Noise for this rank's samples: drawn for the whole global batch from one generator keyed by
        (seed, *keys), then this rank's positions are taken (so N ranks == one process)."""
        full = torch.randn((batches.global_batch, *shape), generator=seeded(cfg.seed, *keys))
        return full[batches.positions].to(device)

    @torch.no_grad()
    def latents_and_condition(batch, micro: int):
        """z0 = posterior sample * scaling factor (0.18215 for SD v1) and c_GLB, from images or the cache."""
        if cfg.cache_latents:
            mean, std, c = (t.to(device) for t in batch)
        else:
            x = batch.to(device)
            c = pipeline.condition(dino, x)
            post = vae.encode(x.expand(-1, 3, -1, -1) * 2 - 1)
            mean, std = post.mean, post.std
        z = mean + std * shared_randn(mean.shape[1:], 103, micro)
        return z * vae.config.scaling_factor, c

    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not master)
    t0, seen, held_out = time.time(), 0, None  # held_out: (images [N, 1, S, S], FID network), built once
    checked = step  # the last step whose loss was checked finite (a host sync: only at log/save/eval steps)
    nonfinite = torch.zeros(2, dtype=torch.bool, device=device)  # [loss, gradient norm] since the last check
    while step < cfg.max_steps:
        loss_sum = torch.zeros((), device=device)
        for k in range(cfg.grad_accum):
            micro = step * cfg.grad_accum + k
            z0, c = latents_and_condition(batches.next(), micro)
            g = seeded(cfg.seed, 200, micro)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batches.global_batch,), generator=g)
            drop = torch.rand(batches.global_batch, generator=g) < cfg.cond_dropout
            t, drop = t[batches.positions].to(device), drop[batches.positions].to(device)
            c = torch.where(drop[:, None, None], torch.zeros_like(c), c)
            eps = shared_randn(z0.shape[1:], 104, micro)
            with contextlib.nullcontext() if not ddp or k == cfg.grad_accum - 1 else model.no_sync():
                loss = diffusion_loss(forward, scheduler, z0, c, t, eps, cfg.min_snr_gamma, amp_dtype).mean()
                scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach() / cfg.grad_accum
            nonfinite[0] |= ~torch.isfinite(loss.detach())
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
        if not scaler.is_enabled():  # a finite loss with inf/NaN gradients still ruins the weights (fp16's
            nonfinite[1] |= ~torch.isfinite(grad_norm)  # GradScaler skips such steps instead)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr_sched.step()
        step += 1
        if ema is not None:
            ema_update(ema, unet, step, cfg.ema_decay)
        seen += batches.global_batch * cfg.grad_accum
        bar.update(1)
        last = step == cfg.max_steps
        saving, evaluating = step % cfg.save_every == 0 or last, (cfg.eval_every and step % cfg.eval_every == 0)
        if not (step % cfg.log_every == 0 or saving or evaluating or last):
            continue
        stats = torch.cat([loss_sum[None], nonfinite.float()])
        if ddp:
            dist.all_reduce(stats)
        loss_value, bad = stats[0].item() / world, (stats[1:] > 0).tolist()
        if any(bad):
            done = checkpoint.complete_steps(out)
            newest = (f"The newest checkpoint, step {done[-1]} ({checkpoint.paths(out, done[-1])['weights']}), was "
                      f"saved after a finite-loss check at that step (loss and gradient norm): resume from it" if done
                      else "No checkpoint was saved yet: rerun")
            when = f"at step {step}" if checked + 1 == step else f"between step {checked + 1} and step {step}"
            what = "loss" if bad[0] else "gradient norm"
            cli.fail(f"non-finite {what} {when}; stopped without saving. "
                     f"{newest} with a lower --lr (or --mixed-precision bf16/no)")
        checked = step
        if master and (step % cfg.log_every == 0 or last):
            rec = {"step": step, "loss": loss_value, "lr": lr_sched.get_last_lr()[0], "grad_norm": grad_norm.item(),
                   "img_per_s": seen / (time.time() - t0)}
            if device.type == "cuda":
                rec["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{loss_value:.4f}")
        position = stream_state(batches, cfg, world) if saving else None
        if master and saving:
            checkpoint.save(out, step, model_state=unet.state_dict(), ema_state=ema and ema.state_dict(),
                            optimizer=optimizer, scaler=scaler, config=asdict(unet.config),
                            extra={"micro_step": step * cfg.grad_accum, "stream": position})
            checkpoint.prune(out, cfg.keep_last)
        if evaluating or last:
            if master:
                if held_out is None:
                    real = torch.stack([val_set[i]["image"] for i in range(min(cfg.fid_count, len(val_set)))])
                    held_out = real, fid_extractor(cfg, real[:512], device)  # BN calibration: a few hundred do
                evaluate(ema if ema is not None else unet, vae, dino, *held_out, cfg, step, out, device)
                unet.train()
            if ddp:
                dist.barrier()
    bar.close()


def make_optimizer(cfg: TrainConfig, unet):
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


# ---------------------------------------------------------------------------------------------- pieces


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, max_decay: float):
    """EMA of the weights, kept as a float32 copy of the module (diffusers' EMA warmup, formulas.md)."""
    decay = min(max_decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().float(), 1 - decay)


def fit_vae(vae, data, cfg: TrainConfig, device):
    """Random-init presets only: fit the VAE as an autoencoder (L1 + small KL) so that its latents decode,
    then set its scaling_factor so that the latents have unit variance. `data`: map-style or shards."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    batch_size = cfg.vae_fit_batch_size or cfg.batch_size
    if hasattr(data, "__len__"):
        batches = Batches(KeyedImages(data, cfg.seed, False), batch_size, rank=0, world=1, seed=cfg.seed + 7)
    else:  # this process's shards, unaugmented
        data.augment = False
        batches = StreamBatches(data, batch_size, rank=0, world=1, num_workers=cfg.num_workers)
    for step in tqdm(range(cfg.vae_fit_steps), desc="fit VAE", leave=False):
        x = batches.next().to(device).expand(-1, 3, -1, -1) * 2 - 1
        post = vae.encode(x)
        rec = vae.decode(post.mean + post.std * torch.randn(post.mean.shape, generator=seeded(cfg.seed, 2, step)))
        loss = F.l1_loss(rec, x) + 1e-6 * post.kl().mean()  # KL weight 1e-6: the SD VAE's (LDM kl-f8 config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae = pipeline.freeze(vae)
    # Unit-variance latents, as LDM's `scale_by_std` (Rombach et al. 2022, Sec. 4.3.2: 1 / std of encoded
    # training latents; SD v1's 0.18215 is this number for its VAE). Without it the UNet's noise schedule
    # would see a low-signal latent space (here std ~0.25 at 0.18215).
    if hasattr(data, "__len__"):
        n = min(len(data), 256)
        images = [torch.stack([data[i]["image"] for i in range(j, min(j + 16, n))]) for j in range(0, n, 16)]
    else:
        images = [batches.next() for _ in range(max(1, 256 // batch_size))]
    zs = [encode_images(vae, x.to(device), sample=True, generator=seeded(cfg.seed, 3, 16 * j)).cpu()
          for j, x in enumerate(images)]  # encode_images scales by the current factor f: new f = f / std(f z)
    vae.config = replace(vae.config, scaling_factor=vae.config.scaling_factor / torch.cat(zs).std().item())
    return vae


@torch.no_grad()
def cache_latents(train, vae, dino, cfg: TrainConfig, path: Path, device):
    """Encode every training image once (x cache_copies augmented copies): VAE mean/std and c_GLB."""
    keyed = KeyedImages(train, cfg.seed, cfg.augment)
    keys = list(range((cfg.cache_copies if cfg.augment else 1) * len(train)))
    mean, std, cond = [], [], []
    for i in tqdm(range(0, len(keys), cfg.batch_size), desc="cache latents", leave=False):
        x = torch.stack([keyed[k] for k in keys[i : i + cfg.batch_size]]).to(device)
        post = vae.encode(x.expand(-1, 3, -1, -1) * 2 - 1)
        mean.append(post.mean.cpu())
        std.append(post.std.cpu())
        cond.append(pipeline.condition(dino, x).cpu())
    try:
        hub.save_file_atomic({"mean": torch.cat(mean), "std": torch.cat(std), "cond": torch.cat(cond)}, path)
    except OSError as e:  # a full disk: name the file (the temporary one is already removed)
        raise OSError(f"cannot write the latent cache {path}: {e}") from e


def fid_extractor(cfg: TrainConfig, reference: torch.Tensor, device=None):
    """The FID feature network: the named pretrained one when --fid-weights is given, else (offline) a
    random-init XRV-style DenseNet with a fixed seed whose BatchNorm statistics are set from the held-out
    `reference` images -- FIDs are then comparable within a run only. The tiny preset uses a tiny DenseNet at
    its own 64 px resolution to stay fast on CPU."""
    from eval.densenet import DenseNet121, DenseNetConfig, XRVDenseNetFeatures, calibrate_batchnorm
    from eval.fid import load_extractor

    if cfg.fid_weights:
        return load_extractor(cfg.fid_features, cfg.fid_weights, device)
    torch.manual_seed(0)
    if cfg.fid_random_init == "tiny":
        net = DenseNet121(DenseNetConfig.tiny(in_channels=1))
        features = XRVDenseNetFeatures(net, name="xrv-tiny-random-init", resolution=cfg.image_size)
    else:
        features = XRVDenseNetFeatures(name="xrv-random-init")
    batch_size = max(2, cfg.batch_size)  # BatchNorm in train mode needs 2+ images in every batch, the last too
    while len(reference) % batch_size == 1:
        batch_size += 1
    return calibrate_batchnorm(features, reference, batch_size).eval()


def evaluate(unet, vae, dino, real, extractor, cfg: TrainConfig, step: int, out: Path, device):
    """Sample grid (held-out images `real` above their reconstructions) and FID against them (`extractor`).
    `unet`: the weights to evaluate (the EMA copy when EMA is on)."""
    from PIL import Image

    from eval.fid import fid

    unet.eval()
    n = len(real)
    fake, sched = [], pipeline.make_scheduler({"scheduler": cfg.scheduler}, "ddim")
    for i in range(0, n, cfg.batch_size):
        x = real[i : i + cfg.batch_size].to(device)
        imgs = generate(unet, vae, sched, pipeline.condition(dino, x), seeds=list(range(i, i + len(x))),
                        height=cfg.image_size, width=cfg.image_size, steps=cfg.sample_steps)
        fake.append(to_grayscale(imgs).cpu())
    fake = torch.cat(fake)
    k = min(cfg.grid_images, n)
    grid = torch.cat([torch.cat(list(real[:k, 0]), dim=1), torch.cat(list(fake[:k, 0]), dim=1)], dim=0)
    (out / "samples").mkdir(exist_ok=True)
    Image.fromarray((grid.numpy() * 255).round().astype("uint8")).save(out / "samples" / f"step_{step:07d}.png")
    score = fid(real, fake, features=extractor, batch_size=cfg.batch_size, device=device, progress=False,
                cache=out / "fid_reference.npz")
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "fid": score, "fid_features": cfg.fid_features, "fid_n": n}) + "\n")
    print(f"step {step}: FID ({cfg.fid_features}, n={n}) = {score:.3f}", file=sys.stderr)


if __name__ == "__main__":
    cli.main_guard(main)
