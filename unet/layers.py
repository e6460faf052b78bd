"""The UNet's layers: timestep embedding, resnet, resampling, attention (with probability capture), transformer.

Timestep embedding: the diffusion step t (an integer in [0, 1000) for SD, or a float) becomes sinusoids at
geometrically spaced frequencies, like the position encoding of Vaswani et al. 2017 (sec. 3.5) as used by DDPM
(Ho et al. 2020, appendix B), then an MLP (`TimestepEmbedding`, 320 -> 1280 -> 1280 in SD):

    freq_i = exp(-ln(10000) * i / (half - freq_shift)),   i = 0 .. half-1,   half = dim / 2
    emb(t) = [cos(t * freq), sin(t * freq)]     (flip_sin_to_cos=True, SD; otherwise [sin, cos])

The sinusoids are computed in float32 on every call (no buffer: no non-persistent state).

ResnetBlock2D (DDPM, after Wide-ResNet) adds a projection of the time embedding between its two convolutions:

    h = conv1(silu(norm1(x)))                      [B, C_out, H, W]
    h = h + time_emb_proj(silu(temb))[:, :, None, None]
    h = conv2(silu(norm2(h)))
    out = shortcut(x) + h                          shortcut: 1x1 conv when C_in != C_out

Downsample2D halves the resolution with a 3x3 stride-2 convolution (padding 1, so an odd side n gives
ceil(n / 2)); Upsample2D doubles it by nearest-neighbour repetition followed by a 3x3 convolution, resizing
to the size of the skip it meets, so that odd-sized skip connections still line up.

Transformer2DModel: the feature map [B, C, h, w] is normalised (GroupNorm, eps 1e-6 as in SD), projected (1x1
conv in SD v1, Linear in SD 2.x), flattened to h*w tokens and passed through a BasicTransformerBlock,

    x = x + attn1(norm1(x))               self-attention between pixels    (DiffSeg reads these maps)
    x = x + attn2(norm2(x), context)      cross-attention to the context   (c_GLB, 1-5 DINO tokens)
    x = x + ff(norm3(x))                  GEGLU feed-forward (Shazeer 2020), inner width 4*C

then projected back and added to the input (Rombach et al. 2022, LDM, sec. 3.3 and appendix).

Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, eq. 1), with Q from the image tokens and
K, V from the same tokens (`attn1`) or the context (`attn2`); each head works on d = inner / heads channels.
Fast path: `F.scaled_dot_product_attention` (fused, never materialises the N x N matrix). Explicit path
(DiffSeg, Tian et al. 2024; `attention_with_probs`): P = softmax(Q K^T * d^-0.5) in float32 with autocast
off, then P V; P averaged over heads, a float32 [B, N, N] map, is handed to `self.capture(probs, size)`.
Heads are processed a few at a time (at most PROBS_CHUNK_ELEMENTS scores alive at once), so the per-head
tensor [B, heads, N, N] never exists: at a 64x64 latent, 8 heads would need 512 MB per image, a chunk 128 MB.
`capture` is a plain attribute (None, or a callable set by `UNet2DConditionModel.capture_self_attention`);
when it is None the module is pure SDPA and compiles without graph breaks.

Attribute names mirror the diffusers checkpoint keys (`time_emb_proj`, `to_out.0`, `ff.net.0.proj`, ...).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

MAX_PERIOD = 10000  # Vaswani et al. 2017, sec. 3.5
PROBS_CHUNK_ELEMENTS = 2**25  # 128 MB of float32 scores per chunk of heads
FF_MULT = 4  # feed-forward inner width = 4 * dim (Vaswani et al. 2017; LDM FeedForward mult=4)


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

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, *size], size = (2H, 2W) unless the skip it meets has an odd side."""
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


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


class GEGLU(nn.Module):
    """GEGLU (Shazeer 2020): proj: dim -> 2*inner, split into (a, gate); out = a * gelu(gate) (exact GELU)."""

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
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)  # eps: LDM/diffusers Transformer2DModel
        # The same map either way, stored as a 1x1 conv (SD v1) or a Linear (SD 2.x), as the checkpoints do.
        projection = nn.Linear if linear_projection else functools.partial(nn.Conv2d, kernel_size=1)
        self.proj_in = projection(channels, channels)
        self.proj_out = projection(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, channels // heads, context_dim, upcast)]
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, C, h, w], context [B, L, C_ctx] -> [B, C, h, w]."""
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, h*w, C]
        tokens = channel_linear(self.proj_in, tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, (h, w))
        tokens = channel_linear(self.proj_out, tokens)
        return x + tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)  # [B, C, h, w]


def channel_linear(layer: nn.Conv2d | nn.Linear, tokens: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv or a Linear applied to tokens [B, N, C]: both are W x + b over the channels."""
    return F.linear(tokens, layer.weight.flatten(1), layer.bias)
