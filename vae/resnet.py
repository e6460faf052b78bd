"""The VAE residual block: two (GroupNorm -> SiLU -> 3x3 conv) stages plus a skip connection.

    h = conv1(silu(norm1(x)))              # [B, C_in, H, W] -> [B, C_out, H, W]
    h = conv2(silu(norm2(h)))
    out = h + (x if C_in == C_out else conv_shortcut(x))   # 1x1 conv when the width changes

This is diffusers' `ResnetBlock2D` with `temb_channels=None` (no time embedding: the autoencoder is not a
diffusion model), CompVis `ResnetBlock` with `nin_shortcut`. Dropout is 0 in every SD VAE and is omitted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """silu(norm(x)), the SiLU in place on the fresh GroupNorm output: one activation-sized buffer less.
    Autograd-safe: GroupNorm's backward reads its input, not its output, and PyTorch differentiates silu_
    (tests compare our gradients with diffusers')."""
    return F.silu(norm(x), inplace=True)


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = norm_silu(self.norm2, self.conv1(norm_silu(self.norm1, x)))  # conv1 output freed before conv2
        h = self.conv2(h)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(skip)  # in place on conv2's fresh output (conv backward does not need its output)
