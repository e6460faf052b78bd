"""One loader for every pretrained model in this repo (VAE, UNet, DINO ViT), and the atomic writers.

A pretrained model is two things: a config (JSON) and a state dict (tensors). `from_pretrained` in each
model package is a short recipe built from the pieces here (`load_diffusers` is the VAE's and the UNet's):

    path = resolve_file(name, ["diffusion_pytorch_model.safetensors", ...], subfolder="vae")
    config = VAEConfig.from_dict(read_json(config_path), source=config_path)   # -> config_from_dict
    state = convert(load_state_dict_file(path), config)       # model-specific renames
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
import shutil
import typing
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file as _load_safetensors
from safetensors.torch import save_file as _save_safetensors


class CheckpointError(ValueError):
    """A checkpoint that cannot be resolved, read, or loaded into the model it was meant for."""


# ---------------------------------------------------------------------------------------------- resolve


def resolve_file(name_or_path, filenames, *, subfolder=None, revision=None, cache_dir=None, required=True):
    """Local path of the first of `filenames` that exists for `name_or_path` (a file, returned as is; a folder,
    looked up under `subfolder`; or a Hub repo id), else None (or raise)."""
    filenames = list(filenames)
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        found = next((folder / fn for fn in filenames if (folder / fn).is_file()), None)
        if found is None and required:
            raise CheckpointError(f"none of {filenames} found in folder {folder}")
        return found
    if str(name_or_path).count("/") != 1 or str(name_or_path).startswith((".", "/", "~")):
        raise CheckpointError(f"{name_or_path!r} is neither an existing file/folder nor a Hub repo id 'org/name'")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    errors = []
    for fn in filenames:
        try:
            return Path(hf_hub_download(str(name_or_path), fn, subfolder=subfolder, revision=revision,
                                        cache_dir=cache_dir))
        except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
            errors.append(f"{fn}: {type(e).__name__}")
    if required:
        where = f"{name_or_path}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        raise CheckpointError(f"could not resolve any of {filenames} for Hub repo {where}: {'; '.join(errors)}. "
                              "Offline? Populate the Hugging Face cache first or pass a local folder/file.")
    return None


# ---------------------------------------------------------------------------------------------- config


def read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read config {path}: {e}") from e


def config_from_dict(cls, d: dict, *, source="config", neutral=None, strict=False):
    """Build the frozen dataclass `cls` from the fields of `d` it knows; the other keys are checked or warned about.

    Keys starting with '_' (e.g. diffusers' `_class_name`) are metadata and ignored silently. Any other key is an
    option of the reference library that we do not implement: one in `neutral` ({key: value}) must hold the value
    at which it changes nothing, and with `strict` every other must be off (None, False or 0), else
    CheckpointError, so an unsupported checkpoint fails loudly instead of loading into the wrong network;
    without `strict` the rest are ignored with a warning. Lists become tuples where the dataclass field is a
    tuple, so the config stays hashable and frozen.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    neutral, unknown = neutral or {}, []
    for key, value in d.items():
        if key in names or key.startswith("_"):
            continue
        if key not in neutral and not strict:
            unknown.append(key)
            continue
        allowed = [neutral[key]] if key in neutral else [None, False, 0]
        if any(v not in allowed for v in (value if isinstance(value, (list, tuple)) else [value])):
            only = " or ".join(map(repr, allowed))
            raise CheckpointError(f"{source}: {key}={value!r} is not supported (only {only})")
    if unknown:
        warnings.warn(f"{source}: ignoring keys unknown to {cls.__name__}: {sorted(unknown)}", stacklevel=2)
    kwargs = {k: v for k, v in d.items() if k in names}
    for k, v in kwargs.items():
        if isinstance(v, list) and "tuple" in str(hints[k]).lower():
            kwargs[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    return cls(**kwargs)


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
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning/CompVis .ckpt wrap the weights one level down
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat {{name: tensor}} state dict")
    return obj


def strip_prefix(state: dict, prefix: str) -> dict:
    """If keys start with `prefix` (e.g. 'first_stage_model.' in a whole SD file), keep only those, without the
    prefix; else `state` as it is."""
    if not any(k.startswith(prefix) for k in state):
        return state
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def check_state_dict(model: torch.nn.Module, state: dict, *, source="state dict", limit=5):
    """Raise CheckpointError if `state` does not load strictly into `model`, listing (up to `limit` of each)
    the missing keys, unexpected keys and shape mismatches."""
    expected = model.state_dict()
    sections = {
        "missing keys": [k for k in expected if k not in state],
        "unexpected keys": [k for k in state if k not in expected],
        "shape mismatches": [f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
                             for k, v in expected.items() if k in state and state[k].shape != v.shape],
    }
    report = "".join(f"\n  {title} ({len(items)}): " + ", ".join(items[:limit])
                     + (f" ... (+{len(items) - limit} more)" if len(items) > limit else "")
                     for title, items in sections.items() if items)
    if report:
        raise CheckpointError(f"checkpoint {source} does not match {type(model).__name__}:{report}")


DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def load_diffusers(cls, read_config, convert, name_or_path, *, config=None, dtype=None, device=None, **where):
    """A diffusers model (VAE, UNet) from a Hub repo id or folder (config.json + weights; `where`: subfolder,
    revision, cache_dir) or a single weights file, which carries no config: `config` (default: the defaults)
    describes it; given, it also replaces a folder's config.json. `read_config(dict, source=)` builds the
    config, `convert(state, config)` renames other key layouts to ours."""
    weights = resolve_file(name_or_path, DIFFUSERS_WEIGHTS, **where)
    if config is None and Path(os.fspath(name_or_path)).expanduser().is_file():
        config = read_config({}, source=str(weights))
    if config is None:
        config_path = resolve_file(name_or_path, ["config.json"], **where)
        config = read_config(read_json(config_path), source=str(config_path))
    state = convert(load_state_dict_file(weights), config)
    return load_model(cls, config, state, source=weights, dtype=dtype, device=device)


def load_model(cls, config, state: dict, *, source="state dict", dtype=None, device=None):
    """Build `cls(config)` without allocating weights and assign `state` into it, strictly.

    Models must keep no non-persistent buffers (anything computed must be computed in forward), so that every
    tensor of the model comes from the checkpoint.
    """
    with torch.device("meta"):
        model = cls(config)
    check_state_dict(model, state, source=source)
    model.load_state_dict(state, strict=True, assign=True)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise CheckpointError(f"{cls.__name__}.{name} was not set by checkpoint {source}")
    return model.to(device=device, dtype=dtype or torch.float32).eval()


# ---------------------------------------------------------------------------------------------- saving


@contextlib.contextmanager
def atomic_path(path):
    """`with atomic_path(p) as tmp: write(tmp)`: the file (or a new folder) is written as `.NAME.tmp` beside `p`
    and renamed over it only when the block succeeds, so `p` is the old file or the complete new one, never
    half (a kill leaves the `.tmp`, which checkpoint.clean removes; an error removes it at once)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def save_file_atomic(tensors: dict, path, metadata: dict | None = None):
    """A safetensors file written through `atomic_path` and flushed to disk before the rename: a full disk
    or a kill leaves the previous file untouched."""
    with atomic_path(path) as tmp:
        _save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                          metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())


def write_json_atomic(obj, path):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=list) + "\n", encoding="utf-8")


def write_csv_atomic(path, rows: list[dict], fieldnames=None):
    """A CSV with a header (`fieldnames`, default the first row's keys) and one line per row, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(fieldnames or rows[0]))
        w.writeheader()
        w.writerows(rows)


def save_pretrained(model: torch.nn.Module, folder, *, weights_name=DIFFUSERS_WEIGHTS[0]):
    """Save `model.config` + weights in the diffusers folder layout (loadable by our from_pretrained)."""
    config = dataclasses.asdict(model.config) | {"_class_name": type(model).__name__}
    write_json_atomic(config, Path(folder) / "config.json")
    save_file_atomic(model.state_dict(), Path(folder) / weights_name)
