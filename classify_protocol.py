"""The rules of classify.py's experiment (DiNO-Diffusion Sec. 2.4.2-2.4.3): which images go where, and the summary.

Deterministic numpy on label matrices and id lists, no images and no model, so every rule is tested in
milliseconds:
- `holdout_split`: the test set without --test: whole groups (patients, or images), seeded, until
  `fraction` of the rows are held out.
- `balanced_order`: one greedy order of the pool whose prefixes are the regimes (N = 50 inside N = 100 ...).
  Every image belongs to the groups "positive for label c" and "no finding" (no positive label). Each step
  takes the group with the fewest picks so far among those with unpicked images (ties: label order, "no
  finding" last) and picks its unpicked image with the fewest positive labels (ties: seeded random), so a
  pick raises only the starved count: per-label counts stay within one until a label runs out.
- `assign_folds`: K folds inside a regime; whole groups, largest first (seeded among equals), each to the
  fold with the fewest images so far.
- `match_sources`, `synthetic_order`, `take_synthetic`: the 1:k mixing. A synthetic row is eligible for a
  fold only when *every* image it was generated from (`source`, and `source_b` of an interpolation) is one
  of that fold's real training images: nothing made from a validation or test image is trained on.
  Eligible rows go round-robin over their sources (seeded), so the set for 1:1 is inside the one for 1:5.
- `summarize`: mean +- std over folds per (regime, ratio) and a paired t-test against the 1:0 baseline.
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path

import numpy as np

import cli
import hub
from data.readers import read_labels_csv
from eval.metrics import paired_ttest

INT_FIELDS = ("regime", "fold", "n_real", "n_synthetic", "epochs", "best_epoch")  # of results.csv


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class Table:
    paths: list[str]
    labels: np.ndarray  # float32 [N, C]
    groups: list[str]  # patient ids, or the image paths (image-level)
    extras: dict[str, list[str]] = field(default_factory=dict)
    csv: Path = Path()

    def subset(self, keep: np.ndarray) -> Table:
        pick = lambda v: [v[i] for i in np.flatnonzero(keep)]
        return Table(pick(self.paths), self.labels[keep], pick(self.groups),
                     {k: pick(v) for k, v in self.extras.items()}, self.csv)


def load_table(path, labels, patient_column, flag, **csv_args) -> Table:
    """A labelled CSV (`csv_args`: uncertain, path_column, image_root of `read_labels_csv`); a problem ends in
    one line naming the flag, file and column."""
    try:
        paths, matrix, extras = read_labels_csv(path, labels, **csv_args)
    except (ValueError, FileNotFoundError) as e:
        cli.fail(f"{flag}: {e}")
    ids = extras.get(patient_column, [""] * len(paths))
    groups = [g.strip() or p for g, p in zip(ids, paths)]  # no patient id: the image is its own group
    return Table(paths, matrix, groups, extras, Path(path))


def check_files(table: Table, rows, flag: str):
    missing = [table.paths[i] for i in rows if not os.path.isfile(table.paths[i])]
    if missing:
        cli.fail(f"{flag}: {len(missing)} image(s) listed in {table.csv} do not exist, e.g. {missing[:3]} "
                 "(relative paths start from --image-root, default the CSV's folder)")


def load_synthetic(args, names, pool: Table, order: np.ndarray) -> tuple[Table, np.ndarray]:
    """-> (sample.py's synthetic.csv, int [M, 2] pool index of each row's source and source_b, -1: none)."""
    if not args.synthetic:
        return Table([], np.zeros((0, len(names)), np.float32), []), np.zeros((0, 2), np.int64)
    syn = load_table(args.synthetic, names, None, "--synthetic", uncertain=cli.UNCERTAIN[args.uncertain])
    if "source" not in syn.extras:
        cli.fail(f"--synthetic: {syn.csv} has no 'source' column (sample.py's synthetic.csv has one)")
    bases = [Path.cwd(), syn.csv.parent, Path(args.real).parent]
    as_written = [os.path.relpath(p, args.image_root or Path(args.real).parent) for p in pool.paths]  # in --real
    sources = np.stack([match_sources(syn.extras.get(c, [""] * len(syn.paths)), pool.paths, bases, as_written)
                        for c in ("source", "source_b")], 1)
    usable = synthetic_order(sources, np.isin(np.arange(len(pool.paths)), order), args.seed)
    check_files(syn, usable, "--synthetic")
    print(f"synthetic: {len(usable)} of {len(syn.paths)} rows come from real images of the regimes")
    return syn, sources


# ------------------------------------------------------------------------------------------------ ratios
def parse_ratio(text: str) -> float:
    """'5' -> 5.0; 'inf' or 'synthetic-only' -> inf (the "fully synthetic" setting: no real training image)."""
    t = text.strip().lower()
    if t in ("inf", "synthetic-only"):
        return math.inf
    if not float(t) >= 0:
        raise ValueError(f"ratio {text!r} must be >= 0")
    return float(t)


def format_ratio(k: float) -> str:
    """5.0 -> '5', 0.5 -> '0.5', inf -> 'inf' (the key written to results.csv)."""
    return "inf" if math.isinf(k) else str(int(k)) if float(k).is_integer() else repr(float(k))


def ratio_label(k: float) -> str:
    return "synthetic only" if math.isinf(k) else f"1:{format_ratio(k)}"


def n_synthetic(ratio: float, n_real_train: int) -> int:
    """Synthetic images wanted beside `n_real_train` real ones at 1:ratio (finite)."""
    return int(round(ratio * n_real_train))


# ------------------------------------------------------------------------------------------------ splits
def _groups(groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    uniq, inverse, sizes = np.unique(np.asarray(groups, dtype=str), return_inverse=True, return_counts=True)
    return uniq, inverse.reshape(-1), sizes


def holdout_split(groups, fraction: float, seed: int) -> np.ndarray:
    """bool [n]: True for the held-out test rows; whole groups, about `fraction` of the rows."""
    uniq, inverse, sizes = _groups(groups)
    if len(uniq) < 2:
        raise ValueError("cannot hold out a test set from a single patient/image")
    target = max(1, int(round(fraction * len(inverse))))
    perm = np.random.default_rng(seed).permutation(len(uniq))
    before = np.cumsum(sizes[perm]) - sizes[perm]  # rows held out before group perm[i] is drawn
    chosen = np.zeros(len(uniq), bool)
    chosen[perm[:-1][before[:-1] < target]] = True  # drawn until the target; the last group stays in the pool
    return chosen[inverse]


def balanced_order(labels: np.ndarray, n: int | None = None, seed: int = 0) -> np.ndarray:
    """The label-balanced order (module docstring) of the rows of `labels` [N, C] -> int64 [min(n, N)]."""
    y = np.asarray(labels) > 0.5
    n = len(y) if n is None else min(n, len(y))
    groups = np.concatenate([y, ~y.any(1, keepdims=True)], 1)  # [N, C + 1]: labels, then "no finding"
    tiebreak = np.random.default_rng(seed).permutation(len(y))
    by_key = np.lexsort((tiebreak, y.sum(1)))  # fewest positive labels first, then the random order
    queues = [by_key[groups[by_key, g]] for g in range(groups.shape[1])]
    heads, counts = [0] * len(queues), np.zeros(len(queues), np.int64)
    picked, order = np.zeros(len(y), bool), []
    while len(order) < n:
        best = None
        for g, q in enumerate(queues):
            while heads[g] < len(q) and picked[q[heads[g]]]:
                heads[g] += 1
            if heads[g] < len(q) and (best is None or counts[g] < counts[best]):
                best = g
        i = queues[best][heads[best]]
        picked[i], counts = True, counts + groups[i]
        order.append(i)
    return np.asarray(order, np.int64)


def assign_folds(groups, k: int, seed: int) -> np.ndarray:
    """int [n] fold id in 0..k-1 per row; rows sharing a group (patient) share a fold."""
    uniq, inverse, sizes = _groups(groups)
    if len(uniq) < k:
        raise ValueError(f"cannot make {k} folds from {len(uniq)} patients/images")
    perm = np.random.default_rng(seed).permutation(len(uniq))
    load, fold_of = np.zeros(k, np.int64), np.zeros(len(uniq), np.int64)
    for g in perm[np.argsort(-sizes[perm], kind="stable")]:  # largest groups first, random among equals
        fold_of[g] = np.argmin(load)
        load[fold_of[g]] += sizes[g]
    return fold_of[inverse]


# ------------------------------------------------------------------------------------------------ synthetic
def match_sources(sources, real_paths, bases, csv_relative=()) -> np.ndarray:
    """Index into `real_paths` of each synthetic `source` string (-1: not a known real image, or '').

    sample.py records the path it read, so a relative source is tried against each folder of `bases`. When no
    base makes it an existing file (generated on another machine), it matches the real image whose path
    relative to the image root (`csv_relative`, as the real CSV writes it) is a trailing part of it, if just one is.
    """
    norm = lambda p: os.path.normpath(os.path.abspath(os.path.expanduser(str(p))))  # no file-system call
    exact, suffix = {norm(p): i for i, p in enumerate(real_paths)}, defaultdict(list)
    for i, rel in enumerate(csv_relative):
        suffix[Path(os.path.normpath(rel)).as_posix()].append(i)
    out = np.full(len(sources), -1, np.int64)
    for j, s in enumerate(s.strip() for s in sources):
        if not s:
            continue
        candidates = [norm(Path(b) / s) for b in bases]  # an absolute source is itself under every base
        hits = [exact[c] for c in candidates if c in exact]
        if hits:
            out[j] = hits[0]
        elif not any(os.path.exists(c) for c in candidates):
            parts = Path(s).as_posix().split("/")
            same = next((suffix[t] for t in ("/".join(parts[i:]) for i in range(len(parts))) if t in suffix), [])
            out[j] = same[0] if len(same) == 1 else -1
    return out


def synthetic_order(row_sources: np.ndarray, allowed: np.ndarray, seed: int) -> np.ndarray:
    """Eligible synthetic rows, round-robin over their primary source -> int64 row indices.

    row_sources: int [M, 2] real-image index of each row's `source` and `source_b` (-1 = none); allowed: bool
    [n_real] (the fold's real training images). Eligible: a `source`, and every source allowed.
    """
    has = row_sources >= 0
    ok = has[:, 0] & np.all(~has | allowed[np.where(has, row_sources, 0)], 1)
    rng = np.random.default_rng(seed)
    by_source = defaultdict(list)
    for r in rng.permutation(np.flatnonzero(ok)):
        by_source[int(row_sources[r, 0])].append(int(r))
    queues = [by_source[s] for s in rng.permutation(sorted(by_source))]
    return np.asarray([r for turn in zip_longest(*queues) for r in turn if r is not None], np.int64)


def take_synthetic(ratio: float, largest: float, order: np.ndarray, n_real_train: int) -> tuple[np.ndarray, int]:
    """One cell's synthetic rows, the first of `order` -> (rows, how many were wanted; fewer eligible: all).

    1:ratio wants round(ratio * n); synthetic-only (inf) the count of the `largest` finite ratio, or every
    eligible row when that is 0."""
    finite = largest if math.isinf(ratio) else ratio  # synthetic only: as many as at the largest finite ratio
    wanted = n_synthetic(finite, n_real_train) or (len(order) if math.isinf(ratio) else 0)
    return order[:wanted], wanted


# ------------------------------------------------------------------------------------------------ results
def read_results(path: Path, fields: list[str]) -> list[dict]:
    """Finished rows of results.csv, parsed; a torn row (no final newline, or missing fields) is dropped."""
    text = path.read_text() if path.exists() else ""
    reader = csv.DictReader(text[: text.rfind("\n") + 1].splitlines())
    if reader.fieldnames is not None and reader.fieldnames != fields:
        cli.fail(f"{path} has columns {reader.fieldnames}, expected {fields} (pass --overwrite to start clean)")
    return [{k: parse_ratio(v) if k == "ratio" else int(v) if k in INT_FIELDS else float(v) for k, v in r.items()}
            for r in reader if None not in r.values() and None not in r]


def write_results(path: Path, fields: list[str], rows: list[dict]):
    """results.csv, rewritten whole and atomically after every finished cell (an interrupted sweep resumes)."""
    hub.write_csv_atomic(path, [{k: format_ratio(v) if k == "ratio" else f"{v:.6f}" if isinstance(v, float) else v
                                 for k, v in r.items()} for r in rows], fields)


# ------------------------------------------------------------------------------------------------ summary
def nanmean(values) -> float:
    v = np.asarray(values, np.float64)
    return float(np.nanmean(v)) if (~np.isnan(v)).any() else math.nan  # all nan: nan, without a warning


def summarize(rows: list[dict], alpha: float = 0.05) -> tuple[list[dict], str]:
    """Per (regime, ratio): mean/std of mean_auc over folds, and a paired t-test vs the 1:0 baseline over the
    folds both finished (same real train/val split, same test set) -> (stats rows, markdown)."""
    cells = defaultdict(dict)
    for r in rows:
        cells[r["regime"], r["ratio"]][r["fold"]] = r
    stats = []
    for regime, ratio in sorted(cells):
        folds, base = cells[regime, ratio], cells.get((regime, 0.0), {})
        aucs = np.array([r["mean_auc"] for r in folds.values()], np.float64)
        common = [f for f in folds if f in base and not math.isnan(folds[f]["mean_auc"] + base[f]["mean_auc"])]
        p = math.nan
        if ratio != 0 and len(common) >= 2:
            p = paired_ttest(*(np.array([c[f]["mean_auc"] for f in common], np.float64) for c in (folds, base)))[1]
        stats.append(dict(regime=regime, ratio=ratio, folds=len(aucs), mean=nanmean(aucs), p=p,
                          std=float(np.nanstd(aucs, ddof=1)) if np.sum(~np.isnan(aucs)) > 1 else math.nan,
                          n_real=nanmean([r["n_real"] for r in folds.values()]),
                          n_synthetic=nanmean([r["n_synthetic"] for r in folds.values()])))
    return stats, _markdown(stats, alpha)


def _markdown(stats: list[dict], alpha: float) -> str:
    ratios, regimes = sorted({s["ratio"] for s in stats}), sorted({s["regime"] for s in stats})
    at = {(s["regime"], s["ratio"]): s for s in stats}

    def table(cell) -> list[str]:  # one row per regime, one column per ratio; "" where a cell is missing
        head = ["| N real | " + " | ".join(map(ratio_label, ratios)) + " |", "|---:|" + "---:|" * len(ratios)]
        return head + [f"| {n} | " + " | ".join(cell(at[n, k]) if (n, k) in at else "" for k in ratios) + " |"
                       for n in regimes]

    def auc(s) -> str:
        std = "" if math.isnan(s["std"]) else f" ± {s['std']:.3f}"
        return f"{s['mean']:.3f}{std}{'*' if s['p'] < alpha else ''}"

    p_value = lambda s: "baseline" if s["ratio"] == 0 else "n/a" if math.isnan(s["p"]) else f"{s['p']:.3g}"
    return "\n".join([
        "# Downstream classification: mean test AUC (real:synthetic)", "",
        "Mean over labels of the per-label test ROC AUC (labels with one class in the test set skipped), "
        "then mean ± sample std over the CV folds.",
        f"`*`: different from the real-only 1:0 baseline of the same regime at p < {alpha} "
        "(two-sided paired t-test over folds: fold f of both settings shares its real train/val split "
        "and the test set; t = mean(d) / (sd(d) / sqrt(K)), K - 1 degrees of freedom).", "",
        *table(auc), "", "## p-values (paired t-test vs 1:0)", "", *table(p_value), "",
        "## Training images per fold (real + synthetic, mean over folds)", "",
        *table(lambda s: f"{s['n_real']:.0f} + {s['n_synthetic']:.0f} ({s['folds']} folds)"), "",
    ])
