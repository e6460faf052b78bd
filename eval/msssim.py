"""Multi-scale SSIM (Wang, Simoncelli & Bovik 2003), the similarity eval/diversity.py scores pairs with.

SSIM compares two images through local statistics under a Gaussian window w (11 taps, sigma 1.5; Wang et al.
2004): local means mu_x, mu_y, variances s_x^2, s_y^2 and covariance s_xy, all `w * (.)` done as a separable
"valid" convolution (no padding), then

    cs   = (2 s_xy + C2) / (s_x^2 + s_y^2 + C2)                       contrast-structure
    ssim = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) * cs            luminance x contrast-structure
    C1 = (K1 L)^2, C2 = (K2 L)^2, (K1, K2) = (0.01, 0.03), L = data_range

averaged over the map (and the channels). MS-SSIM evaluates cs at scales 1..M-1 and ssim at scale M, halving
the image between scales with a 2x2 average pool (zero-padded by one pixel on odd sides, counted in the
average), and combines them as prod_j max(cs_j, 0)^w_j * max(ssim_M, 0)^w_M with the 5 weights of Wang et al.
2003, Sec. 3.2. Every detail (the relu, the padding, the float32 window) follows pytorch-msssim 1.0
(`pytorch_msssim.ms_ssim`), which the tests match to 1e-4; inputs are [B, C, H, W], outputs one value per image.

M scales need min(H, W) > (win_size - 1) * 2^(M-1): 160 px for the standard 5. Smaller images (64 px CXRs of
the tiny preset) take `small=`: "error" (default, as pytorch-msssim); "scales": the first M scales that fit
(3 at 64 px, 4 at 128 px), weights renormalised to sum 1, so fine detail is measured as at full size; "window":
5 scales with the largest odd window that fits, sigma scaled alike (win 3, sigma 0.41 at 64 px).
`ms_ssim_settings(side, ...)` says which weights/window a size gets; eval/diversity.py records it.
"""

from __future__ import annotations

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


def _ssim_cs(x, y, data_range: float, win: torch.Tensor, K) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (ssim, cs) [B, C] at one scale. The five local moments go through one grouped conv."""
    c = x.shape[1]  # (ms_ssim_settings made sure the window fits)
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


def ms_ssim_settings(side: int, weights=MS_SSIM_WEIGHTS, win_size: int = 11, sigma: float = 1.5,
                     small: str = "error") -> tuple[tuple[float, ...], int, float]:
    """(weights, win_size, sigma) that `ms_ssim` uses for images whose shorter side is `side` px."""
    if small not in SMALL_MODES:
        raise ValueError(f"small must be one of {SMALL_MODES}, got {small!r}")
    weights, levels = tuple(float(v) for v in weights), len(weights)
    fits = lambda win, scales: side > (win - 1) * 2 ** (scales - 1)  # the window fits at the coarsest scale
    if fits(win_size, levels):
        return weights, win_size, sigma
    if small == "scales" and (m := max((m for m in range(1, levels + 1) if fits(win_size, m)), default=0)):
        return tuple(v / sum(weights[:m]) for v in weights[:m]), win_size, sigma
    if small == "window" and (k := max((k for k in range(3, win_size + 1, 2) if fits(k, levels)), default=0)):
        return weights, k, sigma * k / win_size
    hint = "" if small != "error" else "; pass small='scales' or small='window' for small images"
    raise ValueError(f"MS-SSIM with {levels} scales and a {win_size}-tap window needs images larger than "
                     f"{(win_size - 1) * 2 ** (levels - 1)} px ({levels - 1} halvings), got a shorter side of "
                     f"{side} px{hint}")


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, weights=MS_SSIM_WEIGHTS,
            win_size: int = 11, sigma: float = 1.5, K=(0.01, 0.03), small: str = "error") -> torch.Tensor:
    """MS-SSIM of image pairs x, y [B, C, H, W] -> [B] in [0, 1] (1 = identical).

    = `pytorch_msssim.ms_ssim(x, y, data_range, size_average=False, win_size, win_sigma=sigma, weights, K)`
    for images larger than (win_size - 1) * 2^4; `small` handles smaller ones (module docstring).
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"images must be two [B, C, H, W] of the same shape, got {list(x.shape)} and {list(y.shape)}")
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
