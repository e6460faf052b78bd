"""Benchmark DinoViT against its references on CPU: same random weights, batch 8, 224 px, inference_mode.

Rows:
- dino_vitb16:               ours `forward` vs transformers `ViTModel` (DINO v1 ViT-B/16, native 224 px)
- dinov2_vitb14_reg4@224:    ours `forward` vs timm `vit_base_patch14_reg4_dinov2` (dynamic_img_size, so
                             both resample the 37x37 position grid to 16x16 every call)
- dinov2_vitb14_reg4@224 c_GLB: ours `global_tokens` (last block updates only CLS + registers) vs slicing
                             timm's `forward_features`: what DiNO-Diffusion actually computes per batch

`quick` uses 2 of the 12 blocks (real widths) and fewer repeats. Run: `python -m bench.bench_vit [--quick]`.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from bench.common import make_row, measure, print_table
from tests.helpers import patch_torchvision
from vit_dino import DinoConfig, DinoViT, convert

BATCH, SIZE = 8, 224


def _dino_v1(depth: int):
    from transformers import ViTConfig, ViTModel

    ref = ViTModel(ViTConfig(num_hidden_layers=depth), add_pooling_layer=False).eval()
    ours = DinoViT(dataclasses.replace(DinoConfig.dino_vitb16(), num_hidden_layers=depth)).eval()
    ours.load_state_dict(convert.convert_state_dict(ref.state_dict(), "transformers"), strict=True)
    return ours, lambda x: ref(x).last_hidden_state


def _dinov2(depth: int):
    import timm

    arch = "vit_base_patch14_reg4_dinov2"
    ref = timm.create_model(arch, pretrained=False, dynamic_img_size=True, depth=depth)
    ours = DinoViT(dataclasses.replace(DinoConfig.dinov2_vitb14_reg4(), num_hidden_layers=depth)).eval()
    ours.load_state_dict(convert.convert_state_dict(ref.state_dict(), "timm"), strict=True)
    return ours, ref.eval().forward_features


def _row(name: str, build, depth: int, repeats: int, global_tokens: bool = False) -> dict:
    ours, ref = build(depth)
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    ours_fn = ours.global_tokens if global_tokens else ours
    with torch.inference_mode():
        m = measure(lambda: ours_fn(x), lambda: ref(x), repeats=repeats)
    return make_row(f"{name} (B={BATCH}, {SIZE} px, {depth} blocks)", m)


def run(quick: bool) -> list[dict]:
    patch_torchvision()
    torch.manual_seed(0)
    depth, repeats = (2, 3) if quick else (12, 5)
    return [
        _row("dino_vitb16 vs transformers", _dino_v1, depth, repeats),
        _row("dinov2_vitb14_reg4 vs timm", _dinov2, depth, repeats),
        _row("dinov2_vitb14_reg4 c_GLB vs timm", _dinov2, depth, repeats, global_tokens=True),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 blocks instead of 12, fewer repeats")
    print_table(run(parser.parse_args().quick))
