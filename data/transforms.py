"""The paper's preprocessing (stored CXR -> model input) and training augmentation, in plain torch.

Preprocessing (DiNO-Diffusion Sec. 3: "uint16 -> uint8, centre crop 1:1, resize to 512, remove padding"),
applied by `preprocess_cxr` in this order:
1. `remove_border`: scanned films and exported DICOMs carry constant black or white frames (padding to a
   fixed aspect ratio, collimator edges). Rows/columns at the image edges whose intensity range is at most
   `tol` (uint8 units, measured on an 8-bit view of the whole image) are peeled off, repeatedly, until
   every edge row and column has content. A constant image is left as is.
2. `center_crop_square`: the side is the shorter side, equal margins drop from the longer one (1:1 crop).
3. `to_uint8`: the public sets mix 8-bit JPEGs with 12-16-bit PNG/DICOM. A 16-bit file rarely spans its
   whole range (12-bit detectors store 0..4095), so dividing by 65535 would give near-black images; we map
   the kept square's own [min, max] (or, with `percentiles=(lo, hi)`, its robust percentile range,
   clipping burned-in text and dead pixels) linearly onto 0..255, so a padding frame cannot compress the
   contrast. uint8 passes through unchanged.
4. `resize`: bilinear with antialiasing (a triangle filter as wide as the downscale factor, as Pillow's
   BILINEAR resize does) so that 2-3k px radiographs do not alias on their way down to 256/512 px.
The result is a float32 tensor [1, S, S] in [0, 1]; the VAE side maps it to [-1, 1] (x * 2 - 1) itself.

Augmentation (Sec. 3: "random sharpening, random affine (shear 5 %, translate 5 %, scale 0.9-1.4)"):
- `RandomSharpen(p, factors)`: torchvision's `adjust_sharpness`, reimplemented: the image is blended with
  its 3x3 smoothed copy (kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, the outermost pixels left unsmoothed as in
  PIL's ImageEnhance.Sharpness): out = f * x + (1 - f) * smooth(x); f > 1 sharpens, f = 1 is the identity.
  The paper gives no strength, so we use torchvision's default p = 0.5 with f ~ U(1, 2).
- `RandomAffine(shear, translate, scale)`: one affine map per image about its centre, drawn uniformly:
  shear factor sh ~ U(-shear, shear) along x (the paper's "5 %" read as a fraction like translate, i.e.
  tan(angle) = 0.05, about 2.9 degrees), translation ~ U(-translate, translate) * (W, H), scale ~ U(0.9,
  1.4). Pixels are resampled bilinearly with `F.affine_grid` / `F.grid_sample`; outside is 0 (black),
  torchvision's default fill.
All randomness comes from an explicit `torch.Generator` (`seeded(*keys)` makes one from integer keys such as
(seed, epoch, item): the one keyed-RNG helper of the data sets, loader and train.py): same seed, same images. Every
function takes [C, H, W] or [B, C, H, W] floats in [0, 1]; a batch draws independent parameters per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

BORDER_TOL = 5  # uint8 levels: a padding row may vary this much (JPEG noise) and still count as constant


# ------------------------------------------------------------------------------------------ preprocessing
def to_uint8(img: np.ndarray, percentiles: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 unchanged; bool -> 0/255; any other dtype: [min, max] (or the given percentiles) -> 0..255."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == bool:
        return img.astype(np.uint8) * 255
    lo, hi = (float(img.min()), float(img.max())) if percentiles is None else np.percentile(img, percentiles)
    if hi <= lo:
        return np.zeros(img.shape, np.uint8)
    scale = lambda a: np.rint(np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    if img.dtype == np.uint16:  # a 65536-entry lookup table: one gather instead of five float passes
        return scale(np.arange(65536, dtype=np.float32))[img]
    return scale(img.astype(np.float32))


def border_box(img: np.ndarray, tol: float = BORDER_TOL) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), bottom/right exclusive: the box left after peeling constant edge rows
    and columns (intensity range <= tol) off a 2-D image, repeated until no edge changes."""
    top, bottom, left, right = 0, img.shape[0], 0, img.shape[1]
    while True:
        sub = img[top:bottom, left:right]
        rows = (sub.max(1) - sub.min(1)) <= tol  # [h'] True = constant row
        cols = (sub.max(0) - sub.min(0)) <= tol  # [w']
        if rows.all() or cols.all():  # nothing but constant lines (a blank image): stop here
            return top, bottom, left, right
        t, b = int(np.argmin(rows)), int(np.argmin(rows[::-1]))
        lft, rgt = int(np.argmin(cols)), int(np.argmin(cols[::-1]))
        if t + b + lft + rgt == 0:
            return top, bottom, left, right
        top, bottom, left, right = top + t, bottom - b, left + lft, right - rgt


def remove_border(img: np.ndarray, tol: float = BORDER_TOL) -> np.ndarray:
    """Crop constant-valued padding (black or white frames) off the edges of a 2-D image."""
    top, bottom, left, right = border_box(img, tol)
    return img[top:bottom, left:right]


def center_crop_square(img):
    """The central side x side crop of the last two dims (numpy or torch), side = the shorter side."""
    h, w = img.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return img[..., top : top + side, left : left + side]


def resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize the last two dims of a float tensor [..., H, W], bilinear, antialiased when shrinking."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    lead = x.shape[:-2]
    x4 = x.reshape(-1, 1, *x.shape[-2:])  # [N, 1, H, W]
    out = F.interpolate(x4, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.reshape(*lead, *size)


def crop_box(img: np.ndarray, tol: float = BORDER_TOL, percentiles=None) -> tuple[int, int, int]:
    """(top, left, side) of the square `preprocess_cxr` keeps: border removal, then the centre square."""
    top, bottom, left, right = border_box(to_uint8(img, percentiles), tol)
    h, w = bottom - top, right - left
    side = min(h, w)
    return top + (h - side) // 2, left + (w - side) // 2, side


def preprocess_cxr(img: np.ndarray, size: int | None, *, tol: float = BORDER_TOL,
                   percentiles: tuple[float, float] | None = None) -> torch.Tensor:
    """Stored grayscale CXR [H, W] (uint8, uint16, ...) -> float32 [1, S, S] in [0, 1] (None: no resize)."""
    if img.ndim != 2:
        raise ValueError(f"preprocess_cxr: expected a grayscale image [H, W], got shape {img.shape}")
    top, left, side = crop_box(img, tol, percentiles)
    square = to_uint8(img[top : top + side, left : left + side], percentiles)
    x = torch.from_numpy(np.ascontiguousarray(square)).float().div_(255)[None]  # [1, s, s]
    return x if size is None else resize(x, size).clamp_(0, 1)


def preprocess_mask(mask: np.ndarray, img: np.ndarray, size: int | None, *, tol: float = BORDER_TOL,
                    percentiles: tuple[float, float] | None = None) -> torch.Tensor:
    """A mask drawn on `img` -> float32 {0, 1} [1, S, S], cropped and resized exactly like `img`.
    Foreground is > half the mask's maximum (works for 0/1, 0/255 and bool masks)."""
    if mask.shape != img.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {img.shape}")
    top, left, side = crop_box(img, tol, percentiles)
    m = mask[top : top + side, left : left + side].astype(np.float32)
    m = torch.from_numpy((m > m.max() / 2) if m.max() > 0 else m).float()[None]  # [1, s, s]
    return m if size is None else (resize(m, size) >= 0.5).float()


def seeded(*keys: int) -> torch.Generator:
    """The one keyed-randomness helper: a CPU generator determined by integer keys (seed, purpose, epoch,
    item, ...), the same on every rank, in every DataLoader worker and after a resume. Keys are mixed by
    numpy's SeedSequence (taken modulo 2**64, so negative ones are fine)."""
    state = np.random.SeedSequence([int(k) % 2**64 for k in keys]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))



# ------------------------------------------------------------------------------------------- augmentation
def _as_batch(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if x.ndim not in (3, 4):
        raise ValueError(f"expected an image [C, H, W] or a batch [B, C, H, W], got shape {tuple(x.shape)}")
    return (x[None], True) if x.ndim == 3 else (x, False)


def _rand(n: int, k: int, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(n, k, generator=generator, device=device).to(like.device, like.dtype)


def adjust_sharpness(x: torch.Tensor, factor) -> torch.Tensor:
    """torchvision.transforms.functional.adjust_sharpness for float images in [0, 1]; `factor` is a number
    or a tensor broadcastable to [B, 1, 1, 1]."""
    x4, single = _as_batch(x)
    b, c, h, w = x4.shape
    if h <= 2 or w <= 2:
        return x
    kernel = torch.ones(3, 3, dtype=x4.dtype, device=x4.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(c, 1, 3, 3)
    smooth = x4.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(x4, kernel, groups=c)  # [B, C, H-2, W-2]
    out = (factor * x4 + (1 - factor) * smooth).clamp(0, 1)
    return out[0] if single else out


@dataclass(frozen=True)
class RandomSharpen:
    """With probability p, sharpen by a factor drawn uniformly from `factors` (1 = unchanged)."""

    p: float = 0.5
    factors: tuple[float, float] = (1.0, 2.0)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x4, single = _as_batch(x)
        u = _rand(x4.shape[0], 2, generator, x4)  # [B, 2]: apply?, factor
        lo, hi = self.factors
        factor = torch.where(u[:, 0] < self.p, lo + (hi - lo) * u[:, 1], torch.ones_like(u[:, 1]))
        out = adjust_sharpness(x4, factor.view(-1, 1, 1, 1))
        return out[0] if single else out


@dataclass(frozen=True)
class RandomAffine:
    """Random shear (factor, x direction), translation (fraction of W, H) and scale about the centre."""

    shear: float = 0.05
    translate: float = 0.05
    scale: tuple[float, float] = (0.9, 1.4)

    def sample(self, n: int, generator: torch.Generator | None = None, like=None) -> torch.Tensor:
        """[n, 4] parameters (shear, tx, ty, scale); tx, ty are fractions of the width/height."""
        u = _rand(n, 4, generator, like if like is not None else torch.empty(0))
        lo, hi = self.scale
        return torch.stack([(2 * u[:, 0] - 1) * self.shear, (2 * u[:, 1] - 1) * self.translate,
                            (2 * u[:, 2] - 1) * self.translate, lo + (hi - lo) * u[:, 3]], dim=1)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x4, single = _as_batch(x)
        out = warp_affine(x4, self.sample(x4.shape[0], generator, x4))
        return out[0] if single else out


def warp_affine(x: torch.Tensor, params: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Warp [B, C, H, W] by per-image (shear, tx, ty, scale) [B, 4]: in centred pixel coordinates the
    output point is p_out = M p_in + t with M = scale * [[1, shear], [0, 1]], t = (tx W, ty H)."""
    b, _, h, w = x.shape
    sh, tx, ty, s = params.to(x.device, x.dtype).unbind(1)
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    m_inv = torch.stack([torch.stack([one, -sh], -1), torch.stack([zero, one], -1)], -2) / s.view(-1, 1, 1)
    # grid_sample works in normalised coordinates (align_corners=False): u = x_pix * 2 / W, v = y_pix * 2 / H
    d = torch.tensor([2.0 / w, 2.0 / h], dtype=x.dtype, device=x.device)
    theta_lin = d.view(1, 2, 1) * m_inv / d.view(1, 1, 2)  # D M^-1 D^-1: [B, 2, 2]
    offset = -(theta_lin @ torch.stack([tx * 2, ty * 2], -1).unsqueeze(-1))  # -D M^-1 t: [B, 2, 1]
    grid = F.affine_grid(torch.cat([theta_lin, offset], -1), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


PAPER_SHARPEN = RandomSharpen()
PAPER_AFFINE = RandomAffine()


def augment(x: torch.Tensor, generator: torch.Generator | None = None, *, mask: torch.Tensor | None = None,
            sharpen: RandomSharpen = PAPER_SHARPEN, affine: RandomAffine = PAPER_AFFINE):
    """The paper's training augmentation: random sharpening, then a random affine map ([C, H, W] or batched).
    With a `mask`, returns (image, mask): the mask gets the image's affine map (then >= 0.5), no sharpening;
    the image is the same as without it."""
    x4, single = _as_batch(sharpen(x, generator))
    params = affine.sample(x4.shape[0], generator, x4)
    x4 = warp_affine(x4, params)
    image = x4[0] if single else x4
    if mask is None:
        return image
    m4 = (warp_affine(_as_batch(mask)[0].to(x4.dtype), params) >= 0.5).to(mask.dtype)
    return image, (m4[0] if single else m4)
