"""Train DiNO-Diffusion: a latent diffusion UNet conditioned on the DINO global tokens of the same image.

For each training image x (DiNO-Diffusion, Sec. 2):
    c  = c_GLB(x)                      frozen DINO ViT: [CLS, pooler?, registers], patch tokens excluded
    z0 = VAE.encode(x).sample() * 0.18215                   frozen SD v1 VAE (scaling factor: SD v1 config)
    t ~ U{0..999},  eps ~ N(0, I),  x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps      (Ho et al. 2020, eq. 4)
    loss = || eps - UNet(x_t, t, c) ||^2                                              (Ho et al. 2020, eq. 14)
No labels or reports are used: the image conditions on itself, so the model learns p(image | its own DINO
summary), which later allows reconstruction (new noise, same c) and interpolation (blended c).

Runs as `python train.py` or `torchrun --nproc_per_node N train.py` (DDP: NCCL on GPU, gloo on CPU). Every
sample's noise, timestep and augmentation come from generators keyed by (seed, step, global position), so
N ranks with batch B train like one process with batch N*B, and a resumed run continues exactly like an
uninterrupted one. Presets: `tiny` (CPU, random-init small models, phantom CXRs), `sd15-dinov1` and
`sd15-dinov2` (the paper's setting, Sec. 3); every field of a preset can be overridden by its flag.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import checkpoint
import hub
import pipeline
from data.datasets import PhantomDataset, collate, open_dataset
from data.transforms import augment as augment_images
from ddpm import DDPMScheduler
from generate import encode_images, generate, to_grayscale


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "tiny"
    data: str | None = None  # folder / CSV / .tar shards; None = built-in phantom CXRs
    val_data: str | None = None  # held-out images for FID and sample grids; None = split off `data`
    val_group: str | None = None  # CSV --data: hold out whole groups of this column (e.g. patient_id)
    out: str = "runs/tiny"
    image_size: int = 64
    # models: a pretrained source (Hub id / folder / file) or None = random init from the *_config dict
    vae: str | None = None
    vae_subfolder: str | None = None
    vae_config: dict = field(default_factory=dict)
    vae_fit_steps: int = 0  # random-init VAE only: fit it as an autoencoder for N steps, then freeze it
    vae_fit_batch_size: int = 0  # 0 = --batch-size
    unet: str | None = None
    unet_subfolder: str | None = None
    unet_config: dict = field(default_factory=dict)
    dino: str | None = None
    dino_config: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)  # noise schedule; {} = SD v1 (scaled_linear, 1000 steps)
    # optimisation (paper Sec. 3: 8-bit Adam, constant lr 1e-4 after 1000 warmup steps, batch 64 x 2 x 4 GPUs)
    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    mixed_precision: str = "no"
    ema_decay: float = 0.9999
    min_snr_gamma: float = 0.0
    cond_dropout: float = 0.0
    augment: bool = True
    cache_latents: bool = False
    cache_copies: int = 1
    gradient_checkpointing: bool = False
    compile: bool = False
    num_workers: int = 0
    phantom_count: int = 2000
    val_count: int = 32
    seed: int = 0
    resume: bool = False
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 500
    keep_last: int = 3
    fid_count: int = 32
    fid_features: str = "xrv"
    fid_weights: str | None = None
    sample_steps: int = 50
    grid_images: int = 4


HELP = {
    "preset": "starting configuration; every other flag overrides one of its fields",
    "data": "training images: folder / CSV with a path column / .tar shards (default: phantom CXRs)",
    "val_data": "held-out images for FID and sample grids (default: the last --val-count images of --data)",
    "val_group": "CSV --data: hold out whole groups of this column (e.g. patient_id): the last groups in sorted "
                 "order until at least --val-count images",
    "out": "run directory (config.json, checkpoints/, metrics.jsonl, samples/, val.csv: the held-out images)",
    "vae": "pretrained VAE (Hub id / folder / file); unset = random init from --vae-config",
    "vae_config": "JSON dict of VAEConfig fields for a random-init VAE",
    "vae_fit_steps": "random-init VAE only: fit it as an autoencoder for N steps before freezing it",
    "vae_fit_batch_size": "images per VAE-fit step (0 = --batch-size)",
    "unet": "pretrained UNet to start from (paper: SD v1.5); unset = random init from --unet-config",
    "unet_config": "JSON dict of UNetConfig fields for a random-init UNet",
    "dino": "pretrained DINO ViT (facebook/dino-vitb16 or timm/vit_base_patch14_reg4_dinov2.lvd142m)",
    "dino_config": "JSON dict of DinoConfig fields for a random-init ViT",
    "scheduler": "JSON dict of DDPMScheduler arguments (training noise schedule)",
    "batch_size": "images per GPU per micro-step",
    "grad_accum": "micro-steps per optimizer step (gradients synchronised on the last one only)",
    "warmup_steps": "linear lr warmup steps, then constant",
    "max_grad_norm": "gradient clipping (global L2 norm)",
    "optimizer": "adamw | adamw8bit (needs bitsandbytes)",
    "mixed_precision": "no | fp16 (with GradScaler) | bf16: autocast for the UNet",
    "ema_decay": "EMA of the UNet weights, decay min(ema_decay, (1+k)/(10+k)); 0 = off",
    "min_snr_gamma": "min-SNR loss weighting gamma (Hang et al. 2023 use 5); 0 = off",
    "cond_dropout": "probability of a zero condition (enables classifier-free guidance); paper: 0",
    "augment": "paper augmentation: random sharpening + random affine",
    "cache_latents": "encode every image once (VAE mean/std + c_GLB) to OUT/cache and train from the cache",
    "cache_copies": "augmented copies per image in the latent cache (with --augment)",
    "gradient_checkpointing": "recompute UNet activations in backward to save memory",
    "compile": "torch.compile the UNet",
    "phantom_count": "number of built-in phantom training images (when --data is unset)",
    "val_count": "held-out images",
    "resume": "continue from the newest complete checkpoint in --out (same results as no interruption)",
    "eval_every": "FID + sample grid every K steps (0 = only at the end)",
    "save_every": "checkpoint every K steps",
    "keep_last": "keep the newest K checkpoints (0 = all)",
    "fid_count": "held-out images for FID (paper: 5,000)",
    "fid_features": "xrv (XRV DenseNet-121, the paper's) | inception",
    "fid_weights": "feature-extractor weights file; unset = random init (offline: comparable within a run only)",
    "sample_steps": "DDIM steps for evaluation samples",
    "grid_images": "held-out images shown in the sample grid",
}

PRESETS = {
    "tiny": TrainConfig(
        preset="tiny", image_size=64, out="runs/tiny",
        vae_config=dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8),
        vae_fit_steps=200,
        unet_config=dict(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=4,
        ),
        dino_config=dict(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=128, num_register_tokens=2),
        max_steps=500, batch_size=16, lr=1e-3, warmup_steps=50, ema_decay=0.995, save_every=250,
        fid_count=32, sample_steps=25,
    ),
    "sd15-dinov1": TrainConfig(
        preset="sd15-dinov1", image_size=512, out="runs/sd15-dinov1",
        vae="stable-diffusion-v1-5/stable-diffusion-v1-5", vae_subfolder="vae",
        unet="stable-diffusion-v1-5/stable-diffusion-v1-5", unet_subfolder="unet",
        dino="facebook/dino-vitb16",
        max_steps=140_000, batch_size=64, grad_accum=2, lr=1e-4, warmup_steps=1000,
        optimizer="adamw8bit", mixed_precision="bf16", gradient_checkpointing=True, num_workers=8,
        save_every=2500, eval_every=2500, fid_count=5000, keep_last=5,
    ),
}
# Real CXRs on 2 CPU cores in about an hour (docs/results.md): the 243 unlabelled CXRs of ../shared/data, 40+
# held out by patient for FID; random-init models (no Hub offline): a VAE fitted here (f8: 128 px -> 16x16x4
# latents, like SD's 512 -> 64), a small frozen DINOv2-style ViT (CLS + 4 registers) and a 6M-parameter UNet.
PRESETS["small-real"] = TrainConfig(
    preset="small-real", image_size=128, out="runs/small-real",
    data="../shared/data/cxr-unlabeled/index.csv", val_group="patient_id", val_count=40,
    vae_config=dict(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8),
    vae_fit_steps=400, vae_fit_batch_size=8,
    unet_config=dict(
        sample_size=16, block_out_channels=(64, 128, 128), layers_per_block=1, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128,
        attention_head_dim=8,
    ),
    dino_config=dict(image_size=128, patch_size=16, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=512, num_register_tokens=4),
    max_steps=1500, batch_size=32, lr=5e-4, warmup_steps=100, ema_decay=0.999, cache_latents=True,
    cache_copies=4, eval_every=500, save_every=500, fid_count=64, sample_steps=25, grid_images=8,
)
PRESETS["sd15-dinov2"] = replace(PRESETS["sd15-dinov1"], preset="sd15-dinov2", out="runs/sd15-dinov2",
                                 dino="timm/vit_base_patch14_reg4_dinov2.lvd142m")


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(TrainConfig):
        flag, default = "--" + f.name.replace("_", "-"), getattr(PRESETS["tiny"], f.name)
        help_ = HELP.get(f.name, f.name.replace("_", " ")) + f" (tiny: {default})"
        if f.name == "preset":
            p.add_argument(flag, choices=sorted(PRESETS), default="tiny", help=HELP["preset"])
        elif f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif f.type == "dict":
            p.add_argument(flag, type=json.loads, default=None, help=help_)
        else:
            p.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), default=None, help=help_)
    args = vars(p.parse_args(argv))
    base = PRESETS[args.pop("preset")]
    cfg = replace(base, **{k: v for k, v in args.items() if v is not None})
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        p.error(f"--mixed-precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")
    if cfg.optimizer not in ("adamw", "adamw8bit"):
        p.error(f"--optimizer must be adamw or adamw8bit, got {cfg.optimizer!r}")
    return cfg


# ---------------------------------------------------------------------------------------------- data


def seeded(*keys) -> torch.Generator:
    """A CPU generator determined by integer keys (seed, purpose, step, ...): same on every rank/resume."""
    h = 0
    for k in keys:
        h = (h * 1_000_003 + int(k)) % (2**61 - 1)
    return torch.Generator().manual_seed(h)


class KeyedImages(Dataset):
    """Item `key` = image `key % n`, augmented by a generator keyed by (seed, epoch, index): the same
    whichever rank or worker loads it, and after a resume."""

    def __init__(self, dataset, seed: int, augment: bool):
        self.dataset, self.seed, self.augment = dataset, seed, augment

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key: int) -> torch.Tensor:
        epoch, idx = divmod(key, len(self.dataset))
        x = self.dataset[idx]["image"]
        return augment_images(x, seeded(self.seed, 1, epoch, idx)) if self.augment else x


class Batches:
    """Deterministic, rank-split, resumable micro-batches of a map-style dataset.

    Global micro-batch j of epoch e holds positions perm_e[j*N*B : (j+1)*N*B] of a per-epoch permutation;
    rank r takes every N-th position from r, so N ranks with batch B see exactly the samples one process
    with batch N*B sees, in the same global order (`positions`). Starting at micro-batch `start` resumes.
    """

    def __init__(self, dataset, batch_size, *, rank, world, seed, start=0, num_workers=0):
        self.n, self.seed = len(dataset), seed
        self.global_batch = batch_size * world
        self.per_epoch = self.n // self.global_batch
        if self.per_epoch == 0:
            raise ValueError(f"{self.n} training items are fewer than one global batch ({self.global_batch})")
        self.positions = torch.arange(rank, self.global_batch, world)  # this rank's places in the global batch
        self._it = iter(DataLoader(dataset, batch_size=batch_size, sampler=self._keys(start),
                                   num_workers=num_workers, persistent_workers=num_workers > 0))

    def _keys(self, micro: int):
        perm_epoch, perm = -1, None
        while True:
            epoch, j = divmod(micro, self.per_epoch)
            if epoch != perm_epoch:
                perm_epoch, perm = epoch, torch.randperm(self.n, generator=seeded(self.seed, 0, epoch))
            yield from (epoch * self.n + perm[j * self.global_batch + self.positions]).tolist()
            micro += 1

    def next(self):
        return next(self._it)


class StreamBatches:
    """Micro-batches of streamed .tar shards (the dataset splits shards per rank and worker itself).
    Resuming skips the micro-batches already consumed, so the order equals an uninterrupted run's."""

    def __init__(self, dataset, batch_size, *, rank, world, start=0, num_workers=0):
        self.global_batch = batch_size * world
        self.positions = torch.arange(rank, self.global_batch, world)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)

        def stream():
            for epoch in itertools.count():
                dataset.set_epoch(epoch)
                yield from (b["image"] for b in loader)

        self._stream = stream()
        for _ in range(start):
            next(self._stream)

    def next(self):
        return next(self._stream)


def split_data(cfg: TrainConfig, rank: int, world: int):
    """(train, val) datasets: phantoms (disjoint seeds), --val-data, or the last --val-count of --data."""
    if not cfg.data:
        train = open_dataset("phantom", cfg.image_size, phantoms=cfg.phantom_count, seed=cfg.seed)
        val = open_dataset("phantom", cfg.image_size, phantoms=cfg.val_count, seed=cfg.seed + 10_000_000)
        return train, val
    train = open_dataset(cfg.data, cfg.image_size, augment=False, rank=rank, world_size=world, shuffle=True)
    if cfg.val_data:
        return train, open_dataset(cfg.val_data, cfg.image_size)
    if not hasattr(train, "__len__"):
        raise SystemExit("--data is a stream of .tar shards: give held-out images with --val-data")
    n = len(train)
    if n <= cfg.val_count:
        raise SystemExit(f"--data {cfg.data} has {n} images, not more than --val-count {cfg.val_count}")
    if not cfg.val_group:
        return Subset(train, range(n - cfg.val_count)), Subset(train, range(n - cfg.val_count, n))
    groups = getattr(train, "columns", {}).get(cfg.val_group)
    if groups is None:
        raise SystemExit(f"--val-group {cfg.val_group!r}: --data {cfg.data} is not a CSV with that column")
    counts, held = collections.Counter(groups), set()
    for g in sorted(counts, reverse=True):  # whole groups (patients), so none straddles the split
        if sum(counts[h] for h in held) >= cfg.val_count:
            break
        held.add(g)
    val = [i for i, g in enumerate(groups) if g in held]
    train_idx = [i for i, g in enumerate(groups) if g not in held]
    if not train_idx:
        raise SystemExit(f"--val-group {cfg.val_group!r} leaves no training images in {cfg.data}")
    return Subset(train, train_idx), Subset(train, val)


def write_image_list(dataset, path: Path):
    """The held-out images as a CSV with an absolute `path` column (for sample.py / segment.py --images);
    nothing for phantoms, which have no files."""
    base, idx = (dataset.dataset, dataset.indices) if isinstance(dataset, Subset) else (dataset, None)
    paths = getattr(base, "paths", None)
    if paths is None or isinstance(base, PhantomDataset):
        return
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path"])
        w.writerows([str(Path(paths[i]).resolve())] for i in (idx if idx is not None else range(len(paths))))
    os.replace(tmp, path)


class Subset(Dataset):
    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]


# ---------------------------------------------------------------------------------------------- pieces


def ema_update(ema: dict, model: torch.nn.Module, step: int, max_decay: float):
    decay = min(max_decay, (1 + step) / (10 + step))  # diffusers' EMA warmup (formulas.md)
    with torch.no_grad():
        for name, p in model.named_parameters():
            ema[name].lerp_(p.detach().float(), 1 - decay)


def fit_vae(vae, data, cfg: TrainConfig, device):
    """Random-init presets only: fit the VAE as an autoencoder (L1 + small KL) so that its latents decode,
    then set its scaling_factor so that the latents have unit variance."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    batches = Batches(KeyedImages(data, cfg.seed, False), cfg.vae_fit_batch_size or cfg.batch_size, rank=0, world=1,
                      seed=cfg.seed + 7)
    for step in tqdm(range(cfg.vae_fit_steps), desc="fit VAE", leave=False):
        x = batches.next().to(device).expand(-1, 3, -1, -1) * 2 - 1
        post = vae.encode(x)
        rec = vae.decode(post.mean + post.std * torch.randn(post.mean.shape, generator=seeded(cfg.seed, 2, step)))
        loss = F.l1_loss(rec, x) + 1e-6 * post.kl().mean()  # KL weight 1e-6: the SD VAE's (LDM kl-f8 config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae = pipeline.freeze(vae)
    # Unit-variance latents, as LDM's `scale_by_std` (Rombach et al. 2022, Sec. 4.3.2: 1 / std of encoded
    # training latents; SD v1's 0.18215 is this number for its VAE). Without it the UNet's noise schedule
    # would see a low-signal latent space (here std ~0.25 at 0.18215).
    n, zs = min(len(data), 256), []
    for j in range(0, n, 16):  # encode_images scales by the current factor f: the new one is f / std(f z)
        x = torch.stack([data[i]["image"] for i in range(j, min(j + 16, n))]).to(device)
        zs.append(encode_images(vae, x, sample=True, generator=seeded(cfg.seed, 3, j)).cpu())
    vae.config = replace(vae.config, scaling_factor=vae.config.scaling_factor / torch.cat(zs).std().item())
    return vae


@torch.no_grad()
def cache_latents(train, vae, dino, cfg: TrainConfig, out: Path, device) -> Path:
    """Encode every training image once (x cache_copies augmented copies): VAE mean/std and c_GLB."""
    path = out / "cache" / f"latents_{cfg.cache_copies if cfg.augment else 1}.safetensors"
    if path.is_file():
        return path
    keyed = KeyedImages(train, cfg.seed, cfg.augment)
    copies = cfg.cache_copies if cfg.augment else 1
    mean, std, cond = [], [], []
    keys = list(range(copies * len(train)))
    for i in tqdm(range(0, len(keys), cfg.batch_size), desc="cache latents", leave=False):
        x = torch.stack([keyed[k] for k in keys[i : i + cfg.batch_size]]).to(device)
        post = vae.encode(x.expand(-1, 3, -1, -1) * 2 - 1)
        mean.append(post.mean.cpu())
        std.append(post.std.cpu())
        cond.append(pipeline.condition(dino, x).cpu())
    hub.save_file_atomic({"mean": torch.cat(mean), "std": torch.cat(std), "cond": torch.cat(cond)}, path)
    return path


class CachedLatents(Dataset):
    def __init__(self, path):
        t = hub.load_state_dict_file(path)
        self.mean, self.std, self.cond = t["mean"], t["std"], t["cond"]

    def __len__(self):
        return len(self.mean)

    def __getitem__(self, key: int):
        i = key % len(self.mean)
        return self.mean[i], self.std[i], self.cond[i]


# ---------------------------------------------------------------------------------------------- main


def main(argv=None):
    cfg = parse_args(argv)
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local_rank = 0, 1, 0
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    master, out = rank == 0, Path(cfg.out)
    if cfg.resume and (out / "config.json").is_file():  # the saved config wins, except the step budget
        saved = json.loads((out / "config.json").read_text())
        known = {f.name for f in fields(TrainConfig)}
        cfg = replace(TrainConfig(**{k: v for k, v in saved.items() if k in known}),
                      resume=True, max_steps=cfg.max_steps, out=cfg.out)
    amp_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]

    # ------------------------------------------------------------------ models
    train_set, val_set = split_data(cfg, rank, world)
    torch.manual_seed(cfg.seed)
    vae = pipeline.build_vae(cfg.vae, cfg.vae_config, cfg.vae_subfolder).to(device)
    dino = pipeline.freeze(pipeline.build_dino(cfg.dino, cfg.dino_config).to(device))
    unet = pipeline.build_unet(cfg.unet, cfg.unet_config, cfg.unet_subfolder).to(device)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.vae and not (out / "vae").is_dir():
            if cfg.vae_fit_steps and hasattr(train_set, "__len__"):
                fit_vae(vae, train_set, cfg, device)
            pipeline.save_local(vae, out / "vae", "diffusion_pytorch_model.safetensors")
        if not cfg.dino and not (out / "dino").is_dir():
            pipeline.save_local(dino, out / "dino", "model.safetensors")
        hub.write_json_atomic(asdict(cfg) | {"unet_config_resolved": asdict(unet.config)}, out / "config.json")
        write_image_list(val_set, out / "val.csv")
    if ddp:
        dist.barrier()
    if not cfg.vae:  # every rank uses the frozen VAE/ViT exactly as saved
        vae = pipeline.load_local(type(vae), type(vae.config), out / "vae", "diffusion_pytorch_model.safetensors",
                                  device)
    if not cfg.dino:
        dino = pipeline.load_local(type(dino), type(dino.config), out / "dino", "model.safetensors", device)
    vae, dino = pipeline.freeze(vae), pipeline.freeze(dino)
    if dino.config.hidden_size != unet.config.cross_attention_dim:
        raise SystemExit(f"DINO width {dino.config.hidden_size} != UNet cross_attention_dim "
                         f"{unet.config.cross_attention_dim}: choose matching --dino / --unet-config")
    scheduler = DDPMScheduler.from_config(cfg.scheduler)
    abar = scheduler.alphas_cumprod.to(device)

    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    model = unet
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[local_rank] if device.type == "cuda"
                                                          else None)
    forward = torch.compile(model) if cfg.compile else model
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise SystemExit("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from e
        optimizer = bnb.optim.AdamW8bit(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    ema = {n: p.detach().float().clone() for n, p in unet.named_parameters()} if cfg.ema_decay > 0 else None

    step = 0
    done = checkpoint.complete_steps(out) if cfg.resume else []
    if done:
        step = done[-1]
        p = checkpoint.paths(out, step)
        state = hub.load_state_dict_file(p["weights"])
        hub.check_state_dict(unet, state, source=str(p["weights"]))
        unet.load_state_dict(state)
        if ema is not None:
            ema = {k: v.float().to(device) for k, v in hub.load_state_dict_file(p["ema"]).items()}
        checkpoint.restore(p["state"], optimizer=optimizer, scaler=scaler)
        if master:
            print(f"resumed from {p['weights']} (step {step})", file=sys.stderr)
    first_step = step  # LambdaLR counts from 0 at construction: offset by the resumed step
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup(s + first_step))

    # ------------------------------------------------------------------ data
    start = step * cfg.grad_accum
    if cfg.cache_latents:
        path = cache_latents(train_set, vae, dino, cfg, out, device) if master else None
        if ddp:
            dist.barrier()
        path = path or sorted((out / "cache").glob("latents_*.safetensors"))[-1]
        batches = Batches(CachedLatents(path), cfg.batch_size, rank=rank, world=world, seed=cfg.seed,
                          start=start, num_workers=0)
    elif hasattr(train_set, "__len__"):
        batches = Batches(KeyedImages(train_set, cfg.seed, cfg.augment), cfg.batch_size, rank=rank, world=world,
                          seed=cfg.seed, start=start, num_workers=cfg.num_workers)
    else:
        train_set.augment = cfg.augment
        batches = StreamBatches(train_set, cfg.batch_size, rank=rank, world=world, start=start,
                                num_workers=cfg.num_workers)

    def shared_randn(shape, *keys) -> torch.Tensor:
        """Noise for this rank's samples: drawn for the whole global batch from one generator keyed by
        (seed, *keys), then this rank's positions are taken (so N ranks == one process)."""
        full = torch.randn((batches.global_batch, *shape), generator=seeded(cfg.seed, *keys))
        return full[batches.positions].to(device)

    @torch.no_grad()
    def latents_and_condition(batch, micro: int):
        """z0 = posterior sample * scaling factor (0.18215 for SD v1) and c_GLB, from images or the cache."""
        if cfg.cache_latents:
            mean, std, c = (t.to(device) for t in batch)
        else:
            x = batch.to(device)
            c = pipeline.condition(dino, x)
            post = vae.encode(x.expand(-1, 3, -1, -1) * 2 - 1)
            mean, std = post.mean, post.std
        z = mean + std * shared_randn(mean.shape[1:], 103, micro)
        return z * vae.config.scaling_factor, c

    # ------------------------------------------------------------------ loop
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not master)
    t0, seen = time.time(), 0
    held_out = None  # (held-out images [N, 1, S, S], FID feature network)
    while step < cfg.max_steps:
        loss_sum = 0.0
        for k in range(cfg.grad_accum):
            micro = step * cfg.grad_accum + k
            z0, c = latents_and_condition(batches.next(), micro)
            g = seeded(cfg.seed, 200, micro)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batches.global_batch,), generator=g)
            drop = torch.rand(batches.global_batch, generator=g) < cfg.cond_dropout
            t, drop = t[batches.positions].to(device), drop[batches.positions].to(device)
            c = torch.where(drop[:, None, None], torch.zeros_like(c), c)
            eps = shared_randn(z0.shape[1:], 104, micro)
            x_t = scheduler.add_noise(z0, eps, t)
            target = eps if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(z0, eps, t)
            sync = not ddp or k == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else model.no_sync():
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    pred = forward(x_t, t, c)
                per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
                if cfg.min_snr_gamma > 0:  # Hang et al. 2023: w = min(SNR, gamma) / SNR for eps targets
                    snr = abar[t] / (1 - abar[t])
                    w = snr.clamp(max=cfg.min_snr_gamma) / snr
                    per_sample = per_sample * (w if scheduler.config.prediction_type == "epsilon"
                                               else w * snr / (snr + 1))
                loss = per_sample.mean() / cfg.grad_accum
                if not torch.isfinite(loss):
                    last = checkpoint.complete_steps(out)
                    raise SystemExit(f"non-finite loss ({loss.item()}) at step {step + 1}; stopped without saving. "
                                     f"Last good checkpoint: {last[-1] if last else 'none'} in {out}/checkpoints")
                scaler.scale(loss).backward()
            loss_sum += loss.item()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm).item()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr_sched.step()
        step += 1
        if ema is not None:
            ema_update(ema, unet, step, cfg.ema_decay)
        seen += batches.global_batch * cfg.grad_accum
        bar.update(1)
        if ddp:
            ls = torch.tensor([loss_sum], device=device)
            dist.all_reduce(ls)
            loss_sum = ls.item() / world
        if master and (step % cfg.log_every == 0 or step == cfg.max_steps):
            rec = {"step": step, "loss": loss_sum, "lr": lr_sched.get_last_lr()[0], "grad_norm": grad_norm,
                   "img_per_s": seen / (time.time() - t0)}
            if device.type == "cuda":
                rec["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{loss_sum:.4f}")
        if master and (step % cfg.save_every == 0 or step == cfg.max_steps):
            checkpoint.save(out, step, model_state=unet.state_dict(), ema_state=ema, optimizer=optimizer,
                            scaler=scaler, extra={"micro_step": step * cfg.grad_accum}, config=asdict(unet.config))
            checkpoint.prune(out, cfg.keep_last)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
            if master:
                if held_out is None:  # loaded at the first evaluation, kept for the run
                    real = torch.stack([val_set[i]["image"] for i in range(min(cfg.fid_count, len(val_set)))])
                    held_out = real, fid_extractor(cfg, real[:512], device)  # BN calibration: a few hundred do
                evaluate(unet, ema, vae, dino, *held_out, cfg, step, out, device)
            if ddp:
                dist.barrier()
    bar.close()
    if ddp:
        dist.destroy_process_group()


def fid_extractor(cfg: TrainConfig, reference: torch.Tensor, device=None):
    """The FID feature network: the named pretrained one when --fid-weights is given, else (offline) a
    random-init XRV-style DenseNet with a fixed seed whose BatchNorm statistics are set from the held-out
    `reference` images -- FIDs are then comparable within a run only. The tiny preset uses a tiny DenseNet at
    its own 64 px resolution to stay fast on CPU."""
    from eval.densenet import DenseNet121, DenseNetConfig, XRVDenseNetFeatures, calibrate_batchnorm
    from eval.fid import load_extractor

    if cfg.fid_weights:
        return load_extractor(cfg.fid_features, cfg.fid_weights, device)
    torch.manual_seed(0)
    if cfg.preset == "tiny":
        net = DenseNet121(DenseNetConfig.tiny(in_channels=1))
        features = XRVDenseNetFeatures(net, name="xrv-tiny-random-init", resolution=cfg.image_size)
    else:
        features = XRVDenseNetFeatures(name="xrv-random-init")
    return calibrate_batchnorm(features, reference, cfg.batch_size).eval()


def evaluate(unet, ema, vae, dino, real, extractor, cfg: TrainConfig, step: int, out: Path, device):
    """Sample grid (held-out images `real` above their reconstructions) and FID against them (`extractor`)."""
    from PIL import Image

    from eval.fid import fid

    backup = None
    if ema is not None:  # evaluate the EMA weights, then put the training weights back
        backup = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        unet.load_state_dict({k: v.to(backup[k].dtype) for k, v in ema.items()})
    unet.eval()
    n = len(real)
    fake, sched = [], pipeline.make_scheduler({"scheduler": cfg.scheduler}, "ddim")
    for i in range(0, n, cfg.batch_size):
        x = real[i : i + cfg.batch_size].to(device)
        imgs = generate(unet, vae, sched, pipeline.condition(dino, x), seeds=list(range(i, i + len(x))),
                        height=cfg.image_size, width=cfg.image_size, steps=cfg.sample_steps)
        fake.append(to_grayscale(imgs).cpu())
    fake = torch.cat(fake)
    k = min(cfg.grid_images, n)
    grid = torch.cat([torch.cat(list(real[:k, 0]), dim=1), torch.cat(list(fake[:k, 0]), dim=1)], dim=0)
    (out / "samples").mkdir(exist_ok=True)
    Image.fromarray((grid.numpy() * 255).round().astype("uint8")).save(out / "samples" / f"step_{step:07d}.png")
    score = fid(real, fake, features=extractor, batch_size=cfg.batch_size, device=device, progress=False,
                cache=out / "fid_reference.npz")
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "fid": score, "fid_features": cfg.fid_features, "fid_n": n}) + "\n")
    print(f"step {step}: FID ({cfg.fid_features}, n={n}) = {score:.3f}", file=sys.stderr)
    if backup is not None:
        unet.load_state_dict(backup)
    unet.train()


if __name__ == "__main__":
    main()
