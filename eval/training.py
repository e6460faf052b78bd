"""What a training run measures as it goes: FID against held-out images, and a sample grid.

At every `--eval-every` step `train.py` reconstructs the held-out images (new noise, each image's own
c_GLB, DDIM with the EMA weights), writes `samples/step_N.png` (held-out row above generated row) and logs
the FID between the two sets in `metrics.jsonl`. The FID network is the paper's XRV DenseNet-121 when
`--fid-weights` gives its weights; offline it is a random-init one whose BatchNorm statistics come from the
held-out images, so FIDs are comparable within a run only. Colour runs (`--channels 3`) keep RGB samples and
use Inception features (XRV's are CXR-only): pytorch-fid's with `--fid-weights`, offline a random-init
Inception-v3 (or, `--fid-random-init tiny`, a tiny 3-channel DenseNet), BatchNorm-calibrated the same way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from eval.densenet import DenseNet121, DenseNetConfig, XRVDenseNetFeatures, calibrate_batchnorm
from eval.fid import fid, load_extractor
from eval.figures import caption_grid
from eval.inception import InceptionV3Features
from generate import generate, to_grayscale
from pipeline import condition, make_scheduler


def fid_extractor(cfg, reference: torch.Tensor, device=None):
    """The FID network (module docstring): pretrained with --fid-weights, else random-init (seed 0) with its
    BatchNorm statistics set from the held-out `reference` images; `--fid-random-init tiny` takes a tiny
    DenseNet at the run's own resolution to stay fast on CPU."""
    if cfg.fid_weights:
        return load_extractor(cfg.fid_features, cfg.fid_weights, device)
    torch.manual_seed(0)
    if cfg.fid_features == "inception" and cfg.fid_random_init == "tiny":
        features = TinyRGBFeatures(DenseNet121(DenseNetConfig.tiny(in_channels=3)), cfg.image_size)
    elif cfg.fid_features == "inception":
        features = InceptionV3Features(name="inception-random-init")
    elif cfg.fid_random_init == "tiny":
        net = DenseNet121(DenseNetConfig.tiny(in_channels=1))
        features = XRVDenseNetFeatures(net, name="xrv-tiny-random-init", resolution=cfg.image_size)
    else:
        features = XRVDenseNetFeatures(name="xrv-random-init")
    batch_size = max(2, cfg.batch_size)  # BatchNorm in train mode needs 2+ images in every batch, the last too
    while len(reference) % batch_size == 1:
        batch_size += 1
    return calibrate_batchnorm(features, reference, batch_size).eval()


class TinyRGBFeatures(torch.nn.Module):
    """Offline colour FID features for the tiny preset: a random-init 3-channel DenseNet at the run's own
    resolution, images in [0, 1] -> 2x - 1 -> pooled trunk features [B, F] (the XRV wrapper is grey-only)."""

    name, in_channels = "rgb-tiny-random-init", 3

    def __init__(self, net: DenseNet121, resolution: int):
        super().__init__()
        self.net, self.resolution, self.feature_dim = net, resolution, net.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True)
        return self.net.pooled_features(2 * x - 1)


@torch.no_grad()
def evaluate(unet, vae, dino, real, extractor, cfg, step: int, out: Path, device):
    """Sample grid (held-out images `real` above their reconstructions) and FID against them (`extractor`).
    `unet`: the weights to evaluate (the EMA copy when EMA is on)."""
    unet.eval()
    n = len(real)
    fake, sched = [], make_scheduler({"scheduler": cfg.scheduler}, "ddim")
    for i in range(0, n, cfg.batch_size):
        x = real[i : i + cfg.batch_size].to(device)
        imgs = generate(unet, vae, sched, condition(dino, x), seeds=list(range(i, i + len(x))),
                        height=cfg.image_size, width=cfg.image_size, steps=cfg.sample_steps)
        fake.append((imgs if cfg.channels == 3 else to_grayscale(imgs)).cpu())
    fake = torch.cat(fake)
    k = min(cfg.grid_images, n)
    grid = caption_grid([list(real[:k]), list(fake[:k])], row_labels=["real (held out)", "generated"],
                        title=f"step {step}: held-out images and reconstructions from their c_GLB")
    (out / "samples").mkdir(exist_ok=True)
    grid.save(out / "samples" / f"step_{step:07d}.png")
    score = fid(real, fake, features=extractor, batch_size=cfg.batch_size, device=device, progress=False,
                cache=out / "fid_reference.npz")
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "fid": score, "fid_features": cfg.fid_features,
                            "fid_network": extractor.name, "fid_n": n}) + "\n")
    print(f"step {step}: FID ({cfg.fid_features}, n={n}) = {score:.3f}", file=sys.stderr)
