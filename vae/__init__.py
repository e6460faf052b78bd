"""The Stable Diffusion v1 KL autoencoder (VAE), from scratch, loading diffusers / CompVis Hub weights."""

from vae.autoencoder import AutoencoderKL, Decoder, Encoder
from vae.config import VAEConfig
from vae.distribution import DiagonalGaussian

__all__ = ["AutoencoderKL", "DiagonalGaussian", "Decoder", "Encoder", "VAEConfig"]
