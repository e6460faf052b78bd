"""hub.py: resolution (file / folder / offline repo id), strict loading errors, atomic saves."""

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import hub


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    width: int = 4
    sizes: tuple = (1, 2)


class Tiny(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.width, config.width)


def test_config_from_dict_warns_on_unknown_and_makes_tuples():
    with pytest.warns(UserWarning, match="bogus"):
        c = hub.config_from_dict(TinyConfig, {"width": 3, "sizes": [4, 5], "bogus": 1, "_class_name": "x"})
    assert c == TinyConfig(3, (4, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hub.config_from_dict(TinyConfig, {"_diffusers_version": "0.1"})


def test_save_and_load_folder_file_and_repo(tmp_path, hf_cache):
    m = Tiny(TinyConfig())
    hub.save_pretrained(m, tmp_path / "m")
    state = hub.load_state_dict_file(tmp_path / "m" / "diffusion_pytorch_model.safetensors")
    loaded = hub.load_model(Tiny, TinyConfig(), state, source="x")
    assert torch.equal(loaded.proj.weight, m.proj.weight)
    name = "diffusion_pytorch_model.safetensors"
    assert hub.resolve_file(tmp_path / "m", [name]).name == name
    assert hub.resolve_file(tmp_path / "m" / name, [name]).name == name
    hf_cache.add_folder("org/tiny", tmp_path / "m")
    p = hub.resolve_file("org/tiny", ["missing.safetensors", name])
    assert p.name == name and p.is_file()
    with pytest.raises(hub.CheckpointError, match="org/nothing"):
        hub.resolve_file("org/nothing", [name])


def test_strict_loading_reports_missing_unexpected_and_shapes():
    state = {"proj.weight": torch.zeros(3, 4), "extra.bias": torch.zeros(1)}
    with pytest.raises(hub.CheckpointError) as e:
        hub.load_model(Tiny, TinyConfig(), state, source="bad.safetensors")
    msg = str(e.value)
    assert "bad.safetensors" in msg and "missing keys (1): proj.bias" in msg
    assert "unexpected keys (1): extra.bias" in msg and "proj.weight: checkpoint [3, 4] vs model [4, 4]" in msg


def test_bin_files_are_read_weights_only(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "ok.bin")
    assert torch.equal(hub.load_state_dict_file(tmp_path / "ok.bin")["a"], torch.ones(2))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"a": Evil()}, tmp_path / "evil.bin", _use_new_zipfile_serialization=True)
    with pytest.raises(hub.CheckpointError, match="evil.bin"):
        hub.load_state_dict_file(tmp_path / "evil.bin")


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ck.safetensors"
    hub.save_file_atomic({"a": torch.ones(2)}, path)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hub, "_save_safetensors", full_disk)
    with pytest.raises(OSError):
        hub.save_file_atomic({"a": torch.zeros(2)}, path)
    assert torch.equal(hub.load_state_dict_file(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]
