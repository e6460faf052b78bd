"""The downstream protocol of classify.py: which real and synthetic images go where, and the summary.

Apart from reading the CSVs (`load_table`, `load_synthetic`), deterministic numpy/str logic on label
matrices and id lists, no images and no model, so every rule (DiNO-Diffusion Sec. 2.5 / 3.2) is tested in
milliseconds:
- `holdout_split`: the test set without --test: whole groups (patients, or images) drawn at random (seeded)
  until `fraction` of the rows are held out.
- `balanced_order`: one greedy order of the non-test pool whose prefixes are the training regimes, so
  N = 50 is inside N = 100 is inside N = 500 ... The rule: every image belongs to the groups "positive for
  label c" plus "no finding" (no positive label: the subsets keep normal images). Each step takes the group
  with the fewest picks so far among those with unpicked images (ties: label order, "no finding" last) and
  picks its unpicked image with the fewest positive labels (ties: seeded random). Single-finding images first
  means a pick raises only the starved count: per-label counts stay within one until a label runs out.
- `assign_folds`: K folds inside a regime; whole groups to one fold, visited in seeded random order, largest
  first, each to the fold with the fewest images so far.
- `match_sources`, `synthetic_order`, `synthetic_rows`: the 1:k mixing. A synthetic row is eligible for a
  fold only when *every* image it was generated from (`source`, and `source_b` of an interpolation) is one of
  that fold's real training images: nothing made from a validation or test image, or from outside the
  regime, is trained on. Eligible rows go round-robin over their sources (seeded order), so the synthetic
  set spreads evenly and the set for 1:1 is inside the one for 1:5, and so on.
- `read_results`, `append_result`: results.csv, one fsync'ed row per finished cell (a torn last row is
  dropped), so an interrupted sweep resumes.
- `summarize`: mean +- std over folds per (regime, ratio) and a paired t-test against the 1:0 baseline.
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import cli
from data.readers import path_column_of, read_labels_csv
from eval.metrics import paired_ttest

INT_FIELDS = ("regime", "fold", "n_real", "n_synthetic", "epochs", "best_epoch")  # of results.csv


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class Table:
    paths: list[str]
    rel: list[str]  # paths as written in the CSV
    labels: np.ndarray  # float32 [N, C]
    groups: list[str]  # patient ids, or the image paths (image-level)
    extras: dict[str, list[str]] = field(default_factory=dict)
    csv: Path = Path()

    def subset(self, keep: np.ndarray) -> Table:
        idx = np.flatnonzero(keep)
        pick = lambda v: [v[i] for i in idx]
        return Table(pick(self.paths), pick(self.rel), self.labels[idx], pick(self.groups),
                     {k: pick(v) for k, v in self.extras.items()}, self.csv)


def load_table(path, labels, patient_column, flag, need=(), **csv_args) -> Table:
    """Read a labelled CSV (`csv_args`: uncertain, path_column, image_root of `read_labels_csv`); every
    problem ends in one line naming the flag, file and column."""
    try:
        paths, matrix, extras = read_labels_csv(path, labels, **csv_args)
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        path_col = path_column_of(list(rows[0]), csv_args.get("path_column"), path)
    except (ValueError, FileNotFoundError) as e:
        cli.fail(f"{flag}: {e}")
    for column in need:
        if column not in extras:
            cli.fail(f"{flag}: {path} has no {column!r} column (columns: {list(rows[0])})")
    ids = extras.get(patient_column, [""] * len(paths))
    groups = [g.strip() or p for g, p in zip(ids, paths)]  # no patient id: the image is its own group
    return Table(paths, [(r.get(path_col) or "").strip() for r in rows], matrix, groups, extras, Path(path))


def check_files(table: Table, rows, flag: str):
    """Every image of `rows` exists, else one line naming the flag and CSV."""
    missing = [table.paths[i] for i in rows if not os.path.isfile(table.paths[i])]
    if missing:
        cli.fail(f"{flag}: {len(missing)} image(s) listed in {table.csv} do not exist, e.g. {missing[:3]} "
                 "(relative paths start from --image-root, default the CSV's folder)")


def load_synthetic(args, names, pool: Table, order: np.ndarray) -> tuple[Table, np.ndarray]:
    """-> (the synthetic table, int [M, 2] pool index of each row's source and source_b, -1: none)."""
    if not args.synthetic:
        return Table([], [], np.zeros((0, len(names)), np.float32), []), np.zeros((0, 2), np.int64)
    syn = load_table(args.synthetic, names, None, "--synthetic", need=("source",),
                     uncertain=cli.UNCERTAIN[args.uncertain])
    bases = [Path.cwd(), syn.csv.parent, Path(args.real).parent]
    sources = np.stack([match_sources(syn.extras.get(c, [""] * len(syn.paths)), pool.paths, bases, pool.rel)
                        for c in ("source", "source_b")], 1)
    usable = synthetic_order(sources, np.isin(np.arange(len(pool.paths)), order), args.seed)
    check_files(syn, usable, "--synthetic")
    print(f"synthetic: {len(usable)} of {len(syn.paths)} rows come from real images of the regimes")
    return syn, sources


# ------------------------------------------------------------------------------------------------ ratios
def parse_ratio(text: str) -> float:
    """'5' -> 5.0; 'inf' / 'synthetic-only' -> inf (the "fully synthetic" setting: no real training image)."""
    t = text.strip().lower()
    if t in ("inf", "synthetic-only", "synthetic"):
        return math.inf
    if not float(t) >= 0:
        raise ValueError(f"ratio {text!r} must be >= 0")
    return float(t)


def format_ratio(k: float) -> str:
    """5.0 -> '5', 0.5 -> '0.5', inf -> 'inf' (the key written to results.csv)."""
    return "inf" if math.isinf(k) else str(int(k)) if float(k).is_integer() else repr(float(k))


def ratio_label(k: float) -> str:
    """Display name: '1:5', and 'synthetic only' for inf."""
    return "synthetic only" if math.isinf(k) else f"1:{format_ratio(k)}"


def n_synthetic(ratio: float, n_real_train: int) -> int:
    """Synthetic images wanted in a training set of `n_real_train` real images at 1:ratio."""
    if math.isinf(ratio):
        raise ValueError("the synthetic-only size is set by the largest finite ratio, not by inf")
    return int(round(ratio * n_real_train))


# ------------------------------------------------------------------------------------------------ splits
def _groups(groups: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    uniq, inverse, sizes = np.unique(np.asarray(groups, dtype=str), return_inverse=True, return_counts=True)
    return uniq, inverse.reshape(-1), sizes


def holdout_split(groups: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """bool [n]: True for the held-out test rows; whole groups, about `fraction` of the rows."""
    if not 0 < fraction < 1:
        raise ValueError(f"test fraction must be in (0, 1), got {fraction}")
    uniq, inverse, sizes = _groups(groups)
    if len(uniq) < 2:
        raise ValueError("cannot hold out a test set from a single patient/image")
    target = max(1, int(round(fraction * len(inverse))))
    chosen, total = np.zeros(len(uniq), bool), 0
    for g in np.random.default_rng(seed).permutation(len(uniq)):
        if total >= target or chosen.sum() == len(uniq) - 1:  # at least one group stays in the pool
            break
        chosen[g], total = True, total + sizes[g]
    return chosen[inverse]


def balanced_order(labels: np.ndarray, n: int | None = None, seed: int = 0) -> np.ndarray:
    """Greedy label-balanced order of the rows of `labels` [N, C] (0/1): the first n of it is regime n.

    See the module docstring for the rule. Returns int64 indices [min(n, N)] (all N when n is None).
    """
    y = np.asarray(labels) > 0.5
    total, n = len(y), len(y) if n is None else min(n, len(y))
    groups = np.concatenate([y, ~y.any(1, keepdims=True)], 1)  # [N, C + 1]: labels, then "no finding"
    tiebreak = np.random.default_rng(seed).permutation(total)
    by_key = np.lexsort((tiebreak, y.sum(1)))  # fewest positive labels first, then the random order
    queues = [by_key[groups[by_key, g]] for g in range(groups.shape[1])]
    heads, counts = [0] * len(queues), np.zeros(len(queues), np.int64)
    picked, order = np.zeros(total, bool), []
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


def assign_folds(groups: Sequence[str], k: int, seed: int) -> np.ndarray:
    """int [n] fold id in 0..k-1 per row; rows sharing a group (patient) share a fold."""
    uniq, inverse, sizes = _groups(groups)
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    if len(uniq) < k:
        raise ValueError(f"cannot make {k} folds from {len(uniq)} patients/images")
    perm = np.random.default_rng(seed).permutation(len(uniq))
    visit = perm[np.argsort(-sizes[perm], kind="stable")]  # largest groups first, random among equals
    load, fold_of = np.zeros(k, np.int64), np.zeros(len(uniq), np.int64)
    for g in visit:
        f = int(np.argmin(load))
        fold_of[g], load[f] = f, load[f] + sizes[g]
    return fold_of[inverse]


# ------------------------------------------------------------------------------------------------ synthetic
def match_sources(sources: Sequence[str], real_paths: Sequence[str], bases: Sequence[Path],
                  csv_relative: Sequence[str] | None = None) -> np.ndarray:
    """Index into `real_paths` of each synthetic `source` string (-1: not a known real image; '' -> -1).

    sample.py records the source as the path it read, so a relative source is tried against each folder of
    `bases` (e.g. the working directory, the synthetic CSV's and the real CSV's folders). When no base makes
    it an existing file (the synthetic set was generated on another machine), the source matches the real
    image whose path as written in the real CSV (`csv_relative`) is a trailing part of it.
    """
    def norm(p) -> str:  # string-only normalisation: no file-system call per row
        return os.path.normpath(os.path.abspath(os.path.expanduser(str(p))))

    exact, suffix = {norm(p): i for i, p in enumerate(real_paths)}, defaultdict(list)
    for i, rel in enumerate(csv_relative or []):
        suffix[Path(os.path.normpath(rel)).as_posix()].append(i)
    out = np.full(len(sources), -1, np.int64)
    for j, s in enumerate(sources):
        if not (s := (s or "").strip()):
            continue
        candidates = [norm(s)] if Path(s).is_absolute() else [norm(Path(b) / s) for b in bases]
        hits = [exact[c] for c in candidates if c in exact]
        if hits:
            out[j] = hits[0]
        elif not any(os.path.exists(c) for c in candidates):  # generated elsewhere: match the CSV's path
            parts = Path(s).as_posix().split("/")
            same = next((suffix[t] for t in ("/".join(parts[i:]) for i in range(len(parts))) if t in suffix), [])
            out[j] = same[0] if len(same) == 1 else -1
    return out


def synthetic_order(row_sources: np.ndarray, allowed: np.ndarray, seed: int) -> np.ndarray:
    """Eligible synthetic rows, round-robin over their primary source.

    row_sources: int [M, 2] real-image index of each row's `source` and `source_b` (-1 = none), allowed:
    bool [n_real] (the fold's real training images). A row is eligible when it has a `source` and all its
    sources are allowed. Returns int64 row indices.
    """
    src = np.asarray(row_sources, np.int64).reshape(len(row_sources), -1 if len(row_sources) else 2)
    has = src >= 0
    ok = has[:, 0] & np.all(~has | allowed[np.where(has, src, 0)], 1)
    rng = np.random.default_rng(seed)
    by_source: dict[int, list[int]] = defaultdict(list)
    for r in rng.permutation(np.flatnonzero(ok)):
        by_source[int(src[r, 0])].append(int(r))
    queues = [by_source[s] for s in rng.permutation(sorted(by_source))] if by_source else []
    return np.asarray([q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)],
                      np.int64)


def take_synthetic(order: np.ndarray, m: int, replace: bool) -> np.ndarray:
    """The first m rows of `order`; when it is shorter: all of it (cap), or cycled to m rows (replace)."""
    return order[:m] if m <= len(order) or not replace or len(order) == 0 else np.resize(order, m)


def synthetic_rows(ratio: float, largest: float, order: np.ndarray, n_real_train: int,
                   replace: bool) -> tuple[np.ndarray, int]:
    """The synthetic rows of one cell -> (rows, how many were wanted). 1:ratio wants round(ratio * n);
    synthetic-only (inf) the count of the `largest` finite ratio, or every eligible row when that is 0."""
    wanted = (n_synthetic(largest, n_real_train) or len(order)) if math.isinf(ratio) else \
        n_synthetic(ratio, n_real_train)
    return take_synthetic(order, wanted, replace), wanted


# ------------------------------------------------------------------------------------------------ results
def read_results(path: Path, fields: list[str]) -> list[dict]:
    """Finished rows of results.csv, parsed. A torn last line (a write cut short: no final newline, or
    missing fields) is dropped and the file rewritten without it."""
    text = path.read_text() if path.exists() else ""
    whole = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
    reader = csv.DictReader(whole.splitlines())
    if reader.fieldnames is not None and reader.fieldnames != fields:
        raise ValueError(f"{path} has columns {reader.fieldnames}, expected {fields}")
    raw = list(reader)
    good = [r for r in raw if None not in r.values() and None not in r]
    if text and (len(good) != len(raw) or whole != text or reader.fieldnames is None):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fields)
            w.writeheader()
            w.writerows(good)
    return [{k: parse_ratio(v) if k == "ratio" else int(v) if k in INT_FIELDS else float(v) for k, v in r.items()}
            for r in good]


def append_result(path: Path, fields: list[str], row: dict):
    """Append one finished cell to results.csv (header first) and push it to disk."""
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fields)
        if new:
            w.writeheader()
        w.writerow({k: format_ratio(v) if k == "ratio" else f"{v:.6f}" if isinstance(v, float) else v
                    for k, v in row.items()})
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------ summary
def nanmean(values) -> float:
    v = np.asarray(values, np.float64)
    return float(np.nanmean(v)) if (~np.isnan(v)).any() else math.nan  # all nan: nan, without a warning


def summarize(rows: list[dict], alpha: float = 0.05) -> tuple[list[dict], str]:
    """Per (regime, ratio): mean/std of mean_auc over folds, and a paired t-test vs the 1:0 baseline.

    rows: results.csv rows (regime int, ratio float, fold int, mean_auc float, n_real, n_synthetic).
    Pairs are the folds both cells finished (same real train/val split, same test set). Returns
    (stats rows, markdown text).
    """
    cells: dict[tuple[int, float], dict[int, dict]] = defaultdict(dict)
    for r in rows:
        cells[(r["regime"], r["ratio"])][r["fold"]] = r
    stats = []
    for regime, ratio in sorted(cells):
        folds, base = cells[(regime, ratio)], cells.get((regime, 0.0), {})
        aucs = np.array([folds[f]["mean_auc"] for f in sorted(folds)], np.float64)
        common = [f for f in sorted(folds) if f in base and not math.isnan(folds[f]["mean_auc"] + base[f]["mean_auc"])]
        p = math.nan
        if ratio != 0 and len(common) >= 2:
            _, p = paired_ttest(np.array([folds[f]["mean_auc"] for f in common], np.float64),
                                np.array([base[f]["mean_auc"] for f in common], np.float64))
        stats.append(dict(regime=regime, ratio=ratio, folds=len(aucs), mean=nanmean(aucs),
                          std=float(np.nanstd(aucs, ddof=1)) if np.sum(~np.isnan(aucs)) > 1 else math.nan,
                          p=p, n_real=nanmean([folds[f]["n_real"] for f in folds]),
                          n_synthetic=nanmean([folds[f]["n_synthetic"] for f in folds])))
    return stats, _markdown(stats, alpha)


def _markdown(stats: list[dict], alpha: float) -> str:
    ratios, regimes = sorted({s["ratio"] for s in stats}), sorted({s["regime"] for s in stats})
    at = {(s["regime"], s["ratio"]): s for s in stats}

    def table(cell) -> list[str]:  # one row per regime, one column per ratio; "" where a cell is missing
        head = ["| N real | " + " | ".join(ratio_label(k) for k in ratios) + " |", "|---:|" + "---:|" * len(ratios)]
        return head + [f"| {n} | " + " | ".join(cell(at[n, k]) if (n, k) in at else "" for k in ratios) + " |"
                       for n in regimes]

    def auc(s) -> str:
        std = "" if math.isnan(s["std"]) else f" ± {s['std']:.3f}"
        return f"{s['mean']:.3f}{std}{'*' if s['p'] < alpha else ''}"

    def p_value(s) -> str:
        return "baseline" if s["ratio"] == 0 else "n/a" if math.isnan(s["p"]) else f"{s['p']:.3g}"

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
