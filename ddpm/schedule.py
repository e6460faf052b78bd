"""The noise schedule and the forward process: betas, abar_t, add_noise, v, and the timesteps a sampler visits.

Diffusion (Ho et al. 2020, "DDPM") destroys data x_0 in T small Gaussian steps,
q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I). The schedule beta_1 ... beta_T is the whole model of
the noise: everything else derives from abar_t = prod_{s <= t} (1 - beta_s), which falls from ~1 (clean) to
~0 (pure noise). Stable Diffusion v1 uses T = 1000 and betas linear in sqrt(beta) from 0.00085 to 0.012
("scaled_linear"); the original DDPM is linear in beta.

The T noising steps compose into one closed form (DDPM eq. 4):

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),

so a training example is one line, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with eps ~ N(0, I)
(`add_noise`). The network sees x_t and t and predicts eps ("epsilon", DDPM eq. 14), x_0 ("sample"), or the
velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 ("v_prediction", Salimans & Ho 2022, Sec. 4;
`get_velocity`); each determines the other two given x_t.

Sampling visits only N of the T timesteps (`set_timesteps`, e.g. 50 for DDIM); the steps are in sampler.py.
Conventions follow diffusers so its scheduler_config.json files load as they are: timesteps are 0-based
(t in [0, T-1], abar[0] = 1 - beta_1 is the least noisy) and the defaults are Stable Diffusion v1's schedule.
`alphas_cumprod` is a float32 CPU tensor, moved to the input's device and dtype on use.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

import hub

CONFIG_NAME = "scheduler_config.json"  # diffusers' file name, in the `scheduler/` folder of a pipeline
BETA_SCHEDULES = ("linear", "scaled_linear")  # the two that SD's configs use
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing")
# diffusers options we do not implement. At these values they change nothing and are dropped silently when a
# config is read; any other value would change the numbers, so it is an error.
_NEUTRAL_DIFFUSERS_KEYS = {"thresholding": False, "rescale_betas_zero_snr": False, "trained_betas": None}
# Options that only matter with `thresholding`, or only to PNDM's sampler (SD v1 ships a PNDM config).
_IGNORED_DIFFUSERS_KEYS = ("dynamic_thresholding_ratio", "sample_max_value", "skip_prk_steps")


def _check_choice(name: str, value, allowed: tuple[str, ...]):
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, allowed))}")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The noise schedule and the sampler options. Defaults = Stable Diffusion v1 (its scheduler_config.json;
    LDM's v1-inference.yaml: linear_start 0.00085, linear_end 0.012, 1000 steps, sqrt-linear betas)."""

    num_train_timesteps: int = 1000  # T
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # one of BETA_SCHEDULES, see make_betas
    prediction_type: str = "epsilon"  # what the network predicts: "epsilon", "v_prediction" or "sample" (x_0)
    clip_sample: bool = False  # clamp the predicted x_0 to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0
    steps_offset: int = 1  # added to "leading" timesteps: SD samples t = 981 ... 1, not 980 ... 0
    set_alpha_to_one: bool = False  # DDIM only: abar before t = 0 is 1.0 (True) or abar[0] (False, SD v1)
    timestep_spacing: str = "leading"  # how N of the T timesteps are picked, see timestep_grid
    variance_type: str = "fixed_small"  # DDPM's reverse variance: the posterior's beta~_t, the one implemented

    def __post_init__(self):
        T = self.num_train_timesteps
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {T!r}")
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("variance_type", self.variance_type, ("fixed_small",))
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")


def make_betas(config: SchedulerConfig) -> torch.Tensor:
    """beta_1 ... beta_T as a float32 tensor [T]."""
    T = config.num_train_timesteps
    if config.beta_schedule == "linear":  # DDPM Sec. 4 (there 1e-4 ... 0.02)
        return torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    # "scaled_linear", LDM / SD: linear in sqrt(beta)
    return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32) ** 2


def timestep_grid(config: SchedulerConfig, num_inference_steps: int) -> torch.Tensor:
    """The N timesteps a sampler visits, descending, as a LongTensor [N] (as diffusers spaces them).

    For T = 1000, N = 50: "leading" (DDIM paper, SD) 981, 961, ..., 1 (with steps_offset 1); "trailing" 999,
    979, ..., 19, which starts at the noisiest timestep (Lin et al. 2024, "Common diffusion noise schedules
    and sample steps are flawed", Table 2).
    """
    T, n = config.num_train_timesteps, num_inference_steps
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be an integer in [1, num_train_timesteps={T}], got {n!r}")
    n = int(n)
    if config.timestep_spacing == "leading":  # multiples of T // N, then shifted
        ts = np.arange(n)[::-1] * (T // n) + config.steps_offset
    else:  # "trailing": from T down in float strides T / N (as diffusers), minus 1
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    if ts.max() >= T:  # "leading" shifted by steps_offset past the last timestep
        raise ValueError(f"num_inference_steps={n} with steps_offset={config.steps_offset} would visit timestep "
                         f"{int(ts.max())} >= num_train_timesteps={T}; use fewer steps or timestep_spacing='trailing'")
    return torch.from_numpy(np.ascontiguousarray(ts, dtype=np.int64))


class NoiseScheduler:
    """Base of DDPMScheduler and DDIMScheduler (sampler.py): the schedule, the timestep grid and the forward
    process. `NoiseScheduler(**fields)` takes the SchedulerConfig fields as keywords (defaults = SD v1)."""

    def __init__(self, **config):
        self.config = SchedulerConfig(**config)
        self.betas = make_betas(self.config)  # [T] float32
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # abar_t, [T] float32 on the CPU
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1)  # replaced by set_timesteps
        self._grid: list[int] = []

    def __repr__(self):
        return f"{type(self).__name__}({self.config})"

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
        d = {k: v for k, v in d.items() if k not in _IGNORED_DIFFUSERS_KEYS}
        cfg = hub.config_from_dict(SchedulerConfig, d, source=source, neutral=_NEUTRAL_DIFFUSERS_KEYS)
        return cls(**{**dataclasses.asdict(cfg), **overrides})

    def _timestep_tensor(self, timesteps, device) -> torch.Tensor:
        """Integer timesteps as a LongTensor on `device`; ValueError naming the first out-of-range value."""
        t = torch.as_tensor(timesteps, device=device)
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise ValueError(f"timesteps must be integers, got {t.flatten()[:8].tolist()}")
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

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        """Choose the N timesteps to sample: `self.timesteps`, a descending LongTensor [N] on `device`."""
        grid = timestep_grid(self.config, num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        self._grid = grid.tolist()
        self.timesteps = grid.to(device)
