"""DICOM files -> grey (or RGB) arrays: the display pipeline of DICOM PS3.3 C.11, with pydicom's own functions.

pydicom >= 3 is an optional extra (`pip install -r requirements-dicom.txt`; compressed transfer syntaxes also
need a decoder plugin, see that file). Multi-frame files give their first frame. By Photometric Interpretation:
- MONOCHROME1/2: modality LUT or rescale (`apply_modality_lut`), then the VOI LUT or window (`apply_voi_lut`),
  mapped linearly from the VOI output range onto uint16 (uint8 when BitsStored <= 8). The image is inverted
  once, so that high values are bright (P-values, PS3.3 C.11.6), when it is MONOCHROME1 (minimum = white,
  PS3.3 C.7.6.3.1.2) or its Presentation LUT Shape is INVERSE: the DX module requires INVERSE exactly with
  MONOCHROME1 (PS3.3 C.8.11.6.1.2), so both describe one inversion, never applied twice. This equals
  `apply_presentation_lut` (`max - x`) up to our linear mapping. A Presentation LUT Sequence is applied with
  that function, its output (P-values, PS3.3 C.11.4) mapped from the LUT's bit depth.
- PALETTE COLOR: the indices go through the palette (`apply_color_lut`) to RGB; RGB / YBR (pydicom converts
  YBR to RGB). Then luminance, ITU-R BT.601 0.299 R + 0.587 G + 0.114 B (Pillow's `convert("L")`, so a colour
  DICOM reads like a colour PNG), or with `channels=3` the RGB itself: uint8 for 8-bit samples, else uint16
  scaled by 65535 / (2**bits - 1) (BitsStored, or the palette's entry depth), never wrapped. A grey image
  with `channels=3` is repeated to 3 channels.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

BT601 = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights, as Pillow's convert("L")


def decode_dicom(data: bytes, channels: int = 1) -> np.ndarray:
    """DICOM bytes -> grey [H, W] (`channels=1`) or RGB [H, W, 3] (`channels=3`), uint8 or uint16 (module
    docstring). ImportError without pydicom."""
    import pydicom
    from pydicom.pixels import apply_color_lut

    ds = pydicom.dcmread(io.BytesIO(data))
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])  # bits per palette entry (PS3.3 C.7.6.3.1.5)
        return _from_rgb(apply_color_lut(arr, ds)[..., :3], bits, channels)
    if arr.ndim == 3:
        return _from_rgb(arr[..., :3], int(ds.get("BitsStored", arr.dtype.itemsize * 8)), channels)
    grey = _grey(arr, ds)
    return grey if channels == 1 else np.repeat(grey[..., None], 3, axis=2)


def _from_rgb(rgb: np.ndarray, bits: int, channels: int) -> np.ndarray:
    """RGB [H, W, 3] of `bits`-bit samples -> its BT.601 luminance [H, W] (`channels=1`) or itself (3): uint8
    for 8 bits (luminance by Pillow, as for a PNG), else uint16 scaled by 65535 / (2**bits - 1)."""
    if bits <= 8:
        rgb = np.ascontiguousarray(rgb).astype(np.uint8)
        return rgb if channels == 3 else np.array(Image.fromarray(rgb).convert("L"))
    out = rgb.astype(np.float64) if channels == 3 else rgb.astype(np.float64) @ np.array(BT601)
    return np.rint(np.clip(out * (65535 / (2.0**bits - 1)), 0, 65535)).astype(np.uint16)


def _grey(arr: np.ndarray, ds) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_presentation_lut, apply_voi_lut

    arr = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float64)
    top = 255 if int(ds.get("BitsStored", 16)) <= 8 else 65535
    if ds.get("PresentationLUTSequence"):
        arr = apply_presentation_lut(arr, ds).astype(np.float64)
        lo, hi, invert = 0.0, 2.0 ** int(ds.PresentationLUTSequence[0].LUTDescriptor[2]) - 1, False
    else:
        lo, hi = _voi_output_range(ds, arr)
        shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
        invert = ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1" or shape == "INVERSE"
    out = np.zeros_like(arr) if hi <= lo else (np.clip(arr, lo, hi) - lo) * (top / (hi - lo))
    if invert:
        out = top - out
    return np.rint(out).astype(np.uint8 if top == 255 else np.uint16)


def _voi_output_range(ds, arr: np.ndarray) -> tuple[float, float]:
    """The range `apply_voi_lut` maps onto: the VOI LUT's bit depth, the window's output range (as pydicom
    computes it, PS3.3 C.11.2.1.2), or the data's own min/max when the file has no VOI at all."""
    if ds.get("VOILUTSequence"):
        return 0.0, 2.0 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
    if "WindowCenter" in ds and "WindowWidth" in ds:
        bits = int(ds.BitsStored)
        if ds.get("ModalityLUTSequence"):
            lo, hi = 0.0, 2.0 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
        elif ds.get("PixelRepresentation", 0) == 0:
            lo, hi = 0.0, 2.0**bits - 1
        else:
            lo, hi = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
        if "RescaleSlope" in ds and "RescaleIntercept" in ds:
            slope, icpt = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            lo, hi = sorted((lo * slope + icpt, hi * slope + icpt))
        return lo, hi
    return float(arr.min()), float(arr.max())


def is_dicom_file(path) -> bool:
    """A DICOM Part 10 file: the `DICM` prefix after the 128-byte preamble (PS3.10 7.1); reads 132 bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False
