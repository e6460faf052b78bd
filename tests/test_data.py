"""Data readers, preprocessing, augmentation and datasets (data/readers.py, transforms.py, datasets.py)."""

import csv
import importlib.util
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import LABELS
from data.datasets import (
    CSVDataset,
    DataWarning,
    ImageFolderDataset,
    PhantomDataset,
    ShardDataset,
    collate,
    open_dataset,
)
from data.readers import ImageReadError, decode_image, list_shards, read_image, read_labels_csv
from data.transforms import (
    Augment,
    adjust_sharpness,
    augment,
    border_box,
    preprocess_cxr,
    preprocess_mask,
    resize,
    to_uint8,
    warp_affine,
)
from tests.support_data import center_crop_square, remove_border

rng = np.random.default_rng(0)


def cxr(h=24, w=24, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(20, 236, (h, w), dtype=np.uint8)


def png_bytes(arr: np.ndarray, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------------ readers
def test_read_png_8_and_16_bit(tmp_path):
    a8 = cxr()
    assert np.array_equal(read_image(write(tmp_path / "a.png", png_bytes(a8))), a8)
    a16 = rng.integers(0, 4096, (12, 10)).astype(np.uint16)  # a 12-bit detector in a 16-bit PNG
    Image.fromarray(a16).save(tmp_path / "b.png")
    got = read_image(tmp_path / "b.png")
    assert got.dtype == np.uint16 and np.array_equal(got, a16)


def test_read_jpeg_and_rgb(tmp_path):
    a = cxr(32, 32)
    got = read_image(write(tmp_path / "a.JPG", png_bytes(a, "JPEG")))
    assert got.dtype == np.uint8 and got.shape == a.shape and np.abs(got.astype(int) - a).mean() < 20
    rgb = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    got = read_image(write(tmp_path / "rgb.png", png_bytes(rgb)))
    luma = rgb @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, Pillow's convert("L")
    assert got.shape == (8, 9) and np.abs(got - luma).max() <= 1


def test_read_dicom_monochrome1_window_rescale(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    raw = np.array([[0, 1000, 1536], [2048, 2560, 4095]], np.uint16)  # 12-bit stored values
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 2, 3, 1
    ds.PhotometricInterpretation = "MONOCHROME1"  # high value = dark: must come out inverted
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -2048  # modality values -2048 .. 6142
    ds.WindowCenter, ds.WindowWidth = 1024, 2049  # LINEAR window over modality values [0, 2048]
    ds.PixelData = raw.tobytes()
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    got = read_image(tmp_path / "x.dcm")
    assert got.dtype == np.uint16
    # raw 0, 1000 -> below the window -> black -> inverted white; raw 2048.. -> above -> white -> black
    assert got[0, 0] == got[0, 1] == 65535 and got[1, 0] == got[1, 1] == got[1, 2] == 0
    assert abs(int(got[0, 2]) - 65535 // 2) < 700  # raw 1536 -> modality 1024, the window centre
    assert pydicom.dcmread(tmp_path / "x.dcm").PhotometricInterpretation == "MONOCHROME1"


def test_dicom_without_pydicom_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pydicom", None)  # as if not installed
    with pytest.raises(ImportError, match=r"x\.dcm needs pydicom"):
        read_image(write(tmp_path / "x.dcm", b"\0" * 128 + b"DICM"))


@pytest.mark.parametrize("name,data", [("junk.png", bytes(rng.integers(0, 256, 300, dtype=np.uint8))),
                                       ("text.jpg", b"not an image at all"),
                                       ("cut.png", png_bytes(cxr(64, 64))[:80])])
def test_unreadable_file_names_it(tmp_path, name, data):
    with pytest.raises(ImageReadError, match=name):
        read_image(write(tmp_path / name, data))
    with pytest.raises(ImageReadError, match="missing.png"):
        read_image(tmp_path / "missing.png")


# ------------------------------------------------------------------------------------------ preprocessing
def test_border_removal_finds_content_box():
    img = np.zeros((40, 50), np.uint8)
    img[:, 38:] = 255  # white frame on the right, black elsewhere
    img[5:30, 7:38] = cxr(25, 31)
    img[0, 0] = 3  # JPEG-like noise in the padding stays under the tolerance
    assert border_box(img) == (5, 30, 7, 38)
    assert remove_border(img).shape == (25, 31)
    flat = np.full((9, 9), 128, np.uint8)
    assert remove_border(flat).shape == (9, 9)  # a blank image is left alone


def test_center_crop_uint16_scaling_and_resize():
    img = np.arange(10 * 16).reshape(10, 16)
    assert np.array_equal(center_crop_square(img), img[:, 3:13])
    assert center_crop_square(torch.zeros(1, 16, 10)).shape == (1, 10, 10)
    a16 = np.array([[1000, 2000], [3000, 3000]], np.uint16)
    assert to_uint8(a16).tolist() == [[0, 128], [255, 255]]  # min-max onto 0..255
    a8 = cxr()
    assert to_uint8(a8) is a8
    ramp = np.arange(100, dtype=np.uint16).reshape(10, 10) * 10
    ramp[9, 9] = 60000  # one hot pixel squashes min-max scaling; percentiles clip it
    assert to_uint8(ramp)[5, 0] == 2 and abs(int(to_uint8(ramp, percentiles=(0, 98))[5, 0]) - 130) <= 1
    checker = torch.from_numpy(np.indices((64, 64)).sum(0) % 2).float()[None]
    small = resize(checker, 8)
    assert small.shape == (1, 8, 8) and torch.allclose(small, torch.full_like(small, 0.5), atol=1e-3)  # antialiased


def test_preprocess_cxr_and_mask():
    img = np.zeros((30, 40), np.uint16)
    img[2:28, 4:36] = rng.integers(500, 3000, (26, 32))
    mask = np.zeros(img.shape, bool)
    mask[2:15, 4:20] = True
    x = preprocess_cxr(img, 16)
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    m = preprocess_mask(mask, img, 16)
    assert set(m.unique().tolist()) == {0.0, 1.0} and 0.1 < m.mean() < 0.5
    full = preprocess_cxr(img, None)  # the black frame is gone and does not compress the contrast
    assert torch.equal(full, torch.from_numpy(to_uint8(img[2:28, 7:33])[None]).float() / 255)


# ------------------------------------------------------------------------------------------- augmentation
def test_augment_deterministic_per_generator():
    x = torch.rand(3, 1, 16, 16)
    g = lambda s: torch.Generator().manual_seed(s)
    assert torch.equal(augment(x, g(1)), augment(x, g(1)))
    assert not torch.equal(augment(x, g(1)), augment(x, g(2)))
    single = augment(x[0], g(3))
    assert single.shape == (1, 16, 16) and 0 <= single.min() and single.max() <= 1
    img, m = augment(x[0], g(4), mask=(x[0] > 0.5).float())
    assert torch.equal(img, augment(x[0], g(4))) and set(m.unique().tolist()) <= {0.0, 1.0}


def test_augment_identity_at_zero_strength():
    x = torch.rand(2, 1, 12, 20)
    assert (warp_affine(x, torch.tensor([[0.0, 0, 0, 1]] * 2)) - x).abs().max() < 1e-5
    none = Augment(sharpen_p=0.0, shear=0.0, translate=0.0, scale=(1.0, 1.0))
    assert (none(x, torch.Generator().manual_seed(0)) - x).abs().max() < 1e-5
    assert torch.equal(adjust_sharpness(x, 1.0), x)


def test_sharpen_and_affine_match_torchvision():
    pytest.importorskip("torchvision")
    import torchvision.transforms.functional as TF

    x = torch.rand(2, 1, 20, 24)
    for f in (0.5, 1.7):
        assert (adjust_sharpness(x, f) - TF.adjust_sharpness(x, f)).abs().max() < 1e-6
    sh, s = 0.05, 1.2  # our shear factor sh = torchvision's shear of -atan(sh) degrees
    ours = warp_affine(x, torch.tensor([[sh, 2 / 24, -3 / 20, s]] * 2))
    ref = TF.affine(x, angle=0.0, translate=[2, -3], scale=s, shear=[-math.degrees(math.atan(sh)), 0.0],
                    interpolation=TF.InterpolationMode.BILINEAR)
    assert (ours - ref).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------- datasets
def test_folder_dataset_skips_corrupt_file(tmp_path):
    for i in range(3):
        write(tmp_path / "imgs" / f"sub/{i}.png", png_bytes(cxr(seed=i)))
    bad = write(tmp_path / "imgs" / "1b_corrupt.png", bytes(rng.integers(0, 256, 200, dtype=np.uint8)))
    write(tmp_path / "imgs" / ".hidden.png", b"junk")
    ds = open_dataset(tmp_path / "imgs", 16)
    assert isinstance(ds, ImageFolderDataset) and len(ds) == 4  # sorted: 1b_corrupt.png first
    with pytest.warns(DataWarning, match=bad.name):
        item = ds[0]
    assert item["path"].endswith("0.png") and item["index"] == 1  # the next readable item
    assert item["image"].shape == (1, 16, 16) and ds.skipped and bad.name in ds.report()
    batch = collate([ds[i] for i in range(1, 4)])
    assert batch["image"].shape == (3, 1, 16, 16) and batch["index"].tolist() == [1, 2, 3]
    assert isinstance(batch["path"], list) and len(batch["path"]) == 3


def test_empty_or_missing_source_is_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        open_dataset(tmp_path / "empty", 16)
    with pytest.raises(FileNotFoundError, match="nope"):
        open_dataset(tmp_path / "nope", 16)


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_csv_labels_and_dataset(tmp_path):
    img = write(tmp_path / "images/a.png", png_bytes(cxr()))
    write(tmp_path / "masks/a.png", png_bytes((cxr() > 128).astype(np.uint8) * 255))
    rows = [{"path": "images/a.png", "mask": "masks/a.png", "Edema": "1", "Atelectasis": "", "id": "x"},
            {"path": str(img), "mask": "masks/a.png", "Edema": "-1", "Atelectasis": "0.0", "id": "y"}]
    f = write_csv(tmp_path / "labels.csv", rows)
    paths, y, extras = read_labels_csv(f)
    assert paths == [str(img)] * 2 and y.tolist() == [[0, 1], [0, 0]]  # LABELS order: Atelectasis, Edema
    assert extras["id"] == ["x", "y"] and "mask" in extras
    assert read_labels_csv(f, ["Edema"], uncertain=1.0)[1].tolist() == [[1], [1]]  # U-Ones
    ds = open_dataset(f, 16, labels=["Edema", "Atelectasis"], augment=True)
    item = ds[0]
    assert isinstance(ds, CSVDataset) and item["labels"].tolist() == [1, 0] and item["mask"].shape == (1, 16, 16)
    assert torch.equal(ds[0]["image"], item["image"])  # augmentation seeded per (seed, epoch, index)
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], item["image"])


def test_csv_errors_name_file_and_column(tmp_path):
    write(tmp_path / "a.png", png_bytes(cxr()))
    with pytest.raises(ValueError, match=r"no 'path' column.*"):
        read_labels_csv(write_csv(tmp_path / "nopath.csv", [{"file": "a.png"}]))
    f = write_csv(tmp_path / "l.csv", [{"path": "a.png", "Edema": "2"}])
    with pytest.raises(ValueError, match=r"l\.csv has no label column\(s\) \['Pneumonia'\]"):
        read_labels_csv(f, ["Pneumonia"])
    with pytest.raises(ValueError, match=r"l\.csv, line 2, column 'Edema'.*'2'"):
        read_labels_csv(f)
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        read_labels_csv(tmp_path / "absent.csv")
    with pytest.raises(ValueError, match="none of the 1 images"):
        open_dataset(write_csv(tmp_path / "m.csv", [{"path": "gone.png"}]), 16)


def write_shards(root: Path, n_shards=2, per_shard=3) -> list[str]:
    root.mkdir(exist_ok=True)
    names = []
    for s in range(n_shards):
        path = root / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for k in range(per_shard):
                key = f"s{s}_{k}"
                labels = {f"{key}.json": json.dumps({"Edema": k % 2, "Pneumonia": -1}).encode(),  # -1 -> 0
                          f"{key}.cls": f"{k % 2},0".encode()}
                files = {f"{key}.png": png_bytes(cxr(seed=10 * s + k)), **dict([list(labels.items())[s % 2]])}
                if k == 1:
                    files[f"{key}.mask.png"] = png_bytes(np.full((24, 24), 255, np.uint8))
                for name, data in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        names.append(str(path))
    return names


def keys_of(ds) -> list[str]:
    return [item["path"] for item in ds]


def test_shards_read_labels_and_split(tmp_path):
    shards = write_shards(tmp_path)
    assert list_shards(str(tmp_path / "shard-{000..001}.tar")) == shards
    ds = open_dataset(str(tmp_path / "shard-{000..001}.tar"), 16, labels=["Edema", "Pneumonia"])
    items = list(ds)
    assert isinstance(ds, ShardDataset) and len(items) == 6
    assert [it["labels"].tolist() for it in items] == [[k % 2, 0] for k in (0, 1, 2, 0, 1, 2)]  # .json, .cls
    assert items[1]["mask"].shape == (1, 16, 16) and "mask" not in items[0]
    every = sorted(it["path"] for it in items)
    shuffled = ShardDataset(shards, 16, shuffle=True, shuffle_buffer=3, seed=5)
    assert keys_of(shuffled) == keys_of(shuffled) != every and sorted(keys_of(shuffled)) == every
    assert "labels" not in next(iter(shuffled))  # labels only when asked for
    bad_labels = ShardDataset(shards, 16, labels=list(LABELS))  # .cls "1,0" has 2 values for 7 labels
    with pytest.warns(DataWarning) as caught:
        assert len(keys_of(bad_labels)) == 3
    assert any("shard-001.tar:s1_0.png: 2 label values for 7" in str(w.message) for w in caught)
    for world in (2, 4):  # 2 readers: one shard each; 4 readers > 2 shards: every 4th sample each
        parts = [keys_of(open_dataset(tmp_path, 16, rank=r, world_size=world)) for r in range(world)]
        assert sorted(sum(parts, [])) == every and all(parts)
    four = write_shards(tmp_path / "four", n_shards=4, per_shard=1)  # 2 ranks x 2 workers: a shard each
    loader = torch.utils.data.DataLoader(ShardDataset(four, 16, rank=1, world_size=2), batch_size=None,
                                         num_workers=2)
    assert sorted(Path(it["path"]).name for it in loader) == ["shard-002.tar:s2_0.png", "shard-003.tar:s3_0.png"]


def test_shard_with_corrupt_sample_warns_and_continues(tmp_path):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.png", png_bytes(cxr())), ("b.png", b"garbage"), ("c.jpg", png_bytes(cxr(), "JPEG"))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = open_dataset(path, 8)
    with pytest.warns(DataWarning) as caught:
        got = keys_of(ds)
    assert any("bad.tar:b.png" in str(w.message) for w in caught)
    assert [Path(p).name for p in got] == ["bad.tar:a.png", "bad.tar:c.jpg"] and len(ds.skipped) == 1


def test_decode_image_bytes_names_source():
    with pytest.raises(ImageReadError, match="shard.tar:x.png"):
        decode_image(b"\x89PNG nope", "shard.tar:x.png")


@pytest.mark.skipif(importlib.util.find_spec("data.phantom") is None, reason="data/phantom.py not written yet")
def test_phantom_dataset():
    ds = open_dataset(None, 32, phantoms=3)
    item = ds[2]
    assert isinstance(ds, PhantomDataset) and len(ds) == 3 and item["image"].shape == (1, 32, 32)
    assert item["labels"].shape == (len(LABELS),) and item["mask"].shape == (1, 32, 32)
    assert torch.equal(open_dataset("phantom", 32, phantoms=3)[2]["image"], item["image"])


def test_real_cxrs(shared_data):
    ds = open_dataset(shared_data / "cxr-lungs" / "index.csv", 64)  # `image` + `mask` columns
    batch = collate([ds[i] for i in range(3)])
    assert batch["image"].shape == (3, 1, 64, 64) and 0.2 < batch["image"].mean() < 0.8
    assert ((batch["mask"] == 0) | (batch["mask"] == 1)).all() and 0.1 < batch["mask"].mean() < 0.7
    img = read_image(Path(ds.paths[0]))
    assert img.dtype == np.uint8 and img.shape == (256, 256)
    lungs = shared_data / "cxr-lungs"
    folder = open_dataset(lungs / "images", 32, masks=lungs / "masks")  # segment.py's --images/--masks
    assert len(folder) == len(ds) and folder[0]["mask"].shape == (1, 32, 32)


def test_open_dataset_masks_folder(tmp_path):
    """masks=DIR pairs by relative path and stem (any extension); augmentation moves image and mask together."""
    rng = np.random.default_rng(0)
    for sub in ("images/a", "masks/a"):
        (tmp_path / sub).mkdir(parents=True)
    for name in ("a/x", "y"):
        Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(tmp_path / "images" / f"{name}.png")
        mask = np.zeros((24, 24), np.uint8)
        mask[4:20, 6:18] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"{name}.jpg")
    ds = open_dataset(tmp_path / "images", 16, masks=tmp_path / "masks", augment=True)
    item = ds[0]
    assert [Path(m).name for m in ds.masks] == ["x.jpg", "y.jpg"] and item["mask"].shape == (1, 16, 16)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0} and ds.select([1])[0]["path"].endswith("y.png")
    (tmp_path / "masks" / "y.jpg").unlink()
    with pytest.raises(ValueError, match="no mask in .* for 1 image"):
        open_dataset(tmp_path / "images", 16, masks=tmp_path / "masks")
    with pytest.raises(FileNotFoundError, match="mask folder"):
        open_dataset(tmp_path / "images", 16, masks=tmp_path / "nowhere")
    for source in (None, tmp_path / "x.csv", tmp_path / "s.tar"):
        with pytest.raises(ValueError, match="pairs masks with a folder"):
            open_dataset(source, 16, masks=tmp_path / "masks")
