"""The forward process and what DDPM and DDIM sampling share (NoiseScheduler).

The T noising steps compose into one closed form (DDPM eq. 4):

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),

so a training example is one line, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with eps ~ N(0, I)
(`add_noise`). The network sees x_t and t and predicts eps ("epsilon", DDPM eq. 14), x_0 ("sample"), or the
velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 ("v_prediction", Salimans & Ho 2022, Sec. 4;
`get_velocity`); each determines the other two given x_t. SNR(t) = abar_t / (1 - abar_t) is the
signal-to-noise ratio that min-SNR loss weighting uses (Hang et al. 2023; `snr`).

Sampling runs the chain backwards over the grid of `set_timesteps`: DDPMScheduler draws from the Gaussian
posterior q(x_{t-1} | x_t, x_0) (ddpm.py), DDIMScheduler takes the non-Markovian, optionally deterministic
step of Song et al. 2021 (ddim.py). Both need only abar at the current and the previous timestep.

`alphas_cumprod` is a float32 CPU tensor, moved to the input's device and dtype on use; step coefficients
are computed in float32 exactly as diffusers computes them, so trajectories match it number for number.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import NamedTuple

import torch

import hub
from ddpm.schedules import SchedulerConfig, make_betas, timestep_grid

CONFIG_NAME = "scheduler_config.json"  # diffusers' file name, in the `scheduler/` folder of a pipeline

# diffusers options we do not implement. At these values they change nothing and are dropped silently when a
# config is read; any other value would change the numbers, so it is an error.
_NEUTRAL_DIFFUSERS_KEYS = {"thresholding": False, "rescale_betas_zero_snr": False}
# Options that only matter with `thresholding`, or only to PNDM's sampler (SD v1 ships a PNDM config).
_IGNORED_DIFFUSERS_KEYS = ("dynamic_thresholding_ratio", "sample_max_value", "skip_prk_steps")


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor  # x at the previous (less noisy) timestep, like `sample`
    pred_original_sample: torch.Tensor  # the model's estimate of x_0 at this step


class NoiseScheduler:
    """Base of DDPMScheduler and DDIMScheduler: the schedule, the timestep grid and the forward process.

    Subclasses add `previous_timestep(t)` and `step(...)`.
    """

    init_noise_sigma = 1.0  # sampling starts from x_T ~ N(0, I), unscaled (as in diffusers)

    def __init__(
        self,
        *,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: tuple[float, ...] | None = None,
        prediction_type: str = "epsilon",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        steps_offset: int = 1,
        set_alpha_to_one: bool = False,
        timestep_spacing: str = "leading",
        variance_type: str = "fixed_small",
    ):
        betas = None if trained_betas is None else tuple(trained_betas)
        self.config = SchedulerConfig(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=betas,
            prediction_type=prediction_type, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
            steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one, timestep_spacing=timestep_spacing,
            variance_type=variance_type,
        )  # fmt: skip
        self.betas = make_betas(self.config)  # [T] float32
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # abar_t, [T] float32 on the CPU
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)  # replaced by set_timesteps
        self._grid: list[int] = []

    def __repr__(self):
        return f"{type(self).__name__}({self.config})"

    # -------------------------------------------------------------------------------------- config

    @classmethod
    def from_config(cls, config, *, subfolder: str | None = None, **overrides):
        """Build from a diffusers scheduler_config.json: a path to the file, to a folder holding it (or a
        pipeline folder with `scheduler/`), a Hub repo id (with `subfolder`), a dict, or a SchedulerConfig.

        Keys starting with '_' are metadata; keys we do not know warn; missing keys take our (SD v1) defaults.
        `overrides` replace fields, e.g. `DDIMScheduler.from_config(path, timestep_spacing="trailing")`.
        """
        if isinstance(config, SchedulerConfig):
            d, source = dataclasses.asdict(config), "SchedulerConfig"
        elif isinstance(config, dict):
            d, source = dict(config), "scheduler config dict"
        else:
            path = Path(os.fspath(config)).expanduser()
            if path.is_dir() and subfolder is None and not (path / CONFIG_NAME).is_file():
                subfolder = "scheduler"  # a whole pipeline folder
            path = hub.resolve_file(config, [CONFIG_NAME], subfolder=subfolder)
            d, source = hub.read_json(path), str(path)
        for key, neutral in _NEUTRAL_DIFFUSERS_KEYS.items():
            value = d.pop(key, neutral)
            if value != neutral:
                raise ValueError(f"{source}: {key}={value!r} is not supported (only {neutral!r})")
        for key in _IGNORED_DIFFUSERS_KEYS:
            d.pop(key, None)
        cfg = dataclasses.replace(hub.config_from_dict(SchedulerConfig, d, source=source), **overrides)
        return cls(**dataclasses.asdict(cfg))

    def to_dict(self) -> dict:
        """The config as diffusers writes it (JSON-ready), with `_class_name`."""
        return {"_class_name": type(self).__name__, **dataclasses.asdict(self.config)}

    def save_config(self, folder) -> Path:
        """Write `folder/scheduler_config.json` (readable by our and diffusers' `from_config`)."""
        path = Path(folder) / CONFIG_NAME
        hub.write_json_atomic(self.to_dict(), path)
        return path

    # -------------------------------------------------------------------------------------- forward process

    def _timestep_tensor(self, timesteps, device) -> torch.Tensor:
        """Integer timesteps as a LongTensor on `device`; ValueError naming the first out-of-range value."""
        t = torch.as_tensor(timesteps, device=device)
        if t.is_floating_point():
            if not torch.equal(t, t.round()):
                raise ValueError(f"timesteps must be integers, got {t.flatten()[:8].tolist()}")
        elif t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"timesteps must be integers, got dtype {t.dtype}")
        t = t.long()
        T = self.config.num_train_timesteps
        bad = (t < 0) | (t >= T)
        if bad.any():
            raise ValueError(f"timestep {t[bad].flatten()[0].item()} out of range [0, {T - 1}]")
        return t

    def _sqrt_abar(self, timesteps, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t), sqrt(1 - abar_t) computed in float32, shaped [B, 1, ...] to broadcast over `like`."""
        abar = self.alphas_cumprod.to(like.device)[self._timestep_tensor(timesteps, like.device)].flatten()
        shape = (-1,) + (1,) * (like.ndim - 1)
        return abar.sqrt().view(shape).to(like.dtype), (1 - abar).sqrt().view(shape).to(like.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4). x_0, eps: [B, ...]; timesteps: [B]."""
        a, b = self._sqrt_abar(timesteps, original_samples)
        return a * original_samples + b * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022), the target for "v_prediction"."""
        a, b = self._sqrt_abar(timesteps, sample)
        return a * noise - b * sample

    def snr(self, timesteps) -> torch.Tensor:
        """SNR(t) = abar_t / (1 - abar_t), float32, shaped and placed like `timesteps` (min-SNR weighting)."""
        device = timesteps.device if isinstance(timesteps, torch.Tensor) else None
        abar = self.alphas_cumprod.to(device)[self._timestep_tensor(timesteps, device)]
        return abar / (1 - abar)

    # -------------------------------------------------------------------------------------- reverse process

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        """Choose the N timesteps to sample: `self.timesteps`, a descending LongTensor [N] on `device`."""
        grid = timestep_grid(self.config, num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        self._grid = grid.tolist()
        self.timesteps = grid.to(device)

    def _step_timestep(self, timestep) -> int:
        """The current timestep of `step` as an int in [0, T-1] (one timestep for the whole batch)."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}.step called before set_timesteps(num_inference_steps)")
        if isinstance(timestep, torch.Tensor) and timestep.numel() != 1:
            raise ValueError(f"step takes one timestep for the batch, got shape {tuple(timestep.shape)}")
        return int(self._timestep_tensor(timestep, "cpu").item())

    def _abar(self, t: int) -> torch.Tensor:
        """abar_t as a 0-d float32 CPU tensor (it takes the dtype and device of the tensor it multiplies)."""
        return self.alphas_cumprod[t]

    def _predict_x0_eps(self, model_output: torch.Tensor, sample: torch.Tensor, abar_t: torch.Tensor):
        """The model's x_0 and eps estimates from its output, any prediction_type (x_0 clipped if asked)."""
        a, b = abar_t**0.5, (1 - abar_t) ** 0.5
        kind = self.config.prediction_type
        if kind == "epsilon":  # invert x_t = a x_0 + b eps (DDPM eq. 15)
            x0, eps = (sample - b * model_output) / a, model_output
        elif kind == "v_prediction":  # v = a eps - b x_0 and x_t = a x_0 + b eps, with a^2 + b^2 = 1
            x0, eps = a * sample - b * model_output, a * model_output + b * sample
        else:  # "sample"
            x0, eps = model_output, (sample - a * model_output) / b
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0, eps

    @staticmethod
    def _noise(like: torch.Tensor, generator, variance_noise) -> torch.Tensor:
        """Standard normal noise shaped like `like`: `variance_noise` if given, else drawn from `generator`
        (on the generator's device, then moved, as diffusers' randn_tensor; a list means one per sample)."""
        if variance_noise is not None:
            if variance_noise.shape != like.shape:
                raise ValueError(f"variance_noise shape {tuple(variance_noise.shape)} != {tuple(like.shape)}")
            return variance_noise.to(like.device, like.dtype)
        if isinstance(generator, (list, tuple)):
            if len(generator) != like.shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {like.shape[0]}")
            shape = like.shape[1:]
            draws = [torch.randn(shape, generator=g, device=g.device, dtype=like.dtype) for g in generator]
            return torch.stack(draws).to(like.device)
        device = generator.device if generator is not None else like.device
        return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)
