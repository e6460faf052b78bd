"""vit_dino: parity with transformers ViTModel (DINO v1), transformers Dinov2Model / Dinov2WithRegistersModel
(facebook/dinov2-base, microsoft/rad-dino, facebook/dinov2-with-registers-base) and timm DINOv2-reg4, Hub
loading, preprocess (ImageNet defaults, or the checkpoint's preprocessor_config.json)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import hub
from tests.helpers import heavy_lock, max_abs_diff
from vit_dino import DinoConfig, DinoViT, convert, from_minus1_1, preprocess

TOL = 1e-4
TINY_HF = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               image_size=64, patch_size=16)
TINY_TIMM = dict(img_size=56, embed_dim=64, depth=2, num_heads=4)
# The published timm/vit_base_patch14_reg4_dinov2.lvd142m config.json (older timm: no model_args).
TIMM_HUB_CONFIG = {
    "architecture": "vit_base_patch14_reg4_dinov2", "num_classes": 0, "num_features": 768,
    "global_pool": "token",
    "pretrained_cfg": {
        "tag": "lvd142m", "custom_load": False, "input_size": [3, 518, 518], "fixed_input_size": True,
        "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center", "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225], "num_classes": 0, "pool_size": None, "first_conv": "patch_embed.proj",
        "classifier": "head", "license": "apache-2.0",
    },
}


TINY_DINOV2 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14,
                   layerscale_value=0.5)
# preprocessor_config.json of microsoft/rad-dino (BitImageProcessor; its own CXR mean/std, 518 px shorter side
# and crop) and of facebook/dinov2-base / -with-registers-base (shorter side 256, crop 224, ImageNet mean/std).
RAD_DINO_PROCESSOR = {
    "crop_size": {"height": 518, "width": 518}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5307, 0.5307, 0.5307],
    "image_processor_type": "BitImageProcessor", "image_std": [0.2583, 0.2583, 0.2583], "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 518},
}
DINOV2_BASE_PROCESSOR = {
    **RAD_DINO_PROCESSOR, "crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 256},
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
}


def randomize(model):
    """Perturb every parameter (LayerNorm gains, LayerScale, biases too) so a swapped weight shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    return model.eval()


def hf_vit(pooler, **overrides):
    from transformers import ViTConfig, ViTModel

    return randomize(ViTModel(ViTConfig(**{**TINY_HF, **overrides}), add_pooling_layer=pooler))


def timm_vit(arch="vit_base_patch14_reg4_dinov2", **overrides):
    import timm

    kw = {**TINY_TIMM, **overrides}
    return randomize(timm.create_model(arch, pretrained=False, dynamic_img_size=True, **kw))


def hf_dinov2(registers=0, **overrides):
    """transformers Dinov2Model (registers=0) or Dinov2WithRegistersModel, tiny, random weights."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    kw = {**TINY_DINOV2, **overrides}
    if registers:
        return randomize(Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw)))
    return randomize(Dinov2Model(Dinov2Config(**kw)))


def ours_from(ref, config, layout):
    state = convert.convert_state_dict(ref.state_dict(), layout)
    config = dataclasses.replace(config, has_pooler="pooler.dense.weight" in state)
    model = DinoViT(config).eval()
    model.load_state_dict(state, strict=True)
    return model


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("pooler", [False, True])
def test_parity_transformers_vit(pooler):
    ref = hf_vit(pooler)
    ours = ours_from(ref, convert.config_from_transformers(ref.config.to_dict()), "transformers")
    assert ours.config.num_global_tokens == 1 + pooler
    for hw in [(64, 64), (96, 96), (48, 80)]:  # native, interpolated, non-square
        x = torch.randn(2, 3, *hw)
        with torch.inference_mode():
            want = ref(x, interpolate_pos_encoding=True)
            got, glb = ours(x), ours.global_tokens(x)
        assert got.shape == want.last_hidden_state.shape == (2, 1 + hw[0] * hw[1] // 256, 64)
        assert max_abs_diff(got, want.last_hidden_state) <= TOL, hw
        assert glb.shape == (2, 1 + pooler, 64)
        assert max_abs_diff(glb[:, 0], want.last_hidden_state[:, 0]) <= TOL
        if pooler:
            assert max_abs_diff(glb[:, 1], want.pooler_output) <= TOL


@pytest.mark.parametrize("arch,regs", [("vit_base_patch14_reg4_dinov2", 4), ("vit_giant_patch14_reg4_dinov2", 4)])
def test_parity_timm_dinov2(arch, regs):
    ref = timm_vit(arch, mlp_ratio=4.0)  # ViT-g's SwiGLU at the tiny width: fc1 64 -> 256, fc2 128 -> 64
    config = dataclasses.replace(convert.TIMM_ARCHITECTURES[arch], image_size=56, hidden_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
    ours = ours_from(ref, config, "timm")
    assert ours.config.pos_embed_has_class == (regs == 0) and ours.config.num_register_tokens == regs
    for hw in [(56, 56), (84, 84), (42, 70)]:  # native, interpolated, non-square
        x = torch.randn(2, 3, *hw)
        with torch.inference_mode():
            want = ref.forward_features(x)
            got, glb = ours(x), ours.global_tokens(x)
        assert got.shape == want.shape == (2, 1 + regs + hw[0] * hw[1] // 196, 64)
        assert max_abs_diff(got, want) <= TOL, hw
        assert max_abs_diff(glb, want[:, : 1 + regs]) <= TOL  # c_GLB = [CLS, registers]


@pytest.mark.parametrize("registers,swiglu", [(0, False), (0, True), (4, False), (4, True)])
def test_parity_transformers_dinov2(registers, swiglu):
    """In-memory (transformers >= 5 names: q_proj, gate_proj/up_proj) Dinov2[WithRegisters]Model."""
    ref = hf_dinov2(registers, use_swiglu_ffn=swiglu)
    config, layout = convert.config_from_json(ref.config.to_dict())
    ours = ours_from(ref, config, layout)
    assert ours.config.num_global_tokens == 1 + registers and not ours.config.has_pooler
    for hw in [(56, 56), (84, 84), (42, 70)]:  # native, interpolated, non-square
        x = torch.randn(2, 3, *hw)
        with torch.inference_mode():
            want = ref(x)
            got, glb = ours(x), ours.global_tokens(x)
        assert got.shape == want.last_hidden_state.shape == (2, 1 + registers + hw[0] * hw[1] // 196, 64)
        assert max_abs_diff(got, want.last_hidden_state) <= TOL, hw
        assert max_abs_diff(glb, want.last_hidden_state[:, : 1 + registers]) <= TOL  # [CLS, registers]
        assert torch.equal(want.pooler_output, want.last_hidden_state[:, 0])  # the pooler IS the CLS token


def test_documented_timm_architectures_match_timm_on_meta():
    import timm

    for arch, config in convert.TIMM_ARCHITECTURES.items():
        with torch.device("meta"):
            ref, ours = timm.create_model(arch, pretrained=False, num_classes=0), DinoViT(config)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}, arch
        assert config.image_size == ref.pretrained_cfg["input_size"][1] and not config.pos_embed_has_class


def test_fused_layout_and_transformers5_names_load():
    ref = hf_vit(True)
    config = dataclasses.replace(convert.config_from_transformers(ref.config.to_dict()), has_pooler=True)
    in_memory = {k: v for k, v in ref.state_dict().items()}  # transformers 5 names (layers.{i}.attention.q_proj)
    assert any(".q_proj." in k for k in in_memory)
    ours = DinoViT(config)
    ours.load_state_dict(convert.convert_state_dict(in_memory, "transformers"), strict=True)
    again = convert.convert_state_dict(ours.state_dict(), "timm")  # already fused: unchanged
    assert again.keys() == ours.state_dict().keys()


# ---------------------------------------------------------------------------------------------- Hub loading


def test_from_pretrained_transformers_hub_layout(tmp_path, hf_cache):
    for repo, pooler in [("facebook/dino-vitb16", False), ("org/dino-with-pooler", True)]:
        ref = hf_vit(pooler)
        ref.save_pretrained(tmp_path / repo)  # config.json + model.safetensors, legacy Hub key names
        saved = hub.load_state_dict_file(tmp_path / repo / "model.safetensors")
        assert "encoder.layer.0.attention.attention.query.weight" in saved
        hf_cache.add_folder(repo, tmp_path / repo)
        dino = DinoViT.from_pretrained(repo)
        assert dino.config.has_pooler == pooler and dino.config.layer_norm_eps == 1e-12
        x = torch.randn(1, 3, 64, 64)
        with torch.inference_mode():
            assert max_abs_diff(dino(x), ref(x).last_hidden_state) <= TOL
            assert dino.global_tokens(x).shape == (1, 1 + pooler, 64)


DINOV2_HUB = [  # (repo id, registers, SwiGLU, preprocessor_config.json or None)
    ("microsoft/rad-dino", 0, False, RAD_DINO_PROCESSOR),
    ("facebook/dinov2-base", 0, False, DINOV2_BASE_PROCESSOR),
    ("facebook/dinov2-with-registers-base", 4, False, DINOV2_BASE_PROCESSOR),
    ("facebook/dinov2-with-registers-giant", 4, True, None),
]


@pytest.mark.parametrize("repo,registers,swiglu,processor", DINOV2_HUB, ids=[r[0] for r in DINOV2_HUB])
def test_from_pretrained_dinov2_hub_layout(tmp_path, hf_cache, repo, registers, swiglu, processor):
    """transformers' own save_pretrained (legacy Hub key names) -> offline cache -> DinoViT.from_pretrained."""
    ref = hf_dinov2(registers, use_swiglu_ffn=swiglu)
    ref.save_pretrained(tmp_path / repo)
    saved = hub.load_state_dict_file(tmp_path / repo / "model.safetensors")
    mlp = "mlp.weights_in.weight" if swiglu else "mlp.fc1.weight"
    for key in ("encoder.layer.0.attention.attention.query.weight", "encoder.layer.0.layer_scale1.lambda1",
                f"encoder.layer.0.{mlp}", "embeddings.mask_token"):
        assert key in saved, key
    assert ("embeddings.register_tokens" in saved) == bool(registers)
    if processor:
        (tmp_path / repo / "preprocessor_config.json").write_text(json.dumps(processor))
    hf_cache.add_folder(repo, tmp_path / repo)
    dino = DinoViT.from_pretrained(repo)
    c = dino.config
    assert (c.image_size, c.patch_size, c.num_register_tokens, c.layerscale_init) == (56, 14, registers, 0.5)
    assert not c.has_pooler and c.pos_embed_antialias == bool(registers) and dino.pos_embed.shape[1] == 1 + 16
    for hw in [(56, 56), (84, 84), (42, 70)]:  # native, interpolated, non-square
        x = torch.randn(2, 3, *hw)
        with torch.inference_mode():
            want = ref(x)
            got, glb = dino(x), dino.global_tokens(x)
        diffs = max_abs_diff(got, want.last_hidden_state), max_abs_diff(glb, want.last_hidden_state[:, : 1 + registers])
        print(f"{repo} {hw}: last_hidden_state {diffs[0]:.2e}, c_GLB {diffs[1]:.2e}")
        assert glb.shape == (2, 1 + registers, 64) and max(diffs) <= TOL, (hw, diffs)


def test_preprocess_follows_the_checkpoints_preprocessor_config(tmp_path, hf_cache):
    """rad-dino's own mean/std/518 px; dinov2-base's resize 256 -> crop 224; ImageNet at image_size without one."""
    from transformers import BitImageProcessor

    for repo, processor in [("microsoft/rad-dino", RAD_DINO_PROCESSOR), ("facebook/dinov2-base", DINOV2_BASE_PROCESSOR),
                            ("org/dinov2-no-processor", None)]:
        hf_dinov2().save_pretrained(tmp_path / repo)
        if processor:
            (tmp_path / repo / "preprocessor_config.json").write_text(json.dumps(processor))
        hf_cache.add_folder(repo, tmp_path / repo)
    rad = DinoViT.from_pretrained("microsoft/rad-dino")
    c = rad.config
    assert (c.image_mean, c.image_std, c.input_size, c.crop_pct) == ((0.5307,) * 3, (0.2583,) * 3, 518, 1.0)
    flat = rad.preprocess(torch.full((1, 1, 600, 600), 0.5))
    assert flat.shape == (1, 3, 518, 518) and torch.allclose(flat, torch.tensor((0.5 - 0.5307) / 0.2583))
    img = Image.fromarray(smooth_rgb(300, 300))
    for dino, cfg in [(rad, RAD_DINO_PROCESSOR), (DinoViT.from_pretrained("facebook/dinov2-base"), DINOV2_BASE_PROCESSOR)]:
        want = BitImageProcessor(**cfg)(img, return_tensors="pt")["pixel_values"]
        got = dino.preprocess(img)
        assert got.shape == want.shape and max_abs_diff(got, want) < 0.03, (cfg["size"], max_abs_diff(got, want))
    base = DinoViT.from_pretrained("facebook/dinov2-base").config
    assert (base.input_size, base.crop_pct, base.image_size) == (224, 224 / 256, 56)
    plain = DinoViT.from_pretrained("org/dinov2-no-processor")
    assert plain.config.image_mean == (0.485, 0.456, 0.406) and plain.config.input_size is None
    assert plain.preprocess(img).shape == (1, 3, 56, 56)
    with torch.inference_mode():  # the 518 px crop runs through the interpolated 4x4 grid
        assert rad.global_tokens(rad.preprocess(img)).shape == (1, 1, 64)


def test_image_processor_config_variants_and_errors():
    from vit_dino.preprocess import fields_from_image_processor as fields

    vit = {"do_normalize": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
           "image_std": [0.229, 0.224, 0.225], "resample": 2, "size": 224}  # ViTImageProcessor (no crop)
    assert fields(vit) == dict(image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225), input_size=224,
                               crop_pct=1.0)
    assert fields({**vit, "size": {"height": 224, "width": 224}})["input_size"] == 224
    assert fields({**RAD_DINO_PROCESSOR, "do_center_crop": False})["input_size"] == 518
    for bad, match in [({"do_resize": False}, "do_resize"), ({"size": {"height": 224, "width": 160}}, "size"),
                       ({"rescale_factor": 1.0}, "rescale_factor"), ({"image_mean": [0.5, 0.5]}, "image_mean"),
                       ({"crop_size": {"height": 600, "width": 600}}, "larger")]:
        with pytest.raises(hub.CheckpointError, match=match):
            fields({**RAD_DINO_PROCESSOR, **bad}, source="x/preprocessor_config.json")


def test_from_pretrained_timm_hub_layout(tmp_path, hf_cache):
    from timm.models._hub import save_for_hf

    repo = "timm/vit_base_patch14_reg4_dinov2.lvd142m"
    ref = timm_vit()
    save_for_hf(ref, tmp_path / "t", safe_serialization=True)  # timm's own Hub export
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["architecture"] == "vit_base_patch14_reg4_dinov2" and cfg["model_args"]["embed_dim"] == 64
    hf_cache.add_folder(repo, tmp_path / "t")
    dino = DinoViT.from_pretrained(repo)
    c = dino.config
    assert (c.image_size, c.patch_size, c.hidden_size, c.num_register_tokens) == (56, 14, 64, 4)
    assert not c.has_pooler and not c.pos_embed_has_class and c.layer_norm_eps == 1e-6
    x = torch.randn(2, 3, 70, 42)
    with torch.inference_mode():
        assert max_abs_diff(dino(x), ref.forward_features(x)) <= TOL
        assert dino.global_tokens(x).shape == (2, 5, 64)


def test_timm_config_selects_builtin_and_model_args_override():
    assert convert.config_from_timm(TIMM_HUB_CONFIG) == DinoConfig.dinov2_vitb14_reg4()
    d = {**TIMM_HUB_CONFIG, "model_args": {"embed_dim": 384, "num_heads": 6, "mlp_ratio": 2.0, "img_size": 224}}
    c = convert.config_from_timm(d)
    assert (c.hidden_size, c.num_attention_heads, c.intermediate_size, c.image_size) == (384, 6, 768, 224)
    with pytest.raises(hub.CheckpointError, match="qk_norm"):
        convert.config_from_timm({**TIMM_HUB_CONFIG, "model_args": {"qk_norm": True}})
    with pytest.raises(hub.CheckpointError, match="vit_huge_patch14_clip_224"):
        convert.config_from_timm({**TIMM_HUB_CONFIG, "architecture": "vit_huge_patch14_clip_224"})


def test_pytorch_model_bin_and_save_pretrained_roundtrip(tmp_path):
    ref = hf_vit(False)
    ref.config.save_pretrained(tmp_path / "bin")
    torch.save(dict(ref.state_dict()), tmp_path / "bin" / "pytorch_model.bin")
    dino = DinoViT.from_pretrained(tmp_path / "bin")
    dino.save_pretrained(tmp_path / "ours")
    again = DinoViT.from_pretrained(tmp_path / "ours" / "model.safetensors")
    assert again.config == dino.config
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(again(x), dino(x))


def test_checkpoint_of_the_other_family_is_rejected(tmp_path):
    hf, tm = hf_vit(False), timm_vit()
    hf.config.save_pretrained(tmp_path / "a")  # transformers config.json, timm weights
    hub.save_file_atomic(tm.state_dict(), tmp_path / "a" / "model.safetensors")
    with pytest.raises(hub.CheckpointError, match=r"transformers checkpoint.*but the weights have timm keys"):
        DinoViT.from_pretrained(tmp_path / "a")
    (tmp_path / "b").mkdir()  # timm config.json, transformers weights
    (tmp_path / "b" / "config.json").write_text(json.dumps(TIMM_HUB_CONFIG))
    hub.save_file_atomic(hf.state_dict(), tmp_path / "b" / "model.safetensors")
    with pytest.raises(hub.CheckpointError, match=r"timm checkpoint.*but the weights have transformers"):
        DinoViT.from_pretrained(tmp_path / "b")
    (tmp_path / "c" / "config.json").parent.mkdir()  # right family, wrong size: strict shape report
    (tmp_path / "c" / "config.json").write_text(json.dumps(TIMM_HUB_CONFIG))
    hub.save_file_atomic(tm.state_dict(), tmp_path / "c" / "model.safetensors")
    with pytest.raises(hub.CheckpointError, match="shape mismatches"):
        DinoViT.from_pretrained(tmp_path / "c")


# ---------------------------------------------------------------------------------------------- inputs


def test_bad_inputs_give_clear_errors():
    dino = DinoViT(DinoConfig.tiny()).eval()
    with pytest.raises(ValueError, match=r"not a multiple of the patch size 14"):
        dino(torch.randn(1, 3, 56, 50))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\].*\(1, 1, 56, 56\)"):
        dino(torch.randn(1, 1, 56, 56))
    with pytest.raises(ValueError, match=r"\(3, 56, 56\)"):
        dino(torch.randn(3, 56, 56))
    with pytest.raises(ValueError, match="patch size"):
        dino.preprocess(torch.rand(1, 3, 64, 64), size=50)


def test_frozen_use_inference_mode_grad_and_bf16():
    dino = randomize(DinoViT(DinoConfig.tiny()))
    x = torch.randn(2, 3, 56, 56)
    trained = dino(x)  # autograd path (no in-place residuals) = inference path
    trained.square().mean().backward()
    assert dino.blocks[0].ls1.gamma.grad is not None
    dino.requires_grad_(False)
    with torch.inference_mode():
        ref = dino(x)
        assert max_abs_diff(ref, trained) <= 1e-6
        assert dino.global_tokens(x).shape == (2, 5, 64)
        assert max_abs_diff(dino.global_tokens(x), ref[:, :5]) <= 1e-5
        low = dino.to(torch.bfloat16)(x)  # float32 pixels are cast to the weights' dtype
    assert low.dtype == torch.bfloat16 and max_abs_diff(low, ref) < 0.1


def smooth_rgb(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([np.sin(xx / 7), np.cos(yy / 5), np.sin((xx + yy) / 9)], -1)
    return (rgb * 120 + 128).astype(np.uint8)


def test_preprocess_matches_timm_eval_transform():
    from timm.data import create_transform

    t = create_transform(input_size=(3, 56, 56), interpolation="bicubic", crop_pct=1.0, crop_mode="center",
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    x = torch.rand(2, 3, 90, 70)  # float tensors: timm's torchvision path, exactly
    assert max_abs_diff(preprocess(x, 56), torch.stack([t(im) for im in x])) <= 1e-5
    img = Image.fromarray(smooth_rgb(60, 80))  # PIL: PIL resamples in uint8, so up to ~1 grey level apart
    got, want = preprocess(img, 56), t(img)[None]
    assert got.shape == (1, 3, 56, 56) and max_abs_diff(got, want) < 0.03


def test_preprocess_matches_vit_image_processor_on_square_images():
    from transformers import ViTImageProcessor

    proc = ViTImageProcessor(size={"height": 56, "width": 56}, resample=Image.BICUBIC,
                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    img = Image.fromarray(smooth_rgb(80, 80))
    want = proc(img, return_tensors="pt")["pixel_values"]
    assert max_abs_diff(preprocess(img, 56), want) < 0.03


def test_preprocess_input_kinds():
    dino = DinoViT(DinoConfig.tiny())
    gray = smooth_rgb(64, 64)[..., 0]
    ref = dino.preprocess(torch.from_numpy(gray)[None, None].float() / 255)
    assert ref.shape == (1, 3, 56, 56) and ref.dtype == torch.float32
    assert torch.allclose(ref[:, 0] * 0.229 + 0.485, ref[:, 1] * 0.224 + 0.456, atol=1e-6)  # gray repeated to 3 channels
    mean = torch.tensor(dino.config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(dino.config.image_std).view(1, 3, 1, 1)
    flat = preprocess(torch.full((1, 1, 8, 8), 0.5), 8)
    assert torch.allclose(flat, ((0.5 - mean) / std).expand(1, 3, 8, 8))
    same = [
        gray,  # numpy uint8 [H, W]
        gray[None],  # [B, H, W]
        torch.from_numpy(gray)[None, None],  # uint8 tensor [B, 1, H, W]
        Image.fromarray(gray),  # PIL L
        Image.fromarray(gray.astype(np.uint16) * 257),  # PIL I;16 (16-bit PNG)
        (gray.astype(np.uint16) * 257)[None],  # numpy uint16
        from_minus1_1(torch.from_numpy(gray).float()[None, None] / 127.5 - 1),  # [-1, 1] floats
        torch.from_numpy(np.repeat(gray[None, None], 3, 1)),  # [B, 3, H, W]
    ]
    for item in same:
        assert max_abs_diff(dino.preprocess(item), ref) <= 1e-4, type(item)
    batch = dino.preprocess([Image.fromarray(smooth_rgb(60, 90)), gray, Image.fromarray(gray)])
    assert batch.shape == (3, 3, 56, 56)
    assert max_abs_diff(batch[1:2], ref) <= 1e-4


def test_preprocess_rejects_ambiguous_or_out_of_range():
    with pytest.raises(ValueError, match=r"\(64, 64, 3\) looks channels-last"):
        preprocess(smooth_rgb(64, 64))
    with pytest.raises(ValueError, match="from_minus1_1"):
        preprocess(torch.rand(1, 3, 16, 16) * 2 - 1, 16)
    with pytest.raises(ValueError, match=r"\(1, 2, 16, 16\)"):
        preprocess(torch.rand(1, 2, 16, 16), 16)
    with pytest.raises(TypeError, match="str"):
        preprocess("image.png", 16)


# ---------------------------------------------------------------------------------------------- real sizes


@pytest.mark.slow
def test_real_sizes_both_families(tmp_path, hf_cache):
    """ViT-B/16 (transformers) and ViT-B/14-reg4 (timm) at full width/depth, loaded through Hub layouts."""
    import timm
    from timm.models._hub import save_for_hf
    from transformers import ViTConfig, ViTModel

    with heavy_lock():
        hf = randomize(ViTModel(ViTConfig(), add_pooling_layer=False))  # = facebook/dino-vitb16 config
        hf.save_pretrained(tmp_path / "v1")
        hf_cache.add_folder("facebook/dino-vitb16", tmp_path / "v1")
        dino = DinoViT.from_pretrained("facebook/dino-vitb16")
        assert dino.config == DinoConfig.dino_vitb16()
        for hw in [(224, 224), (160, 112)]:
            x = torch.randn(1, 3, *hw)
            with torch.inference_mode():
                diff = max_abs_diff(dino(x), hf(x, interpolate_pos_encoding=True).last_hidden_state)
            assert diff <= TOL, (hw, diff)
        del hf, dino

        tm = randomize(timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, dynamic_img_size=True))
        save_for_hf(tm, tmp_path / "v2", safe_serialization=True)
        (tmp_path / "v2" / "config.json").write_text(json.dumps(TIMM_HUB_CONFIG))  # as published
        hf_cache.add_folder("timm/vit_base_patch14_reg4_dinov2.lvd142m", tmp_path / "v2")
        dino = DinoViT.from_pretrained("timm/vit_base_patch14_reg4_dinov2.lvd142m")
        assert dino.config == DinoConfig.dinov2_vitb14_reg4()
        assert len(hub.load_state_dict_file(tmp_path / "v2" / "model.safetensors")) == 175
        for hw in [(224, 224), (140, 98)]:
            x = torch.randn(1, 3, *hw)
            with torch.inference_mode():
                want = tm.forward_features(x)
                diff = max_abs_diff(dino(x), want)
                glb = dino.global_tokens(x)
            assert diff <= TOL, (hw, diff)
            assert glb.shape == (1, 5, 768) and max_abs_diff(glb, want[:, :5]) <= TOL


# microsoft/rad-dino's config.json fields (a Dinov2Config, ViT-B/14, 518 px: facebook/dinov2-base's architecture);
# facebook/dinov2-with-registers-base adds model_type dinov2_with_registers and num_register_tokens 4.
RAD_DINO_CONFIG = {
    "architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": 768, "num_hidden_layers": 12,
    "num_attention_heads": 12, "mlp_ratio": 4, "hidden_act": "gelu", "image_size": 518, "patch_size": 14,
    "layer_norm_eps": 1e-06, "layerscale_value": 1.0, "num_channels": 3, "qkv_bias": True, "use_swiglu_ffn": False,
    "attention_probs_dropout_prob": 0.0, "hidden_dropout_prob": 0.0, "drop_path_rate": 0.0,
    "initializer_range": 0.02,
}


@pytest.mark.slow
@pytest.mark.parametrize("repo,registers", [("microsoft/rad-dino", 0), ("facebook/dinov2-with-registers-base", 4)])
def test_real_size_transformers_dinov2(tmp_path, hf_cache, repo, registers):
    """ViT-B/14 at full width/depth in the Dinov2 Hub layouts: native 518 px and the interpolated 224 px."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    with heavy_lock():
        if registers:
            d = {**RAD_DINO_CONFIG, "model_type": "dinov2_with_registers", "num_register_tokens": registers,
                 "architectures": ["Dinov2WithRegistersModel"]}
            ref = randomize(Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**d)))
        else:
            ref = randomize(Dinov2Model(Dinov2Config(**RAD_DINO_CONFIG)))
        ref.save_pretrained(tmp_path / "m")
        (tmp_path / "m" / "preprocessor_config.json").write_text(
            json.dumps(RAD_DINO_PROCESSOR if not registers else DINOV2_BASE_PROCESSOR))
        hf_cache.add_folder(repo, tmp_path / "m")
        dino = DinoViT.from_pretrained(repo)
        c = dino.config
        assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.grid_size) == (768, 12, 3072, 37)
        assert dino.preprocess(torch.rand(1, 1, 600, 600)).shape[-1] == (518 if not registers else 224)
        for hw in [(518, 518), (224, 224)]:
            x = torch.randn(1, 3, *hw)
            with torch.inference_mode():
                want = ref(x).last_hidden_state
                got, glb = dino(x), dino.global_tokens(x)
            diffs = max_abs_diff(got, want), max_abs_diff(glb, want[:, : 1 + registers])
            print(f"{repo} real size {hw}: last_hidden_state {diffs[0]:.2e}, c_GLB {diffs[1]:.2e}")
            assert glb.shape == (1, 1 + registers, 768) and max(diffs) <= TOL, (hw, diffs)
