"""Benchmark one DiNO-Diffusion training step (ours) against the equivalent diffusers UNet step on CPU.

A step = add noise to latents at random t (our DDPMScheduler vs diffusers' DDPMScheduler), UNet forward with
a c_GLB-like context, MSE to the noise, backward, AdamW update. Same weights, same inputs; the frozen VAE and
ViT are excluded (identical in both, or cached with --cache-latents). Rows give img/s in `ours_img_s`.
Full: SD v1.5 UNet at a 32x32 latent (256 px), batch 1; quick: the tiny preset's UNet, batch 16.
Run: `python -m bench.bench_train [--quick]`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from bench.common import make_row, measure, print_table
from ddpm import DDPMScheduler
from tests.helpers import heavy_lock, patch_torchvision
from unet import UNet2DConditionModel, UNetConfig


def _step_fn(model, opt, add_noise, x0, ctx, noise, t, output):
    def step():
        pred = output(model(add_noise(x0, noise, t), t, ctx))
        F.mse_loss(pred, noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run(quick: bool) -> list[dict]:
    patch_torchvision()
    import diffusers

    import train

    if quick:
        config, batch, latent = UNetConfig(**train.PRESETS["tiny"].unet_config), 16, 16
    else:
        config, batch, latent = UNetConfig(), 1, 32
    with contextlib.nullcontext() if quick else heavy_lock():
        torch.manual_seed(0)
        ref = diffusers.UNet2DConditionModel(**dataclasses.asdict(config)).train()
        ours = UNet2DConditionModel(config).train()
        ours.load_state_dict(ref.state_dict(), strict=True)
        x0 = torch.randn(batch, config.in_channels, latent, latent)
        ctx = torch.randn(batch, 5, config.cross_attention_dim)
        noise, t = torch.randn_like(x0), torch.randint(0, 1000, (batch,))
        ref_sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        ours_step = _step_fn(ours, torch.optim.AdamW(ours.parameters(), lr=1e-5), DDPMScheduler().add_noise,
                             x0, ctx, noise, t, lambda y: y)
        ref_step = _step_fn(ref, torch.optim.AdamW(ref.parameters(), lr=1e-5), ref_sched.add_noise,
                            x0, ctx, noise, t, lambda y: y.sample)
        m = measure(ours_step, ref_step, repeats=3 if quick else 2)
    name = f"train step B={batch} ({latent}x{latent} latent, {sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M)"
    return [make_row(name, m, ours_img_s=batch / m.ours_s, ref_img_s=batch / m.ref_s)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny-preset UNet instead of SD v1.5")
    print_table(run(parser.parse_args().quick))
