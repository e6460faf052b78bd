"""VAEConfig: the hyper-parameters of the Stable Diffusion v1 KL autoencoder.

Field names are those of diffusers' `AutoencoderKL` `config.json`, so a Hub config maps onto this dataclass
directly (`hub.config_from_dict`). Defaults are the SD v1 VAE (`stable-diffusion-v1-5/.../vae/config.json`,
83.65M parameters): a 4-level encoder/decoder with 128-256-512-512 channels and a 4-channel latent at 1/8 of
the image resolution.
"""

from __future__ import annotations

import dataclasses

# eps of every GroupNorm in the VAE: hard-coded in diffusers' Encoder/Decoder and in CompVis `Normalize`.
NORM_EPS = 1e-6
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"


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
    use_quant_conv: bool = True  # 1x1 conv on the 2*latent_channels moments after the encoder
    use_post_quant_conv: bool = True  # 1x1 conv on the latent before the decoder
    mid_block_add_attention: bool = True  # single-head self-attention between the two mid-block resnets
    # Pipeline metadata kept so Hub configs round-trip; the model never reads them.
    sample_size: int | tuple[int, ...] = 512  # nominal training resolution (diffusers uses it for tiling)
    shift_factor: float | None = None  # SD3/Flux latent shift; None for SD v1
    latents_mean: tuple[float, ...] | None = None  # SDXL-style per-channel latent statistics; None for SD v1
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # diffusers pipelines run this VAE in fp32 even in fp16 pipelines

    def __post_init__(self):
        n = len(self.block_out_channels)
        if self.down_block_types is None:
            object.__setattr__(self, "down_block_types", (DOWN_BLOCK,) * n)
        if self.up_block_types is None:
            object.__setattr__(self, "up_block_types", (UP_BLOCK,) * n)
        if self.act_fn != "silu":
            raise ValueError(f"VAEConfig.act_fn={self.act_fn!r}: only 'silu' (the SD VAE's) is supported")
        if tuple(self.down_block_types) != (DOWN_BLOCK,) * n or tuple(self.up_block_types) != (UP_BLOCK,) * n:
            raise ValueError(
                f"VAEConfig supports {n} x {DOWN_BLOCK!r} / {UP_BLOCK!r} (one per block_out_channels entry), "
                f"got down_block_types={self.down_block_types}, up_block_types={self.up_block_types}"
            )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"VAEConfig: block_out_channels {bad} not divisible by norm_num_groups={self.norm_num_groups}"
            )

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each axis (SD v1: 8, a stride-2 conv at all levels but one)."""
        return 2 ** (len(self.block_out_channels) - 1)
