"""eval/msssim.py against pytorch-msssim 1.0 (the reference), and eval/diversity.py's pairs and report."""

import inspect

import pytest
import torch

from eval.diversity import diversity_report, pairwise_msssim, random_pairs
from eval.msssim import MS_SSIM_WEIGHTS, _ssim_cs, gaussian_window, ms_ssim, ms_ssim_settings

pm = pytest.importorskip("pytorch_msssim")


def ssim(x, y, data_range=1.0, win_size=11, sigma=1.5, K=(0.01, 0.03)):
    """Single-scale SSIM [B] from eval.msssim's per-scale statistics (= `pytorch_msssim.ssim(...,
    size_average=False)`); test-only, no script reports plain SSIM."""
    return _ssim_cs(x, y, data_range, gaussian_window(win_size, sigma), K)[0].mean(1)


def reference_without_size_assert():
    """pytorch-msssim's own ms_ssim with its hard-coded 160 px assertion compiled out (optimize=1 drops
    asserts), to check our small-image modes against the same code path."""
    module = inspect.getmodule(pm.ms_ssim)
    namespace = {}
    exec(compile(inspect.getsource(module), module.__file__, "exec", optimize=1), namespace)
    return namespace["ms_ssim"]


def image_pair(shape, data_range, seed=0):
    """A smooth random image and a noisy, contrast-changed copy of it, in [0, data_range]."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    base = torch.nn.functional.interpolate(torch.rand(b, c, h // 8 + 1, w // 8 + 1, generator=g), size=(h, w),
                                           mode="bilinear", align_corners=False)
    other = (0.8 * base + 0.1 + 0.08 * torch.randn(shape, generator=g)).clamp(0, 1)
    return base * data_range, other * data_range


@pytest.mark.parametrize("shape,data_range", [((3, 1, 161, 161), 1.0), ((2, 3, 200, 177), 255.0),
                                              ((2, 1, 256, 256), 1.0), ((1, 1, 193, 330), 255.0)])
def test_ms_ssim_and_ssim_match_pytorch_msssim(shape, data_range):
    x, y = image_pair(shape, data_range)
    ours = ms_ssim(x, y, data_range)
    ref = pm.ms_ssim(x, y, data_range=data_range, size_average=False)
    assert ours.shape == (shape[0],)
    assert (ours - ref).abs().max() <= 1e-4
    s_ours, s_ref = ssim(x, y, data_range), pm.ssim(x, y, data_range=data_range, size_average=False)
    assert (s_ours - s_ref).abs().max() <= 1e-4
    assert 0.2 < ours.min() and ours.max() < 1  # a non-trivial comparison


def test_ssim_small_images_and_options_match():
    x, y = image_pair((4, 1, 32, 40), 1.0, seed=1)
    ours = ssim(x, y, 1.0, win_size=7, sigma=1.0, K=(0.02, 0.04))
    ref = pm.ssim(x, y, data_range=1.0, size_average=False, win_size=7, win_sigma=1.0, K=(0.02, 0.04))
    assert (ours - ref).abs().max() <= 1e-4


def test_identical_images_give_one():
    x, _ = image_pair((2, 1, 64, 64), 1.0)
    assert torch.allclose(ms_ssim(x, x, small="scales"), torch.ones(2), atol=1e-6)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)


def test_small_images_need_an_option():
    x, y = image_pair((1, 1, 64, 64), 1.0)
    with pytest.raises(ValueError, match="160 px"):
        ms_ssim(x, y)
    with pytest.raises(AssertionError):  # pytorch-msssim refuses them too
        pm.ms_ssim(x, y, data_range=1.0)
    assert ms_ssim_settings(161)[0] == MS_SSIM_WEIGHTS
    assert len(ms_ssim_settings(64, small="scales")[0]) == 3  # 64 > 10 * 2^2
    assert len(ms_ssim_settings(128, small="scales")[0]) == 4
    assert ms_ssim_settings(64, small="window")[1:] == (3, pytest.approx(1.5 * 3 / 11))
    with pytest.raises(ValueError):
        ms_ssim_settings(10, small="scales")


@pytest.mark.parametrize("side,data_range", [(64, 1.0), (100, 255.0)])
def test_small_scales_matches_reference_with_renormalised_weights(side, data_range):
    x, y = image_pair((3, 1, side, side), data_range, seed=2)
    weights, win, sigma = ms_ssim_settings(side, small="scales")
    assert sum(weights) == pytest.approx(1.0) and win == 11
    ref = reference_without_size_assert()(x, y, data_range=data_range, size_average=False, weights=list(weights))
    assert (ms_ssim(x, y, data_range, small="scales") - ref).abs().max() <= 1e-4


def test_fewer_weights_match_reference_where_its_assertion_passes():
    x, y = image_pair((2, 1, 170, 170), 1.0, seed=3)
    w = (0.2, 0.3, 0.5)
    ref = pm.ms_ssim(x, y, data_range=1.0, size_average=False, weights=list(w))
    assert (ms_ssim(x, y, 1.0, weights=w) - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("side", [64, 96])
def test_small_window_matches_reference(side):
    x, y = image_pair((2, 1, side, side), 255.0, seed=4)
    _, win, sigma = ms_ssim_settings(side, small="window")
    ref = pm.ms_ssim(x, y, data_range=255.0, size_average=False, win_size=win, win_sigma=sigma)
    assert (ms_ssim(x, y, 255.0, small="window") - ref).abs().max() <= 1e-4


def test_pairs():
    assert random_pairs(4, 10).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]  # all of them
    g = torch.Generator().manual_seed(0)
    p = random_pairs(1000, 50, g)
    assert p.shape == (50, 2) and (p[:, 0] < p[:, 1]).all() and len({tuple(r) for r in p.tolist()}) == 50
    groups = torch.arange(30) // 3
    for n in (30,):
        for count in (10, 200):
            q = random_pairs(n, count, g, groups)
            assert (groups[q[:, 0]] != groups[q[:, 1]]).all() and len(q) == min(count, 405)
    assert random_pairs(1, 10).shape == (0, 2)


def test_pairwise_msssim_equals_direct_calls():
    x, y = image_pair((3, 1, 64, 64), 1.0)
    images = torch.cat([x, y])  # [6, 1, 64, 64]
    pairs = random_pairs(6, 1000)  # all 15
    vals = pairwise_msssim(images, pairs, small="scales", batch_size=4)
    direct = ms_ssim(images[pairs[:, 0]], images[pairs[:, 1]], small="scales")
    assert len(vals) == 15 and torch.allclose(vals, direct, atol=1e-6)
    cross = pairwise_msssim(x, torch.tensor([[0, 0], [1, 1]]), y, small="scales")
    assert torch.allclose(cross, ms_ssim(x[:2], y[:2], small="scales"), atol=1e-6)


def test_diversity_report_orders_the_comparisons():
    """Variations = a source plus light noise: more alike than random pairs; each close to its source."""
    from data.phantom import make_phantom

    g = torch.Generator().manual_seed(0)
    sources = torch.stack([torch.from_numpy(make_phantom(s, 64)[0]).float()[None] / 255 for s in range(5)])
    index = torch.arange(5).repeat_interleave(3)  # 3 variations of each of 5 sources
    synthetic = (sources[index] + 0.05 * torch.randn(15, 1, 64, 64, generator=g)).clamp(0, 1)
    rep = diversity_report(synthetic, index, sources, index, small="scales", generator=g)
    s = rep.summary
    assert s["within_source"]["n"] == 5 * 3 and s["random_pairs"]["n"] == 90  # all cross-source pairs
    assert s["source_pairs"]["n"] == 10 and s["to_source"]["n"] == 15
    assert s["within_source"]["mean"] > s["random_pairs"]["mean"]
    assert s["to_source"]["mean"] > s["source_pairs"]["mean"]
    assert abs(s["random_pairs"]["mean"] - s["source_pairs"]["mean"]) < 0.1
    assert s["ms_ssim"]["win_size"] == 11 and len(s["ms_ssim"]["weights"]) == 3
    assert rep.to_source.shape == (15,) and not rep.to_source.isnan().any()
    assert rep.within_source.shape == (15,) and len(rep.random_values) == 90
    # per image: the mean over its own in-group pairs (image 0: (0, 1), (0, 2); image 4: (3, 4), (4, 5))
    sib = ms_ssim(synthetic[[0, 0, 3, 4]], synthetic[[1, 2, 4, 5]], small="scales")
    assert rep.within_source[0].item() == pytest.approx(sib[:2].mean().item(), abs=1e-6)
    assert rep.within_source[4].item() == pytest.approx(sib[2:].mean().item(), abs=1e-6)
