"""eval/memorization.py (nearest-neighbour copy detection) and the two CLIs (memorization, diversity)."""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.overrides import TorchFunctionMode

from data.phantom import make_phantom
from eval.memorization import (
    dino_features,
    memorization_check,
    nearest_neighbors,
    pixel_features,
    random_dino,
)


def phantoms(seeds, size=64) -> torch.Tensor:
    return torch.stack([torch.from_numpy(make_phantom(s, size)[0]).float()[None] / 255 for s in seeds])


@pytest.fixture(scope="module")
def cxr():
    """60 training phantoms, 40 held-out ones and 40 more unseen ones (all different seeds), 64 px."""
    imgs = phantoms(range(140))
    return {"train": imgs[:60], "heldout": imgs[60:100], "new": imgs[100:]}


# ------------------------------------------------------------------------------------- nearest neighbours


def test_chunked_search_equals_full_matrix():
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(300, 16, generator=g), torch.randn(200, 16, generator=g) * 3
    full = F.normalize(q, dim=1) @ F.normalize(r, dim=1).T
    want_s, want_i = full.topk(3, dim=1)
    for chunk in (7, 64, 1000):
        s, i = nearest_neighbors(q, r, k=3, chunk_size=chunk)
        assert torch.equal(i, want_i)
        assert torch.allclose(s, want_s, atol=1e-6)
    s, i = nearest_neighbors(q, r[:2], k=5, chunk_size=64)  # k larger than the reference set
    assert s.shape == (300, 2)


class MaxTensorSize(TorchFunctionMode):
    """Records the largest tensor any torch function returns inside the block."""

    def __init__(self):
        super().__init__()
        self.largest, self.calls = 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        self.calls += 1
        return out


def test_5000_by_5000_search_stays_in_chunks():
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(5000, 64, generator=g)
    perm = torch.randperm(5000, generator=g)
    query = reference[perm] + 0.01 * torch.randn(5000, 64, generator=g)
    with MaxTensorSize() as probe:
        sims, idx = nearest_neighbors(query, reference, k=1, chunk_size=512)
    assert probe.calls > 100  # the probe did see the block products
    assert probe.largest <= 5000 * 64  # the features themselves; a block is 512 * 512 < 5000 * 64
    assert torch.equal(idx[:, 0], perm) and (sims > 0.99).all()


# ------------------------------------------------------------------------------------- flags


def test_identical_images_have_similarity_one_and_are_flagged(cxr):
    dino = random_dino(0)
    for name, fn in (("pixel", pixel_features), ("dino", lambda x: dino_features(dino, x))):
        train = fn(cxr["train"])
        res = memorization_check(fn(cxr["train"][:8]), train, fn(cxr["heldout"]))
        assert torch.allclose(res.similarity, torch.ones(8), atol=1e-5), name
        assert res.flagged.all() and torch.equal(res.nearest, torch.arange(8)), name
        assert res.threshold < 0.999, name


def test_copies_and_light_augmentations_are_flagged_new_images_are_not(cxr):
    g = torch.Generator().manual_seed(1)
    train = cxr["train"]
    copies = train[:10]
    shifted = torch.roll(train[10:20], shifts=(1, 1), dims=(2, 3))  # 1 px = 1.6 % of the image
    noisy = (train[20:30] + 0.05 * torch.randn(10, 1, 64, 64, generator=g)).clamp(0, 1)
    brighter = (0.9 * train[30:40] + 0.08).clamp(0, 1)
    synthetic = torch.cat([copies, shifted, noisy, brighter, cxr["new"]])
    res = memorization_check(pixel_features(synthetic), pixel_features(train), pixel_features(cxr["heldout"]),
                             quantile=0.99)
    flags = res.flagged.float()
    assert flags[:10].all()  # exact copies
    assert torch.equal(res.nearest[20:40], torch.arange(20, 40))  # noisy/brighter copies find their original
    assert (res.nearest[10:20] == torch.arange(10, 20)).float().mean() >= 0.8  # shifted ones mostly do
    assert flags[20:40].mean() >= 0.9  # noise, brightness/contrast: NCC ignores them
    assert flags[10:40].mean() >= 0.7  # light augmentations overall (sub-pixel shifts: about half)
    assert flags[40:].mean() <= 0.1  # genuinely new phantoms: calibrated at ~1 %
    s = res.summary
    assert s["flagged_count"] == int(flags.sum()) and s["n_heldout"] == 40 and s["centered"]
    assert s["heldout_above_threshold"] <= 0.05
    assert sum(s["histogram"]["synthetic"]) == 80 and sum(s["histogram"]["heldout"]) == 40
    json.dumps(s)


def test_heldout_split_of_train(cxr):
    feats = pixel_features(cxr["train"])
    res = memorization_check(feats[:5], feats, heldout_index=torch.arange(50, 60))
    assert res.summary["n_heldout"] == 10 and res.flagged.all()
    with pytest.raises(ValueError, match="heldout"):
        memorization_check(feats[:5], feats)


def test_library_calls_check_their_arguments():  # the CLIs check theirs at parse time; these are the library's
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"\[Q, D\] and \[R, D\]"):
        nearest_neighbors(x, torch.randn(6, 5))
    with pytest.raises(ValueError, match="quantile must be in"):
        memorization_check(x, x, x, quantile=1.0)
    with pytest.raises(ValueError, match="both sides"):
        memorization_check(x, x, heldout_index=torch.arange(6))
    from eval.diversity import diversity_report

    with pytest.raises(ValueError, match="one entry per synthetic image"):
        diversity_report(torch.rand(4, 1, 32, 32), groups=[0, 0, 1])


def test_xrv_features_find_copies(cxr):
    from eval.densenet import DenseNet121
    from eval.fid import XRVDenseNetFeatures

    xrv = XRVDenseNetFeatures(DenseNet121.tiny(in_channels=1), name="xrv-tiny", resolution=64).eval()
    with torch.no_grad():
        train, held = xrv(cxr["train"][:30]), xrv(cxr["heldout"][:20])
    res = memorization_check(train[:4], train, held)
    assert res.flagged.all() and torch.allclose(res.similarity, torch.ones(4), atol=1e-5)


# ------------------------------------------------------------------------------------- CLIs


def write_pngs(folder, images, names):
    folder.mkdir(parents=True, exist_ok=True)
    for img, name in zip(images, names):
        Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8)).save(folder / name)


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    """train/ (24 phantoms), heldout/ (8), synthetic/ (4 copies of train + 4 new) and a synthetic.csv in
    sample.py's format (3 variations per source: copy, noisy copy, new image)."""
    root = tmp_path_factory.mktemp("memo")
    imgs = phantoms(range(200, 240))
    train_names = [f"t{i:02d}.png" for i in range(24)]
    write_pngs(root / "train", imgs[:24], train_names)
    write_pngs(root / "heldout", imgs[24:32], [f"h{i}.png" for i in range(8)])
    write_pngs(root / "synthetic" / "images", torch.cat([imgs[:4], imgs[32:36]]),
               [f"s{i}.png" for i in range(8)])
    g = torch.Generator().manual_seed(0)
    noisy = (imgs[:4] + 0.03 * torch.randn(4, 1, 64, 64, generator=g)).clamp(0, 1)
    write_pngs(root / "synthetic" / "images", torch.cat([noisy, imgs[36:40]]), [f"v{i}.png" for i in range(8)])
    with open(root / "synthetic" / "synthetic.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "source", "source_b", "r", "seed", "Cardiomegaly"])
        for i in range(4):
            src = str(root / "train" / train_names[i])
            for name in (f"s{i}.png", f"v{i}.png", f"v{i + 4}.png"):
                w.writerow([f"images/{name}", src, "", "", i, 0])
    return root


def test_memorization_cli_end_to_end(cli_data, tmp_path):
    from eval.memorization import main

    out = tmp_path / "out"
    with pytest.warns(UserWarning) as record:
        summary = main(["--train", str(cli_data / "train"), "--synthetic", str(cli_data / "synthetic" / "images"),
                        "--out", str(out), "--batch-size", "8", "--chunk-size", "5", "--grid", "6",
                        "--heldout-fraction", "0.25", "--device", "cpu"])
    assert any("RANDOM-INIT" in str(w.message) for w in record)  # said loudly, and in the summary:
    assert set(summary["spaces"]) == {"dino", "pixel"}
    assert "RANDOM-INIT" in summary["spaces"]["dino"]["features"]
    assert summary["spaces"]["pixel"]["n_heldout"] == 6 and summary["spaces"]["dino"]["n_train"] == 24
    assert json.loads((out / "memorization.json").read_text())["image_size"] == 56  # tiny DINO's input size
    rows = list(csv.DictReader(open(out / "memorization.csv")))
    assert len(rows) == 16 and {"pixel_nearest", "pixel_similarity", "pixel_flagged", "dino_flagged"} <= set(rows[0])
    by_name = {r["path"].rsplit("/", 1)[1]: r for r in rows}
    for i in range(4):  # exact copies: nearest is the original, flagged in both spaces
        r = by_name[f"s{i}.png"]
        assert r["pixel_nearest"].endswith(f"t{i:02d}.png") and r["pixel_flagged"] == "1" == r["dino_flagged"]
        assert float(r["pixel_similarity"]) > 0.9999
    assert sum(by_name[f"s{i}.png"]["pixel_flagged"] == "1" for i in range(4, 8)) <= 1
    for space in ("pixel", "dino"):
        with Image.open(out / f"closest_{space}.png") as im:
            assert im.size[0] > 4 * 128 and im.size[1] > 128


def test_memorization_cli_heldout_folder_shards_and_csv(cli_data, tmp_path):
    """--train as webdataset shards (streamed, no indexing), --synthetic as sample.py's CSV, --heldout DIR."""
    import tarfile

    from eval.memorization import main

    with tarfile.open(tmp_path / "train-000.tar", "w") as tar:
        for p in sorted((cli_data / "train").iterdir()):
            tar.add(p, arcname=p.name)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="held-out"):
        summary = main(["--train", str(tmp_path / "train-000.tar"), "--synthetic", str(cli_data / "synthetic" / "synthetic.csv"),
                        "--heldout", str(cli_data / "heldout"), "--features", "pixel", "--out", str(out),
                        "--size", "48", "--device", "cpu"])
    assert set(summary["spaces"]) == {"pixel"} and summary["spaces"]["pixel"]["n_heldout"] == 8
    rows = list(csv.DictReader(open(out / "memorization.csv")))
    assert len(rows) == 12 and sum(r["pixel_flagged"] == "1" for r in rows) >= 8  # 4 copies + 4 noisy copies
    assert rows[0]["pixel_nearest"].endswith("train-000.tar:t00.png")
    assert (out / "closest_pixel.png").is_file()
    with pytest.raises(SystemExit, match="xrv-weights"):
        main(["--train", str(cli_data / "train"), "--synthetic", str(cli_data / "heldout"), "--out", str(out),
              "--features", "xrv"])


def test_diversity_cli_csv_and_folder(cli_data, tmp_path):
    from eval.diversity import main

    out = tmp_path / "div"
    summary = main(["--synthetic", str(cli_data / "synthetic" / "synthetic.csv"), "--out", str(out),
                    "--device", "cpu"])
    assert summary["image_size"] == [64, 64] and summary["n_groups"] == 4 and len(summary["ms_ssim"]["weights"]) == 3
    assert summary["within_source"]["n"] == 12 and summary["to_source"]["n"] == 12
    assert summary["source_pairs"]["n"] == 6 and summary["random_pairs"]["n"] == 54
    rows = list(csv.DictReader(open(out / "diversity.csv")))
    assert len(rows) == 12 and all(r["msssim_to_source"] and r["msssim_within_source"] for r in rows)
    copy = next(r for r in rows if r["path"].endswith("s0.png"))
    assert float(copy["msssim_to_source"]) > 0.9999
    assert json.loads((out / "diversity.json").read_text())["to_source"]["max"] > 0.9999
    assert (out / "least_diverse.png").is_file()

    summary = main(["--synthetic", str(cli_data / "heldout"), "--out", str(tmp_path / "div2"), "--size", "64",
                    "--small", "window", "--max-pairs", "10"])
    assert summary["random_pairs"]["n"] == 10 and "within_source" not in summary
    assert summary["ms_ssim"]["win_size"] == 3
    assert (tmp_path / "div2" / "least_diverse.png").is_file()
