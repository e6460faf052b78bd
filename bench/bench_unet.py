"""Benchmark our UNet2DConditionModel against diffusers' on CPU: same random weights, float32, 5 tokens.

Rows (ours vs diffusers `UNet2DConditionModel`, goal: time_ratio <= 1 and mem_ratio <= 1):
- forward B=1/2:          one denoising call under inference_mode (what sampling and DiffSeg cost)
- forward+backward B=1/2: mean-square loss on the output, backward, gradients freed (one training step
                          without the optimizer)

- forward B=1 compiled:   `--compile`: ours under torch.compile (inductor; outputs checked against eager
                          first) vs diffusers eager. Compilation itself (minutes on CPU) is not timed.

Full: the SD v1.5 UNet (859.5M parameters, ~3.4 GB each) at a 32x32 latent (256 px), under the heavy-test
lock. `quick`: the SD v1 block structure at a quarter of the width (64-128-256-256) with batch 1 only.
Run: `python -m bench.bench_unet [--quick]`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses

import torch

from bench.common import make_row, measure, print_table
from tests.helpers import heavy_lock, patch_torchvision
from unet import UNet2DConditionModel, UNetConfig

LATENT, CONTEXT_LEN, TIMESTEP = 32, 5, 500
QUICK = UNetConfig(block_out_channels=(64, 128, 256, 256), attention_head_dim=(2, 4, 8, 8))


def _models(config: UNetConfig):
    patch_torchvision()
    from diffusers import UNet2DConditionModel as Reference

    ref = Reference(**dataclasses.asdict(config)).eval()
    ours = UNet2DConditionModel(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _inputs(config: UNetConfig, b: int):
    """Latents [B, C, LATENT, LATENT], timesteps [B], context [B, CONTEXT_LEN, cross_attention_dim]."""
    return (torch.randn(b, config.in_channels, LATENT, LATENT), torch.full((b,), TIMESTEP),
            torch.randn(b, CONTEXT_LEN, config.cross_attention_dim))


def _bench_batch(ours, ref, b: int, where: str, repeats: int) -> list[dict]:
    x, t, ctx = _inputs(ours.config, b)

    def ours_fwd():
        return ours(x, t, ctx)

    def ref_fwd():
        return ref(x, t, ctx).sample

    def step(model, fwd):
        fwd().square().mean().backward()
        model.zero_grad(set_to_none=True)

    with torch.inference_mode():
        fwd = make_row(f"forward B={b} ({where})", measure(ours_fwd, ref_fwd, repeats=repeats))
    train = make_row(f"forward+backward B={b} ({where})",
                     measure(lambda: step(ours, ours_fwd), lambda: step(ref, ref_fwd), repeats=repeats))
    return [fwd, train]


def _bench_compiled(ours, ref, where: str, repeats: int) -> dict:
    """torch.compile(ours) vs eager diffusers at B=1, after checking the compiled output equals eager."""
    x, t, ctx = _inputs(ours.config, 1)
    compiled = torch.compile(ours)
    with torch.inference_mode():
        eager, fast = ours(x, t, ctx), compiled(x, t, ctx)  # the first compiled call compiles
        diff = (fast - eager).abs().max().item() / eager.abs().max().item()
        if diff > 1e-4:
            raise AssertionError(f"compiled UNet differs from eager: max abs diff {diff:.2e} of the output scale")
        m = measure(lambda: compiled(x, t, ctx), lambda: ref(x, t, ctx).sample, repeats=repeats)
    return make_row(f"forward B=1 torch.compile ({where}; diff {diff:.0e})", m)


def run(quick: bool, compile: bool = False) -> list[dict]:
    config, batches, repeats = (QUICK, (1,), 3) if quick else (UNetConfig(), (1, 2), 2)
    rows = []
    with contextlib.nullcontext() if quick else heavy_lock():
        torch.manual_seed(0)
        ours, ref = _models(config)
        where = f"{LATENT}x{LATENT} latent, {sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M params"
        for b in batches:
            rows += _bench_batch(ours, ref, b, where, repeats)
        if compile:
            rows.append(_bench_compiled(ours, ref, where, repeats))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="quarter-width UNet, batch 1 only")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile (inductor) forward row")
    args = parser.parse_args()
    print_table(run(args.quick, args.compile))
