"""bench/: the suite's command line and the torch.compile row (wiring only: timings are never asserted)."""

import subprocess
import sys

import pytest
import torch

from bench import bench_unet
from tests.helpers import REPO
from unet import UNetConfig

TINY = UNetConfig(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2)


def test_help_lists_flags():
    p = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0
    for flag in ("--quick", "--json", "--only", "--compile"):
        assert flag in p.stdout


def test_unknown_benchmark_is_an_error():
    p = subprocess.run([sys.executable, "-m", "bench", "--only", "nope"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode != 0 and "unknown benchmark" in p.stderr


def test_compiled_row_checks_outputs(monkeypatch):
    """The --compile row compares the compiled UNet with eager before timing it (backend 'eager' here: the
    inductor code generation takes minutes on CPU), and refuses a compiled model that differs."""
    torch.manual_seed(0)
    ours, ref = bench_unet._models(TINY)
    monkeypatch.setattr(bench_unet, "LATENT", 8)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: real_compile(m, backend="eager"))
    row = bench_unet._bench_compiled(ours, ref, "tiny", repeats=1)
    assert row["name"].startswith("forward B=1 torch.compile") and row["ours_s"] > 0 and row["ref_s"] > 0
    monkeypatch.setattr(torch, "compile", lambda m: (lambda *a: m(*a) + 1))
    with pytest.raises(AssertionError, match="compiled UNet differs"):
        bench_unet._bench_compiled(ours, ref, "tiny", repeats=1)


def test_sampling_throughput_row_times_the_same_images():
    """The throughput row's two samplers make the same images from the same seeds (so it times equal work), and
    the row carries the img/s columns that the table prints."""
    from bench import bench_sample
    from bench.common import print_table
    from vae import VAEConfig

    torch.manual_seed(0)
    unet, vae, unet_ref, vae_ref = bench_sample.models(
        TINY, VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4))
    ctx, seeds = torch.randn(2, 5, TINY.cross_attention_dim), [3, 4]
    with torch.inference_mode():
        ours = bench_sample.to_grayscale(bench_sample.generate(unet, vae, bench_sample.DDIMScheduler(), ctx,
                                                               seeds=seeds, steps=3))
        ref = bench_sample.reference_sampler(unet_ref, vae_ref, ctx, seeds, steps=3)
    assert ours.shape == ref.shape == (2, 1, 16, 16) and (ours - ref).abs().max() < 1e-4
    row = bench_sample.throughput_row(unet, vae, unet_ref, vae_ref, "test", batch=2, k=3, repeats=1)
    assert row["ours_img_s"] == pytest.approx(2 / row["ours_s"]) and row["ref_img_s"] > 0
    print_table([row, {"name": "other"}])
