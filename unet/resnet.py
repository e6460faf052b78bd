"""ResnetBlock2D, Downsample2D, Upsample2D: the convolutional parts of the UNet.

ResnetBlock2D (Ho et al. 2020 DDPM, after Wide-ResNet) conditions on the timestep by adding a projection of
the time embedding between its two convolutions:

    h = conv1(silu(norm1(x)))                      [B, C_out, H, W]
    h = h + time_emb_proj(silu(temb))[:, :, None, None]
    h = conv2(silu(norm2(h)))
    out = shortcut(x) + h                          shortcut: 1x1 conv when C_in != C_out

Downsample2D halves the resolution with a 3x3 stride-2 convolution (padding 1, so an odd side n gives
ceil(n / 2)); Upsample2D doubles it by nearest-neighbour repetition followed by a 3x3 convolution, or
resizes to an explicit `size` so that odd-sized skip connections still line up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)]


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # [B, C, 2H, 2W]
        else:
            x = F.interpolate(x, size=size, mode="nearest")  # [B, C, *size]
        return self.conv(x)
