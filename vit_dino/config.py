"""DinoConfig: one frozen dataclass describing DINO v1 and DINOv2(+registers) Vision Transformers.

The two families share the architecture (pre-norm ViT: patch conv -> [CLS, registers, patches] + position
embeddings -> N x (attention, MLP) -> LayerNorm) and differ only in a handful of switches:

| field               | DINO v1 (transformers ViT) | DINOv2-reg4 (timm)   | Dinov2[WithRegisters]Model (transformers) |
|---------------------|----------------------------|----------------------|-------------------------------------------|
| image_size, patch   | 224, 16                    | 518, 14              | config.json (518, 14 for the -base repos)  |
| layer_norm_eps      | 1e-12 (ViTConfig default)  | 1e-6                 | 1e-6                                      |
| num_register_tokens | 0                          | 4                    | 0 / 4                                     |
| layerscale_init     | None (no LayerScale)       | 1e-5                 | layerscale_value (always present)         |
| pos_embed_has_class | True: [1, 1+L, D]          | False: [1, L, D]     | True: [1, 1+L, D] (CLS + patches)          |
| register_pos_embed  | (no registers)             | (no class entry)     | False: registers inserted after pos_embed |
| pos_embed_antialias | False                      | True                 | False / True (WithRegisters)              |

The checkpoints we document: DINO v1 ViT-S/16 and ViT-B/16 (`facebook/dino-vit{s,b}16`, whose transformers
config.json holds every field), DINOv2 with 4 registers ViT-S/B/L/g (`timm/vit_{small,base,large,giant}_
patch14_reg4_dinov2.lvd142m`, whose timm config.json names its `architecture`: `TIMM_ARCHITECTURES`), and the
transformers Dinov2Model / Dinov2WithRegistersModel layouts (`facebook/dinov2-base`, the chest-X-ray
`microsoft/rad-dino`, `facebook/dinov2-with-registers-base`). ViT-g replaces the GELU MLP by a SwiGLU one
(`use_swiglu_ffn`; timm SwiGLUPacked, transformers Dinov2SwiGLUFFN).

Preprocessing (`image_mean`/`image_std`, crop `input_size`, `crop_pct` = crop / resized shorter side) comes from
the checkpoint's `preprocessor_config.json` when it ships one (rad-dino: its own CXR mean/std, 518 px), else
from timm's pretrained cfg, else ImageNet at image_size.

Sources: transformers `ViTConfig` defaults and `ViTEmbeddings.interpolate_pos_encoding`; timm
`vit_*_patch14_reg4_dinov2` model args (`init_values=1e-5, reg_tokens=4, no_embed_class=True`; ViT-g: embed_dim
1536, depth 40, 24 heads, mlp_ratio 2.66667 * 2, SwiGLUPacked), `resample_abs_pos_embed` (antialias=True) and
the `.lvd142m` pretrained cfg (518 px, ImageNet mean/std); transformers `Dinov2[WithRegisters]Embeddings.
interpolate_pos_encoding` (bicubic to an explicit size, float32; antialias only with registers).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# ImageNet statistics (timm IMAGENET_DEFAULT_MEAN/STD); both DINO families were trained with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DinoConfig:
    """Defaults = DINO v1 ViT-B/16 (`facebook/dino-vitb16`, config.json of the Hub repo)."""

    image_size: int = 224  # native (training) size: the position-embedding grid is image_size // patch_size
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072  # MLP hidden width (4 x hidden_size), GELU (exact, erf) in between
    use_swiglu_ffn: bool = False  # SwiGLU MLP (DINOv2 ViT-g): fc1 -> silu(1st half) * 2nd half -> fc2
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    num_register_tokens: int = 0
    layerscale_init: float | None = None  # None: no LayerScale; else gamma init (1e-5 in DINOv2)
    pos_embed_has_class: bool = True  # timm `no_embed_class` is the negation
    pos_embed_antialias: bool = False  # position-embedding resampling: transformers False, timm True
    register_pos_embed: bool = True  # with pos_embed_has_class: registers have entries too (False: Dinov2WithRegisters)
    has_pooler: bool = False  # pooler.dense + tanh on CLS; only when the checkpoint ships one
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    input_size: int | None = None  # preprocess crop size S (preprocessor_config.json crop_size); None: image_size
    crop_pct: float = 1.0  # S / shorter side after resize (timm crop_pct; 224/256 for facebook/dinov2-base)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads or self.image_size % self.patch_size:
            raise ValueError(f"DinoConfig: hidden_size {self.hidden_size} must be divisible by num_attention_heads "
                             f"{self.num_attention_heads}, image_size {self.image_size} by patch {self.patch_size}")

    @property
    def grid_size(self) -> int:
        """Side of the native (square) patch grid the position embeddings were trained on."""
        return self.image_size // self.patch_size

    @property
    def num_pos_prefix(self) -> int:
        """Entries of pos_embed before the patch grid: 0 (timm no_embed_class), 1 (CLS) or 1+R."""
        if not self.pos_embed_has_class:
            return 0
        return 1 + (self.num_register_tokens if self.register_pos_embed else 0)

    @property
    def num_global_tokens(self) -> int:
        """G in c_GLB = [CLS, pooler if present, registers]."""
        return 1 + int(self.has_pooler) + self.num_register_tokens

    @classmethod
    def dino_vitb16(cls) -> DinoConfig:
        """`facebook/dino-vitb16` (the defaults)."""
        return cls()

    @classmethod
    def dinov2_vitb14_reg4(cls) -> DinoConfig:
        """`timm/vit_base_patch14_reg4_dinov2.lvd142m`."""
        return TIMM_ARCHITECTURES["vit_base_patch14_reg4_dinov2"]

    @classmethod
    def tiny(cls) -> DinoConfig:
        """A DINOv2-style ViT small enough for CPU tests and the tiny training preset (c_GLB [B, 5, 64])."""
        return dataclasses.replace(cls.dinov2_vitb14_reg4(), image_size=56, hidden_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)


# The documented DINOv2 checkpoints, by the `architecture` of their timm config.json (timm's model functions
# `vit_{small,base,large,giant}_patch14_reg4_dinov2`: init_values=1e-5, reg_tokens=4, no_embed_class=True).
_V2 = dict(image_size=518, patch_size=14, layer_norm_eps=1e-6, num_register_tokens=4, layerscale_init=1e-5,
           pos_embed_has_class=False, pos_embed_antialias=True)
TIMM_ARCHITECTURES = {
    "vit_small_patch14_reg4_dinov2": DinoConfig(**_V2, hidden_size=384, num_attention_heads=6, intermediate_size=1536),
    "vit_base_patch14_reg4_dinov2": DinoConfig(**_V2),
    "vit_large_patch14_reg4_dinov2": DinoConfig(**_V2, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                                intermediate_size=4096),
    "vit_giant_patch14_reg4_dinov2": DinoConfig(**_V2, hidden_size=1536, num_hidden_layers=40, num_attention_heads=24,
                                                intermediate_size=8192, use_swiglu_ffn=True),
}
