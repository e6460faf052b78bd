"""ddpm/: parity of our DDPM/DDIM schedulers with diffusers' DDPMScheduler/DDIMScheduler, config IO, errors.

Trajectories use a fixed fake model (eps = 0.1 x + sin(t)) and feed both schedulers identical noise (same-seeded
generators, whose states are compared afterwards).
"""

import dataclasses
import json
import math
import re
import warnings

import pytest
import torch

from ddpm import DDIMScheduler, DDPMScheduler, SchedulerConfig, StepOutput
from tests.helpers import save_scheduler_config, snr

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5  # fp32 max abs diff over whole trajectories (observed: 0, the arithmetic is the same)
# Stable Diffusion v1 values, passed explicitly to diffusers (its class defaults are the original DDPM's)
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          clip_sample=False, steps_offset=1)  # fmt: skip
SD15_SCHEDULER_JSON = {  # stable-diffusion-v1-5/scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}  # fmt: skip


def ref_ddim(**kw):
    return diffusers.DDIMScheduler(**{**SD, "set_alpha_to_one": False, **kw})


def ref_ddpm(**kw):
    return diffusers.DDPMScheduler(**{**SD, **kw})


def fake_model(x, t):
    return 0.1 * x + math.sin(int(t))


def max_diff(a, b):
    return (a - b).abs().max().item()


def run_pair(ours, ref, steps, step_kwargs=None, shape=(2, 4, 8, 8), seed=1):
    """Sample with both schedulers from the same x_T; returns the worst diff over all steps and outputs."""
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    x = y = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    g_ours, g_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    worst = 0.0
    for t in ours.timesteps:
        kw = dict(step_kwargs or {})
        a = ours.step(fake_model(x, t), t, x, generator=g_ours, **kw)
        b = ref.step(fake_model(y, t), t, y, generator=g_ref, **kw)
        worst = max(worst, max_diff(a.prev_sample, b.prev_sample))
        worst = max(worst, max_diff(a.pred_original_sample, b.pred_original_sample))
        x, y = a.prev_sample, b.prev_sample
    assert torch.isfinite(x).all()
    assert torch.equal(g_ours.get_state(), g_ref.get_state()), "the generators consumed different noise"
    return worst


# ------------------------------------------------------------------------------------------------ schedule


def test_defaults_are_sd_v1():
    s = DDIMScheduler()
    assert s.config == SchedulerConfig()
    assert {k: getattr(s.config, k) for k in SD} == SD
    assert (s.config.prediction_type, s.config.set_alpha_to_one, s.config.timestep_spacing) == (
        "epsilon", False, "leading",
    )  # fmt: skip
    expected = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)  # formulas.md
    assert s.alphas_cumprod.dtype == torch.float32 and s.alphas_cumprod.shape == (1000,)
    assert torch.equal(s.alphas_cumprod, expected)
    # the constructor takes exactly the config's fields, by keyword
    assert DDPMScheduler(**dataclasses.asdict(SchedulerConfig())).config == SchedulerConfig()
    with pytest.raises(TypeError, match="not_a_field"):
        DDIMScheduler(not_a_field=1)
    with pytest.raises(TypeError):
        DDIMScheduler(1000)
    s.set_timesteps(50)
    assert s.timesteps.dtype == torch.int64 and torch.equal(s.timesteps, torch.arange(981, 0, -20))


@pytest.mark.parametrize(
    "kw",
    [{}, dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)],
)  # fmt: skip
def test_alphas_cumprod_parity(kw):
    for ours, ref in [(DDIMScheduler(**kw), ref_ddim(**kw)), (DDPMScheduler(**kw), ref_ddpm(**kw))]:
        assert ours.alphas_cumprod.dtype == torch.float32
        assert torch.equal(ours.betas, ref.betas)
        assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_parity(spacing, offset):
    """Every N in 1..1000 (the brief's {1, 3, 50, 1000} included), DDIM and DDPM, against diffusers."""
    kw = dict(timestep_spacing=spacing, steps_offset=offset)
    ours, ref, ours_ddpm, ref_ddpm_ = DDIMScheduler(**kw), ref_ddim(**kw), DDPMScheduler(**kw), ref_ddpm(**kw)
    for n in range(1, 1001):
        ref.set_timesteps(n)
        if spacing == "leading" and offset == 1 and n == 1000:
            # diffusers lists timestep 1000, which its step() cannot index; we refuse it up front
            assert ref.timesteps.max() == 1000
            with pytest.raises(ValueError, match="timestep 1000"):
                ours.set_timesteps(n)
            continue
        ours.set_timesteps(n)
        assert ours.timesteps.dtype == torch.int64 and ours.num_inference_steps == n
        assert torch.equal(ours.timesteps, ref.timesteps), (spacing, offset, n)
        assert n == 1 or bool((ours.timesteps.diff() < 0).all())
        if n in (1, 3, 50, 999, 1000):
            ours_ddpm.set_timesteps(n)
            ref_ddpm_.set_timesteps(n)
            assert torch.equal(ours_ddpm.timesteps, ref_ddpm_.timesteps)


def test_set_timesteps_device():
    s = DDPMScheduler()
    s.set_timesteps(4, device="cpu")
    assert s.timesteps.device.type == "cpu" and s.timesteps.tolist() == [751, 501, 251, 1]


# ------------------------------------------------------------------------------------------------ forward


def test_add_noise_velocity_snr_parity():
    ours, ref = DDPMScheduler(), ref_ddpm()
    x0, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 1, 500, 998, 999, 17])
    assert max_diff(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t)) <= 1e-6
    assert max_diff(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t)) <= 1e-6
    # a scalar timestep broadcasts over the batch
    x_t = ours.add_noise(x0, noise, torch.tensor(3))
    assert torch.equal(x_t, ours.add_noise(x0, noise, torch.full((6,), 3)))
    abar = ref.alphas_cumprod[t]
    assert torch.allclose(snr(ours, t), abar / (1 - abar)) and snr(ours, t).dtype == torch.float32
    assert bool((snr(ours, torch.arange(1000)).diff() < 0).all())


def test_forward_follows_input_dtype():
    s = DDIMScheduler()
    x0, noise, t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4).double(), [5, 900]
    assert s.add_noise(x0, noise, t).dtype == torch.float64
    assert s.get_velocity(x0.bfloat16(), noise.bfloat16(), t).dtype == torch.bfloat16
    assert max_diff(s.add_noise(x0, noise, t), s.add_noise(x0.float(), noise.float(), t).double()) < 1e-6
    s.set_timesteps(10)
    out = s.step(x0.half(), s.timesteps[0], x0.half())
    assert isinstance(out, StepOutput) and out.prev_sample.dtype == torch.float16


# ------------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize(
    "prediction_type, eta, spacing, steps, clip",
    [("epsilon", 0.0, "leading", 50, False), ("epsilon", 1.0, "leading", 50, False),
     ("v_prediction", 0.0, "leading", 50, False), ("v_prediction", 1.0, "trailing", 50, False),
     ("sample", 0.5, "trailing", 3, True), ("epsilon", 1.0, "trailing", 1, False)],
)  # fmt: skip
def test_ddim_trajectory_parity(prediction_type, eta, spacing, steps, clip):
    kw = dict(
        prediction_type=prediction_type, timestep_spacing=spacing, clip_sample=clip, clip_sample_range=1.5
    )
    assert run_pair(DDIMScheduler(**kw), ref_ddim(**kw), steps, {"eta": eta}) <= TOL


def test_ddim_set_alpha_to_one_and_generator_lists():
    kw = dict(prediction_type="v_prediction", set_alpha_to_one=True)
    assert run_pair(DDIMScheduler(**kw), ref_ddim(**kw), 20, {"eta": 1.0}) <= TOL
    # one generator per sample (diffusers' randn_tensor accepts a list too)
    ours, ref = DDIMScheduler(), ref_ddim()
    ours.set_timesteps(5)
    ref.set_timesteps(5)
    x, t = torch.randn(3, 2, 4, 4), ours.timesteps[1]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]
    a = ours.step(fake_model(x, t), t, x, eta=1.0, generator=gens()).prev_sample
    b = ref.step(fake_model(x, t), t, x, eta=1.0, generator=gens()).prev_sample
    assert max_diff(a, b) <= TOL


@pytest.mark.parametrize(
    "prediction_type, spacing, steps, clip",
    [("epsilon", "leading", 20, False), ("v_prediction", "leading", 20, False), ("epsilon", "trailing", 20, False),
     ("sample", "trailing", 3, True), ("v_prediction", "leading", 1, False)],
)  # fmt: skip
def test_ddpm_trajectory_parity(prediction_type, spacing, steps, clip):
    kw = dict(prediction_type=prediction_type, timestep_spacing=spacing, clip_sample=clip)
    assert run_pair(DDPMScheduler(**kw), ref_ddpm(**kw), steps) <= TOL


def test_ddpm_noise_is_one_generator_draw_and_timestep_forms_agree():
    s = DDPMScheduler()
    s.set_timesteps(4)
    x, t = torch.randn(2, 3, 4, 4), s.timesteps[0]
    g = torch.Generator().manual_seed(7)
    a = s.step(fake_model(x, t), t, x, generator=g).prev_sample
    one_draw = torch.Generator().manual_seed(7)
    torch.randn(x.shape, generator=one_draw)
    assert torch.equal(g.get_state(), one_draw.get_state())
    for same in (int(t), t.reshape(1)):
        assert torch.equal(a, s.step(fake_model(x, t), same, x, generator=torch.Generator().manual_seed(7)).prev_sample)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_match_cpu():
    """Timesteps and samples on the GPU, noise from a CPU generator (drawn there, then moved, as diffusers)."""
    for cls, kw in [(DDIMScheduler, {"eta": 1.0}), (DDPMScheduler, {})]:
        results = []
        for device in ["cpu", "cuda"]:
            s = cls()
            s.set_timesteps(10, device=device)
            x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
            g = torch.Generator().manual_seed(1)
            for t in s.timesteps:
                x = s.step(fake_model(x, t), t, x, generator=g, **kw).prev_sample
            t = torch.tensor([3, 999], device=device)
            results.append((x, s.add_noise(x, x, t), snr(s, t)))
        for a, b in zip(*results):
            assert b.device.type == "cuda" and torch.allclose(a, b.cpu(), rtol=1e-5, atol=TOL)


# ------------------------------------------------------------------------------------------------ config IO


def test_from_config_reads_diffusers_save_config(tmp_path):
    kw = dict(prediction_type="v_prediction", timestep_spacing="trailing", clip_sample_range=2.0)
    ref_ddim(**kw).save_config(tmp_path / "ddim")
    ref_ddpm().save_config(tmp_path / "ddpm")
    pndm_kw = {k: v for k, v in SD15_SCHEDULER_JSON.items() if not k.startswith("_") and k != "clip_sample"}
    diffusers.PNDMScheduler(**pndm_kw).save_config(tmp_path / "sd15" / "scheduler")  # the SD v1.5 scheduler
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key diffusers writes is understood: no warning
        s_dir = DDIMScheduler.from_config(tmp_path / "ddim")
        s_file = DDIMScheduler.from_config(tmp_path / "ddim" / "scheduler_config.json")
        s_dict = DDIMScheduler.from_config(json.loads((tmp_path / "ddim/scheduler_config.json").read_text()))
        p = DDPMScheduler.from_config(str(tmp_path / "ddpm"))
        sd15 = DDIMScheduler.from_config(tmp_path / "sd15")  # a pipeline folder: scheduler/ is found
        sd15_dict = DDPMScheduler.from_config(SD15_SCHEDULER_JSON)
    assert s_dir.config == s_file.config == s_dict.config == SchedulerConfig(**kw)
    assert p.config == SchedulerConfig()
    assert sd15.config == sd15_dict.config == SchedulerConfig()
    ref = ref_ddim(**kw)
    s_dir.set_timesteps(50)
    ref.set_timesteps(50)
    assert torch.equal(s_dir.alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(s_dir.timesteps, ref.timesteps)
    # overrides, and a config moved between the two samplers (as train -> sample does)
    overridden = DDIMScheduler.from_config(tmp_path / "ddim", timestep_spacing="leading")
    assert overridden.config == dataclasses.replace(s_dir.config, timestep_spacing="leading")
    assert DDPMScheduler.from_config(s_dir.config).config == s_dir.config
    assert DDIMScheduler.from_config(dataclasses.asdict(p.config)).config == p.config
    with pytest.raises(TypeError, match="not_a_field"):
        DDIMScheduler.from_config({}, not_a_field=1)


def test_save_config_round_trips_through_diffusers(tmp_path):
    ours = DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=True)
    path = save_scheduler_config(ours, tmp_path)
    assert json.loads(path.read_text())["_class_name"] == "DDIMScheduler"
    assert DDIMScheduler.from_config(tmp_path).config == ours.config
    ref = diffusers.DDIMScheduler.from_config(diffusers.DDIMScheduler.load_config(tmp_path))
    assert (ref.config.prediction_type, ref.config.timestep_spacing, ref.config.set_alpha_to_one) == (
        "v_prediction", "trailing", True,
    )  # fmt: skip
    assert run_pair(ours, ref, 10, {"eta": 1.0}) <= TOL


def test_from_config_unknown_and_unsupported_keys(tmp_path):
    with pytest.warns(UserWarning, match="interpolation_type"):
        s = DDIMScheduler.from_config({**SD15_SCHEDULER_JSON, "interpolation_type": "linear"})
    assert s.config == SchedulerConfig()
    with pytest.raises(ValueError, match="thresholding=True"):
        DDIMScheduler.from_config({"thresholding": True})
    with pytest.raises(ValueError, match="unknown variance_type 'fixed_large'"):  # DDPM samples with fixed_small only
        DDPMScheduler.from_config({"variance_type": "fixed_large"})
    with pytest.raises(ValueError, match="nowhere"):
        DDIMScheduler.from_config(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------ errors


def _stepped(cls, n=10, **kw):
    s = cls(**kw)
    s.set_timesteps(n)
    return s


X = torch.zeros(1, 2, 2, 2)
BAD_INPUTS = [
    (lambda: DDIMScheduler().set_timesteps(0), "got 0"),
    (lambda: DDIMScheduler().set_timesteps(1001), "got 1001"),
    (lambda: DDPMScheduler().set_timesteps(2.5), "got 2.5"),
    (lambda: DDPMScheduler().set_timesteps(1000), "timestep 1000 >= num_train_timesteps=1000"),
    (lambda: DDIMScheduler(beta_schedule="cosine"), "'cosine'"),
    (lambda: DDIMScheduler(prediction_type="x0"), "'x0'"),
    (lambda: DDIMScheduler(timestep_spacing="uniform"), "'uniform'"),
    (lambda: DDPMScheduler.from_config({"variance_type": "learned"}), "'learned'"),
    (lambda: DDIMScheduler(num_train_timesteps=0), "got 0"),
    (lambda: DDIMScheduler(beta_start=0.5, beta_end=0.1), "0.5"),
    (lambda: DDIMScheduler().step(X, 981, X), "before set_timesteps"),
    (lambda: DDPMScheduler().step(X, 981, X), "before set_timesteps"),
    (lambda: _stepped(DDIMScheduler).step(X, 1000, X), "timestep 1000 out of range [0, 999]"),
    (lambda: _stepped(DDPMScheduler).step(X, -1, X), "timestep -1 out of range [0, 999]"),
    (lambda: _stepped(DDPMScheduler).step(X, 500, X), "timestep 500 is not one of the 10 timesteps"),
    (lambda: _stepped(DDIMScheduler).step(X, torch.tensor([901, 801]), X), "shape (2,)"),
    (lambda: _stepped(DDIMScheduler).step(X, 901, X, eta=-1.0), "eta must be >= 0, got -1.0"),
    (lambda: DDIMScheduler().add_noise(X.expand(2, -1, -1, -1), X, torch.tensor([5, 1000])), "timestep 1000"),
    (lambda: DDIMScheduler().add_noise(X, X, torch.tensor([2.5])), "[2.5]"),
    (lambda: DDIMScheduler().get_velocity(X, X, torch.tensor([-3])), "timestep -3"),
    (lambda: snr(DDIMScheduler(), torch.tensor([4000])), "timestep 4000"),
]


@pytest.mark.parametrize("call, message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_the_value(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()

