"""Fit a random-init VAE as an autoencoder, for the offline presets that cannot load SD's.

SD's VAE is pretrained and frozen (DiNO-Diffusion Sec. 2). Without the Hub, the tiny and small-real presets
build a random VAE, so `train.py` first fits it for `--vae-fit-steps` on the training images: L1
reconstruction + a tiny KL term (weight 1e-6, the SD VAE's: LDM's kl-f8 config), then freezes it and sets
its `scaling_factor` so that the latents the UNet sees have unit variance (LDM's `scale_by_std`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data.loader import Batches, KeyedImages, StreamBatches, seeded
from generate import encode_images


def fit_vae(vae, data, cfg, device):
    """Random-init presets only: fit the VAE as an autoencoder (L1 + small KL) so that its latents decode,
    then set its scaling_factor so that the latents have unit variance. `data`: map-style or shards."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    batch_size = cfg.vae_fit_batch_size or cfg.batch_size
    if hasattr(data, "__len__"):
        batches = Batches(KeyedImages(data, cfg.seed, False), batch_size, rank=0, world=1, seed=cfg.seed + 7)
    else:  # this process's shards, unaugmented
        data.augment = False
        batches = StreamBatches(data, batch_size, rank=0, world=1, num_workers=cfg.num_workers)
    for step in tqdm(range(cfg.vae_fit_steps), desc="fit VAE", leave=False):
        x = batches.next().to(device).expand(-1, 3, -1, -1) * 2 - 1
        post = vae.encode(x)
        rec = vae.decode(post.mean + post.std * torch.randn(post.mean.shape, generator=seeded(cfg.seed, 2, step)))
        loss = F.l1_loss(rec, x) + 1e-6 * post.kl().mean()  # KL weight 1e-6: the SD VAE's (LDM kl-f8 config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    # Unit-variance latents, as LDM's `scale_by_std` (Rombach et al. 2022, Sec. 4.3.2: 1 / std of encoded
    # training latents; SD v1's 0.18215 is this number for its VAE). Without it the UNet's noise schedule
    # would see a low-signal latent space (here std ~0.25 at 0.18215).
    if hasattr(data, "__len__"):
        n = min(len(data), 256)
        images = [torch.stack([data[i]["image"] for i in range(j, min(j + 16, n))]) for j in range(0, n, 16)]
    else:
        images = [batches.next() for _ in range(max(1, 256 // batch_size))]
    zs = [encode_images(vae, x.to(device), sample=True, generator=seeded(cfg.seed, 3, 16 * j)).cpu()
          for j, x in enumerate(images)]  # encode_images scales by the current factor f: new f = f / std(f z)
    vae.config = replace(vae.config, scaling_factor=vae.config.scaling_factor / torch.cat(zs).std().item())
    return vae
