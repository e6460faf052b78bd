"""Frozen DINO ViT encoders (DINO v1 / DINOv2 with registers) and the global-token condition c_GLB."""

from .config import DinoConfig
from .preprocess import from_minus1_1, preprocess
from .vit import DinoViT

__all__ = ["DinoConfig", "DinoViT", "from_minus1_1", "preprocess"]
