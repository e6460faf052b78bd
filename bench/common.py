"""Shared benchmark helpers: wall-clock medians, peak CPU memory, and the result table.

Every benchmark compares our implementation with the reference library in the same process, on the same
inputs, and reports ratios (ours / reference): absolute numbers depend on the machine and its load, ratios
much less. `measure(ours, ref)` interleaves the two so that a change in machine load hits both alike.

Peak memory (CPU). `tracemalloc` does not see torch's allocations (they bypass Python's allocator), and
`ru_maxrss` is a high-water mark that can never be reset. We use Linux's resettable one instead:

    1. gc.collect() and glibc `malloc_trim(0)`: memory freed earlier goes back to the OS, so the resident set
       (RSS) is the memory actually live now;
    2. writing "5" to /proc/self/clear_refs resets the process's peak RSS (VmHWM) to its current RSS;
    3. run the function, then peak = VmHWM - RSS before.

This counts every byte the function touches (tensors, oneDNN scratch buffers, the reference library's
temporaries) while it runs, including its output, but not weights and inputs that already existed. It is
exact to a few pages for the large allocations that matter (glibc serves them with fresh pages after the
trim). Where /proc/self/clear_refs is unavailable (not Linux), peak memory is reported as nan.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

COLUMNS = ("name", "ours_s", "ref_s", "time_ratio", "ours_mem_mb", "ref_mem_mb", "mem_ratio")
RATES = ("ours_img_s", "ref_img_s")  # throughput rows (bench_sample) add these columns to the table


def timeit(fn: Callable[[], object], warmup: int = 1, repeats: int = 5) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass  # not glibc: freed memory may stay resident, so the peak can only be underestimated


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak resident memory (MiB) that one call of `fn()` adds on top of what is live before it; nan if the
    platform cannot reset the peak (see the module docstring). Warm `fn` up first: one-time initialisation
    (kernel caches, lazy buffers) would otherwise be counted."""
    gc.collect()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kb("VmRSS")
    except OSError:
        return math.nan
    out = fn()
    peak = _status_kb("VmHWM")
    del out
    return max(peak - before, 0) / 1024


class Measurement(NamedTuple):
    ours_s: float
    ours_mb: float
    ref_s: float
    ref_mb: float


def measure(ours: Callable[[], object], ref: Callable[[], object], repeats: int = 5,
            warmup: int = 1) -> Measurement:
    """Median seconds and peak MiB of `ours()` and `ref()`. Calls run in the caller's grad mode (wrap them in
    torch.inference_mode() for inference), interleaved and alternating which goes first in each round."""
    for _ in range(warmup):
        ours()
        ref()
    times = ([], [])  # ours, ref
    for i in range(repeats):
        for j in (0, 1) if i % 2 == 0 else (1, 0):
            times[j].append(timeit((ours, ref)[j], warmup=0, repeats=1))
    ours_mb, ref_mb = peak_memory_mb(ours), peak_memory_mb(ref)
    return Measurement(statistics.median(times[0]), ours_mb, statistics.median(times[1]), ref_mb)


def make_row(name: str, m: Measurement, **extra) -> dict:
    """The dict `bench/__main__` collects: name, times, memory and the two ratios (ours / reference)."""
    return dict(name=name, ours_s=m.ours_s, ref_s=m.ref_s, time_ratio=m.ours_s / m.ref_s,
                ours_mem_mb=m.ours_mb, ref_mem_mb=m.ref_mb,
                mem_ratio=m.ours_mb / m.ref_mb if m.ref_mb else math.nan, **extra)


def print_table(rows: list[dict]) -> None:
    """Print rows as a Markdown table with the standard columns, and the img/s ones when a row has them."""

    def fmt(key, value):
        if not isinstance(value, float):
            return str(value)
        if key in RATES:
            return f"{value:.3g}"
        return f"{value:.2f}" if "ratio" in key else f"{value:.3f}" if key.endswith("_s") else f"{value:.0f}"

    columns = COLUMNS + tuple(k for k in RATES if any(k in row for row in rows))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(fmt(k, row.get(k, "")) for k in columns) + " |")
