"""Training checkpoints: safetensors only, written atomically, enough state to resume exactly.

A checkpoint at step k is three files in `run/checkpoints/`:
    step_{k:07d}.state.safetensors   optimizer tensors, GradScaler, RNG states; JSON metadata (step,
                                      optimizer hyper-parameters, data position, anything non-tensor)
    step_{k:07d}.ema.safetensors     EMA weights of the UNet (if EMA is on)
    step_{k:07d}.safetensors         the UNet weights, plain `UNet2DConditionModel` keys
The weights file is written last, so its presence marks a complete checkpoint: a run killed while writing
leaves the previous checkpoint intact (each file is itself written to a temporary name and renamed).
Nothing is pickled: nested optimizer state is flattened to `optim.state.{param}.{name}` tensors plus JSON.
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


def _flatten_optimizer(state_dict: dict) -> tuple[dict, dict]:
    tensors, meta = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for pid, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.state.{pid}.{name}"] = value
            else:
                meta["state"].setdefault(str(pid), {})[name] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim.state."):
            pid, name = key[len("optim.state.") :].split(".", 1)
            state.setdefault(int(pid), {})[name] = value
    for pid, entries in meta["state"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def paths(run_dir, step: int) -> dict[str, Path]:
    base = Path(run_dir) / "checkpoints" / f"step_{step:07d}"
    return {
        "weights": Path(f"{base}.safetensors"),
        "ema": Path(f"{base}.ema.safetensors"),
        "state": Path(f"{base}.state.safetensors"),
    }


def save(run_dir, step: int, *, model_state: dict, ema_state: dict | None, optimizer, scaler=None,
         rng: dict[str, torch.Tensor] | None = None, extra: dict | None = None, config: dict | None = None):
    """Write step `step`'s files, all or none: if any write fails (a full disk, a kill), the files of this
    step already written are removed and the error names the file that failed."""
    p = paths(run_dir, step)
    try:
        _save(p, step, model_state, ema_state, optimizer, scaler, rng, extra, config)
    except BaseException as e:
        failed = next((f for f in (p["state"], p["ema"], p["weights"]) if not f.is_file()), p["weights"])
        for f in p.values():
            f.unlink(missing_ok=True)
        if isinstance(e, Exception):
            raise OSError(f"cannot write checkpoint {failed} (step {step} not saved; earlier checkpoints are "
                          f"intact): {e}") from e
        raise


def _save(p, step, model_state, ema_state, optimizer, scaler, rng, extra, config):
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors = dict(opt_tensors)
    for name, t in (rng or {}).items():
        tensors[f"rng.{name}"] = t
    meta = {"step": step, "optimizer": opt_meta, "extra": extra or {}}
    if scaler is not None and scaler.is_enabled():
        meta["scaler"] = {k: v for k, v in scaler.state_dict().items() if not isinstance(v, torch.Tensor)}
    hub.save_file_atomic(tensors, p["state"], metadata={"json": json.dumps(meta, default=float)})
    weights_meta = {"step": str(step), "config": json.dumps(config or {})}
    if ema_state is not None:
        hub.save_file_atomic(ema_state, p["ema"], metadata=weights_meta)
    hub.save_file_atomic(model_state, p["weights"], metadata=weights_meta)


def load_state(path) -> tuple[dict, dict]:
    """Read a `.state.safetensors` file -> (tensors, metadata dict)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["json"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001
        raise hub.CheckpointError(f"cannot read training state {path}: {e}") from e
    return tensors, meta


def restore(path, *, optimizer, scaler=None) -> tuple[dict, dict]:
    """Load optimizer (and scaler) state in place; returns (rng tensors, metadata)."""
    tensors, meta = load_state(path)
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    if scaler is not None and "scaler" in meta:
        scaler.load_state_dict(meta["scaler"])
    rng = {k[len("rng.") :]: v for k, v in tensors.items() if k.startswith("rng.")}
    return rng, meta


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
    removed = [p for folder in (run_dir, run_dir / "checkpoints", run_dir / "cache")
               for p in (folder.glob(".*tmp*") if folder.is_dir() else [])]
    folder = run_dir / "checkpoints"
    for p in folder.glob("step_*.safetensors") if folder.is_dir() else []:
        m = re.match(r"^step_(\d+)\.(state|ema)\.safetensors$", p.name)
        if m and not paths(run_dir, int(m.group(1)))["weights"].is_file():
            removed.append(p)
    for p in removed:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return removed


def set_aside(path) -> Path:
    """Move an unreadable checkpoint file out of the way (kept, renamed `*.unreadable`)."""
    path = Path(path)
    target = path.with_name(path.name + ".unreadable")
    os.replace(path, target)
    return target


def prune(run_dir, keep_last: int):
    """Delete all but the newest `keep_last` checkpoints (0 keeps everything)."""
    if keep_last <= 0:
        return
    for step in complete_steps(run_dir)[:-keep_last]:
        for p in paths(run_dir, step).values():
            p.unlink(missing_ok=True)


def load_newest(out: Path, model, ema, optimizer, scaler) -> tuple[int, dict]:
    """Load the newest checkpoint that reads completely into the models (unreadable newer ones are set aside
    with a warning naming them). Returns (step, its metadata); (0, {}) when there is none."""
    for step in reversed(complete_steps(out)):
        p = paths(out, step)
        try:
            state = hub.load_state_dict_file(p["weights"])
            hub.check_state_dict(model, state, source=str(p["weights"]))
            ema_state = hub.load_state_dict_file(p["ema"]) if ema is not None else None
            _, meta = restore(p["state"], optimizer=optimizer, scaler=scaler)
        except (hub.CheckpointError, OSError, ValueError) as e:
            for f in p.values():
                with contextlib.suppress(FileNotFoundError):  # absent, or set aside by another DDP rank
                    set_aside(f)
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

    def line_step(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return float("inf")

    path = out / "metrics.jsonl"
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line_step(line) <= step]
        with hub.atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in keep))
