"""DDIM sampling (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models").

DDIM keeps DDPM's training objective (so any epsilon/v/x_0 model works) but replaces the Markov reverse chain
by a family of non-Markovian processes with the same marginals q(x_t | x_0). One step from t to an earlier
t' (any subset of timesteps, so 50 steps instead of 1000) reads (DDIM eq. 12):

    x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)                     "predicted x_0"
    x_t'   = sqrt(abar_t') x0_hat + sqrt(1 - abar_t' - sigma_t^2) eps_hat + sigma_t z,   z ~ N(0, I)
                                     "direction pointing to x_t"                 random noise

with (DDIM eq. 16)  sigma_t = eta sqrt((1 - abar_t') / (1 - abar_t)) sqrt(1 - abar_t / abar_t').

eta = 0 makes sampling deterministic (an ODE-like map from noise to image, which is what makes DDIM inversion
and latent interpolation possible); eta = 1 recovers the DDPM posterior variance.

As in diffusers, the previous timestep is t' = t - T // N whatever the spacing, and before t = 0 the chain
ends at abar = 1 (set_alpha_to_one) or abar[0] (SD v1).
"""

from __future__ import annotations

import torch

from ddpm.base import NoiseScheduler, StepOutput


class DDIMScheduler(NoiseScheduler):
    """DDIM sampler; the constructor takes the SchedulerConfig fields (defaults = Stable Diffusion v1)."""

    def previous_timestep(self, timestep: int) -> int:
        """t' = t - T // N (may be negative on the last step)."""
        return int(timestep) - self.config.num_train_timesteps // self.num_inference_steps

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
    ) -> StepOutput:
        """One DDIM step x_t -> x_t' (DDIM eq. 12). model_output, sample: [B, ...]; timestep: int/0-d tensor.

        With eta > 0 the noise z is `variance_noise` if given (it then takes precedence over `generator`),
        else it is drawn from `generator` (one draw of sample's shape per step, as diffusers does).
        """
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta!r}")
        t = self._step_timestep(timestep)
        prev_t = self.previous_timestep(t)
        abar_t = self._abar(t)
        if prev_t >= 0:
            abar_prev = self._abar(prev_t)
        else:
            abar_prev = torch.tensor(1.0) if self.config.set_alpha_to_one else self._abar(0)
        x0, eps = self._predict_x0_eps(model_output, sample, abar_t)

        # DDIM eq. 16: the std of the added noise; eta = 1 gives the DDPM posterior std (DDPM eq. 7)
        variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        sigma = eta * variance**0.5
        # DDIM eq. 12 (the clamp guards against round-off at eta = 1, where the bracket is exactly >= 0)
        prev_sample = abar_prev**0.5 * x0 + (1 - abar_prev - sigma**2).clamp(min=0) ** 0.5 * eps
        if eta > 0:
            prev_sample = prev_sample + sigma * self._noise(model_output, generator, variance_noise)
        return StepOutput(prev_sample, x0)
