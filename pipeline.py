"""The three networks of DiNO-Diffusion, built from a training config and reloaded from a run directory.

    image --(frozen DINO ViT)--> c_GLB [B, G, D] ----------------------------.
    image --(frozen VAE encoder)--> z0 * 0.18215 --(+ noise at t)--> x_t --> UNet --> predicted noise
                                                                                  (cross-attends to c_GLB)

A model is either pretrained (a Hub repo id / local folder / single file, loaded through hub.py) or built
from a config with random weights (the tiny CPU presets). Frozen models that are not pretrained are written
into the run directory (`vae/`, `dino/`) so that sample.py and segment.py reload exactly what training used.

Run directory:
    config.json                                  the full training config (models, data, optimisation)
    vae/, dino/                                  frozen models that do not come from a pretrained source
    checkpoints/step_XXXXXXX.safetensors         UNet weights (loadable by UNet2DConditionModel)
    checkpoints/step_XXXXXXX.ema.safetensors     EMA UNet weights (when EMA is on)
    checkpoints/step_XXXXXXX.state.safetensors   optimizer / scaler / data position (for --resume)
    metrics.jsonl, samples/
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

import checkpoint
import hub
from ddpm import DDIMScheduler, DDPMScheduler
from unet import UNet2DConditionModel, UNetConfig
from vae import AutoencoderKL, VAEConfig
from vit_dino import DinoConfig, DinoViT

# ---------------------------------------------------------------------------------------------- building

AUTOCAST = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}  # --mixed-precision -> UNet dtype


def _build(cls, config_cls, source, config: dict | None, **where):
    if source:
        return cls.from_pretrained(source, **where)
    where = f"{config_cls.__name__} of the run config"  # from_dict: the VAE's and UNet's option checks
    if hasattr(config_cls, "from_dict"):
        return cls(config_cls.from_dict(config or {}, source=where))
    return cls(hub.config_from_dict(config_cls, config or {}, source=where))


def build_vae(source, config: dict | None, subfolder=None) -> AutoencoderKL:
    return _build(AutoencoderKL, VAEConfig, source, config, subfolder=subfolder)


def build_unet(source, config: dict | None, subfolder=None) -> UNet2DConditionModel:
    return _build(UNet2DConditionModel, UNetConfig, source, config, subfolder=subfolder)


def build_dino(source, config: dict | None) -> DinoViT:
    return _build(DinoViT, DinoConfig, source, config)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Frozen encoders: eval mode (no dropout), no gradients."""
    model.eval().requires_grad_(False)
    return model


def save_local(model, folder: Path):
    """`model.save_pretrained(folder)` through `hub.atomic_path`: `folder` is complete or absent (a failed write,
    e.g. a full disk, names `folder`)."""
    try:
        with hub.atomic_path(folder) as tmp:
            model.save_pretrained(tmp)
    except OSError as e:
        raise OSError(f"cannot write {folder}: {e}") from e


# ---------------------------------------------------------------------------------------------- condition


@torch.inference_mode()
def condition(dino: DinoViT, images: torch.Tensor) -> torch.Tensor:
    """c_GLB of images [B, 1 or 3, H, W] in [0, 1] -> [B, G, D] float32 (paper Sec. 2: CLS, pooler, regs)."""
    x = dino.preprocess(images.float().clamp(0, 1))
    return dino.global_tokens(x).float()


# ---------------------------------------------------------------------------------------------- run dirs


def checkpoints(run_dir) -> list[tuple[int, Path]]:
    """(step, UNet weights path) of every checkpoint of a run, oldest first."""
    return [(step, checkpoint.paths(run_dir, step)["weights"]) for step in checkpoint.weight_steps(run_dir)]


def make_scheduler(cfg: dict, kind: str = "ddim"):
    """The sampler for a run: DDIM or DDPM over the run's training noise schedule (one shared config)."""
    return {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[kind].from_config(cfg.get("scheduler") or {})


def run_channels(cfg: dict) -> int:
    """Image channels of a run from its config.json: 1 (grey; runs from before --channels) or 3 (colour)."""
    return int(cfg.get("channels", 1))


class Run(NamedTuple):
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    dino: DinoViT
    config: dict
    step: int
    weights: Path | None


def load_run(run_dir, *, ema: bool = True, step: int | None = None, device=None) -> Run:
    """Rebuild UNet (newest or given checkpoint, EMA weights when present and `ema`), VAE and DINO of a run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
    cfg = json.loads((run_dir / "config.json").read_text())
    found = [s for s in checkpoint.weight_steps(run_dir) if step in (None, s)]
    if not found:
        raise FileNotFoundError(f"{run_dir}/checkpoints has no {'any checkpoint' if step is None else f'step {step}'}")
    weights = checkpoint.unet_file(run_dir, found[-1], ema)
    unet_cfg = hub.config_from_dict(UNetConfig, cfg["unet_config_resolved"], source=f"{run_dir}/config.json")
    unet = hub.load_model(UNet2DConditionModel, unet_cfg, hub.load_state_dict_file(weights), source=str(weights),
                          device=device)
    # the frozen models: the run's own copies (random init) or the pretrained sources it names
    vae_at = (run_dir / "vae", None) if (run_dir / "vae").is_dir() else (cfg["vae"], cfg.get("vae_subfolder"))
    vae = AutoencoderKL.from_pretrained(*vae_at, device=device)
    dino = DinoViT.from_pretrained(run_dir / "dino" if (run_dir / "dino").is_dir() else cfg["dino"], device=device)
    return Run(unet, freeze(vae), freeze(dino), cfg, found[-1], weights)
