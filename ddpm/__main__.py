"""Demo: sample a toy set of chest "phantoms" with DDIM or DDPM and an exact (oracle) noise predictor.

No network and no download. The data set is K tiny images m_1..m_K, so the best possible noise predictor has a
closed form. With x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps and x_0 uniform over the m_k:

    E[x_0 | x_t] = sum_k softmax_k(-|x_t - sqrt(abar) m_k|^2 / (2 (1 - abar))) m_k
    eps*(x_t, t) = (x_t - sqrt(abar) E[x_0 | x_t]) / sqrt(1 - abar)

A trained UNet approximates eps*; using it exactly puts the sampler alone on display: starting from pure
noise, the predicted x_0 is a blur of all phantoms at first and snaps onto one of them as t goes to 0.

    python -m ddpm [--steps 50] [--scheduler ddim|ddpm] [--eta 0.0] [--num 8] [--size 16] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

from ddpm import DDIMScheduler, DDPMScheduler


def phantoms(size: int) -> torch.Tensor:
    """Four size x size toy chest X-rays in [-1, 1]: bright body, two dark lungs, a heart of varying width."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    ellipse = lambda cx, cy, rx, ry: ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
    images = []
    for heart, lung in [(0.20, 0.30), (0.35, 0.30), (0.20, 0.22), (0.35, 0.22)]:
        img = torch.full((size, size), -1.0)
        img[ellipse(0, 0, 0.9, 1.0)] = 0.6
        img[ellipse(-0.42, -0.05, lung, 0.65) | ellipse(0.42, -0.05, lung, 0.65)] = -0.6
        img[ellipse(0.1, 0.35, heart, 0.25)] = 0.9
        images.append(img)
    return torch.stack(images)[:, None]  # [K, 1, size, size]


def oracle_eps(x_t: torch.Tensor, abar: float, data: torch.Tensor) -> torch.Tensor:
    """The exact E[eps | x_t] for x_0 uniform over `data` [K, ...]; x_t: [B, ...] -> [B, ...]."""
    a, b = abar**0.5, (1 - abar) ** 0.5
    d2 = torch.cdist(x_t.flatten(1), a * data.flatten(1)) ** 2  # [B, K]
    w = torch.softmax(-d2 / (2 * b * b), dim=1)  # posterior over the phantoms
    x0 = (w @ data.flatten(1)).view_as(x_t)
    return (x_t - a * x0) / b


def ascii_image(img: torch.Tensor) -> str:
    ramp = " .:-=+*#%@"
    idx = ((img.clamp(-1, 1) + 1) / 2 * (len(ramp) - 1)).round().long()
    return "\n".join("".join(ramp[i] * 2 for i in row) for row in idx.tolist())


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m ddpm", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50, help="number of sampling steps (default 50)")
    p.add_argument("--scheduler", choices=["ddim", "ddpm"], default="ddim", help="sampler (default ddim)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    p.add_argument("--num", type=int, default=8, help="number of samples (default 8)")
    p.add_argument("--size", type=int, default=16, help="phantom side in pixels (default 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args(argv)

    cls = DDIMScheduler if args.scheduler == "ddim" else DDPMScheduler
    sched = cls()  # the Stable Diffusion v1 schedule
    sched.set_timesteps(args.steps)
    print(f"{sched}\ntimesteps ({len(sched.timesteps)}): {sched.timesteps.tolist()}")

    data = phantoms(args.size)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.num, *data.shape[1:], generator=gen)  # x_T ~ N(0, I)
    kwargs = {"eta": args.eta} if args.scheduler == "ddim" else {}
    print(f"{'step':>4} {'t':>4} {'abar_t':>8}  rms(x0_hat - nearest phantom)")
    every = max(1, len(sched.timesteps) // 50)
    for i, t in enumerate(sched.timesteps):
        eps = oracle_eps(x, sched.alphas_cumprod[t].item(), data)
        out = sched.step(eps, t, x, generator=gen, **kwargs)
        x = out.prev_sample
        err = torch.cdist(out.pred_original_sample.flatten(1), data.flatten(1)).min(1).values / args.size
        if i % every == 0 or i == len(sched.timesteps) - 1:
            print(f"{i:>4} {int(t):>4} {sched.alphas_cumprod[t].item():8.5f}  {err.mean().item():.6f}")

    rms = torch.cdist(x.flatten(1), data.flatten(1)) / args.size  # [B, K]
    print("samples -> nearest phantom (rms):", ", ".join(f"{k}({e:.1e})" for e, k in zip(*rms.min(1))))
    if args.scheduler == "ddim":  # set_alpha_to_one=False (SD v1): the chain ends at t=0, not at x_0
        print(f"(DDIM ends at t=0: residual noise std sqrt(1 - abar[0]) = {(1 - sched.alphas_cumprod[0]) ** 0.5:.3f})")
    print(ascii_image(x[0, 0]))
    return x


if __name__ == "__main__":
    main()
