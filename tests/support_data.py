"""Test-only helpers for data/: small views of the preprocessing steps that no script calls on its own."""

import numpy as np

from data.transforms import BORDER_TOL, border_box


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
