"""Readers: image files (PNG/JPEG/DICOM) -> arrays, label CSVs, and webdataset-style .tar shards.

The paper trains on 868k CXRs from public sets (MIMIC-CXR, CheXpert, PadChest, ...; DiNO-Diffusion Sec. 3)
that arrive as 8-bit JPEG, 16-bit PNG or DICOM. `read_image` returns the *stored* intensities (uint8 stays
uint8, 16-bit becomes uint16); turning them into model inputs is transforms.py's job. Grey by default (colour
as Pillow's `convert("L")` luminance, ITU-R 601-2), or with `channels=3` RGB [H, W, 3] (grey repeated), for
colour modalities. DICOM (optional pydicom >= 3) is data/dicom.py; in folders, DICOM files without an
extension (`IM0001`, as PACS exports them) are found by their `DICM` marker. An unreadable file raises
`ImageReadError` naming it, so a dataset can skip it and carry on.

Label CSVs hold one row per image: a path column (`path`, `Path` (CheXpert's train.csv), `image`, or
--path-column), optional 0/1 label columns and anything else. Relative paths start from `image_root`
(default: the CSV's folder). CheXpert's values (Irvin et al., 2019): blank = not mentioned = 0; -1 =
uncertain -> `uncertain` (0.0 "U-Zeros", 1.0 "U-Ones", nan "U-Ignore": masked out by classify.py).

Shards follow webdataset's layout: a tar whose consecutive members share a key (the member name up to the
first dot of its basename): `x001.png`, `x001.json`, `x001.mask.png` form one sample.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .dicom import decode_dicom, is_dicom_file

# The 7 findings the paper's downstream classifier predicts (DiNO-Diffusion Sec. 2.5), in paper order.
LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion", "Pneumonia", "Pneumothorax")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm")
SHARD_EXTENSIONS = (".tar", ".tar.gz", ".tgz")


class ImageReadError(ValueError):
    """A file that is not a readable image; the message names the file."""


# ----------------------------------------------------------------------------------------------- images
def read_image(path: str | Path, channels: int = 1) -> np.ndarray:
    """A PNG/JPEG/DICOM file, uint8 or uint16 as stored: grey [H, W] (`channels=1`; colour as luminance) or
    RGB [H, W, 3] (`channels=3`; grey repeated to 3 channels)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from e
    return decode_image(data, str(path), channels)


def decode_image(data: bytes, name: str, channels: int = 1) -> np.ndarray:
    """Decode image bytes (a file's or a tar member's); `name` picks the format (.dcm) and names errors."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    is_dicom = name.lower().endswith(".dcm") or data[128:132] == b"DICM"
    try:
        img = decode_dicom(data, channels) if is_dicom else _decode_pil(data, channels)
    except ImportError as e:
        raise ImportError(f"reading {name} needs pydicom >= 3: pip install -r requirements-dicom.txt ({e})") from e
    except Exception as e:  # any decoder failure becomes one error type that names the file
        raise ImageReadError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e
    if img.ndim != (2 if channels == 1 else 3) or img.size == 0:
        raise ImageReadError(f"cannot decode image {name}: got an array of shape {img.shape}")
    return img


def _decode_pil(data: bytes, channels: int = 1) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # decode now: truncated files fail here, not later
        return pil_to_array(ImageOps.exif_transpose(img), channels)


def pil_to_array(img: Image.Image, channels: int = 1) -> np.ndarray:
    """A PIL image -> uint8/uint16 [H, W] (channels=1: luminance) or [H, W, 3] (3: RGB, grey repeated); the
    one place where Pillow's modes are handled (the DINO preprocessing takes PIL images through it too)."""
    grey = img.mode in ("L", "LA", "1", "I", "F") or img.mode.startswith("I;16")
    if channels == 3 and not grey:  # alpha dropped, palettes and CMYK converted
        return np.array(img.convert("RGB"))
    if img.mode.startswith("I;16"):
        arr = np.array(img).astype(np.uint16)
    elif img.mode in ("I", "F"):  # 32-bit: how old Pillows open 16-bit PNGs, or float
        arr = np.array(img).astype(np.float64)
        if img.mode == "F" or arr.min() < 0 or arr.max() > 65535:  # min-max onto uint16
            lo, hi = arr.min(), arr.max()
            arr = np.zeros_like(arr) if hi <= lo else (arr - lo) * (65535 / (hi - lo))
        arr = arr.astype(np.uint16)
    else:
        arr = np.array(img.convert("L"))
    return np.repeat(arr[..., None], 3, axis=2) if channels == 3 else arr


def list_images(folder: str | Path) -> list[Path]:
    """All PNG/JPEG/DICOM files under `folder` (recursive, case-insensitive suffix, hidden files skipped),
    sorted so that every process and every run sees the same order. Files without a suffix are DICOM when
    they carry the `DICM` marker (`IM0001`, the usual PACS export)."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts)
                  and (p.suffix.lower() in IMAGE_EXTENSIONS or (p.suffix == "" and is_dicom_file(p))))


def pair_masks(paths, root: str | Path, masks: str | Path) -> list[Path]:
    """The mask of each image under `root`: the file under the folder `masks` with the image's relative path
    and stem (any image extension). ValueError naming the images that have none."""
    if not Path(masks).is_dir():
        raise FileNotFoundError(f"mask folder {masks} does not exist")
    found = {p.relative_to(masks).with_suffix(""): p for p in list_images(masks)}
    keys = [Path(p).relative_to(root).with_suffix("") for p in paths]
    missing = [str(k) for k in keys if k not in found]
    if missing:
        raise ValueError(f"no mask in {masks} for {len(missing)} image(s) of {root}, e.g. {missing[:3]}")
    return [found[k] for k in keys]


# ----------------------------------------------------------------------------------------------- labels
def parse_label(value, where: str, uncertain: float = 0.0) -> float:
    """One label value -> float: 1 / 0; blank or nan -> 0 (not mentioned); -1 -> `uncertain`."""
    text = "" if value is None else str(value).strip()
    if text.lower() in ("", "nan"):
        return 0.0
    v = None
    with contextlib.suppress(ValueError):
        v = float(text)
    if v not in (0.0, 1.0, -1.0):
        raise ValueError(f"{where}: label value {value!r} is not 0, 1, -1 (uncertain) or blank")
    return uncertain if v == -1.0 else v


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


PATH_COLUMNS = ("path", "Path", "image")  # ours, CheXpert's train.csv, and the common alternative


def path_column_of(columns, path_column: str | None, where) -> str:
    """The CSV column with the image paths: `path_column`, else the first of PATH_COLUMNS present."""
    if path_column is not None:
        if path_column not in columns:
            raise ValueError(f"{where} has no column {path_column!r} (--path-column; columns: {list(columns)})")
        return path_column
    found = next((c for c in PATH_COLUMNS if c in columns), None)
    if found is None:
        raise ValueError(f"{where} has no 'path' column (nor 'Path' or 'image'); name it with --path-column "
                         f"(columns: {list(columns)})")
    return found


def resolve_path(value: str, base: Path) -> str:
    """A CSV path -> a usable one: absolute as given, else joined to `base` (the image root)."""
    return str(Path(value) if Path(value).is_absolute() else base / value)


def read_labels_csv(path: str | Path, labels=None, *, uncertain: float = 0.0, path_column: str | None = None,
                    image_root: str | Path | None = None):
    """A label CSV (module docstring) -> (paths, labels float32 [N, C], every other column {name: [str]}).
    `labels=None`: the paper's LABELS that the CSV has, in paper order (C may be 0); names: exactly those."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label CSV {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c for c in (reader.fieldnames or []) if c is not None]
        rows = list(reader)
    path_col = path_column_of(columns, path_column, f"label CSV {path}")
    names = label_columns(columns, labels, f"label CSV {path}")
    if not rows:
        raise ValueError(f"label CSV {path} has no rows")
    base = Path(image_root) if image_root is not None else path.parent
    paths, matrix = [], np.zeros((len(rows), len(names)), np.float32)
    for i, row in enumerate(rows):
        p = (row.get(path_col) or "").strip()
        if not p:
            raise ValueError(f"{path}, line {i + 2}: empty {path_col!r}")
        paths.append(resolve_path(p, base))
        matrix[i] = [parse_label(row.get(name), f"{path}, line {i + 2}, column {name!r}", uncertain) for name in names]
    extras = {c: [row.get(c) or "" for row in rows] for c in columns if c != path_col and c not in names}
    return paths, matrix, extras


def sample_labels(files: dict[str, bytes], names: list[str], uncertain: float, where: str) -> np.ndarray:
    """Labels of one shard sample, float32 [C] for `names`: from `.json` ({name: value} or a list of C values)
    or `.cls` (C comma- or space-separated values). ValueError (naming `where`) when the sample has neither or
    they do not fit `names`."""
    if "json" in files:
        meta = json.loads(files["json"])
    elif "cls" in files:
        meta = files["cls"].decode().replace(",", " ").split()
    else:
        raise ValueError(f"{where}: no .json or .cls labels")
    if isinstance(meta, dict):
        meta = [meta.get(name) for name in names]
    if len(meta) != len(names):
        raise ValueError(f"{where}: {len(meta)} label values for {len(names)} labels {names}")
    values = [parse_label(v, f"{where} label {n!r}", uncertain) for v, n in zip(meta, names)]
    return np.array(values, np.float32)


# ----------------------------------------------------------------------------------------------- shards
def decode_sample(files: dict[str, bytes], where: str, label_names=None, uncertain: float = 0.0, channels: int = 1):
    """A shard sample's members (`where` = shard:key, for messages) -> (image (`channels` as in read_image), grey
    mask or None, labels float32 [C] or None, its name shard:key.ext). ImageReadError (a ValueError) for a sample
    without a png/jpg/jpeg/dcm image, an undecodable one or a mask of another shape; ValueError for bad labels."""
    ext = next((e[1:] for e in IMAGE_EXTENSIONS if e[1:] in files), None)
    if ext is None:
        raise ImageReadError(f"{where}: no png/jpg/jpeg/dcm image in sample ({sorted(files)})")
    name = f"{where}.{ext}"
    img = decode_image(files[ext], name, channels)
    mask_ext = next((e for e in files if e.startswith("mask.")), None)
    mask = mask_ext and decode_image(files[mask_ext], f"{where}.{mask_ext}")
    if mask is not None and mask.shape != img.shape[:2]:
        raise ImageReadError(f"{name}: mask shape {mask.shape}, image {img.shape}")
    labels = None if label_names is None else sample_labels(files, label_names, uncertain, name)
    return img, mask, labels, name


def _expand_braces(pattern: str) -> list[str]:
    """webdataset/bash brace expansion: `a-{000..009}.tar` (zero padding kept) and `{x,y}`."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    items = (body.split(",") if rng is None else  # {x,y}; {000..009}: numbered, zero padding kept
             [str(i).zfill(len(rng[1])) for i in range(int(rng[1]), int(rng[2]) + 1)])
    return [s for item in items for s in _expand_braces(head + item + tail)]


def list_shards(source: str | Path) -> list[str]:
    """A .tar path, a brace pattern of them, or a folder holding them -> the list of shard paths."""
    s = str(source)
    if Path(s).is_dir():
        if not (shards := sorted(str(p) for p in Path(s).iterdir() if p.name.lower().endswith(SHARD_EXTENSIONS))):
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
    """Stream one tar -> (key, {extension: bytes}) per sample, members grouped by key as webdataset does.
    Members are keyed by plain extension: webdataset's multi-dot keys (`x.image.png`, `x.label.json`, written
    by its ShardWriter from {"image.png": ..., "label.json": ...}) become `png`, `json` (the first one wins);
    masks keep their `mask.` prefix (`x.mask.png`, `x.seg.mask.png` -> `mask.png`)."""
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
            key, parts = m.group(1), m.group(2).lower().split(".")
            ext = f"mask.{parts[-1]}" if "mask" in parts[:-1] else parts[-1]
            files.setdefault(ext, tar.extractfile(member).read())
    if files:
        yield key, files
