"""docs/small_real.sh end to end on the real CXRs of ../shared/data, a handful of steps per stage: every
artefact behind docs/results.md is written and well-formed."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import checkpoint
from docs import report as recipe_report
from tests.helpers import REPO, heavy_lock


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_small_real_recipe(tmp_path, shared_data):
    out = tmp_path / "runs"
    env = os.environ | {
        "PYTHON": sys.executable, "OUT": str(out), "DATA": str(shared_data), "PHANTOMS": "60",
        "TRAIN_ARGS": "--max-steps 2 --vae-fit-steps 1 --eval-every 1 --save-every 1 --log-every 1 "
                      "--sample-steps 2 --cache-copies 1 --fid-count 8",
        "TINY_ARGS": "--max-steps 2 --phantom-count 32 --val-count 4 --fid-count 4 --batch-size 4 "
                     "--sample-steps 2 --vae-fit-steps 1 --save-every 2",
        "SAMPLE_ARGS": "--steps 2",
        "SEGMENT_ARGS": "--limit 4",
        "CLASSIFY_ARGS": "--regimes 16,32 --folds 2 --max-epochs 1 --batch-size 16",
    }
    with heavy_lock():
        p = subprocess.run(["bash", "docs/small_real.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]

    run = out / "small-real"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["preset"] == "small-real" and cfg["image_size"] == 128 and cfg["val_group"] == "patient_id"
    assert checkpoint.complete_steps(run) == [1, 2]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    fids = [r["fid"] for r in records if "fid" in r]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert len(fids) == 2 and all(math.isfinite(f) and 0 < f < 1e4 for f in fids)  # calibrated features
    w, h = Image.open(run / "samples" / "step_0000002.png").size  # captioned: 8 held-out over 8 generated
    assert 8 * 128 < w < 8 * 128 + 300 and 2 * 128 < h < 2 * 128 + 120

    # the held-out split: whole patients, none of them in training
    index = read_csv(shared_data / "cxr-unlabeled" / "index.csv")
    patient = {os.path.basename(r["image"]): r["patient_id"] for r in index}
    val = [os.path.basename(r["path"]) for r in read_csv(run / "val.csv")]
    held = {patient[v] for v in val}
    train_patients = {patient[k] for k in patient if k not in set(val)}
    assert len(val) >= 40 and not held & train_patients

    recon = read_csv(out / "small-real-reconstruction" / "synthetic.csv")
    assert len(recon) == 8 * 4 and all((out / "small-real-reconstruction" / r["path"]).is_file() for r in recon)
    interp = read_csv(out / "small-real-interpolation" / "synthetic.csv")
    assert len(interp) == 6 * 5 and {float(r["r"]) for r in interp} == {0, 0.25, 0.5, 0.75, 1}
    for name in ("small-real-reconstruction", "small-real-interpolation"):
        assert Image.open(out / name / "grid.png").size[1] > 128

    dice = read_csv(out / "small-real-segment" / "dice.csv")
    assert len(dice) == 4 and all(0 <= float(r[k]) <= 1 for r in dice
                                  for k in ("dice", "dice_baseline_all_foreground", "dice_baseline_prior"))
    summary = json.loads((out / "small-real-segment" / "summary.json").read_text())
    assert summary["n"] == 4 and summary["settings"]["timestep"] == 300
    assert len(read_csv(out / "small-real-segment-search" / "summary.csv")) == 3 * 6 * 2  # auto + 5 thresholds

    results = read_csv(out / "classify" / "results.csv")
    assert len(results) == 2 * 3 * 2 and {float(r["ratio"]) for r in results} == {0, 1, 3}

    report = out / "report"
    tables = (report / "tables.md").read_text()
    assert "Missing" not in tables
    for section in ("Training and FID", "Lung segmentation", "lung prior", "Classification", "| 16 |"):
        assert section in tables, section
    for png in ("fid.png", "loss.png", "eval_samples.png", "reconstruction.png", "interpolation.png",
                "segment_maps.png", "auc_vs_ratio.png"):
        Image.open(report / png).verify()


def test_report_grids_show_generated_images_captioned(tmp_path):
    (tmp_path / "images").mkdir()
    rows = []
    for k, (a, b, r) in enumerate([("s0", "t0", 0.25), ("s0", "t0", 0.75), ("s0", "t1", 0.5)]):
        Image.fromarray(np.full((32, 32), 40 * k, np.uint8)).save(tmp_path / "images" / f"{k}.png")
        rows.append(dict(path=f"images/{k}.png", source=a, source_b=b, r=str(r), seed=str(k)))
    with open(tmp_path / "synthetic.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    recipe_report.generated_grid(tmp_path, tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as img:
        assert img.height > 2 * 96 and img.width > 2 * 96  # 2 pairs (rows), 2 blends in the first
