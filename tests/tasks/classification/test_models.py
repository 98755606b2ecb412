"""The classification zoo: parameter counts worked out by hand, shapes, fx-traceability, errors."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from prunq.core.errors import PrunqError
from prunq.tasks.classification import models
from prunq.tasks.classification.models import MODELS, DigitsCNN, build


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _weights(model: nn.Module) -> dict[str, int]:
    """Prunable weights (conv / linear) by module name."""
    return {
        name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def test_digits_cnn_weights_per_layer() -> None:
    w = _weights(DigitsCNN())
    assert w == {
        "features.conv1": 1 * 32 * 9,
        "features.conv2": 32 * 64 * 9,
        "features.conv3": 64 * 128 * 9,
        "classifier.fc1": 128 * 2 * 2 * 128,
        "classifier.fc2": 128 * 10,
    }
    assert sum(w.values()) == 159_264
    # + batch-norm affine (2 * (32 + 64 + 128)) + Linear biases (128 + 10)
    assert _n_params(DigitsCNN()) == 159_264 + 448 + 138


def test_resnet20_parameter_count() -> None:
    convs = (
        3 * 16 * 9  # stem
        + 6 * 16 * 16 * 9  # stage 1
        + 16 * 32 * 9 + 5 * 32 * 32 * 9 + 16 * 32  # stage 2 (+ 1x1 projection)
        + 32 * 64 * 9 + 5 * 64 * 64 * 9 + 32 * 64  # stage 3 (+ 1x1 projection)
    )
    bn = 2 * (16 + 6 * 16 + 6 * 32 + 32 + 6 * 64 + 64)
    fc = 64 * 10 + 10
    model = build("resnet20")
    assert _n_params(model) == convs + bn + fc == 272_474  # ~0.27 M as in He et al.
    assert len(_weights(model)) == 19 + 2 + 1  # 19 3x3 convs, 2 projections, fc


@pytest.mark.parametrize(("name", "params"), [("resnet32", 466_906), ("resnet56", 855_770)])
def test_deeper_resnet_parameter_counts(name: str, params: int) -> None:
    assert _n_params(build(name)) == params


@pytest.mark.parametrize("name", list(MODELS))
def test_output_shape_and_trace(name: str) -> None:
    model = build(name).eval()
    x = torch.randn(2, 1, 8, 8) if name == "digits_cnn" else torch.randn(2, 3, 32, 32)
    y = model(x)
    assert y.shape == (2, 10)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), y)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_conv_feeds_its_batchnorm(name: str) -> None:
    """What a BN-folding pass needs: each conv's only user in the fx graph is a BatchNorm2d."""
    model = build(name)
    gm = torch.fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    convs = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], nn.Conv2d)]
    assert convs
    for node in convs:
        users = list(node.users)
        assert len(users) == 1 and isinstance(mods[users[0].target], nn.BatchNorm2d), node.target


def test_width_num_classes_and_in_channels() -> None:
    small = DigitsCNN(width=0.5, num_classes=3)
    assert small.features.conv1.out_channels == 16 and small.classifier.fc2.out_features == 3
    assert small(torch.zeros(1, 1, 8, 8)).shape == (1, 3)
    tiny = DigitsCNN(width=0.001)  # rounds to zero -> clamped to one channel
    assert tiny.features.conv3.out_channels == 1 and tiny(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    r = models.resnet20(num_classes=100, width=0.5, in_channels=1)
    assert r.fc.in_features == 32 and r(torch.zeros(2, 1, 8, 8)).shape == (2, 100)


def test_unknown_model_and_bad_arguments() -> None:
    with pytest.raises(PrunqError, match=r"model.name: unknown model 'vgg16' \(choose from digits_cnn, resnet20"):
        build("vgg16")
    with pytest.raises(PrunqError, match="model: resnet20 does not take"):
        build("resnet20", dropout=0.5)
    with pytest.raises(PrunqError, match="model.kwargs.width"):
        build("digits_cnn", width=0)
    with pytest.raises(PrunqError, match="model.kwargs.num_classes"):
        build("resnet20", num_classes=0)
    with pytest.raises(PrunqError, match="model.kwargs.depth"):
        models.CifarResNet(21)
