"""Shared test/bench helpers: reference-library import shim, an offline Hugging Face cache, shared data.

Nothing here is used by project code.
"""

from __future__ import annotations

import hashlib
import importlib.util
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
