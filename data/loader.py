"""Training data plumbing: the train / held-out split, keyed randomness, exact micro-batches, the latent cache.

A diffusion run trains by steps, and every optimizer step must see exactly batch_size x grad_accum x
world_size samples, in an order that does not depend on how the work is spread or interrupted:
- `seeded(*keys)` (from transforms.py; datasets.py uses it too): a generator keyed by integers (seed, purpose, step,
  ...), the same on every rank, in every DataLoader worker and after a resume; all of a run's randomness.
- `Batches`: a map-style dataset (folder, CSV, phantoms, latent cache) as a per-epoch permutation cut into
  global batches; rank r takes every N-th place, so N ranks with batch B see what one process with batch N*B
  sees. Its position is the micro-step, so a resume needs nothing more.
- `StreamBatches`: .tar shards, streamed (each rank reads its own shards): items are taken one by one and
  packed into batches of exactly B, across shard and epoch ends. Its position (epoch, items taken in that
  epoch) is saved in each checkpoint; a resume re-reads that epoch up to it.
- `split_data`: the held-out images (FID, sample grids) stay held out: unreadable ones are dropped with a
  warning, never replaced, and no training image is ever among them.
"""

from __future__ import annotations

import collections
import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

import hub

from .datasets import DataWarning, PhantomDataset, open_dataset
from .readers import ImageReadError
from .transforms import augment as augment_image
from .transforms import seeded  # also imported from here by train.py and vae/fit.py

VAL_PHANTOM_SEED_OFFSET = 10_000_000  # held-out phantoms: seeds no training phantom uses


class KeyedImages(Dataset):
    """Item `key` = image `key % n`, augmented by a generator keyed by (seed, epoch, index): the same
    whichever rank or worker loads it, and after a resume."""

    def __init__(self, dataset, seed: int, augment: bool):
        self.dataset, self.seed, self.augment = dataset, seed, augment

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key: int) -> torch.Tensor:
        epoch, idx = divmod(key, len(self.dataset))
        x = self.dataset[idx]["image"]
        return augment_image(x, seeded(self.seed, 1, epoch, idx)) if self.augment else x


class Batches:
    """Deterministic, rank-split, resumable micro-batches of a map-style dataset.

    Global micro-batch j of epoch e holds positions perm_e[j*N*B : (j+1)*N*B] of a per-epoch permutation
    (the last incomplete global batch of an epoch is dropped); rank r takes every N-th position from r.
    Starting at micro-batch `start` resumes.
    """

    def __init__(self, dataset, batch_size, *, rank, world, seed, start=0, num_workers=0):
        self.n, self.seed = len(dataset), seed
        self.global_batch = batch_size * world
        self.per_epoch = self.n // self.global_batch
        if self.per_epoch == 0:
            raise ValueError(f"{self.n} training images are fewer than one global batch ({self.global_batch} = "
                             f"--batch-size x processes): lower --batch-size or add images")
        self.positions = torch.arange(rank, self.global_batch, world)  # this rank's places in the global batch
        self._it = iter(DataLoader(dataset, batch_size=batch_size, sampler=self._keys(start),
                                   num_workers=num_workers, persistent_workers=num_workers > 0))

    def _keys(self, micro: int):
        perm_epoch, perm = -1, None
        while True:
            epoch, j = divmod(micro, self.per_epoch)
            if epoch != perm_epoch:
                perm_epoch, perm = epoch, torch.randperm(self.n, generator=seeded(self.seed, 0, epoch))
            yield from (epoch * self.n + perm[j * self.global_batch + self.positions]).tolist()
            micro += 1

    def next(self):
        return next(self._it)  # the micro-step is the whole position: nothing to save for a resume


class StreamBatches:
    """Micro-batches of exactly `batch_size` images from a `ShardDataset` (this rank's shards).

    The dataset is read one item at a time (DataLoader workers decode in parallel, in a fixed round-robin
    order) and items are packed into batches across shard and epoch ends, so no batch is ever short and
    ranks with different sample counts still take the same number of steps. `state()` = [epoch, items taken
    from it]; `StreamBatches(..., state=s)` re-reads epoch s[0] and drops its first s[1] items (their
    decoding is the cost of a resume; augmentation is keyed by sample name, so the order is exact). The
    order depends on the number of readers (processes x workers): resume with the same ones.
    """

    def __init__(self, dataset, batch_size, *, rank, world, num_workers=0, state=None):
        self.dataset, self.batch_size = dataset, batch_size
        self.global_batch = batch_size * world
        self.positions = torch.arange(rank, self.global_batch, world)
        self.loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
        self.epoch, self.taken = state or (0, 0)
        self._items = self._stream(self.epoch, self.taken)

    def _stream(self, epoch: int, skip: int):
        while True:
            self.dataset.set_epoch(epoch)  # before iter(): workers receive the dataset with it
            n = -1
            for n, item in enumerate(self.loader):
                if n >= skip:
                    self.epoch, self.taken = epoch, n + 1  # the position after this item
                    yield item["image"]
            if n < 0:
                raise ValueError(self.dataset.diagnose())
            epoch, skip = epoch + 1, 0

    def next(self) -> torch.Tensor:
        return torch.stack([next(self._items) for _ in range(self.batch_size)])

    def state(self) -> list[int]:
        return [self.epoch, self.taken]


# ---------------------------------------------------------------------------------------------- split


def _readable(dataset, idx: list[int], what: str) -> list[int]:
    """The indices of `dataset` whose image (and mask) can be read; each other one is named in a warning."""
    good = []
    for i in idx:
        try:
            dataset._load(i)
            good.append(i)
        except ImageReadError as e:
            warnings.warn(f"dropping held-out image: {e}", DataWarning, stacklevel=3)
    if not good:
        raise ValueError(f"{what}: none of the {len(idx)} held-out images is readable")
    return good


def split_data(cfg, rank: int, world: int):
    """(train, held-out) datasets for a TrainConfig: phantoms (disjoint seeds), --val-data, or held out of
    --data (the last --val-count images, or the last whole --val-group groups)."""
    common = dict(path_column=cfg.path_column, image_root=cfg.image_root, channels=cfg.channels)  # 3: RGB
    if not cfg.data:  # held-out phantoms: seeds no training phantom uses
        return tuple(open_dataset("phantom", cfg.image_size, phantoms=n, seed=cfg.seed + offset, **common)
                     for n, offset in ((cfg.phantom_count, 0), (cfg.val_count, VAL_PHANTOM_SEED_OFFSET)))
    train = open_dataset(cfg.data, cfg.image_size, rank=rank, world_size=world, shuffle=True, **common)
    if cfg.val_data:
        val = open_dataset(cfg.val_data, cfg.image_size, **common)
        if not hasattr(val, "__len__"):
            raise ValueError(f"--val-data {cfg.val_data} is .tar shards: give the held-out images as a folder or a "
                             "CSV (they are indexed for FID, sample grids and val.csv)")
        val = val.select(_readable(val, list(range(len(val))), f"--val-data {cfg.val_data}"))
        if hasattr(train, "paths"):
            shared = set(map(os.path.realpath, train.paths)) & set(map(os.path.realpath, val.paths))
            if shared:
                raise ValueError(f"--val-data {cfg.val_data} and --data {cfg.data} share {len(shared)} image(s), "
                                 f"e.g. {sorted(shared)[0]}: held-out images must not be trained on")
        return train, val
    if not hasattr(train, "__len__"):
        raise ValueError(f"--data {cfg.data} is a stream of .tar shards: give held-out images with --val-data")
    n = len(train)
    if n <= cfg.val_count:
        raise ValueError(f"--data {cfg.data} lists {n} image file(s), not more than --val-count {cfg.val_count}: "
                         "add images, lower --val-count, or give --val-data")
    if not cfg.val_group:
        held = list(range(n - cfg.val_count, n))
    else:
        groups = getattr(train, "columns", {}).get(cfg.val_group)
        if groups is None:
            raise ValueError(f"--val-group {cfg.val_group!r}: --data {cfg.data} is not a CSV with that column")
        counts, chosen = collections.Counter(groups), set()
        for g in sorted(counts, reverse=True):  # whole groups (patients), so none straddles the split
            if sum(counts[h] for h in chosen) >= cfg.val_count:
                break
            chosen.add(g)
        held = [i for i, g in enumerate(groups) if g in chosen]
    train_idx = sorted(set(range(n)) - set(held))
    if not train_idx:
        raise ValueError(f"--val-group {cfg.val_group!r} leaves no training images in {cfg.data}")
    return train.select(train_idx), train.select(_readable(train, held, f"--data {cfg.data}"))


def write_image_list(dataset, path: Path):
    """The held-out images as a CSV with an absolute `path` column (for sample.py / segment.py --images):
    exactly the images used; nothing for phantoms, which have no files."""
    if isinstance(dataset, PhantomDataset):
        return
    hub.write_csv_atomic(path, [{"path": str(Path(p).resolve())} for p in dataset.paths], ["path"])


# ---------------------------------------------------------------------------------------------- cache


def cache_path(out, cfg) -> Path:
    """Where a run's latent cache lives: computed from the config, so every rank finds the same file."""
    return Path(out) / "cache" / f"latents_{cfg.cache_copies if cfg.augment else 1}.safetensors"


class CachedLatents(TensorDataset):
    """The latent cache: item `key` = (VAE posterior mean, std, c_GLB) of row `key % n`, one augmented copy
    (keys run on over epochs, as KeyedImages')."""

    def __getitem__(self, key: int):
        return super().__getitem__(key % len(self))


def make_batches(cfg, train_set, encode, out: Path, rank: int, world: int, meta: dict):
    """The micro-batch source for this rank of a run (TrainConfig `cfg`): the latent cache (written by rank 0
    through `encode`, see `cache_latents`), map-style images, or streamed shards. `meta`: the resumed
    checkpoint's metadata (its micro-step, or its shards' stream positions)."""
    start = meta.get("extra", {}).get("micro_step", 0)
    if cfg.cache_latents:
        path = cache_path(out, cfg)
        if rank == 0 and not path.is_file():
            cache_latents(train_set, encode, cfg, path)
        if world > 1:
            torch.distributed.barrier()
        cached = CachedLatents(*map(hub.load_state_dict_file(path).get, ("mean", "std", "cond")))
        return Batches(cached, cfg.batch_size, rank=rank, world=world, seed=cfg.seed, start=start)
    if hasattr(train_set, "__len__"):
        return Batches(KeyedImages(train_set, cfg.seed, cfg.augment), cfg.batch_size, rank=rank, world=world,
                       seed=cfg.seed, start=start, num_workers=cfg.num_workers)
    stream = meta.get("extra", {}).get("stream")
    if stream is not None and (stream["world"], stream["num_workers"]) != (world, cfg.num_workers):
        raise ValueError(f"--resume of a shard run: it was read by {stream['world']} process(es) x "
                         f"{stream['num_workers']} worker(s), now {world} x {cfg.num_workers}; the shard order "
                         "depends on them, so resume with the same --num-workers and process count")
    train_set.augment = cfg.augment
    return StreamBatches(train_set, cfg.batch_size, rank=rank, world=world, num_workers=cfg.num_workers,
                         state=stream["positions"][rank] if stream else None)


def stream_state(batches, cfg, world: int) -> dict | None:
    """Every rank's shard position (gathered to rank 0), for the checkpoint; None for map-style data."""
    if not isinstance(batches, StreamBatches):
        return None
    positions = [batches.state()]
    if world > 1:
        positions = [None] * world
        torch.distributed.all_gather_object(positions, batches.state())
    return {"positions": positions, "world": world, "num_workers": cfg.num_workers}


@torch.no_grad()
def cache_latents(train, encode, cfg, path: Path):
    """Encode every training image once (x cache_copies augmented copies): `encode(images)` -> (VAE posterior
    mean, std, c_GLB), saved to `path` (atomically)."""
    keyed = KeyedImages(train, cfg.seed, cfg.augment)
    keys = list(range((cfg.cache_copies if cfg.augment else 1) * len(train)))
    parts = [[t.cpu() for t in encode(torch.stack([keyed[k] for k in keys[i : i + cfg.batch_size]]))]
             for i in tqdm(range(0, len(keys), cfg.batch_size), desc="cache latents", leave=False)]
    try:
        hub.save_file_atomic({name: torch.cat(ts) for name, ts in zip(("mean", "std", "cond"), zip(*parts))}, path)
    except OSError as e:  # a full disk: name the file (the temporary one is already removed)
        raise OSError(f"cannot write the latent cache {path}: {e}") from e
