"""DDPM ancestral sampling (Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models").

The reverse process is learned by predicting the noise; given the network's estimate of x_0 (DDPM eq. 15),

    x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t),

one step samples the Gaussian posterior of the forward process (DDPM eqs. 6-7):

    q(x_{t-1} | x_t, x_0) = N(mu_t, beta~_t I),
    mu_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0_hat + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
    beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t        ("fixed_small"; "fixed_large" uses beta_t).

With N < T steps the chain skips timesteps; the same formulas hold with the step's own alpha_t = abar_t /
abar_t' and beta_t = 1 - alpha_t, t' being the next timestep of the grid ("respacing", Nichol & Dhariwal 2021,
Sec. 4). Before the first timestep abar is 1, and no noise is added at t = 0 (DDPM Algorithm 2).
"""

from __future__ import annotations

import torch

from ddpm.base import NoiseScheduler, StepOutput


class DDPMScheduler(NoiseScheduler):
    """DDPM sampler; the constructor takes the SchedulerConfig fields (defaults = Stable Diffusion v1)."""

    def previous_timestep(self, timestep: int) -> int:
        """The next timestep of the grid set by set_timesteps, or -1 after the last one."""
        t = int(timestep)
        try:
            i = self._grid.index(t)
        except ValueError:
            raise ValueError(
                f"timestep {t} is not one of the {self.num_inference_steps} timesteps set by set_timesteps"
            ) from None
        return self._grid[i + 1] if i + 1 < len(self._grid) else -1

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
    ) -> StepOutput:
        """One ancestral step x_t -> x_t'. model_output, sample: [B, ...]; timestep: int or 0-d tensor.

        For t > 0 the noise is `variance_noise` if given (it then takes precedence over `generator`), else it
        is drawn from `generator` (one draw of sample's shape per step, as diffusers does).
        """
        t = self._step_timestep(timestep)
        prev_t = self.previous_timestep(t)
        abar_t = self._abar(t)
        abar_prev = self._abar(prev_t) if prev_t >= 0 else torch.tensor(1.0)
        alpha_t = abar_t / abar_prev  # of this (possibly strided) step
        beta_t = 1 - alpha_t
        x0, _ = self._predict_x0_eps(model_output, sample, abar_t)

        # posterior mean mu_t (DDPM eq. 7)
        x0_coef = abar_prev**0.5 * beta_t / (1 - abar_t)
        xt_coef = alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t)
        prev_sample = x0_coef * x0 + xt_coef * sample
        if t > 0:
            if self.config.variance_type == "fixed_small":  # beta~_t (DDPM eq. 7), floored like diffusers
                variance = ((1 - abar_prev) / (1 - abar_t) * beta_t).clamp(min=1e-20)
            else:  # "fixed_large": beta_t (DDPM Sec. 3.2, the upper bound on the reverse variance)
                variance = beta_t
            prev_sample = prev_sample + variance**0.5 * self._noise(model_output, generator, variance_noise)
        return StepOutput(prev_sample, x0)
