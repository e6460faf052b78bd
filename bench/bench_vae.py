"""Benchmark our AutoencoderKL against diffusers' on CPU: same random weights (SD v1 config), float32.

Rows (ours vs diffusers `AutoencoderKL`, under inference_mode; goal: time_ratio <= 1 and mem_ratio <= 1):
- encode:  image [1, 3, S, S] -> posterior mean [1, 4, S/8, S/8]   (what training and reconstruction pay)
- decode:  latent [1, 4, S/8, S/8] -> image [1, 3, S, S]            (once per generated image)
- the same two with both models and inputs in channels_last (full run only)

Full: S = 256, under the heavy-test lock. `quick`: S = 128, fewer repeats.
Run: `python -m bench.bench_vae [--quick]`.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from bench.common import make_row, measure, print_table
from tests.helpers import heavy_lock, patch_torchvision
from vae import AutoencoderKL, VAEConfig


def _models():
    patch_torchvision()
    from diffusers import AutoencoderKL as Reference

    config = VAEConfig()
    ref = Reference(block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
                    down_block_types=config.down_block_types, up_block_types=config.up_block_types,
                    latent_channels=config.latent_channels, norm_num_groups=config.norm_num_groups,
                    sample_size=config.sample_size).eval()
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _rows(ours, ref, size: int, repeats: int, channels_last: bool) -> list[dict]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for m in (ours, ref):
        m.to(memory_format=fmt)
    x = (torch.rand(1, 3, size, size) * 2 - 1).contiguous(memory_format=fmt)
    z = torch.randn(1, 4, size // 8, size // 8).contiguous(memory_format=fmt)
    tag = f"{size}px" + (", channels_last" if channels_last else "")
    with torch.inference_mode():
        enc = measure(lambda: ours.encode(x).mean, lambda: ref.encode(x).latent_dist.mean, repeats=repeats)
        dec = measure(lambda: ours.decode(z), lambda: ref.decode(z).sample, repeats=repeats)
    return [make_row(f"vae encode ({tag})", enc), make_row(f"vae decode ({tag})", dec)]


def run(quick: bool) -> list[dict]:
    size, repeats = (128, 3) if quick else (256, 5)
    with contextlib.nullcontext() if quick else heavy_lock():
        torch.manual_seed(0)
        ours, ref = _models()
        rows = _rows(ours, ref, size, repeats, channels_last=False)
        if not quick:
            rows += _rows(ours, ref, size, repeats, channels_last=True)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="128 px input, 3 repeats, no channels_last rows")
    print_table(run(parser.parse_args().quick))
