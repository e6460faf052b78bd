"""eval/metrics.py vs scikit-learn / scipy."""

import math

import numpy as np
import pytest
import torch

from eval.metrics import (
    average_ranks,
    betainc_regularized,
    dice,
    paired_ttest,
    roc_auc,
)


def labels_and_scores(n, c, seed, ties=True):
    g = np.random.default_rng(seed)
    y = (g.random((n, c)) < 0.3).astype(np.int64)
    s = g.standard_normal((n, c)) + 0.8 * y
    if ties:
        s = np.round(s, 1)  # many tied scores, also across classes
    return y, s


def test_average_ranks_match_scipy():
    from scipy.stats import rankdata

    x = np.round(np.random.default_rng(0).standard_normal(200), 1)
    np.testing.assert_array_equal(average_ranks(torch.from_numpy(x)).numpy(), rankdata(x))


@pytest.mark.parametrize("ties", [True, False])
def test_roc_auc_matches_sklearn(ties):
    from sklearn.metrics import roc_auc_score

    y, s = labels_and_scores(300, 5, seed=int(ties), ties=ties)
    ours = roc_auc(torch.from_numpy(y), torch.from_numpy(s))
    assert ours.dtype == torch.float64 and ours.shape == (5,)
    ref = roc_auc_score(y, s, average=None)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-12)
    one = roc_auc(y[:, 0], s[:, 0])  # 1-D (numpy accepted too) -> 0-d tensor
    assert one.ndim == 0 and abs(one.item() - ref[0]) <= 1e-12
    assert roc_auc(torch.from_numpy(y).bool(), torch.from_numpy(s).float())[0].item() == pytest.approx(ref[0])


def test_roc_auc_one_class_column_is_nan_with_warning():
    y, s = labels_and_scores(50, 3, seed=2)
    y[:, 1] = 0
    with pytest.warns(UserWarning, match="label column 1 has only one class"):
        aucs = roc_auc(y, s)
    assert math.isnan(aucs[1]) and not math.isnan(aucs[0]) and not math.isnan(aucs[2])


def test_roc_auc_ignores_nan_labels_per_column():
    """U-Ignore: nan labels drop out of that label's AUC only; the rest equals sklearn on the valid rows."""
    from sklearn.metrics import roc_auc_score

    y, s = labels_and_scores(200, 4, seed=3)
    y = y.astype(np.float64)
    g = np.random.default_rng(4)
    y[g.random(y.shape) < 0.25] = np.nan  # a different set of ignored rows per label
    y[:, 3] = np.nan
    y[:5, 3] = [0, 0, 1, 1, 0]
    ours = roc_auc(torch.from_numpy(y), torch.from_numpy(s)).numpy()
    for c in range(4):
        ok = ~np.isnan(y[:, c])
        assert abs(ours[c] - roc_auc_score(y[ok, c], s[ok, c])) <= 1e-12
    assert abs(roc_auc(y[:, 0], s[:, 0]).item() - ours[0]) <= 1e-12  # 1-D too
    y[:, 1] = np.where(np.isnan(y[:, 1]), np.nan, 1.0)  # only positives left among the valid rows
    with pytest.warns(UserWarning, match="label column 1 has only one class"):
        assert math.isnan(roc_auc(y, s)[1])


def test_roc_auc_bad_input():
    with pytest.raises(ValueError, match="0/1"):
        roc_auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="must both be"):
        roc_auc(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0, 1], [0.1, float("nan")])


@pytest.mark.parametrize("k, shift, seed", [(5, 0.02, 0), (5, 0.0, 1), (2, 0.1, 2), (10, 0.5, 3), (3, -0.3, 4)])
def test_paired_ttest_matches_scipy(k, shift, seed):
    from scipy.stats import ttest_rel

    g = np.random.default_rng(seed)
    a = 0.8 + 0.03 * g.standard_normal(k)
    b = a - shift + 0.02 * g.standard_normal(k)
    t, p = paired_ttest(torch.from_numpy(a), b)
    ref = ttest_rel(a, b)
    assert t == pytest.approx(ref.statistic, rel=1e-10)
    assert p == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)


def test_paired_ttest_edge_cases():
    assert all(math.isnan(v) for v in paired_ttest([1.0, 2.0], [1.0, 2.0]))  # 0/0, as scipy
    assert paired_ttest([2.0, 3.0, 4.0], [1.0, 2.0, 3.0]) == (math.inf, 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        paired_ttest([1.0], [0.5])


def test_betainc_matches_scipy():
    from scipy.special import betainc

    for a in (0.5, 1.0, 2.5, 12.0, 50.0):
        for b in (0.5, 1.0, 3.0, 40.0):
            for x in (1e-6, 0.01, 0.3, 0.5, 0.77, 0.999):
                assert betainc_regularized(a, b, x) == pytest.approx(betainc(a, b, x), rel=1e-10, abs=1e-300)


def test_dice():
    a = torch.zeros(8, 8, dtype=torch.bool)
    b = torch.zeros(8, 8, dtype=torch.bool)
    assert dice(a, b).item() == 1.0  # both empty
    a[:4] = True
    assert dice(a, b).item() == 0.0  # one empty
    assert dice(a, a).item() == 1.0
    b[2:6] = True  # overlap 2 rows of 4: 2 * 16 / (32 + 32)
    assert dice(a, b).item() == pytest.approx(0.5)
    assert dice(a.int(), b.float()).item() == pytest.approx(0.5)  # 0/1 numbers
    batch = dice(torch.stack([a, a, torch.zeros_like(a)]), torch.stack([b, a, torch.zeros_like(a)]))
    assert batch.dtype == torch.float64 and batch.tolist() == [0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="0/1"):
        dice(torch.rand(4, 4), torch.ones(4, 4))
    with pytest.raises(ValueError, match="same shape"):
        dice(a, a[:4])
