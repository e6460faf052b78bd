"""Evaluation metrics of the paper's downstream tasks: ROC AUC (classification), Dice (segmentation), and
the paired t-test classify.py reports between regimes, and `describe` (count, mean, std, quantiles) for reports.

ROC AUC is the probability that a random positive scores above a random negative (ties count one half).
Ranking all N scores together (ties get the average of the ranks they span), the Mann-Whitney U statistic
gives it exactly: AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg), with R_pos the sum of the
positives' ranks. This equals sklearn.metrics.roc_auc_score (trapezoidal ROC area).

`paired_ttest` compares one number per cross-validation fold for each method (Student's t on the per-fold
differences, df = folds - 1). Folds share training data, so the test is optimistic (Nadeau & Bengio 2003);
report it as indicative. Student's t CDF comes from the regularized incomplete beta function, evaluated by
its continued fraction (Numerical Recipes 3rd ed., Sec. 6.4, `betacf`), so nothing here needs scipy.
"""

from __future__ import annotations

import math
import warnings

import torch

QUANTILES = {"min": 0.0, "p01": 0.01, "p05": 0.05, "p25": 0.25, "median": 0.5, "p75": 0.75, "p95": 0.95,
             "p99": 0.99, "max": 1.0}


def describe(values) -> dict:
    """Count, mean, std and quantiles of a set of values (JSON-ready floats; NaN ignored)."""
    v = _as_float64(values).flatten()
    v = v[~v.isnan()]
    if v.numel() == 0:
        return {"n": 0, "mean": None, "std": None}
    q = torch.quantile(v, torch.tensor(list(QUANTILES.values()), dtype=torch.float64))
    std = float(v.std()) if v.numel() > 1 else 0.0
    return {"n": v.numel(), "mean": float(v.mean()), "std": std} | dict(zip(QUANTILES, q.tolist()))


def _as_float64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().to("cpu", torch.float64)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties sharing the mean of the ranks they occupy ("midranks")."""
    values, order = torch.sort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).to(torch.float64)  # rank of the last member of each tie group
    group_rank = last - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = group_rank[inverse]
    return ranks


def _check_binary(y: torch.Tensor, name: str):
    if not torch.all((y == 0) | (y == 1)):
        raise ValueError(f"{name} must hold 0/1 (or bool) labels")


def roc_auc(y_true, y_score) -> torch.Tensor:
    """Per-label ROC AUC: y_true, y_score [N, C] (or [N]) -> float64 tensor [C] (or a 0-d tensor).

    A nan in y_true is an ignored label (CheXpert's U-Ignore): each label's AUC uses only its non-nan rows.
    A label column with only one class (among those rows) has no AUC: its entry is nan and a warning names it.
    """
    y, s = _as_float64(y_true), _as_float64(y_score)
    if y.shape != s.shape or y.ndim not in (1, 2):
        raise ValueError(f"y_true {list(y.shape)} and y_score {list(s.shape)} must both be [N] or [N, C]")
    _check_binary(y[~torch.isnan(y)], "y_true")
    if torch.isnan(s).any():
        raise ValueError("y_score contains NaN")
    squeeze = y.ndim == 1
    y, s = (y[:, None], s[:, None]) if squeeze else (y, s)
    aucs = torch.empty(y.shape[1], dtype=torch.float64)
    for c in range(y.shape[1]):
        valid = ~torch.isnan(y[:, c])
        yc, sc = y[valid, c], s[valid, c]
        pos = yc == 1
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos == 0 or n_neg == 0:
            warnings.warn(f"roc_auc: label column {c} has only one class ({n_pos} positives, {n_neg} "
                          "negatives); its AUC is undefined (nan)", stacklevel=2)
            aucs[c] = float("nan")
            continue
        r_pos = average_ranks(sc)[pos].sum()
        aucs[c] = (r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)  # Mann-Whitney U / (n_pos n_neg)
    return aucs[0] if squeeze else aucs


def dice(pred, target) -> torch.Tensor:
    """Dice = 2 |A & B| / (|A| + |B|) of binary masks; 1.0 when both are empty.

    [H, W] (or any 1-D/2-D mask) -> 0-d tensor; [B, ...] with 3+ dims -> [B] (one score per item).
    Masks must be bool or 0/1 valued (threshold probabilities first).
    """
    p, t = torch.as_tensor(pred), torch.as_tensor(target)
    if p.shape != t.shape:
        raise ValueError(f"pred {list(p.shape)} and target {list(t.shape)} must have the same shape")
    _check_binary(p, "pred")
    _check_binary(t, "target")
    p, t = p.bool(), t.bool()
    batched = p.ndim >= 3
    p, t = (p.flatten(1), t.flatten(1)) if batched else (p.reshape(1, -1), t.reshape(1, -1))
    inter = (p & t).sum(1, dtype=torch.float64)
    total = p.sum(1, dtype=torch.float64) + t.sum(1, dtype=torch.float64)
    d = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
    return d if batched else d[0]


def paired_ttest(a, b) -> tuple[float, float]:
    """Paired Student t-test of mean(a - b) == 0 (e.g. per-fold AUCs of two methods) -> (t, two-sided p).

    Matches scipy.stats.ttest_rel: t = mean(d) / (sd(d) / sqrt(k)), df = k - 1,
    p = P(|T_df| >= |t|) = I_{df/(df+t^2)}(df/2, 1/2).
    """
    d = _as_float64(a).reshape(-1) - _as_float64(b).reshape(-1)
    k = d.numel()
    if k < 2:
        raise ValueError(f"paired_ttest needs at least 2 pairs, got {k}")
    mean, sd = float(d.mean()), float(d.std(correction=1))
    if sd == 0:
        return (math.nan, math.nan) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (sd / math.sqrt(k))
    df = k - 1
    return t, betainc_regularized(df / 2, 0.5, df / (df + t * t))


def betainc_regularized(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function (Numerical Recipes `betai`).

    I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * CF(a, b, x), with CF the continued fraction of `_betacf`, which
    converges fast for x < (a + 1) / (a + b + 2); otherwise use the symmetry I_x(a, b) = 1 - I_{1-x}(b, a).
    """
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _betacf(a: float, b: float, x: float, max_iter: int = 300, eps: float = 3e-16) -> float:
    """Continued fraction for I_x(a, b), modified Lentz method (Numerical Recipes 3rd ed., eq. 6.4.5)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),  # even step d_{2m}
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):  # odd step d_{2m+1}
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            delta = d * c
            h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")
