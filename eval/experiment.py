"""Pure bookkeeping of the downstream experiment (classify.py): who is in which subset, fold and ratio.

Everything here is deterministic numpy/str logic on label matrices and id lists, no images and no model,
so every rule of the protocol (DiNO-Diffusion Sec. 2.5 / 3.2) can be tested in milliseconds:

- `holdout_split`: the fixed test set when no --test CSV is given: whole groups (patients, or single images)
  drawn at random (seeded) until `fraction` of the rows are held out.
- `balanced_order`: one greedy order of the non-test pool whose prefixes are the training regimes, so the
  subset for N = 50 is inside N = 100 is inside N = 500 ... (nested by construction). The rule, exactly:
  every image belongs to the groups "positive for label c" (c = 1..C) plus a "no finding" group for images
  without any positive label (so the subsets keep normal images too). At each step take the group with the
  fewest images picked so far among the groups that still have unpicked images (ties: paper label order,
  "no finding" last); from that group pick the unpicked image with the fewest positive labels (ties: a
  seeded random order). Single-finding images first means each pick raises only the starved count, so the
  per-label positive counts stay within one of each other until a label runs out of images.
- `assign_folds`: K-fold CV inside a regime's real images; whole groups (patients) to one fold, groups
  visited in seeded random order, largest first, each to the fold with the fewest images so far.
- `match_sources`, `synthetic_order`, `take_synthetic`, `n_synthetic`: the 1:k mixing. A synthetic row is
  eligible for a fold only when *every* image it was generated from (`source`, and `source_b` for an
  interpolation) is one of that fold's real training images: nothing synthesised from a validation or test
  image, or from an image outside the regime, is ever trained on. Eligible rows are interleaved round-robin
  over their source images (in seeded random order), so the synthetic set spreads evenly over sources and
  the set for 1:1 is inside the one for 1:5, and so on.
- `read_results`, `append_result`: out/results.csv, which makes an interrupted sweep resumable (one fsync'ed
  row per finished cell; a torn last row is dropped). classify.py claims --out with `cli.claim_output`, so a
  folder holds the rows of one configuration.
- `summarize`: mean +- std over folds per (regime, ratio) and a paired t-test against the 1:0 baseline.
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from eval.metrics import paired_ttest

SYNTHETIC_ONLY = math.inf  # the "fully synthetic" setting: no real training image (ratio 1:inf)


# ------------------------------------------------------------------------------------------------ ratios
def parse_ratio(text: str) -> float:
    """'5' -> 5.0; 'inf' / 'synthetic-only' -> inf."""
    t = text.strip().lower()
    if t in ("inf", "synthetic-only", "synthetic"):
        return SYNTHETIC_ONLY
    value = float(t)
    if not value >= 0:
        raise ValueError(f"ratio {text!r} must be >= 0")
    return value


def format_ratio(k: float) -> str:
    """5.0 -> '5', 0.5 -> '0.5', inf -> 'inf' (the key written to results.csv)."""
    if math.isinf(k):
        return "inf"
    return str(int(k)) if float(k).is_integer() else repr(float(k))


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
        if total >= target or chosen.sum() == len(uniq) - 1:
            break
        chosen[g], total = True, total + sizes[g]
    return chosen[inverse]


def balanced_order(labels: np.ndarray, n: int | None = None, seed: int = 0) -> np.ndarray:
    """Greedy label-balanced order of the rows of `labels` [N, C] (0/1): the first n of it is regime n.

    See the module docstring for the rule. Returns int64 indices [min(n, N)] (all N when n is None).
    """
    y = np.asarray(labels) > 0.5
    total = len(y)
    n = total if n is None else min(n, total)
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
        picked[i] = True
        order.append(i)
        counts += groups[i]
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

    exact = {norm(p): i for i, p in enumerate(real_paths)}
    suffix = defaultdict(list)
    for i, rel in enumerate(csv_relative or []):
        suffix[Path(os.path.normpath(rel)).as_posix()].append(i)
    out = np.full(len(sources), -1, np.int64)
    for j, s in enumerate(sources):
        s = (s or "").strip()
        if not s:
            continue
        candidates = [norm(s)] if Path(s).is_absolute() else [norm(Path(b) / s) for b in bases]
        hits = [exact[c] for c in candidates if c in exact]
        if hits:
            out[j] = hits[0]
        elif not any(os.path.exists(c) for c in candidates):  # generated elsewhere: match the CSV's path
            parts = Path(s).as_posix().split("/")
            tails = ("/".join(parts[i:]) for i in range(len(parts)))
            same = next((suffix[k] for k in tails if k in suffix), [])
            out[j] = same[0] if len(same) == 1 else -1
    return out


def synthetic_order(row_sources: np.ndarray, allowed: np.ndarray, seed: int) -> np.ndarray:
    """Eligible synthetic rows, round-robin over their primary source.

    row_sources: int [M, S] real-image index of each row's sources (-1 = none; column 0 = `source`,
    column 1 = `source_b`), allowed: bool [n_real] (the fold's real training images). A row is eligible
    when it has a source and all its sources are allowed. Returns int64 row indices.
    """
    src = np.asarray(row_sources, np.int64).reshape(len(row_sources), -1 if len(row_sources) else 2)
    has = src >= 0
    ok = has.any(1) & np.all(~has | allowed[np.where(has, src, 0)], 1) & has[:, 0]
    rng = np.random.default_rng(seed)
    by_source: dict[int, list[int]] = defaultdict(list)
    for r in rng.permutation(np.flatnonzero(ok)):
        by_source[int(src[r, 0])].append(int(r))
    queues = [by_source[s] for s in rng.permutation(sorted(by_source))] if by_source else []
    order = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    return np.asarray(order, np.int64)


def take_synthetic(order: np.ndarray, m: int, replace: bool) -> np.ndarray:
    """The first m rows of `order`; when it is shorter: all of it (cap), or cycled to m rows (replace)."""
    if m <= len(order) or not replace or len(order) == 0:
        return order[:m]
    return np.resize(order, m)


def synthetic_rows(ratio: float, largest: float, order: np.ndarray, n_real_train: int,
                   replace: bool) -> tuple[np.ndarray, int]:
    """The synthetic rows of one cell -> (rows, how many were wanted). 1:ratio wants round(ratio * n);
    synthetic-only (inf) the count of the `largest` finite ratio, or every eligible row when that is 0."""
    if math.isinf(ratio):
        wanted = n_synthetic(largest, n_real_train) or len(order)
    else:
        wanted = n_synthetic(ratio, n_real_train)
    return take_synthetic(order, wanted, replace), wanted


# ------------------------------------------------------------------------------------------------ results
def read_results(path: Path, fields: list[str]) -> list[dict]:
    """Finished rows of results.csv, parsed. A torn last line (a write cut short: no final newline, or
    missing fields) is dropped and the file rewritten without it."""
    if not path.exists():
        return []
    text = path.read_text()
    whole = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
    reader = csv.DictReader(whole.splitlines())
    if reader.fieldnames is not None and reader.fieldnames != fields:
        raise ValueError(f"{path} has columns {reader.fieldnames}, expected {fields}")
    raw = list(reader)
    good = [r for r in raw if None not in r.values() and None not in r]
    if len(good) != len(raw) or whole != text or reader.fieldnames is None:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fields)
            w.writeheader()
            w.writerows(good)
    return [{k: parse_ratio(v) if k == "ratio" else int(v) if k in ("regime", "fold", "n_real",
             "n_synthetic", "epochs", "best_epoch") else float(v) for k, v in r.items()} for r in good]


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
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else math.nan


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
        folds = cells[(regime, ratio)]
        aucs = np.array([folds[f]["mean_auc"] for f in sorted(folds)], np.float64)
        base = cells.get((regime, 0.0), {})
        common = [f for f in sorted(folds) if f in base and not math.isnan(folds[f]["mean_auc"])
                  and not math.isnan(base[f]["mean_auc"])]
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
    ratios = sorted({s["ratio"] for s in stats})
    regimes = sorted({s["regime"] for s in stats})
    at = {(s["regime"], s["ratio"]): s for s in stats}
    head = "| N real | " + " | ".join(ratio_label(k) for k in ratios) + " |"
    rule = "|---:|" + "---:|" * len(ratios)
    auc_lines, p_lines, n_lines = [head, rule], [head, rule], [head, rule]
    for n in regimes:
        auc_cells, p_cells, n_cells = [], [], []
        for k in ratios:
            s = at.get((n, k))
            if s is None:
                auc_cells.append("")
                p_cells.append("")
                n_cells.append("")
                continue
            star = "*" if s["p"] < alpha else ""
            std = "" if math.isnan(s["std"]) else f" ± {s['std']:.3f}"
            auc_cells.append(f"{s['mean']:.3f}{std}{star}")
            p_cells.append("baseline" if k == 0 else "n/a" if math.isnan(s["p"]) else f"{s['p']:.3g}")
            n_cells.append(f"{s['n_real']:.0f} + {s['n_synthetic']:.0f} ({s['folds']} folds)")
        auc_lines.append(f"| {n} | " + " | ".join(auc_cells) + " |")
        p_lines.append(f"| {n} | " + " | ".join(p_cells) + " |")
        n_lines.append(f"| {n} | " + " | ".join(n_cells) + " |")
    return "\n".join([
        "# Downstream classification: mean test AUC (real:synthetic)", "",
        "Mean over labels of the per-label test ROC AUC (labels with one class in the test set skipped), "
        "then mean ± sample std over the CV folds.",
        f"`*`: different from the real-only 1:0 baseline of the same regime at p < {alpha} "
        "(two-sided paired t-test over folds: fold f of both settings shares its real train/val split "
        "and the test set; t = mean(d) / (sd(d) / sqrt(K)), K - 1 degrees of freedom).", "",
        *auc_lines, "", "## p-values (paired t-test vs 1:0)", "", *p_lines, "",
        "## Training images per fold (real + synthetic, mean over folds)", "", *n_lines, "",
    ])
