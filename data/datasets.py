"""torch Datasets over every image source the scripts accept, with one entry point: `open_dataset`.

`source` (API.md, `--data` / `--images`) is one of:
- None or "phantom": the built-in phantoms, item i = `make_phantom(seed + i, size)` (data/phantom.py), or
  with `channels=3` `make_colour_phantom` (data/colour_phantom.py);
- a folder: every PNG/JPEG/DICOM under it, sorted (`masks=DIR`: the mask of the same relative name in DIR);
- a .csv with a path column, optional label columns and an optional mask column (`readers.read_labels_csv`;
  `mask_column`, default `mask`);
- webdataset-style shards: one .tar, a brace pattern `shards-{000..099}.tar`, or a folder of .tar files,
  streamed as the paper streams its 868k images (Sec. 3) by `ShardDataset`. Worker w of rank r reads
  shards[r * W + w :: R * W]; with fewer shards than R * W readers, every reader opens all shards and keeps
  every (R * W)-th sample instead: either way each sample goes to exactly one reader.

An item is a dict: `image` float32 [C, S, S] in [0, 1] (`transforms.preprocess_cxr`), `path`, `index`, and
`labels` float32 [K] / `mask` float32 {0, 1} [1, S, S] when the source has them. `augment=True` applies
`transforms.augment` with a generator keyed by (seed, epoch, item): reproducible; `set_epoch(e)` redraws.

Unreadable images never stop a long run: they are skipped with a `DataWarning` naming the file and listed in
`dataset.skipped` (`report()` sums up). A map-style dataset then returns the next readable item (i+1, i+2,
... wrapping around), so the result stays deterministic. An empty source is a ValueError.
"""

from __future__ import annotations

import collections
import copy
import os
import tarfile
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, default_collate, get_worker_info

from . import LABELS, readers
from .colour_phantom import COLOUR_LABELS, make_colour_phantom
from .phantom import make_phantom
from .readers import ImageReadError, read_image
from .transforms import augment, preprocess_cxr, preprocess_mask, seeded

SHARD_INDEX_STRIDE = 1_000_000  # shard items get index = shard number * stride + position in the shard


class DataWarning(UserWarning):
    """A sample was skipped (unreadable image, missing label); the message names it."""


def make_item(img: np.ndarray, mask: np.ndarray | None, labels, path: str, index: int,
              size: int | None, generator: torch.Generator | None) -> dict:
    """Stored arrays -> an item: preprocess (and augment, when a generator is given); optional fields."""
    image = preprocess_cxr(img, size)
    mask = None if mask is None else preprocess_mask(mask, img, size)
    if generator is not None:
        image, mask = (augment(image, generator), None) if mask is None else augment(image, generator, mask=mask)
    labels = None if labels is None else torch.as_tensor(labels)  # a shard's labels come as numpy
    item = {"image": image, "path": path, "index": index, "labels": labels, "mask": mask}
    return {k: v for k, v in item.items() if v is not None}


class _SkipLog:
    """Keeps the list of skipped samples and warns about each one."""

    def _skip(self, error: Exception):
        self.skipped.append(str(error))
        warnings.warn(f"skipping: {error}", DataWarning, stacklevel=3)

    def report(self) -> str:
        more = [f"... and {len(self.skipped) - 10} more"] if len(self.skipped) > 10 else []
        lines = "\n  ".join(self.skipped[:10] + more)
        return f"{self.source}: skipped {len(self.skipped)} unreadable sample(s):\n  {lines}"

    def set_epoch(self, epoch: int):
        """Augmentations (and the shard shuffle) are drawn per (seed, epoch): call once per epoch."""
        self.epoch = epoch


class _MapDataset(_SkipLog, Dataset):
    """A map-style dataset of image files `paths`, with optional `masks` (files) and `labels` [N, C]."""

    masks = labels = None
    columns: dict = {}  # a CSV's other columns {name: [str]}

    def __init__(self, source, size: int | None, augment: bool, seed: int, channels: int = 1):
        self.source, self.size, self.augment, self.seed, self.channels = str(source), size, augment, seed, channels
        self.epoch, self.skipped, self._bad = 0, [], set()

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray | None, torch.Tensor | None]:
        if self.masks is not None and self.masks[i] is None:
            raise ImageReadError(f"{self.paths[i]} has no mask (a blank cell of the mask column)")
        img = read_image(self.paths[i], self.channels)
        mask = None if self.masks is None else read_image(self.masks[i])
        if mask is not None and mask.shape != img.shape[:2]:
            raise ImageReadError(f"mask {self.masks[i]} has shape {mask.shape}, its image {img.shape[:2]}")
        return img, mask, None if self.labels is None else self.labels[i]

    def select(self, indices) -> _MapDataset:
        """A dataset of these items only (a train or held-out split): an unreadable item falls back to the
        next readable one *of the selection*, so items never leak from one split into the other."""
        idx = list(indices)
        part = copy.copy(self)
        part.skipped, part._bad = [], set()
        for name in ("paths", "masks", "labels"):  # per-item fields; labels: a tensor [N, C]
            values = getattr(self, name)
            if values is not None:
                setattr(part, name, values[idx] if torch.is_tensor(values) else [values[i] for i in idx])
        part.columns = {k: [v[i] for i in idx] for k, v in self.columns.items()}
        return part

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        for j in ((i + k) % n for k in range(n)):
            if j in self._bad:
                continue
            try:
                img, mask, labels = self._load(j)
            except ImageReadError as e:
                self._bad.add(j)
                self._skip(e)
                continue
            gen = seeded(self.seed, self.epoch, j) if self.augment else None
            return make_item(img, mask, labels, str(self.paths[j]), j, self.size, gen)
        raise ValueError(f"no readable image in {self.source}: all {n} failed\n{self.report()}")


class ImageFolderDataset(_MapDataset):
    """Every PNG/JPEG/DICOM under `root` (sorted); `masks`: a folder with one mask per image under the same
    relative path and stem (any image extension)."""

    def __init__(self, root, size: int | None, *, masks=None, augment=False, seed=0, paths=None, channels=1):
        super().__init__(root, size, augment, seed, channels)
        self.paths = list(paths) if paths is not None else readers.list_images(root)  # open_dataset lists them
        if not self.paths:
            raise ValueError(f"no PNG/JPEG/DICOM images found in {root}")
        if masks is not None:
            self.masks = readers.pair_masks(self.paths, root, masks)


class CSVDataset(_MapDataset):
    """Rows of a label CSV (`readers.read_labels_csv`: path column, image root, labels, `uncertain`) and an
    optional mask column, resolved like the image paths; `columns`: every other column {name: [str]}.
    `mask_column=None`: the `mask` column when present, blank cells refused; a named column must exist and
    its blank cells give masks[i] = None (the caller decides: segment.py refuses them, an item is skipped)."""

    def __init__(self, csv_path, size: int | None, *, labels=None, augment=False, seed=0, uncertain=0.0,
                 path_column=None, image_root=None, mask_column=None, channels=1):
        super().__init__(csv_path, size, augment, seed, channels)
        self.paths, matrix, self.columns = readers.read_labels_csv(csv_path, labels, uncertain=uncertain,
                                                                   path_column=path_column, image_root=image_root)
        self.label_names = readers.label_columns(readers.csv_columns(csv_path), labels, f"label CSV {csv_path}")
        self.labels = torch.from_numpy(matrix) if self.label_names else None  # [N, C]
        root = Path(image_root) if image_root is not None else Path(csv_path).parent
        if mask_column is not None and mask_column not in self.columns:
            raise ValueError(f"label CSV {csv_path} has no column {mask_column!r} (--mask-column; other "
                             f"columns: {list(self.columns)})")
        if (mask_column or "mask") in self.columns:
            cells = [m.strip() for m in self.columns[mask_column or "mask"]]
            blank = [k + 2 for k, m in enumerate(cells) if not m]
            if blank and mask_column is None:
                raise ValueError(f"label CSV {csv_path}: empty 'mask' on line(s) {blank[:5]}")
            self.masks = [readers.resolve_path(m, root) if m else None for m in cells]
        missing = [p for p in self.paths if not os.path.exists(p)]
        if len(missing) == len(self.paths):
            raise ValueError(f"none of the {len(missing)} images listed in {csv_path} exist, e.g. "
                             f"{missing[0]} (relative paths start from {root}; see --image-root)")
        if missing:
            warnings.warn(f"{len(missing)} image(s) listed in {csv_path} do not exist and will be skipped, "
                          f"e.g. {missing[:3]}", DataWarning, stacklevel=2)


class PhantomDataset(_MapDataset):
    """`n` built-in phantoms: item i = make_phantom(seed + i, size) (data/phantom.py: lung mask, data.LABELS) or
    make_colour_phantom (`channels=3`, data/colour_phantom.py: lesion mask, COLOUR_LABELS); `labels`: default all."""

    def __init__(self, n: int, size: int | None, *, labels=None, augment=False, seed=0, channels=1):
        super().__init__("phantom", size, augment, seed, channels)
        self.paths = [f"{'colour-' if channels == 3 else ''}phantom-{seed + i:06d}" for i in range(n)]
        known, where = (LABELS, "data.LABELS") if channels == 1 else (COLOUR_LABELS, "COLOUR_LABELS")
        self.label_names = readers.label_columns(known, known if labels is None else labels, f"the phantoms' ({where})")

    def _load(self, i):
        make = make_phantom if self.channels == 1 else make_colour_phantom
        img, mask, found = make(self.seed + i, self.size or 256)
        return img, mask, torch.tensor([float(found[k]) for k in self.label_names])


class ShardDataset(_SkipLog, IterableDataset):
    """webdataset-style .tar shards, streamed. Per sample: the image (png/jpg/jpeg/dcm), an optional
    `.mask.png`, and when `labels` names are given, the labels from `.json` or `.cls`
    (`readers.sample_labels`; a sample without them is skipped). `shuffle` permutes the shard order per epoch
    and mixes samples through a `shuffle_buffer`-long buffer (webdataset's `shuffle(n)`)."""

    def __init__(self, shards, size: int | None, *, labels=None, augment=False, seed=0, rank=0,
                 world_size=1, shuffle=False, shuffle_buffer=1000, uncertain=0.0, channels=1):
        self.source = str(shards)
        self.shards = readers.list_shards(shards) if isinstance(shards, str | Path) else [str(s) for s in shards]
        self.size, self.augment, self.seed, self.rank, self.world_size = size, augment, seed, rank, world_size
        self.shuffle, self.shuffle_buffer, self.uncertain, self.channels = shuffle, shuffle_buffer, uncertain, channels
        # None: images only (the diffusion model needs no labels)
        self.label_names = None if labels is None else [labels] if isinstance(labels, str) else list(labels)
        self.epoch, self.skipped = 0, []

    def _assignment(self, wid: int, nw: int) -> tuple[list[tuple[int, str]], int, int]:
        """(this reader's numbered shards, sample stride, sample offset) for this rank and worker `wid` of `nw`."""
        n_readers, me = self.world_size * nw, self.rank * nw + wid
        shards = list(enumerate(self.shards))
        if self.shuffle:
            gen = seeded(self.seed, self.epoch, -1)  # the same order on every rank and worker
            order = torch.randperm(len(shards), generator=gen)
            shards = [shards[k] for k in order.tolist()]
        if len(shards) >= n_readers:
            return shards[me::n_readers], 1, 0
        return shards, n_readers, me

    def _raw(self, shards, stride, offset) -> Iterator[tuple[int, str, str, dict]]:
        seen = 0
        for number, shard in shards:
            pos = 0
            try:
                for key, files in readers.iter_tar_samples(shard):
                    if seen % stride == offset:
                        yield number * SHARD_INDEX_STRIDE + pos, shard, key, files
                    seen, pos = seen + 1, pos + 1
            except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                self._skip(ImageReadError(f"shard {shard} is unreadable after {pos} samples: {e}"))

    def _shuffled(self, it: Iterator, generator: torch.Generator) -> Iterator:
        buf = []
        for x in it:
            buf.append(x)
            if len(buf) >= self.shuffle_buffer:
                k = int(torch.randint(len(buf), (1,), generator=generator))
                buf[k], buf[-1] = buf[-1], buf[k]
                yield buf.pop()
        order = torch.randperm(len(buf), generator=generator).tolist()
        yield from (buf[k] for k in order)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = self._raw(*self._assignment(wid, nw))
        if self.shuffle and self.shuffle_buffer > 1:
            stream = self._shuffled(stream, seeded(self.seed, self.epoch, -2, self.rank, wid))
        for index, shard, key, files in stream:
            try:
                img, mask, labels, where = readers.decode_sample(files, f"{shard}:{key}", self.label_names,
                                                                 self.uncertain, self.channels)
            except ValueError as e:  # ImageReadError, bad label values or JSON
                self._skip(e)
                continue
            name = zlib.crc32(f"{Path(shard).name}/{key}".encode())  # augmentation keyed by the sample's name:
            gen = seeded(self.seed, self.epoch, name) if self.augment else None  # the same however shards split
            yield make_item(img, mask, labels, where, index, self.size, gen)

    def diagnose(self) -> str:
        """Why a full pass gave no usable sample: one line naming the shards and what their samples hold."""
        n, with_image, exts, first_error = 0, 0, collections.Counter(), None
        for _, shard, key, files in self._raw(list(enumerate(self.shards)), 1, 0):
            n += 1
            exts.update(files)
            if any(e[1:] in files for e in readers.IMAGE_EXTENSIONS):
                with_image += 1
                try:
                    if first_error is None:
                        readers.decode_sample(files, f"{shard}:{key}")
                except ImageReadError as e:
                    first_error = str(e)
        names = ", ".join(Path(s).name for s in self.shards[:3]) + (" ..." if len(self.shards) > 3 else "")
        where = f"{self.source} ({len(self.shards)} shard(s): {names})"
        if with_image < n or n == 0:
            found = ", ".join(f".{e}" for e, _ in exts.most_common(5)) or "nothing"
            return (f"{where}: no usable sample: {with_image} of {n} samples had a png/jpg/jpeg/dcm image "
                    f"(members found: {found})")
        why = first_error or f"all were skipped by this process (rank {self.rank} of {self.world_size})"
        return f"{where}: no usable sample: {n} of {n} samples had an image but none was usable, e.g. {why}"


def open_dataset(source, size: int | None, *, augment=False, labels=None, seed=0, rank=0, world_size=1, channels=1,
                 masks=None, phantoms=1000, shuffle=False, uncertain=0.0, path_column=None, image_root=None,
                 mask_column=None):
    """The dataset for `source` (module docstring). `rank`/`world_size` split .tar shards between processes
    (map-style datasets are split by their sampler); `phantoms`: how many; `uncertain`: label -1's value;
    `mask_column`: a CSV's mask column (`CSVDataset`)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    path = None if source is None or str(source) == "phantom" else Path(source)
    is_csv = path is not None and path.suffix.lower() == ".csv"
    # masks= pairs a folder's images with a mask folder (a CSV has a `mask` column; shards `.mask.png` members)
    if masks is not None and (path is None or is_csv or readers.is_shard_source(source)):
        raise ValueError(f"masks={masks} pairs masks with a folder of images, but {source} is not one")
    if mask_column is not None and not is_csv:
        raise ValueError(f"{source} is not a CSV: it has no column {mask_column!r} (--mask-column)")
    common = dict(augment=augment, seed=seed, channels=channels)
    if path is None:
        return PhantomDataset(phantoms, size, labels=labels, **common)
    if is_csv:
        return CSVDataset(path, size, labels=labels, uncertain=uncertain, path_column=path_column,
                          image_root=image_root, mask_column=mask_column, **common)
    shards = dict(labels=labels, rank=rank, world_size=world_size, shuffle=shuffle, uncertain=uncertain, **common)
    if readers.is_shard_source(source):
        return ShardDataset(source, size, **shards)
    if not path.exists():
        raise FileNotFoundError(f"data source {source} does not exist")
    is_image = path.suffix.lower() in readers.IMAGE_EXTENSIONS
    images = readers.list_images(path) if path.is_dir() else [path] if is_image else []
    if not images and path.is_dir() and any(readers.is_shard_source(p) for p in path.iterdir()) and masks is None:
        return ShardDataset(source, size, **shards)
    if labels is not None:
        raise ValueError(f"labels {labels} requested but {source} is not a CSV or .tar shards; "
                         "give a CSV with a 'path' column and one column per label")
    if path.is_dir() or images:
        return ImageFolderDataset(path if path.is_dir() else path.parent, size, masks=masks, paths=images, **common)
    raise ValueError(f"data source {source}: expected a folder, a .csv, .tar shards or an image file")


def collate(items: list[dict]) -> dict:
    """Batch items for a DataLoader (torch's default_collate: tensors stacked, ints -> tensors, strings (paths)
    kept as a list), after checking that all items have the same fields; move the tensors with
    `{k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}`."""
    bad = next((it for it in items if list(it) != list(items[0])), None)
    if bad is not None:
        raise ValueError(f"item {bad.get('path')} has fields {list(bad)}, the batch's first item {list(items[0])}")
    return default_collate(items)
