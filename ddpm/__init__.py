"""Diffusion schedulers as plain tensor math: the noise schedule (schedule.py), DDPM and DDIM steps (sampler.py).

    from ddpm import DDIMScheduler
    s = DDIMScheduler()                   # Stable Diffusion v1 schedule
    x_t = s.add_noise(x0, noise, t)       # training: the forward process
    s.set_timesteps(50)                   # sampling: 981, 961, ..., 1
    for t in s.timesteps:
        x = s.step(unet(x, t, c), t, x).prev_sample
"""

from ddpm.sampler import DDIMScheduler, DDPMScheduler, StepOutput
from ddpm.schedule import NoiseScheduler, SchedulerConfig

__all__ = ["DDIMScheduler", "DDPMScheduler", "NoiseScheduler", "SchedulerConfig", "StepOutput"]
