"""segment.py mechanics: report schema, label-map shapes, search/sweep bookkeeping, vanilla mode, bad inputs.

Random tiny models, so Dice values are meaningless here; accuracy is the paper's experiment, not a test.
"""

import csv
import json
import os
import subprocess
import sys
import warnings
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import hub
import pipeline
import segment
from data.phantom import make_phantom
from tests.helpers import REPO, help_gaps
from unet import UNet2DConditionModel, UNetConfig
from vae import AutoencoderKL, VAEConfig
from vit_dino import DinoConfig, DinoViT

# SD v1 structure at toy width: attention grids 8x8 (down 0 / up 1) and 4x4 (mid) for a 64 px image.
UNET = UNetConfig(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2)
VAE = VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)  # factor 8
DINO = DinoConfig(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, num_register_tokens=1)
SCORES = ["image", "path", "dice", "dice_best_union", "dice_nms", "dice_hungarian", "num_segments",
          "dice_baseline_blocks"]
BASELINES = ["dice_baseline_all_foreground", "dice_baseline_prior"]  # with 2+ masks


def make_run(folder, steps=(1, 2), ema_steps=(2,)):
    """A run directory as train.py writes it (see pipeline.load_run): config, vae/, dino/, checkpoints/."""
    pipeline.save_local(AutoencoderKL(VAE), folder / "vae")
    pipeline.save_local(DinoViT(DINO), folder / "dino")
    hub.write_json_atomic({"image_size": 64, "vae": None, "dino": None, "unet_config_resolved": asdict(UNET)},
                          folder / "config.json")
    for step in steps:
        state = UNet2DConditionModel(UNET).state_dict()
        hub.save_file_atomic(state, folder / "checkpoints" / f"step_{step:07d}.safetensors")
        if step in ema_steps:
            hub.save_file_atomic(state, folder / "checkpoints" / f"step_{step:07d}.ema.safetensors")
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    return make_run(tmp_path_factory.mktemp("run"))


def write_phantoms(folder, n=2, size=64):
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, lung, _ = make_phantom(i, size)
        Image.fromarray(image).save(folder / "images" / f"p{i}.png")
        Image.fromarray(lung.astype(np.uint8) * 255).save(folder / "masks" / f"p{i}.png")
    return folder / "images", folder / "masks"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantoms(tmp_path_factory.mktemp("phantoms"))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def seg(*args, run=None, grid=4):
    return segment.main([*(["--run", str(run)] if run else []), "--grid", str(grid), *map(str, args)])


@pytest.mark.parametrize("size", [64, 256])
def test_phantoms_end_to_end(run_dir, tmp_path, size):
    images, masks = write_phantoms(tmp_path / "data", n=2 if size == 64 else 1, size=size)
    out = tmp_path / "out"
    [summary] = seg("--images", images, "--masks", masks, "--out", out, "--size", size, run=run_dir)
    rows = read_csv(out / "dice.csv")
    assert list(rows[0]) == SCORES + (BASELINES if len(rows) > 1 else [])
    assert [r["image"] for r in rows] == ["p0", "p1"][: len(rows)]
    assert all(0.0 <= float(r[k]) <= 1.0 for r in rows for k in SCORES[2:6])
    assert all(r["dice"] == r["dice_nms"] for r in rows)  # the headline rule is NMS by default
    saved = json.loads((out / "summary.json").read_text())
    assert saved["n"] == len(rows) and saved["step"] == 2 and saved["settings"]["size"] == size
    assert saved["mean_dice"] == pytest.approx(np.mean([float(r["dice"]) for r in rows]))
    assert {"std_dice", "mean_dice_best_union", "mean_dice_nms", "mean_dice_hungarian"} <= set(saved)
    assert saved["weights"].endswith("step_0000002.ema.safetensors") and summary["n"] == len(rows)
    labels = np.array(Image.open(out / "labels" / "p0.png"))
    assert labels.shape == (size, size) and labels.dtype == np.uint8
    assert labels.max() + 1 == len(np.unique(labels)) == int(rows[0]["num_segments"])  # ids 0..K-1
    over = Image.open(out / "overlays" / "p0.png")
    assert over.size == (size, size) and over.mode == "RGB"
    if size == 64:  # deterministic: a second run writes the same label maps
        seg("--images", images, "--masks", masks, "--out", tmp_path / "again", "--batch-size", 1, run=run_dir)
        assert np.array_equal(np.array(Image.open(tmp_path / "again" / "labels" / "p0.png")), labels)


def test_cxr_lungs_csv(run_dir, tmp_path, shared_data):
    out = tmp_path / "out"
    seg("--images", shared_data / "cxr-lungs" / "index.csv", "--out", out, "--limit", 3, "--size", 64,
        run=run_dir)  # columns image and mask are found by name
    rows = read_csv(out / "dice.csv")
    assert len(rows) == 3 and list(rows[0]) == SCORES + BASELINES
    saved = json.loads((out / "summary.json").read_text())
    assert saved["n"] == 3 and 0 < saved["mean_dice_baseline_prior"] <= 1
    assert saved["mean_dice_baseline_all_foreground"] == pytest.approx(
        np.mean([float(r["dice_baseline_all_foreground"]) for r in rows]))
    assert np.array(Image.open(out / "labels" / f"{rows[0]['image']}.png")).shape == (64, 64)


def test_csv_columns_and_no_masks(run_dir, phantoms, tmp_path):
    images, masks = phantoms
    table = tmp_path / "list.csv"
    table.write_text(f"img,lung\n{images / 'p0.png'},{masks / 'p0.png'}\n{images / 'p1.png'},\n")  # p1: blank cell
    seg("--images", table, "--image-column", "img", "--mask-column", "lung", "--limit", 1, "--out", tmp_path / "a", run=run_dir)
    assert len(read_csv(tmp_path / "a" / "dice.csv")) == 1  # the blank cell lies past --limit
    pytest.raises(SystemExit, seg, "--images", table, "--image-column", "img", "--mask-column", "lung", "--out", tmp_path / "c", run=run_dir).match(r"no mask for 1 image\(s\), e\.g\. \['p1'\] \(--mask-column lung\)")
    seg("--images", images, "--out", tmp_path / "b", "--context", "zeros", run=run_dir)  # no masks: no Dice
    assert not (tmp_path / "b" / "dice.csv").exists() and (tmp_path / "b" / "labels" / "p1.png").is_file()
    saved = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert saved["n"] == 2 and "mean_dice" not in saved and saved["settings"]["context"] == "zeros"


def test_path_column_and_image_root(run_dir, phantoms, tmp_path):
    """CheXpert-style: a `Path` column found by default, paths relative to --image-root (masks too)."""
    images, masks = phantoms
    root = images.parent
    (tmp_path / "list.csv").write_text("Path,mask\nimages/p0.png,masks/p0.png\nimages/p1.png,masks/p1.png\n")
    seg("--images", tmp_path / "list.csv", "--image-root", root, "--out", tmp_path / "a", run=run_dir)
    assert [r["image"] for r in read_csv(tmp_path / "a" / "dice.csv")] == ["p0", "p1"]
    (tmp_path / "other.csv").write_text("file\nimages/p0.png\n")
    seg("--images", tmp_path / "other.csv", "--path-column", "file", "--image-root", root, "--out", tmp_path / "b",
        run=run_dir)
    assert (tmp_path / "b" / "labels" / "p0.png").is_file()
    with pytest.raises(SystemExit, match=r"other\.csv has no column 'img' \(--path-column"):
        seg("--images", tmp_path / "other.csv", "--path-column", "img", "--out", tmp_path / "c", run=run_dir)


def test_search_one_report_per_combination(run_dir, phantoms, tmp_path, monkeypatch):
    images, masks = phantoms
    calls = []
    forward = segment.self_attention
    monkeypatch.setattr(segment, "self_attention", lambda *a: calls.append(a[3]) or forward(*a))
    out = tmp_path / "out"
    summaries = seg("--images", images, "--masks", masks, "--out", out, "--batch-size", 2,
                    "--search", "threshold=0.01,0.5", "grid=2,4", "timestep=100,300", run=run_dir)
    assert sorted(calls) == [100, 100, 300]  # a 1-image probe (checks --grid), then one forward per
    # (batch, timestep), reused by 4 threshold/grid pairs
    table = read_csv(out / "summary.csv")
    assert len(table) == len(summaries) == 8
    assert list(table[0])[:3] == ["timestep", "threshold", "grid"]  # searched keys in segment.SEARCH order
    means = [float(r["mean_dice"]) for r in table]
    assert means == sorted(means, reverse=True)
    assert {(r["timestep"], r["threshold"], r["grid"]) for r in table} == {
        (s, t, g) for s in ("100", "300") for t in ("0.01", "0.5") for g in ("2", "4")}
    assert len(read_csv(out / "timestep100_threshold0.01_grid2" / "dice.csv")) == 2
    with pytest.raises(SystemExit, match="KEY=V1"):
        seg("--images", images, "--out", tmp_path / "x", "--search", "speed=1", run=run_dir)


def test_checkpoint_sweep(run_dir, phantoms, tmp_path):
    images, masks = phantoms
    out = tmp_path / "out"
    seg("--images", images, "--masks", masks, "--out", out, "--checkpoints", "all", "--limit", 1, run=run_dir)
    table = read_csv(out / "summary.csv")
    assert sorted(int(r["step"]) for r in table) == [1, 2]
    one = json.loads((out / "step_0000001" / "summary.json").read_text())
    two = json.loads((out / "step_0000002" / "summary.json").read_text())
    assert one["weights"].endswith("step_0000001.safetensors")  # no EMA twin for step 1
    assert two["weights"].endswith("step_0000002.ema.safetensors")
    seg("--images", images, "--out", tmp_path / "raw", "--step", 2, "--no-ema", "--limit", 1, run=run_dir)
    raw = json.loads((tmp_path / "raw" / "summary.json").read_text())
    assert raw["weights"].endswith("step_0000002.safetensors") and raw["step"] == 2


def test_vanilla_mode(phantoms, tmp_path):
    images, masks = phantoms
    UNet2DConditionModel(UNET).save_pretrained(tmp_path / "sd" / "unet")
    AutoencoderKL(VAE).save_pretrained(tmp_path / "sd" / "vae")
    out = tmp_path / "out"
    sd = tmp_path / "sd"  # a diffusers pipeline folder: unet/ and vae/ subfolders are found
    seg("--unet", sd, "--vae", sd / "vae", "--images", images, "--masks", masks, "--out", out, "--size", 64)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["n"] == 2 and saved["step"] is None
    assert saved["settings"]["context"] == "zeros" and saved["settings"]["threshold"] == 0.5  # paper's SD setting
    with pytest.raises(SystemExit):
        seg("--unet", sd, "--vae", sd, "--images", images, "--out", out, "--context", "own")
    with pytest.raises(SystemExit, match="cannot load"):
        seg("--unet", tmp_path / "nowhere", "--vae", sd, "--images", images, "--out", out)


def test_bad_inputs(run_dir, phantoms, tmp_path):
    images, masks = phantoms
    small = tmp_path / "small"
    small.mkdir()
    for p in masks.iterdir():
        Image.open(p).resize((32, 32), Image.NEAREST).save(small / p.name)
    with pytest.raises(SystemExit, match=r"mask .*p0.png is 32x32 but image .*p0.png is 64x64"):
        seg("--images", images, "--masks", small, "--out", tmp_path / "a", run=run_dir)
    seg("--images", images, "--masks", small, "--out", tmp_path / "a", "--resize-masks", "--limit", 1, run=run_dir)
    assert len(read_csv(tmp_path / "a" / "dice.csv")) == 1

    mixed, empty = tmp_path / "mixed", tmp_path / "empty"
    mixed.mkdir(), empty.mkdir()
    (mixed / "p0.png").write_bytes((images / "p0.png").read_bytes())
    (mixed / "broken.png").write_text("not an image")
    (mixed / "notes.txt").write_text("ignored: not an image extension")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(empty / "p0.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(empty / "broken.png")
    with pytest.warns(UserWarning) as record:
        seg("--images", mixed, "--masks", empty, "--out", tmp_path / "b", run=run_dir)
    messages = " | ".join(str(w.message) for w in record)
    assert "skipping" in messages and "broken.png" in messages and "is empty" in messages
    saved = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert saved["n"] == 1 and saved["skipped"][0][0].endswith("broken.png")
    assert float(read_csv(tmp_path / "b" / "dice.csv")[0]["dice"]) == 1.0  # empty GT: nothing selected, 1.0

    with pytest.raises(SystemExit, match="not a run directory"):
        seg("--images", images, "--out", tmp_path / "c", run=tmp_path / "missing")
    with pytest.raises(SystemExit, match="no mask in .* for 1 image"):
        seg("--images", images, "--masks", empty, "--out", tmp_path / "c", run=run_dir)
    with pytest.raises(SystemExit, match="attention grid at --size 64 is 8x8"):
        seg("--images", images, "--out", tmp_path / "c", run=run_dir, grid=16)
    with pytest.raises(SystemExit, match="expected a folder of images or a .csv"):
        seg("--images", mixed / "notes.txt", "--out", tmp_path / "c", run=run_dir)
    with pytest.raises(SystemExit, match="--upsample cubic: expected bilinear or nearest"):
        seg("--images", images, "--out", tmp_path / "c", "--search", "upsample=nearest,cubic", run=run_dir)
    with pytest.raises(SystemExit, match="--threshold 0: expected auto or > 0"):
        seg("--images", images, "--out", tmp_path / "c", "--search", "threshold=auto,0", run=run_dir)
    assert not (tmp_path / "c").exists()  # no failed start left an output folder behind


def script(*args, name="segment.py"):
    """Run a script as a user does -> (exit code, stderr lines other than progress bars and warnings)."""
    env = {k: v for k, v in os.environ.items() if k != "DINO_DEBUG"} | {"PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, str(REPO / name), *map(str, args)], capture_output=True, text=True,
                         env=env)
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, [line for line in res.stderr.replace("\r", "\n").splitlines()
                            if line.strip() and "it/s]" not in line and "?it/s" not in line]


def test_user_errors_are_one_line(run_dir, phantoms, tmp_path):
    images, _ = phantoms
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_text("not an image")
    (tmp_path / "nopath.csv").write_text("file\nx.png\n")
    cases = [(["--batch-size", "-1", "--images", images], "--batch-size"),
             (["--threshold", "big", "--images", images], "--threshold"),
             (["--images", tmp_path / "empty"], "no PNG/JPEG/DICOM images"),
             (["--images", tmp_path / "junk"], "a.png"),
             (["--images", tmp_path / "nopath.csv"], "nopath.csv"),
             (["--images", images, "--run-missing"], "--run-missing")]
    for extra, needle in cases:
        code, err = script("--run", run_dir, "--out", tmp_path / "out", *extra)
        assert code != 0 and len(err) == 1 and needle in err[0], (extra, err)
    code, err = script("--run", tmp_path / "nowhere", "--images", images, "--out", tmp_path / "out")
    assert code != 0 and len(err) == 1 and "nowhere" in err[0]
    assert not (tmp_path / "out").exists()


def test_out_of_other_settings_refused_unless_overwrite(run_dir, phantoms, tmp_path, capsys):
    images, masks = phantoms
    out = tmp_path / "out"
    seg("--images", images, "--masks", masks, "--out", out, "--threshold", 0.001, run=run_dir)
    seg("--images", images, "--masks", masks, "--out", out, "--threshold", 0.001, run=run_dir)  # same: accepted
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        seg("--images", images, "--masks", masks, "--out", out, "--threshold", 0.002, run=run_dir)
    err = str(e.value.code)  # cli.fail: SystemExit("prog: error: ..."), printed as one line, exit status 1
    assert len(err.splitlines()) == 1 and "--overwrite" in err and "threshold" in err
    seg("--images", images, "--masks", masks, "--out", out, "--threshold", 0.002, "--overwrite", run=run_dir)
    assert json.loads((out / "summary.json").read_text())["settings"]["threshold"] == 0.002


def test_kill_and_rerun_resumes(run_dir, tmp_path, monkeypatch):
    """Killed in the second batch (after image p2's first setting is written): the rerun runs the UNet on p2
    and p3 only and ends with the reports and files of an uninterrupted run, no row twice."""
    images, masks = write_phantoms(tmp_path / "data", n=4)
    args = ["--images", images, "--masks", masks, "--batch-size", 2, "--search", "threshold=auto,0.5"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: one segment warnings
        seg(*args, "--out", tmp_path / "full", run=run_dir)
        forward, save, forwards, saves = segment.self_attention, segment.segment_image, [], []
        monkeypatch.setattr(segment, "self_attention", lambda u, z, *a: forwards.append(len(z)) or forward(u, z, *a))

        def dying(*a, kill_at=5):  # the 5th save (p2, first setting) completes, then the process "dies"
            row, _ = save(*a), saves.append(a[3])
            if len(saves) == kill_at:
                raise RuntimeError("killed")
            return row

        monkeypatch.setattr(segment, "segment_image", dying)
        with pytest.raises(RuntimeError, match="killed"):
            seg(*args, "--out", tmp_path / "part", run=run_dir)
        assert saves == ["p0", "p1", "p0", "p1", "p2"] and not (tmp_path / "part" / "summary.json").exists()
        forwards.clear(), saves.clear()
        monkeypatch.setattr(segment, "segment_image", lambda *a: dying(*a, kill_at=None))
        seg(*args, "--out", tmp_path / "part", run=run_dir)
    assert forwards == [1, 2]  # the --grid probe, then one forward for p2 and p3 only
    assert saves == ["p2", "p3", "p2", "p3"]  # p2 lacked a setting: redone in both
    full, part = tmp_path / "full", tmp_path / "part"
    for name in ("summary.json", "threshold0.5/summary.json", "thresholdauto/summary.json"):
        assert json.loads((part / name).read_text()) == json.loads((full / name).read_text()), name
    for folder in ("threshold0.5", "thresholdauto"):
        rows = read_csv(part / folder / "dice.csv")
        assert rows == read_csv(full / folder / "dice.csv") and [r["image"] for r in rows] == ["p0", "p1", "p2", "p3"]
        for sub in ("labels", "overlays"):
            for png in sorted((full / folder / sub).glob("*.png")):
                assert (part / folder / sub / png.name).read_bytes() == png.read_bytes(), png
    assert read_csv(part / "summary.csv") == read_csv(full / "summary.csv")
    assert not list(part.rglob("*.tmp"))


def test_one_segment_warns_and_auto_is_the_default(run_dir, phantoms, tmp_path):
    images, masks = phantoms
    with pytest.warns(UserWarning, match=r"2 of 2 images ended as ONE segment .*--threshold 1000"):
        seg("--images", images, "--masks", masks, "--out", tmp_path / "a", "--threshold", 1000, run=run_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: auto may give one segment here too
        [summary] = seg("--images", images, "--masks", masks, "--out", tmp_path / "b", run=run_dir)
    assert summary["settings"]["threshold"] == "auto" and summary["mean_threshold_used"] > 0
    assert {"mean_dice", "mean_dice_baseline_all_foreground", "mean_num_segments"} <= set(summary)
    with Image.open(tmp_path / "b" / "overlays.png") as grid:  # captioned: image row over DiffSeg row
        assert grid.width > 2 * 96 and grid.height > 2 * 96


def test_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as e:
        segment.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--run", "--images", "--masks", "--out", "--timestep", "--threshold", "--grid", "--context",
                 "--iterations", "--upsample", "--refine", "--size", "--step", "--checkpoints", "--search",
                 "--no-ema", "--device", "--limit", "--unet", "--unet-subfolder", "--vae", "--vae-subfolder",
                 "--image-column", "--mask-column", "--resize-masks", "--overwrite"):
        assert flag in text
    assert help_gaps(segment.parse_args) == []
