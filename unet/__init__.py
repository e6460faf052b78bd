"""Stable Diffusion v1 cross-attention UNet (diffusers key layout) with self-attention capture for DiffSeg."""

from unet.config import UNetConfig
from unet.layers import attention_with_probs
from unet.model import AttentionMap, UNet2DConditionModel

__all__ = ["AttentionMap", "UNet2DConditionModel", "UNetConfig", "attention_with_probs"]
