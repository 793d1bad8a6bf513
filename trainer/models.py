"""Teacher and student networks: CIFAR-style ResNets behind a registry.

Every model takes float images in [0, 1], shape (B, C, H, W) with H, W >= 8, and returns
logits (B, num_classes). Normalisation is the model's first layer (:class:`Normalize`), so
attacks and perturbations work in pixel space.

Saliency methods rely on two properties of these networks:

- every ReLU is its own ``nn.ReLU`` module, called once per forward pass, so guided
  backprop's module hooks see every non-linearity (the authors' networks called ``F.relu``,
  which made their "guided backprop" the plain gradient);
- ``model.cam_layer`` is the last convolutional stage, the layer Grad-CAM(++) explains.

``model.arch`` holds the constructor arguments, so a checkpoint can rebuild the model with
``create_model(arch.pop("name"), arch.pop("num_classes"), **arch)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from saliency_cache.errors import SatError
from trainer.registry import Registry

MODELS: Registry = Registry("model")

# ImageNet statistics: the customary normalisation for natural RGB images when the dataset's
# own statistics are not given (CIFAR-10's differ by less than 0.03).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as the first layer of a model.

    mean, std: one value per channel (or one value for all channels). Stored as buffers, so
    they move with ``.to(device)`` and are saved in the state dict but never trained.
    Input: float (B, C, H, W), normally in [0, 1]; output: same shape.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if mean_t.numel() != std_t.numel():
            raise SatError(f"mean has {mean_t.numel()} values but std has {std_t.numel()}")
        if not bool((std_t > 0).all()):
            raise SatError(f"std must be > 0, got {std_t.flatten().tolist()}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection; (B, c_in, H, W) -> (B, c_out, H/s, W/s).

    The two ReLUs are separate modules (guided backprop hooks each one).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem (stride 1, no max-pool), four BasicBlock stages.

    Stage widths are ``width * (1, 2, 4, 8)``, strides (1, 2, 2, 2), then global average
    pooling and a linear classifier, so any input of at least 8x8 works (32x32 CIFAR,
    64x64 Tiny ImageNet, ...).
    Input: float (B, in_channels, H, W) in [0, 1]. Output: logits float (B, num_classes).
    """

    def __init__(
        self,
        blocks: Sequence[int],
        num_classes: int,
        *,
        width: int = 64,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        widths = [width * m for m in (1, 2, 4, 8)]
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        stages = []
        c_in = width
        for i, (n, c_out) in enumerate(zip(blocks, widths, strict=True)):
            stride = 1 if i == 0 else 2
            layers = [
                BasicBlock(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1)
                for j in range(n)
            ]
            stages.append(nn.Sequential(*layers))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    @property
    def cam_layer(self) -> nn.Module:
        """The last convolutional stage; its output (B, 8*width, H/8, W/8) is what Grad-CAM weighs."""
        return self.layer4

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last stage, float (B, 8*width, ceil(H/8), ceil(W/8)), non-negative."""
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


_BLOCKS = {
    "resnet10": (1, 1, 1, 1),
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
}


def _register_resnet(name: str, blocks: tuple[int, ...]) -> None:
    def build(num_classes: int, **kw) -> ResNet:
        return ResNet(blocks, num_classes, **kw)

    build.__name__ = name
    build.__doc__ = f"{name}: CIFAR-style ResNet with BasicBlocks {list(blocks)} per stage."
    MODELS.register(name)(build)


for _name, _blocks in _BLOCKS.items():
    _register_resnet(_name, _blocks)


def _per_channel(
    value: float | Sequence[float] | None,
    default: Sequence[float],
    fallback: float,
    in_channels: int,
    what: str,
) -> list[float]:
    if value is None:
        value = default if in_channels == len(default) else fallback
    if isinstance(value, (int, float)):
        return [float(value)] * in_channels
    vals = [float(v) for v in value]
    if len(vals) == 1:
        return vals * in_channels
    if len(vals) != in_channels:
        raise SatError(
            f"{what} has {len(vals)} values {vals} but the model has {in_channels} input channels"
        )
    return vals


def create_model(
    name: str,
    num_classes: int,
    *,
    width: int = 64,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    in_channels: int = 3,
) -> nn.Module:
    """Build a registered model with fresh weights (train mode, on the CPU).

    name: one of :func:`list_models`. num_classes: size of the logit vector. width: channels of
    the first stage (64 in the paper; tests use 4-8). mean, std: per-channel normalisation of
    [0, 1] inputs (a scalar or one value per channel); None means ImageNet statistics for 3
    channels and 0.5 / 0.25 otherwise. The resolved arguments are kept in ``model.arch``.
    Raises SatError for an unknown name or invalid sizes.
    """
    factory = MODELS.get(name)
    if num_classes < 1:
        raise SatError(f"num_classes must be >= 1, got {num_classes}")
    if width < 1:
        raise SatError(f"width must be >= 1, got {width}")
    if in_channels < 1:
        raise SatError(f"in_channels must be >= 1, got {in_channels}")
    mean_l = _per_channel(mean, IMAGENET_MEAN, 0.5, in_channels, "mean")
    std_l = _per_channel(std, IMAGENET_STD, 0.25, in_channels, "std")
    model = factory(num_classes, width=width, mean=mean_l, std=std_l, in_channels=in_channels)
    model.arch = {
        "name": name,
        "num_classes": int(num_classes),
        "width": int(width),
        "mean": mean_l,
        "std": std_l,
        "in_channels": int(in_channels),
    }
    return model


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return MODELS.names()
