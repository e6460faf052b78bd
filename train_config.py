"""The training configuration: one frozen dataclass, the presets, the command line and the run folder.

Every field of `TrainConfig` is a `train.py` flag (`vae_fit_steps` -> `--vae-fit-steps`), declared with its
default, its --help sentence and its parser. A preset (`tiny`, `small-real`, `sd15-dinov1`, `sd15-dinov2`) is
a whole config; the flags given on the command line override its fields. The resolved config is saved as
`RUN/config.json`, which is what sample.py / segment.py rebuild the models from and what `--resume` continues.

A run folder holds one run (`prepare_run_dir`): an `--out` that holds one is refused unless `--resume`
(continue it, with only the `SAFE_ON_RESUME` flags allowed to change) or `--overwrite` (start clean).
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import checkpoint
import cli
from cli import nonneg_float, nonneg_int, positive_float, positive_int, probability


def flag(default, help: str, type=None):  # noqa: A002 (argparse's names)
    """A TrainConfig field: its default, the sentence --help shows and how the flag is parsed (default: by the
    field's annotation; a dict takes a JSON object, a Literal one of its values)."""
    value = {"default_factory": dict} if isinstance(default, dict) else {"default": default}  # a dict: {} each
    return field(**value, metadata={"help": help, "type": type})


@dataclass(frozen=True)
class TrainConfig:
    preset: str = flag("tiny", "starting configuration; every other flag overrides one of its fields")
    data: str | None = flag(None, "training images: a folder (PNG/JPEG/DICOM), a CSV with a path column, or .tar "
                                  "shards ('shards-{000000..000099}.tar' or their folder); unset = phantom CXRs")
    val_data: str | None = flag(None, "held-out images for FID and sample grids; unset = held out of --data")
    val_group: str | None = flag(None, "with a CSV --data: hold out whole groups of this column (e.g. patient_id), "
                                       "the last in sorted order, until there are at least --val-count images")
    path_column: str | None = flag(None, "CSV column of the image paths; unset = 'path', else 'Path', else 'image'")
    image_root: str | None = flag(None, "folder that relative CSV paths start from; unset = the CSV's folder "
                                        "(CheXpert: the folder that holds CheXpert-v1.0/)")
    out: str = flag("runs/tiny", "run directory (config.json, checkpoints/, metrics.jsonl, samples/, val.csv)")
    image_size: int = flag(64, "training resolution in pixels (square; a multiple of 8 for the VAE)", positive_int)
    channels: Literal[1, 3] = flag(1, "1 = grey (chest X-rays, read as luminance); 3 = colour (endoscopy, H&E...): "
                                      "RGB through VAE, DINO and outputs, Inception FID; no --data: colour phantoms",
                                   int)
    # models: a pretrained source (Hub id / folder / file) or None = random init from the *_config dict
    vae: str | None = flag(None, "pretrained VAE (Hub id, folder or file); unset = random init from --vae-config")
    vae_subfolder: str | None = flag(None, "subfolder of --vae that holds the VAE (e.g. vae)")
    vae_config: dict = flag({}, "JSON object of VAEConfig fields for a random-init VAE")
    vae_fit_steps: int = flag(0, "random-init VAE only: steps fitting it as an autoencoder, then frozen", nonneg_int)
    vae_fit_batch_size: int = flag(0, "images per VAE-fit step; 0 = --batch-size", nonneg_int)
    unet: str | None = flag(None, "pretrained UNet to start from (paper: SD v1.5); unset = random init from "
                                  "--unet-config")
    unet_subfolder: str | None = flag(None, "subfolder of --unet that holds the UNet (e.g. unet)")
    unet_config: dict = flag({}, "JSON object of UNetConfig fields for a random-init UNet")
    dino: str | None = flag(None, "frozen DINO ViT that gives c_GLB (facebook/dino-vitb16, "
                                  "timm/vit_base_patch14_reg4_dinov2.lvd142m); unset = random init from --dino-config")
    dino_config: dict = flag({}, "JSON object of DinoConfig fields for a random-init ViT")
    scheduler: dict = flag({}, "JSON object of DDPMScheduler arguments (the training noise schedule); {} = SD v1's; "
                              "with --channels 3 and a random-init UNet, unset = v_prediction")
    # optimisation (paper Sec. 3: 8-bit Adam, constant lr 1e-4 after 1000 warmup steps, batch 64 x 2 x 4 GPUs)
    max_steps: int = flag(1000, "optimizer steps to train for (can be raised on --resume)", positive_int)
    batch_size: int = flag(16, "images per process per micro-step", positive_int)
    grad_accum: int = flag(1, "micro-steps per optimizer step (gradients synchronised on the last only)", positive_int)
    lr: float = flag(1e-4, "AdamW learning rate after warmup (can be changed on --resume)", positive_float)
    warmup_steps: int = flag(0, "steps of linear learning-rate warmup, then constant", nonneg_int)
    optimizer: Literal["adamw", "adamw8bit"] = flag("adamw", "adamw8bit: 8-bit AdamW (pip install bitsandbytes)")
    mixed_precision: Literal["no", "fp16", "bf16"] = flag("no", "autocast for the UNet (fp16 with a GradScaler)")
    ema_decay: float = flag(0.9999, "EMA of the UNet, decay min(ema_decay, (1+k)/(10+k)); 0 = no EMA", probability)
    min_snr_gamma: float = flag(0.0, "min-SNR loss weight gamma (Hang et al. 2023: 5); 0 = unweighted", nonneg_float)
    cond_dropout: float = flag(0.0, "probability of a zero condition per sample, for classifier-free guidance "
                                    "(sample.py --guidance > 1); paper: 0", probability)
    augment: bool = flag(True, "the paper's augmentation: random sharpening + random affine")
    cache_latents: bool = flag(False, "encode every image once (VAE mean/std, c_GLB) into OUT/cache, train from it")
    cache_copies: int = flag(1, "augmented copies of each image in the latent cache (with --augment)", positive_int)
    gradient_checkpointing: bool = flag(False, "recompute UNet activations in the backward pass to save memory")
    compile: bool = flag(False, "torch.compile the UNet")
    num_workers: int = flag(0, "DataLoader workers per process (can change on --resume, except with shards)",
                               nonneg_int)
    phantom_count: int = flag(2000, "number of built-in phantom training images (when --data is unset)", positive_int)
    val_count: int = flag(32, "held-out images", positive_int)
    seed: int = flag(0, "seed of every random choice (data order, noise, timesteps, augmentation, init)", nonneg_int)
    resume: bool = flag(False, "continue the run in --out from its newest complete checkpoint, as if uninterrupted")
    overwrite: bool = flag(False, "delete whatever --out holds and start a new run there")
    log_every: int = flag(10, "write loss, lr, grad norm and img/s to metrics.jsonl every K steps", positive_int)
    eval_every: int = flag(0, "FID and a sample grid every K steps; 0 = only at the end", nonneg_int)
    save_every: int = flag(500, "checkpoint every K steps (and at the last step)", positive_int)
    keep_last: int = flag(3, "keep only the newest K checkpoints; 0 = keep all", nonneg_int)
    fid_count: int = flag(32, "held-out images used for FID (paper: 5,000)", positive_int)
    fid_features: Literal["xrv", "inception"] = flag("xrv", "xrv: XRV DenseNet-121 (the paper's; grey only); "
                                                            "inception: the default with --channels 3")
    fid_weights: str | None = flag(None, "FID network weights file; unset = random init (offline: FIDs comparable "
                                         "within a run only)")
    fid_random_init: Literal["densenet121", "tiny"] = flag("densenet121", "FID network without --fid-weights")
    sample_steps: int = flag(50, "DDIM steps for the evaluation samples", positive_int)
    grid_images: int = flag(4, "held-out images shown in each sample grid", positive_int)


# What --resume may change: it does not alter what the run computes before the step it resumes from.
SAFE_ON_RESUME = ("max_steps", "lr", "log_every", "eval_every", "save_every", "keep_last", "num_workers")

_SD15 = TrainConfig(
    preset="sd15-dinov1", image_size=512, out="runs/sd15-dinov1",
    vae="stable-diffusion-v1-5/stable-diffusion-v1-5", vae_subfolder="vae",
    unet="stable-diffusion-v1-5/stable-diffusion-v1-5", unet_subfolder="unet", dino="facebook/dino-vitb16",
    max_steps=140_000, batch_size=64, grad_accum=2, lr=1e-4, warmup_steps=1000, optimizer="adamw8bit",
    mixed_precision="bf16", gradient_checkpointing=True, num_workers=8, save_every=2500, eval_every=2500,
    fid_count=5000, keep_last=5,
)
PRESETS = {
    "tiny": TrainConfig(
        preset="tiny", image_size=64, out="runs/tiny",
        vae_config=dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8), vae_fit_steps=200,
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
    # Real CXRs on 2 CPU cores in about an hour (docs/results.md): the 243 unlabelled CXRs of ../shared/data, 40+
    # held out by patient for FID; random-init models (no Hub offline): a VAE fitted here (f8: 128 px -> 16x16x4
    # latents, like SD's 512 -> 64), a small frozen DINOv2-style ViT (CLS + 4 registers) and a 6M-parameter UNet.
    "small-real": TrainConfig(
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
    ),
    "sd15-dinov1": _SD15,  # the paper's setting (Sec. 3)
    "sd15-dinov2": replace(_SD15, preset="sd15-dinov2", out="runs/sd15-dinov2",
                           dino="timm/vit_base_patch14_reg4_dinov2.lvd142m"),
}


def _default_text(name: str) -> str:
    """' (default: <tiny's value>; <presets>: <value>, ...)': the presets whose value differs from tiny's."""
    show = lambda v: "unset" if v is None else json.dumps(v) if isinstance(v, dict | list | tuple) else str(v)
    tiny, differ = getattr(PRESETS["tiny"], name), {}
    for preset, c in PRESETS.items():
        if getattr(c, name) != tiny:
            differ.setdefault(show(getattr(c, name)), []).append(preset)
    return f" (default: {show(tiny)}" + "".join(f"; {'/'.join(p)}: {v}" for v, p in differ.items()) + ")"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description="Train DiNO-Diffusion: a latent diffusion UNet "
                                "conditioned on the DINO global tokens of the same image.",
                                epilog="Defaults are the tiny preset's; other presets' values are listed where "
                                       "they differ. A run directory holds one run: an --out that holds one is "
                                       "refused unless --resume or --overwrite is given.")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        name, meta = "--" + f.name.replace("_", "-"), f.metadata
        choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else None
        if f.name == "preset":
            p.add_argument(name, choices=list(PRESETS), help=meta["help"] + " (default: tiny)")
        elif f.type == "bool":
            p.add_argument(name, action=argparse.BooleanOptionalAction, help=meta["help"] + _default_text(f.name))
        else:
            kind = json.loads if f.type == "dict" else meta["type"] or {"int": int, "float": float}.get(f.type, str)
            p.add_argument(name, type=kind, choices=choices, metavar="JSON" if f.type == "dict" else None,
                           help=meta["help"] + _default_text(f.name))
    return p


def parse_flags(argv=None) -> tuple[TrainConfig, dict]:
    """(config, the flags given on the command line as {field: value}; an unset --preset is not given, so
    `--resume` alone continues a run of any preset)."""
    given = {k: v for k, v in vars(parser().parse_args(argv)).items() if v is not None}
    base = PRESETS[given.get("preset", "tiny")]
    if given.get("channels") == 3:  # XRV features are CXR-only: colour runs measure FID in Inception's
        if given.get("fid_features") == "xrv":
            cli.fail("--fid-features xrv: XRV features are for grey chest X-rays; with --channels 3 use inception")
        given.setdefault("fid_features", "inception")
        if not given.get("unet", base.unet) and not given.get("resume"):
            # Tint, a latent's mean, is set at the noisiest t, where the epsilon loss weighs a z0 error by SNR
            # (0.005 at t=999): a from-scratch UNet then reads the tint off its own noise, not off c_GLB.
            # v-prediction (Salimans & Ho 2022) weighs it by SNR + 1 (measured: tests/test_colour.py).
            given.setdefault("scheduler", {"prediction_type": "v_prediction"})
    return replace(base, **{k: v for k, v in given.items() if k != "preset"}), given


# ---------------------------------------------------------------------------------------------- run folder


def _json(v):
    return json.loads(json.dumps(v, default=list))


def resume_config(cfg: TrainConfig, given: dict, out: Path) -> TrainConfig:
    """The run's saved config, with the flags that are safe to change on resume applied; any other given
    flag that differs from config.json stops the run with one line naming them."""
    saved = json.loads((out / "config.json").read_text())
    base = TrainConfig(**{f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved})
    differ = [k for k, v in given.items() if k not in SAFE_ON_RESUME + ("resume", "overwrite", "out")
              and _json(v) != _json(getattr(base, k))]
    if differ:
        flags = ", ".join(f"--{k.replace('_', '-')} {given[k]} (run: {getattr(base, k)})" for k in differ)
        cli.fail(f"--resume: {flags} differ from {out}/config.json; on resume only "
                 f"{', '.join('--' + k.replace('_', '-') for k in SAFE_ON_RESUME)} can change")
    return replace(base, resume=True, out=cfg.out, **{k: given[k] for k in SAFE_ON_RESUME if k in given})


def prepare_run_dir(cfg: TrainConfig, given: dict, out: Path) -> TrainConfig:
    """Make --out this run's folder (rank 0): refuse another run without --resume/--overwrite, clean what
    killed writes left, and on resume take the saved config (see `resume_config`)."""
    has_config = (out / "config.json").is_file()
    # frozen models put in place by hand (vae/, dino/ without a config.json) are used as they are
    holds = out.is_dir() and any(p.name not in ("vae", "dino") or has_config for p in out.iterdir())
    if cfg.overwrite and holds:
        cli.empty_folder(out)
    elif holds and not cfg.resume:
        if not (has_config and not checkpoint.weight_steps(out)):
            what = "a run (config.json)" if has_config else "files of something else"
            cli.fail(f"--out {out} already holds {what}: pass --resume to continue it or --overwrite to start clean")
        saved = json.loads((out / "config.json").read_text())  # a start that never got to a checkpoint
        if all(_json(v) == _json(saved.get(k)) for k, v in asdict(cfg).items() if k not in ("resume", "overwrite")):
            return prepare_run_dir(replace(cfg, resume=True), given, out)
        print(f"{out}: removing an unfinished start (no checkpoint) made with other settings", file=sys.stderr)
        cli.empty_folder(out)
    for p in checkpoint.clean(out) if out.is_dir() else []:
        print(f"removed {p}, left by an interrupted write", file=sys.stderr)
    if cfg.resume and (out / "config.json").is_file():
        cfg = resume_config(cfg, given, out)
    elif cfg.resume and holds:
        cli.fail(f"--resume: {out} has no config.json, so it holds no run; pass --overwrite to start one there")
    return cfg
