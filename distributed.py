"""Generation work split across the processes torchrun starts (sample.py, segment.py), written once.

`torchrun --nproc_per_node N -- sample.py ...` starts N copies of the script with RANK, WORLD_SIZE and
LOCAL_RANK in the environment (the `--` keeps torchrun's own parser from taking --run/--num as abbreviations of
its --run-path/--numa-binding). Without RANK (plain `python sample.py`) nothing here starts a process group.

The work items (samples, images) are dealt round-robin: item i goes to rank i % N. Every item is computed
from its own inputs and seed, so its output is that of a one-process run whatever N is (up to the float
rounding a different batch composition brings), and a rerun with another N skips the same complete items.
Rank 0 alone writes the folder-wide files (settings.json, the CSVs, summaries), once every rank's are on disk.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import cli


class World(NamedTuple):
    rank: int
    size: int
    device: torch.device


def init(device: str | None) -> World:
    """Join torchrun's process group when RANK is set (NCCL on GPU, gloo on CPU) -> rank, size, device."""
    want = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "RANK" not in os.environ:
        return World(0, 1, want)
    if want.type == "cuda":
        want = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(want)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), want)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def close():
    if dist.is_initialized():
        dist.destroy_process_group()


def gather(items: list) -> list:
    """Every rank's `items` (picklable), concatenated rank by rank, on every rank."""
    if not dist.is_initialized():
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def mine(n_items: int, world: World) -> list[int]:
    """The item indices this rank owns: i % N == rank."""
    return list(range(world.rank, n_items, world.size))


def claim_output(out, settings: dict, world: World, *, overwrite: bool):
    """`cli.claim_output` on rank 0; the others wait for it and stop (exit status 1) when it refused."""
    if world.size == 1:
        return cli.claim_output(out, settings, overwrite=overwrite)
    refusal = [None]
    if world.rank == 0:
        try:
            cli.claim_output(out, settings, overwrite=overwrite)
        except SystemExit as e:
            refusal = [e.code]
    dist.broadcast_object_list(refusal, src=0)  # also the barrier: no rank writes before the claim
    if refusal[0] is not None:
        raise SystemExit(refusal[0] if world.rank == 0 else 1)


class Progress:
    """A tqdm bar on rank 0 for the work of all ranks: total = every rank's pending items, and each of rank
    0's batches counts N times (the round-robin deal gives every rank the same share, to within one item),
    so the rate is img/s across ranks and the ETA is the whole job's."""

    def __init__(self, pending: int, world: World, desc: str):
        self.size = world.size
        self.bar = tqdm(total=sum(gather([pending])), desc=desc, unit="img", disable=world.rank != 0, smoothing=0.1)

    def update(self, n: int):
        self.bar.update(min(n * self.size, self.bar.total - self.bar.n))

    def close(self):
        self.bar.close()
