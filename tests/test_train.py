"""train.py: learning, exact resume, DDP == one process, safe checkpoints, NaN guard, bad data."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import hub
import train
from data.loader import split_data, write_image_list
from tests.helpers import REPO
from tests.support_train import parse_args

# A micro configuration of the tiny preset so that each run takes seconds on 2 CPU cores.
MICRO = [
    "--preset", "tiny", "--image-size", "32", "--phantom-count", "32", "--val-count", "4", "--fid-count", "4",
    "--batch-size", "4", "--sample-steps", "2", "--vae-fit-steps", "2", "--log-every", "1",
    "--vae-config", '{"block_out_channels": [16, 16], "layers_per_block": 1, "norm_num_groups": 8}',
    "--unet-config", json.dumps({
        "sample_size": 16, "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 16,
        "attention_head_dim": 2}),
    "--dino-config", json.dumps({"image_size": 32, "patch_size": 8, "hidden_size": 16, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "intermediate_size": 32, "num_register_tokens": 1}),
]


def run(out, *extra):
    train.main([*MICRO, "--out", str(out), *extra])


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def weights(out, step):
    return hub.load_state_dict_file(checkpoint.paths(out, step)["weights"])


def test_help_lists_every_field():
    p = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0
    for f in train.TrainConfig.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in p.stdout, f


def test_tiny_run_learns_and_writes_run_dir(tmp_path):
    out = tmp_path / "run"
    run(out, "--max-steps", "40", "--lr", "3e-3", "--save-every", "20", "--warmup-steps", "5")
    ls = losses(out)
    assert np.mean(ls[-8:]) < 0.7 * np.mean(ls[:3]), ls
    assert checkpoint.complete_steps(out) == [20, 40]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["max_steps"] == 40 and "unet_config_resolved" in cfg
    assert (out / "samples" / "step_0000040.png").is_file()
    assert any("fid" in json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines())
    assert set(weights(out, 40)) == set(hub.load_state_dict_file(checkpoint.paths(out, 40)["ema"]))


def test_resume_equals_uninterrupted(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run(full, "--max-steps", "6", "--save-every", "3")
    run(part, "--max-steps", "3", "--save-every", "3")
    run(part, "--max-steps", "6", "--save-every", "3", "--resume")
    assert losses(part) == pytest.approx(losses(full), abs=1e-6)
    a, b = weights(full, 6), weights(part, 6)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(out, "--max-steps", "2", "--save-every", "2")
    calls = {"n": 0}
    real = hub._save_safetensors

    def dies_on_weights(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:  # state, ema, then weights of step 4: killed mid-write
            raise KeyboardInterrupt("killed")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(hub, "_save_safetensors", dies_on_weights)
    with pytest.raises(KeyboardInterrupt):
        run(out, "--max-steps", "4", "--save-every", "4", "--resume")
    assert checkpoint.complete_steps(out) == [2]
    assert not list((out / "checkpoints").glob("*.tmp"))
    monkeypatch.setattr(hub, "_save_safetensors", real)
    run(out, "--max-steps", "4", "--save-every", "4", "--resume")
    assert checkpoint.complete_steps(out)[-1] == 4


def test_nan_loss_stops_without_saving(tmp_path, monkeypatch):
    out = tmp_path / "run"
    import unet.model as unet_module

    real_forward = unet_module.UNet2DConditionModel.forward

    def nan_after_two(self, sample, timestep, encoder_hidden_states, **kw):
        y = real_forward(self, sample, timestep, encoder_hidden_states, **kw)
        nan_after_two.calls += 1
        return y * float("nan") if nan_after_two.calls > 2 else y

    nan_after_two.calls = 0
    monkeypatch.setattr(unet_module.UNet2DConditionModel, "forward", nan_after_two)
    with pytest.raises(SystemExit, match="non-finite loss at step 3.*newest checkpoint, step 2 .*finite-loss check"):
        run(out, "--max-steps", "5", "--save-every", "2")
    assert checkpoint.complete_steps(out) == [2]


def test_corrupt_image_is_skipped(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    from data.phantom import make_phantom

    for i in range(12):
        Image.fromarray(make_phantom(i, 32)[0]).save(data / f"img{i:02d}.png")
    (data / "img99.png").write_bytes(b"not a png at all")
    with pytest.warns(UserWarning, match="dropping held-out image.*img99.png"):
        run(tmp_path / "run", "--data", str(data), "--max-steps", "2", "--val-count", "3", "--fid-count", "3")
    assert checkpoint.complete_steps(tmp_path / "run") == [2]
    held = [os.path.basename(r) for r in (tmp_path / "run" / "val.csv").read_text().splitlines()[1:]]
    assert held == ["img10.png", "img11.png"]  # the unreadable one dropped, not replaced by a training image


def test_empty_data_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no PNG/JPEG/DICOM images found in .*empty"):
        run(tmp_path / "run", "--data", str(tmp_path / "empty"), "--max-steps", "1")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path):
    """2 gloo ranks x batch 2 == 1 process x batch 4 (same samples, noise and timesteps by construction)."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = [*MICRO, "--max-steps", "3", "--save-every", "3", "--augment"]
    run(one, "--max-steps", "3", "--save-every", "3", "--batch-size", "4")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), "train.py", *common, "--batch-size", "2", "--out", str(two)]
    # the frozen VAE/ViT must be identical: reuse the single-process run's (its fit is data-order independent)
    two.mkdir()
    for sub in ("vae", "dino"):
        (two / sub).symlink_to(one / sub, target_is_directory=True)
    p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = weights(one, 3), weights(two, 3)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-5, diff  # tolerance: float reduction order of the all-reduce vs one batch
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)


def test_rejects_mismatched_dino_width(tmp_path):
    with pytest.raises(ValueError, match="cross_attention_dim"):
        run(tmp_path / "run", "--max-steps", "1", "--dino-config", json.dumps(
            {"image_size": 32, "patch_size": 8, "hidden_size": 24, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 32}))


def test_checkpoint_optimizer_state_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    checkpoint.save(tmp_path, 1, model_state=model.state_dict(), ema_state=None, optimizer=opt)
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=5.0)
    checkpoint.restore(checkpoint.paths(tmp_path, 1)["state"], optimizer=opt2)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["lr"] == 1e-3
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][k][name]))


def test_val_group_holds_out_whole_patients(tmp_path):
    from data.phantom import make_phantom

    (tmp_path / "img").mkdir()
    patients = ["p0"] * 3 + ["p1"] * 3 + ["p2"] * 2 + ["p3"] * 2 + ["p4"] * 2
    lines = ["image,patient_id"]
    for i, pid in enumerate(patients):
        Image.fromarray(make_phantom(i, 32)[0]).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,{pid}")
    (tmp_path / "index.csv").write_text("\n".join(lines) + "\n")
    cfg = parse_args([*MICRO, "--data", str(tmp_path / "index.csv"), "--val-group", "patient_id",
                            "--val-count", "3"])
    tr, va = split_data(cfg, 0, 1)
    held = set(va.columns["patient_id"])
    assert held == {"p3", "p4"} and len(va) == 4 and len(tr) == 8  # last groups until >= 3 images
    assert not held & set(tr.columns["patient_id"])
    write_image_list(va, tmp_path / "val.csv")
    rows = (tmp_path / "val.csv").read_text().splitlines()
    assert rows[0] == "path" and [os.path.basename(r) for r in rows[1:]] == ["8.png", "9.png", "10.png", "11.png"]
    assert all(os.path.isabs(r) and os.path.isfile(r) for r in rows[1:])
    bad = parse_args([*MICRO, "--data", str(tmp_path / "index.csv"), "--val-group", "site"])
    with pytest.raises(ValueError, match="--val-group 'site'"):
        split_data(bad, 0, 1)
