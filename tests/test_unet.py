"""unet/: parity with diffusers' UNet2DConditionModel, self-attention capture, checkpointing, loading."""

import json

import pytest
import torch

import hub
from tests.helpers import heavy_lock, max_abs_diff, patch_torchvision, unet_to_ldm
from unet import AttentionMap, UNet2DConditionModel, UNetConfig
from unet.convert import LDM_PREFIX

patch_torchvision()
diffusers = pytest.importorskip("diffusers")

TINY = dict(  # SD v1 structure at toy width: 1x1-conv projections, one head count for all blocks
    sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
    attention_head_dim=2, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_SD2 = dict(  # SD 2.x switches: linear projections, per-block head counts, upcast attention
    TINY, block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=(2, 4, 8), cross_attention_dim=24,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    use_linear_projection=True, upcast_attention=True,
)
TINY_SD15 = dict(  # the exact block structure of SD v1.5 (16 attn1 layers) at toy width
    sample_size=32, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, attention_head_dim=2,
    norm_num_groups=8,
)
SD15_CONFIG_JSON = {  # stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Toy-size ops are dispatch-bound: one thread is faster, and far faster on a busy shared machine."""
    if "full_size" in request.node.name:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_pair(kw, scale=0.2):
    """A diffusers UNet with random weights (zero-initialised ones too) and ours holding the same weights."""
    ref = diffusers.UNet2DConditionModel(**kw).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, scale)
    ours = UNet2DConditionModel(UNetConfig(**kw)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def inputs(kw, b=2, hw=(16, 16), length=5):
    return torch.randn(b, 4, *hw), torch.tensor([10, 999][:b]), torch.randn(b, length, kw["cross_attention_dim"])


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("kw", [TINY, TINY_SD2], ids=["sd1", "sd2"])
def test_parity_with_diffusers_tiny(kw):
    ours, ref = make_pair(kw)
    x, t, ctx = inputs(kw)
    with torch.no_grad():
        for hw, timestep, length in [((16, 16), t, 5), ((15, 13), t, 5), ((16, 16), 500, 1), ((8, 8), 17.5, 3),
                                     ((16, 16), torch.tensor(3), 2)]:
            xs, c = x[..., : hw[0], : hw[1]], ctx[:, :length]
            expected = ref(xs, timestep, c).sample
            assert max_abs_diff(ours(xs, timestep, c), expected) <= 1e-4, (hw, timestep, length)


def test_sd15_layout_matches_diffusers_on_meta():
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**{k: v for k, v in SD15_CONFIG_JSON.items() if k[0] != "_"})
        ours = UNet2DConditionModel()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert len(ours.state_dict()) == 686 and sum(p.numel() for p in ours.parameters()) == 859_520_964


@pytest.mark.slow
def test_parity_sd15_full_size():
    with heavy_lock():
        torch.manual_seed(0)
        ref = diffusers.UNet2DConditionModel(**{k: v for k, v in SD15_CONFIG_JSON.items() if k[0] != "_"}).eval()
        ours = UNet2DConditionModel(UNetConfig()).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
        x, ctx = torch.randn(1, 4, 32, 32), torch.randn(1, 5, 768)
        with torch.no_grad():
            expected = ref(x, torch.tensor([500]), ctx).sample
            out = ours(x, torch.tensor([500]), ctx)
            del ref
            with ours.capture_self_attention() as maps:
                captured = ours(x, torch.tensor([500]), ctx)
        assert max_abs_diff(out, expected) / expected.abs().max().item() <= 1e-4
        assert max_abs_diff(captured, out) / out.abs().max().item() <= 1e-4
        assert len(maps) == 16
        assert sorted({m.resolution for m in maps}) == [(4, 4), (8, 8), (16, 16), (32, 32)]


# ---------------------------------------------------------------------------------------------- capture


class RecordProbs:
    """diffusers attention processor that also records softmax(Q K^T * scale) averaged over heads."""

    def __init__(self, name, records):
        self.name, self.records = name, records

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b, n, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = (attn.head_to_batch_dim(t) for t in (attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)))
        probs = attn.get_attention_scores(q, k, None)  # [B*heads, N, L]
        self.records.append((self.name, probs.view(b, attn.heads, n, -1).mean(1)))
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v))))


def expected_sd15_layers():
    """(name, resolution) of the 16 attn1 layers of SD v1.5 for a 32x32 latent, in execution order."""
    layers = [(f"down_blocks.{i}.attentions.{j}", 32 >> i) for i in range(3) for j in range(2)]
    layers.append(("mid_block.attentions.0", 4))
    layers += [(f"up_blocks.{i}.attentions.{j}", 4 << i) for i in range(1, 4) for j in range(3)]
    return [(f"{p}.transformer_blocks.0.attn1", (r, r)) for p, r in layers]


def test_capture_self_attention_matches_sdpa_and_diffusers_probs():
    ours, ref = make_pair(TINY_SD15, scale=0.1)
    x, t, ctx = inputs(TINY_SD15, hw=(32, 32), length=3)
    records = []
    ref.set_attn_processor({
        name: RecordProbs(name.removesuffix(".processor"), records) if ".attn1." in name else proc
        for name, proc in ref.attn_processors.items()
    })
    with torch.no_grad():
        fast = ours(x, t, ctx)
        with ours.capture_self_attention() as maps:
            slow = ours(x, t, ctx)
        ref_out = ref(x, t, ctx).sample
    assert max_abs_diff(slow, fast) <= 1e-5 and max_abs_diff(slow, ref_out) <= 1e-4
    assert [(m.name, m.resolution) for m in maps] == expected_sd15_layers()
    assert [name for name, _ in records] == [m.name for m in maps]
    for m, (_, probs) in zip(maps, records):
        h, w = m.resolution
        assert isinstance(m, AttentionMap) and m.probs.dtype == torch.float32
        assert m.probs.shape == (2, h * w, h * w) and not m.probs.requires_grad
        assert torch.allclose(m.probs.sum(-1), torch.ones(2, h * w), atol=1e-5)
        assert max_abs_diff(m.probs, probs) <= 1e-6, m.name
    # after the block, attention is back on the fast path
    assert all(mod.capture is None for mod in ours.modules() if hasattr(mod, "capture"))


def test_capture_callback_streams_maps_and_small_chunks(monkeypatch):
    import unet.layers

    ours = UNet2DConditionModel(UNetConfig(**TINY)).eval()
    x, t, ctx = inputs(TINY, length=1)
    with torch.no_grad(), ours.capture_self_attention() as stored:
        ours(x, t, ctx)
    seen = []
    monkeypatch.setattr(unet.layers, "PROBS_CHUNK_ELEMENTS", 1)  # one head at a time
    with torch.no_grad(), ours.capture_self_attention(callback=seen.append) as maps:
        ours(x, t, ctx)
    assert maps == [] and [m.name for m in seen] == [m.name for m in stored] and len(seen) == 4
    for a, b in zip(seen, stored):
        assert a.resolution == b.resolution and max_abs_diff(a.probs, b.probs) <= 1e-6


# ---------------------------------------------------------------------------------------------- training


def test_gradient_checkpointing_gives_same_gradients():
    ours = UNet2DConditionModel(UNetConfig(**TINY)).train()
    x, t, ctx = inputs(TINY)

    def grads():
        ours.zero_grad()
        ours(x, t, ctx).square().mean().backward()
        return {k: p.grad.clone() for k, p in ours.named_parameters()}

    plain = grads()
    ours.enable_gradient_checkpointing()
    assert ours.is_gradient_checkpointing
    ckpt = grads()
    assert max(max_abs_diff(plain[k], ckpt[k]) for k in plain) <= 1e-6


def test_autocast_bf16_forward_backward_close_to_fp32():
    ours = UNet2DConditionModel(UNetConfig(**TINY)).train()
    ours.enable_gradient_checkpointing()
    x, t, ctx = inputs(TINY)
    ref = ours(x, t, ctx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x, t, ctx)
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16
    assert max_abs_diff(out, ref) / ref.abs().max().item() < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())


def test_upcast_attention_runs_sdpa_in_float32(monkeypatch):
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v: seen.append(q.dtype) or sdpa(q, k, v))
    x, t, ctx = inputs(TINY_SD2)
    for kw, expected in [(TINY_SD2, torch.float32), (dict(TINY_SD2, upcast_attention=False), torch.bfloat16)]:
        ours = UNet2DConditionModel(UNetConfig(**kw)).eval()
        seen.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert ours(x, t, ctx).dtype == torch.bfloat16
        assert len(seen) == 2 * 11 and set(seen) == {expected}


def test_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break; the eager backend keeps this fast (inductor: slow test)."""
    ours = UNet2DConditionModel(UNetConfig(**TINY)).train()
    ours.enable_gradient_checkpointing()
    x, t, ctx = inputs(TINY, b=1)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x, t, ctx)
    out.float().mean().backward()
    assert ours.conv_in.weight.grad is not None


@pytest.mark.slow
def test_aot_compiled_training_step_matches_eager():
    """AOTAutograd traces forward+backward (checkpointing, autocast) into one graph each; same gradients.
    (Inductor code generation itself takes ~6 min on 2 busy cores for this toy model: not tested here.)"""
    ours = UNet2DConditionModel(UNetConfig(**TINY)).train()
    ours.enable_gradient_checkpointing()
    x, t, ctx = inputs(TINY, b=1)

    def grads(model):
        ours.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, ctx)
        out.float().square().mean().backward()
        return {k: p.grad.float().clone() for k, p in ours.named_parameters()}

    torch._dynamo.reset()
    compiled = grads(torch.compile(ours, fullgraph=True, backend="aot_eager"))
    eager = grads(ours)
    assert max(max_abs_diff(compiled[k], eager[k]) / (eager[k].abs().max().item() + 1e-6) for k in eager) < 0.02


# ---------------------------------------------------------------------------------------------- loading


def test_config_from_diffusers_json():
    assert UNetConfig.from_dict(SD15_CONFIG_JSON) == UNetConfig()
    sd21 = dict(SD15_CONFIG_JSON, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, sample_size=96,
                use_linear_projection=True, upcast_attention=True, dual_cross_attention=False, num_class_embeds=None,
                only_cross_attention=False, resnet_time_scale_shift="default")
    c = UNetConfig.from_dict(sd21)
    assert c.heads() == (5, 10, 20, 20) and c.use_linear_projection and c.upcast_attention
    with pytest.raises(hub.CheckpointError, match="class_embed_type"):
        UNetConfig.from_dict(dict(SD15_CONFIG_JSON, class_embed_type="timestep"))
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNetConfig(attention_head_dim=(8, 8))


def test_from_pretrained_diffusers_folder_bin_repo_id_and_save(tmp_path, hf_cache):
    ours, ref = make_pair(TINY)
    x, t, ctx = inputs(TINY)
    with torch.no_grad():
        expected = ours(x, t, ctx)
    ref.save_pretrained(tmp_path / "st" / "unet")
    ref.save_pretrained(tmp_path / "bin", safe_serialization=False)
    hf_cache.add_folder("org/tiny-sd", tmp_path / "st")
    for loaded in [
        UNet2DConditionModel.from_pretrained(tmp_path / "st" / "unet"),
        UNet2DConditionModel.from_pretrained(tmp_path / "st", subfolder="unet"),
        UNet2DConditionModel.from_pretrained(tmp_path / "bin"),
        UNet2DConditionModel.from_pretrained("org/tiny-sd", subfolder="unet"),
    ]:
        assert loaded.config == UNetConfig(**TINY) and not loaded.training
        with torch.no_grad():
            assert max_abs_diff(loaded(x, t, ctx), expected) == 0
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours")  # diffusers reads our folder
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    with torch.no_grad():
        assert max_abs_diff(back(x, t, ctx).sample, expected) <= 1e-4
    half = UNet2DConditionModel.from_pretrained(tmp_path / "ours", dtype=torch.bfloat16)
    assert half.conv_in.weight.dtype == torch.bfloat16


def test_from_pretrained_compvis_single_file(tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors.torch import save_file

    kw = dict(TINY_SD15, block_out_channels=(32, 32, 64, 64), layers_per_block=2)
    ours, _ = make_pair(kw, scale=0.1)
    config = UNetConfig(**kw)
    ldm = {LDM_PREFIX + k: v for k, v in unet_to_ldm(ours.state_dict(), config).items()}
    # the facts: diffusers' own converter maps our CompVis keys back to the same diffusers state dict
    back = convert_ldm_unet_checkpoint(ldm, {"layers_per_block": 2})
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    assert "input_blocks.3.0.op.weight" in unet_to_ldm(ours.state_dict(), config)
    ldm["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # other parts of a full SD file
    save_file(ldm, tmp_path / "sd.safetensors")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "sd.safetensors", config=config)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())
    with pytest.raises(hub.CheckpointError, match="sd.safetensors"):  # no config -> SD v1.5: does not fit
        UNet2DConditionModel.from_pretrained(tmp_path / "sd.safetensors")


def test_bad_checkpoints_name_the_key(tmp_path):
    ours = UNet2DConditionModel(UNetConfig(**TINY))
    ours.save_pretrained(tmp_path / "ok")
    path = tmp_path / "ok" / "diffusion_pytorch_model.safetensors"
    state = hub.load_state_dict_file(path)
    missing = dict(state)
    del missing["mid_block.attentions.0.transformer_blocks.0.attn1.to_k.weight"]
    hub.save_file_atomic(missing, path)
    with pytest.raises(hub.CheckpointError, match=r"missing keys \(1\): mid_block\.attentions\.0\.transformer"):
        UNet2DConditionModel.from_pretrained(tmp_path / "ok")
    state["conv_in.weight"] = torch.zeros(32, 3, 3, 3)
    hub.save_file_atomic(state, path)
    with pytest.raises(hub.CheckpointError, match=r"conv_in\.weight: checkpoint \[32, 3, 3, 3\]"):
        UNet2DConditionModel.from_pretrained(tmp_path / "ok")
    with pytest.raises(hub.CheckpointError, match="nothing-here"):
        UNet2DConditionModel.from_pretrained(tmp_path / "nothing-here")


def test_bad_inputs_raise_clear_errors():
    ours = UNet2DConditionModel(UNetConfig(**TINY))
    x, t, ctx = inputs(TINY)
    with pytest.raises(ValueError, match="in_channels=4"):
        ours(torch.randn(2, 3, 16, 16), t, ctx)
    with pytest.raises(ValueError, match="cross_attention_dim=32"):
        ours(x, t, torch.randn(2, 5, 768))
    with pytest.raises(ValueError, match="timestep"):
        ours(x, torch.tensor([1, 2, 3]), ctx)
