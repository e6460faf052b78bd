"""Benchmark DiffSeg segmentation of one image against one plain UNet forward, on CPU, random weights.

Rows (ref = what a plain forward costs; goal: time_ratio <= 2, memory bounded):
- segment:   ours = UNet forward inside `capture_self_attention(callback=AttentionAggregator)` + `result()`
             + `diffseg(grid 16, threshold 0.05, out_size = image size)`, i.e. segment.py's per-image work
             after VAE encoding; ref = the same UNet forward without capture (SDPA everywhere).
- capture forward (quick only): the forward with capture alone (no aggregation, no merging) vs plain.
- attn1 @ finest grid: one self-attention layer of the finest grid (the 4096-token layers at 512 px),
             `attention_with_probs` (explicit, float32 probabilities averaged over heads) vs
             `F.scaled_dot_product_attention`: where the capture overhead comes from.

Full: the SD v1.5 UNet (859.5M parameters, ~3.5 GB) at 512 px (latent 64x64), under the heavy-test lock;
one timed call after one warm-up (a forward takes ~20-50 s on 2 cores). `quick`: the SD v1 block structure at
a quarter of the width (64-128-256-256, head dim 32) at 256 px. Peak memory: bench/common.py (RSS high-water
mark above what is live before the call, so weights and inputs are not counted).
Run: `python -m bench.bench_diffseg [--quick]`.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

from bench.common import make_row, measure, print_table
from diffseg import AttentionAggregator, diffseg
from tests.helpers import heavy_lock
from unet import UNet2DConditionModel, UNetConfig, attention_with_probs

TIMESTEP, GRID, THRESHOLD = 300, 16, 0.05  # DiNO-Diffusion's DiffSeg settings (notes/method.md)
QUICK = UNetConfig(block_out_channels=(64, 128, 256, 256), attention_head_dim=(2, 4, 8, 8))


def run(quick: bool) -> list[dict]:
    config, size, repeats = (QUICK, 256, 3) if quick else (UNetConfig(), 512, 1)
    with contextlib.nullcontext() if quick else heavy_lock():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(config).eval()
        side = size // 8
        latents = torch.randn(1, config.in_channels, side, side)
        context = torch.zeros(1, 1, config.cross_attention_dim)  # segment.py --context zeros

        def plain():
            return unet(latents, TIMESTEP, context)

        def capture():
            with unet.capture_self_attention(callback=lambda m: None):
                return unet(latents, TIMESTEP, context)

        def segment():
            agg = AttentionAggregator()
            with unet.capture_self_attention(callback=agg):
                unet(latents, TIMESTEP, context)
            return diffseg(agg.result(), GRID, THRESHOLD, out_size=size, resolution=agg.resolution)

        where = f"{size} px, {sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M params"
        rows = []
        with torch.inference_mode():
            rows.append(make_row(f"segment ({where})", measure(segment, plain, repeats=repeats)))
            if quick:
                rows.append(make_row(f"capture forward ({where})", measure(capture, plain, repeats=repeats)))
            heads = config.heads()[0]
            q, k, v = torch.randn(3, 1, heads, side * side, config.block_out_channels[0] // heads)
            scale = q.shape[-1] ** -0.5
            rows.append(make_row(f"attn1 @ {side}x{side} ({heads} heads, d={q.shape[-1]})",
                                 measure(lambda: attention_with_probs(q, k, v, scale),
                                         lambda: F.scaled_dot_product_attention(q, k, v), repeats=3)))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="quarter-width UNet at 256 px")
    print_table(run(parser.parse_args().quick))
