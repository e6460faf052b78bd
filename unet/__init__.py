"""Stable Diffusion v1 cross-attention UNet (diffusers key layout) with self-attention capture for DiffSeg."""

from unet.attention import Attention, attention_with_probs
from unet.config import UNetConfig
from unet.unet import AttentionMap, UNet2DConditionModel

__all__ = ["Attention", "AttentionMap", "UNet2DConditionModel", "UNetConfig", "attention_with_probs"]
