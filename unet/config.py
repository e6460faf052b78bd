"""UNetConfig: the hyper-parameters of the Stable Diffusion cross-attention UNet.

Field names are exactly those of a diffusers `unet/config.json`, so `UNetConfig.from_dict(json)` reads the
Hub file directly; defaults are SD v1.5 (`stable-diffusion-v1-5/stable-diffusion-v1-5`, unet/config.json).
SD 2.x differs only in fields declared here: `attention_head_dim` per block (5, 10, 20, 20),
`use_linear_projection` True, `upcast_attention` True and `cross_attention_dim` 1024.

A naming quirk inherited from diffusers (huggingface/diffusers#2011): `attention_head_dim` is the NUMBER OF
HEADS of each block's attention, not the size of a head. SD v1 has 8 heads of 40/80/160 channels; SD 2.x
has heads of 64 channels (320/5, 640/10, 1280/20).

diffusers configs also carry many switches for other architectures (class embeddings, SDXL's additional
embeddings, ...). `from_dict` accepts them only at the value that means "off" (None, False, 0 or the NEUTRAL
value) and rejects anything else (`hub.config_from_dict`).
"""

from __future__ import annotations

import dataclasses

import hub

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers UNet2DConditionModel.__init__ arguments this implementation does not have are accepted only at the
# value at which they change nothing. For most that is None, False or 0; these are the others (diffusers 0.42
# defaults, all written by its save_pretrained).
NEUTRAL = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "act_fn": "silu",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1.0,
    "transformer_layers_per_block": 1,
    "resnet_time_scale_shift": "default",
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "addition_embed_type_num_heads": 64,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    sample_size: int = 64  # latent side the model was trained at (512 px / 8); informative only
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True  # timestep embedding order [cos, sin] (True) or [sin, cos]
    freq_shift: int = 0  # frequencies exp(-ln(10000) * i / (half - freq_shift))
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768  # width of the context tokens (CLIP ViT-L/14 text, DINO ViT-B: 768)
    attention_head_dim: int | tuple[int, ...] = 8  # NUMBER of heads, per block or for all (see above)
    use_linear_projection: bool = False  # Transformer2DModel proj_in/out: 1x1 conv (SD v1) or Linear (SD 2)
    upcast_attention: bool = False  # run attention in float32 even under fp16/bf16 (SD 2.1)

    def __post_init__(self):
        n, heads = len(self.block_out_channels), self.heads()
        lengths = (len(self.down_block_types), len(self.up_block_types), len(heads))
        if lengths != (n, n, n):
            raise ValueError(f"UNetConfig: down_block_types, up_block_types and attention_head_dim have {lengths} "
                             f"entries, block_out_channels {n}: they must have the same length")
        for name, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            bad = [t for t in getattr(self, name) if t not in allowed]
            if bad:
                raise ValueError(f"UNetConfig.{name}: unsupported {bad}; expected {allowed}")
        bad = [(c, h) for c, h in zip(self.block_out_channels, heads) if c % self.norm_num_groups or c % h]
        if bad:
            raise ValueError(f"UNetConfig: each block width must be divisible by norm_num_groups="
                             f"{self.norm_num_groups} and by its number of heads; got (width, heads) {bad}")

    def heads(self) -> tuple[int, ...]:
        """Number of attention heads of each down block (up blocks use them reversed, mid the last)."""
        h = self.attention_head_dim
        return (h,) * len(self.block_out_channels) if isinstance(h, int) else tuple(h)

    @classmethod
    def from_dict(cls, d: dict, *, source="config") -> UNetConfig:
        """A diffusers unet config.json as a UNetConfig; architecture switches we lack must be off."""
        return hub.config_from_dict(cls, d, source=source, neutral=NEUTRAL, strict=True)
