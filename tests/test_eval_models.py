"""Parity of eval/densenet.py and eval/inception.py with torchvision, torchxrayvision and pytorch-fid.

Every reference model gets the same random weights as ours (BatchNorm statistics included, so that no layer
is an identity) and the outputs are compared in float32.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from eval.densenet import DenseNet121, DenseNetConfig, XRVDenseNetFeatures, convert_legacy_keys
from eval.inception import InceptionV3Features
from hub import CheckpointError
from tests.helpers import heavy_lock, max_abs_diff


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Kaiming-normal convs/linears and random BatchNorm affine + running statistics (activations stay O(1))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model.eval()


def legacy_keys(state: dict) -> dict:
    """torchvision's pre-0.4 names: `denselayer1.norm1.weight` -> `denselayer1.norm.1.weight`."""
    pat = re.compile(r"^(.*denselayer\d+\.(?:norm|conv))([12])\.(weight|bias|running_mean|running_var)$")
    return {pat.sub(r"\1.\2.\3", k): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------- DenseNet


@pytest.fixture(scope="module")
def tv_densenet():
    import torchvision

    return randomize_(torchvision.models.densenet121(weights=None), seed=1)


def test_densenet121_matches_torchvision(tv_densenet):
    ours = DenseNet121().eval()
    ours.load_state_dict(tv_densenet.state_dict(), strict=True)
    assert sum(p.numel() for p in ours.parameters()) == 7978856  # torchvision's documented num_params
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref_logits = tv_densenet(x)
        ref_feats = torch.flatten(F.adaptive_avg_pool2d(F.relu(tv_densenet.features(x)), 1), 1)
        logits, feats = ours(x), ours.pooled_features(x)
    assert feats.shape == (2, 1024) and logits.shape == (2, 1000)
    assert ref_feats.abs().max() > 0.1  # the random weights keep activations alive
    assert max_abs_diff(feats, ref_feats) <= 1e-4
    assert max_abs_diff(logits, ref_logits) <= 1e-4


def test_densenet_from_pretrained_renames_legacy_keys(tmp_path):
    import torchvision

    cfg = DenseNetConfig.tiny(num_classes=5)
    ref = randomize_(torchvision.models.DenseNet(cfg.growth_rate, cfg.block_config, cfg.num_init_features,
                                                 cfg.bn_size, num_classes=5))
    state = legacy_keys(ref.state_dict())
    assert "features.denseblock1.denselayer1.norm.1.weight" in state
    assert convert_legacy_keys(state).keys() == ref.state_dict().keys()
    # an old checkpoint: legacy names and no num_batches_tracked counters
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    ours = DenseNet121.from_pretrained(tmp_path / "old.pth", cfg)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_abs_diff(ours(x), ref(x)) <= 1e-5


def test_densenet_from_pretrained_infers_channels_and_classes(tmp_path):
    cfg = DenseNetConfig.tiny(in_channels=1, num_classes=7)
    model = randomize_(DenseNet121(cfg))
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    # without a config: DenseNet-121 with the checkpoint's in_channels/num_classes; tiny weights do not fit
    with pytest.raises(CheckpointError, match=r"conv0.weight: checkpoint \[16, 1, 7, 7\] vs model \[64, 1, 7, 7\]"):
        DenseNet121.from_pretrained(tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="shape mismatches"):  # an explicit config is used as given
        DenseNet121.from_pretrained(tmp_path / "w.safetensors", DenseNetConfig.tiny())
    loaded = DenseNet121.from_pretrained(tmp_path / "w.safetensors", cfg)
    assert loaded.config == cfg and not loaded.training
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert max_abs_diff(loaded(x), model(x)) == 0


def test_densenet_bad_checkpoints(tmp_path):
    torch.save({"features.conv0.weight": torch.zeros(64, 1, 7, 7)}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing keys"):
        DenseNet121.from_pretrained(tmp_path / "partial.pth", DenseNetConfig.xrv())
    torch.save(nn.Linear(2, 2), tmp_path / "pickled_model.pt")  # like XRV's release files: a whole module
    with pytest.raises(CheckpointError, match="convert it to a state dict"):
        DenseNet121.from_pretrained(tmp_path / "pickled_model.pt")


def test_densenet_config_overrides_and_tiny():
    m = DenseNet121(in_channels=1, num_classes=7, drop_rate=0.2)
    assert m.features.conv0.in_channels == 1 and m.classifier.out_features == 7 and m.config.drop_rate == 0.2
    tiny = DenseNet121.tiny(num_classes=3)
    assert tiny.num_features == tiny.classifier.in_features == 32  # 16 -> 32 -> 16 -> 32 -> 16 -> 32 -> 16 -> 32
    assert DenseNet121().num_features == 1024
    assert sum(p.numel() for p in tiny.parameters()) < 50_000
    assert tiny(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_xrv_densenet_parity(tmp_path):
    import torchxrayvision as xrv

    ref = randomize_(xrv.models.DenseNet(weights=None), seed=2)  # 1 channel, 18 outputs, op_threshs=None
    state = dict(ref.state_dict())
    state["op_threshs"] = torch.rand(18)  # as in a state dict of xrv.models.DenseNet(weights=...)
    save_file(state, tmp_path / "xrv.safetensors")

    net = DenseNet121.from_pretrained(tmp_path / "xrv.safetensors")
    assert net.config == DenseNetConfig.xrv()
    x = torch.rand(2, 1, 64, 64) * 2048 - 1024
    with torch.no_grad():
        assert max_abs_diff(net(x), ref(x)) <= 1e-4 * ref(x).abs().max().item()
        assert max_abs_diff(net.pooled_features(x), ref.features2(x)) <= 1e-4 * ref.features2(x).abs().max().item()

    ext = XRVDenseNetFeatures.from_pretrained(tmp_path / "xrv.safetensors")
    assert ext.feature_dim == 1024 and ext.resolution == 224 and not ext.training
    assert all(torch.equal(v, state[k]) for k, v in ext.net.state_dict().items())


def test_xrv_features_match_xrv_preprocessing_and_resize():
    """[0, 1] images -> XRV range -> XRV's own resize (fix_resolution) -> features2; a tiny XRV DenseNet."""
    import torchxrayvision as xrv

    cfg = DenseNetConfig.tiny(in_channels=1, num_classes=18)
    ref = randomize_(xrv.models.DenseNet(cfg.growth_rate, cfg.block_config, cfg.num_init_features, cfg.bn_size))
    ref.input_resolution = 224  # as set by xrv for the densenet121-res224-* weights
    ext = XRVDenseNetFeatures(DenseNet121(cfg)).eval()
    ext.net.load_state_dict(ref.state_dict())
    img = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        ours, theirs = ext(img), ref.features2((2 * img - 1) * 1024)
    assert ours.shape == (2, ext.feature_dim)
    assert max_abs_diff(ours, theirs) <= 1e-4 * theirs.abs().max().item()


def test_xrv_features_rgb_is_luminance():
    ext = XRVDenseNetFeatures(DenseNet121.tiny(in_channels=1)).eval()
    rgb = torch.rand(2, 3, 32, 32)
    gray = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2])[:, None]
    with torch.no_grad():
        assert max_abs_diff(ext(rgb), ext(gray)) <= 1e-4 * ext(gray).abs().max().item()
    assert ext.preprocess(gray).shape == (2, 1, 224, 224)
    with pytest.raises(ValueError, match="square"):
        ext.preprocess(torch.rand(1, 1, 32, 48))
    with pytest.raises(ValueError, match="1-channel"):
        XRVDenseNetFeatures(DenseNet121.tiny())


# ---------------------------------------------------------------------------------------------- Inception


@pytest.fixture(scope="module")
def random_inception():
    return randomize_(InceptionV3Features(), seed=3)


def test_inception_matches_pytorch_fid(random_inception, monkeypatch):
    import pytorch_fid.inception as pfi

    state = random_inception.state_dict()
    # pytorch-fid's fid_inception_v3() fetches the weight file: hand it our random state dict instead.
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: dict(state))
    ref = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()  # strict load: same keys
    x = torch.rand(2, 3, 75, 75)
    with torch.no_grad():  # ~0.2 GB peak: not worth serialising with other processes' heavy tests
        theirs = ref(x)[0].flatten(1)
        ours = random_inception(x)
    assert ours.shape == (2, 2048)
    assert theirs.abs().max() > 0.1
    assert max_abs_diff(ours, theirs) <= 1e-4 * max(1.0, theirs.abs().max().item())


def test_inception_from_pretrained_and_gray(random_inception, tmp_path):
    state = {k: v for k, v in random_inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "pt_inception-2015-12-05-6726825d.pth")  # the layout of pytorch-fid's file
    loaded = InceptionV3Features.from_pretrained(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    for k, v in random_inception.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(loaded.state_dict()[k], v), k
    gray = torch.rand(1, 1, 75, 75)
    x = loaded.preprocess(gray)
    assert x.shape == (1, 3, 299, 299) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, loaded.preprocess(gray.expand(-1, 3, -1, -1)))
    del state["fc.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="fc.weight"):
        InceptionV3Features.from_pretrained(tmp_path / "bad.pth")


@pytest.mark.slow
def test_full_size_parity_299_and_224(random_inception, monkeypatch):
    """Native resolutions (no resize in the model), batch 4."""
    import pytorch_fid.inception as pfi
    import torchxrayvision as xrv

    state = random_inception.state_dict()
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: dict(state))
    ref = pfi.InceptionV3([3]).eval()
    x = torch.rand(4, 3, 299, 299)
    with heavy_lock(), torch.no_grad():
        theirs, ours = ref(x)[0].flatten(1), random_inception(x)
    assert max_abs_diff(ours, theirs) <= 1e-4 * max(1.0, theirs.abs().max().item())

    xref = randomize_(xrv.models.DenseNet(weights=None), seed=4)
    xref.input_resolution = 224
    ext = XRVDenseNetFeatures(DenseNet121(DenseNetConfig.xrv())).eval()
    ext.net.load_state_dict(xref.state_dict())
    img = torch.rand(4, 1, 224, 224)
    with heavy_lock(), torch.no_grad():
        theirs, ours = xref.features2((2 * img - 1) * 1024), ext(img)
    assert max_abs_diff(ours, theirs) <= 1e-4 * theirs.abs().max().item()


def test_calibrate_batchnorm_sets_reference_statistics():
    from eval.densenet import calibrate_batchnorm

    torch.manual_seed(0)
    feats = XRVDenseNetFeatures(DenseNet121(DenseNetConfig.tiny(in_channels=1)), resolution=32).eval()
    images = torch.rand(10, 1, 32, 32)
    with torch.no_grad():
        before = feats(images)
    assert calibrate_batchnorm(feats, images, batch_size=5) is feats and not feats.training
    bn = feats.net.features.norm0
    with torch.no_grad():
        y = feats.net.features.conv0(feats.preprocess(images))  # what norm0 normalises
        after = feats(images)
    assert torch.allclose(bn.running_mean, y.mean((0, 2, 3)), rtol=1e-4, atol=1e-3)
    assert bn.momentum == 0.1  # restored
    assert before.abs().max() > 10 * after.abs().max()  # random-init activations no longer blow up
