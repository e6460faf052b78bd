"""sample.py / segment.py under torchrun (2 gloo ranks == 1 process) and kill-and-rerun resume."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import segment
from tests import test_sample, test_segment
from tests.helpers import REPO
from tests.test_train import _free_port

run_dir, phantoms = test_sample.run_dir, test_sample.phantoms  # its module-scoped fixtures (a micro run)


def torchrun(script, *args, ok=True):
    """`torchrun --nproc_per_node 2 -- SCRIPT ARGS` (the `--` form the README uses) on gloo, one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "--", script, *map(str, args)]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert (p.returncode == 0) == ok, p.stderr[-3000:]
    return p


def pixels(path):
    return np.asarray(Image.open(path), dtype=int)


def csv_rows(path):
    return list(csv.DictReader(open(path)))


def max_png_diff(a, b, rows):
    return max(np.abs(pixels(a / r["path"]) - pixels(b / r["path"])).max() for r in rows)


@pytest.mark.slow
def test_sample_two_ranks_equal_one_process(run_dir, phantoms, tmp_path):
    args = ["--run", run_dir, "--mode", "reconstruction", "--images", phantoms / "images", "--num", "2",
            "--steps", "2", "--limit", "3", "--batch-size", "2"]  # 6 samples: 3 per rank, a batch of 1 at the end
    sample.main([*map(str, args), "--out", str(tmp_path / "one")])
    torchrun("sample.py", *args, "--out", tmp_path / "two")
    one, two = csv_rows(tmp_path / "one" / "synthetic.csv"), csv_rows(tmp_path / "two" / "synthetic.csv")
    assert one == two and len(two) == 6 and len({r["path"] for r in two}) == 6
    assert max_png_diff(tmp_path / "one", tmp_path / "two", one) <= 1  # batch composition: float rounding only
    assert sorted(p.name for p in (tmp_path / "two" / "images").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "images").iterdir())  # no temporary files left
    # a rerun with another world size is the same job: it continues (nothing left to do) instead of refusing
    sample.main([*map(str, args), "--out", str(tmp_path / "two")])
    assert csv_rows(tmp_path / "two" / "synthetic.csv") == one
    # other settings: rank 0 refuses (naming --overwrite), rank 1 stops with it, nothing is touched
    before = sorted(f.stat().st_mtime_ns for f in (tmp_path / "two").rglob("*"))
    p = torchrun("sample.py", *args, "--seed", "1", "--out", tmp_path / "two", ok=False)
    assert "--overwrite" in p.stderr and "seed" in p.stderr
    assert sorted(f.stat().st_mtime_ns for f in (tmp_path / "two").rglob("*")) == before


def test_sample_killed_then_rerun_completes_identically(run_dir, phantoms, tmp_path, monkeypatch):
    """A kill after the first batch's PNGs: the rerun generates only the rest, byte-identical to one go."""
    args = ["--run", str(run_dir), "--mode", "interpolation", "--images", str(phantoms / "labels.csv"),
            "--num", "2", "--num-pairs", "3", "--steps", "2", "--batch-size", "2"]  # 6 samples, 3 batches
    sample.main([*args, "--out", str(tmp_path / "whole")])
    real_generate, sizes = sample.generate, []

    def killed_after_one_batch(*a, **k):
        if sizes:
            raise KeyboardInterrupt  # as a kill between batches: the first batch's PNGs are on disk
        sizes.append(len(k["seeds"]))
        return real_generate(*a, **k)

    monkeypatch.setattr(sample, "generate", killed_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        sample.main([*args, "--out", str(tmp_path / "resumed")])
    assert len(list((tmp_path / "resumed" / "images").glob("*.png"))) == 2
    assert not (tmp_path / "resumed" / "synthetic.csv").exists()
    monkeypatch.setattr(sample, "generate", lambda *a, **k: sizes.append(len(k["seeds"])) or real_generate(*a, **k))
    sample.main([*args, "--out", str(tmp_path / "resumed")])
    assert sizes == [2, 2, 2]  # the rerun generated the 4 missing samples only
    whole, resumed = csv_rows(tmp_path / "whole" / "synthetic.csv"), csv_rows(tmp_path / "resumed" / "synthetic.csv")
    assert resumed == whole and len({r["path"] for r in resumed}) == len(resumed) == 6
    for r in whole:
        assert (tmp_path / "whole" / r["path"]).read_bytes() == (tmp_path / "resumed" / r["path"]).read_bytes()
    assert json.loads((tmp_path / "resumed" / "settings.json").read_text()) == json.loads(
        (tmp_path / "whole" / "settings.json").read_text())


@pytest.mark.slow
def test_segment_two_ranks_equal_one_process(tmp_path):
    """5 images over 2 ranks (3 + 2) with a 2-value search: every report equals the one-process run's."""
    torch.manual_seed(0)
    run = test_segment.make_run(tmp_path / "run")
    images, masks = test_segment.write_phantoms(tmp_path / "data", n=5)
    args = ["--run", run, "--images", images, "--masks", masks, "--grid", 4, "--batch-size", 2,
            "--search", "threshold=0.0025,0.003"]  # thresholds where these random models give 4-8 segments
    segment.main([*map(str, args), "--out", str(tmp_path / "one")])
    torchrun("segment.py", *args, "--out", tmp_path / "two")
    for sub in ("threshold0.0025", "threshold0.003"):
        one, two = tmp_path / "one" / sub, tmp_path / "two" / sub
        a, b = csv_rows(one / "dice.csv"), csv_rows(two / "dice.csv")
        assert [r["image"] for r in a] == [r["image"] for r in b] == [f"p{i}" for i in range(5)]
        for ra, rb in zip(a, b):  # float rounding of another batch composition only
            assert ra.keys() == rb.keys() and all(float(ra[k]) == pytest.approx(float(rb[k]), abs=1e-6)
                                                  for k in ra if k not in ("image", "path"))
        sa, sb = json.loads((one / "summary.json").read_text()), json.loads((two / "summary.json").read_text())
        assert sa.keys() == sb.keys() and sa["n"] == sb["n"] == 5
        assert sa["mean_num_segments"] > 2  # label maps with several segments, not blank ones
        assert all(sa[k] == pytest.approx(sb[k], abs=1e-6) for k in sa if k.startswith("mean_"))
        assert all(np.array_equal(pixels(one / "labels" / f"p{i}.png"), pixels(two / "labels" / f"p{i}.png"))
                   for i in range(5))
    assert csv_rows(tmp_path / "one" / "summary.csv") == csv_rows(tmp_path / "two" / "summary.csv")
    # resume under torchrun: p1 (rank 1) lacks one setting, p2 (rank 0) the other; each rank redoes only its own
    two, before = tmp_path / "two", {f: f.stat().st_mtime_ns for f in (tmp_path / "two").rglob("*.png")}
    reports = {f: csv_rows(two / f / "dice.csv") for f in ("threshold0.0025", "threshold0.003")}
    (two / "threshold0.0025" / "labels" / "p1.json").unlink(), (two / "threshold0.003" / "labels" / "p2.json").unlink()
    torchrun("segment.py", *args, "--out", two)
    redone = {f.relative_to(two).as_posix() for f, t in before.items() if f.stat().st_mtime_ns != t}
    assert {f for f in redone if "/labels/" in f} == {f"threshold{t}/labels/p{i}.png" for t in ("0.0025", "0.003")
                                                      for i in (1, 2)}  # both settings of p1 and p2, no other
    assert {f: csv_rows(two / f / "dice.csv") for f in reports} == reports
