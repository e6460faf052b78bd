"""Single-head spatial self-attention, the one attention layer of each VAE mid-block.

Every pixel of the lowest-resolution feature map (32x32 for a 256x256 image) attends to every other pixel,
with one head spanning all C channels (diffusers builds it with heads = C // attention_head_dim = 1):

    t = group_norm(x)                         # [B, C, H, W]
    q, k, v = to_q(t), to_k(t), to_v(t)       # per pixel, as tokens [B, HW, C]
    a = softmax(q k^T / sqrt(C)) v            # [B, HW, C]
    out = x + to_out.0(a)                     # back to [B, C, H, W], residual

Key names are diffusers' (`group_norm`, `to_q`, `to_k`, `to_v`, `to_out.0`). Older Hub files call them
`query/key/value/proj_attn` and CompVis files `norm/q/k/v/proj_out` (as 1x1 convs); `vae/convert.py` renames.
The fast path is `F.scaled_dot_product_attention` (a fused kernel that never materialises the HW x HW matrix);
`return_probs=True` takes the explicit path that does, and returns the probabilities too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # `to_out.0`, as in the checkpoints

    def forward(self, x: torch.Tensor, return_probs: bool = False):
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> tokens [B, HW, C]
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # [B, 1 head, HW, C]
        if return_probs:
            scores = (q.float() @ k.float().transpose(-1, -2)) * c**-0.5  # fp32 softmax statistics
            probs = scores.softmax(dim=-1)  # [B, 1, HW, HW]
            a = (probs.to(v.dtype) @ v).squeeze(1)
        else:
            a = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [B, HW, C]
        out = x + self.to_out[0](a).transpose(1, 2).reshape(b, c, h, w)  # [B, C, H, W], in x's memory format
        return (out, probs.squeeze(1)) if return_probs else out
