"""The paper's preprocessing (stored CXR -> model input) and training augmentation, in plain torch.

Preprocessing (DiNO-Diffusion Sec. 3: "uint16 -> uint8, centre crop 1:1, resize to 512, remove padding"),
`preprocess_cxr` in this order:
1. border removal (`border_box`): scanned films and exported DICOMs carry constant black or white frames.
   Edge rows/columns whose range is at most `tol` uint8 levels are peeled off until every edge has content.
2. the centre square (1:1 crop), side = the shorter side.
3. `to_uint8`: the sets mix 8-bit JPEGs with 12-16-bit PNG/DICOM, and a 12-bit detector stores 0..4095, so
   /65535 would give near-black images: the kept square's own [min, max] (or robust `percentiles`) -> 0..255.
4. `resize`: bilinear, antialiased (as Pillow's BILINEAR) so 2-3k px radiographs do not alias at 256/512 px.
The result is float32 [1, S, S] in [0, 1]; the VAE side maps it to [-1, 1] itself. RGB images [H, W, 3] take
the same steps and give [3, S, S] (a border is constant in every channel; one [min, max] over all channels
keeps the colour balance).

Augmentation (Sec. 3: "random sharpening, random affine (shear 5 %, translate 5 %, scale 0.9-1.4)"), `augment`:
- sharpening is torchvision's `adjust_sharpness`: out = f * x + (1 - f) * smooth(x), smooth = the 3x3 kernel
  [[1,1,1],[1,5,1],[1,1,1]] / 13 (edge pixels unsmoothed, as PIL's ImageEnhance.Sharpness). The paper gives
  no strength: torchvision's default p = 0.5, with f ~ U(1, 2).
- one affine map about the centre: shear factor ~ U(+-0.05) along x (the "5 %" read like translate:
  tan(angle) = 0.05, ~2.9 degrees), translation ~ U(+-0.05) * (W, H), scale ~ U(0.9, 1.4); bilinear
  `F.grid_sample`, black outside (torchvision's fill).
All randomness comes from an explicit `torch.Generator`; `seeded(*keys)` is the one keyed-RNG helper of the
project. A batch draws parameters per image; the channels of an RGB image share them. No flips (anatomy is not
mirror-symmetric) and no colour jitter (the paper has none, and colour is what c_GLB must carry).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

BORDER_TOL = 5  # uint8 levels: a padding row may vary this much (JPEG noise) and still count as constant


# ------------------------------------------------------------------------------------------ preprocessing
def to_uint8(img: np.ndarray, percentiles: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 unchanged; any other dtype: [min, max] (or the given percentiles) -> 0..255."""
    if img.dtype == np.uint8:
        return img
    lo, hi = (float(img.min()), float(img.max())) if percentiles is None else np.percentile(img, percentiles)
    if hi <= lo:
        return np.zeros(img.shape, np.uint8)
    scale = lambda a: np.rint(np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    if img.dtype == np.uint16:  # a 65536-entry lookup table: one gather instead of five float passes
        return scale(np.arange(65536, dtype=np.float32))[img]
    return scale(img.astype(np.float32))


def border_box(img: np.ndarray, tol: float = BORDER_TOL) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), bottom/right exclusive: the box left after peeling constant edge rows
    and columns (intensity range <= tol) off a grey [H, W] or RGB [H, W, 3] image, repeated until no edge
    changes."""
    top, bottom, left, right = 0, img.shape[0], 0, img.shape[1]
    spread = lambda a: a if a.ndim == 1 else a.max(-1)  # RGB [H, W, 3]: constant in every channel
    while True:
        sub = img[top:bottom, left:right]
        rows = spread(sub.max(1) - sub.min(1)) <= tol  # [h'] True = constant row
        cols = spread(sub.max(0) - sub.min(0)) <= tol  # [w']
        if rows.all() or cols.all():  # nothing but constant lines (a blank image): stop here
            return top, bottom, left, right
        t, b = int(np.argmin(rows)), int(np.argmin(rows[::-1]))
        lft, rgt = int(np.argmin(cols)), int(np.argmin(cols[::-1]))
        if t + b + lft + rgt == 0:
            return top, bottom, left, right
        top, bottom, left, right = top + t, bottom - b, left + lft, right - rgt


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the last two dims of a float tensor [..., H, W] to size x size, bilinear, antialiased."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    out = F.interpolate(x.reshape(-1, 1, *x.shape[-2:]), size=(size, size), mode="bilinear", antialias=True)
    return out.reshape(*x.shape[:-2], size, size)


def crop_box(img: np.ndarray) -> tuple[int, int, int]:
    """(top, left, side) of the square `preprocess_cxr` keeps: border removal, then the centre square."""
    top, bottom, left, right = border_box(to_uint8(img))
    h, w = bottom - top, right - left
    side = min(h, w)
    return top + (h - side) // 2, left + (w - side) // 2, side


def preprocess_cxr(img: np.ndarray, size: int | None) -> torch.Tensor:
    """Stored grey CXR [H, W] (uint8, uint16, ...) -> float32 [1, S, S] in [0, 1] (None: no resize); an RGB
    image [H, W, 3] (colour modalities) -> [3, S, S]."""
    if img.ndim != 2 and (img.ndim != 3 or img.shape[2] != 3):
        raise ValueError(f"preprocess_cxr: expected a grey image [H, W] or RGB [H, W, 3], got shape {img.shape}")
    top, left, side = crop_box(img)
    square = to_uint8(img[top : top + side, left : left + side])
    x = torch.from_numpy(np.ascontiguousarray(square)).float().div_(255)
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # [C, s, s]
    return x if size is None else resize(x, size).clamp_(0, 1)


def preprocess_mask(mask: np.ndarray, img: np.ndarray, size: int | None) -> torch.Tensor:
    """A mask drawn on `img` -> float32 {0, 1} [1, S, S], cropped and resized exactly like `img`.
    Foreground is > half the mask's maximum (works for 0/1, 0/255 and bool masks)."""
    if mask.shape != img.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {img.shape[:2]}")
    top, left, side = crop_box(img)
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


def adjust_sharpness(x: torch.Tensor, factor) -> torch.Tensor:
    """torchvision.transforms.functional.adjust_sharpness for float images in [0, 1]; `factor` is a number
    or a tensor broadcastable to [B, 1, 1, 1]."""
    x4, single = _as_batch(x)
    b, c, h, w = x4.shape
    if h <= 2 or w <= 2:
        return x
    kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x4.dtype, device=x4.device) / 13
    kernel = kernel.expand(c, 1, 3, 3)
    smooth = x4.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(x4, kernel, groups=c)  # [B, C, H-2, W-2]
    out = (factor * x4 + (1 - factor) * smooth).clamp(0, 1)
    return out[0] if single else out


def warp_affine(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
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
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class Augment:
    """The paper's training augmentation (module docstring): with probability `sharpen_p` sharpen by a factor
    ~ U(`sharpen`), then one random affine map: shear ~ U(+-shear), translation ~ U(+-translate) * (W, H),
    scale ~ U(`scale`). `augment = Augment()` holds the paper's values."""

    sharpen_p: float = 0.5
    sharpen: tuple[float, float] = (1.0, 2.0)
    shear: float = 0.05
    translate: float = 0.05
    scale: tuple[float, float] = (0.9, 1.4)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None, *,
                 mask: torch.Tensor | None = None):
        """[C, H, W] or [B, C, H, W] -> the same shape. With a `mask`, returns (image, mask): the mask gets the
        image's affine map (then >= 0.5), no sharpening; the image is the same as without it."""
        x4, single = _as_batch(x)
        device = generator.device if generator is not None else torch.device("cpu")
        # [B, 6]: sharpen?, factor | shear, tx, ty, scale; drawn as [B, 2] then [B, 4], the stream of past runs
        u = torch.cat([torch.rand(x4.shape[0], k, generator=generator, device=device) for k in (2, 4)], 1).to(x4)
        lo, hi = self.sharpen
        factor = torch.where(u[:, 0] < self.sharpen_p, lo + (hi - lo) * u[:, 1], torch.ones_like(u[:, 1]))
        lo, hi = self.scale
        params = torch.stack([(2 * u[:, 2] - 1) * self.shear, (2 * u[:, 3] - 1) * self.translate,
                              (2 * u[:, 4] - 1) * self.translate, lo + (hi - lo) * u[:, 5]], dim=1)
        x4 = warp_affine(adjust_sharpness(x4, factor.view(-1, 1, 1, 1)), params)
        image = x4[0] if single else x4
        if mask is None:
            return image
        m4 = (warp_affine(_as_batch(mask)[0].to(x4.dtype), params) >= 0.5).to(mask.dtype)
        return image, (m4[0] if single else m4)


augment = Augment()
