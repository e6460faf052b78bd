"""Multi-head attention with a fast path and an explicit path that exposes the probabilities.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V          (Vaswani et al. 2017, eq. 1)

Q comes from the image tokens x [B, N, C] (N = h*w); K and V come from x itself (self-attention, `attn1`)
or from the context tokens [B, L, C_ctx] (cross-attention to c_GLB, `attn2`). Each of the `heads` heads
works on d = inner / heads channels.

Fast path: `F.scaled_dot_product_attention` (fused kernel, never materialises the N x N matrix).

Explicit path (DiffSeg, Tian et al. 2024): P = softmax(Q K^T * d^-0.5) computed in float32 with autocast
off, then P V. The probabilities are averaged over heads into a float32 [B, N, N] map and handed to
`self.capture(probs, size)`. Heads are processed a few at a time (at most PROBS_CHUNK_ELEMENTS scores alive
at once) so that the full per-head tensor [B, heads, N, N] never exists: at a 64x64 latent N = 4096 and
8 heads would need 512 MB per image, a chunk needs 128 MB.

`capture` is a plain attribute (None, or a callable set by `UNet2DConditionModel.capture_self_attention`);
when it is None the module is pure SDPA and compiles without graph breaks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

PROBS_CHUNK_ELEMENTS = 2**25  # 128 MB of float32 scores per chunk of heads


def attention_with_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Explicit attention. q [B, H, N, d], k/v [B, H, L, d] -> (out [B, H, N, d], probs [B, N, L] float32).

    `probs` is softmax(q k^T * scale) averaged over the H heads, computed in float32 whatever the input
    dtype or autocast state.
    """
    b, heads, n, _ = q.shape
    step = max(1, min(heads, PROBS_CHUNK_ELEMENTS // (b * n * k.shape[2])))
    outs, probs = [], None
    with torch.autocast(q.device.type, enabled=False):
        q, kt = q.float() * scale, k.float().transpose(-1, -2)  # scale the N x d queries, not the N x L scores
        for h in range(0, heads, step):
            p = torch.softmax(q[:, h : h + step] @ kt[:, h : h + step], dim=-1)  # [B, s, N, L]
            outs.append(p.to(v.dtype) @ v[:, h : h + step])  # [B, s, N, d]
            head_sum = p.sum(1)  # [B, N, L]
            probs = head_sum if probs is None else probs.add_(head_sum)
    return torch.cat(outs, dim=1), probs.div_(heads)


class Attention(nn.Module):
    """diffusers `Attention` (to_q, to_k, to_v without bias; to_out.0 with bias), one module per layer."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        # A list so the key is `to_out.0` as in the checkpoints (diffusers keeps a Dropout at index 1).
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])
        self.capture: Callable[[torch.Tensor, tuple[int, int] | None], None] | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        """x [B, N, C]; context [B, L, C_ctx] or None (self-attention); size = (h, w) of the N queries."""
        context = x if context is None else context
        b, n, _ = x.shape
        q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, H, N, d]
        k = self.to_k(context).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, H, L, d]
        v = self.to_v(context).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, H, L, d]
        if self.capture is not None:
            out, probs = attention_with_probs(q, k, v, self.scale)
            self.capture(probs, size)
        elif self.upcast and q.dtype != torch.float32:
            with torch.autocast(q.device.type, enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, -1))  # [B, N, C]
