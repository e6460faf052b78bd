"""Benchmark DDIM sampling: our generate() loop vs the equivalent diffusers loop (UNet + DDIMScheduler + VAE
decode), same weights and noise. Two rows:

- `DDIM` (tiny preset, 64 px): one call of each, timed as is;
- `sampling throughput`: images/s of a 50-step DDIM job as sample.py runs it (per-sample seeds, inference mode,
  --batch-size B), ours vs diffusers' DDIM pipeline math on the same UNet and VAE. A k-step call costs
  fixed + k * step (noise, k UNet+scheduler steps, one VAE decode), so both are timed at k = 1 and k = K and
  the 50-step time is fixed + 50 * step: exact up to timing noise, and affordable at SD v1.5 / 512 px on a CPU.
  Quick: tiny preset at 64 px, B=8, K=5. Full: SD v1.5 UNet and VAE (random weights) at 512 px, B=1 on a CPU
  (B=16 on a GPU, where it runs with bf16 autocast), K=3.
  `ours_s` / `ref_s` are then seconds per batch of B at 50 steps; `ours_img_s` / `ref_img_s` the rates.
Run: `python -m bench.bench_sample [--quick]`.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from bench.common import Measurement, make_row, measure, print_table
from ddpm import DDIMScheduler
from generate import generate, to_grayscale
from tests.helpers import patch_torchvision
from unet import UNet2DConditionModel, UNetConfig
from vae import AutoencoderKL, VAEConfig


def models(ucfg: UNetConfig, vcfg: VAEConfig):
    """(ours UNet, ours VAE, diffusers UNet, diffusers VAE), the same random weights in both."""
    import diffusers

    unet_ref = diffusers.UNet2DConditionModel(**dataclasses.asdict(ucfg)).eval()
    n = len(vcfg.block_out_channels)
    vae_ref = diffusers.AutoencoderKL(
        block_out_channels=vcfg.block_out_channels, layers_per_block=vcfg.layers_per_block,
        norm_num_groups=vcfg.norm_num_groups, latent_channels=vcfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
    ).eval()
    unet, vae = UNet2DConditionModel(ucfg).eval(), AutoencoderKL(vcfg).eval()
    unet.load_state_dict(unet_ref.state_dict(), strict=True)
    vae.load_state_dict(vae_ref.state_dict(), strict=True)
    return unet, vae, unet_ref, vae_ref


def reference_sampler(unet_ref, vae_ref, ctx, seeds, steps: int, amp=None):
    """diffusers' DDIM pipeline math: per-sample seeded noise, UNet (under autocast `amp`) + DDIMScheduler.step,
    VAE decode in float32 -> grey images on the CPU."""
    import diffusers

    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(steps)
    shape = (unet_ref.config.in_channels, unet_ref.config.sample_size, unet_ref.config.sample_size)
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(ctx.device)
    for t in sched.timesteps:
        with torch.autocast(ctx.device.type, dtype=amp, enabled=amp is not None):
            eps = unet_ref(x, t, encoder_hidden_states=ctx).sample.float()
        x = sched.step(eps, t, x).prev_sample
    return ((vae_ref.decode(x / 0.18215).sample + 1) / 2).clamp(0, 1).mean(1, keepdim=True).cpu()


def throughput_row(unet, vae, unet_ref, vae_ref, label: str, batch: int, k: int, repeats: int) -> dict:
    """Images/s of a 50-step DDIM job at batch `batch` from calls of 1 and `k` steps (module docstring); on a
    GPU when there is one, with the UNets under bf16 autocast (sample.py --mixed-precision bf16)."""
    device, amp = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", None)
    for model in (unet, vae, unet_ref, vae_ref):
        model.to(device)
    size = unet.config.sample_size * vae.config.downsample_factor
    ctx = torch.randn(batch, 5, unet.config.cross_attention_dim, device=device)  # DINOv2-reg4 c_GLB: CLS + 4 regs
    seeds = list(range(batch))

    def timed(steps):
        def ours():  # .cpu(): the images are on the host (and a GPU has finished) when the timer stops
            return to_grayscale(generate(unet, vae, DDIMScheduler(), ctx, seeds=seeds, height=size, width=size,
                                         steps=steps, autocast_dtype=amp)).cpu()

        with torch.inference_mode():
            return measure(ours, lambda: reference_sampler(unet_ref, vae_ref, ctx, seeds, steps, amp),
                           repeats=repeats)

    lo, hi = timed(1), timed(k)
    # fixed + 50 * step = t(1) + 49 * step; a step never costs less than nothing (else: timing noise)
    at50 = [a + max(b - a, 0.0) / (k - 1) * 49 for a, b in zip((lo.ours_s, lo.ref_s), (hi.ours_s, hi.ref_s))]
    m = Measurement(at50[0], max(lo.ours_mb, hi.ours_mb), at50[1], max(lo.ref_mb, hi.ref_mb))
    where = "GPU bf16" if device == "cuda" else "CPU fp32"
    return make_row(f"sampling throughput, DDIM 50 steps, B={batch} ({label}, {size} px, {where}; from 1 and {k} "
                    "steps)",
                    m, ours_img_s=batch / m.ours_s, ref_img_s=batch / m.ref_s)


def run(quick: bool) -> list[dict]:
    patch_torchvision()
    import diffusers

    import train

    steps, batch = (10 if quick else 50), 4
    preset = train.PRESETS["tiny"]
    torch.manual_seed(0)
    ucfg, vcfg = UNetConfig(**preset.unet_config), VAEConfig(**preset.vae_config)
    unet, vae, unet_ref, vae_ref = models(ucfg, vcfg)
    ctx = torch.randn(batch, 5, ucfg.cross_attention_dim)
    latents = torch.randn(batch, 4, ucfg.sample_size, ucfg.sample_size)

    def ours():
        return generate(unet, vae, DDIMScheduler(), ctx, latents=latents, steps=steps)

    def ref():
        sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        sched.set_timesteps(steps)
        x = latents
        for t in sched.timesteps:
            x = sched.step(unet_ref(x, t, encoder_hidden_states=ctx).sample, t, x).prev_sample
        return vae_ref.decode(x / 0.18215).sample

    with torch.inference_mode():
        m = measure(ours, ref, repeats=3)
    rows = [make_row(f"DDIM {steps} steps, B={batch} (tiny preset, 64 px)", m, ours_img_s=batch / m.ours_s,
                     ref_img_s=batch / m.ref_s)]
    if quick:
        return rows + [throughput_row(unet, vae, unet_ref, vae_ref, "tiny preset", 8, 5, repeats=3)]
    sd = models(UNetConfig(), VAEConfig())  # SD v1.5 sizes, random weights
    return rows + [throughput_row(*sd, "SD v1.5", 16 if torch.cuda.is_available() else 1, 3, repeats=1)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-size inputs (tiny preset only)")
    print_table(run(parser.parse_args().quick))
