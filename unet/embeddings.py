"""Timestep embedding: how the UNet knows the noise level.

The diffusion step t (an integer in [0, 1000) for SD, or a float) becomes a vector of sinusoids at
geometrically spaced frequencies, exactly like the position encoding of "Attention is all you need"
(Vaswani et al. 2017, sec. 3.5) as used by DDPM (Ho et al. 2020, appendix B):

    freq_i = exp(-ln(10000) * i / (half - freq_shift)),   i = 0 .. half-1,   half = dim / 2
    emb(t) = [cos(t * freq), sin(t * freq)]     (flip_sin_to_cos=True, SD; otherwise [sin, cos])

An MLP (`TimestepEmbedding`: Linear -> SiLU -> Linear, 320 -> 1280 -> 1280 in SD) turns it into the vector
every ResnetBlock2D adds to its features. The sinusoids are computed in float32 on every call (no buffer):
they are cheap and keep the module free of non-persistent state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_PERIOD = 10000  # Vaswani et al. 2017, sec. 3.5


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t [B] (int or float) -> float32 [B, dim]."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(MAX_PERIOD))
    freqs = torch.exp(exponent / (half - freq_shift))  # [half]
    args = t[:, None].float() * freqs[None]  # [B, half]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # [B, 2*half]
    return F.pad(emb, (0, dim % 2))  # odd dim: one zero column


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: Linear(in, D) -> SiLU -> Linear(D, D)."""

    def __init__(self, in_channels: int, embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))
