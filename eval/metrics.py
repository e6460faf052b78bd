"""Evaluation metrics of the paper's downstream tasks: ROC AUC (classification), Dice (segmentation), and
significance tests for comparing AUCs.

ROC AUC is the probability that a random positive scores above a random negative (ties count one half).
Ranking all N scores together (ties get the average of the ranks they span), the Mann-Whitney U statistic
gives it exactly: AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg), with R_pos the sum of the
positives' ranks. This equals sklearn.metrics.roc_auc_score (trapezoidal ROC area).

Which test to use:
- two classifiers scored on the SAME test images (e.g. with vs. without synthetic data, one label):
  `delong_test` (DeLong et al. 1988, Biometrics 44:837; the O(N log N) algorithm of Sun & Xu 2014, IEEE SPL
  21:1389). It uses the correlation of the two AUCs through the shared images; asymptotic normal test.
  `bootstrap_auc_diff` (paired resampling of images) makes no normality assumption and also gives a
  confidence interval; prefer it for small test sets or few positives (< ~30).
- one number per cross-validation fold for each method (e.g. mean AUC of 5 folds): `paired_ttest`
  (Student's t on the per-fold differences, df = folds - 1). Folds share training data, so the test is
  optimistic (Nadeau & Bengio 2003); report it as indicative.
Nothing here uses scipy: the normal CDF comes from math.erfc and Student's t CDF from the regularized
incomplete beta function, evaluated by its continued fraction (Numerical Recipes 3rd ed., Sec. 6.4, `betacf`).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch


def _as_float64(x) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.detach().to("cpu", torch.float64)


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
    for x, name in ((p, "pred"), (t, "target")):
        if x.dtype != torch.bool:
            _check_binary(x, name)
    p, t = p.bool(), t.bool()
    batched = p.ndim >= 3
    p, t = (p.flatten(1), t.flatten(1)) if batched else (p.reshape(1, -1), t.reshape(1, -1))
    inter = (p & t).sum(1, dtype=torch.float64)
    total = p.sum(1, dtype=torch.float64) + t.sum(1, dtype=torch.float64)
    d = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
    return d if batched else d[0]


# ------------------------------------------------------------------------------------------------ tests


class AUCComparison(NamedTuple):
    auc_a: float
    auc_b: float
    z: float
    p: float


def _normal_two_sided_p(z: float) -> float:
    """P(|Z| >= |z|) for a standard normal Z: erfc(|z| / sqrt 2)."""
    return math.erfc(abs(z) / math.sqrt(2))


def delong_test(y_true, score_a, score_b) -> AUCComparison:
    """DeLong's test of AUC(a) == AUC(b) for two scores of the same samples, one binary label.

    Sun & Xu's algorithm: with m positives X and n negatives Y, and midranks T_Z (all samples), T_X (among
    positives), T_Y (among negatives) of each score,
        V10_i = (T_Z(X_i) - T_X(X_i)) / n       (placement of positive i: fraction of negatives below it)
        V01_j = 1 - (T_Z(Y_j) - T_Y(Y_j)) / m   (fraction of positives above negative j)
        AUC = mean(V10),  Cov(AUC_a, AUC_b) = S10 / m + S01 / n  (S = sample covariances of V10 and V01),
    z = (AUC_a - AUC_b) / sqrt(var_a + var_b - 2 cov_ab), p two-sided. Returns (auc_a, auc_b, z, p).
    """
    y = _as_float64(y_true).reshape(-1)
    _check_binary(y, "y_true")
    scores = torch.stack([_as_float64(score_a).reshape(-1), _as_float64(score_b).reshape(-1)])
    if scores.shape[1] != y.numel():
        raise ValueError(f"y_true has {y.numel()} samples, scores have {scores.shape[1]}")
    pos = y == 1
    m, n = int(pos.sum()), int((~pos).sum())
    if m < 2 or n < 2:
        raise ValueError(f"delong_test needs at least 2 positives and 2 negatives, got {m} and {n}")
    v10, v01 = [], []
    for s in scores:
        x, yy = s[pos], s[~pos]
        tz = average_ranks(torch.cat([x, yy]))
        tx, ty = average_ranks(x), average_ranks(yy)
        v10.append((tz[:m] - tx) / n)
        v01.append(1 - (tz[m:] - ty) / m)
    v10, v01 = torch.stack(v10), torch.stack(v01)  # [2, m], [2, n]
    aucs = v10.mean(1)
    cov = torch.cov(v10) / m + torch.cov(v01) / n  # [2, 2]
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(aucs[0] - aucs[1])
    if var <= 1e-300:  # identical (or perfectly separating) scores: no variance to test against
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
    else:
        z = diff / math.sqrt(var)
    return AUCComparison(float(aucs[0]), float(aucs[1]), z, _normal_two_sided_p(z))


class BootstrapResult(NamedTuple):
    diff: float  # AUC(a) - AUC(b) on the full data
    ci_low: float
    ci_high: float
    p: float


def bootstrap_auc_diff(y_true, score_a, score_b, n_boot: int = 2000, alpha: float = 0.05,
                       generator: torch.Generator | None = None) -> BootstrapResult:
    """Paired bootstrap of AUC(a) - AUC(b): resample samples with replacement (same indices for both scores).

    Returns the observed difference, the percentile (1 - alpha) confidence interval and the two-sided
    bootstrap p-value 2 min(P*(d <= 0), P*(d >= 0)). Resamples that miss a class are redrawn.
    """
    y = _as_float64(y_true).reshape(-1)
    a, b = _as_float64(score_a).reshape(-1), _as_float64(score_b).reshape(-1)
    n = y.numel()
    generator = generator or torch.Generator().manual_seed(0)
    diffs = []
    while len(diffs) < n_boot:
        idx = torch.randint(n, (n,), generator=generator)
        yi = y[idx]
        if yi.min() == yi.max():
            continue
        diffs.append(float(roc_auc(yi, a[idx]) - roc_auc(yi, b[idx])))
    d = torch.tensor(diffs, dtype=torch.float64)
    lo, hi = torch.quantile(d, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)).tolist()
    p = min(1.0, 2 * min(float((d <= 0).double().mean()), float((d >= 0).double().mean())))
    return BootstrapResult(float(roc_auc(y, a) - roc_auc(y, b)), lo, hi, p)


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
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
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
