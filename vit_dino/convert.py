"""Checkpoint configs and key layouts of the two DINO families, mapped onto DinoConfig / DinoViT.

Our module names are timm's, so a timm checkpoint (`timm/vit_base_patch14_reg4_dinov2.lvd142m`) or one
written by `DinoViT.save_pretrained` loads as is. A transformers ViTModel checkpoint (`facebook/dino-vitb16`)
is renamed with the table below, and its separate query/key/value projections are concatenated into the
fused `attn.qkv` (rows [query; key; value], the order our Attention splits them in):

    transformers ViTModel (Hub files)             transformers >= 5 (in memory)   ours (= timm)
    embeddings.cls_token                          (same)                          cls_token
    embeddings.position_embeddings                (same)                          pos_embed
    embeddings.patch_embeddings.projection        (same)                          patch_embed.proj
    encoder.layer.{i}.layernorm_before            layers.{i}.layernorm_before     blocks.{i}.norm1
    encoder.layer.{i}.attention.attention.query   layers.{i}.attention.q_proj     blocks.{i}.attn.qkv (fused)
      (key, value likewise)
    encoder.layer.{i}.attention.output.dense      layers.{i}.attention.o_proj     blocks.{i}.attn.proj
    encoder.layer.{i}.layernorm_after             layers.{i}.layernorm_after      blocks.{i}.norm2
    encoder.layer.{i}.intermediate.dense          layers.{i}.mlp.fc1              blocks.{i}.mlp.fc1
    encoder.layer.{i}.output.dense                layers.{i}.mlp.fc2              blocks.{i}.mlp.fc2
    layernorm                                     (same)                          norm
    pooler.dense                                  (same)                          pooler.dense
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import torch

import hub

from .config import TIMM_ARCHITECTURES, DinoConfig

_HINT = {
    "transformers": "transformers ViTModel keys such as 'encoder.layer.0.attention.attention.query.weight'",
    "timm": "timm keys such as 'blocks.0.attn.qkv.weight'",
    "unknown": "neither transformers ViTModel nor timm ViT keys",
}

# ------------------------------------------------------------------------------------------- state dicts

_GLOBAL_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.": "patch_embed.proj.",
    "layernorm.": "norm.",
}
# Per layer: (Hub file name, transformers >= 5 module name) -> ours. qkv entries are fused afterwards.
_LAYER_RENAMES = {
    ("layernorm_before.", "layernorm_before."): "norm1.",
    ("attention.attention.query.", "attention.q_proj."): "attn.q.",
    ("attention.attention.key.", "attention.k_proj."): "attn.k.",
    ("attention.attention.value.", "attention.v_proj."): "attn.v.",
    ("attention.output.dense.", "attention.o_proj."): "attn.proj.",
    ("layernorm_after.", "layernorm_after."): "norm2.",
    ("intermediate.dense.", "mlp.fc1."): "mlp.fc1.",
    ("output.dense.", "mlp.fc2."): "mlp.fc2.",
}
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
    """transformers ViTModel state dict -> ours (timm names, fused qkv). Unknown keys are kept as they are."""
    out = {_rename_transformers_key(k): v for k, v in state.items()}
    for key in [k for k in out if ".attn.q." in k]:  # fuse blocks.{i}.attn.{q,k,v}.{weight,bias}
        parts = [key.replace(".attn.q.", f".attn.{n}.") for n in "qkv"]
        if all(p in out for p in parts):
            out[key.replace(".attn.q.", ".attn.qkv.")] = torch.cat([out.pop(p) for p in parts], dim=0)
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
        raise hub.CheckpointError(f"{source}: model_type {d['model_type']!r} is not supported; "
                                  "expected a transformers 'vit' (ViTModel) config")
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


def config_from_json(d: dict, *, source="config.json") -> tuple[DinoConfig, str]:
    """(DinoConfig, expected weights layout 'transformers' | 'timm') from any supported config.json."""
    if d.get("_class_name") == "DinoViT":  # written by DinoViT.save_pretrained
        return hub.config_from_dict(DinoConfig, d, source=source), "timm"
    if "architecture" in d:
        return config_from_timm(d, source=source), "timm"
    if d.get("model_type") == "vit" or "hidden_size" in d:
        return config_from_transformers(d, source=source), "transformers"
    raise hub.CheckpointError(f"{source}: not a DINO config: expected a transformers ViT config (model_type "
                              "'vit') or a timm config (with 'architecture')")
