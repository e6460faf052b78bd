"""One loader for every pretrained model in this repo (VAE, UNet, DINO ViT).

A pretrained model is two things: a config (JSON) and a state dict (tensors). `from_pretrained` in each
model package is a short recipe built from the pieces here:

    path = resolve_file(name, ["diffusion_pytorch_model.safetensors", ...], subfolder="vae")
    config = config_from_dict(VAEConfig, read_json(config_path), source=config_path)
    state = convert_keys(load_state_dict_file(path))          # model-specific renames
    model = load_model(AutoencoderKL, config, state, source=path, dtype=..., device=...)

`name` may be a Hugging Face Hub repo id (resolved through `huggingface_hub.hf_hub_download`, which honours
HF_HUB_OFFLINE and the local cache), a local folder in the Hub layout, or a single weights file.

Weights are read with safetensors, or with `torch.load(weights_only=True)` for legacy `.bin`/`.pth` files:
nothing here ever unpickles arbitrary objects. The model is built on the meta device and the checkpoint
tensors are assigned into it, so loading never holds two copies of the weights in memory. Loading is always
strict; a mismatch raises `CheckpointError` listing missing/unexpected keys and shape conflicts.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import tempfile
import typing
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file as _load_safetensors
from safetensors.torch import save_file as _save_safetensors

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resolved, read, or loaded into the model it was meant for."""


# ---------------------------------------------------------------------------------------------- resolve


def resolve_file(name_or_path, filenames, *, subfolder=None, revision=None, cache_dir=None, required=True):
    """Local path of the first of `filenames` that exists for `name_or_path`, else None (or raise).

    `name_or_path`: a file (returned as is), a folder (looked up under `subfolder`), or a Hub repo id.
    """
    filenames = [filenames] if isinstance(filenames, str) else list(filenames)
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        for fn in filenames:
            if (folder / fn).is_file():
                return folder / fn
        if required:
            raise CheckpointError(f"none of {filenames} found in folder {folder}")
        return None
    if str(name_or_path).count("/") != 1 or str(name_or_path).startswith((".", "/", "~")):
        raise CheckpointError(f"{name_or_path!r} is neither an existing file/folder nor a Hub repo id 'org/name'")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    errors = []
    for fn in filenames:
        try:
            kw = dict(subfolder=subfolder, revision=revision, cache_dir=cache_dir)
            return Path(hf_hub_download(str(name_or_path), fn, **kw))
        except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
            errors.append(f"{fn}: {type(e).__name__}")
    if required:
        where = f"{name_or_path}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        raise CheckpointError(
            f"could not resolve any of {filenames} for Hub repo {where}: {'; '.join(errors)}. "
            "Offline? Populate the Hugging Face cache first or pass a local folder/file."
        )
    return None


# ---------------------------------------------------------------------------------------------- config


def read_json(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read config {path}: {e}") from e


def config_from_dict(cls, d: dict, *, source="config"):
    """Build the frozen dataclass `cls` from the fields of `d` it knows; warn about the others.

    Keys starting with '_' (e.g. diffusers' `_class_name`) are metadata and ignored silently. Lists become
    tuples where the dataclass field is a tuple, so the config stays hashable and frozen.
    """
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs, unknown = {}, []
    for k, v in d.items():
        if k.startswith("_"):
            continue
        if k not in names:
            unknown.append(k)
            continue
        if isinstance(v, list) and "tuple" in str(hints.get(k, "")).lower():
            v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        kwargs[k] = v
    if unknown:
        warnings.warn(f"{source}: ignoring keys unknown to {cls.__name__}: {sorted(unknown)}", stacklevel=2)
    return cls(**kwargs)


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


# ---------------------------------------------------------------------------------------------- weights


def load_state_dict_file(path) -> dict[str, torch.Tensor]:
    """Read a weights file safely: safetensors, or torch.load(weights_only=True) for pickled formats."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return _load_safetensors(str(path))
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # Lightning/CompVis .ckpt wrap the weights one level down
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat {{name: tensor}} state dict")
    return obj


def strip_prefix(state: dict, prefix: str) -> dict:
    """Keep only keys under `prefix` (e.g. 'first_stage_model.'), with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def mismatch_report(model: torch.nn.Module, state: dict, *, limit=5) -> str:
    """Human-readable diff between `model`'s parameters/buffers and `state`; '' when they match."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]

    def section(title, items):
        if not items:
            return ""
        more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
        return f"\n  {title} ({len(items)}): " + ", ".join(items[:limit]) + more

    return (
        section("missing keys", missing)
        + section("unexpected keys", unexpected)
        + section("shape mismatches", shapes)
    )


def load_model(cls, config, state: dict, *, source="state dict", dtype=None, device=None):
    """Build `cls(config)` without allocating weights and assign `state` into it, strictly.

    Models must keep no non-persistent buffers (anything computed must be computed in forward), so that every
    tensor of the model comes from the checkpoint.
    """
    with torch.device("meta"):
        model = cls(config)
    report = mismatch_report(model, state)
    if report:
        raise CheckpointError(f"checkpoint {source} does not match {cls.__name__}:{report}")
    model.load_state_dict(state, strict=True, assign=True)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise CheckpointError(f"{cls.__name__}.{name} was not set by checkpoint {source}")
    dtype = dtype or torch.float32
    return model.to(device=device, dtype=dtype).eval()


def check_state_dict(model: torch.nn.Module, state: dict, *, source="state dict"):
    """Raise CheckpointError if `state` does not load strictly into an existing `model`."""
    report = mismatch_report(model, state)
    if report:
        raise CheckpointError(f"checkpoint {source} does not match {type(model).__name__}:{report}")


# ---------------------------------------------------------------------------------------------- saving


def save_file_atomic(tensors: dict, path, metadata: dict | None = None):
    """Write a safetensors file so that `path` is either the old file or the complete new one, never half.

    Written to a temporary file in the same folder, flushed to disk, then renamed over `path` (atomic on
    POSIX). If the disk is full the temporary file is removed and the previous checkpoint is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        _save_safetensors(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(path):
    """`with atomic_path(p) as tmp: write(tmp)`: the file is written as `.NAME.tmp` beside `p` and renamed over
    it only when the block succeeds, so `p` is the old file or the complete new one, never half (a kill
    leaves the `.tmp`, which checkpoint.clean removes; an error removes it at once)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(obj, path):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=list) + "\n", encoding="utf-8")


def write_csv_atomic(path, rows: list[dict], fieldnames=None):
    """A CSV with a header (`fieldnames`, default the first row's keys) and one line per row, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(fieldnames or rows[0]))
        w.writeheader()
        w.writerows(rows)


def save_pretrained(model: torch.nn.Module, folder, *, weights_name="diffusion_pytorch_model.safetensors",
                    class_name=None):
    """Save `model.config` + weights in the diffusers folder layout (loadable by our from_pretrained)."""
    folder = Path(folder)
    cfg = config_to_dict(model.config)
    cfg["_class_name"] = class_name or type(model).__name__
    write_json_atomic(cfg, folder / "config.json")
    save_file_atomic(model.state_dict(), folder / weights_name)
