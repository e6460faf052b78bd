"""Train DiNO-Diffusion: a latent diffusion UNet conditioned on the DINO global tokens of the same image.

For each training image x (DiNO-Diffusion, Sec. 2):
    c  = c_GLB(x)                      frozen DINO ViT: [CLS, pooler?, registers], patch tokens excluded
    z0 = VAE.encode(x).sample() * 0.18215                   frozen SD v1 VAE (scaling factor: SD v1 config)
    t ~ U{0..999},  eps ~ N(0, I),  x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps      (Ho et al. 2020, eq. 4)
    loss = || eps - UNet(x_t, t, c) ||^2                                              (Ho et al. 2020, eq. 14)
(`diffusion_loss`, which also takes the v / x0 targets and min-SNR weighting). No labels or reports are used:
the image conditions on itself, so the model learns p(image | its own DINO summary), which later allows
reconstruction (new noise, same c) and interpolation (blended c).

Runs as `python train.py` or `torchrun --nproc_per_node N train.py` (DDP: NCCL on GPU, gloo on CPU). Every
sample's noise, timestep and augmentation come from generators keyed by (seed, step, global position), so
N ranks with batch B train like one process with batch N*B, and a resumed run continues exactly like an
uninterrupted one. Presets (train_config.py): `tiny` (CPU, random-init small models, phantom CXRs),
`small-real` (real CXRs on CPU), `sd15-dinov1` and `sd15-dinov2` (the paper's setting, Sec. 3).
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

import checkpoint
import cli
import distributed
import hub
import pipeline
from data.loader import make_batches, seeded, split_data, stream_state, write_image_list
from ddpm import DDPMScheduler
from eval.training import evaluate, fid_extractor
from train_config import PRESETS, TrainConfig, parse_flags, prepare_run_dir  # noqa: F401 (PRESETS: bench/)
from vae import AutoencoderKL
from vae.fit import fit_vae
from vit_dino import DinoViT

# ---------------------------------------------------------------------------------------------- objective


def diffusion_loss(forward, scheduler, z0, c, t, eps, min_snr_gamma: float, amp_dtype) -> torch.Tensor:
    """Per-sample denoising loss (Ho et al. 2020, eq. 14), for the scheduler's prediction type:
        x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps                                      (eq. 4)
        target = eps | v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0 (Salimans & Ho 2022) | z0
    Min-SNR weighting (Hang et al. 2023, eq. 8) w = min(SNR, gamma) / SNR in epsilon units: divided by SNR
    for eps targets, by SNR + 1 for v, not at all for z0 (the three losses differ by those factors)."""
    kind = scheduler.config.prediction_type
    x_t = scheduler.add_noise(z0, eps, t)
    target = scheduler.get_velocity(z0, eps, t) if kind == "v_prediction" else {"epsilon": eps, "sample": z0}[kind]
    with torch.autocast(z0.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        pred = forward(x_t, t, c)
    loss = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma > 0:
        snr = scheduler.snr(t)
        clipped = snr.clamp(max=min_snr_gamma)
        loss = loss * {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[kind]
    return loss


# ---------------------------------------------------------------------------------------------- main


def main(argv=None):
    cfg, given = parse_flags(argv)
    rank, world, device = distributed.init(None)  # torchrun: DDP (NCCL on GPU, gloo on CPU)
    out = Path(cfg.out)
    if rank == 0:
        cfg = prepare_run_dir(cfg, given, out)
    if world > 1:  # every rank runs the config rank 0 settled on
        box = [asdict(cfg)]
        dist.broadcast_object_list(box)
        cfg = TrainConfig(**box[0])

    # ------------------------------------------------------------------ data and models
    train_set, val_set = split_data(cfg, rank, world)
    if cfg.cache_latents and not hasattr(train_set, "__len__"):
        raise ValueError(f"--cache-latents: --data {cfg.data} is .tar shards, which are streamed, not cached; "
                         "use --no-cache-latents, or a folder or CSV --data")
    if len(val_set) < 2:
        raise ValueError(f"FID needs at least 2 readable held-out images, {len(val_set)} remain: raise --val-count")
    torch.manual_seed(cfg.seed)
    vae = pipeline.build_vae(cfg.vae, cfg.vae_config, cfg.vae_subfolder).to(device)
    dino = pipeline.freeze(pipeline.build_dino(cfg.dino, cfg.dino_config).to(device))
    unet = pipeline.build_unet(cfg.unet, cfg.unet_config, cfg.unet_subfolder).to(device)
    if dino.config.hidden_size != unet.config.cross_attention_dim:
        raise ValueError(f"DINO width {dino.config.hidden_size} != UNet cross_attention_dim "
                         f"{unet.config.cross_attention_dim}: choose matching --dino / --unet-config")
    if rank == 0:
        hub.write_json_atomic(asdict(cfg) | {"unet_config_resolved": asdict(unet.config)}, out / "config.json")
        write_image_list(val_set, out / "val.csv")
        if not cfg.dino and not (out / "dino").is_dir():
            pipeline.save_local(dino, out / "dino")
        if not cfg.vae and not (out / "vae").is_dir():
            if cfg.vae_fit_steps:
                fit_vae(vae, train_set, cfg, device)
            pipeline.save_local(vae, out / "vae")
    distributed.barrier()
    if not cfg.vae:  # random-init frozen models: every rank uses them exactly as saved in the run folder
        vae = AutoencoderKL.from_pretrained(out / "vae", device=device)
    if not cfg.dino:
        dino = DinoViT.from_pretrained(out / "dino", device=device)
    train_loop(cfg, unet, pipeline.freeze(vae), pipeline.freeze(dino), DDPMScheduler.from_config(cfg.scheduler),
               train_set, val_set, out, device, rank, world)
    distributed.close()


def prepare(cfg: TrainConfig, unet, out: Path, device, ddp: bool):
    """DDP wrapper, optimizer, GradScaler, EMA copy and lr schedule, restored from the newest readable
    checkpoint. Returns (model, optimizer, scaler, ema, lr schedule, step, checkpoint metadata)."""
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ddp_ids = [device.index] if device.type == "cuda" else None
    model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=ddp_ids) if ddp else unet
    if cfg.optimizer == "adamw8bit":  # without bitsandbytes: "No module named 'bitsandbytes'", one line
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(unet.parameters(), lr=cfg.lr)
    else:
        optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr)  # weight decay 1e-2: both classes' default
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    ema = pipeline.freeze(copy.deepcopy(unet)).float() if cfg.ema_decay > 0 else None
    step, meta = checkpoint.load_newest(out, unet, ema, optimizer, scaler)
    for group in optimizer.param_groups:  # the lr may change on resume: LambdaLR scales `initial_lr`
        group["lr"] = group["initial_lr"] = cfg.lr
    # linear warmup; LambdaLR counts from 0 at construction: offset by the resumed step
    warmup = lambda s: min(1.0, (s + step + 1) / max(cfg.warmup_steps, 1))
    return model, optimizer, scaler, ema, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup), step, meta


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, max_decay: float):
    """EMA of the weights, kept as a float32 copy of the module (diffusers' EMA warmup, formulas.md)."""
    decay = min(max_decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().float(), 1 - decay)


def stop_if_nonfinite(bad: list[bool], checked: int, step: int, out: Path):
    """The loss or gradient norm went non-finite since step `checked`: stop, naming what can be resumed."""
    if not any(bad):
        return
    done = checkpoint.complete_steps(out)
    newest = (f"The newest checkpoint, step {done[-1]} ({checkpoint.paths(out, done[-1])['weights']}), was saved "
              f"after a finite-loss check at that step (loss and gradient norm): resume from it" if done
              else "No checkpoint was saved yet: rerun")
    when = f"at step {step}" if checked + 1 == step else f"between step {checked + 1} and step {step}"
    cli.fail(f"non-finite {'loss' if bad[0] else 'gradient norm'} {when}; stopped without saving. "
             f"{newest} with a lower --lr (or --mixed-precision bf16/no)")


def encoder(vae, dino, device):
    """Images [B, 1 or 3 (--channels), S, S] in [0, 1] -> (VAE posterior mean, std, c_GLB): what a latent is
    made of."""

    @torch.no_grad()
    def encode(x):
        x = x.to(device)
        post = vae.encode(x.expand(-1, 3, -1, -1) * 2 - 1)
        return post.mean, post.std, pipeline.condition(dino, x)

    return encode


def noisy_batch(cfg, batches, encode, scaling_factor: float, num_timesteps: int, micro: int, device):
    """Micro-batch `micro` of this rank: z0 = posterior sample * scaling factor (0.18215 for SD v1), its
    c_GLB (zeroed with probability --cond-dropout), a timestep and noise. Every random draw is made for the
    whole global batch from a generator keyed by (seed, purpose, micro-step) and this rank takes its
    positions, so N ranks == one process and a resume == no interruption."""

    def keyed(shape, purpose):
        full = torch.randn((batches.global_batch, *shape), generator=seeded(cfg.seed, purpose, micro))
        return full[batches.positions].to(device)

    batch = batches.next()
    mean, std, c = (t.to(device) for t in batch) if cfg.cache_latents else encode(batch)
    z0 = (mean + std * keyed(mean.shape[1:], 103)) * scaling_factor
    g = seeded(cfg.seed, 200, micro)
    t = torch.randint(0, num_timesteps, (batches.global_batch,), generator=g)
    drop = torch.rand(batches.global_batch, generator=g) < cfg.cond_dropout
    t, drop = t[batches.positions].to(device), drop[batches.positions].to(device)
    return z0, torch.where(drop[:, None, None], torch.zeros_like(c), c), t, keyed(z0.shape[1:], 104)


def log_step(out: Path, rec: dict, seen: int, t0: float, device):
    rec["img_per_s"] = seen / (time.time() - t0)
    if device.type == "cuda":
        rec["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def apply_gradients(unet, optimizer, scaler, lr_sched, nonfinite) -> torch.Tensor:
    """Clip to the global L2 norm 1 (diffusers' train_text_to_image default), step (through fp16's GradScaler
    when on), schedule the lr. A non-finite gradient norm is flagged in `nonfinite[1]`: with a finite loss it
    would still ruin the weights (the GradScaler skips such steps itself). Returns the gradient norm (a tensor:
    no host sync)."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    if not scaler.is_enabled():
        nonfinite[1] |= ~torch.isfinite(grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    lr_sched.step()
    return grad_norm


def train_loop(cfg, unet, vae, dino, scheduler, train_set, val_set, out, device, rank, world):
    master, ddp, amp_dtype = rank == 0, world > 1, pipeline.AUTOCAST[cfg.mixed_precision]
    model, optimizer, scaler, ema, lr_sched, step, meta = prepare(cfg, unet, out, device, ddp)
    forward = torch.compile(model) if cfg.compile else model
    if master:
        checkpoint.truncate_metrics(out, step)
        print(f"resumed from step {step} of {out}" if step else f"training {out}", file=sys.stderr)
    if step >= cfg.max_steps:
        cli.fail(f"{out} is at step {step}, not before --max-steps {cfg.max_steps}: raise --max-steps to go on")
    encode = encoder(vae, dino, device)
    batches = make_batches(cfg, train_set, encode, out, rank, world, meta)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not master)
    t0, seen, held_out = time.time(), 0, None  # held_out: (images [N, C, S, S], FID network), built once
    checked = step  # the last step whose loss was checked finite (a host sync: only at log/save/eval steps)
    nonfinite = torch.zeros(2, dtype=torch.bool, device=device)  # [loss, gradient norm] since the last check
    while step < cfg.max_steps:
        losses = []
        for k in range(cfg.grad_accum):
            micro = step * cfg.grad_accum + k
            z0, c, t, eps = noisy_batch(cfg, batches, encode, vae.config.scaling_factor,
                                        scheduler.config.num_train_timesteps, micro, device)
            with contextlib.nullcontext() if not ddp or k == cfg.grad_accum - 1 else model.no_sync():
                loss = diffusion_loss(forward, scheduler, z0, c, t, eps, cfg.min_snr_gamma, amp_dtype).mean()
                scaler.scale(loss / cfg.grad_accum).backward()
            losses.append(loss.detach())
        nonfinite[0] |= ~torch.isfinite(torch.stack(losses)).all()
        grad_norm = apply_gradients(unet, optimizer, scaler, lr_sched, nonfinite)
        step, seen = step + 1, seen + batches.global_batch * cfg.grad_accum
        if ema is not None:
            ema_update(ema, unet, step, cfg.ema_decay)
        bar.update(1)
        last = step == cfg.max_steps
        logging, saving = last or step % cfg.log_every == 0, last or step % cfg.save_every == 0
        evaluating = last or (cfg.eval_every and step % cfg.eval_every == 0)
        if not (logging or saving or evaluating):
            continue
        stats = torch.cat([torch.stack(losses).mean()[None], nonfinite.float()])
        if ddp:
            dist.all_reduce(stats)
        stop_if_nonfinite((stats[1:] > 0).tolist(), checked, step, out)
        checked, loss_value = step, stats[0].item() / world
        if master and logging:
            log_step(out, {"step": step, "loss": loss_value, "lr": lr_sched.get_last_lr()[0],
                           "grad_norm": grad_norm.item()}, seen, t0, device)
            bar.set_postfix(loss=f"{loss_value:.4f}")
        position = stream_state(batches, cfg, world) if saving else None  # every rank takes part
        if master and saving:
            checkpoint.save(out, step, model_state=unet.state_dict(), ema_state=ema and ema.state_dict(),
                            optimizer=optimizer, scaler=scaler,
                            extra={"micro_step": step * cfg.grad_accum, "stream": position})
            checkpoint.prune(out, cfg.keep_last)
        if evaluating and master:
            held_out = held_out or held_out_set(cfg, val_set, device)
            evaluate(ema if ema is not None else unet, vae, dino, *held_out, cfg, step, out, device)
            unet.train()
        if evaluating:
            distributed.barrier()
    bar.close()


def held_out_set(cfg, val_set, device):
    """(held-out images [N, 1, S, S], the FID network calibrated on them): built at the first evaluation."""
    real = torch.stack([val_set[i]["image"] for i in range(min(cfg.fid_count, len(val_set)))])
    return real, fid_extractor(cfg, real[:512], device)  # BatchNorm calibration: a few hundred images do


if __name__ == "__main__":
    cli.main_guard(main)
