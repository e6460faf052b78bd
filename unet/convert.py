"""Key mapping between original CompVis/Stability single files and the diffusers UNet layout.

The original LDM code (CompVis/stable-diffusion `openaimodel.py`) stores the UNet under
`model.diffusion_model.` as flat sequential lists:

    time_embed.{0,2}                 -> time_embedding.linear_{1,2}
    input_blocks.0.0                 -> conv_in
    input_blocks.k.0 / .k.1          -> down_blocks.i.resnets.j / down_blocks.i.attentions.j
    input_blocks.k.0.op              -> down_blocks.i.downsamplers.0.conv   (after the layers of block i)
    middle_block.{0,1,2}             -> mid_block.resnets.0, mid_block.attentions.0, mid_block.resnets.1
    output_blocks.k.0 / .k.1         -> up_blocks.i.resnets.j / up_blocks.i.attentions.j
    output_blocks.k.{1|2}.conv       -> up_blocks.i.upsamplers.0.conv       (index 2 when there is attention)
    out.{0,2}                        -> conv_norm_out, conv_out

Inside a resnet, `in_layers.0/2`, `emb_layers.1`, `out_layers.0/3`, `skip_connection` become `norm1`,
`conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`. Transformer keys are identical in both layouts.
The table is built from the config by walking the blocks in the order the original code creates them
(facts checked against diffusers' `convert_ldm_unet_checkpoint` in the tests).
"""

from __future__ import annotations

from hub import strip_prefix
from unet.config import UNetConfig

LDM_PREFIX = "model.diffusion_model."
RESNET_RENAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def module_map(config: UNetConfig) -> list[tuple[str, str, bool]]:
    """(ldm module path, diffusers module path, is_resnet) for every module holding weights."""
    rows = [
        ("time_embed.0", "time_embedding.linear_1", False),
        ("time_embed.2", "time_embedding.linear_2", False),
        ("input_blocks.0.0", "conv_in", False),
        ("out.0", "conv_norm_out", False),
        ("out.2", "conv_out", False),
        ("middle_block.0", "mid_block.resnets.0", True),
        ("middle_block.1", "mid_block.attentions.0", False),
        ("middle_block.2", "mid_block.resnets.1", True),
    ]
    last = len(config.block_out_channels) - 1
    k = 1
    for i, kind in enumerate(config.down_block_types):
        for j in range(config.layers_per_block):
            rows.append((f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}", True))
            if kind.startswith("CrossAttn"):
                rows.append((f"input_blocks.{k}.1", f"down_blocks.{i}.attentions.{j}", False))
            k += 1
        if i < last:
            rows.append((f"input_blocks.{k}.0.op", f"down_blocks.{i}.downsamplers.0.conv", False))
            k += 1
    k = 0
    for i, kind in enumerate(config.up_block_types):
        attn = kind.startswith("CrossAttn")
        for j in range(config.layers_per_block + 1):
            rows.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", True))
            if attn:
                rows.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", False))
            if i < last and j == config.layers_per_block:
                up = f"output_blocks.{k}.{2 if attn else 1}.conv"  # after the resnet (and transformer)
                rows.append((up, f"up_blocks.{i}.upsamplers.0.conv", False))
            k += 1
    return rows


def rename_modules(state: dict, table: dict, resnet_renames: dict) -> dict:
    """Rename every key whose longest module prefix is in `table` ({old prefix: (new prefix, is_resnet)});
    inside a resnet, `resnet_renames` ({old: new}) renames the layer too. Other keys pass through unchanged
    (strict loading then reports them as unexpected)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        for d in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:d])
            if prefix in table:
                target, is_resnet = table[prefix]
                rest = ".".join(parts[d:])
                if is_resnet:
                    for old, new in resnet_renames.items():
                        if rest.startswith(old + "."):
                            rest = new + rest[len(old) :]
                            break
                key = f"{target}.{rest}"
                break
        out[key] = value
    return out


def to_diffusers(state: dict, config: UNetConfig) -> dict:
    """A UNet state dict in diffusers key names, from diffusers' (unchanged) or CompVis' layout (a whole SD file
    too: its `model.diffusion_model.` part is kept)."""
    state = strip_prefix(state, LDM_PREFIX)
    if "input_blocks.0.0.weight" not in state:
        return state
    table = {ldm: (new, is_resnet) for ldm, new, is_resnet in module_map(config)}
    return rename_modules(state, table, RESNET_RENAMES)
