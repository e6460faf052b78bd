"""SSIM and multi-scale SSIM (Wang, Simoncelli & Bovik 2003), and the diversity numbers built on them.

SSIM compares two images through local statistics under a Gaussian window w (11 taps, sigma 1.5; Wang et al.
2004): local means mu_x, mu_y, variances s_x^2, s_y^2 and covariance s_xy, all `w * (.)` done as a separable
"valid" convolution (no padding), then

    cs   = (2 s_xy + C2) / (s_x^2 + s_y^2 + C2)                       contrast-structure
    ssim = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) * cs            luminance x contrast-structure
    C1 = (K1 L)^2, C2 = (K2 L)^2, (K1, K2) = (0.01, 0.03), L = data_range

averaged over the map (and the channels). MS-SSIM evaluates cs at scales 1..M-1 and ssim at scale M, halving
the image between scales with a 2x2 average pool (zero-padded by one pixel on odd sides, counted in the
average: `F.avg_pool2d(padding=side % 2)`), and combines them as prod_j max(cs_j, 0)^w_j * max(ssim_M, 0)^w_M
with the 5 weights of Wang et al. 2003, Table/Sec. 3.2: (0.0448, 0.2856, 0.3001, 0.2363, 0.1333).
Everything (the relu on cs and on the last ssim, the padding, the window built in float32) follows
pytorch-msssim 1.0 (`pytorch_msssim.ms_ssim`), which the tests match to 1e-4; inputs are [B, C, H, W] and
every function returns one value per image ([B], the mean over channels).

Image size: the window must fit at the coarsest scale, so M scales need min(H, W) > (win_size - 1) * 2^(M-1);
for the standard 5 scales that is 160 px (pytorch-msssim asserts this, whatever the number of weights).
Smaller images (64 px CXRs of the tiny preset) take `small=`:
- "error" (default): ValueError, as pytorch-msssim.
- "scales": keep the first M scales that fit (M = 3 at 64 px, 4 at 128 px) and renormalise their weights to
  sum to 1 (so identical images still give 1). Fine detail is measured as at full size; the coarse scales are
  dropped. This is `pytorch_msssim.ms_ssim(weights=w[:M] / sum(w[:M]))` without its 160 px assertion.
- "window": keep 5 scales and shrink the window to the largest odd size that fits, with sigma scaled by the
  same factor (win 3, sigma 0.41 at 64 px): `pytorch_msssim.ms_ssim(win_size=..., win_sigma=...)`.
`ms_ssim_settings(side, ...)` says which weights/window a size gets; the CLIs record it in their summaries.

Diversity (lower MS-SSIM = more different): `pairwise_msssim` scores pairs of images in batches;
`diversity_report` gives the mean MS-SSIM among variations of the same source image, among random pairs
of synthetic images from different sources, between each synthetic image and its source (reconstruction
similarity), and among random pairs of the real sources as the reference level.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang, Simoncelli & Bovik 2003, Sec. 3.2
SMALL_MODES = ("error", "scales", "window")


def gaussian_window(win_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian [win_size] in float32 (pytorch-msssim `_fspecial_gauss_1d`)."""
    if win_size % 2 != 1:
        raise ValueError(f"win_size must be odd, got {win_size}")
    coords = torch.arange(win_size, dtype=torch.float32) - win_size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _check_pair(x: torch.Tensor, y: torch.Tensor):
    if x.shape != y.shape:
        raise ValueError(f"images must have the same shape, got {list(x.shape)} and {list(y.shape)}")
    if x.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {list(x.shape)}")


def _ssim_cs(x, y, data_range: float, win: torch.Tensor, K) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (ssim, cs) [B, C] at one scale. The five local moments go through one grouped conv."""
    b, c, h, w = x.shape
    if min(h, w) < win.numel():
        raise ValueError(f"images of {h}x{w} px are smaller than the {win.numel()}-tap SSIM window")
    c1, c2 = (K[0] * data_range) ** 2, (K[1] * data_range) ** 2
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # [B, 5C, H, W]
    kern = win.to(x.device, x.dtype)
    for weight in (kern.view(1, 1, -1, 1), kern.view(1, 1, 1, -1)):  # separable: along H, then along W
        stack = F.conv2d(stack, weight.expand(5 * c, 1, -1, -1), groups=5 * c)
    mu_x, mu_y, xx, yy, xy = stack.split(c, dim=1)  # each [B, C, H-win+1, W-win+1]
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    cs_map = (2 * (xy - mu_xy) + c2) / ((xx - mu_xx) + (yy - mu_yy) + c2)
    ssim_map = (2 * mu_xy + c1) / (mu_xx + mu_yy + c1) * cs_map
    return ssim_map.flatten(2).mean(-1), cs_map.flatten(2).mean(-1)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5,
         K=(0.01, 0.03)) -> torch.Tensor:
    """SSIM of image pairs x, y [B, C, H, W] -> [B] (mean over the map and channels; may be negative).

    = `pytorch_msssim.ssim(x, y, data_range, size_average=False, win_size, win_sigma=sigma, K=K)`, except
    that images smaller than the window raise instead of being left unsmoothed along that side.
    """
    _check_pair(x, y)
    return _ssim_cs(x, y, data_range, gaussian_window(win_size, sigma), K)[0].mean(1)


def ms_ssim_settings(side: int, weights=MS_SSIM_WEIGHTS, win_size: int = 11, sigma: float = 1.5,
                     small: str = "error") -> tuple[tuple[float, ...], int, float]:
    """(weights, win_size, sigma) that `ms_ssim` uses for images whose shorter side is `side` px."""
    if small not in SMALL_MODES:
        raise ValueError(f"small must be one of {SMALL_MODES}, got {small!r}")
    weights = tuple(float(v) for v in weights)
    levels = len(weights)
    if side > (win_size - 1) * 2 ** (levels - 1):
        return weights, win_size, sigma
    if small == "scales":
        fit = max((m for m in range(1, levels + 1) if side > (win_size - 1) * 2 ** (m - 1)), default=0)
        if fit:
            total = sum(weights[:fit])
            return tuple(v / total for v in weights[:fit]), win_size, sigma
    elif small == "window":
        fit = max((k for k in range(3, win_size + 1, 2) if side > (k - 1) * 2 ** (levels - 1)), default=0)
        if fit:
            return weights, fit, sigma * fit / win_size
    need = (win_size - 1) * 2 ** (levels - 1)
    hint = "" if small != "error" else "; pass small='scales' or small='window' for small images"
    raise ValueError(f"MS-SSIM with {levels} scales and a {win_size}-tap window needs images larger than "
                     f"{need} px (4 halvings), got a shorter side of {side} px{hint}")


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, weights=MS_SSIM_WEIGHTS,
            win_size: int = 11, sigma: float = 1.5, K=(0.01, 0.03), small: str = "error") -> torch.Tensor:
    """MS-SSIM of image pairs x, y [B, C, H, W] -> [B] in [0, 1] (1 = identical).

    = `pytorch_msssim.ms_ssim(x, y, data_range, size_average=False, win_size, win_sigma=sigma, weights, K)`
    for images larger than (win_size - 1) * 2^4; `small` handles smaller ones (module docstring).
    """
    _check_pair(x, y)
    weights, win_size, sigma = ms_ssim_settings(min(x.shape[-2:]), weights, win_size, sigma, small)
    win = gaussian_window(win_size, sigma)
    w = torch.tensor(weights, dtype=x.dtype, device=x.device)
    factors = []
    for level in range(len(weights)):
        s, cs = _ssim_cs(x, y, data_range, win, K)  # [B, C]
        if level < len(weights) - 1:
            factors.append(torch.relu(cs))
            pad = [side % 2 for side in x.shape[2:]]
            x, y = F.avg_pool2d(x, 2, padding=pad), F.avg_pool2d(y, 2, padding=pad)  # [B, C, ~H/2, ~W/2]
    factors.append(torch.relu(s))
    return torch.prod(torch.stack(factors) ** w.view(-1, 1, 1), dim=0).mean(1)  # [M, B, C] -> [B]


# ----------------------------------------------------------------------------------------------- diversity


def all_pairs(n: int) -> torch.Tensor:
    """Every unordered pair i < j of n items: [n (n - 1) / 2, 2]."""
    return torch.triu_indices(n, n, offset=1).T


def random_pairs(n: int, count: int, generator: torch.Generator | None = None,
                 groups: torch.Tensor | None = None) -> torch.Tensor:
    """`count` distinct unordered pairs (i, j), i != j, of n items, uniformly drawn: [<= count, 2].

    With `groups` [n], only pairs whose members are in different groups. All qualifying pairs are returned
    when there are at most `count` of them.
    """
    if n < 2:
        return torch.zeros(0, 2, dtype=torch.long)
    total = n * (n - 1) // 2
    if total <= max(count, 4 * count if groups is not None else 0):  # small: enumerate, then subsample
        pairs = all_pairs(n)
        if groups is not None:
            pairs = pairs[groups[pairs[:, 0]] != groups[pairs[:, 1]]]
        if len(pairs) <= count:
            return pairs
        return pairs[torch.randperm(len(pairs), generator=generator)[:count]]
    found: dict[tuple[int, int], None] = {}  # rejection sampling keeps the draw uniform; dict keeps order
    for _ in range(100):
        cand = torch.randint(n, (2 * count, 2), generator=generator)
        cand = torch.stack([cand.min(1).values, cand.max(1).values], 1)
        ok = cand[:, 0] != cand[:, 1]
        if groups is not None:
            ok &= groups[cand[:, 0]] != groups[cand[:, 1]]
        for i, j in cand[ok].tolist():
            found.setdefault((i, j))
            if len(found) == count:
                return torch.tensor(list(found), dtype=torch.long)
    return torch.tensor(list(found), dtype=torch.long).view(-1, 2)


def pairwise_msssim(images: torch.Tensor, pairs: torch.Tensor | None = None, max_pairs: int = 1000,
                    generator: torch.Generator | None = None, *, other: torch.Tensor | None = None,
                    data_range: float = 1.0, small: str = "error", batch_size: int = 64,
                    device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """MS-SSIM of pairs of images [N, C, H, W] -> (values [P], pairs [P, 2]).

    pairs: index pairs [P, 2] into `images` (into `images` and `other` when `other` is given); None: all
    unordered pairs, or `max_pairs` of them drawn with `generator` when there are more. Pairs are scored
    `batch_size` at a time on `device` (default: where the images are).
    """
    second = images if other is None else other
    if pairs is None:
        if other is not None:
            raise ValueError("pairwise_msssim: give `pairs` together with `other`")
        pairs = random_pairs(len(images), max_pairs, generator)
    pairs = torch.as_tensor(pairs, dtype=torch.long).view(-1, 2)
    device = images.device if device is None else torch.device(device)
    values = [ms_ssim(images[p[:, 0]].to(device), second[p[:, 1]].to(device), data_range, small=small).cpu()
              for p in pairs.split(batch_size)]
    return (torch.cat(values) if values else torch.zeros(0)), pairs


def summarize(values: torch.Tensor) -> dict:
    """mean, std, quantiles and count of a set of similarities (JSON-ready floats; NaN -> None)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    v = v[~v.isnan()]
    if v.numel() == 0:
        return {"n": 0, "mean": None, "std": None}
    q = torch.quantile(v, torch.tensor([0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0], dtype=torch.float64))
    out = {"n": int(v.numel()), "mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0}
    out |= {name: float(x) for name, x in zip(("min", "p05", "p25", "median", "p75", "p95", "max"), q)}
    return {k: (None if isinstance(x, float) and math.isnan(x) else x) for k, x in out.items()}


class DiversityReport(NamedTuple):
    summary: dict  # JSON-ready: settings and one `summarize` block per comparison
    to_source: torch.Tensor | None  # [N] MS-SSIM of each synthetic image to its source (nan: no source)
    within_source: torch.Tensor | None  # [N] mean MS-SSIM of each image to its siblings (nan: none)
    random_pairs: torch.Tensor  # [P, 2] the random pairs of synthetic images that were scored
    random_values: torch.Tensor  # [P] their MS-SSIM


def diversity_report(synthetic: torch.Tensor, groups=None, sources: torch.Tensor | None = None,
                     source_index=None, *, max_pairs: int = 1000, max_pairs_per_group: int = 45,
                     generator: torch.Generator | None = None, data_range: float = 1.0, small: str = "error",
                     batch_size: int = 64, device=None) -> DiversityReport:
    """Diversity of synthetic images [N, C, H, W] by MS-SSIM (lower = more diverse).

    groups: [N] ints, e.g. the source image each variation was generated from; variations of one source are
        compared with each other ("within_source", all pairs up to `max_pairs_per_group` per group), and
        "random_pairs" then draws pairs from different groups.
    sources [M, C, H, W] with source_index [N] (-1: none): each synthetic image is compared with its source
        ("to_source", reconstruction similarity) and `max_pairs` random pairs of sources give the level of
        genuinely different real images ("source_pairs").
    """
    n = len(synthetic)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    kw = dict(data_range=data_range, small=small, batch_size=batch_size, device=device)
    groups_t = None if groups is None else torch.as_tensor(groups, dtype=torch.long)
    if groups_t is not None and groups_t.shape != (n,):
        raise ValueError(f"groups must have one entry per synthetic image ({n}), got {list(groups_t.shape)}")
    weights, win, sigma = ms_ssim_settings(min(synthetic.shape[-2:]), small=small)
    summary = {"n_synthetic": n, "image_size": list(synthetic.shape[-2:]), "data_range": data_range,
               "ms_ssim": {"weights": list(weights), "win_size": win, "sigma": sigma, "small": small}}

    rand_vals, rand_pairs = pairwise_msssim(synthetic, random_pairs(n, max_pairs, gen, groups_t), **kw)
    summary["random_pairs"] = summarize(rand_vals)

    within = None
    if groups_t is not None:
        pairs = []
        for g in groups_t.unique():
            members = (groups_t == g).nonzero().flatten()
            local = random_pairs(len(members), max_pairs_per_group, gen)
            pairs.append(members[local])
        pairs = torch.cat(pairs) if pairs else torch.zeros(0, 2, dtype=torch.long)
        vals, pairs = pairwise_msssim(synthetic, pairs, **kw)
        summary["within_source"] = summarize(vals)
        total = torch.zeros(n, dtype=torch.float64).index_add_(0, pairs.flatten(), vals.double().repeat(2))
        count = torch.zeros(n, dtype=torch.float64).index_add_(0, pairs.flatten(),
                                                               torch.ones(2 * len(vals), dtype=torch.float64))
        within = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
        summary["n_groups"] = int(groups_t.unique().numel())

    to_source = None
    if sources is not None:
        if source_index is None:
            raise ValueError("diversity_report: `sources` needs `source_index` (the source of each image)")
        idx = torch.as_tensor(source_index, dtype=torch.long)
        has = (idx >= 0).nonzero().flatten()
        to_source = torch.full((n,), float("nan"), dtype=torch.float64)
        if len(has):
            pairs = torch.stack([has, idx[has]], 1)
            vals, _ = pairwise_msssim(synthetic, pairs, other=sources, **kw)
            to_source[has] = vals.double()
        summary["to_source"] = summarize(to_source)
        vals, _ = pairwise_msssim(sources, random_pairs(len(sources), max_pairs, gen), **kw)
        summary["source_pairs"] = summarize(vals)
    return DiversityReport(summary, to_source, within, rand_pairs, rand_vals)
