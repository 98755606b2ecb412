"""Classification model zoo: a small CNN for 8x8 digits and the CIFAR ResNets of He et al. (2016).

Every model is built from named modules (``conv1``, ``bn1``, ``relu1`` ...) so that

* each convolution is immediately followed by its batch-norm, both in ``named_modules()`` order and in
  the ``torch.fx`` graph, which is what a BN-folding pass looks for;
* every activation is its own ``nn.ReLU`` module (never ``inplace``, never ``F.relu``), so activation
  quantizers can be put at the input of each compressed layer and ``torch.fx.symbolic_trace`` works;
* name patterns in a recipe (``features.conv1``, ``fc``) select the first and last layers.

>>> model = build("resnet20")
>>> model(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from prunq.core.errors import PrunqError
from prunq.tasks.base import build_from_zoo

__all__ = ["DigitsCNN", "BasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet56", "MODELS", "build"]


def _scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1."""
    return max(1, int(round(channels * width)))


#: Ranges of the zoo's arguments (the parameter count is bounded as well, by ``build_from_zoo``).
MAX_WIDTH = 1000.0
MAX_CLASSES = 100_000
MAX_IN_CHANNELS = 10_000
MAX_DEPTH = 1202  # ResNet-1202, the deepest of He et al. (2016)


def _check_int(value: object, field: str, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise PrunqError(f"model.kwargs.{field}: must be an integer in [{lo}, {hi:,}], got {value!r}")


def _check(width: float, num_classes: int, in_channels: int) -> None:
    """Validate the constructor arguments shared by every model (messages name the recipe field)."""
    if not isinstance(width, (int, float)) or isinstance(width, bool) or not 0 < width <= MAX_WIDTH:
        raise PrunqError(f"model.kwargs.width: must be a positive number up to {MAX_WIDTH:g}, got {width!r}")
    _check_int(num_classes, "num_classes", 1, MAX_CLASSES)
    _check_int(in_channels, "in_channels", 1, MAX_IN_CHANNELS)


def _conv_bn_relu(cin: int, cout: int, index: int) -> list[tuple[str, nn.Module]]:
    """``conv{i}`` (3x3, no bias) -> ``bn{i}`` -> ``relu{i}``, as named Sequential entries."""
    return [
        (f"conv{index}", nn.Conv2d(cin, cout, 3, padding=1, bias=False)),
        (f"bn{index}", nn.BatchNorm2d(cout)),
        (f"relu{index}", nn.ReLU()),
    ]


def _init_weights(model: nn.Module) -> None:
    """He-normal convolutions (fan-out), unit/zero batch-norm, default Linear init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class DigitsCNN(nn.Module):
    """A small VGG-style CNN for 1x8x8 digits (~160 k weights at ``width=1``).

    ``features``: conv1(1->32) bn relu, conv2(32->64) bn relu, pool (8->4), conv3(64->128) bn relu,
    pool (4->2); ``classifier``: flatten, fc1(512->128) relu, dropout, fc2(128->classes).
    Channel counts scale with ``width`` (rounded, at least 1); the input must be 8x8.

    >>> DigitsCNN()(torch.zeros(1, 1, 8, 8)).shape
    torch.Size([1, 10])
    """

    def __init__(
        self, width: float = 1.0, num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        _check(width, num_classes, in_channels)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise PrunqError(f"model.kwargs.dropout: must be a number in [0, 1), got {dropout!r}")
        c1, c2, c3, hidden = (_scaled(c, width) for c in (32, 64, 128, 128))
        self.features = nn.Sequential(
            OrderedDict(
                _conv_bn_relu(in_channels, c1, 1)
                + _conv_bn_relu(c1, c2, 2)
                + [("pool2", nn.MaxPool2d(2))]
                + _conv_bn_relu(c2, c3, 3)
                + [("pool3", nn.MaxPool2d(2))]
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("flatten", nn.Flatten()),
                    ("fc1", nn.Linear(c3 * 2 * 2, hidden)),
                    ("relu4", nn.ReLU()),
                    ("dropout", nn.Dropout(dropout)),
                    ("fc2", nn.Linear(hidden, num_classes)),
                ]
            )
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (B, num_classes) for inputs of shape (B, in_channels, 8, 8)."""
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection; option-B (1x1 conv + BN) projection
    shortcut when the stride or the channel count changes, identity otherwise."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    [
                        ("conv", nn.Conv2d(cin, cout, 1, stride=stride, bias=False)),
                        ("bn", nn.BatchNorm2d(cout)),
                    ]
                )
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, §4.2): a 3x3 stem conv with 16 channels,
    three stages of ``n`` BasicBlocks with 16/32/64 channels (stride 2 at the start of stages 2 and 3),
    global average pooling and a Linear classifier. Channels scale with ``width``.

    Any input size works (global pooling); ``in_channels=1`` lets it run on digits.
    """

    def __init__(
        self, depth: int, num_classes: int = 10, width: float = 1.0, in_channels: int = 3
    ) -> None:
        super().__init__()
        _check(width, num_classes, in_channels)
        if isinstance(depth, bool) or not isinstance(depth, int) or not 8 <= depth <= MAX_DEPTH or (depth - 2) % 6:
            raise PrunqError(f"model.kwargs.depth: must be 6n+2 with 1 <= n <= 200 (20, 32, 56, ..., 1202), got {depth!r}")
        n = (depth - 2) // 6
        c1, c2, c3 = (_scaled(c, width) for c in (16, 32, 64))
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(c1, c1, n, stride=1)
        self.layer2 = self._stage(c1, c2, n, stride=2)
        self.layer3 = self._stage(c2, c3, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c3, num_classes)
        _init_weights(self)

    @staticmethod
    def _stage(cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
        """``n`` blocks; the first one changes stride/channels."""
        blocks = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (B, num_classes)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))

    def extra_repr(self) -> str:  # noqa: D102
        return f"depth={self.depth}"


def resnet20(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (3 blocks per stage, ~0.27 M parameters at ``width=1``)."""
    return CifarResNet(20, num_classes=num_classes, width=width, in_channels=in_channels)


def resnet32(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 (5 blocks per stage, ~0.47 M parameters at ``width=1``)."""
    return CifarResNet(32, num_classes=num_classes, width=width, in_channels=in_channels)


def resnet56(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 (9 blocks per stage, ~0.86 M parameters at ``width=1``)."""
    return CifarResNet(56, num_classes=num_classes, width=width, in_channels=in_channels)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
}


def build(name: str, **kwargs: object) -> nn.Module:
    """A fresh model from :data:`MODELS`; unknown names or arguments raise :class:`PrunqError`.

    >>> build("digits_cnn", width=0.5).features.conv1.out_channels
    16
    """
    return build_from_zoo(MODELS, name, **kwargs)
