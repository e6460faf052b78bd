"""Benchmark DDIM sampling: our generate() loop vs the equivalent diffusers loop (UNet + DDIMScheduler + VAE
decode), same weights and noise, tiny-preset models on CPU. Rows give images/s in `ours_img_s`.
Run: `python -m bench.bench_sample [--quick]` (quick: 10 steps instead of 50).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from bench.common import make_row, measure, print_table
from ddpm import DDIMScheduler
from generate import generate
from tests.helpers import patch_torchvision
from unet import UNet2DConditionModel, UNetConfig
from vae import AutoencoderKL, VAEConfig


def run(quick: bool) -> list[dict]:
    patch_torchvision()
    import diffusers

    import train

    steps, batch = (10 if quick else 50), 4
    preset = train.PRESETS["tiny"]
    torch.manual_seed(0)
    ucfg, vcfg = UNetConfig(**preset.unet_config), VAEConfig(**preset.vae_config)
    unet_ref = diffusers.UNet2DConditionModel(**dataclasses.asdict(ucfg)).eval()
    n = len(vcfg.block_out_channels)
    vae_ref = diffusers.AutoencoderKL(
        block_out_channels=vcfg.block_out_channels, layers_per_block=1, norm_num_groups=vcfg.norm_num_groups,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
    ).eval()
    unet, vae = UNet2DConditionModel(ucfg).eval(), AutoencoderKL(vcfg).eval()
    unet.load_state_dict(unet_ref.state_dict(), strict=True)
    vae.load_state_dict(vae_ref.state_dict(), strict=True)
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
    return [make_row(f"DDIM {steps} steps, B={batch} (tiny preset, 64 px)", m, ours_img_s=batch / m.ours_s,
                     ref_img_s=batch / m.ref_s)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 sampling steps instead of 50")
    print_table(run(parser.parse_args().quick))
