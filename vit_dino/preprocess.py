"""Image -> DINO input: resize the shorter side to S / crop_pct, centre-crop S x S, normalize (mean, std).

This is timm's eval transform for the DINO checkpoints (`Resize(S / crop_pct)` bicubic with antialias,
`CenterCrop(S)`, `Normalize(mean, std)`), done on tensors, the whole batch at once on the model's device. With
crop_pct 1 and square images (chest X-rays usually are) it equals `facebook/dino-vitb16`'s ViTImageProcessor.
S, crop_pct, mean and std are the checkpoint's (`fields_from_image_processor` reads a transformers
`preprocessor_config.json`), else ImageNet mean/std, S = the native image_size and crop_pct 1.

Inputs: PIL images (16-bit too), numpy arrays or tensors [H, W], [B, H, W], [B, 1, H, W] or [B, 3, H, W] (uint8
/ 255, uint16 / 65535, floats already in [0, 1]: `from_minus1_1` maps [-1, 1] images, other ranges raise), or a
list of any of these, of any sizes. Grey becomes 3 channels by repetition.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import hub
from data.readers import pil_to_array

from .config import IMAGENET_MEAN, IMAGENET_STD

_SCALE = {torch.uint8: 255.0, torch.uint16: 65535.0}


def from_minus1_1(x: torch.Tensor) -> torch.Tensor:
    """Map images in [-1, 1] (VAE / diffusion convention) to [0, 1], the range `preprocess` expects."""
    return (x + 1) / 2


def _to_batch(images, device) -> torch.Tensor:
    """One input (not a list) -> float [B, C, H, W] in [0, 1], C in {1, 3}."""
    if isinstance(images, Image.Image):
        images = torch.from_numpy(pil_to_array(images, channels=3)).permute(2, 0, 1)[None]  # uint8/16 [1, 3, H, W]
    elif isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"preprocess: unsupported input type {type(images).__name__}; "
                        "expected PIL image, numpy array, torch tensor or a list of them")
    shape = tuple(images.shape)
    if images.ndim == 3 and shape[-1] <= 4 < min(shape[:2]):
        raise ValueError(f"preprocess: input shape {shape} looks channels-last; 3-D inputs are [B, H, W]. "
                         "Pass [B, C, H, W] (x.permute(2, 0, 1)[None] for one image) or a PIL image")
    x = images[None, None] if images.ndim == 2 else images[:, None] if images.ndim == 3 else images
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"preprocess: expected an image [H, W], [B, H, W], [B, 1, H, W] or [B, 3, H, W]; "
                         f"got shape {shape}")
    x = x.to(device)
    if x.dtype in _SCALE:
        return x.float() / _SCALE[x.dtype]
    if not x.is_floating_point():
        raise ValueError(f"preprocess: unsupported dtype {x.dtype}; expected uint8, uint16 or float in [0, 1]")
    x = x.float()
    lo, hi = torch.aminmax(x)
    if lo < -0.1 or hi > 1.1:  # a little bicubic overshoot is fine; [-1, 1] or [0, 255] is not
        raise ValueError(f"preprocess: float images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}] (for "
                         "[-1, 1] images use vit_dino.from_minus1_1(x); for 0..255 floats divide by 255)")
    return x


def resize_center_crop(x: torch.Tensor, size: int, resize: int | None = None) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, size, size]: shorter side to `resize` (default `size`; bicubic, antialias), then
    centre crop.

    Output sizes and crop offsets follow torchvision `Resize(resize)` + `CenterCrop(size)`.
    """
    resize = resize or size
    if resize < size:
        raise ValueError(f"preprocess: resize={resize} is smaller than the crop size {size}")
    h, w = x.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_long = int(resize * long / short)
    new_h, new_w = (resize, new_long) if h <= w else (new_long, resize)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))  # torchvision CenterCrop
    return x[..., top : top + size, left : left + size]


def preprocess(images, size: int = 224, *, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize: int | None = None,
               device=None) -> torch.Tensor:
    """Images -> normalized float32 [B, 3, size, size] on `device` (see the module docstring for inputs);
    `resize`: the shorter side before the centre crop (default `size`)."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError("preprocess: got an empty list of images")
    out = [resize_center_crop(_to_batch(item, device), size, resize).expand(-1, 3, -1, -1) for item in items]
    x = torch.cat(out) if len(out) > 1 else out[0]
    mean = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------------- preprocessor_config.json


def _side(value, what: str, source) -> int:
    """A transformers size entry (int, {"shortest_edge": n}, {"height": h, "width": w}) -> one side."""
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if value.get("height") is not None and value.get("height") == value.get("width"):
            return int(value["height"])
    elif isinstance(value, (int, float)):
        return int(value)
    raise hub.CheckpointError(f"{source}: {what}={value!r} is not supported (expected a square size or "
                          "shortest_edge)")


def fields_from_image_processor(d: dict, *, source="preprocessor_config.json") -> dict:
    """DinoConfig preprocessing fields (image_mean, image_std, input_size, crop_pct) from a transformers image
    processor config (BitImageProcessor for Dinov2 / rad-dino: resize the shorter side to `size`, centre-crop
    `crop_size`; ViTImageProcessor: resize to `size`). Resampling is always bicubic with antialias here (the
    Dinov2 processors' resample=3 is bicubic too). Settings this preprocessing cannot follow raise."""
    if not d.get("do_resize", True):
        raise hub.CheckpointError(f"{source}: do_resize=false is not supported (DinoViT inputs are resized)")
    if not d.get("do_rescale", True) or abs(d.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        raise hub.CheckpointError(f"{source}: only do_rescale with rescale_factor 1/255 is supported")
    fields = {}
    if d.get("do_normalize", True):
        for key in ("image_mean", "image_std"):
            value = d.get(key, IMAGENET_MEAN if key == "image_mean" else IMAGENET_STD)
            value = [value] * 3 if isinstance(value, (int, float)) else value
            if len(value) != 3:
                raise hub.CheckpointError(f"{source}: {key}={value!r} should have 3 entries (RGB)")
            fields[key] = tuple(float(v) for v in value)
    else:
        fields.update(image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))
    resize = _side(d.get("size", 224), "size", source)
    cropped = d.get("do_center_crop", "crop_size" in d) and "crop_size" in d  # BitImageProcessor default: crop
    crop = _side(d["crop_size"], "crop_size", source) if cropped else resize
    if crop > resize:
        raise hub.CheckpointError(f"{source}: crop_size {crop} is larger than the resize {resize}")
    return dict(fields, input_size=crop, crop_pct=crop / resize)
