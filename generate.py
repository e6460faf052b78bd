"""The sampling loop of DiNO-Diffusion, written once (used by train.py's sample grids, sample.py, tests).

Generation is the reverse diffusion process in the VAE's latent space (Rombach et al. 2022): start from
Gaussian noise z_T, let the UNet predict the noise at each timestep of the scheduler's (DDIM or DDPM) grid,
step to z_{t-1}, and decode the final latent with the frozen VAE. The UNet is conditioned by cross-attention
on c_GLB, the DINO global tokens of a real image (reconstruction) or a blend of two (interpolation).

Classifier-free guidance (Ho & Salimans 2022; beyond the paper, which samples with w = 1):
    eps = eps_uncond + w * (eps_cond - eps_uncond),
where eps_uncond uses the null condition the model was trained with under condition dropout (zeros here).

Every sample can have its own seed: its initial noise (and, for the DDPM sampler, its per-step noise) comes
from its own torch.Generator, so sample i of a batch is the same image whatever the batch size.
"""

from __future__ import annotations

import torch


def slerp(a: torch.Tensor, b: torch.Tensor, r: float) -> torch.Tensor:
    """Spherical interpolation between token sets a, b [..., D] per token, fraction r in [0, 1]: the direction
    moves along the great circle, the norm linearly; (anti)parallel tokens (sin omega < 1e-6) move linearly."""
    a32, b32 = a.float(), b.float()
    na, nb = a32.norm(dim=-1, keepdim=True), b32.norm(dim=-1, keepdim=True)
    ua, ub = a32 / na.clamp_min(1e-12), b32 / nb.clamp_min(1e-12)  # 1e-12: guards a zero token
    omega = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0))
    so = torch.sin(omega)
    near = so.abs() < 1e-6
    so = so.where(~near, torch.ones_like(so))
    wa = torch.where(near, 1.0 - r, torch.sin((1.0 - r) * omega) / so)
    wb = torch.where(near, torch.full_like(so, r), torch.sin(r * omega) / so)
    direction = wa * ua + wb * ub
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (direction * ((1.0 - r) * na + r * nb)).to(a.dtype)


def interpolate(a: torch.Tensor, b: torch.Tensor, r: float, method: str = "lerp") -> torch.Tensor:
    """c = (1 - r) a + r b (lerp, the paper's interpolation, Sec. 2.3) or `slerp`, for r in [0, 1]."""
    if not 0.0 <= float(r) <= 1.0:  # NaN too
        raise ValueError(f"interpolation fraction r must be in [0, 1], got {r}")
    return {"lerp": torch.lerp, "slerp": slerp}[method](a, b, float(r))


@torch.no_grad()
def generate(unet, vae, scheduler, context: torch.Tensor, *, seeds=None, latents: torch.Tensor | None = None,
             height: int | None = None, width: int | None = None, steps: int = 50, guidance: float = 1.0,
             autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sample images conditioned on `context` [B, G, D]; returns decoded images [B, C, H, W] in [0, 1].

    The initial noise is `latents` [B, 4, h, w] when given, else drawn from `seeds` (one int per sample, each
    sample reproducible on its own), which also feed the DDPM sampler's per-step noise. `scheduler`: a
    DDIMScheduler (deterministic, eta = 0, the paper's) or a DDPMScheduler. `guidance` > 1 needs a model
    trained with condition dropout; its null condition is zeros.
    """
    device = next(unet.parameters()).device
    context = context.to(device=device, dtype=torch.float32)
    gens = None if seeds is None else [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    if gens is not None and len(gens) != len(context):
        raise ValueError(f"got {len(gens)} seeds for a batch of {len(context)} conditions")
    if latents is None:
        if gens is None:
            raise ValueError("generate needs seeds= or latents=")
        factor = vae.config.downsample_factor
        height = height or unet.config.sample_size * factor
        width = width or height
        if height % factor or width % factor:
            raise ValueError(f"image size {height}x{width} must be a multiple of the VAE factor {factor}")
        shape = (unet.config.in_channels, height // factor, width // factor)
        latents = torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])
    latents = latents.to(device=device, dtype=torch.float32)
    if guidance != 1.0:  # one batch [null condition; condition]
        context = torch.cat([torch.zeros_like(context), context])
    scheduler.set_timesteps(steps, device=device)
    amp = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype not in (None, torch.float32))
    for t in scheduler.timesteps:
        with amp:
            eps = unet(torch.cat([latents, latents]) if guidance != 1.0 else latents, t, context).float()
        if guidance != 1.0:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents, generator=gens).prev_sample
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
    post = vae.encode(images.expand(-1, 3, -1, -1).to(next(vae.parameters()).dtype) * 2 - 1)
    return (post.sample(generator) if sample else post.mode()).float() * vae.config.scaling_factor


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] (channel mean: a CXR decoded by an RGB VAE is gray up to noise)."""
    return images.mean(dim=1, keepdim=True) if images.shape[1] == 3 else images
