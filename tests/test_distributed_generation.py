"""sample.py / segment.py under torchrun (2 gloo ranks == 1 process) and kill-and-rerun resume."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sample
from tests import test_sample
from tests.helpers import REPO
from tests.test_train import _free_port

run_dir, phantoms = test_sample.run_dir, test_sample.phantoms  # its module-scoped fixtures (a micro run)


def torchrun(script, *args):
    """`torchrun --nproc_per_node 2 -- SCRIPT ARGS` (the `--` form the README uses) on gloo, one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "--", script, *map(str, args)]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
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
