"""Checkpoint configs and key layouts of the DINO families, mapped onto DinoConfig / DinoViT.

Our module names are timm's, so a timm checkpoint (`timm/vit_base_patch14_reg4_dinov2.lvd142m`) or one
written by `DinoViT.save_pretrained` loads as is. A transformers checkpoint (ViTModel `facebook/dino-vitb16`;
Dinov2Model `facebook/dinov2-base`, `microsoft/rad-dino`; Dinov2WithRegistersModel
`facebook/dinov2-with-registers-base`) is renamed by `_RENAMES` (its Hub-file names, and the
transformers >= 5 in-memory names such as `layers.{i}.attention.q_proj`), then its separate query/key/value
projections are concatenated into the fused `attn.qkv` (rows [query; key; value], the order our Attention
splits them in), and SwiGLU `gate_proj`/`up_proj` into `mlp.fc1` likewise (Hub files hold them fused as
`weights_in`, rows [gate; up]).

Dinov2's `mask_token` only replaces masked patches when `bool_masked_pos` is given (iBOT pretraining); feature
extraction never uses it, so it is dropped by name (and only it). Dinov2Model has no `pooler.dense`, so
`has_pooler` stays False (its `pooler_output` is the normed CLS itself: see vit.py).
"""

from __future__ import annotations

import dataclasses
import re

import torch

import hub

from .config import TIMM_ARCHITECTURES, DinoConfig

# transformers key prefix -> ours (timm's). Inside a layer (`encoder.layer.{i}.` in Hub files, `layers.{i}.` in
# transformers >= 5 memory, `blocks.{i}.` here) both spellings are listed; q/k/v and gate/up are fused afterwards.
_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.": "patch_embed.proj.",
    "layernorm.": "norm.",
    "layernorm_before.": "norm1.",
    "attention.attention.query.": "attn.q.", "attention.q_proj.": "attn.q.",
    "attention.attention.key.": "attn.k.", "attention.k_proj.": "attn.k.",
    "attention.attention.value.": "attn.v.", "attention.v_proj.": "attn.v.",
    "attention.output.dense.": "attn.proj.", "attention.o_proj.": "attn.proj.",
    "layer_scale1.lambda1": "ls1.gamma",
    "layernorm_after.": "norm2.",
    "intermediate.dense.": "mlp.fc1.", "mlp.weights_in.": "mlp.fc1.",
    "mlp.gate_proj.": "mlp.gate.", "mlp.up_proj.": "mlp.up.",
    "output.dense.": "mlp.fc2.", "mlp.weights_out.": "mlp.fc2.", "mlp.down_proj.": "mlp.fc2.",
    "layer_scale2.lambda1": "ls2.gamma",
}
_DROPPED = ("embeddings.mask_token",)  # Dinov2 masked-image-modelling token: unused by feature extraction
# Fused after renaming: (first part, all parts in row order, fused name).
_FUSE = ((".attn.q.", ".attn.{}.", "qkv", ".attn.qkv."), (".mlp.gate.", ".mlp.{}.", ("gate", "up"), ".mlp.fc1."))
_LAYER_KEY = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.*)$")
_LAYOUT_KEYS = {"transformers": ("embeddings.", "encoder.layer.", "layers."),
                "timm": ("blocks.", "pos_embed", "patch_embed.")}


def _rename(key: str) -> str:
    m = _LAYER_KEY.match(key)
    head, rest = (f"blocks.{m[1]}.", m[2]) if m else ("", key)
    old = next((old for old in _RENAMES if rest.startswith(old)), None)
    return head + (rest if old is None else _RENAMES[old] + rest[len(old) :])  # unknown keys: reported on load


def convert_state_dict(state: dict, expected: str, *, source="state dict") -> dict:
    """Check that `state` has the `expected` layout ('transformers' | 'timm'); map it onto DinoViT names
    (transformers: renamed, q/k/v and gate/up fused; `_DROPPED` keys removed, unknown keys kept for the
    strict load to report)."""
    found = next((name for name, keys in _LAYOUT_KEYS.items() if any(k.startswith(keys) for k in state)), "no")
    if found != expected:
        raise hub.CheckpointError(f"{source}: its config.json describes a {expected} checkpoint, but the weights "
                                  f"have {found} keys (e.g. {sorted(state)[:3]}); is it from another model family?")
    if expected == "timm":
        return state
    out = {_rename(k): v for k, v in state.items() if k not in _DROPPED}
    for first, pattern, names, fused in _FUSE:  # e.g. blocks.{i}.attn.{q,k,v}.{weight,bias} -> attn.qkv
        for key in [k for k in out if first in k]:
            parts = [key.replace(first, pattern.format(n)) for n in names]
            if all(p in out for p in parts):
                out[key.replace(first, fused)] = torch.cat([out.pop(p) for p in parts], dim=0)
    return out


# ------------------------------------------------------------------------------------------- configs

# timm `model_args` (the create_model kwargs timm's save_for_hf records) -> DinoConfig field. Other arguments
# would describe a network that is not one of TIMM_ARCHITECTURES, except these, which leave the features alone.
_TIMM_ARGS = {"img_size": "image_size", "in_chans": "num_channels", "embed_dim": "hidden_size",
              "depth": "num_hidden_layers", "num_heads": "num_attention_heads"}
_TIMM_IGNORED = ("num_classes", "global_pool", "dynamic_img_size")  # the head, and timm's input-size check


def _square(value, what: str, source) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise hub.CheckpointError(f"{source}: {what}={value} is not square; DinoViT needs a square "
                                      "native grid")
        value = value[0]
    return int(value)


def config_from_timm(d: dict, *, source="config.json") -> DinoConfig:
    """A timm Hub config: `architecture` selects the TIMM_ARCHITECTURES entry, then `pretrained_cfg` (input
    size, mean/std) and `model_args` (field by field, like timm's create_model kwargs) override it."""
    arch = d["architecture"]
    if arch not in TIMM_ARCHITECTURES:
        raise hub.CheckpointError(f"{source}: timm architecture {arch!r} is not supported; "
                                  f"known: {sorted(TIMM_ARCHITECTURES)}")
    base = TIMM_ARCHITECTURES[arch]
    pre = d.get("pretrained_cfg", d)  # old timm configs keep the pretrained cfg at the top level
    fields = {}
    if pre.get("input_size"):
        fields["image_size"] = _square(pre["input_size"][1:], "pretrained_cfg.input_size", source)
    for key, name in (("mean", "image_mean"), ("std", "image_std")):
        if pre.get(key):
            fields[name] = tuple(float(v) for v in pre[key])
    args = dict(d.get("model_args") or {})
    for key, value in args.items():
        if key in _TIMM_ARGS:
            fields[_TIMM_ARGS[key]] = _square(value, key, source) if key == "img_size" else value
        elif key not in _TIMM_IGNORED and key != "mlp_ratio":
            raise hub.CheckpointError(f"{source}: timm model_args {key}={value!r} is not supported (DinoViT "
                                      f"reads {', '.join(_TIMM_ARGS)} and mlp_ratio)")
    hidden = fields.get("hidden_size", base.hidden_size)
    mlp_ratio = args.get("mlp_ratio", base.intermediate_size / base.hidden_size)
    fields["intermediate_size"] = int(hidden * mlp_ratio)  # timm Mlp: hidden_features = int(dim * mlp_ratio)
    return dataclasses.replace(base, **fields)


# transformers config defaults by model_type, for the values a config.json written by save_pretrained omits:
# ViTConfig's are DinoConfig's (DINO v1 ViT-B/16); Dinov2Config / Dinov2WithRegistersConfig differ in these.
_DINOV2_DEFAULTS = dict(layer_norm_eps=1e-6, image_size=224, patch_size=14, mlp_ratio=4, layerscale_value=1.0,
                        use_swiglu_ffn=False)
TRANSFORMERS_DEFAULTS = {"vit": {}, "dinov2": _DINOV2_DEFAULTS,
                         "dinov2_with_registers": {**_DINOV2_DEFAULTS, "patch_size": 16, "num_register_tokens": 4}}


def dinov2_intermediate_size(hidden_size: int, mlp_ratio: float, swiglu: bool) -> int:
    """fc1's output width: int(D * mlp_ratio) (Dinov2MLP), or for SwiGLU 2 x (two thirds of it rounded up to a
    multiple of 8) (Dinov2SwiGLUFFN: weights_in holds gate and up, weights_out takes the hidden width)."""
    hidden = int(hidden_size * mlp_ratio)
    return 2 * ((int(hidden * 2 / 3) + 7) // 8 * 8) if swiglu else hidden


def config_from_transformers(d: dict, *, source="config.json") -> DinoConfig:
    """A transformers ViTConfig ('vit'), Dinov2Config ('dinov2') or Dinov2WithRegistersConfig.

    The Dinov2 models add position embeddings to [CLS, patches] (pos_embed [1, 1+L, D]); the registers model
    inserts its registers after that, without position embeddings, and resamples the grid with antialias=True.
    """
    kind = d.get("model_type", "vit")
    if kind not in TRANSFORMERS_DEFAULTS:
        raise hub.CheckpointError(f"{source}: model_type {kind!r} is not supported; expected one of "
                                  f"{', '.join(map(repr, TRANSFORMERS_DEFAULTS))} (transformers ViTModel / Dinov2)")
    c = {**TRANSFORMERS_DEFAULTS[kind], **d}
    for key, allowed in (("hidden_act", "gelu"), ("pooler_act", "tanh")):
        if c.get(key, allowed) != allowed:
            raise hub.CheckpointError(f"{source}: {key}={c[key]!r} is not supported (only {allowed!r})")
    same = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "layer_norm_eps",
            "num_channels", "qkv_bias")  # same names as DinoConfig's
    fields = {k: c[k] for k in same if k in c}
    fields.update({k: _square(c[k], k, source) for k in ("image_size", "patch_size") if k in c})
    if kind != "vit":
        swiglu = bool(c["use_swiglu_ffn"])
        fields.update(
            intermediate_size=dinov2_intermediate_size(c.get("hidden_size", 768), c["mlp_ratio"], swiglu),
            use_swiglu_ffn=swiglu, layerscale_init=float(c["layerscale_value"]), register_pos_embed=False,
            num_register_tokens=int(c.get("num_register_tokens", 0)), pos_embed_antialias=kind != "dinov2",
        )
    return DinoConfig(**fields)


def config_from_json(d: dict, *, source="config.json") -> tuple[DinoConfig, str]:
    """(DinoConfig, expected weights layout 'transformers' | 'timm') from any supported config.json."""
    if d.get("_class_name") == "DinoViT":  # written by DinoViT.save_pretrained
        return hub.config_from_dict(DinoConfig, d, source=source), "timm"
    if "architecture" in d:
        return config_from_timm(d, source=source), "timm"
    if "model_type" in d or "hidden_size" in d:
        return config_from_transformers(d, source=source), "transformers"
    raise hub.CheckpointError(f"{source}: not a DINO config: expected a transformers ViT / Dinov2 config "
                              "(with 'model_type') or a timm config (with 'architecture')")
