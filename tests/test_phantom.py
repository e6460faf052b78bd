"""data/phantom.py: deterministic procedural chest X-ray phantoms, their lung masks, labels and the CLI."""

import csv

import numpy as np
import pytest
from PIL import Image

from data import LABELS
from data.phantom import main, make_phantom, phantom_grid


def test_types_shapes_and_labels():
    image, mask, labels = make_phantom(0)
    assert image.shape == mask.shape == (256, 256)
    assert image.dtype == np.uint8 and mask.dtype == bool
    assert list(labels) == list(LABELS) and set(labels.values()) <= {0, 1}
    assert 30 < image.mean() < 220 and image.std() > 20  # neither blank nor saturated


def test_deterministic_per_seed():
    a, b, c = make_phantom(7, 64), make_phantom(7, 64), make_phantom(8, 64)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("size", [32, 64, 256])
def test_sizes_and_mask_sanity(size):
    for seed in range(3):
        image, mask, _ = make_phantom(seed, size)
        assert image.shape == mask.shape == (size, size)
        assert 0.1 < mask.mean() < 0.6  # lung fraction
        assert image[mask].mean() < image[~mask].mean()  # lungs are dark (air)
        rows, cols = np.nonzero(mask)  # inside the body: off the image border, below the top edge
        assert rows.min() > 0.05 * size and 0 < cols.min() and cols.max() < size - 1
        left, right = mask[:, : size // 2].sum(), mask[:, size // 2:].sum()
        assert left > 0 and right > 0  # two lungs


def test_size_independent_anatomy_and_labels():
    small, large = make_phantom(3, 64), make_phantom(3, 256)
    assert small[2] == large[2]
    down = np.asarray(Image.fromarray(large[1].astype(np.uint8) * 255).resize((64, 64), Image.BILINEAR)) > 127
    assert (down != small[1]).mean() < 0.03  # the same lung fields, rasterized at two sizes


def test_label_balance():
    found = [make_phantom(s, 32)[2] for s in range(200)]
    y = np.array([[f[k] for k in LABELS] for f in found])
    rate = y.mean(0)
    assert ((rate > 0.05) & (rate < 0.5)).all(), dict(zip(LABELS, rate))
    assert 0.1 < (y.sum(1) == 0).mean() < 0.5  # several images with no finding
    assert (y.sum(1) >= 2).any()  # multi-label happens
    assert (y[:, LABELS.index("Pneumonia")] <= y[:, LABELS.index("Consolidation")]).all()  # lobar => both


def test_findings_are_visible():
    """Each finding changes the lung fields: the mean lung brightness of positives differs from negatives."""
    imgs, masks, ys = zip(*(make_phantom(s, 64) for s in range(120)))
    lung = np.array([i[m].mean() for i, m in zip(imgs, masks)])
    for k in ("Consolidation", "Edema", "Pleural Effusion"):
        pos = np.array([y[k] for y in ys], bool)
        assert lung[pos].mean() > lung[~pos].mean() + 3, k


def test_cli_writes_images_masks_and_csv(tmp_path):
    main(["--out", str(tmp_path), "-n", "3", "--size", "32", "--seed", "5", "--grid", str(tmp_path / "g.png")])
    with open(tmp_path / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "mask", *LABELS] and len(rows) == 3
    for i, row in enumerate(rows):
        image = np.asarray(Image.open(tmp_path / row["path"]))
        mask = np.asarray(Image.open(tmp_path / row["mask"]))
        ref_image, ref_mask, ref_labels = make_phantom(5 + i, 32)
        assert np.array_equal(image, ref_image) and np.array_equal(mask, ref_mask.astype(np.uint8) * 255)
        assert {k: int(row[k]) for k in LABELS} == ref_labels
    assert Image.open(tmp_path / "g.png").size == (128, 128)
    assert phantom_grid(2, 32).shape == (64, 64)


@pytest.mark.parametrize("args, needle", [(["-n", "-1"], "-n"), (["--size", "8"], "--size"),
                                          (["--seed", "x"], "--seed"), (["-n", "1", "--out", "/dev/null/x"], "/dev/null/x")])
def test_cli_errors_are_one_line(tmp_path, args, needle):
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    argv = ["--out", str(tmp_path / "out"), *args] if "--out" not in args else args
    env = {k: v for k, v in os.environ.items() if k != "DINO_DEBUG"}
    res = subprocess.run([sys.executable, "-m", "data.phantom", *argv], cwd=REPO, capture_output=True, text=True, env=env)
    err = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(err) == 1 and needle in err[0], res.stderr
