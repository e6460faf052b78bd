"""The VAE's levels: encoder down blocks, decoder up blocks, and the mid-block between them.

    DownEncoderBlock2D   layers_per_block resnets, then (all levels but the last) Downsample2D: H -> H/2
    UNetMidBlock2D       resnet -> single-head attention -> resnet, at the lowest resolution
    UpDecoderBlock2D     layers_per_block + 1 resnets, then (all levels but the last) Upsample2D: H -> 2H

Names and key layout follow diffusers (`resnets.{j}`, `attentions.0`, `downsamplers.0.conv`,
`upsamplers.0.conv`), i.e. `diffusers/models/unets/unet_2d_blocks.py` and `resnet.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vae.attention import Attention
from vae.resnet import ResnetBlock2D


class Downsample2D(nn.Module):
    """Pad a zero row/column at the bottom/right, then a 3x3 stride-2 conv, no padding: [H, W] -> [H/2, W/2].

    The asymmetric padding is CompVis' (`Downsample` with `with_conv=True`): output pixel i sees input rows
    2i..2i+2. A symmetric `padding=1` conv (rows 2i-1..2i+1) computes something else with the same weights.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 upsampling, then a 3x3 conv: [H, W] -> [2H, 2W], computed without upsampling.

    Along one axis, output pixel 2i+a of conv3(nearest2(x)) with taps (w0, w1, w2) only reads x[i-1], x[i],
    x[i+1]: phase a=0 is (w0, w1+w2) on (x[i-1], x[i]), phase a=1 is (w0+w1, w2) on (x[i], x[i+1]). So the
    four output phases (a, c) are 2x2 convs of x with summed taps, K_ac = M_a w M_c^T, computed as one conv
    with 4*C outputs on x padded by 1, then interleaved. Same weights and result (up to float rounding) as
    diffusers' interpolate + conv, with 16 instead of 36 multiply-adds per input pixel and channel pair.
    """

    # PHASE_TAPS[a] @ (w0, w1, w2) = phase a's two taps (see above)
    PHASE_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        weight, bias = self.conv.weight, self.conv.bias
        dtype = torch.promote_types(weight.dtype, torch.float32)  # tap sums in fp32 (fp64 stays fp64)
        taps = torch.tensor(self.PHASE_TAPS, dtype=dtype, device=weight.device)  # [2 phases, 2 taps, 3]
        k = torch.einsum("ayh,cxw,oihw->acoiyx", taps, taps, weight.to(dtype))
        k = k.flatten(0, 2).to(weight.dtype)  # [4 * C_out, C_in, 2, 2]
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            k, layout = k.contiguous(memory_format=torch.channels_last), torch.channels_last
        else:
            layout = torch.contiguous_format
        y = F.conv2d(F.pad(x, (1, 1, 1, 1)), k, bias.repeat(4))  # [B, 4 * C_out, H+1, W+1]
        y = y.unflatten(1, (2, 2, -1))  # [B, a, c, C_out, H+1, W+1]
        out = torch.empty((b, y.shape[3], 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=layout)
        phases = out.unflatten(2, (h, 2)).unflatten(4, (w, 2))  # view [B, C_out, H, a, W, c]
        for a in range(2):
            for c in range(2):
                phases[:, :, :, a, :, c] = y[:, a, c, :, a : a + h, c : c + w]
        return out


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, downsample: bool, groups: int,
                 eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, groups, eps)
            for j in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, upsample: bool, groups: int,
                 eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, groups, eps)
            for j in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class UNetMidBlock2D(nn.Module):
    """resnet -> attention -> resnet at constant width (attention optional: `mid_block_add_attention`)."""

    def __init__(self, channels: int, groups: int, eps: float, add_attention: bool = True):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, groups, eps) for _ in range(2))
        self.attentions = nn.ModuleList([Attention(channels, groups, eps)]) if add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)
