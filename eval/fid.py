"""Frechet distance between feature distributions (FID; Heusel et al. 2017, arXiv 1706.08500).

Real and generated images are embedded by a frozen network (the paper reports both the Inception-v3 of
pytorch-fid and torchxrayvision's CXR DenseNet-121), each set is summarised by the mean mu and covariance S of
its features, and the two Gaussians are compared with the Frechet (2-Wasserstein) distance

    FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

`FeatureStats` accumulates mu and S in one streaming pass (float64 sums) and saves them as pytorch-fid's
`.npz` (mu, sigma) plus the count; `frechet_distance` evaluates the formula in float64 without scipy; `fid`
does the whole thing for folders of images or tensors, caching the statistics of the real set.

tr((S1 S2)^{1/2}): S1 S2 is not symmetric, but for any factorisation S1 = A A^T it is similar to the
symmetric PSD matrix M = A^T S2 A (S1 S2 = A M A^{-1} for square invertible A), so both have the same real,
non-negative eigenvalues and tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(M)). A is the Cholesky factor of S1
when S1 is positive definite (one cheap factorisation and one `eigvalsh`); when it is singular (fewer images
than feature dimensions) A = V diag(sqrt(w)) from S1's eigendecomposition, with the columns of zero
eigenvalues dropped (then M = A^T S2 A is rank(S1) x rank(S1) and carries the nonzero eigenvalues of
S1^{1/2} S2 S1^{1/2}). Symmetric solvers in real float64 replace scipy's Schur-based `sqrtm` of the
non-symmetric product. Round-off makes eigenvalues that are zero in theory come out as +-tiny numbers: those
below `n * eps * max|lambda|` (the rank tolerance of numpy.linalg.matrix_rank) are set to 0.
pytorch-fid instead adds 1e-6 * I to both covariances when `sqrtm` fails; the two agree to ~1e-6 relative
where `sqrtm` succeeds (tests/test_fid.py; bench/bench_eval.py at 2048-d).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import hub
from data import list_images, read_image
from eval.densenet import XRVDenseNetFeatures
from eval.inception import InceptionV3Features


class FeatureStats:
    """Streaming mean and covariance of feature vectors, accumulated as float64 sums.

    Keeps count n, s = sum x and P = sum x x^T: mean = s / n, cov = (P - n mu mu^T) / (n - 1) (unbiased, =
    numpy.cov with rowvar=False, as pytorch-fid). In float64 the cancellation in P - n mu mu^T costs about
    1e-16 * |mu|^2 / var relative error, negligible for network features.
    """

    def __init__(self, dim: int | None = None, extractor: str | None = None):
        self.dim, self.extractor, self.count = dim, extractor, 0
        self.sum = self.outer = None

    def update(self, features: torch.Tensor) -> FeatureStats:
        """Add a batch of features [N, D] (any float dtype; accumulated in float64 on its device)."""
        x = torch.as_tensor(features).detach().double()
        if x.ndim != 2 or x.shape[1] != (self.dim or x.shape[1]):
            raise ValueError(f"features must be [N, dim={self.dim or 'D'}], got shape {list(x.shape)}")
        if self.sum is None:
            self.dim = x.shape[1]
            self.sum, self.outer = x.new_zeros(self.dim), x.new_zeros(self.dim, self.dim)
        x = x.to(self.sum.device)
        self.sum += x.sum(0)
        self.outer.addmm_(x.T, x)
        self.count += len(x)
        return self

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def cov(self) -> torch.Tensor:
        cov = (self.outer - self.count * torch.outer(self.mean, self.mean)) / (self.count - 1)
        return (cov + cov.T) / 2  # exactly symmetric

    def save(self, path) -> None:
        """Write mu, sigma (pytorch-fid's .npz keys), count and extractor; atomically."""
        with hub.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, mu=self.mean.cpu().numpy(), sigma=self.cov.cpu().numpy(), count=np.int64(self.count),
                     extractor=np.str_(self.extractor or ""))

    @classmethod
    def load(cls, path) -> FeatureStats:
        """Read what `save` wrote (the sums are rebuilt from mean, cov and count)."""
        try:
            with np.load(path, allow_pickle=False) as f:
                mu, sigma = torch.from_numpy(f["mu"]).double(), torch.from_numpy(f["sigma"]).double()
                count, extractor = int(f["count"]), str(f["extractor"])
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"cannot read feature statistics {path}: {type(e).__name__}: {e}") from e
        stats = cls(len(mu), extractor or None)
        stats.sum, stats.outer = mu * count, sigma * (count - 1) + count * torch.outer(mu, mu)
        stats.count = count
        return stats


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) in float64 (see the module docstring for the method).

    Accepts torch tensors or numpy arrays; computes on the device of `sigma1` when it is a tensor.
    """
    device = sigma1.device if isinstance(sigma1, torch.Tensor) else "cpu"
    mu1, mu2, s1, s2 = (torch.as_tensor(a).to(device=device, dtype=torch.float64)
                        for a in (mu1, mu2, sigma1, sigma2))
    mu1, mu2 = mu1.reshape(-1), mu2.reshape(-1)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"shape mismatch: mu1 {list(mu1.shape)}, mu2 {list(mu2.shape)}, "
                         f"sigma1 {list(s1.shape)}, sigma2 {list(s2.shape)}")
    # The fast path (bench row "frechet_distance D=2048 (full rank)": ~12x faster than scipy's sqrtm).
    # cholesky_ex, eigh and eigvalsh read only the lower triangle: no symmetrised copies of the D x D inputs.
    a, info = torch.linalg.cholesky_ex(s1)  # S1 = A A^T, A lower triangular [D, D]
    if info.item() != 0:  # S1 singular (e.g. fewer samples than dimensions): factor it through eigh
        w, v = torch.linalg.eigh(s1)
        keep = w > _rank_tol(w)
        a = v[:, keep] * w[keep].sqrt()  # [D, r]: S1 = A A^T on its range
    m = a.T @ s2 @ a  # [r, r]: same nonzero eigenvalues as S1 S2 = A (A^T S2 A) A^{-1}
    lam = torch.linalg.eigvalsh(m)
    lam = torch.where(lam > _rank_tol(lam), lam, torch.zeros_like(lam))
    tr_covmean = lam.sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


def _rank_tol(w: torch.Tensor) -> torch.Tensor:
    """numpy.linalg.matrix_rank's tolerance for eigenvalues w: n * eps * max|w|."""
    return w.abs().max() * w.numel() * torch.finfo(w.dtype).eps


def load_extractor(features="xrv", weights=None, device=None) -> nn.Module:
    """"xrv" | "inception" (with `weights`, a file) or an extractor module -> eval-mode module on `device`.

    xrv: torchxrayvision's densenet121-res224-all as a state dict (see eval/densenet.py); inception:
    pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (see eval/inception.py).
    """
    named = {"xrv": XRVDenseNetFeatures, "inception": InceptionV3Features}
    if isinstance(features, nn.Module):
        model = features
    elif features not in named:
        raise ValueError(f"features must be 'xrv', 'inception' or an extractor module, got {features!r}")
    elif weights is None:
        raise ValueError(f"features={features!r} needs weights=<weight file>; see {named[features].__module__}")
    else:
        model = named[features].from_pretrained(weights)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device=device, dtype=torch.float32).eval()


def _read(path, extractor) -> torch.Tensor:
    """An image file -> float32 [in_channels, S, S] in [0, 1], resized as the extractor resizes tensors
    (XRV bilinear with antialias, Inception without), so folders and tensors give the same features. A 3-channel
    extractor reads colour files as RGB (as pytorch-fid does; grey files are repeated)."""
    img = read_image(path, 3 if extractor.in_channels == 3 else 1)  # [H, W] or [H, W, 3], uint8 or uint16
    x = torch.from_numpy(img.astype(np.float32) / np.iinfo(img.dtype).max)
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    r = extractor.resolution
    if x.shape[-2:] != (r, r):
        antialias = isinstance(extractor, XRVDenseNetFeatures)
        x = nn.functional.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=antialias)
    return x[0].expand(extractor.in_channels, -1, -1)


@torch.no_grad()
def compute_stats(images, extractor: nn.Module, batch_size: int = 50, *, progress: bool = False,
                  desc: str = "features") -> FeatureStats:
    """Feature statistics of `images` (a folder or a [N, C, H, W] tensor in [0, 1]) under `extractor` (a
    module with `name`, `in_channels`, `resolution`, `feature_dim`), in float32 (autocast off) on the
    extractor's device."""
    dev = next(extractor.parameters()).device
    if isinstance(images, torch.Tensor):  # [N, C, H, W]: the extractor checks the shape
        n, batches = len(images), images.split(batch_size)
    else:
        files = list_images(images)
        if not files:
            raise ValueError(f"no images found under {images}")
        n, batches = len(files), (torch.stack([_read(p, extractor) for p in files[i : i + batch_size]])
                                  for i in range(0, len(files), batch_size))
    stats = FeatureStats(extractor.feature_dim, extractor.name)
    with torch.autocast(dev.type, enabled=False):
        for x in tqdm(batches, total=-(-n // batch_size), desc=desc, disable=not progress, unit="batch"):
            stats.update(extractor(x.to(dev, torch.float32)))
    if stats.count < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {stats.count}")
    return stats


def fid(real, fake, features="xrv", batch_size: int = 50, device=None, weights=None, cache=None,
        progress: bool = True) -> float:
    """FID between `real` and `fake`: each a folder of images or a tensor [N, C, H, W] in [0, 1].

    features: "xrv" (torchxrayvision DenseNet-121, 1024-d), "inception" (pytorch-fid, 2048-d), both with
        `weights` (a file), or an extractor module (e.g. `XRVDenseNetFeatures(DenseNet121.tiny(in_channels=1),
        name="xrv-tiny")`). device: default CUDA when available.
    cache: `.npz` path for the statistics of `real`: read if it exists (its extractor must match), else
        computed and written.
    """
    model = load_extractor(features, weights, device)
    if cache is not None and Path(cache).is_file():
        real_stats = FeatureStats.load(cache)
        if real_stats.extractor != model.name:
            raise ValueError(f"cache {cache} holds statistics of extractor {real_stats.extractor!r}, "
                             f"not {model.name!r}; delete it or pass another cache path")
    else:
        real_stats = compute_stats(real, model, batch_size, progress=progress, desc="real")
        if cache is not None:
            real_stats.save(cache)
    fake_stats = compute_stats(fake, model, batch_size, progress=progress, desc="fake")
    return frechet_distance(real_stats.mean, real_stats.cov, fake_stats.mean, fake_stats.cov)
