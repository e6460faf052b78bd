"""Shared test/bench helpers: reference-library import shim, an offline Hugging Face cache, shared data.

Nothing here is used by project code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import os
import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
HEAVY_LOCK = "/tmp/dino-diffusion-heavy.lock"


def patch_torchvision():
    """Make `import torchvision` work when its compiled ops cannot load.

    The PyPI torchvision wheel is a CUDA build; on a CPU-only torch its `_C` extension fails to load, and
    torchvision then crashes at import while registering fake kernels for `torchvision::nms`/`qnms`. Defining
    those two op schemas (no kernels) is enough for the pure-Python parts the references use (models,
    transforms). A no-op where the extension loads.
    """
    if getattr(patch_torchvision, "done", False):
        return
    patch_torchvision.done = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.submodule_search_locations is None:
        return
    folder = Path(list(spec.submodule_search_locations)[0])
    libs = sorted(folder.glob("_C*.so")) + sorted(folder.glob("_C*.pyd"))
    try:
        if libs:
            torch.ops.load_library(str(libs[0]))
            return
    except (OSError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    patch_torchvision.lib = lib  # keep the library object alive


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


class HFCache:
    """A Hugging Face Hub cache folder written by hand in the exact on-disk layout of `hf_hub_download`:

        <cache>/models--org--name/refs/main              -> commit hash
        <cache>/models--org--name/snapshots/<hash>/<file>

    With HF_HUB_OFFLINE=1 `hf_hub_download(repo_id, filename)` resolves files from here and never touches
    the network.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def snapshot(self, repo_id: str, revision: str = "main") -> Path:
        repo_dir = self.root / ("models--" + repo_id.replace("/", "--"))
        commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / revision).write_text(commit)
        snap = repo_dir / "snapshots" / commit
        snap.mkdir(parents=True, exist_ok=True)
        return snap

    def add_folder(self, repo_id: str, folder: Path, revision: str = "main") -> Path:
        """Copy a local folder (e.g. written by diffusers' save_pretrained) into the repo's snapshot."""
        snap = self.snapshot(repo_id, revision)
        shutil.copytree(folder, snap, dirs_exist_ok=True)
        return snap


def heavy_lock():
    """A file lock serialising memory-heavy (full-size) tests across concurrent pytest processes."""
    import fcntl

    f = open(HEAVY_LOCK, "w")  # noqa: SIM115
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------------------------ test-only API
# Functions the project once carried but no script uses; the tests that prove them keep them here.


def snr(scheduler, timesteps) -> torch.Tensor:
    return scheduler.snr(timesteps)


def save_scheduler_config(scheduler, folder) -> Path:
    """Write `folder/scheduler_config.json` as diffusers does, with `_class_name` (was NoiseScheduler.save_config)."""
    import hub

    path = Path(folder) / "scheduler_config.json"
    hub.write_json_atomic({"_class_name": type(scheduler).__name__, **dataclasses.asdict(scheduler.config)}, path)
    return path



def vae_to_ldm(state: dict, config, prefix: str = "first_stage_model.") -> dict:
    """Our VAE state dict -> CompVis/LDM layout (attention projections as 1x1 convs), as in SD single files
    (was vae.convert.to_ldm)."""
    from vae import convert

    names = convert.ldm_key_map(config)
    conv = lambda k, v: v[:, :, None, None] if convert.is_attention_linear_weight(k) else v  # noqa: E731
    return {prefix + names[k]: conv(k, v) for k, v in state.items()}


def vae_attention_with_probs(attn, x: torch.Tensor):
    """The VAE mid-block attention computed explicitly: (out [B, C, H, W], probs [B, HW, HW] in float32),
    softmax statistics in float32 (was vae Attention.forward(x, return_probs=True))."""
    b, c, h, w = x.shape
    t = attn.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
    q, k, v = attn.to_q(t), attn.to_k(t), attn.to_v(t)
    probs = ((q.float() @ k.float().transpose(-1, -2)) * c**-0.5).softmax(dim=-1)  # [B, HW, HW]
    out = x + attn.to_out[0](probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, c, h, w)
    return out, probs


def gaussian_nll(posterior, sample: torch.Tensor, dims=(1, 2, 3)) -> torch.Tensor:
    """Negative log-likelihood of `sample` under a vae DiagonalGaussian, summed over `dims` (was its .nll)."""
    squared = (sample - posterior.mean).pow(2) / posterior.var
    return 0.5 * torch.sum(math.log(2.0 * math.pi) + posterior.logvar + squared, dim=dims)


def unet_to_ldm(state: dict, config) -> dict:
    """Our (diffusers) UNet key names -> CompVis names, without the `model.diffusion_model.` prefix: the inverse
    of unet.convert.to_diffusers (was unet.convert.diffusers_to_ldm)."""
    from unet.convert import RESNET_RENAMES, module_map, rename_modules

    table = {new: (ldm, is_resnet) for ldm, new, is_resnet in module_map(config)}
    return rename_modules(state, table, {ours: ldm for ldm, ours in RESNET_RENAMES.items()})


class _Parsed(Exception):
    pass


def parser_of(parse_args):
    """The argparse parser a script's `parse_args(argv)` builds (stopped before it parses anything)."""
    import argparse
    from unittest import mock

    seen = {}

    def grab(self, *args, **kwargs):
        seen["parser"] = self
        raise _Parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab):
        try:
            parse_args([])
        except _Parsed:
            pass
    return seen["parser"]


def help_gaps(parse_args) -> list[str]:
    """Flags whose --help entry lacks a real sentence, or (unless required or a switch) its default."""
    parser = parser_of(parse_args)
    gaps = []
    for action in parser._actions:
        if "-h" in action.option_strings or not action.option_strings:
            continue
        flag = action.option_strings[-1]
        text = parser._get_formatter()._expand_help(action) if action.help else ""
        if len(text.split()) < 3:
            gaps.append(f"{flag}: no help sentence")
        elif action.nargs != 0 and not action.required and "default" not in text:
            gaps.append(f"{flag}: help does not show the default")
    return gaps
