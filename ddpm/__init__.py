"""Diffusion schedulers as plain tensor math: the noise schedule, DDPM and DDIM sampling steps.

    from ddpm import DDIMScheduler
    s = DDIMScheduler()                   # Stable Diffusion v1 schedule
    x_t = s.add_noise(x0, noise, t)       # training: the forward process
    s.set_timesteps(50)                   # sampling: 981, 961, ..., 1
    for t in s.timesteps:
        x = s.step(unet(x, t, c), t, x).prev_sample

`python -m ddpm` runs a small demo with an exact noise predictor (no network).
"""

from ddpm.base import CONFIG_NAME, NoiseScheduler, StepOutput
from ddpm.ddim import DDIMScheduler
from ddpm.ddpm import DDPMScheduler
from ddpm.schedules import SchedulerConfig, make_betas, timestep_grid

__all__ = [
    "CONFIG_NAME",
    "DDIMScheduler",
    "DDPMScheduler",
    "NoiseScheduler",
    "SchedulerConfig",
    "StepOutput",
    "make_betas",
    "timestep_grid",
]
