"""Target CNNs with torchvision's module layout (same attribute names, same forward), built here.

torchvision does not install beside the CPU build of torch this project uses, so the engine's tests and benchmarks
use these definitions; they are written to trace into the same graph as torchvision's ``vgg*`` and ``resnet*`` (the
tests also run torchvision's own classes where it is installed). The ``*_cifar`` variants are the usual 32×32
adaptations; the ``mnist_*`` ones are the small targets of the embedded GEN-CNP demo.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Dict, List, Optional, Sequence, Type, Union

import torch
import torch.nn as nn

__all__ = [
    "VGG",
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "vgg16",
    "vgg16_bn",
    "vgg16_bn_cifar",
    "vgg11_cifar",
    "resnet18",
    "resnet50",
    "resnet18_cifar",
    "mnist_vgg",
    "mnist_resnet",
    "randomize_bn",
    "model_spec",
    "MODEL_FACTORIES",
]

VGG16_CFG: List[Union[int, str]] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
VGG11_CFG: List[Union[int, str]] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def make_vgg_features(cfg: Sequence[Union[int, str]], batch_norm: bool, in_channels: int = 3) -> nn.Sequential:
    layers: List[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(c, int(v), kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(v)))
            layers.append(nn.ReLU(inplace=True))
            c = int(v)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """torchvision's VGG layout: ``features`` → ``avgpool`` → ``flatten`` → ``classifier``.

    ``pool_size`` and ``hidden`` default to torchvision's (7, 4096); the CIFAR/MNIST variants use smaller ones.
    """

    def __init__(
        self,
        features: nn.Module,
        num_classes: int = 1000,
        pool_size: int = 7,
        hidden: int = 4096,
        dropout: float = 0.5,
        feature_channels: int = 512,
    ):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.classifier = nn.Sequential(
            nn.Linear(feature_channels * pool_size * pool_size, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, bias=False, dilation=dilation)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one ``relu`` module called twice (two units: ``relu`` and ``relu#1``)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (stride on the 3×3 conv): three units ``relu``, ``relu#1``, ``relu#2``."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet layout. ``cifar_stem=True`` uses a 3×3 stride-1 stem and no max-pool (32×32 inputs)."""

    def __init__(
        self,
        block: Type[Union[BasicBlock, Bottleneck]],
        layers: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        width: int = 64,
        cifar_stem: bool = False,
    ):
        super().__init__()
        self.inplanes = width
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages = []
        for i, n in enumerate(layers):
            stages.append(self._make_layer(block, width * 2**i, n, stride=1 if i == 0 else 2))
        self.layer1, self.layer2, self.layer3, self.layer4 = (stages + [nn.Identity()] * 4)[:4]
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 2 ** (len(layers) - 1) * block.expansion, num_classes)
        _init_weights(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def randomize_bn(model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (for engine tests: BN folding must be exercised)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.25)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.2)
    return model


def vgg16(num_classes: int = 1000) -> VGG:
    return VGG(make_vgg_features(VGG16_CFG, False), num_classes)


def vgg16_bn(num_classes: int = 1000) -> VGG:
    return VGG(make_vgg_features(VGG16_CFG, True), num_classes)


def vgg16_bn_cifar(num_classes: int = 10) -> VGG:
    """VGG-16-BN for 32×32 inputs: 1×1 pool, a 512-wide hidden classifier."""
    return VGG(make_vgg_features(VGG16_CFG, True), num_classes, pool_size=1, hidden=512)


def vgg11_cifar(num_classes: int = 10, batch_norm: bool = True) -> VGG:
    return VGG(make_vgg_features(VGG11_CFG, batch_norm), num_classes, pool_size=1, hidden=512)


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


def resnet18_cifar(num_classes: int = 10) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, cifar_stem=True)


def mnist_vgg(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> VGG:
    """A small VGG-style CNN for 28×28 grayscale digits (four conv units, two hidden linear units)."""
    cfg = [width, "M", 2 * width, "M", 4 * width, 4 * width, "M"]
    return VGG(make_vgg_features(cfg, True, in_channels), num_classes, pool_size=1, hidden=128, feature_channels=4 * width)


def mnist_resnet(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> ResNet:
    """A small ResNet-style CNN for 28×28 grayscale digits (three stages of one BasicBlock)."""
    return ResNet(BasicBlock, [1, 1, 1], num_classes, in_channels=in_channels, width=width, cifar_stem=True)


SPEC_ATTR = "_gencnp_spec"


def model_spec(model: nn.Module) -> Optional[Dict[str, Any]]:
    """How to rebuild ``model``: ``{"factory": name, "kwargs": {...}}`` as recorded by the factories of
    :data:`MODEL_FACTORIES` (and by :func:`gencnp_fast.target.build_model`); ``None`` for a model built elsewhere.
    This is what the safe target file format (:func:`gencnp_fast.target.save_target`) stores beside the weights."""
    spec = getattr(model, SPEC_ATTR, None)
    return None if spec is None else {"factory": spec["factory"], "kwargs": dict(spec["kwargs"])}


def _recording(name: str, fn):
    """``fn`` that records its name and keyword arguments on the model it returns (see :func:`model_spec`)."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def factory(*args, **kwargs):
        model = fn(*args, **kwargs)
        bound = sig.bind(*args, **kwargs)
        object.__setattr__(model, SPEC_ATTR, {"factory": name, "kwargs": dict(bound.arguments)})
        return model

    return factory


MODEL_FACTORIES = {
    "vgg16": vgg16,
    "vgg16_bn": vgg16_bn,
    "vgg16_bn_cifar": vgg16_bn_cifar,
    "vgg11_cifar": vgg11_cifar,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "resnet18_cifar": resnet18_cifar,
    "mnist_vgg": mnist_vgg,
    "mnist_resnet": mnist_resnet,
}
for _name, _fn in list(MODEL_FACTORIES.items()):  # each built-in model knows how to rebuild itself
    MODEL_FACTORIES[_name] = globals()[_name] = _recording(_name, _fn)
del _name, _fn
