"""generate.py + sample.py: DDIM sampling equals diffusers' pipeline math, interpolation, seeds, CSV, errors."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import generate
import pipeline
import sample
from ddpm import DDIMScheduler
from tests.helpers import REPO, help_gaps, patch_torchvision
from tests.test_unet import TINY as UNET_TINY
from tests.test_unet import make_pair as make_unet_pair
from tests.test_vae import make_ref as make_vae_ref
from tests.test_vae import ours_like as vae_like

patch_torchvision()
diffusers = pytest.importorskip("diffusers")


def test_ddim_sampling_equals_diffusers_pipeline_math():
    """Our generate() vs a diffusers loop (UNet, DDIMScheduler, AutoencoderKL) on the same weights/noise."""
    torch.manual_seed(0)
    unet, unet_ref = make_unet_pair(dict(UNET_TINY, in_channels=4, out_channels=4), scale=0.05)
    vae_ref = make_vae_ref((32, 64), 1, 8).eval()
    vae = vae_like(vae_ref).eval()
    context = torch.randn(2, 5, UNET_TINY["cross_attention_dim"])
    latents = torch.randn(2, 4, 16, 16)
    ours = generate.generate(unet, vae, DDIMScheduler(), context, latents=latents, steps=5)

    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(5)
    x = latents.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet_ref(x, t, encoder_hidden_states=context).sample
            x = sched.step(eps, t, x).prev_sample
        ref = ((vae_ref.decode(x / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run directory written by train.py itself (2 steps)."""
    import train
    from tests.test_train import MICRO

    out = tmp_path_factory.mktemp("run")
    train.main([*MICRO, "--out", str(out), "--max-steps", "2", "--save-every", "2"])
    return out


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    subprocess.run([sys.executable, "-m", "data.phantom", "--out", str(out), "-n", "8", "--size", "32"],
                   cwd=REPO, check=True, capture_output=True)
    return out


def test_interpolation_endpoints_reproduce_conditions():
    a, b = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    for method in ("lerp", "slerp"):
        assert torch.allclose(generate.interpolate(a, b, 0.0, method), a, atol=1e-5)
        assert torch.allclose(generate.interpolate(a, b, 1.0, method), b, atol=1e-5)
    mid = generate.slerp(a, b, 0.5)
    assert torch.allclose(mid.norm(dim=-1), (a.norm(dim=-1) + b.norm(dim=-1)) / 2, atol=1e-4)
    with pytest.raises(ValueError, match="1.5"):
        generate.interpolate(a, b, 1.5)


def test_label_rule_and_pairs_share_a_label():
    labels = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    import random

    pairs = sample.draw_pairs(4, labels, 20, random.Random(0))
    assert all((labels[a] * labels[b]).sum() > 0 for a, b in pairs)


def test_reconstruction_is_deterministic_and_regenerable(run_dir, phantoms, tmp_path):
    args = ["--run", str(run_dir), "--mode", "reconstruction", "--images", str(phantoms / "images"), "--num", "2",
            "--steps", "3", "--limit", "3", "--batch-size", "4"]
    sample.main([*args, "--out", str(tmp_path / "a")])
    sample.main([*args, "--out", str(tmp_path / "b"), "--batch-size", "1"])
    rows = list(csv.DictReader(open(tmp_path / "a" / "synthetic.csv")))
    assert len(rows) == 6 and {"path", "source", "source_b", "r", "seed"} <= set(rows[0])
    for r in rows:  # same seed -> same image, whatever the batch size
        x = np.asarray(Image.open(tmp_path / "a" / r["path"]), dtype=int)
        y = np.asarray(Image.open(tmp_path / "b" / r["path"]), dtype=int)
        assert np.abs(x - y).max() <= 1
    assert (tmp_path / "a" / "grid.png").is_file()
    # one sample regenerated alone from its recorded seed
    run = pipeline.load_run(run_dir)
    src = torch.from_numpy(np.asarray(Image.open(rows[3]["source"]), dtype=np.float32) / 255)[None, None]
    img = generate.generate(run.unet, run.vae, pipeline.make_scheduler(run.config), pipeline.condition(run.dino, src),
                            seeds=[int(rows[3]["seed"])], height=32, width=32, steps=3)
    regenerated = (generate.to_grayscale(img)[0, 0].numpy() * 255).round()
    assert np.abs(regenerated - np.asarray(Image.open(tmp_path / "a" / rows[3]["path"]))).max() <= 1


def test_interpolation_csv_has_labels_of_nearer_source(run_dir, phantoms, tmp_path):
    sample.main(["--run", str(run_dir), "--mode", "interpolation", "--images", str(phantoms / "labels.csv"),
                 "--num", "1", "--ratios", "0.2,0.8", "--num-pairs", "2", "--steps", "2", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "synthetic.csv")))
    real = {r["path"]: r for r in csv.DictReader(open(phantoms / "labels.csv"))}
    assert len(rows) == 4
    for r in rows:
        nearer = r["source"] if float(r["r"]) <= 0.5 else r["source_b"]
        key = str(__import__("pathlib").Path(nearer).relative_to(phantoms))
        assert r["Cardiomegaly"] == real[key]["Cardiomegaly"] and r["Edema"] == real[key]["Edema"]


def test_path_column_image_root_and_ignored_labels(run_dir, phantoms, tmp_path):
    """--path-column/--image-root reach the dataset; --uncertain ignore: nan labels are written back as -1."""
    rows = list(csv.DictReader(open(phantoms / "labels.csv")))
    for r in rows:
        r["Path"] = r.pop("path")
        r["Edema"] = "-1"
    with open(tmp_path / "chexpert.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    sample.main(["--run", str(run_dir), "--mode", "interpolation", "--images", str(tmp_path / "chexpert.csv"),
                 "--path-column", "Path", "--image-root", str(phantoms), "--uncertain", "ignore", "--num", "1",
                 "--ratios", "0.2", "--num-pairs", "2", "--steps", "2", "--out", str(tmp_path / "out")])
    out = list(csv.DictReader(open(tmp_path / "out" / "synthetic.csv")))
    assert len(out) == 2 and all(r["Edema"] == "-1" for r in out)
    assert all(r["source"].startswith(str(phantoms)) for r in out)


def test_pairs_ignore_nan_labels():
    import random

    labels = np.array([[1, np.nan], [1, 1], [np.nan, 1], [0, 0]])
    pairs = sample.draw_pairs(4, labels, 20, random.Random(0))
    assert all(np.nansum(labels[a] * labels[b]) > 0 for a, b in pairs) and (0, 1) in pairs + [(b, a) for a, b in pairs]


def test_unlabelled_csv_and_label_subset(run_dir, phantoms, tmp_path):
    """A CSV with only a path column (e.g. a run's val.csv) samples without labels; --labels picks columns."""
    (tmp_path / "val.csv").write_text("path\n" + "".join(f"{p}\n" for p in sorted((phantoms / "images").iterdir())))
    sample.main(["--run", str(run_dir), "--mode", "reconstruction", "--images", str(tmp_path / "val.csv"),
                 "--num", "1", "--limit", "2", "--steps", "2", "--out", str(tmp_path / "a")])
    rows = list(csv.DictReader(open(tmp_path / "a" / "synthetic.csv")))
    assert len(rows) == 2 and list(rows[0]) == ["path", "source", "source_b", "r", "seed"]
    sample.main(["--run", str(run_dir), "--mode", "reconstruction", "--images", str(phantoms / "labels.csv"),
                 "--num", "1", "--limit", "2", "--steps", "2", "--labels", "Edema", "--out", str(tmp_path / "b")])
    assert list(next(csv.DictReader(open(tmp_path / "b" / "synthetic.csv"))))[-1] == "Edema"


def test_bad_inputs_give_clear_errors(run_dir, phantoms, tmp_path):
    with pytest.raises(SystemExit, match="not a run directory"):
        sample.main(["--run", str(tmp_path / "nope"), "--mode", "reconstruction", "--images",
                     str(phantoms / "images"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as e:
        sample.main(["--run", str(run_dir), "--mode", "interpolation", "--images", str(phantoms / "images"),
                     "--ratios", "0.5,1.5", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_text("not an image")
    with pytest.raises(ValueError, match="no readable image"):
        sample.main(["--run", str(run_dir), "--mode", "reconstruction", "--images", str(bad),
                     "--out", str(tmp_path / "o")])


def test_run_config_is_json(run_dir):
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["image_size"] == 32


def script(*args):
    """sample.py as a user runs it -> (exit code, stderr lines other than progress bars and warnings)."""
    env = {k: v for k, v in os.environ.items() if k != "DINO_DEBUG"} | {"PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, str(REPO / "sample.py"), *map(str, args)], capture_output=True,
                         text=True, env=env)
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, [line for line in res.stderr.replace("\r", "\n").splitlines()
                            if line.strip() and "it/s" not in line]


def test_user_errors_are_one_line(run_dir, phantoms, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not an image")
    (tmp_path / "junk" / "x.png").write_text("not an image either")
    (tmp_path / "nopath.csv").write_text("file,Edema\nx.png,1\n")
    base = ["--mode", "reconstruction", "--out", tmp_path / "out", "--steps", "1"]
    images = phantoms / "images"
    cases = [(["--run", "/nonexistent", "--images", images], "/nonexistent"),
             (["--run", run_dir, "--images", images, "--batch-size", "-1"], "--batch-size"),
             (["--run", run_dir, "--images", images, "--num", "0"], "--num"),
             (["--run", run_dir, "--images", tmp_path / "empty"], "empty"),
             (["--run", run_dir, "--images", tmp_path / "junk"], "junk"),
             (["--run", run_dir, "--images", tmp_path / "nopath.csv"], "nopath.csv")]
    for extra, needle in cases:
        code, err = script(*base, *extra)
        assert code != 0 and len(err) == 1 and needle in err[0], (extra, err)
        assert "has 1 images" not in err[0]
    assert not (tmp_path / "out").exists()  # no failed start left an output folder


def test_out_of_other_settings_refused(run_dir, phantoms, tmp_path, capsys, monkeypatch):
    args = ["--run", str(run_dir), "--mode", "reconstruction", "--images", str(phantoms / "images"), "--num", "1",
            "--steps", "1", "--limit", "1", "--out", str(tmp_path / "o")]
    sample.main(args)
    first = (tmp_path / "o" / "synthetic.csv").read_text()
    (tmp_path / "o" / "synthetic.csv").unlink()  # as if the first start had stopped before its last step
    calls = []
    real_generate = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    sample.main(args)  # the same settings again: accepted, and the PNGs already written are reused
    assert calls == [] and (tmp_path / "o" / "synthetic.csv").read_text() == first
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample.main([*args, "--seed", "1"])
    err = str(e.value.code)  # cli.fail: SystemExit("prog: error: ..."), printed as one line, exit status 1
    assert len(err.splitlines()) == 1 and "--overwrite" in err and "seed" in err
    sample.main([*args, "--seed", "1", "--overwrite"])


def test_interpolation_grid_shows_every_pair_and_both_ends():
    """8 pairs (several sharing image a) -> 8 rows of: real a, 3 blends captioned r=..., real b."""
    sources = torch.stack([torch.full((1, 32, 32), i / 10) for i in range(10)])
    pairs = [(0, 1), (0, 2), (3, 4), (0, 5), (6, 7), (8, 9), (3, 9), (2, 6)]
    results = [(a, b, r, torch.full((1, 32, 32), 0.95)) for a, b in pairs for r in (0.25, 0.5, 0.75)]
    grid = sample.interpolation_grid(sources, results, pairs)
    boxes = grid.info["boxes"]
    assert {r for r, _ in boxes} == set(range(8)) and {c for _, c in boxes} == set(range(5))
    arr = np.asarray(grid.convert("L"), dtype=float) / 255
    for row, (a, b) in enumerate(pairs):
        for col, want in ((0, a / 10), (4, b / 10), (2, 0.95)):
            x0, y0, x1, y1 = boxes[row, col]
            assert abs(arr[y0:y1, x0:x1].mean() - want) < 0.01, (row, col)
    assert {"real a", "real b", "r=0.25", "r=0.75", "pair 8"} <= set(grid.info["text"])
    x0, y0, x1, y1 = boxes[0, 0]
    assert x1 - x0 >= 96 and grid.height >= 8 * (y1 - y0)  # small tiles enlarged so captions fit


def test_reconstruction_grid_is_captioned():
    sources = torch.rand(3, 1, 32, 32)
    results = [(a, None, None, torch.rand(1, 32, 32)) for a in range(3) for _ in range(2)]
    grid = sample.reconstruction_grid(sources, results, ["x/a.png", "x/b.png", "x/c.png"], per_row=2)
    assert len({r for r, _ in grid.info["boxes"]}) == 3 and len(grid.info["boxes"]) == 9
    assert {"real source", "generated 1", "generated 2", "a"} <= set(grid.info["text"])


def test_help_shows_every_default():
    assert help_gaps(sample.parse_args) == []


def test_step_and_no_ema_choose_the_weights(run_dir, phantoms, tmp_path):
    args = ["--run", str(run_dir), "--mode", "reconstruction", "--images", str(phantoms / "images"), "--num", "1",
            "--steps", "2", "--limit", "1"]
    read = lambda out: np.asarray(Image.open(next((tmp_path / out / "images").glob("*.png"))), dtype=int)
    for out, extra in [("newest", []), ("step2", ["--step", "2"]), ("raw", ["--no-ema"])]:
        sample.main([*args, "--out", str(tmp_path / out), *extra])
    assert np.array_equal(read("newest"), read("step2"))  # step 2 is the newest checkpoint
    assert (run_dir / "checkpoints" / "step_0000002.ema.safetensors").is_file()
    assert not np.array_equal(read("newest"), read("raw"))  # the EMA weights differ from the raw ones
    with pytest.raises(FileNotFoundError, match="no step 7"):
        sample.main([*args, "--out", str(tmp_path / "none"), "--step", "7"])
