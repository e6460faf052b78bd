"""The UNet's stages: down blocks, the middle block and up blocks with skip connections.

Down block i (resolution / 2^i): `layers_per_block` x [ResnetBlock2D (+ Transformer2DModel)], each output
saved as a skip, then Downsample2D (all but the last block), whose output is also a skip.
Middle block: ResnetBlock2D, Transformer2DModel, ResnetBlock2D at the lowest resolution.
Up block i: `layers_per_block + 1` x [concat(x, skip) -> ResnetBlock2D (+ Transformer2DModel)], consuming
the skips in reverse order, then Upsample2D (all but the last block).

For SD v1.5 (64x64 latent): skips 320@64 x3, 640@32 x3, 1280@16 x3, 1280@8 x3; the self-attention layers
are at 64 (2 down + 3 up), 32 (2 + 3), 16 (2 + 3) and 8 (mid): 16 in all.

Gradient checkpointing (`gradient_checkpointing = True`, set by the UNet) recomputes each resnet and each
transformer in the backward pass instead of storing its activations (torch.utils.checkpoint,
use_reentrant=False, which works under autocast and torch.compile).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from unet.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from unet.transformer import Transformer2DModel


class Block(nn.Module):
    """Base of every stage: `run(layer, ...)` calls a resnet/transformer, checkpointed when enabled."""

    gradient_checkpointing = False

    def run(self, layer: nn.Module, *args) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)


class DownBlock2D(Block):
    """Resnets only (the lowest-resolution down block of SD)."""

    def __init__(self, in_channels, out_channels, temb_channels, num_layers, add_downsample, groups, eps):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps)
             for i in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def layers(self):
        return [(resnet, None) for resnet in self.resnets]

    def forward(self, x, temb, context=None):
        """x [B, C_in, h, w] -> (x [B, C_out, h', w'], skips: the output of every layer and downsampler)."""
        skips = []
        for resnet, attn in self.layers():
            x = self.run(resnet, x, temb)
            if attn is not None:
                x = self.run(attn, x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # [B, C_out, h/2, w/2]
            skips.append(x)
        return x, skips


class CrossAttnDownBlock2D(DownBlock2D):
    def __init__(self, in_channels, out_channels, temb_channels, num_layers, add_downsample, groups, eps,
                 heads, context_dim, linear_projection, upcast):
        super().__init__(in_channels, out_channels, temb_channels, num_layers, add_downsample, groups, eps)
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out_channels, heads, context_dim, groups, linear_projection, upcast)
             for _ in range(num_layers)]
        )

    def layers(self):
        return list(zip(self.resnets, self.attentions))


class UNetMidBlock2DCrossAttn(Block):
    def __init__(self, channels, temb_channels, groups, eps, heads, context_dim, linear_projection, upcast):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(channels, channels, temb_channels, groups, eps) for _ in range(2)]
        )
        self.attentions = nn.ModuleList(
            [Transformer2DModel(channels, heads, context_dim, groups, linear_projection, upcast)]
        )

    def forward(self, x, temb, context):
        x = self.run(self.resnets[0], x, temb)
        x = self.run(self.attentions[0], x, context)
        return self.run(self.resnets[1], x, temb)


class UpBlock2D(Block):
    """Resnets on [x, skip] concatenations (the lowest-resolution up block of SD).

    in_channels: width of the down block one level up (its skips feed the last resnet here);
    prev_channels: width of x entering the block; out_channels: width of this level.
    """

    def __init__(self, in_channels, prev_channels, out_channels, temb_channels, num_layers, add_upsample,
                 groups, eps):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            skip = in_channels if i == num_layers - 1 else out_channels
            x_in = prev_channels if i == 0 else out_channels
            resnets.append(ResnetBlock2D(x_in + skip, out_channels, temb_channels, groups, eps))
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def layers(self):
        return [(resnet, None) for resnet in self.resnets]

    def forward(self, x, temb, skips, context=None, size=None):
        """skips: list of skip tensors, consumed from the end; size: output size of the upsampler."""
        for resnet, attn in self.layers():
            x = torch.cat([x, skips.pop()], dim=1)  # [B, C_x + C_skip, h, w]
            x = self.run(resnet, x, temb)
            if attn is not None:
                x = self.run(attn, x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class CrossAttnUpBlock2D(UpBlock2D):
    def __init__(self, in_channels, prev_channels, out_channels, temb_channels, num_layers, add_upsample,
                 groups, eps, heads, context_dim, linear_projection, upcast):
        super().__init__(in_channels, prev_channels, out_channels, temb_channels, num_layers, add_upsample,
                         groups, eps)
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out_channels, heads, context_dim, groups, linear_projection, upcast)
             for _ in range(num_layers)]
        )

    def layers(self):
        return list(zip(self.resnets, self.attentions))
