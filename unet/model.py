"""UNet2DConditionModel: the Stable Diffusion v1 denoiser eps_theta(z_t, t, c), and the stages it is built from.

Latent diffusion (Rombach et al. 2022, eq. 2) trains a UNet to predict the noise added to a VAE latent
z_t [B, 4, h, w] at step t, given context tokens c [B, L, 768]: here the DINO global tokens c_GLB
(L = 1..5) instead of CLIP text. Data flow (SD v1.5 widths, 64x64 latent):

    t -> sinusoids [B, 320] -> MLP -> temb [B, 1280]        (added inside every ResnetBlock2D)
    conv_in                      [B, 320, 64, 64]
    down_blocks 0..3             320@64 -> 640@32 -> 1280@16 -> 1280@8, pushing 12 skips
    mid_block                    1280@8 (resnet, transformer, resnet)
    up_blocks 0..3               1280@8 -> 1280@16 -> 640@32 -> 320@64, popping the skips
    GroupNorm, SiLU, conv_out    [B, 4, 64, 64]

Down block i (resolution / 2^i): `layers_per_block` x [ResnetBlock2D (+ Transformer2DModel)], each output
saved as a skip, then Downsample2D (all but the last block), whose output is also a skip. Up block i:
`layers_per_block + 1` x [concat(x, skip) -> ResnetBlock2D (+ Transformer2DModel)], consuming the skips in
reverse order, then Upsample2D (all but the last block). The blocks with transformers are diffusers'
`CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`, those without `DownBlock2D` / `UpBlock2D` (one class each
here). For SD v1.5 the self-attention layers are at 64 (2 down + 3 up), 32 (2 + 3), 16 (2 + 3) and 8 (mid).

Module names mirror diffusers' `unet/diffusion_pytorch_model.safetensors` exactly, so diffusers weights
load strictly with no renaming; CompVis single files are renamed by `unet.convert`; the layers are in
`unet/layers.py`. `capture_self_attention()` switches the 16 self-attention (`attn1`) layers to the explicit
attention path and collects their head-averaged probability maps for DiffSeg.

Gradient checkpointing (`enable_gradient_checkpointing`) recomputes each resnet and each transformer in the
backward pass instead of storing its activations (torch.utils.checkpoint, use_reentrant=False, which works
under autocast and torch.compile).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import hub
from unet.config import UNetConfig
from unet.convert import to_diffusers
from unet.layers import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    timestep_embedding,
)

TIME_EMBED_MULT = 4  # temb width = 4 * block_out_channels[0] (LDM openaimodel: time_embed_dim)


class Stage(nn.Module):
    """Base of the down, mid and up blocks: `run(layer, ...)` calls a resnet/transformer, checkpointed when
    `gradient_checkpointing` is on (set by the UNet)."""

    gradient_checkpointing = False

    def run(self, layer: nn.Module, *args) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def resnet_transformer(self, i: int, x, temb, context):
        """Layer i of the block: its resnet, then its transformer if the block has them."""
        x = self.run(self.resnets[i], x, temb)
        return x if self.attentions is None else self.run(self.attentions[i], x, context)


def transformers(n: int, channels: int, attention: dict | None) -> nn.ModuleList | None:
    """n Transformer2DModels (the `attentions` of a CrossAttn block), or None when `attention` is None."""
    return None if attention is None else nn.ModuleList(Transformer2DModel(channels, **attention) for _ in range(n))


class DownBlock2D(Stage):
    def __init__(self, in_channels, out_channels, temb_channels, num_layers, add_downsample, norm, attention):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, **norm)
            for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None
        self.attentions = transformers(num_layers, out_channels, attention)

    def forward(self, x, temb, context):
        """x [B, C_in, h, w] -> (x [B, C_out, h', w'], skips: the output of every layer and downsampler)."""
        skips = []
        for i in range(len(self.resnets)):
            x = self.resnet_transformer(i, x, temb, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # [B, C_out, h/2, w/2]
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(Stage):
    def __init__(self, channels, temb_channels, norm, attention):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, temb_channels, **norm) for _ in range(2))
        self.attentions = transformers(1, channels, attention)

    def forward(self, x, temb, context):
        x = self.resnet_transformer(0, x, temb, context)
        return self.run(self.resnets[1], x, temb)


class UpBlock2D(Stage):
    """Resnets on [x, skip] concatenations. in_channels: width of the down block one level up (its skips feed
    the last resnet here); prev_channels: width of x entering the block; out_channels: width of this level."""

    def __init__(self, in_channels, prev_channels, out_channels, temb_channels, num_layers, add_upsample, norm,
                 attention):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            skip = in_channels if i == num_layers - 1 else out_channels
            x_in = prev_channels if i == 0 else out_channels
            resnets.append(ResnetBlock2D(x_in + skip, out_channels, temb_channels, **norm))
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None
        self.attentions = transformers(num_layers, out_channels, attention)

    def forward(self, x, temb, skips, context, size=None):
        """skips: list of skip tensors, consumed from the end; size: output size of the upsampler."""
        for i in range(len(self.resnets)):
            x = torch.cat([x, skips.pop()], dim=1)  # [B, C_x + C_skip, h, w]
            x = self.resnet_transformer(i, x, temb, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class AttentionMap(NamedTuple):
    name: str  # e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    resolution: tuple[int, int]  # (h, w) of the layer's query (and key) grid
    probs: torch.Tensor  # float32 [B, h*w, h*w], rows sum to 1, averaged over heads


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = c = config or UNetConfig()
        ch, heads, n = c.block_out_channels, c.heads(), len(c.block_out_channels)
        temb = TIME_EMBED_MULT * ch[0]
        norm = dict(groups=c.norm_num_groups, eps=c.norm_eps)

        def attention(h: int, kind: str = "CrossAttn") -> dict | None:
            """Transformer2DModel arguments for a CrossAttn* block; None for a block without transformers."""
            if not kind.startswith("CrossAttn"):
                return None
            return dict(heads=h, context_dim=c.cross_attention_dim, groups=c.norm_num_groups,
                        linear_projection=c.use_linear_projection, upcast=c.upcast_attention)

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.down_blocks = nn.ModuleList(
            DownBlock2D(ch[max(i - 1, 0)], ch[i], temb, c.layers_per_block, i < n - 1, norm,
                        attention(heads[i], kind))
            for i, kind in enumerate(c.down_block_types)
        )
        self.mid_block = UNetMidBlock2DCrossAttn(ch[-1], temb, norm, attention(heads[-1]))
        rch, rheads = ch[::-1], heads[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock2D(rch[min(i + 1, n - 1)], rch[max(i - 1, 0)], rch[i], temb, c.layers_per_block + 1, i < n - 1,
                      norm, attention(rheads[i], kind))
            for i, kind in enumerate(c.up_block_types)
        )
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    # ------------------------------------------------------------------------------------------ forward

    def _checked_timesteps(self, sample: torch.Tensor, timestep, context: torch.Tensor) -> torch.Tensor:
        """The timesteps as a [B] tensor; ValueError naming the shape of any input that does not fit."""
        c, b = self.config, sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        if sample.ndim != 4 or sample.shape[1] != c.in_channels:
            expected, got = f"sample must be [B, in_channels={c.in_channels}, h, w]", sample
        elif context.ndim != 3 or context.shape[0] != b or context.shape[2] != c.cross_attention_dim:
            expected = f"encoder_hidden_states must be [B={b}, L, cross_attention_dim={c.cross_attention_dim}]"
            got = context
        elif t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, b)):
            expected, got = f"timestep must be a scalar or [B={b}]", t
        else:
            return t.reshape(-1).expand(b)
        raise ValueError(f"UNet2DConditionModel: {expected}, got shape {tuple(got.shape)}")

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """sample [B, 4, h, w]; timestep int/float, 0-d or [B] tensor; encoder_hidden_states [B, L, 768]
        -> predicted noise (or v) [B, 4, h, w]."""
        context = encoder_hidden_states
        t = self._checked_timesteps(sample, timestep, context)  # [B]
        c = self.config
        temb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        temb = self.time_embedding(temb.to(sample.dtype))  # [B, 4 * C0]

        x = self.conv_in(sample)  # [B, C0, h, w]
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            # Upsample to the size of the next skip (equal to 2x unless a side was odd on the way down).
            size = tuple(skips[-n - 1].shape[-2:]) if block.upsamplers is not None else None
            x = block(x, temb, skips, context, size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # [B, out_channels, h, w]

    # ------------------------------------------------------------------------------------------ DiffSeg

    @contextlib.contextmanager
    def capture_self_attention(self, callback: Callable[[AttentionMap], None] | None = None):
        """Collect every self-attention map of the forward passes run inside the block.

        Yields a list that fills with one `AttentionMap` per attn1 layer and forward call, in execution
        order. With `callback`, each map is passed to it as soon as it is computed and not stored (the
        list stays empty), so a consumer can reduce maps on the fly. Gradient checkpointing is paused
        inside the block (recomputation would report maps twice).
        """
        maps: list[AttentionMap] = []
        sink = maps.append if callback is None else callback
        layers = [(name, m) for name, m in self.named_modules() if name.endswith(".attn1")]
        checkpointing = self.is_gradient_checkpointing
        self._set_gradient_checkpointing(False)
        for name, m in layers:
            m.capture = lambda probs, size, name=name: sink(AttentionMap(name, tuple(size), probs.detach()))
        try:
            yield maps
        finally:
            for _, m in layers:
                m.capture = None
            self._set_gradient_checkpointing(checkpointing)

    # ------------------------------------------------------------------------------------------ training

    def _set_gradient_checkpointing(self, on: bool):
        for m in self.modules():
            if isinstance(m, Stage):
                m.gradient_checkpointing = on

    def enable_gradient_checkpointing(self):
        """Recompute resnet/transformer activations in backward (less memory, ~30% more compute)."""
        self._set_gradient_checkpointing(True)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(m.gradient_checkpointing for m in self.modules() if isinstance(m, Stage))

    # ------------------------------------------------------------------------------------------ hub

    @classmethod
    def from_pretrained(cls, name_or_path, subfolder=None, revision=None, cache_dir=None, dtype=None,
                        device=None, config: UNetConfig | None = None) -> UNet2DConditionModel:
        """A Hub repo id, a diffusers folder or a single weights file (`hub.load_diffusers`), with diffusers or
        CompVis keys (`model.diffusion_model.*`, as in a whole SD file; `unet/convert.py`)."""
        return hub.load_diffusers(cls, UNetConfig.from_dict, to_diffusers, name_or_path, config=config, dtype=dtype,
                                  device=device, subfolder=subfolder, revision=revision, cache_dir=cache_dir)

    def save_pretrained(self, folder):
        """Write config.json + diffusion_pytorch_model.safetensors (diffusers layout, atomic)."""
        hub.save_pretrained(self, folder)
