"""DiagonalGaussian: the posterior q(z | x) = N(mean, diag(exp(logvar))) that the VAE encoder outputs.

The encoder predicts 2 * latent_channels maps ("moments", double_z); the first half is the mean, the second
the log-variance, clamped to [-30, 20] as in CompVis `DiagonalGaussianDistribution` (exp(20/2) ~ 2e4 bounds
the std; exp(-30/2) ~ 3e-7 keeps it positive). Sampling is the reparameterisation z = mean + std * eps
(Kingma & Welling 2014, Eq. 10 / Sec. 2.4), so gradients flow to mean and logvar.
"""

from __future__ import annotations

import math

import torch

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussian:
    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # [B, 2C, h, w] -> 2 x [B, C, h, w]
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) drawn from `generator` (on the generator's device)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(self || other) per sample, summed over C, h, w: [B]. `other` defaults to N(0, I)."""
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))
        ratio = ((self.mean - other.mean).pow(2) + self.var) / other.var
        return 0.5 * torch.sum(ratio - 1.0 - self.logvar + other.logvar, dim=(1, 2, 3))

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of `sample` under this Gaussian, summed over `dims`."""
        squared = (sample - self.mean).pow(2) / self.var
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + squared, dim=dims)
