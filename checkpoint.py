"""Training checkpoints: safetensors only, written atomically, enough state to resume exactly.

A checkpoint at step k is three files in `run/checkpoints/`:
    step_{k:07d}.state.safetensors   optimizer tensors; JSON metadata (step, optimizer hyper-parameters,
                                      GradScaler, data position, anything non-tensor)
    step_{k:07d}.ema.safetensors     EMA weights of the UNet (if EMA is on)
    step_{k:07d}.safetensors         the UNet weights, plain `UNet2DConditionModel` keys
The weights file is written last, so its presence marks a complete checkpoint: a run killed while writing
leaves the previous checkpoint intact (each file is itself written to a temporary name and renamed).
Nothing is pickled: nested optimizer state is flattened to `optim.state.{param}.{name}` tensors plus JSON.
No RNG state is needed: every random draw of a run comes from a generator keyed by (seed, step, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

import hub

STEP_RE = re.compile(r"^step_(\d+)\.safetensors$")  # weights only, not .ema/.state


def paths(run_dir, step: int) -> dict[str, Path]:
    base = Path(run_dir) / "checkpoints" / f"step_{step:07d}"
    return {"weights": Path(f"{base}.safetensors"), "ema": Path(f"{base}.ema.safetensors"),
            "state": Path(f"{base}.state.safetensors")}


def unet_file(run_dir, step: int, ema: bool = True) -> Path:
    """The UNet weights to sample from at `step`: its EMA file when `ema` and present, else the raw weights."""
    p = paths(run_dir, step)
    return p["ema"] if ema and p["ema"].is_file() else p["weights"]


def save(run_dir, step: int, *, model_state: dict, ema_state: dict | None, optimizer, scaler=None,
         extra: dict | None = None):
    """Write step `step`'s files (state, EMA, then weights), all or none: if any write fails (a full disk, a
    kill), the files of this step already written are removed and the error names the file that failed."""
    p = paths(run_dir, step)
    optim = optimizer.state_dict()
    tensors = {f"optim.state.{pid}.{name}": v for pid, entries in optim["state"].items()
               for name, v in entries.items() if isinstance(v, torch.Tensor)}
    others = {str(pid): {name: v for name, v in entries.items() if not isinstance(v, torch.Tensor)}
              for pid, entries in optim["state"].items()}
    meta = {"step": step, "optimizer": {"param_groups": optim["param_groups"], "state": others}, "extra": extra or {}}
    if scaler is not None and scaler.is_enabled():
        meta["scaler"] = {k: v for k, v in scaler.state_dict().items() if not isinstance(v, torch.Tensor)}
    try:
        hub.save_file_atomic(tensors, p["state"], metadata={"json": json.dumps(meta, default=float)})
        if ema_state is not None:
            hub.save_file_atomic(ema_state, p["ema"])
        hub.save_file_atomic(model_state, p["weights"])
    except BaseException as e:
        failed = next((f for f in (p["state"], p["ema"], p["weights"]) if not f.is_file()), p["weights"])
        for f in p.values():
            f.unlink(missing_ok=True)
        if isinstance(e, Exception):
            raise OSError(f"cannot write checkpoint {failed} (step {step} not saved; earlier checkpoints are "
                          f"intact): {e}") from e
        raise


def restore(path, *, optimizer, scaler=None) -> dict:
    """Load a `.state.safetensors` file's optimizer (and scaler) state in place; returns its metadata."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["json"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001
        raise hub.CheckpointError(f"cannot read training state {path}: {e}") from e
    state = {int(pid): dict(entries) for pid, entries in meta["optimizer"]["state"].items()}
    for key, value in tensors.items():
        pid, name = key.removeprefix("optim.state.").split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    if scaler is not None and "scaler" in meta:
        scaler.load_state_dict(meta["scaler"])
    return meta


def weight_steps(run_dir) -> list[int]:
    """Steps that have a UNet weights file (enough for sampling), oldest first."""
    folder = Path(run_dir) / "checkpoints"
    return sorted(int(m.group(1)) for p in folder.glob("step_*.safetensors") if (m := STEP_RE.match(p.name)))


def complete_steps(run_dir) -> list[int]:
    """Steps whose weights and state files both exist (resumable checkpoints), oldest first."""
    return [step for step in weight_steps(run_dir) if paths(run_dir, step)["state"].is_file()]


def clean(run_dir) -> list[Path]:
    """Remove what killed writes leave behind: temporary files (`.step_*.tmp`, `.config.json.tmp`,
    half-written model folders `.vae.tmp`) and the state/EMA files of a step whose weights file, written
    last, never landed. Returns what was removed."""
    run_dir = Path(run_dir)
    removed = [p for folder in (run_dir, run_dir / "checkpoints", run_dir / "cache") for p in folder.glob(".*tmp*")]
    removed += [p for p in (run_dir / "checkpoints").glob("step_*.*.safetensors")
                if (m := re.match(r"^step_(\d+)\.(state|ema)\.safetensors$", p.name))
                and not paths(run_dir, int(m.group(1)))["weights"].is_file()]
    for p in removed:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return removed


def prune(run_dir, keep_last: int):
    """Delete all but the newest `keep_last` checkpoints (0 keeps everything)."""
    for step in complete_steps(run_dir)[:-keep_last] if keep_last > 0 else []:
        for p in paths(run_dir, step).values():
            p.unlink(missing_ok=True)


def load_newest(out: Path, model, ema, optimizer, scaler) -> tuple[int, dict]:
    """Load the newest checkpoint that reads completely into the models (unreadable newer ones are set aside
    as `*.unreadable`, with a warning naming them). Returns (step, its metadata); (0, {}) when there is none."""
    for step in reversed(complete_steps(out)):
        p = paths(out, step)
        try:
            state = hub.load_state_dict_file(p["weights"])
            hub.check_state_dict(model, state, source=str(p["weights"]))
            ema_state = hub.load_state_dict_file(p["ema"]) if ema is not None else None
            meta = restore(p["state"], optimizer=optimizer, scaler=scaler)
        except (hub.CheckpointError, OSError, ValueError) as e:
            for f in p.values():
                with contextlib.suppress(FileNotFoundError):  # absent, or set aside by another DDP rank
                    os.replace(f, f.with_name(f.name + ".unreadable"))
            warnings.warn(f"checkpoint step {step} is unreadable ({str(e).splitlines()[0]}); set aside as "
                          f"*.unreadable, falling back to an older one", stacklevel=2)
            continue
        model.load_state_dict(state)
        if ema is not None:
            ema.load_state_dict({k: v.to(ema.state_dict()[k].dtype) for k, v in ema_state.items()})
        return step, meta
    return 0, {}


def truncate_metrics(out: Path, step: int):
    """Keep the metrics of steps <= `step` (a resume re-logs the steps after its checkpoint); a line torn by a
    kill mid-write is dropped."""
    path, keep = out / "metrics.jsonl", []
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):  # a torn line
            if json.loads(line)["step"] <= step:
                keep.append(line)
    with hub.atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))
