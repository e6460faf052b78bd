"""The reverse process: one DDPM or DDIM step from x_t to the previous timestep t' of the grid.

Both samplers first turn the network output into estimates of x_0 and eps. With a = sqrt(abar_t) and
b = sqrt(1 - abar_t), x_t = a x_0 + b eps, so for "epsilon" (DDPM eq. 15)

    x0_hat = (x_t - b eps_hat) / a,

and likewise for "v_prediction" (v = a eps - b x_0) and "sample" (x_0 itself). Then:

DDPM ancestral sampling (Ho, Jain & Abbeel 2020) draws from the Gaussian posterior of the forward process
(DDPM eqs. 6-7):

    q(x_{t-1} | x_t, x_0) = N(mu_t, beta~_t I),
    mu_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0_hat + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
    beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t        (diffusers' "fixed_small").

With N < T steps the chain skips timesteps; the same formulas hold with the step's own alpha_t = abar_t /
abar_t' and beta_t = 1 - alpha_t, t' being the next timestep of the grid ("respacing", Nichol & Dhariwal 2021,
Sec. 4). Before the first timestep abar is 1, and no noise is added at t = 0 (DDPM Algorithm 2).

DDIM (Song, Meng & Ermon 2021) keeps DDPM's training objective but replaces the Markov chain by a family of
non-Markovian processes with the same marginals q(x_t | x_0). One step from t to t' reads (DDIM eq. 12):

    x_t' = sqrt(abar_t') x0_hat + sqrt(1 - abar_t' - sigma_t^2) eps_hat + sigma_t z,   z ~ N(0, I)

with (DDIM eq. 16)  sigma_t = eta sqrt((1 - abar_t') / (1 - abar_t)) sqrt(1 - abar_t / abar_t').
eta = 0 makes sampling deterministic (an ODE-like map from noise to image, which is what makes DDIM inversion
and latent interpolation possible); eta = 1 recovers the DDPM posterior variance. As in diffusers, DDIM's
previous timestep is t' = t - T // N whatever the spacing, and before t = 0 the chain ends at abar = 1
(set_alpha_to_one) or abar[0] (SD v1).

Step coefficients are computed in float32 exactly as diffusers computes them, so trajectories match it number
for number.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ddpm.schedule import NoiseScheduler


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor  # x at the previous (less noisy) timestep, like `sample`
    pred_original_sample: torch.Tensor  # the model's estimate of x_0 at this step


def _step_timestep(s: NoiseScheduler, timestep) -> int:
    """The current timestep of `step` as an int in [0, T-1] (one timestep for the whole batch)."""
    if s.num_inference_steps is None:
        raise ValueError(f"{type(s).__name__}.step called before set_timesteps(num_inference_steps)")
    if isinstance(timestep, torch.Tensor) and timestep.numel() != 1:
        raise ValueError(f"step takes one timestep for the batch, got shape {tuple(timestep.shape)}")
    return int(s._timestep_tensor(timestep, "cpu").item())


def _predict_x0_eps(s: NoiseScheduler, model_output: torch.Tensor, sample: torch.Tensor, abar_t: torch.Tensor):
    """The model's x_0 and eps estimates from its output, any prediction_type (x_0 clipped if asked).
    abar_t is a 0-d float32 CPU tensor; it takes the dtype and device of the tensor it multiplies."""
    a, b = abar_t**0.5, (1 - abar_t) ** 0.5
    kind = s.config.prediction_type
    if kind == "epsilon":  # invert x_t = a x_0 + b eps (DDPM eq. 15)
        x0, eps = (sample - b * model_output) / a, model_output
    elif kind == "v_prediction":  # v = a eps - b x_0 and x_t = a x_0 + b eps, with a^2 + b^2 = 1
        x0, eps = a * sample - b * model_output, a * model_output + b * sample
    else:  # "sample"
        x0, eps = model_output, (sample - a * model_output) / b
    if s.config.clip_sample:
        x0 = x0.clamp(-s.config.clip_sample_range, s.config.clip_sample_range)
    return x0, eps


def _noise(like: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped like `like`, one draw from `generator` (on its device, then moved, as
    diffusers' randn_tensor; a list: one generator per sample)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != like.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {like.shape[0]}")
        shape = like.shape[1:]
        draws = [torch.randn(shape, generator=g, device=g.device, dtype=like.dtype) for g in generator]
        return torch.stack(draws).to(like.device)
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


class DDPMScheduler(NoiseScheduler):
    """DDPM sampler; the constructor takes the SchedulerConfig fields (defaults = Stable Diffusion v1)."""

    def previous_timestep(self, timestep: int) -> int:
        """The next timestep of the grid set by set_timesteps, or -1 after the last one."""
        t = int(timestep)
        if t not in self._grid:
            raise ValueError(f"timestep {t} is not one of the {len(self._grid)} timesteps set by set_timesteps")
        i = self._grid.index(t)
        return self._grid[i + 1] if i + 1 < len(self._grid) else -1

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> StepOutput:
        """One ancestral step x_t -> x_t' (noise for t > 0: see `_noise`). model_output, sample: [B, ...];
        timestep: int or 0-d tensor."""
        t = _step_timestep(self, timestep)
        prev_t = self.previous_timestep(t)
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        alpha_t = abar_t / abar_prev  # of this (possibly strided) step
        beta_t = 1 - alpha_t
        x0, _ = _predict_x0_eps(self, model_output, sample, abar_t)

        # posterior mean mu_t (DDPM eq. 7)
        x0_coef = abar_prev**0.5 * beta_t / (1 - abar_t)
        xt_coef = alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t)
        prev_sample = x0_coef * x0 + xt_coef * sample
        if t > 0:  # the posterior variance beta~_t (DDPM eq. 7), floored like diffusers
            variance = ((1 - abar_prev) / (1 - abar_t) * beta_t).clamp(min=1e-20)
            prev_sample = prev_sample + variance**0.5 * _noise(model_output, generator)
        return StepOutput(prev_sample, x0)


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
    ) -> StepOutput:
        """One DDIM step x_t -> x_t' (DDIM eq. 12; noise z for eta > 0: see `_noise`). model_output, sample:
        [B, ...]; timestep: int or 0-d tensor."""
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta!r}")
        t = _step_timestep(self, timestep)
        prev_t = self.previous_timestep(t)
        abar_t = self.alphas_cumprod[t]
        if prev_t >= 0:
            abar_prev = self.alphas_cumprod[prev_t]
        else:
            abar_prev = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        x0, eps = _predict_x0_eps(self, model_output, sample, abar_t)

        # DDIM eq. 16: the std of the added noise; eta = 1 gives the DDPM posterior std (DDPM eq. 7)
        variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        sigma = eta * variance**0.5
        # DDIM eq. 12 (the clamp guards against round-off at eta = 1, where the bracket is exactly >= 0)
        prev_sample = abar_prev**0.5 * x0 + (1 - abar_prev - sigma**2).clamp(min=0) ** 0.5 * eps
        if eta > 0:
            prev_sample = prev_sample + sigma * _noise(model_output, generator)
        return StepOutput(prev_sample, x0)
