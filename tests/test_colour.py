"""Colour modalities (`--channels 3`): RGB reading, preprocessing, colour phantoms, a colour run end to end."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from data.colour_phantom import COLOUR_LABELS, make_colour_phantom
from data.datasets import open_dataset
from data.readers import decode_image, read_image
from data.transforms import augment, preprocess_cxr, preprocess_mask
from tests.test_train import MICRO, losses


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_colour_phantom_is_deterministic_with_a_lesion_mask():
    img, mask, labels = make_colour_phantom(3, 64)
    again = make_colour_phantom(3, 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and mask.shape == (64, 64) and mask.dtype == bool
    assert np.array_equal(img, again[0]) and np.array_equal(mask, again[1]) and labels == again[2]
    assert mask.any() and set(labels) == set(COLOUR_LABELS) and labels["polyp"] + labels["ulcer"] == 1
    frames = [make_colour_phantom(s, 64) for s in range(12)]
    means = {nbi: [im.reshape(-1, 3).mean(0) for im, _, lab in frames if lab["nbi"] == nbi] for nbi in (0, 1)}
    assert means[0] and means[1]
    assert all(m[0] > m[1] for m in means[0]) and all(m[1] > m[0] for m in means[1])  # red vs teal light


def test_read_image_keeps_rgb_only_when_asked():
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 200, 30
    data = png_bytes(rgb)
    assert np.array_equal(decode_image(data, "x.png", 3), rgb)
    grey = decode_image(data, "x.png")  # the default stays luminance, as before
    assert grey.shape == (6, 8) and grey[0, 0] == round(0.299 * 200 + 0.114 * 30)
    g16 = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000)
    buf = io.BytesIO()
    Image.fromarray(g16).save(buf, format="PNG")
    out = decode_image(buf.getvalue(), "g.png", 3)  # grey files: repeated, depth kept
    assert out.shape == (6, 8, 3) and out.dtype == np.uint16 and (out == g16[..., None]).all()
    with pytest.raises(ValueError, match="channels"):
        decode_image(data, "x.png", 2)


def test_dicom_rgb_is_kept_with_channels_3(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID, meta.MediaStorageSOPClassUID = ExplicitVRLittleEndian, "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 5, 7, 3, "RGB"
    ds.PlanarConfiguration, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 0, 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()
    ds.save_as(tmp_path / "c.dcm", enforce_file_format=True)
    assert np.array_equal(read_image(tmp_path / "c.dcm", 3), rgb)
    assert read_image(tmp_path / "c.dcm").shape == (5, 7)


def test_colour_preprocessing_and_augmentation():
    img, mask, _ = make_colour_phantom(1, 80)
    framed = np.pad(img, ((10, 10), (0, 0), (0, 0)))  # black padding rows, as exported frames have
    x = preprocess_cxr(framed, 32)
    assert x.shape == (3, 32, 32) and torch.allclose(x, preprocess_cxr(img, 32), atol=1e-6)
    m = preprocess_mask(np.pad(mask, ((10, 10), (0, 0))), framed, 32)
    assert m.shape == (1, 32, 32) and m.sum() > 0
    grey = torch.rand(1, 32, 32)  # every channel gets the same sharpening and affine map
    out = augment(grey.expand(3, -1, -1).clone(), torch.Generator().manual_seed(5))
    assert torch.allclose(out, augment(grey, torch.Generator().manual_seed(5)).expand(3, -1, -1), atol=1e-6)


def test_colour_dataset_and_phantom_items(tmp_path):
    ds = open_dataset(None, 32, phantoms=3, channels=3)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
    assert item["labels"].shape == (len(COLOUR_LABELS),)
    Image.fromarray(make_colour_phantom(0, 40)[0]).save(tmp_path / "a.png")
    assert open_dataset(tmp_path, 32, channels=3)[0]["image"].shape == (3, 32, 32)
    assert open_dataset(tmp_path, 32)[0]["image"].shape == (1, 32, 32)


def test_eval_tools_read_colour(tmp_path):
    from eval import diversity, memorization
    from eval.densenet import DenseNet121, DenseNetConfig
    from eval.fid import _read
    from eval.training import TinyRGBFeatures

    for s in range(6):
        Image.fromarray(make_colour_phantom(s, 64)[0]).save(tmp_path / f"{s}.png")
    rgb = _read(tmp_path / "0.png", TinyRGBFeatures(DenseNet121(DenseNetConfig.tiny(in_channels=3)), 64))  # a 3-channel FID extractor
    assert torch.allclose(rgb, torch.from_numpy(make_colour_phantom(0, 64)[0]).permute(2, 0, 1) / 255)
    assert diversity.load_images([tmp_path / "0.png"], 64, "x", 3).shape == (1, 3, 64, 64)
    diversity.main(["--synthetic", str(tmp_path), "--out", str(tmp_path / "div"), "--channels", "3"])
    assert (tmp_path / "div").is_dir()
    memorization.main(["--train", str(tmp_path), "--synthetic", str(tmp_path), "--out", str(tmp_path / "mem"),
                       "--features", "pixel", "--channels", "3", "--size", "32", "--device", "cpu",
                       "--heldout-fraction", "0.5"])
    assert (tmp_path / "mem").is_dir()


def test_channels_flag_picks_inception_and_refuses_xrv():
    cfg, _ = train.parse_flags(["--channels", "3"])
    assert cfg.channels == 3 and cfg.fid_features == "inception"
    assert cfg.scheduler == {"prediction_type": "v_prediction"}  # a from-scratch colour UNet keeps the tint
    grey = train.parse_flags([])[0]
    assert grey.fid_features == "xrv" and grey.scheduler == {}
    explicit = train.parse_flags(["--channels", "3", "--scheduler", "{}"])[0]
    assert explicit.scheduler == {}
    with pytest.raises(SystemExit, match="--fid-features xrv"):
        train.parse_flags(["--channels", "3", "--fid-features", "xrv"])


# One colour micro run shared by the tests below: the VAE fitted long enough to decode colour, the UNet trained
# from cached latents long enough to follow c_GLB's colour (under a minute on 2 CPU cores). With --channels 3
# a from-scratch UNet defaults to v-prediction (Salimans & Ho 2022) rather than SD v1's epsilon: a frame's tint is its latent's per-channel mean, and only
# the noisiest timesteps decide it. There the epsilon loss weighs an error in z0 by SNR(t) (0.005 at t = 999),
# and x_t still holds sqrt(abar_t) z0, so in 300 steps the UNet learned to read the tint off the noise's own
# mean and not off c_GLB (which does separate red from teal: cosine -0.5 between them, 0.99 within): a red
# source's variations came out R - G +0.02 +- 0.15, half of them teal. v weighs that error by SNR + 1.
COLOUR = ["--channels", "3", "--vae-fit-steps", "150", "--max-steps", "300", "--lr", "3e-3", "--warmup-steps",
          "5", "--save-every", "300", "--log-every", "10", "--phantom-count", "64", "--cache-latents",
          "--batch-size", "8"]


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("colour") / "run"
    train.main([*MICRO, "--out", str(out), *COLOUR])
    return out


def test_colour_tiny_run_learns_and_logs_inception_fid(colour_run):
    ls = losses(colour_run)
    assert np.mean(ls[-8:]) < 0.7 * np.mean(ls[:3]), ls
    cfg = json.loads((colour_run / "config.json").read_text())
    assert cfg["channels"] == 3 and cfg["fid_features"] == "inception"
    assert cfg["scheduler"] == {"prediction_type": "v_prediction"}
    fids = [json.loads(x) for x in (colour_run / "metrics.jsonl").read_text().splitlines() if "fid" in x]
    assert fids and fids[-1]["fid_features"] == "inception" and np.isfinite(fids[-1]["fid"])
    grid = Image.open(colour_run / "samples" / "step_0000300.png").convert("RGB")
    arr = np.asarray(grid, np.float32)
    assert np.abs(arr[..., 0] - arr[..., 1]).mean() > 5  # the grid is in colour, not grey


def channel_means(images: torch.Tensor) -> np.ndarray:
    """Mean R, G, B inside the field of view (pixels that are not black)."""
    x = images.permute(0, 2, 3, 1).reshape(-1, 3)
    return x[x.sum(1) > 0.15].mean(0).numpy()


def test_reconstruction_keeps_the_tint_and_sample_writes_colour(colour_run, tmp_path):
    frames = {nbi: next(im for s in range(5_000_000, 5_000_050)
                        for im, _, lab in [make_colour_phantom(s, 32)] if lab["nbi"] == nbi) for nbi in (0, 1)}
    for nbi, img in frames.items():
        Image.fromarray(img).save(tmp_path / f"src{nbi}.png")
    out = tmp_path / "recon"
    sample.main(["--run", str(colour_run), "--mode", "reconstruction", "--images", str(tmp_path), "--num", "3",
                 "--steps", "10", "--out", str(out), "--device", "cpu"])
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 6 and all(Image.open(p).mode == "RGB" for p in pngs)
    tint = {}  # nbi -> (the source's R - G, each variation's R - G)
    for nbi in (0, 1):
        src = torch.from_numpy(frames[nbi]).permute(2, 0, 1)[None].float() / 255
        variations = [sample.load_png(p)[None] for p in pngs if f"_src{nbi}" in p.name]
        s, v = channel_means(src), np.stack([channel_means(x) for x in variations])
        print(f"nbi={nbi}: source RGB means {s.round(3)}, its variations' R - G {(v[:, 0] - v[:, 1]).round(3)}")
        tint[nbi] = s[0] - s[1], v[:, 0] - v[:, 1]
    (s_red, v_red), (s_teal, v_teal) = tint[0], tint[1]
    assert s_red > 0.2 and s_teal < -0.15, (s_red, s_teal)  # strongly tinted sources
    # Every variation keeps its source's tint, absolutely and near its strength. Measured R - G with training
    # seeds 0, 1, 2: red source +0.32, its variations +0.34 to +0.42; teal source -0.21, its variations -0.26 to
    # -0.13 (a 150-step VAE's own round trip is off by up to 0.09).
    assert (v_red > 0.2).all() and (v_teal < -0.1).all(), (v_red, v_teal)
    assert np.abs(v_red - s_red).max() < 0.15 and np.abs(v_teal - s_teal).max() < 0.15, (v_red, v_teal)
