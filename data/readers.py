"""Readers: image files (PNG/JPEG/DICOM) -> grayscale arrays, label CSVs, and webdataset-style .tar shards.

The paper trains on 868k CXRs from several public sets (MIMIC-CXR, CheXpert, PadChest, ...; DiNO-Diffusion
Sec. 3) that arrive as 8-bit JPEG, 16-bit PNG or DICOM, streamed with webdataset. Everything here returns the
*stored* intensities: `read_image` keeps uint8 as uint8 and 16-bit as uint16; turning them into model inputs
is `transforms.py`'s job.

- PNG/JPEG go through Pillow. Modes: L -> uint8; I;16* -> uint16; I (32-bit, how old Pillows open 16-bit
  PNGs) -> uint16 when the values fit, else min-max scaled; F -> min-max scaled to uint16; everything else
  (RGB, RGBA, P, CMYK, 1, LA) -> luminance via Pillow's `convert("L")` (ITU-R 601-2: 0.299 R + 0.587 G +
  0.114 B). EXIF orientation is applied.
- DICOM (optional extra: pydicom >= 3) follows the display pipeline of DICOM PS3.3 C.11: modality LUT /
  rescale slope and intercept, then the VOI LUT or window (`pydicom.pixels.apply_voi_lut`), then the result
  is mapped from the VOI output range onto uint16 (uint8 when BitsStored <= 8), and MONOCHROME1 (where
  high values are dark) is inverted so that bone is always bright. Multi-frame files give their first frame.
- Anything unreadable raises `ImageReadError` naming the file, so a dataset can skip it and carry on.

Label CSVs (`read_labels_csv`) hold one row per image: a `path` column (`image` is accepted when `path` is
absent), optional 0/1 label columns and anything else. CheXpert conventions for label values (Irvin et
al., 2019): blank = not mentioned = 0; -1 = uncertain, mapped to `uncertain` (0.0 = "U-Zeros" by default,
1.0 = "U-Ones", nan to mask it out of a loss).

Shards follow webdataset's layout: a tar whose consecutive members share a key (the member name up to the
first dot of its basename): `x001.png`, `x001.json`, `x001.mask.png` form one sample.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from . import LABELS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm")
SHARD_EXTENSIONS = (".tar", ".tar.gz", ".tgz")


class ImageReadError(ValueError):
    """A file that is not a readable image; the message names the file."""


# ----------------------------------------------------------------------------------------------- images
def read_image(path: str | Path) -> np.ndarray:
    """Grayscale [H, W] array of a PNG/JPEG/DICOM file, uint8 or uint16 as stored."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from e
    return decode_image(data, str(path))


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode image bytes (a file's or a tar member's); `name` picks the format (.dcm) and names errors."""
    is_dicom = name.lower().endswith(".dcm") or data[128:132] == b"DICM"
    try:
        img = _decode_dicom(data) if is_dicom else _decode_pil(data)
    except ImportError as e:
        raise ImportError(f"reading {name} needs pydicom (pip install 'pydicom>=3'): {e}") from e
    except Exception as e:  # any decoder failure becomes one error type that names the file
        raise ImageReadError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e
    if img.ndim != 2 or img.size == 0:
        raise ImageReadError(f"cannot decode image {name}: got an array of shape {img.shape}")
    return img


def _decode_pil(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # decode now: truncated files fail here, not later
        img = ImageOps.exif_transpose(img)
        if img.mode == "L":
            return np.array(img)
        if img.mode.startswith("I;16"):
            return np.array(img).astype(np.uint16)
        if img.mode in ("I", "F"):
            arr = np.array(img)
            if img.mode == "I" and arr.min() >= 0 and arr.max() <= 65535:
                return arr.astype(np.uint16)
            return _minmax(arr.astype(np.float64), 65535).astype(np.uint16)
        return np.array(img.convert("L"))


def _minmax(arr: np.ndarray, top: float) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    return np.zeros_like(arr) if hi <= lo else (arr - lo) * (top / (hi - lo))


def _decode_dicom(data: bytes) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(io.BytesIO(data))
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]
    if arr.ndim == 3:  # colour DICOM (RGB/YBR after pydicom's conversion) -> luminance
        return np.array(Image.fromarray(np.ascontiguousarray(arr[..., :3]).astype(np.uint8)).convert("L"))
    arr = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float64)
    lo, hi = _voi_output_range(ds, arr)
    top = 255 if int(ds.get("BitsStored", 16)) <= 8 else 65535
    out = np.zeros_like(arr) if hi <= lo else (np.clip(arr, lo, hi) - lo) * (top / (hi - lo))
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
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


def list_images(folder: str | Path) -> list[Path]:
    """All PNG/JPEG/DICOM files under `folder` (recursive, case-insensitive suffix, hidden files skipped),
    sorted so that every process and every run sees the same order."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


# ----------------------------------------------------------------------------------------------- labels
def parse_label(value, where: str, uncertain: float = 0.0) -> float:
    """One label value -> float: 1 / 0; blank or nan -> 0 (not mentioned); -1 -> `uncertain`."""
    text = "" if value is None else str(value).strip()
    if text == "" or text.lower() == "nan":
        return 0.0
    try:
        v = float(text)
    except ValueError:
        v = math.inf
    if v in (0.0, 1.0):
        return v
    if v == -1.0:
        return uncertain
    raise ValueError(f"{where}: label value {value!r} is not 0, 1, -1 (uncertain) or blank")


def label_columns(columns, labels, where) -> list[str]:
    """The label names to read: `labels` (all must be in `columns`), or by default the paper's LABELS
    that `columns` has, in paper order."""
    if labels is None:
        return [c for c in LABELS if c in columns]
    names = [labels] if isinstance(labels, str) else list(labels)
    missing = [c for c in names if c not in columns]
    if missing:
        raise ValueError(f"{where} has no label column(s) {missing} (columns: {list(columns)})")
    return names


def csv_columns(path: str | Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(f), [])


def read_labels_csv(path: str | Path, labels=None, *, uncertain: float = 0.0):
    """Read a label CSV -> (paths, label matrix float32 [N, C], extra columns {name: list of str}).

    Image paths are resolved against the CSV's folder unless absolute. `labels=None` takes the paper's
    labels (data.LABELS) that the CSV has, in paper order (possibly none: C = 0); a list of names demands
    exactly those columns. Every other column (`mask`, ids, metadata) is returned in the extras dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label CSV {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c for c in (reader.fieldnames or []) if c is not None]
        rows = list(reader)
    path_col = "path" if "path" in columns else "image" if "image" in columns else None
    if path_col is None:
        raise ValueError(f"label CSV {path} has no 'path' column (columns: {columns})")
    names = label_columns(columns, labels, f"label CSV {path}")
    if not rows:
        raise ValueError(f"label CSV {path} has no rows")
    paths, matrix = [], np.zeros((len(rows), len(names)), np.float32)
    for i, row in enumerate(rows):
        p = (row.get(path_col) or "").strip()
        if not p:
            raise ValueError(f"{path}, line {i + 2}: empty {path_col!r}")
        paths.append(str(Path(p) if Path(p).is_absolute() else path.parent / p))
        for j, name in enumerate(names):
            matrix[i, j] = parse_label(row.get(name), f"{path}, line {i + 2}, column {name!r}", uncertain)
    extras = {c: [row.get(c) or "" for row in rows] for c in columns if c != path_col and c not in names}
    return paths, matrix, extras


def sample_labels(files: dict[str, bytes], names: list[str], uncertain: float, where: str) -> np.ndarray:
    """Labels of one shard sample, float32 [C] for `names`: from `.json` ({name: value}, optionally under
    "labels", or a list of C values) or `.cls` (a class index -> one-hot, or C comma-separated values).
    ValueError (naming `where`) when the sample has neither or they do not fit `names`."""
    if "json" in files:
        meta = json.loads(files["json"])
        meta = meta.get("labels", meta) if isinstance(meta, dict) else meta
    elif "cls" in files:
        text = files["cls"].decode().strip()
        meta = text.replace(",", " ").split()
        if len(meta) == 1:
            meta = [float(k == int(text)) for k in range(len(names))]
    else:
        raise ValueError(f"{where}: no .json or .cls labels")
    if isinstance(meta, dict):
        meta = [meta.get(name) for name in names]
    if len(meta) != len(names):
        raise ValueError(f"{where}: {len(meta)} label values for {len(names)} labels {names}")
    values = [parse_label(v, f"{where} label {n!r}", uncertain) for v, n in zip(meta, names)]
    return np.array(values, np.float32)


# ----------------------------------------------------------------------------------------------- shards
def _expand_braces(pattern: str) -> list[str]:
    """webdataset/bash brace expansion: `a-{000..009}.tar` (zero padding kept) and `{x,y}`."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        a, b = rng.groups()
        items = [str(i).zfill(len(a)) for i in range(int(a), int(b) + 1)]
    else:
        items = body.split(",")
    return [s for item in items for s in _expand_braces(head + item + tail)]


def list_shards(source: str | Path) -> list[str]:
    """A .tar path, a brace pattern of them, or a folder holding them -> the list of shard paths."""
    s = str(source)
    if Path(s).is_dir():
        shards = sorted(str(p) for p in Path(s).iterdir() if p.name.lower().endswith(SHARD_EXTENSIONS))
        if not shards:
            raise ValueError(f"no .tar shards in {s}")
        return shards
    shards = _expand_braces(s)
    missing = [p for p in shards if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found for {s}, e.g. {missing[:3]}")
    return shards


def is_shard_source(source: str | Path) -> bool:
    return str(source).lower().endswith(SHARD_EXTENSIONS)


def iter_tar_samples(shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream one tar -> (key, {extension: bytes}) per sample, members grouped by key as webdataset does."""
    key, files = None, {}
    with tarfile.open(shard, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            m = re.fullmatch(r"((?:.*/)?[^./]+)\.([^/]+)", member.name)
            if m is None:
                continue
            if m.group(1) != key and files:
                yield key, files
                files = {}
            key = m.group(1)
            files[m.group(2).lower()] = tar.extractfile(member).read()
    if files:
        yield key, files
