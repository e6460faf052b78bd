"""AutoencoderKL: the Stable Diffusion v1 VAE (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", Sec. 3.1: the KL-regularised autoencoder with downsampling factor f = 8).

Latent diffusion runs the expensive diffusion model on a small latent instead of pixels. The encoder maps an
image x in [-1, 1] of shape [B, 3, H, W] to a diagonal Gaussian over latents z of shape [B, 4, H/8, W/8];
the decoder maps z back to pixels. DiNO-Diffusion keeps this VAE frozen and trains the UNet on
z * scaling_factor.

    Encoder: conv_in -> DownEncoderBlock2D x 4 (x1/2 at the first three) -> mid-block -> norm/SiLU/conv_out
             -> [B, 8, H/8, W/8] -> quant_conv (1x1) -> DiagonalGaussian(mean, logvar)
    Decoder: z -> post_quant_conv (1x1) -> conv_in -> mid-block -> UpDecoderBlock2D x 4 (x2 at the first
             three, channels reversed) -> norm/SiLU/conv_out -> [B, 3, H, W]

Module attribute names are diffusers' checkpoint keys, so a diffusers `vae/` state dict loads strictly;
legacy and CompVis layouts are renamed by `vae/convert.py`; the layers are in `vae/layers.py`. The VAE runs
in the dtype of its weights with autocast disabled (DEVELOPERS.md: VAE decode stays in fp32 under a bf16/fp16
training loop).

VAEConfig: field names are those of diffusers' `AutoencoderKL` `config.json`, so a Hub config maps onto it
directly (`VAEConfig.from_dict`). Defaults are the SD v1 VAE (`stable-diffusion-v1-5/.../vae/config.json`,
83.65M parameters): a 4-level encoder/decoder with 128-256-512-512 channels and a 4-channel latent at 1/8 of
the image resolution.

DiagonalGaussian is the posterior q(z | x) = N(mean, diag(exp(logvar))) that the encoder outputs.
The encoder predicts 2 * latent_channels maps ("moments", double_z); the first half is the mean, the second
the log-variance, clamped to [-30, 20] as in CompVis `DiagonalGaussianDistribution` (exp(20/2) ~ 2e4 bounds
the std; exp(-30/2) ~ 3e-7 keeps it positive). Sampling is the reparameterisation z = mean + std * eps
(Kingma & Welling 2014, Eq. 10 / Sec. 2.4), so gradients flow to mean and logvar.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import hub
from vae import convert
from vae.layers import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D, norm_silu

# eps of every GroupNorm in the VAE: hard-coded in diffusers' Encoder/Decoder and in CompVis `Normalize`.
NORM_EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # CompVis DiagonalGaussianDistribution's clamp
# diffusers AutoencoderKL options for other VAEs (SD3/Flux, SDXL statistics, ...), accepted at SD v1's value only.
NEUTRAL = {"use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
           "shift_factor": None, "latents_mean": None, "latents_std": None}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] | None = None  # None: one DownEncoderBlock2D per level
    up_block_types: tuple[str, ...] | None = None  # None: one UpDecoderBlock2D per level
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # resnets per encoder level; decoder levels have layers_per_block + 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    # Latent scale chosen so SD v1 latents have ~unit variance (Rombach et al. 2022, Sec. 4.3.2 / App. G);
    # the UNet sees z * scaling_factor. Read by the pipeline, not by the VAE itself.
    scaling_factor: float = 0.18215
    # Pipeline metadata kept so Hub configs round-trip; the model never reads them.
    sample_size: int | tuple[int, ...] = 512  # nominal training resolution (diffusers uses it for tiling)
    force_upcast: bool = True  # diffusers pipelines run this VAE in fp32 even in fp16 pipelines

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            value = tuple(getattr(self, name) or (kind,) * n)
            if value != (kind,) * n:
                raise ValueError(f"VAEConfig.{name}={value}: only {kind!r} at each of the {n} levels is supported")
            object.__setattr__(self, name, value)
        if self.act_fn != "silu":
            raise ValueError(f"VAEConfig.act_fn={self.act_fn!r}: only 'silu' (the SD VAE's) is supported")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"VAEConfig: block_out_channels {self.block_out_channels} must be divisible by "
                             f"norm_num_groups={self.norm_num_groups}")

    @classmethod
    def from_dict(cls, d: dict, *, source="config") -> VAEConfig:
        """A diffusers vae config.json as a VAEConfig; the NEUTRAL options must be at SD v1's values."""
        return hub.config_from_dict(cls, d, source=source, neutral=NEUTRAL)

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each axis (SD v1: 8, a stride-2 conv at all levels but one)."""
        return 2 ** (len(self.block_out_channels) - 1)


class DiagonalGaussian:
    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # [B, 2C, h, w] -> 2 x [B, C, h, w]
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) drawn from `generator` (on the generator's device)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over C, h, w: [B] (Kingma & Welling 2014, App. B)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups, eps = config.block_out_channels, config.norm_num_groups, NORM_EPS
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        last = len(ch) - 1
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], config.layers_per_block, i < last, groups, eps)
            for i in range(len(ch))
        )
        self.mid_block = UNetMidBlock2D(ch[-1], groups, eps)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=eps)
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # [B, 3, H, W] -> [B, 128, H, W]
        for block in self.down_blocks:
            x = block(x)  # -> [B, 512, H/8, W/8] after the last
        x = self.mid_block(x)
        return self.conv_out(norm_silu(self.conv_norm_out, x))  # [B, 2 * latent_channels, H/8, W/8]


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups, eps = tuple(reversed(config.block_out_channels)), config.norm_num_groups, NORM_EPS
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(ch[0], groups, eps)
        last = len(ch) - 1
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, i < last, groups, eps)
            for i in range(len(ch))
        )
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=eps)
        self.conv_out = nn.Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))  # [B, 4, h, w] -> [B, 512, h, w]
        for block in self.up_blocks:
            x = block(x)  # -> [B, 128, 8h, 8w] after the last
        return self.conv_out(norm_silu(self.conv_norm_out, x))  # [B, 3, 8h, 8w]


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1)  # on the moments (mean and logvar) after the encoder
        self.post_quant_conv = nn.Conv2d(c, c, 1)  # on the latent before the decoder

    def _prepare(self, t: torch.Tensor, channels: int, factor: int, what: str) -> torch.Tensor:
        """Check the shape, move to the weights' device and dtype. On CPU, switch to channels_last: oneDNN
        then runs NHWC convolutions without reordering each activation to its blocked layout and back (bench
        rows `vae encode/decode (128px)`: NCHW measured 15-35% slower with up to 35% more peak memory in an
        in-process A/B). Outputs come back NCHW."""
        if t.ndim != 4 or t.shape[1] != channels or t.shape[2] % factor or t.shape[3] % factor:
            sizes = f" with H and W multiples of {factor}" if factor > 1 else ""
            raise ValueError(f"AutoencoderKL.{what}: expected a [B, {channels}, H, W] tensor{sizes}, got shape "
                             f"{tuple(t.shape)}")
        p = self.encoder.conv_in.weight
        t = t.to(device=p.device, dtype=p.dtype)
        return t.contiguous(memory_format=torch.channels_last) if t.device.type == "cpu" else t

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images [B, in_channels, H, W] in [-1, 1] -> posterior over latents [B, latent_ch, H/8, W/8]."""
        x = self._prepare(x, self.config.in_channels, self.config.downsample_factor, "encode(x)")
        with torch.autocast(x.device.type, enabled=False):
            moments = self.quant_conv(self.encoder(x))
        return DiagonalGaussian(moments.contiguous())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [B, latent_channels, h, w] -> images [B, out_channels, 8h, 8w], about [-1, 1]"""
        z = self._prepare(z, self.config.latent_channels, 1, "decode(z)")
        with torch.autocast(z.device.type, enabled=False):
            return self.decoder(self.post_quant_conv(z)).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction decode(z) with z the posterior mode."""
        return self.decode(self.encode(x).mode())

    # ------------------------------------------------------------------------------------------ checkpoints

    @classmethod
    def from_pretrained(cls, name_or_path, subfolder=None, revision=None, cache_dir=None, dtype=None,
                        device=None, *, config: VAEConfig | None = None) -> AutoencoderKL:
        """A Hub repo id, a diffusers folder or a single weights file (`hub.load_diffusers`), in any of the layouts
        of `vae/convert.py`; e.g. SD's `v1-5-pruned-emaonly.safetensors` with its `first_stage_model.` keys."""
        return hub.load_diffusers(cls, VAEConfig.from_dict, convert.to_diffusers, name_or_path, config=config,
                                  dtype=dtype, device=device, subfolder=subfolder, revision=revision,
                                  cache_dir=cache_dir)

    def save_pretrained(self, folder) -> None:
        """Write config.json + diffusion_pytorch_model.safetensors (diffusers layout; diffusers reads it)."""
        hub.save_pretrained(self, folder)
