"""data/dicom.py against pydicom's own pipeline on the test files shipped inside the pydicom wheel (no network).

Our output is pydicom's result up to the documented final uint mapping: a linear map onto uint8/uint16 for
grey images (so an affine fit must be exact up to rounding), BT.601 luminance for colour.
"""

import sys

import numpy as np
import pytest

from data import list_images, read_image
from data.datasets import open_dataset

pydicom = pytest.importorskip("pydicom", minversion="3")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.pixels import (  # noqa: E402
    apply_color_lut,
    apply_modality_lut,
    apply_presentation_lut,
    apply_voi_lut,
)


def shipped(name):
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not shipped with this pydicom")
    return path


def assert_affine(ours: np.ndarray, ref: np.ndarray, increasing=True):
    """ours == a * ref + b up to rounding to integers, with a > 0 (increasing) or a < 0."""
    x, y = ref.astype(np.float64).ravel(), ours.astype(np.float64).ravel()
    a, b = np.polyfit(x, y, 1)
    assert (a > 0) == increasing
    assert np.abs(a * x + b - y).max() <= 0.5 + 1e-6 * np.abs(y).max()


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "image_dfl.dcm"])
def test_grey_files_follow_modality_and_voi(name):
    path = shipped(name)
    ds = pydicom.dcmread(path)
    try:
        ref = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    except (RuntimeError, NotImplementedError) as e:  # a compressed syntax without its plugin installed
        pytest.skip(f"pydicom cannot decode {name} here: {e}")
    ours = read_image(path)
    assert ours.dtype == (np.uint8 if ds.BitsStored <= 8 else np.uint16) and ours.shape == ref.shape
    assert_affine(ours, ref)


def test_palette_color_goes_through_the_palette():
    path = shipped("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64)  # 16-bit palette entries
    ours = read_image(path)
    assert ours.dtype == np.uint16
    luma = rgb[..., :3] @ np.array([0.299, 0.587, 0.114])
    assert np.abs(ours - luma).max() <= 0.5 + 1e-9
    assert not np.array_equal(ours.astype(np.int64), ds.pixel_array.astype(np.int64))  # not the raw indices


@pytest.mark.parametrize("name,bits", [("SC_rgb_rle_16bit.dcm", 16), ("SC_rgb_rle_16bit_2frame.dcm", 16),
                                       ("SC_rgb_rle_32bit.dcm", 32), ("examples_rgb_color.dcm", 8)])
def test_rgb_is_luminance_scaled_by_bit_depth(name, bits):
    from PIL import Image

    path = shipped(name)
    ds = pydicom.dcmread(path)
    rgb = ds.pixel_array
    rgb = rgb[0] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else rgb  # first frame
    ours = read_image(path)
    if bits == 8:
        assert ours.dtype == np.uint8 and np.array_equal(ours, np.array(Image.fromarray(rgb).convert("L")))
        return
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) * (65535 / (2.0**bits - 1))
    assert ours.dtype == np.uint16 and np.abs(ours - luma).max() <= 0.5 + 1e-6
    assert ours.max() > 255  # not wrapped through uint8


def _with(tmp_path, name, **elements):
    ds = pydicom.dcmread(shipped(name))
    for k, v in elements.items():
        setattr(ds, k, v)
    out = tmp_path / f"{'_'.join(elements) or 'plain'}.dcm"
    ds.save_as(out)
    return out, ds


def test_presentation_lut_shape_inverse(tmp_path):
    plain = read_image(_with(tmp_path, "MR_small.dcm")[0])
    path, ds = _with(tmp_path, "MR_small.dcm", PresentationLUTShape="INVERSE")
    ref = apply_presentation_lut(apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds), ds)
    ours = read_image(path)
    assert_affine(ours, ref)  # the same picture as pydicom's P-values (pydicom inverts as max - x)
    assert np.array_equal(ours, 65535 - plain)
    # MONOCHROME1 with INVERSE (what the DX module requires) is the same single inversion, not two
    both, _ = _with(tmp_path, "MR_small.dcm", PresentationLUTShape="INVERSE", PhotometricInterpretation="MONOCHROME1")
    assert np.array_equal(read_image(both), ours)
    identity, _ = _with(tmp_path, "MR_small.dcm", PresentationLUTShape="IDENTITY")
    assert np.array_equal(read_image(identity), plain)


def test_presentation_lut_sequence(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.LUTData = np.linspace(65535, 0, 256).round().astype("<u2").tobytes()  # an inverting ramp
    path, ds = _with(tmp_path, "MR_small.dcm", PresentationLUTSequence=Sequence([item]))
    ds = pydicom.dcmread(path)
    ref = apply_presentation_lut(apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds), ds)
    ours = read_image(path)
    assert np.array_equal(ours, ref) and ours[0, 0] != read_image(shipped("MR_small.dcm"))[0, 0]


def _write_dicom(path, arr):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = *arr.shape, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_extensionless_dicom_files_are_found_in_folders(tmp_path, monkeypatch):
    g = np.random.default_rng(0)
    for rel in ("study/series/IM0001", "study/series/IM0002"):
        _write_dicom(tmp_path / rel, g.integers(0, 256, (24, 20), dtype=np.uint8))
    (tmp_path / "study" / "DICOMDIR_README").write_bytes(b"\0" * 200)  # no suffix, no DICM marker
    (tmp_path / "study" / "tiny").write_bytes(b"x")
    (tmp_path / "study" / "notes.txt").write_text("not an image")
    found = list_images(tmp_path)
    assert [p.name for p in found] == ["IM0001", "IM0002"]
    ds = open_dataset(tmp_path, 16)
    assert len(ds) == 2 and ds[0]["image"].shape == (1, 16, 16) and not ds.skipped
    assert np.array_equal(read_image(found[0]), pydicom.dcmread(found[0]).pixel_array)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if not installed
    with pytest.raises(ImportError, match=r"IM0001 needs pydicom >= 3: pip install -r requirements-dicom\.txt"):
        read_image(found[0])
