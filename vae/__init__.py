"""The Stable Diffusion v1 KL autoencoder (VAE), from scratch, loading diffusers / CompVis Hub weights."""

from vae.model import AutoencoderKL, DiagonalGaussian, VAEConfig

__all__ = ["AutoencoderKL", "DiagonalGaussian", "VAEConfig"]
