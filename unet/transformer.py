"""Transformer2DModel: a transformer over the pixels of a feature map, conditioned on context tokens.

The feature map [B, C, h, w] is normalised (GroupNorm, eps 1e-6 as in SD), projected (1x1 conv in SD v1,
Linear in SD 2.x), flattened to h*w tokens and passed through BasicTransformerBlock(s):

    x = x + attn1(norm1(x))               self-attention between pixels    (DiffSeg reads these maps)
    x = x + attn2(norm2(x), context)      cross-attention to the context   (c_GLB, 1-5 DINO tokens)
    x = x + ff(norm3(x))                  GEGLU feed-forward (Shazeer 2020), inner width 4*C

then projected back and added to the input (Rombach et al. 2022, LDM, sec. 3.3 and appendix). Attribute
names mirror the diffusers checkpoint keys (`ff.net.0.proj`, `ff.net.2`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unet.attention import Attention

FF_MULT = 4  # feed-forward inner width = 4 * dim (Vaswani et al. 2017; LDM FeedForward mult=4)


class GEGLU(nn.Module):
    """proj: dim -> 2*inner; out = a * gelu(gate) with (a, gate) the two halves (exact GELU)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # Keys `net.0.proj` and `net.2`: diffusers keeps a Dropout (no weights) at index 1.
        self.net = nn.ModuleList([GEGLU(dim, FF_MULT * dim), nn.Identity(), nn.Linear(FF_MULT * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), size=size)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, linear_projection: bool,
                 upcast: bool):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)  # eps: LDM/diffusers Transformer2DModel
        if linear_projection:
            self.proj_in = nn.Linear(channels, channels)
            self.proj_out = nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, 1)
            self.proj_out = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, channels // heads, context_dim, upcast)]
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, C, h, w], context [B, L, C_ctx] -> [B, C, h, w]."""
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.linear_projection:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, h*w, C]
        if self.linear_projection:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context, (h, w))
        if self.linear_projection:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, c).permute(0, 3, 1, 2)  # [B, C, h, w]
        if not self.linear_projection:
            x = self.proj_out(x.contiguous())
        return x + residual
