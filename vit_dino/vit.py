"""DinoViT: the frozen DINO Vision Transformer that turns an image into the global tokens c_GLB.

A ViT (Dosovitskiy et al. 2021) cuts the image into p x p patches, projects each to a D-dim token (a conv with
kernel = stride = p), prepends a learned CLS token (and, in DINOv2 "with registers" (Darcet et al. 2024), R
learned register tokens), adds learned position embeddings and runs N pre-norm transformer blocks:

    x = x + ls1 * Attn(LN(x))        ls = LayerScale (a learned per-channel gain, DINOv2 only; else 1)
    x = x + ls2 * MLP(LN(x))         MLP = Linear(D, 4D) -> GELU -> Linear(4D, D) (SwiGLU in DINOv2 ViT-g)

followed by a final LayerNorm. Token order is [CLS, reg_1..reg_R, patch_1..patch_L].

DiNO-Diffusion (Jimenez-Perez et al. 2024, Sec. 3) conditions the UNet on the *global* tokens only:
c_GLB = [CLS, pooler (if the checkpoint has one), registers] -> [B, G, D]; patch tokens are excluded.
The pooler of a transformers ViTModel is tanh(dense(CLS)); it exists only if the checkpoint ships
`pooler.dense` (never invented). A transformers Dinov2Model's `pooler_output` is just the normed CLS, so
c_GLB = [CLS, registers] there (no duplicate).

Position embeddings are learned on a square grid (224/16 = 14 for DINO v1, 518/14 = 37 for DINOv2); other
input sizes (any multiple of the patch size, non-square too) resample the grid bicubically, exactly as the
reference does for that family (see `DinoConfig`). Module names follow timm (`blocks.{i}.attn.qkv`, ...);
`convert.py` maps the transformers ViTModel and Dinov2[WithRegisters]Model layouts onto them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import hub

from . import convert
from .config import DinoConfig
from .preprocess import fields_from_image_processor
from .preprocess import preprocess as _preprocess


class PatchEmbed(nn.Module):
    """The patch projection: a conv with kernel = stride = patch size (key `patch_embed.proj`)."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.to(self.proj.weight.dtype))  # [B, C, H, W] -> [B, D, H/p, W/p]


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and F.scaled_dot_product_attention."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        d = config.hidden_size
        self.qkv = nn.Linear(d, 3 * d, bias=config.qkv_bias)  # rows: [query; key; value]
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        """x: [B, N, D] -> [B, Nq, D]; only the first `num_queries` tokens ask (all N answer)."""
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, D/heads]
        if num_queries is not None:
            q = q[:, :, :num_queries]
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(D/heads)) v
        return self.proj(out.transpose(1, 2).reshape(b, -1, d))


class Mlp(nn.Module):
    """fc2(gelu(fc1(x))) (exact, erf GELU, as both references), or with `use_swiglu_ffn` (DINOv2 ViT-g, timm
    SwiGLUPacked) fc2(silu(a) * b) where (a, b) are the two halves of fc1(x)."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        self.swiglu, hidden = config.use_swiglu_ffn, config.intermediate_size
        self.fc1 = nn.Linear(config.hidden_size, hidden)
        self.fc2 = nn.Linear(hidden // 2 if self.swiglu else hidden, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            a, b = self.fc1(x).chunk(2, dim=-1)
            return self.fc2(F.silu(a) * b)
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual gain (Touvron et al. 2021, CaiT), used by DINOv2: x + gamma * f(x)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, config: DinoConfig):
        super().__init__()
        d, eps, ls = config.hidden_size, config.layer_norm_eps, config.layerscale_init
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.attn = Attention(config)
        self.ls1 = LayerScale(d, ls) if ls is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.mlp = Mlp(config)
        self.ls2 = LayerScale(d, ls) if ls is not None else nn.Identity()

    def forward(self, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        """[B, N, D] -> [B, N, D], or [B, num_queries, D]: the first tokens updated, the rest dropped."""
        h = self.attn(self.norm1(x), num_queries)
        x = residual(x[:, : h.shape[1]], h, self.ls1)
        return residual(x, self.mlp(self.norm2(x)), self.ls2)


def residual(x: torch.Tensor, h: torch.Tensor, ls: nn.Module) -> torch.Tensor:
    """x + gamma * h (gamma = 1 without LayerScale); in place when autograd records nothing (frozen use),
    which saves one [B, N, D] allocation per residual: bench row `dino_vitb16 vs transformers` (--quick) peak
    memory 60 MB in place against 74 MB for x + ls(h) (in-process A/B; the time is the same)."""
    gamma = ls.gamma if isinstance(ls, LayerScale) else None
    if torch.is_grad_enabled():
        return x + h if gamma is None else torch.addcmul(x, h, gamma)
    return x.add_(h) if gamma is None else x.addcmul_(h, gamma)


class Pooler(nn.Module):
    """transformers ViTPooler: tanh(dense(CLS)) (key `pooler.dense`)."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, cls_token: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls_token))


class DinoViT(nn.Module):
    def __init__(self, config: DinoConfig | None = None):
        super().__init__()
        self.config = config = config or DinoConfig()
        d, r = config.hidden_size, config.num_register_tokens
        num_pos = config.num_pos_prefix + config.grid_size**2  # [1+R | 1 | 0 prefix entries, patch grid]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.reg_token = nn.Parameter(torch.zeros(1, r, d)) if r else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, d))
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.pooler = Pooler(config) if config.has_pooler else None
        for p in (self.cls_token, self.reg_token, self.pos_embed):  # timm/transformers use std 0.02
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    # ---------------------------------------------------------------------------------------- embedding

    def interpolate_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings for a grid_h x grid_w patch grid: [1, (1+R if has_class) + grid_h*grid_w, D].

        The native grid is returned unchanged. Otherwise the patch part is resampled as the reference does:
        transformers `ViTEmbeddings.interpolate_pos_encoding` (bicubic, align_corners=False, output size
        given explicitly) or timm `resample_abs_pos_embed` (the same plus antialias=True, in float32).
        """
        pos, n, k = self.pos_embed, self.config.grid_size, self.config.num_pos_prefix
        if (grid_h, grid_w) == (n, n):
            return pos
        prefix, grid = pos[:, :k], pos[:, k:]
        grid = grid.float().reshape(1, n, n, -1).permute(0, 3, 1, 2)  # [1, D, n, n]
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False,
                             antialias=self.config.pos_embed_antialias)
        grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1).to(pos.dtype)
        return torch.cat([prefix, grid], dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels [B, C, H, W] -> tokens [B, 1+R+L, D] = [CLS, registers, patches] + position embeddings."""
        c, p = self.config.num_channels, self.config.patch_size
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"DinoViT expects pixel values [B, {c}, H, W]; got shape {tuple(x.shape)} "
                             "(use dino.preprocess(images) to convert images)")
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"image size {x.shape[-2]}x{x.shape[-1]} (input shape {tuple(x.shape)}) is not "
                             f"a multiple of the patch size {p}; use dino.preprocess(images, size=k*{p})")
        b = x.shape[0]
        patches = self.patch_embed(x)  # [B, D, h = H/p, w = W/p]
        grid_h, grid_w = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)  # [B, L = h*w, D]
        pos = self.interpolate_pos_embed(grid_h, grid_w)
        n = self.config.num_pos_prefix  # 1+R (ViT), 1 (Dinov2WithRegisters: not the registers), 0 (timm)
        patches = patches + pos[:, n:]
        prefix = self.cls_token if self.reg_token is None else torch.cat([self.cls_token, self.reg_token], 1)
        prefix = torch.cat([prefix[:, :n] + pos[:, :n], prefix[:, n:]], dim=1)  # the first n have entries
        return torch.cat([prefix.expand(b, -1, -1), patches], dim=1)

    # ---------------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized pixels [B, 3, H, W] -> last hidden state after the final norm [B, 1+R+L, D]."""
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def global_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """c_GLB = [CLS, pooler if present, registers]: [B, G, D], G = 1 (+1) + R.

        Equal to slicing `forward(x)`, but cheaper: the last block only updates the 1+R global tokens
        (their queries attend to all tokens; the patch tokens' own updates would be thrown away). Bench row
        `dinov2_vitb14_reg4 c_GLB vs timm` (bench/bench_vit.py --quick: 2 blocks): 0.23 s against 0.52 s for
        the full forward.
        """
        keep = 1 + self.config.num_register_tokens  # CLS + registers
        h = self.embed(x)
        for i, block in enumerate(self.blocks):
            h = block(h, num_queries=keep if i == len(self.blocks) - 1 else None)
        h = self.norm(h[:, :keep])  # [B, 1+R, D]
        if self.pooler is None:
            return h
        return torch.cat([h[:, :1], self.pooler(h[:, :1]), h[:, 1:]], dim=1)  # [B, 2+R, D]

    def preprocess(self, images, size: int | None = None) -> torch.Tensor:
        """Images (see `vit_dino.preprocess`) -> normalized float32 [B, 3, S, S] on the model's device; S = `size`,
        else the checkpoint's crop size (`config.input_size`), else `config.image_size`."""
        c = self.config
        size = size or c.input_size or c.image_size
        if size % c.patch_size:
            raise ValueError(f"size={size} is not a multiple of the patch size {c.patch_size}")
        return _preprocess(images, size, mean=c.image_mean, std=c.image_std, resize=round(size / c.crop_pct),
                           device=self.pos_embed.device)

    # ---------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, name_or_path, revision=None, cache_dir=None, dtype=None, device=None) -> DinoViT:
        """Load a Hub repo id, a local folder in the Hub layout, or a weights file with a config.json beside it.

        config.json names the family (`convert.config_from_json`); weights: model.safetensors, else
        pytorch_model.bin. A `preprocessor_config.json` beside them, when present, sets `preprocess`'s
        mean/std/size (`preprocess.fields_from_image_processor`).
        """
        kw = dict(revision=revision, cache_dir=cache_dir)
        path = Path(str(name_or_path)).expanduser()
        folder = path.parent if path.is_file() else name_or_path
        config_path = hub.resolve_file(folder, ["config.json"], **kw)
        weights = hub.resolve_file(name_or_path, ["model.safetensors", "pytorch_model.bin"], **kw)
        config, layout = convert.config_from_json(hub.read_json(config_path), source=config_path)
        processor = hub.resolve_file(folder, ["preprocessor_config.json"], required=False, **kw)
        # the checkpoint's own preprocessing, when it ships one (rad-dino: CXR mean/std, 518 px)
        fields = {} if processor is None else fields_from_image_processor(hub.read_json(processor), source=processor)
        state = convert.convert_state_dict(hub.load_state_dict_file(weights), layout, source=weights)
        config = dataclasses.replace(config, **fields, has_pooler="pooler.dense.weight" in state)
        return hub.load_model(cls, config, state, source=weights, dtype=dtype, device=device)

    def save_pretrained(self, folder) -> None:
        """config.json (DinoConfig fields) + model.safetensors (timm names), loadable by `from_pretrained`."""
        hub.save_pretrained(self, folder, weights_name="model.safetensors")
