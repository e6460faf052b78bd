"""DenseNet-121 (Huang et al. 2017, arXiv 1608.06993) with torchvision's checkpoint key layout.

A dense block keeps every feature map it has produced: layer j sees the channel-concatenation of the block
input and the outputs of layers 1..j-1, squeezes it with a 1x1 "bottleneck" conv to bn_size * growth_rate
channels, and adds `growth_rate` new channels with a 3x3 conv (BN-ReLU-Conv order, "DenseNet-BC"). Between
blocks a transition halves the channels (1x1 conv) and the resolution (2x2 average pool). For DenseNet-121
(growth 32, blocks (6, 12, 24, 16), 64 stem channels) the channel count runs 64 -> 256 -> 128 -> 512 -> 256
-> 1024 -> 512 -> 1024, and the head is ReLU -> global average pool -> Linear(1024, num_classes).

Keys (torchvision `densenet121`, also torchxrayvision's `DenseNet`):
    features.{conv0,norm0}, features.denseblock{i}.denselayer{j}.{norm1,conv1,norm2,conv2},
    features.transition{i}.{norm,conv}, features.norm5, classifier

Checkpoints this loads (`DenseNet121.from_pretrained`):
- torchvision's ImageNet `densenet121-a639ec97.pth` (3 channels, 1000 classes). Its dense layers use the
  pre-0.4 names `norm.1`, `conv.1`, ... which `convert_legacy_keys` renames with torchvision's own regex.
- torchxrayvision's `densenet121-res224-all` (1 channel, 18 classes; `DenseNetConfig.xrv()`). XRV ships a
  pickled whole model, which we never unpickle. Convert it once, where torchxrayvision is installed:

      import torch, torchxrayvision as xrv
      model = xrv.models.DenseNet(weights="densenet121-res224-all")
      torch.save(model.state_dict(), "xrv-densenet121-all.pth")

  Its state dict carries `op_threshs` (18 operating-point thresholds XRV uses to rescale probabilities, not a
  weight of the network); it is dropped on load. Checkpoints written before BatchNorm had
  `num_batches_tracked` get that counter set to 0, as `BatchNorm2d._load_from_state_dict` does.

`XRVDenseNetFeatures` is the FID feature extractor of the paper: XRV's "features2" path (features -> ReLU ->
global average pool, 1024-d) on grayscale images rescaled to XRV's [-1024, 1024] range at 224 x 224.
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import hub


@dataclasses.dataclass(frozen=True)
class DenseNetConfig:
    """Defaults are torchvision's densenet121 (ImageNet). See `xrv()` and `tiny()` for the other presets."""

    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4  # bottleneck width = bn_size * growth_rate (paper, Sec. 3 "DenseNet-B")
    drop_rate: float = 0.0
    num_classes: int = 1000
    in_channels: int = 3

    @classmethod
    def xrv(cls) -> DenseNetConfig:
        """torchxrayvision `densenet121-res224-*`: one input channel, 18 pathology outputs."""
        return cls(in_channels=1, num_classes=18)

    @classmethod
    def tiny(cls, **overrides) -> DenseNetConfig:
        """A ~30k-parameter DenseNet with the same structure, for CPU tests and quick experiments."""
        return cls(**dict(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2) | overrides)


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (bottleneck) then BN-ReLU-Conv3x3: `growth_rate` new channels."""

    def __init__(self, in_features: int, cfg: DenseNetConfig):
        super().__init__()
        width = cfg.bn_size * cfg.growth_rate
        self.norm1 = nn.BatchNorm2d(in_features)
        self.conv1 = nn.Conv2d(in_features, width, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, cfg.growth_rate, kernel_size=3, padding=1, bias=False)
        self.drop_rate = cfg.drop_rate

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        y = self.conv1(F.relu(self.norm1(torch.cat(inputs, 1)), inplace=True))
        y = self.conv2(F.relu(self.norm2(y), inplace=True))  # [B, growth_rate, H, W]
        return F.dropout(y, p=self.drop_rate, training=self.training) if self.drop_rate > 0 else y


class DenseBlock(nn.ModuleDict):
    """`denselayer1..n`; returns the concatenation of the input and every layer's output."""

    def __init__(self, num_layers: int, in_features: int, cfg: DenseNetConfig):
        super().__init__()
        for j in range(num_layers):
            self.add_module(f"denselayer{j + 1}", DenseLayer(in_features + j * cfg.growth_rate, cfg))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)  # [B, C_in + n * growth_rate, H, W]


class Transition(nn.Module):
    """BN-ReLU-Conv1x1 (halve channels) then 2x2 average pool (halve resolution)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_features)
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.norm(x), inplace=True)), kernel_size=2, stride=2)


class DenseNet121(nn.Module):
    """DenseNet-BC; `DenseNet121()` is torchvision's densenet121, `DenseNet121(DenseNetConfig.xrv())` XRV's.

    `model(x)` -> logits [B, num_classes]; `model.pooled_features(x)` -> [B, num_features] (the input of
    the classifier); `model.features(x)` is the convolutional trunk -> [B, num_features, H/32, W/32] (the
    name is fixed by the checkpoint keys, as in torchvision and torchxrayvision).
    """

    def __init__(self, config: DenseNetConfig | None = None, **overrides):
        """`overrides`: DenseNetConfig fields (in_channels=, num_classes=, drop_rate=, ...) replacing `config`'s."""
        super().__init__()
        self.config = cfg = dataclasses.replace(config or DenseNetConfig(), **overrides)

        c = cfg.num_init_features
        trunk = OrderedDict(
            conv0=nn.Conv2d(cfg.in_channels, c, kernel_size=7, stride=2, padding=3, bias=False),
            norm0=nn.BatchNorm2d(c),
            relu0=nn.ReLU(inplace=True),
            pool0=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )  # [B, C, H/4, W/4]
        for i, n in enumerate(cfg.block_config):
            trunk[f"denseblock{i + 1}"] = DenseBlock(n, c, cfg)
            c += n * cfg.growth_rate
            if i != len(cfg.block_config) - 1:
                trunk[f"transition{i + 1}"] = Transition(c, c // 2)
                c //= 2
        trunk["norm5"] = nn.BatchNorm2d(c)
        self.features = nn.Sequential(trunk)  # [B, num_features, H/32, W/32]
        self.classifier = nn.Linear(c, cfg.num_classes)
        self.num_features = c
        if not self.classifier.weight.is_meta:  # hub.load_model builds on meta, then assigns weights
            self.reset_parameters()

    @classmethod
    def tiny(cls, **overrides) -> DenseNet121:
        """A tiny DenseNet (`DenseNetConfig.tiny`) for CPU tests; `overrides` are DenseNetConfig fields."""
        return cls(DenseNetConfig.tiny(**overrides))

    def reset_parameters(self):
        """torchvision's init: Kaiming-normal convs, BN weight 1 / bias 0, Linear bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_channels, H, W] -> [B, num_features]: trunk -> ReLU -> global average pool."""
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(self.features(x), inplace=True), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooled_features(x))  # [B, num_classes]

    @classmethod
    def from_pretrained(cls, path, config: DenseNetConfig | None = None, *, device=None) -> DenseNet121:
        """Load a torchvision or (converted) torchxrayvision DenseNet-121 state dict, strictly.

        `path`: .safetensors / .pth / .pt file holding a flat state dict (legacy names renamed, XRV's
        op_threshs dropped). Without `config`, in_channels and num_classes are read off the checkpoint (conv0
        and classifier shapes); the rest is DenseNet-121.
        """
        try:
            state = hub.load_state_dict_file(path)
        except hub.CheckpointError as e:
            raise hub.CheckpointError(
                f"{e}\nIf {Path(path).name} is torchxrayvision's pickled model, convert it to a state dict once "
                "(see eval/densenet.py: torch.save(xrv.models.DenseNet(weights=...).state_dict(), file))."
            ) from e
        state = fill_num_batches_tracked(convert_legacy_keys({k: v for k, v in state.items() if k != "op_threshs"}))
        if config is None and "features.conv0.weight" in state and "classifier.weight" in state:
            config = DenseNetConfig(in_channels=state["features.conv0.weight"].shape[1],
                                    num_classes=state["classifier.weight"].shape[0])
        return hub.load_model(cls, config or DenseNetConfig(), state, source=str(path), device=device)


# torchvision `_load_state_dict`: '.'s are no longer allowed in module names, but old dense layers had
# 'norm.1', 'relu.1', 'conv.1', 'norm.2', ...; this pattern finds them (copied from torchvision/densenet.py).
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def convert_legacy_keys(state: dict) -> dict:
    """`...denselayer3.norm.1.weight` -> `...denselayer3.norm1.weight`; other keys unchanged."""
    return {(m.group(1) + m.group(2) if (m := _LEGACY_KEY.match(k)) else k): v for k, v in state.items()}


def fill_num_batches_tracked(state: dict) -> dict:
    """Add `<bn>.num_batches_tracked = 0` where an old checkpoint lacks it (a counter, not a weight)."""
    counters = {k.removesuffix("running_var") + "num_batches_tracked": torch.tensor(0) for k in state
                if k.endswith("running_var")}
    return counters | state


class XRVDenseNetFeatures(nn.Module):
    """FID features of torchxrayvision's DenseNet-121: images in [0, 1] -> [B, 1024] float32.

    Preprocessing (XRV's conventions, `torchxrayvision.utils.normalize` and `fix_resolution`):
    1. RGB input is turned into luminance (ITU-R 601: 0.299 R + 0.587 G + 0.114 B, what PIL's "L" does);
    2. pixels are mapped to XRV's range: (2 x - 1) * 1024;
    3. the image is resized to 224 x 224 with bilinear interpolation and antialias=True, which is what XRV's
       models do themselves when given another resolution (`fix_resolution`). XRV's dataset pipeline
       resizes numpy images with skimage instead; on tensors we use the model's own resize so that our
       features equal `xrv_model.features2(x)` for the same tensor. Images must be square (as in XRV).
    4. trunk -> ReLU -> global average pool ("features2" in XRV).
    """

    name = "xrv"
    in_channels = 1
    resolution = 224  # `input_resolution` of every densenet121-res224-* model

    def __init__(self, densenet: DenseNet121 | None = None, *, name: str | None = None,
                 resolution: int | None = None):
        """`densenet`: default a random-init XRV DenseNet-121; `name` tags saved statistics; `resolution`
        other than 224 only for tiny test/experiment models."""
        super().__init__()
        self.net = densenet if densenet is not None else DenseNet121(DenseNetConfig.xrv())
        if self.net.config.in_channels != 1:
            raise ValueError(f"XRV features need a 1-channel DenseNet, got {self.net.config.in_channels}")
        self.feature_dim = self.net.num_features
        self.name, self.resolution = name or self.name, resolution or self.resolution

    @classmethod
    def from_pretrained(cls, path, *, device=None) -> XRVDenseNetFeatures:
        """`path`: XRV densenet121-res224-all weights as a state dict (see the module docstring)."""
        net = DenseNet121.from_pretrained(path, DenseNetConfig.xrv(), device=device)
        return cls(net).eval()

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1 or 3, H, W] in [0, 1] -> [B, 1, 224, 224] in [-1024, 1024]."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images [B, 1 or 3, H, W], got shape {list(x.shape)}")
        if x.shape[1] == 3:
            w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
            x = torch.einsum("bchw,c->bhw", x, w).unsqueeze(1)
        x = (2 * x - 1) * 1024
        if x.shape[-2:] != (self.resolution, self.resolution):
            if x.shape[-1] != x.shape[-2]:
                raise ValueError(f"XRV expects square images (center-crop first), got {list(x.shape[-2:])}")
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.pooled_features(self.preprocess(x.float()))  # [B, 1024]


@torch.no_grad()
def calibrate_batchnorm(module: nn.Module, images: torch.Tensor, batch_size: int = 32) -> nn.Module:
    """Set every BatchNorm's running mean/var to the statistics of `images` (a fixed reference set).

    A random-init network keeps BatchNorm's defaults (mean 0, var 1), so in eval mode nothing normalises its
    activations: through DenseNet-121's 58 BN layers they grow to ~1e3 and a random-init FID reads ~1e7.
    One pass over the reference images in train mode with momentum=None (PyTorch's cumulative average) gives
    well-scaled features. Used for the offline random-init FID extractors only; pretrained nets keep theirs.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = module.training
    module.train()
    for i in range(0, len(images), batch_size):
        module(images[i : i + batch_size])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return module.train(was_training)
