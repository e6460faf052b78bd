"""train.py interrupted and rerun: kills while saving, unreadable checkpoints, leftovers, --resume flags, a full
disk, the NaN stop, the latent cache path, the held-out set and the run directory (issues 18.2-18.3, 19)."""

import errno
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import checkpoint
import cli
import hub
import train
import train_config
from data.loader import cache_path, split_data
from data.phantom import make_phantom
from eval.training import fid_extractor
from tests.helpers import REPO
from tests.support_train import parse_args
from tests.test_train import MICRO, run, weights


def cmd(out, *extra, timeout=120):
    """train.py in a subprocess: (exit status, stderr)."""
    p = subprocess.run([sys.executable, "train.py", *MICRO, "--out", str(out), *extra], cwd=REPO,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stderr


def one_line_error(rc, stderr, *words):
    last = stderr.strip().splitlines()[-1]
    assert rc != 0 and "Traceback" not in stderr, stderr[-2000:]
    assert last.startswith("train.py: error: ") and all(w in last for w in words), last
    return last


def steps_logged(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def images(folder, n, start=0):
    folder.mkdir()
    for i in range(start, start + n):
        Image.fromarray(make_phantom(i, 32)[0]).save(folder / f"img{i:02d}.png")
    return folder


# ---------------------------------------------------------------------------------------------- interruptions


@pytest.mark.parametrize("model", ["vae", "dino"])
def test_kill_while_saving_a_model_folder_then_resume_starts_the_run(tmp_path, monkeypatch, model):
    out, real = tmp_path / "run", hub._save_safetensors

    def killed(tensors, path, metadata=None):
        if f".{model}.tmp" in str(path):
            raise KeyboardInterrupt("killed")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(hub, "_save_safetensors", killed)
    with pytest.raises(KeyboardInterrupt):
        run(out, "--max-steps", "2")
    assert (out / "config.json").is_file() and not (out / model).exists() and not checkpoint.weight_steps(out)
    monkeypatch.setattr(hub, "_save_safetensors", real)
    run(out, "--max-steps", "2", "--resume")
    assert checkpoint.complete_steps(out) == [2] and (out / model / "config.json").is_file()
    assert not list(out.glob(".*tmp*"))


def test_full_disk_while_saving_the_vae_names_it(tmp_path, monkeypatch):
    out, real = tmp_path / "run", hub._save_safetensors

    def full(tensors, path, metadata=None):
        if ".vae.tmp" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(hub, "_save_safetensors", full)
    with pytest.raises(SystemExit, match=f"error: cannot write {out / 'vae'}: .*No space left on device"):
        cli.main_guard(train.main, [*MICRO, "--out", str(out), "--max-steps", "2"])
    assert not (out / "vae").exists() and not (out / ".vae.tmp").exists()


def test_unreadable_newest_checkpoint_falls_back_to_older(tmp_path):
    out = tmp_path / "run"
    run(out, "--max-steps", "6", "--save-every", "3")
    full = {k: v.clone() for k, v in weights(out, 6).items()}  # a copy: the file is mmapped
    newest = checkpoint.paths(out, 6)["weights"]
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match=r"checkpoint step 6 is unreadable.*step_0000006\.safetensors"):
        run(out, "--max-steps", "6", "--save-every", "3", "--resume")
    assert checkpoint.complete_steps(out) == [3, 6] and newest.with_name(newest.name + ".unreadable").is_file()
    again = weights(out, 6)
    assert max((full[k] - again[k]).abs().max().item() for k in full) < 1e-6
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]


def test_leftovers_of_killed_writes_are_removed_at_start(tmp_path, capsys):
    out = tmp_path / "run"
    run(out, "--max-steps", "2", "--save-every", "2")
    leftovers = [out / "checkpoints" / ".step_0000004.safetensors.abc.tmp", out / ".config.json.tmp",
                 out / "checkpoints" / "step_0000004.state.safetensors"]  # the last: no weights file
    for p in leftovers:
        p.write_bytes(b"half")
    (out / ".vae.tmp").mkdir()
    (out / ".vae.tmp" / "config.json").write_text("{}")
    capsys.readouterr()
    run(out, "--max-steps", "4", "--save-every", "2", "--resume")
    err = capsys.readouterr().err
    assert all(f"removed {p}, left by an interrupted write" in err for p in [*leftovers, out / ".vae.tmp"]), err
    assert not list(out.glob(".*tmp*")) and not list((out / "checkpoints").glob(".*tmp*"))
    assert checkpoint.complete_steps(out) == [2, 4]  # step 4 saved anew, state and weights together


def test_metrics_hold_each_step_once_after_resume(tmp_path):
    out = tmp_path / "run"
    run(out, "--max-steps", "4", "--save-every", "2")
    for p in checkpoint.paths(out, 4).values():  # killed after logging steps 3-4, before their checkpoint
        p.unlink(missing_ok=True)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.')  # killed mid-write
    run(out, "--max-steps", "6", "--save-every", "2", "--resume")
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]
    fids = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "fid" in x]
    assert fids == [6]


def test_resume_applies_safe_flags_and_refuses_others(tmp_path):
    out = tmp_path / "run"
    run(out, "--max-steps", "2", "--save-every", "2", "--warmup-steps", "0")
    run(out, "--resume", "--max-steps", "4", "--lr", "0.5", "--eval-every", "4", "--save-every", "4",
        "--log-every", "2", "--num-workers", "0")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r][-1] == 0.5 and checkpoint.complete_steps(out) == [2, 4]
    assert json.loads((out / "config.json").read_text())["lr"] == 0.5
    rc, err = cmd(out, "--resume", "--max-steps", "6", "--lr", "0.5", "--batch-size", "2", "--seed", "3")
    one_line_error(rc, err, "--batch-size 2 (run: 4)", "--seed 3 (run: 0)", "--max-steps")
    assert checkpoint.complete_steps(out) == [2, 4]


def test_full_disk_while_checkpointing_is_one_line_and_all_or_nothing(tmp_path, monkeypatch, capsys):
    out, real, calls = tmp_path / "run", hub._save_safetensors, []
    run(out, "--max-steps", "2", "--save-every", "2")
    before = {k: v.clone() for k, v in weights(out, 2).items()}

    def full_on_second(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the step's state file landed, its EMA file does not fit
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(hub, "_save_safetensors", full_on_second)
    with pytest.raises(SystemExit) as e:
        cli.main_guard(train.main, [*MICRO, "--out", str(out), "--max-steps", "4", "--save-every", "4", "--resume"])
    msg = str(e.value)
    assert "\n" not in msg and "step_0000004.ema.safetensors" in msg and "No space left on device" in msg, msg
    assert not list((out / "checkpoints").glob("*step_0000004*")) and checkpoint.complete_steps(out) == [2]
    after = weights(out, 2)
    assert all((before[k] == after[k]).all() for k in before)


def test_full_disk_while_writing_the_latent_cache_names_it(tmp_path, monkeypatch):
    out, real = tmp_path / "run", hub._save_safetensors

    def full(tensors, path, metadata=None):
        if "latents_" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(hub, "_save_safetensors", full)
    with pytest.raises(SystemExit, match=r"error: cannot write the latent cache .*latents_1\.safetensors: .*No space"):
        cli.main_guard(train.main, [*MICRO, "--out", str(out), "--max-steps", "2", "--cache-latents", "--no-augment"])
    assert not list((out / "cache").iterdir())


def test_nan_before_any_checkpoint_says_so(tmp_path, monkeypatch):
    import unet.model as unet_module

    real_forward = unet_module.UNet2DConditionModel.forward
    monkeypatch.setattr(unet_module.UNet2DConditionModel, "forward",
                        lambda self, *a, **kw: real_forward(self, *a, **kw) * float("nan"))
    with pytest.raises(SystemExit, match="non-finite loss at step 1; stopped without saving. No checkpoint was "
                                         "saved yet: rerun with a lower --lr"):
        run(tmp_path / "run", "--max-steps", "3", "--save-every", "2")
    assert not checkpoint.weight_steps(tmp_path / "run")


def test_infinite_gradient_with_finite_loss_stops_before_saving(tmp_path, monkeypatch):
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def inf_at_step_3(params, max_norm):
        calls.append(real(params, max_norm))
        return calls[-1] * float("inf") if len(calls) == 3 else calls[-1]

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", inf_at_step_3)
    with pytest.raises(SystemExit, match=r"non-finite gradient norm between step 3 and step 4; .*newest checkpoint, "
                                         r"step 2 .*step_0000002\.safetensors"):
        run(tmp_path / "run", "--max-steps", "6", "--save-every", "2", "--log-every", "2")
    assert checkpoint.complete_steps(tmp_path / "run") == [2]


def test_cache_path_comes_from_the_config(tmp_path):
    cfg = lambda copies, augment=True: SimpleNamespace(cache_copies=copies, augment=augment)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "latents_4.safetensors").write_bytes(b"")  # sorts after latents_10
    assert cache_path(tmp_path, cfg(10)) == tmp_path / "cache" / "latents_10.safetensors"
    assert cache_path(tmp_path, cfg(10, augment=False)).name == "latents_1.safetensors"


def test_resume_alone_continues_a_run_of_another_preset(tmp_path):
    saved = replace(train.PRESETS["small-real"], out=str(tmp_path), lr=1e-3)
    (tmp_path / "config.json").write_text(json.dumps(asdict(saved)))
    cfg, given = train.parse_flags(["--out", str(tmp_path), "--resume", "--lr", "2e-3"])
    resumed = train_config.resume_config(cfg, given, tmp_path)
    assert "preset" not in given and train_config._json(asdict(resumed)) == train_config._json(asdict(replace(saved, resume=True,
                                                                                                   lr=2e-3)))
    cfg, given = train.parse_flags(["--out", str(tmp_path), "--resume", "--preset", "tiny"])
    with pytest.raises(SystemExit, match=r"--preset tiny \(run: small-real\) differ"):
        train_config.resume_config(cfg, given, tmp_path)


# ---------------------------------------------------------------------------------------------- held-out set


def test_unreadable_held_out_csv_image_is_dropped_not_replaced(tmp_path):
    images(tmp_path / "img", 10)
    (tmp_path / "img" / "img10.png").write_bytes(b"not a png")
    rows = [f"img/img{i:02d}.png" for i in range(11)]
    (tmp_path / "index.csv").write_text("path\n" + "\n".join(rows[:8] + [rows[10], rows[8], rows[9]]) + "\n")
    out, argv = tmp_path / "run", ["--data", str(tmp_path / "index.csv"), "--val-count", "3", "--fid-count", "3"]
    with pytest.warns(UserWarning, match=r"dropping held-out image.*img10\.png"):
        tr, va = split_data(parse_args([*MICRO, *argv]), 0, 1)
    assert [os.path.basename(p) for p in va.paths] == ["img08.png", "img09.png"]
    assert not set(map(str, tr.paths)) & set(map(str, va.paths)) and len(tr) == 8
    with pytest.warns(UserWarning, match="img10.png"):
        run(out, *argv, "--max-steps", "1")
    held = [os.path.basename(r) for r in (out / "val.csv").read_text().splitlines()[1:]]
    assert held == ["img08.png", "img09.png"]
    (tmp_path / "img" / "img08.png").write_bytes(b"")
    (tmp_path / "img" / "img09.png").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none of the 3 held-out images is readable"):
        split_data(parse_args([*MICRO, *argv]), 0, 1)


def test_val_data_overlapping_data_is_refused(tmp_path):
    data = images(tmp_path / "data", 8)
    (tmp_path / "val.csv").write_text(f"path\n{data / 'img03.png'}\n{data / 'img07.png'}\n")
    with pytest.raises(SystemExit, match=r"error: --val-data .*share 2 image\(s\).*must not be trained on"):
        cli.main_guard(train.main, [*MICRO, "--out", str(tmp_path / "run"), "--data", str(data),
                                    "--val-data", str(tmp_path / "val.csv"), "--max-steps", "1"])


# ---------------------------------------------------------------------------------------------- run directory


def test_out_holding_a_run_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    run(out, "--max-steps", "4", "--save-every", "2")
    one_line_error(*cmd(out, "--max-steps", "4"), "--resume", "--overwrite", str(out))
    run(out, "--max-steps", "2", "--overwrite")
    assert checkpoint.complete_steps(out) == [2] and steps_logged(out) == [1, 2]


@pytest.mark.parametrize("flags", [["--batch-size", "-1"], ["--max-steps", "0"], ["--lr", "0"]])
def test_bad_numeric_flags_are_refused_at_parse_time(flags, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([*MICRO, *flags])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and flags[0] in err and "must be" in err, err


def test_bad_data_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(*cmd(tmp_path / "a", "--data", str(tmp_path / "empty")), "no PNG/JPEG/DICOM images", "empty")
    (tmp_path / "x.csv").write_text("file,label\na.png,1\n")
    one_line_error(*cmd(tmp_path / "b", "--data", str(tmp_path / "x.csv")), "x.csv", "path")


def test_rerun_after_a_failed_start(tmp_path, monkeypatch, capsys):
    out, real_loop = tmp_path / "run", train.train_loop

    def dies(*a, **kw):
        raise KeyboardInterrupt("killed before the first checkpoint")

    monkeypatch.setattr(train, "train_loop", dies)
    with pytest.raises(KeyboardInterrupt):
        run(out, "--max-steps", "2")
    vae_file = out / "vae" / "diffusion_pytorch_model.safetensors"
    stamp = vae_file.stat().st_mtime_ns
    monkeypatch.setattr(train, "train_loop", real_loop)
    run(out, "--max-steps", "2")  # same settings: continues (the fitted VAE is kept)
    assert vae_file.stat().st_mtime_ns == stamp and checkpoint.complete_steps(out) == [2]
    monkeypatch.setattr(train, "train_loop", dies)
    with pytest.raises(KeyboardInterrupt):
        run(out, "--max-steps", "2", "--overwrite", "--seed", "1")
    monkeypatch.setattr(train, "train_loop", real_loop)
    capsys.readouterr()
    run(out, "--max-steps", "2", "--seed", "2")  # other settings: starts clean
    assert "removing an unfinished start" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["seed"] == 2 and checkpoint.complete_steps(out) == [2]
    assert vae_file.stat().st_mtime_ns != stamp


@pytest.mark.parametrize("batch_size", [1, 3])
def test_fid_calibration_never_gets_a_batch_of_one(batch_size):
    cfg = parse_args([*MICRO, "--batch-size", str(batch_size)])
    extractor = fid_extractor(cfg, torch.rand(4, 1, 32, 32))  # 4 = 3 + 1: a last batch of one image
    assert extractor(torch.rand(2, 1, 32, 32)).shape[0] == 2
