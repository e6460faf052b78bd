"""Frechet distance between feature distributions (FID; Heusel et al. 2017, arXiv 1706.08500).

Real and generated images are embedded by a frozen network (the paper reports both the Inception-v3 of
pytorch-fid and torchxrayvision's CXR DenseNet-121), each set is summarised by the mean mu and covariance S of
its features, and the two Gaussians are compared with the Frechet (2-Wasserstein) distance

    FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

`FeatureStats` accumulates mu and S in one streaming pass (float64 sums, mergeable across batches, processes
and files); `frechet_distance` evaluates the formula in float64 without scipy; `fid` does the whole thing for
folders of images, tensors or cached `.npz` statistics.

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

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eval.densenet import XRVDenseNetFeatures
from eval.inception import InceptionV3Features

__all__ = ["FeatureStats", "frechet_distance", "fid", "compute_stats", "load_extractor", "list_images",
           "InceptionV3Features", "XRVDenseNetFeatures"]

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


# ------------------------------------------------------------------------------------------------ statistics


class FeatureStats:
    """Streaming mean and covariance of feature vectors, accumulated as float64 sums.

    Keeps count n, s = sum x and P = sum x x^T, so that batches, processes (`all_reduce`) and saved files
    (`merge`) combine by addition. mean = s / n, cov = (P - n mu mu^T) / (n - 1) (unbiased, = numpy.cov with
    rowvar=False, as pytorch-fid). In float64 the cancellation in P - n mu mu^T costs about
    1e-16 * |mu|^2 / var relative error, negligible for network features.
    Statistics read from a pytorch-fid `.npz` (mu and sigma, no count) give mean/cov but cannot be merged.
    """

    def __init__(self, dim: int | None = None, extractor: str | None = None, device=None):
        self.dim, self.extractor, self.count = dim, extractor, 0
        self.sum = self.outer = None
        self._device = device
        self._moments = None  # (mu, sigma) of a file without a count
        if dim is not None:
            self._init(dim, device)

    def _init(self, dim: int, device):
        self.dim = dim
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def _check_mergeable(self):
        if self._moments is not None:
            raise ValueError("these statistics were read without a sample count (pytorch-fid .npz): they "
                             "give mean and cov but cannot be updated or merged")

    def update(self, features: torch.Tensor) -> FeatureStats:
        """Add a batch of features [N, D] (any float dtype; accumulated in float64)."""
        self._check_mergeable()
        features = torch.as_tensor(features)
        if features.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {list(features.shape)}")
        if self.sum is None:
            self._init(features.shape[1], self._device if self._device is not None else features.device)
        if features.shape[1] != self.dim:
            raise ValueError(f"features have dim {features.shape[1]}, these statistics have dim {self.dim}")
        x = features.detach().to(device=self.sum.device, dtype=torch.float64)
        self.sum += x.sum(0)
        self.outer.addmm_(x.T, x)
        self.count += x.shape[0]
        return self

    @property
    def mean(self) -> torch.Tensor:
        if self._moments is not None:
            return self._moments[0]
        self._check_count(1)
        return self.sum / self.count

    @property
    def cov(self) -> torch.Tensor:
        if self._moments is not None:
            return self._moments[1]
        self._check_count(2)
        mu = self.mean
        cov = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return (cov + cov.T) / 2  # exactly symmetric

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, cov) as float64 tensors."""
        return self.mean, self.cov

    def _check_count(self, n):
        if self.count < n:
            raise ValueError(f"FeatureStats holds {self.count} samples; need at least {n}")

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add `other`'s samples into these statistics (in place); returns self."""
        self._check_mergeable()
        other._check_mergeable()
        if other.count == 0:
            return self
        if self.extractor and other.extractor and self.extractor != other.extractor:
            raise ValueError(f"cannot merge statistics of extractor {other.extractor!r} "
                             f"into {self.extractor!r}")
        if self.sum is None:
            self._init(other.dim, other.sum.device)
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dim {other.dim} into dim {self.dim}")
        self.sum += other.sum.to(self.sum.device)
        self.outer += other.outer.to(self.sum.device)
        self.count += other.count
        self.extractor = self.extractor or other.extractor
        return self

    def all_reduce(self) -> FeatureStats:
        """Sum the statistics of all processes (torch.distributed); a no-op when not initialised.

        Every rank must know `dim` (pass it to the constructor if a rank may see no samples). With NCCL the
        sums must live on this rank's GPU (`FeatureStats(dim, device=...)` or features on the GPU).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        self._check_mergeable()
        if self.sum is None:
            raise ValueError("FeatureStats.all_reduce: this rank has no samples and no dim; pass dim=")
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)
        for t in (self.sum, self.outer, count):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        self.count = int(count.item())
        return self

    def save(self, path) -> None:
        """Write mu, sigma (pytorch-fid's .npz keys), count and extractor; atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, mu=self.mean.cpu().numpy(), sigma=self.cov.cpu().numpy(), count=np.int64(self.count),
                 extractor=np.str_(self.extractor or ""))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> FeatureStats:
        """Read our .npz or pytorch-fid's (mu and sigma only)."""
        try:
            with np.load(path, allow_pickle=False) as f:
                mu, sigma = f["mu"], f["sigma"]
                count = int(f["count"]) if "count" in f.files else 0
                extractor = str(f["extractor"]) if "extractor" in f.files else ""
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"cannot read feature statistics {path}: {type(e).__name__}: {e}") from e
        mu = torch.from_numpy(np.asarray(mu, dtype=np.float64))
        sigma = torch.from_numpy(np.asarray(sigma, dtype=np.float64))
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"{path}: mu {list(mu.shape)} and sigma {list(sigma.shape)} do not match")
        stats = cls(mu.shape[0], extractor or None)
        if count >= 2:  # invert mean/cov into the sums, so loaded statistics stay mergeable
            stats.sum = mu * count
            stats.outer = sigma * (count - 1) + count * torch.outer(mu, mu)
            stats.count = count
        else:
            stats._moments = (mu, sigma)
        return stats

    def __repr__(self):
        return f"FeatureStats(dim={self.dim}, count={self.count}, extractor={self.extractor!r})"


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


# ------------------------------------------------------------------------------------------------ images


def list_images(folder) -> list[Path]:
    """Image files (PNG, JPEG, ...) under `folder`, recursively, in sorted order."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {folder}")
    return files


def read_image(path, channels: int) -> torch.Tensor:
    """An image file -> float32 [channels, H, W] in [0, 1]; 16-bit grayscale is scaled by 65535."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 65535.0)[None]
                return x.expand(channels, -1, -1).clone()
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    x = torch.from_numpy(arr.copy()).float().div_(255)
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1)


class _ImageFiles(torch.utils.data.Dataset):
    """Image files resized to the extractor's input size (so that images of any size can be batched)."""

    def __init__(self, files, channels: int, resolution: int, antialias: bool):
        self.files, self.channels, self.resolution, self.antialias = files, channels, resolution, antialias

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        x = read_image(self.files[i], self.channels)
        r = self.resolution
        if x.shape[-2:] == (r, r):
            return x
        return nn.functional.interpolate(x[None], size=(r, r), mode="bilinear", align_corners=False,
                                         antialias=self.antialias)[0]


def _batches(images, extractor, batch_size, num_workers) -> tuple[Iterable[torch.Tensor], int | None]:
    """[B, C, H, W] batches in [0, 1] (and their number, if known) from a folder, a list of files, a tensor
    or an iterable of batches."""
    if isinstance(images, (str, os.PathLike)) or (isinstance(images, (list, tuple)) and images
                                                  and isinstance(images[0], (str, os.PathLike))):
        files = list_images(images) if isinstance(images, (str, os.PathLike)) else [Path(p) for p in images]
        # The extractors resize like this themselves: XRV bilinear with antialias, Inception without.
        antialias = isinstance(extractor, XRVDenseNetFeatures)
        ds = _ImageFiles(files, extractor.in_channels, extractor.resolution, antialias)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
        return loader, len(loader)
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"image tensor must be [N, C, H, W] in [0, 1], got shape {list(images.shape)}")
        batches = images.split(batch_size)
        return batches, len(batches)
    return images, (len(images) if hasattr(images, "__len__") else None)


# ------------------------------------------------------------------------------------------------ FID


def load_extractor(features="xrv", weights=None, device=None) -> nn.Module:
    """"xrv" | "inception" (with `weights`, a file) or an extractor module -> eval-mode module on `device`.

    Without `weights`, "inception" fetches pytorch-fid's weight file into torch's hub cache (read with
    weights_only=True); "xrv" needs a converted state dict (see eval/densenet.py).
    """
    if isinstance(features, nn.Module):
        model = features
    elif features == "inception":
        if weights is None:
            url = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
            weights = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
            if not weights.is_file():  # verified against the sha256 prefix in its name, as torch.hub does
                weights.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(weights), hash_prefix="6726825d")
        model = InceptionV3Features.from_pretrained(weights)
    elif features == "xrv":
        if weights is None:
            raise ValueError("features='xrv' needs weights=<torchxrayvision densenet121-res224-all state "
                             "dict file>; see eval/densenet.py for the one-line conversion")
        model = XRVDenseNetFeatures.from_pretrained(weights)
    else:
        raise ValueError(f"features must be 'xrv', 'inception' or an extractor module, got {features!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device=device, dtype=torch.float32).eval()


@torch.no_grad()
def compute_stats(images, extractor: nn.Module, batch_size: int = 50, *, device=None, progress: bool = False,
                  num_workers: int = 0, desc: str = "features") -> FeatureStats:
    """Feature statistics of `images` (folder, list of files, [N,C,H,W] tensor in [0,1], or an iterable of
    such batches) under `extractor` (a module with `name`, `in_channels`, `resolution`, `feature_dim`).

    Features are computed in float32 (autocast off) on `device` (default: where the extractor is; the
    extractor is moved there otherwise).
    """
    from tqdm.auto import tqdm

    dev = next(extractor.parameters()).device if device is None else torch.device(device)
    extractor.to(dev)
    stats = FeatureStats(extractor.feature_dim, extractor.name, device=dev)
    was_training = extractor.training
    extractor.eval()
    try:
        with torch.autocast(dev.type, enabled=False):
            batches, total = _batches(images, extractor, batch_size, num_workers)
            for x in tqdm(batches, total=total, desc=desc, disable=not progress, unit="batch"):
                if x.dtype == torch.uint8:
                    x = x.float() / 255
                stats.update(extractor(x.to(dev, torch.float32)))
    finally:
        extractor.train(was_training)
    if stats.count < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {stats.count}")
    return stats


def _is_npz(x) -> bool:
    return isinstance(x, (str, os.PathLike)) and str(x).endswith(".npz")


def _load_stats(source, name: str) -> FeatureStats:
    stats = source if isinstance(source, FeatureStats) else FeatureStats.load(source)
    if stats.extractor and stats.extractor != name:
        raise ValueError(f"statistics {source} were computed with extractor {stats.extractor!r}, "
                         f"not {name!r}")
    if not stats.extractor:
        warnings.warn(f"statistics {source} do not name their extractor; assuming {name!r}", stacklevel=3)
    return stats


def fid(real, fake, features="xrv", batch_size: int = 50, device=None, weights=None, cache=None,
        progress: bool = True, num_workers: int = 0) -> float:
    """FID between `real` and `fake`.

    real, fake: a folder of images, a list of image files, a tensor [N, C, H, W] in [0, 1], an iterable of
        such batches, a `.npz` of precomputed statistics, or a `FeatureStats`.
    features: "xrv" (torchxrayvision DenseNet-121, 1024-d), "inception" (pytorch-fid, 2048-d), or an extractor
        module (e.g. `XRVDenseNetFeatures(DenseNet121.tiny(in_channels=1), name="xrv-tiny")`).
    weights: weight file for the named extractor. device: default CUDA when available.
    cache: `.npz` path for the statistics of `real`: read if it exists (its extractor must match), else
        computed and written. The network is only loaded if some images need features.
    """
    name = features.name if isinstance(features, nn.Module) else str(features)
    model = None
    out = []
    for images, desc in ((real, "real"), (fake, "fake")):
        if desc == "real" and cache is not None and Path(cache).is_file():
            stats = FeatureStats.load(cache)
            if stats.extractor != name:
                raise ValueError(f"cache {cache} holds statistics of extractor {stats.extractor!r}, "
                                 f"not {name!r}; delete it or pass another cache path")
        elif isinstance(images, FeatureStats) or _is_npz(images):
            stats = _load_stats(images, name)
        else:
            model = model if model is not None else load_extractor(features, weights, device)
            stats = compute_stats(images, model, batch_size, progress=progress, num_workers=num_workers,
                                  desc=desc)
        if desc == "real" and cache is not None and not Path(cache).is_file():
            stats.save(cache)
        out.append(stats)
    (mu1, s1), (mu2, s2) = out[0].moments(), out[1].moments()
    return frechet_distance(mu1, s1, mu2, s2)
