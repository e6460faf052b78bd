"""vae/: parity with diffusers' AutoencoderKL (same random weights), the three checkpoint layouts, bad input.

Tiny configs run by default; the real SD v1 config runs under `-m slow` (64x64 inputs keep it cheap).
"""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import hub
from tests.helpers import gaussian_nll, heavy_lock, max_abs_diff, vae_attention_with_probs, vae_to_ldm
from tests.support_models import gaussian_kl
from vae import AutoencoderKL, DiagonalGaussian, VAEConfig
from vae.layers import Attention, Upsample2D

TOL = 1e-4
TINY = dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8)
TINY3 = dict(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=32)
SD_VAE_CONFIG_JSON = {  # stable-diffusion-v1-5/stable-diffusion-v1-5, vae/config.json
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def make_ref(block_out_channels, layers_per_block, norm_num_groups, **kw):
    """diffusers' AutoencoderKL with random weights, GroupNorm affines included (default init is 1/0)."""
    from diffusers import AutoencoderKL as RefVAE

    n = len(block_out_channels)
    ref = RefVAE(block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                 norm_num_groups=norm_num_groups, down_block_types=("DownEncoderBlock2D",) * n,
                 up_block_types=("UpDecoderBlock2D",) * n, **kw)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.1)
    return ref.eval()


def ours_like(ref) -> AutoencoderKL:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every diffusers config key is a VAEConfig field or a NEUTRAL one
        config = VAEConfig.from_dict(dict(ref.config))
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


def assert_parity(ours, ref, x, generator_seed=0, tol=TOL):
    """encode (mean, logvar, sample, kl), decode and the round trip agree within tol; returns the max diff.

    The KL is a sum over all latent elements, so its difference is taken relative to its size."""
    x = x.to(next(ref.parameters()).dtype)
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        z = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
        kl, ref_kl = post.kl(), ref_post.kl()
        diffs = {
            "mean": max_abs_diff(post.mean, ref_post.mean),
            "logvar": max_abs_diff(post.logvar, ref_post.logvar),
            "sample": max_abs_diff(post.sample(torch.Generator().manual_seed(generator_seed)),
                                   ref_post.sample(torch.Generator().manual_seed(generator_seed))),
            "kl (relative)": max_abs_diff(kl, ref_kl) / max(1.0, ref_kl.abs().max().item()),
            "decode": max_abs_diff(ours.decode(z), ref.decode(z).sample),
            "round trip": max_abs_diff(ours(x), ref(x).sample),
        }
    assert max(diffs.values()) <= tol, diffs
    return max(diffs.values())


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    ref = make_ref(**TINY)
    return ours_like(ref), ref


# ------------------------------------------------------------------------------------------------ model


def test_default_config_is_sd_v1_and_keys_match_diffusers():
    from diffusers import AutoencoderKL as RefVAE

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hub.config_from_dict(VAEConfig, SD_VAE_CONFIG_JSON) == VAEConfig()
    with torch.device("meta"):
        ours, ref = AutoencoderKL(), RefVAE(**{k: v for k, v in SD_VAE_CONFIG_JSON.items() if k[0] != "_"})
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(ref)
    assert len(shapes(ours)) == 248 and sum(p.numel() for p in ours.parameters()) == 83_653_863
    assert VAEConfig().scaling_factor == 0.18215 and VAEConfig().downsample_factor == 8


@pytest.mark.parametrize("cfg, shape", [(TINY, (2, 3, 24, 40)), (TINY3, (1, 3, 200, 264))], ids=["tiny", "tiny3-200x264"])
def test_parity_with_diffusers(cfg, shape):
    torch.manual_seed(0)
    ref = make_ref(**cfg)
    ours = ours_like(ref)
    print(f"fp32 max abs diff {assert_parity(ours, ref, torch.rand(shape) * 2 - 1):.2e}")


def test_parity_in_float64_is_exact():
    """Same math up to summation order: in fp64 the only differences are ~1e-13 roundings. (In fp32, random
    weights amplify roundings to ~1e-5; our sub-pixel upsampling is the closer of the two to the fp64 result.)"""
    torch.manual_seed(0)
    ref = make_ref(**TINY3)
    ours = ours_like(ref).double()
    assert_parity(ours, ref.double(), torch.rand(2, 3, 40, 56) * 2 - 1, tol=1e-10)


def test_gradients_match_diffusers(tiny):
    ours, ref = tiny
    x = torch.rand(1, 3, 16, 24) * 2 - 1
    for m in (ours, ref):
        m.zero_grad()
        post = m.encode(x) if m is ours else m.encode(x).latent_dist
        rec = m.decode(post.sample(torch.Generator().manual_seed(0)))
        rec = rec if m is ours else rec.sample
        ((rec - x).square().mean() + 1e-3 * post.kl().mean()).backward()
    grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        g = grads[name].grad
        assert p.grad is not None and max_abs_diff(p.grad, g) <= TOL * max(1.0, g.abs().max().item()), name
    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)


def test_diagonal_gaussian():
    moments = torch.randn(2, 8, 3, 5) * 20  # logvar far outside [-30, 20] in places
    post = DiagonalGaussian(moments)
    assert post.logvar.min() >= -30 and post.logvar.max() <= 20 and torch.equal(post.mode(), moments[:, :4])
    assert torch.allclose(post.var, post.std**2, rtol=1e-5)
    g = torch.Generator().manual_seed(3)
    eps = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(post.sample(g), post.mean + post.std * eps)
    assert post.kl().shape == (2,) and torch.allclose(gaussian_kl(post, post), torch.zeros(2), atol=1e-3)
    normal = DiagonalGaussian(torch.zeros(1, 8, 2, 2))
    assert torch.allclose(normal.kl(), torch.zeros(1))
    z = torch.randn(1, 4, 2, 2)
    expected = -torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(dim=(1, 2, 3))
    assert torch.allclose(gaussian_nll(normal, z), expected, atol=1e-5)


def test_attention_explicit_path_matches_sdpa():
    torch.manual_seed(0)
    attn = Attention(32, 8, 1e-6).eval()
    x = torch.randn(2, 32, 5, 6)
    with torch.no_grad():
        fast = attn(x)
        slow, probs = vae_attention_with_probs(attn, x)
    assert max_abs_diff(fast, slow) <= 1e-5
    assert probs.shape == (2, 30, 30) and torch.allclose(probs.sum(-1), torch.ones(2, 30))


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_is_interpolate_then_conv_in_both_memory_formats(channels_last):
    torch.manual_seed(0)
    up = Upsample2D(16)
    x = torch.randn(2, 16, 5, 7, requires_grad=True)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    out, ref = up(x), up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert out.shape == (2, 16, 10, 14) and max_abs_diff(out, ref) <= 1e-5
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, [x, up.conv.weight], g), torch.autograd.grad(ref, [x, up.conv.weight], g)):
        assert max_abs_diff(a, b) <= 1e-4 * max(1.0, b.abs().max().item())


def test_memory_formats_give_the_same_result(tiny):
    """On CPU encode/decode run channels_last inside (faster with oneDNN) and return NCHW; other devices keep
    the caller's format. Both layouts, and channels_last weights, compute the same numbers."""
    ours, _ = tiny
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = ours.encode(x).mean
        expected = ours.decode(z)
        nchw = ours.decoder(ours.post_quant_conv(z.contiguous()))  # the path other devices take
        assert expected.is_contiguous() and nchw.is_contiguous() and max_abs_diff(nchw, expected) <= 1e-5
        assert max_abs_diff(ours.quant_conv(ours.encoder(x))[:, :4], z) <= 1e-5
        round_trip = ours(x)
        ours.to(memory_format=torch.channels_last)
        try:
            got = ours(x.contiguous(memory_format=torch.channels_last))
        finally:
            ours.to(memory_format=torch.contiguous_format)
    assert max_abs_diff(got, round_trip) <= 1e-5


def test_bad_input_names_the_shape(tiny):
    ours, _ = tiny
    with pytest.raises(ValueError, match=r"\(1, 1, 16, 16\)"):
        ours.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"multiples of 2.*\(1, 3, 15, 16\)"):
        ours.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"decode.*\(1, 3, 8, 8\)"):
        ours.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"multiples of 8.*\(1, 3, 60, 64\)"):
        with torch.device("meta"):
            AutoencoderKL().encode(torch.zeros(1, 3, 60, 64, device="meta"))


def test_bad_config():
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig(act_fn="gelu")
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 4)
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAEConfig(block_out_channels=(48, 64), norm_num_groups=32)
    with pytest.raises(hub.CheckpointError, match="use_quant_conv=False"):  # a VAE other than SD's
        VAEConfig.from_dict({"use_quant_conv": False})
    import pipeline

    with pytest.raises(hub.CheckpointError, match="use_quant_conv=False"):  # train.py --vae-config goes there too
        pipeline.build_vae(None, {"use_quant_conv": False})


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """The tiny reference written by diffusers' own save_pretrained (safetensors, current key names)."""
    folder = tmp_path_factory.mktemp("vae") / "diffusers"
    tiny[1].save_pretrained(folder)
    return folder


def check_loaded(model, tiny, dtype=torch.float32):
    ours, ref = tiny
    assert isinstance(model, AutoencoderKL) and not model.training and model.config == ours.config
    assert all(p.dtype == dtype for p in model.parameters())
    for k, v in ours.state_dict().items():
        assert torch.equal(model.state_dict()[k].float(), v.to(dtype).float()), k


def test_from_pretrained_diffusers_folder(saved, tiny):
    model = AutoencoderKL.from_pretrained(saved)
    check_loaded(model, tiny)
    assert_parity(model, tiny[1], torch.rand(1, 3, 16, 24) * 2 - 1)


def test_from_pretrained_legacy_attention_names_in_bin(saved, tiny, tmp_path):
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in tiny[1].state_dict().items():
        for new, old in legacy.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        state[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in state
    torch.save(state, tmp_path / "diffusion_pytorch_model.bin")
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    check_loaded(AutoencoderKL.from_pretrained(tmp_path), tiny)


def test_from_pretrained_compvis_single_file(tiny, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ours, ref = tiny
    ldm = vae_to_ldm(ours.state_dict(), ours.config)
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight" in ldm  # full-size level runs last
    # Independent check of our inverse map: diffusers' own converter turns it back into the diffusers dict.
    back = convert_ldm_vae_checkpoint(ldm, dict(ref.config))
    expected = ref.state_dict()
    assert back.keys() == expected.keys() and all(torch.equal(back[k], expected[k]) for k in back)
    full_sd = {**ldm, "model.diffusion_model.conv_in.weight": torch.zeros(1), "cond_stage_model.x": torch.zeros(1)}
    hub.save_file_atomic(full_sd, tmp_path / "sd-v1.safetensors")
    model = AutoencoderKL.from_pretrained(tmp_path / "sd-v1.safetensors", config=ours.config)
    check_loaded(model, tiny)


def test_from_pretrained_diffusers_single_file_with_config(saved, tiny):
    check_loaded(AutoencoderKL.from_pretrained(saved / "diffusion_pytorch_model.safetensors", config=tiny[0].config), tiny)


def test_from_pretrained_repo_id_from_offline_cache(saved, tiny, hf_cache, tmp_path):
    repo = tmp_path / "fake-sd"
    (repo / "vae").mkdir(parents=True)
    (repo / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for f in saved.iterdir():
        (repo / "vae" / f.name).write_bytes(f.read_bytes())
    hf_cache.add_folder("org/fake-sd", repo)
    check_loaded(AutoencoderKL.from_pretrained("org/fake-sd", subfolder="vae"), tiny)
    with pytest.raises(hub.CheckpointError, match="org/fake-sd"):
        AutoencoderKL.from_pretrained("org/fake-sd", subfolder="unet")


def test_dtype_device_and_autocast(saved, tiny):
    model = AutoencoderKL.from_pretrained(saved, dtype=torch.bfloat16, device="cpu")
    check_loaded(model, tiny, dtype=torch.bfloat16)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        out = model(x)  # fp32 input is cast to the weights' dtype
        assert out.dtype == torch.bfloat16 and max_abs_diff(out, tiny[0](x)) < 0.1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rec = tiny[0].decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
        assert rec.dtype == torch.float32  # the VAE ignores autocast: it runs in its weights' dtype
        assert torch.equal(rec, tiny[0].decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))))


def test_save_pretrained_loads_in_ours_and_diffusers(tiny, tmp_path):
    from diffusers import AutoencoderKL as RefVAE

    ours, ref = tiny
    ours.save_pretrained(tmp_path / "ours")
    check_loaded(AutoencoderKL.from_pretrained(tmp_path / "ours"), tiny)
    theirs = RefVAE.from_pretrained(tmp_path / "ours").eval()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in theirs.state_dict().items())


def test_bad_checkpoints_name_the_key(saved, tiny, tmp_path):
    state = dict(tiny[1].state_dict())
    config = tiny[0].config
    missing = {k: v for k, v in state.items() if k != "decoder.conv_out.bias"}
    hub.save_file_atomic(missing, tmp_path / "missing.safetensors")
    with pytest.raises(hub.CheckpointError, match=r"missing.safetensors(.|\n)*missing keys \(1\): decoder.conv_out.bias"):
        AutoencoderKL.from_pretrained(tmp_path / "missing.safetensors", config=config)
    wrong = {**state, "encoder.conv_in.weight": torch.zeros(32, 3, 5, 5)}
    hub.save_file_atomic(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(hub.CheckpointError, match=r"encoder.conv_in.weight: checkpoint \[32, 3, 5, 5\] vs model \[32, 3, 3, 3\]"):
        AutoencoderKL.from_pretrained(tmp_path / "wrong.safetensors", config=config)
    extra = {**state, "encoder.mid.attn_1.bogus.weight": torch.zeros(1)}  # an LDM-looking key we cannot map
    hub.save_file_atomic(extra, tmp_path / "extra.safetensors")
    with pytest.raises(hub.CheckpointError, match=r"unexpected keys \(1\): encoder.mid.attn_1.bogus.weight"):
        AutoencoderKL.from_pretrained(tmp_path / "extra.safetensors", config=config)
    with pytest.raises(hub.CheckpointError, match="no_such_dir"):
        AutoencoderKL.from_pretrained(tmp_path / "no_such_dir")


# ------------------------------------------------------------------------------------------ real config


@pytest.mark.slow
def test_sd_v1_parity_and_compvis_single_file(tmp_path):
    with heavy_lock():
        torch.manual_seed(0)
        ref = make_ref(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512)
        ours = ours_like(ref)
        assert ours.config == VAEConfig()
        worst = max(assert_parity(ours, ref, torch.rand(1, 3, 64, 64) * 2 - 1),
                    assert_parity(ours, ref, torch.rand(1, 3, 64, 96) * 2 - 1))
        print(f"SD v1 VAE parity: max abs diff {worst:.2e}")
        hub.save_file_atomic(vae_to_ldm(ours.state_dict(), ours.config), tmp_path / "v1-5.safetensors")
        del ref
        loaded = AutoencoderKL.from_pretrained(tmp_path / "v1-5.safetensors")  # no config: SD v1 defaults
        assert loaded.config == VAEConfig()
        assert all(torch.equal(v, ours.state_dict()[k]) for k, v in loaded.state_dict().items())
