"""eval/fid.py: Frechet distance vs pytorch-fid, streaming statistics, .npz caches, fid() end to end."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from eval.densenet import DenseNet121
from eval.fid import FeatureStats, XRVDenseNetFeatures, _read, compute_stats, fid, frechet_distance


def random_gaussian(dim, rank, seed):
    g = np.random.default_rng(seed)
    a = g.standard_normal((dim, rank))
    return g.standard_normal(dim), a @ a.T / rank


def rel_diff(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")  # scipy, in pytorch-fid
@pytest.mark.parametrize("rank1, rank2", [(200, 150), (20, 30), (64, 10)])
def test_frechet_distance_matches_pytorch_fid(rank1, rank2):
    from pytorch_fid.fid_score import calculate_frechet_distance

    mu1, s1 = random_gaussian(64, rank1, seed=rank1)
    mu2, s2 = random_gaussian(64, rank2, seed=rank2 + 1)
    ref = calculate_frechet_distance(mu1, s1, mu2, s2)
    ours = frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), mu2, s2)  # tensors or arrays
    assert isinstance(ours, float)
    assert rel_diff(ours, ref) <= 1e-3, (ours, ref)


@pytest.mark.parametrize("rank", [200, 20])
def test_frechet_distance_of_a_set_with_itself_is_zero(rank):
    mu, s = random_gaussian(64, rank, seed=0)
    assert abs(frechet_distance(mu, s, mu, s)) <= 1e-9 * np.trace(s)


def test_frechet_distance_shape_errors():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_streaming_and_numpy():
    feats = torch.randn(103, 16) * 3 + 5
    one = FeatureStats().update(feats)
    streamed = FeatureStats(16)
    for chunk in feats.split(25):
        streamed.update(chunk)
    ref_mu, ref_cov = feats.double().numpy().mean(0), np.cov(feats.double().numpy(), rowvar=False)
    for stats in (one, streamed):
        assert stats.count == 103 and stats.dim == 16
        assert stats.mean.dtype == torch.float64
        np.testing.assert_allclose(stats.mean.numpy(), ref_mu, rtol=1e-12)
        np.testing.assert_allclose(stats.cov.numpy(), ref_cov, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="dim"):
        one.update(torch.randn(4, 8))


def test_feature_stats_npz_round_trip(tmp_path):
    feats = torch.randn(50, 8)
    stats = FeatureStats(extractor="xrv").update(feats)
    stats.save(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as f:  # pytorch-fid can read it: mu and sigma
        np.testing.assert_allclose(f["mu"], stats.mean.numpy())
        np.testing.assert_allclose(f["sigma"], stats.cov.numpy())
    loaded = FeatureStats.load(tmp_path / "s.npz")
    assert loaded.extractor == "xrv" and loaded.count == 50
    np.testing.assert_allclose(loaded.cov.numpy(), stats.cov.numpy(), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="cannot read feature statistics"):
        FeatureStats.load(tmp_path / "missing.npz")


# ------------------------------------------------------------------------------------------------ fid()


class ColorFeatures(nn.Module):
    """A cheap RGB extractor with the extractor interface (name, in_channels, resolution, feature_dim)."""

    name, in_channels, resolution, feature_dim = "color", 3, 16, 6

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 4, 6)

    def forward(self, x):
        x = nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        return self.proj(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


@pytest.fixture
def tiny_xrv():
    torch.manual_seed(0)
    return XRVDenseNetFeatures(DenseNet121.tiny(in_channels=1), name="xrv-tiny", resolution=64).eval()


def write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder


def test_fid_on_folders_equals_fid_on_tensors(tmp_path, tiny_xrv):
    g = np.random.default_rng(0)
    real = (g.random((12, 40, 40)) * 255).astype(np.uint8)
    fake = (np.clip(g.random((10, 40, 40)) * 200 + 40, 0, 255)).astype(np.uint8)
    real_dir, fake_dir = write_pngs(tmp_path / "real", real), write_pngs(tmp_path / "fake", fake)
    to_tensor = lambda a: torch.from_numpy(a).float().div(255)[:, None]
    kw = dict(features=tiny_xrv, batch_size=5, progress=False, device="cpu")
    from_files = fid(real_dir, fake_dir, **kw)
    from_tensors = fid(to_tensor(real), to_tensor(fake), **kw)
    assert from_files > 0
    assert rel_diff(from_files, from_tensors) <= 1e-4
    assert abs(fid(real_dir, real_dir, **kw)) <= 1e-6 * from_files


def test_fid_cache(tmp_path, tiny_xrv):
    real, fake = torch.rand(8, 1, 32, 32), torch.rand(8, 1, 32, 32) ** 2
    cache = tmp_path / "ref" / "real_stats.npz"
    kw = dict(features=tiny_xrv, batch_size=4, progress=False)
    first = fid(real, fake, cache=cache, **kw)
    assert cache.is_file() and FeatureStats.load(cache).extractor == "xrv-tiny"
    assert fid("real images are not read again", fake, cache=cache, **kw) == pytest.approx(first, rel=1e-9)
    other = XRVDenseNetFeatures(DenseNet121.tiny(in_channels=1), name="other")
    with pytest.raises(ValueError, match="extractor 'xrv-tiny', not 'other'"):
        fid(real, fake, features=other, cache=cache, batch_size=4, progress=False)


def test_compute_stats_sources(tmp_path, tiny_xrv):
    x = torch.rand(6, 1, 24, 24)
    a, b = compute_stats(x, tiny_xrv, batch_size=4), compute_stats(x, tiny_xrv)  # 2 batches or 1
    assert a.extractor == "xrv-tiny" and a.dim == 32 and a.count == b.count == 6
    torch.testing.assert_close(a.cov, b.cov, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 images"):
        compute_stats(x[:1], tiny_xrv)
    with pytest.raises(ValueError, match="no images"):
        compute_stats(tmp_path, tiny_xrv)


def test_fid_rgb_gray_and_mixed_sizes(tmp_path):
    """Folders may mix sizes, gray, RGB and 16-bit PNGs (data.read_image: grey, then the extractor's channels)."""
    g = np.random.default_rng(1)
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray((g.random((20, 20, 3)) * 255).astype(np.uint8)).save(folder / "a.png")
    Image.fromarray((g.random((33, 33)) * 255).astype(np.uint8)).save(folder / "b.jpg")
    Image.fromarray((g.random((16, 16)) * 65535).astype(np.uint16)).save(folder / "c.png")
    c16 = _read(folder / "c.png", XRVDenseNetFeatures(DenseNet121.tiny(in_channels=1), resolution=16))
    assert c16.shape == (1, 16, 16) and 0 <= c16.min() and c16.max() <= 1 and c16.max() > 0.9
    model = ColorFeatures()
    stats = compute_stats(folder, model, batch_size=2)
    assert stats.count == 3 and stats.extractor == "color"
    torch.manual_seed(0)
    assert fid(folder, torch.rand(4, 3, 16, 16), features=model, progress=False) > 0


def test_fid_named_extractors_need_weights():
    with pytest.raises(ValueError, match="needs weights"):
        fid(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), features="xrv", progress=False)
    with pytest.raises(ValueError, match="features must be"):
        fid(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), features="clip", progress=False)
