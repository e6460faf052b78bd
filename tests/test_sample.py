"""generate.py + sample.py: DDIM sampling equals diffusers' pipeline math, interpolation, seeds, CSV, errors."""

import csv
import json
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
from tests.helpers import REPO, patch_torchvision
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
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        sample.main(["--run", str(tmp_path / "nope"), "--mode", "reconstruction", "--images",
                     str(phantoms / "images"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="outside"):
        sample.main(["--run", str(run_dir), "--mode", "interpolation", "--images", str(phantoms / "images"),
                     "--ratios", "0.5,1.5", "--out", str(tmp_path / "o")])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_text("not an image")
    with pytest.raises(ValueError, match="no readable image"):
        sample.main(["--run", str(run_dir), "--mode", "reconstruction", "--images", str(bad),
                     "--out", str(tmp_path / "o")])


def test_run_config_is_json(run_dir):
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["image_size"] == 32
