"""Checkpoint configs and key layouts of the DINO families, mapped onto DinoConfig / DinoViT.

Our module names are timm's, so a timm checkpoint (`timm/vit_base_patch14_reg4_dinov2.lvd142m`) or one
written by `DinoViT.save_pretrained` loads as is. A transformers checkpoint (ViTModel `facebook/dino-vitb16`;
Dinov2Model `facebook/dinov2-base`, `microsoft/rad-dino`; Dinov2WithRegistersModel
`facebook/dinov2-with-registers-base`) is renamed with the table below, and its separate query/key/value
projections are concatenated into the fused `attn.qkv` (rows [query; key; value], the order our Attention
splits them in); transformers >= 5 in-memory SwiGLU `gate_proj`/`up_proj` are concatenated into `mlp.fc1`
likewise (the Hub files already hold them fused as `weights_in`, rows [gate; up]):

    transformers Hub files                        transformers >= 5 (in memory)   ours (= timm)
    embeddings.cls_token                          (same)                          cls_token
    embeddings.register_tokens (WithRegisters)    (same)                          reg_token
    embeddings.position_embeddings                (same)                          pos_embed
    embeddings.patch_embeddings.projection        (same)                          patch_embed.proj
    embeddings.mask_token (Dinov2)                (same)                          - (dropped, see below)
    encoder.layer.{i}.layernorm_before | norm1    layers.{i}.layernorm_before     blocks.{i}.norm1
    encoder.layer.{i}.attention.attention.query   layers.{i}.attention.q_proj     blocks.{i}.attn.qkv (fused)
      (key, value likewise)
    encoder.layer.{i}.attention.output.dense      layers.{i}.attention.o_proj     blocks.{i}.attn.proj
    encoder.layer.{i}.layer_scale1.lambda1        (same)                          blocks.{i}.ls1.gamma
    encoder.layer.{i}.layernorm_after | norm2     layers.{i}.layernorm_after      blocks.{i}.norm2
    encoder.layer.{i}.intermediate.dense | mlp.fc1  layers.{i}.mlp.fc1            blocks.{i}.mlp.fc1
    encoder.layer.{i}.mlp.weights_in (SwiGLU)     mlp.gate_proj + mlp.up_proj     blocks.{i}.mlp.fc1 (fused)
    encoder.layer.{i}.output.dense | mlp.fc2      layers.{i}.mlp.fc2              blocks.{i}.mlp.fc2
    encoder.layer.{i}.mlp.weights_out (SwiGLU)    mlp.down_proj                   blocks.{i}.mlp.fc2
    encoder.layer.{i}.layer_scale2.lambda1        (same)                          blocks.{i}.ls2.gamma
    layernorm                                     (same)                          norm
    pooler.dense (ViTModel, optional)             (same)                          pooler.dense

Dinov2's `mask_token` only replaces masked patches when `bool_masked_pos` is given (iBOT pretraining); feature
extraction never uses it, so it is dropped by name (and only it). Dinov2Model's `pooler_output` is the CLS
token after the final LayerNorm, i.e. the same vector as `last_hidden_state[:, 0]`: it is not a separate token,
so c_GLB = [CLS, registers] (no duplicate CLS; `has_pooler` stays False: there is no pooler.dense).
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import torch

import hub

from .config import TIMM_ARCHITECTURES, DinoConfig

_HINT = {
    "transformers": "transformers ViTModel/Dinov2Model keys such as 'encoder.layer.0.attention.attention.query.weight'",
    "timm": "timm keys such as 'blocks.0.attn.qkv.weight'",
    "unknown": "neither transformers ViTModel/Dinov2Model nor timm ViT keys",
}

# ------------------------------------------------------------------------------------------- state dicts

_GLOBAL_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.": "patch_embed.proj.",
    "layernorm.": "norm.",
}
# Per layer: (Hub file name, transformers >= 5 module name) -> ours. qkv entries are fused afterwards.
_LAYER_RENAMES = {
    ("layernorm_before.", "norm1."): "norm1.",
    ("attention.attention.query.", "attention.q_proj."): "attn.q.",
    ("attention.attention.key.", "attention.k_proj."): "attn.k.",
    ("attention.attention.value.", "attention.v_proj."): "attn.v.",
    ("attention.output.dense.", "attention.o_proj."): "attn.proj.",
    ("layer_scale1.lambda1",): "ls1.gamma",
    ("layernorm_after.", "norm2."): "norm2.",
    ("intermediate.dense.", "mlp.fc1.", "mlp.weights_in."): "mlp.fc1.",
    ("mlp.gate_proj.",): "mlp.gate.",
    ("mlp.up_proj.",): "mlp.up.",
    ("output.dense.", "mlp.fc2.", "mlp.weights_out.", "mlp.down_proj."): "mlp.fc2.",
    ("layer_scale2.lambda1",): "ls2.gamma",
}
_DROPPED = ("embeddings.mask_token",)  # Dinov2 masked-image-modelling token: unused by feature extraction
# Fused after renaming: (first part, all parts in row order, fused name).
_FUSE = ((".attn.q.", ".attn.{}.", "qkv", ".attn.qkv."), (".mlp.gate.", ".mlp.{}.", ("gate", "up"), ".mlp.fc1."))
_LAYER_KEY = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.*)$")


def detect_layout(state: dict) -> str:
    """'transformers' (ViTModel), 'timm' (also ours) or 'unknown', from the key names."""
    if any(k.startswith(("embeddings.", "encoder.layer.", "layers.")) for k in state):
        return "transformers"
    if any(k.startswith(("blocks.", "pos_embed", "patch_embed.")) for k in state):
        return "timm"
    return "unknown"


def _rename_transformers_key(key: str) -> str:
    for old, new in _GLOBAL_RENAMES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    m = _LAYER_KEY.match(key)
    if m:
        i, rest = m.groups()
        for names, new in _LAYER_RENAMES.items():
            for old in names:
                if rest.startswith(old):
                    return f"blocks.{i}.{new}{rest[len(old):]}"
    return key  # unknown keys pass through and are reported by hub.load_model


def from_transformers(state: dict) -> dict:
    """transformers ViTModel / Dinov2Model state dict -> ours (timm names, fused qkv and SwiGLU fc1). Unknown
    keys are kept as they are (hub.load_model reports them); only `_DROPPED` keys are removed."""
    out = {_rename_transformers_key(k): v for k, v in state.items() if k not in _DROPPED}
    for first, pattern, names, fused in _FUSE:  # e.g. blocks.{i}.attn.{q,k,v}.{weight,bias} -> attn.qkv
        for key in [k for k in out if first in k]:
            parts = [key.replace(first, pattern.format(n)) for n in names]
            if all(p in out for p in parts):
                out[key.replace(first, fused)] = torch.cat([out.pop(p) for p in parts], dim=0)
    return out


def convert_state_dict(state: dict, expected: str, *, source="state dict") -> dict:
    """Check that `state` has the `expected` layout ('transformers' | 'timm'); map it onto DinoViT names."""
    found = detect_layout(state)
    if found != expected:
        raise hub.CheckpointError(
            f"{source}: its config.json describes a {expected} checkpoint, so {_HINT[expected]} were "
            f"expected, but the weights have {_HINT[found]} (found e.g. {sorted(state)[:3]}). "
            "Is the config.json from another model family?"
        )
    if expected == "transformers":
        return from_transformers(state)
    head = [k for k in state if k.startswith("head.")]
    if head:
        warnings.warn(f"{source}: ignoring the classifier head {head} (DinoViT is a feature encoder)",
                      stacklevel=3)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return state


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


def config_from_transformers(d: dict, *, source="config.json") -> DinoConfig:
    """A transformers ViTConfig (model_type 'vit'); its defaults are DinoConfig's (DINO v1 ViT-B/16)."""
    if d.get("model_type", "vit") != "vit":
        raise hub.CheckpointError(f"{source}: model_type {d['model_type']!r} is not supported; expected a "
                                  f"transformers 'vit' (ViTModel) or {' / '.join(map(repr, DINOV2_TYPES))} config")
    for key, allowed in (("hidden_act", "gelu"), ("pooler_act", "tanh")):
        if d.get(key, allowed) != allowed:
            raise hub.CheckpointError(f"{source}: {key}={d[key]!r} is not supported (only {allowed!r})")
    if d.get("pooler_output_size", d.get("hidden_size")) != d.get("hidden_size"):
        raise hub.CheckpointError(f"{source}: pooler_output_size must equal hidden_size to join c_GLB")
    same = ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "intermediate_size", "layer_norm_eps", "qkv_bias")  # same names
    kwargs = {k: d[k] for k in same if k in d}
    for key in ("image_size", "patch_size"):
        if key in kwargs:
            kwargs[key] = _square(kwargs[key], key, source)
    return DinoConfig(**kwargs)


# transformers Dinov2Config / Dinov2WithRegistersConfig defaults (a config.json written by save_pretrained omits
# the values equal to them). The Hub repos spell most out: facebook/dinov2-base and microsoft/rad-dino have
# image_size 518, patch_size 14, layerscale_value 1.0, mlp_ratio 4.
_DINOV2_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                        hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=14, num_channels=3,
                        qkv_bias=True, layerscale_value=1.0, use_swiglu_ffn=False, num_register_tokens=0)
DINOV2_TYPES = {"dinov2": _DINOV2_DEFAULTS,
                "dinov2_with_registers": {**_DINOV2_DEFAULTS, "patch_size": 16, "num_register_tokens": 4}}


def dinov2_intermediate_size(hidden_size: int, mlp_ratio: float, swiglu: bool) -> int:
    """fc1's output width: int(D * mlp_ratio) (Dinov2MLP), or for SwiGLU 2 x (two thirds of it rounded up to a
    multiple of 8) (Dinov2SwiGLUFFN: weights_in holds gate and up, weights_out takes the hidden width)."""
    hidden = int(hidden_size * mlp_ratio)
    return 2 * ((int(hidden * 2 / 3) + 7) // 8 * 8) if swiglu else hidden


def config_from_dinov2(d: dict, *, source="config.json") -> DinoConfig:
    """A transformers Dinov2Config (model_type 'dinov2') or Dinov2WithRegistersConfig ('dinov2_with_registers').

    Both add position embeddings to [CLS, patches] (pos_embed [1, 1+L, D]); the registers model inserts its
    registers after that, without position embeddings, and resamples the grid with antialias=True.
    """
    with_registers = d["model_type"] == "dinov2_with_registers"
    c = {**DINOV2_TYPES[d["model_type"]], **d}
    if c["hidden_act"] != "gelu":
        raise hub.CheckpointError(f"{source}: hidden_act={c['hidden_act']!r} is not supported (only 'gelu')")
    same = ("hidden_size", "num_hidden_layers", "num_attention_heads", "layer_norm_eps", "num_channels",
            "qkv_bias", "use_swiglu_ffn")
    return DinoConfig(
        **{k: c[k] for k in same},
        image_size=_square(c["image_size"], "image_size", source),
        patch_size=_square(c["patch_size"], "patch_size", source),
        intermediate_size=dinov2_intermediate_size(c["hidden_size"], c["mlp_ratio"], c["use_swiglu_ffn"]),
        layerscale_init=float(c["layerscale_value"]),
        num_register_tokens=int(c["num_register_tokens"]) if with_registers else 0,
        pos_embed_has_class=True, register_pos_embed=False, pos_embed_antialias=with_registers,
    )


def config_from_json(d: dict, *, source="config.json") -> tuple[DinoConfig, str]:
    """(DinoConfig, expected weights layout 'transformers' | 'timm') from any supported config.json."""
    if d.get("_class_name") == "DinoViT":  # written by DinoViT.save_pretrained
        return hub.config_from_dict(DinoConfig, d, source=source), "timm"
    if "architecture" in d:
        return config_from_timm(d, source=source), "timm"
    if d.get("model_type") in DINOV2_TYPES:
        return config_from_dinov2(d, source=source), "transformers"
    if d.get("model_type") == "vit" or "hidden_size" in d:
        return config_from_transformers(d, source=source), "transformers"
    raise hub.CheckpointError(f"{source}: not a DINO config: expected a transformers ViT / Dinov2 config "
                              "(model_type 'vit', 'dinov2', 'dinov2_with_registers') or a timm config (with "
                              "'architecture')")
