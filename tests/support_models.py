"""Test-only helpers for the model packages (ddpm/, unet/, vae/, vit_dino/): API no script uses."""

from __future__ import annotations

import torch


def gaussian_kl(p, q) -> torch.Tensor:
    """KL(p || q) between two vae DiagonalGaussians, per sample, summed over C, h, w: [B] (was p.kl(q))."""
    ratio = ((p.mean - q.mean).pow(2) + p.var) / q.var
    return 0.5 * torch.sum(ratio - 1.0 - p.logvar + q.logvar, dim=(1, 2, 3))
