"""The sampling loop of DiNO-Diffusion, written once (used by train.py's sample grids, sample.py, tests).

Generation is the reverse diffusion process in the VAE's latent space (Rombach et al. 2022): start from
Gaussian noise z_T, let the UNet predict the noise at each timestep of the scheduler's (DDIM or DDPM) grid,
step to z_{t-1}, and decode the final latent with the frozen VAE. The UNet is conditioned by cross-attention
on c_GLB, the DINO global tokens of a real image (reconstruction) or a blend of two (interpolation).

Classifier-free guidance (Ho & Salimans 2022; beyond the paper, which samples with w = 1):
    eps = eps_uncond + w * (eps_cond - eps_uncond),
where eps_uncond uses the null condition the model was trained with under condition dropout (zeros here).

Every sample can have its own seed: its initial noise (and, for stochastic samplers, its per-step noise)
comes from its own torch.Generator, so sample i of a batch is the same image whatever the batch size.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from ddpm import DDIMScheduler


def slerp(a: torch.Tensor, b: torch.Tensor, r: float) -> torch.Tensor:
    """Spherical interpolation between token sets a, b [..., D] per token, fraction r in [0, 1].

    Interpolates direction on the sphere and norm linearly; falls back to lerp for (anti)parallel vectors.
    """
    a32, b32 = a.float(), b.float()
    na, nb = a32.norm(dim=-1, keepdim=True), b32.norm(dim=-1, keepdim=True)
    ua, ub = a32 / na.clamp_min(1e-12), b32 / nb.clamp_min(1e-12)
    dot = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(dot)
    so = torch.sin(omega)
    near = so.abs() < 1e-6
    wa = torch.where(near, 1.0 - r, torch.sin((1.0 - r) * omega) / so.where(~near, torch.ones_like(so)))
    wb = torch.where(near, torch.full_like(so, r), torch.sin(r * omega) / so.where(~near, torch.ones_like(so)))
    direction = wa * ua + wb * ub
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (direction * ((1.0 - r) * na + r * nb)).to(a.dtype)


def lerp(a: torch.Tensor, b: torch.Tensor, r: float) -> torch.Tensor:
    """Linear interpolation c = (1 - r) a + r b (the paper's interpolation, Sec. 2.3)."""
    return torch.lerp(a, b, float(r))


def interpolate(a: torch.Tensor, b: torch.Tensor, r: float, method: str = "lerp") -> torch.Tensor:
    if not 0.0 <= float(r) <= 1.0 or math.isnan(float(r)):
        raise ValueError(f"interpolation fraction r must be in [0, 1], got {r}")
    if method == "lerp":
        return lerp(a, b, r)
    if method == "slerp":
        return slerp(a, b, r)
    raise ValueError(f"unknown interpolation method {method!r} (expected 'lerp' or 'slerp')")


def _generators(seeds, device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _randn(shape, gens, device, dtype=torch.float32) -> torch.Tensor:
    """One standard-normal draw per sample, each from its own generator: [len(gens), *shape]."""
    return torch.stack([torch.randn(shape, generator=g, device=device, dtype=dtype) for g in gens])


def latent_shape(unet, vae, height: int, width: int) -> tuple[int, int, int]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if height % factor or width % factor:
        raise ValueError(f"image size {height}x{width} must be a multiple of the VAE factor {factor}")
    return (unet.config.in_channels, height // factor, width // factor)


@torch.no_grad()
def generate(
    unet,
    vae,
    scheduler,
    context: torch.Tensor,
    *,
    seeds=None,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int = 50,
    eta: float = 0.0,
    guidance: float = 1.0,
    uncond_context: torch.Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Sample images conditioned on `context` [B, G, D]; returns decoded images [B, C, H, W] in [0, 1].

    Noise comes from `seeds` (one int per sample; preferred: each sample reproducible on its own), else from
    `generator`, else from explicit `latents` [B, 4, h, w]. `scheduler` is a DDIMScheduler (eta used) or
    a DDPMScheduler. `guidance` > 1 needs a model trained with condition dropout; its null condition is
    `uncond_context` (default zeros like `context`).
    """
    device = next(unet.parameters()).device
    b = context.shape[0]
    context = context.to(device=device, dtype=torch.float32)
    if latents is None:
        size = height or unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        shape = latent_shape(unet, vae, size, width or size)
        if seeds is not None:
            if len(seeds) != b:
                raise ValueError(f"got {len(seeds)} seeds for a batch of {b} conditions")
            gens = _generators(seeds, device)
            latents = _randn(shape, gens, device)
        else:
            gens = None
            latents = torch.randn((b, *shape), generator=generator, device=device)
    else:
        gens = _generators(seeds, device) if seeds is not None else None
        latents = latents.to(device=device, dtype=torch.float32)
    if guidance != 1.0:
        uncond = torch.zeros_like(context) if uncond_context is None else uncond_context.to(context)
        context = torch.cat([uncond.expand_as(context), context])

    scheduler.set_timesteps(steps, device=device)
    use_amp = autocast_dtype is not None and autocast_dtype != torch.float32
    amp = torch.autocast(device.type, dtype=autocast_dtype) if use_amp else nullcontext()
    is_ddim = isinstance(scheduler, DDIMScheduler)
    step_kwargs = {"eta": eta} if is_ddim else {}
    needs_noise = gens is not None and not (is_ddim and eta == 0)
    for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
        x_in = torch.cat([latents, latents]) if guidance != 1.0 else latents
        with amp:
            eps = unet(x_in, t, context).float()
        if guidance != 1.0:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        noise = _randn(latents.shape[1:], gens, device) if needs_noise else None
        out = scheduler.step(eps, t, latents, generator=generator, variance_noise=noise, **step_kwargs)
        latents = out.prev_sample
    return decode_latents(vae, latents)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """UNet-space latents -> images in [0, 1]. Decoding runs in float32 (precision policy)."""
    z = latents.float() / vae.config.scaling_factor
    with torch.autocast(latents.device.type, enabled=False):
        x = vae.decode(z.to(next(vae.parameters()).dtype)).float()
    return ((x + 1) / 2).clamp(0, 1)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, *, sample: bool = False, generator=None) -> torch.Tensor:
    """Images [B, 1 or 3, H, W] in [0, 1] -> UNet-space latents (posterior mean or sample) * scaling_factor."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    x = images.to(next(vae.parameters()).dtype) * 2 - 1
    post = vae.encode(x)
    z = post.sample(generator) if sample else post.mode()
    return z.float() * vae.config.scaling_factor


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] (channel mean: a CXR decoded by an RGB VAE is gray up to noise)."""
    return images.mean(dim=1, keepdim=True) if images.shape[1] == 3 else images
