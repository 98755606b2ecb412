"""Physical channel removal: every layer kind, constants folded only where exact, coupled channels kept
together, channels that escape kept; the result loads back through the manifest and the packed file."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from prunq.core.errors import PrunqError
from prunq.core.manifest import validate
from prunq.prune.structured import remove_channels

TOL = 1e-5  # the bar: max abs diff relative to the output scale


def _zero_out(layer: nn.Module, channels: list[int], bias: float | None = 0.0) -> None:
    """Prune whole output channels (canonical rows) of ``layer``; set their bias."""
    with torch.no_grad():
        if isinstance(layer, nn.ConvTranspose2d):
            layer.weight[:, channels] = 0.0
        else:
            layer.weight[channels] = 0.0
        if layer.bias is not None and bias is not None:
            layer.bias[channels] = bias


def _check(model: nn.Module, x, **kw):
    ref = copy.deepcopy(model).eval()
    r = remove_channels(model, x, **kw)
    args = x if isinstance(x, tuple) else (x,)
    with torch.no_grad():
        a, b = ref(*args), r.model(*args)
    assert float((a - b).abs().max()) <= TOL * float(a.abs().max())
    return r


class _Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 5, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(5 * 4 * 4, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.c1(x)))
        x = self.pool(torch.relu(self.c2(x)))
        return self.fc(x.flatten(1))


def test_a_pruned_filter_goes_with_its_batchnorm_channel_and_the_consumers_inputs():
    torch.manual_seed(0)
    m = _Chain().eval()
    _zero_out(m.c1, [1, 4], bias=0.0)
    _zero_out(m.c2, [2])
    x = torch.randn(2, 3, 8, 8)
    r = _check(m, x)
    small = r.model
    assert (small.c1.out_channels, small.bn1.num_features, small.c2.in_channels) == (4, 4, 4)
    assert small.c2.out_channels == 4 and small.fc.in_features == 4 * 16  # c2's channel 2: 16 fc features
    mods = r.entry["modules"]
    assert mods["c1"] == {"out": [0, 2, 3, 5]} and mods["bn1"] == {"channels": [0, 2, 3, 5]}
    assert mods["c2"] == {"out": [0, 1, 3, 4], "in": [0, 2, 3, 5]}
    assert mods["fc"]["in"] == [j for j in range(80) if not 32 <= j < 48]
    assert r.removed == 3 and r.folded == 0


def test_a_batchnorm_shift_that_reaches_a_padded_conv_keeps_its_channel():
    torch.manual_seed(0)
    m = _Chain().eval()
    _zero_out(m.c1, [1], bias=0.0)
    with torch.no_grad():
        m.bn1.bias[1] = 0.7  # the pruned filter's BN output: relu(0.7), constant, but c2 pads with zeros
    r = _check(m, torch.randn(2, 3, 8, 8))
    assert r.model.c1.out_channels == 6
    assert "zero-padded 'c2'" in r.kept["c1[1]"] and "0.7" in r.kept["c1[1]"]
    with torch.no_grad():
        m.bn1.bias[1] = -0.3  # relu(-0.3) = 0: the consumer sees zeros, the channel goes
    r = _check(m, torch.randn(2, 3, 8, 8))
    assert r.model.c1.out_channels == 5


class _ConstNet(nn.Module):
    """A constant channel into an unpadded conv and into a Linear: both fold exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 3, 3, bias=False)  # no padding: the constant adds v * sum(W) everywhere
        self.fc1 = nn.Linear(3 * 4 * 4, 6)
        self.fc2 = nn.Linear(6, 2, bias=False)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc2(torch.sigmoid(self.fc1(x.flatten(1))))


def test_constant_channels_are_folded_into_the_consumers_bias_where_exact():
    torch.manual_seed(0)
    m = _ConstNet().eval()
    _zero_out(m.c1, [0], bias=0.5)
    _zero_out(m.fc1, [3], bias=-1.0)  # sigmoid(-1) reaches fc2, which had no bias
    r = _check(m, torch.randn(3, 2, 6, 6))
    assert r.model.c1.out_channels == 3 and r.model.fc1.out_features == 5
    assert r.folded == 2 and r.entry["bias"] == ["c2", "fc2"]
    expect = 0.5 * m.c2.weight[:, 0].sum((1, 2))
    assert torch.allclose(r.model.c2.bias, expect, atol=1e-6)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1, bias=False)
        self.a = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        s = self.stem(x)
        y = s + self.b(torch.relu(self.a(s)))
        return self.head(torch.relu(y))


def test_channels_meeting_at_a_residual_add_go_together_or_not_at_all():
    torch.manual_seed(0)
    m = _Residual().eval()
    _zero_out(m.stem, [1, 3])
    _zero_out(m.b, [1])  # channel 1 empty on both branches: removable; 3 only on one: stays
    _zero_out(m.a, [2])  # an inner channel: removable on its own
    r = _check(m, torch.randn(2, 3, 5, 5))
    assert r.entry["modules"]["stem"] == {"out": [0, 2, 3]}
    assert r.entry["modules"]["b"] == {"out": [0, 2, 3], "in": [0, 1, 3]}
    assert r.entry["modules"]["head"] == {"in": [0, 2, 3]}
    assert "coupled" in r.kept["stem[3]"]


class _Kinds(nn.Module):
    """Concatenation, a depthwise conv, a transposed conv, a grouped conv and a 1-D conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.b = nn.Conv2d(3, 4, 1, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.up = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1, bias=False)
        self.g = nn.Conv2d(6, 4, 3, padding=1, groups=2, bias=False)
        self.c1d = nn.Conv1d(4, 3, 3, bias=False)
        self.fc = nn.Linear(3 * 62, 2)

    def forward(self, x):
        y = torch.cat([self.a(x), torch.relu(self.b(x))], 1)
        y = self.up(torch.relu(self.dw(y)))
        y = self.g(y)  # (B, 4, 8, 8)
        return self.fc(self.c1d(y.flatten(2)).flatten(1))


def test_concatenation_depthwise_transposed_grouped_and_1d_layers():
    torch.manual_seed(0)
    m = _Kinds().eval()
    _zero_out(m.a, [0])  # -> cat channel 0 -> depthwise channel 0 (in and out) -> up's input 0
    _zero_out(m.b, [2])  # -> cat channel 6
    _zero_out(m.up, [1, 4])  # feeds the grouped conv: stays
    _zero_out(m.g, [3])  # -> c1d's input 3
    _zero_out(m.c1d, [1])  # -> 62 fc features
    r = _check(m, torch.randn(2, 3, 4, 4))
    mods = r.entry["modules"]
    assert mods["a"] == {"out": [1, 2, 3]} and mods["b"] == {"out": [0, 1, 3]}
    assert mods["dw"] == {"out": [1, 2, 3, 4, 5, 7], "in": [1, 2, 3, 4, 5, 7]} and r.model.dw.groups == 6
    assert mods["up"] == {"in": [1, 2, 3, 4, 5, 7]} and r.model.up.out_channels == 6
    assert "grouped layer 'g'" in r.kept["up[1]"] and "g" not in mods  # the grouped conv keeps its outputs
    assert mods["c1d"] == {"out": [0, 2]} and r.model.fc.in_features == 2 * 62


class _Escape(nn.Module):
    """Channels used outside a layer: the output itself, a mean over channels, a fixed channel slice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 4, 1, bias=False)
        self.b = nn.Conv2d(2, 4, 1, bias=False)
        self.c = nn.Conv2d(2, 4, 1, bias=False)
        self.d = nn.Conv2d(2, 4, 1, bias=False)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        gate = self.b(x).mean(1, keepdim=True)  # the mean's denominator counts b's channels
        sliced = self.c(x)[:, :2].sum(1, keepdim=True)
        return self.head(self.a(x)) + gate + sliced, self.d(x)


def test_channels_that_escape_the_layers_are_kept():
    torch.manual_seed(0)
    m = _Escape().eval()
    for layer in (m.a, m.b, m.c, m.d):
        _zero_out(layer, [3])
    r = remove_channels(m, torch.randn(1, 2, 3, 3))
    assert r.entry["modules"] == {"a": {"out": [0, 1, 2]}, "head": {"in": [0, 1, 2]}}
    assert r.model.b.out_channels == r.model.c.out_channels == r.model.d.out_channels == 4


def test_the_removed_model_saves_loads_and_packs(tmp_path):
    import prunq
    from prunq.export.packed import pack
    from prunq.pipeline.export import load_packed
    from prunq.tasks.classification.models import build

    torch.manual_seed(0)
    m = build("digits_cnn").eval()
    layers = [mod for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    for layer in layers[:-1]:
        _zero_out(layer, list(range(0, layer.weight.shape[0], 3)))
    x = torch.randn(4, 1, 8, 8)
    manifest = {"format": 2, "model": {"origin": "zoo", "task": "digits", "name": "digits_cnn", "kwargs": {}},
                "transforms": []}  # fmt: skip
    r = _check(m, x, manifest=manifest)
    assert r.removed > 0 and r.manifest["transforms"][-1]["op"] == "remove_channels"
    validate(json.loads(json.dumps(r.manifest)))
    prunq.save((r.model, r.manifest), tmp_path / "run")
    loaded = prunq.load(tmp_path / "run")
    (tmp_path / "m.packed").write_bytes(pack(r.model, r.manifest))
    unpacked = load_packed(tmp_path / "m.packed")
    with torch.no_grad():
        want = r.model(x)
        assert torch.equal(loaded(x), want) and torch.equal(unpacked(x), want)


def test_a_quantized_converted_model_keeps_its_steps_per_kept_channel():
    from prunq.quant import QuantConfig, calibrate, convert, prepare

    torch.manual_seed(0)
    m = _Chain().eval()
    _zero_out(m.c1, [1, 4], bias=0.0)
    prepare(m, QuantConfig(weight_bits=4, act_bits=8))
    calibrate(m, [torch.randn(2, 3, 8, 8)])
    convert(m)
    steps = m.c1.weight_step.clone()
    r = _check(m, torch.randn(2, 3, 8, 8))
    assert torch.equal(r.model.c1.weight_step, steps[[0, 2, 3, 5]])


def test_refusals():
    m = _Chain()
    from prunq.prune import masks as M

    M.attach_mask(m.c1, soft=False)
    with pytest.raises(PrunqError, match="convert it first"):
        remove_channels(m, torch.randn(1, 3, 8, 8))

    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(1, 2, 1)

        def forward(self, x):
            return self.c(x) if x.sum() > 0 else -self.c(x)  # data-dependent: fx cannot trace it

    with pytest.raises(PrunqError, match="could not trace"):
        remove_channels(Dynamic(), torch.ones(1, 1, 2, 2))


@pytest.mark.parametrize("bad", [
    {"modules": {"c1": {"out": [3, 1]}}},  # not increasing
    {"modules": {"c1": {"out": [0, 9]}}},  # out of range
    {"modules": {"c1": {"out": []}}},  # empty
    {"modules": {"relu": {"out": [0]}}},  # no channels
    {"modules": {"c2": {"wat": [0]}}},  # unknown key
    {"modules": {}, "bias": ["c2", "c2"]},  # c2 has no bias the first time; then has one
])  # fmt: skip
def test_a_hostile_entry_is_one_line(bad):
    from prunq.core.manifest import replay

    import prunq.methods  # noqa: F401

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(1, 4, 1)
            self.relu = nn.ReLU()
            self.c2 = nn.Conv2d(4, 2, 1, bias=False)

    with pytest.raises(PrunqError, match=r"model.json: transforms\[0\]"):
        replay(M(), [{"op": "remove_channels", **bad}])


class _Escapes2(nn.Module):
    """A layer-scale parameter, a hard-coded reshape, a BatchNorm called twice, a deprecated op that warns."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 4, 1, bias=False)
        self.scale = nn.Parameter(torch.arange(1.0, 5.0).view(1, 4, 1, 1))
        self.b = nn.Conv2d(2, 4, 1, bias=False)
        self.c = nn.Conv2d(2, 4, 1, bias=False)
        self.d = nn.Conv2d(2, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.e = nn.Conv2d(2, 4, 1, bias=False)
        self.fc = nn.Linear(4 * 9, 2)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        y = self.head(self.a(x) * self.scale)  # channel k scaled by its own parameter
        z = self.fc(self.b(x).view(-1, 36))  # 36 = 4 channels x 9 pixels, written down
        w = self.head(self.bn(self.c(x)) + self.bn(self.d(x)))
        u = self.head(F.upsample(self.e(x), scale_factor=1))  # deprecated: warns while tracing
        return y + w + u, z


import torch.nn.functional as F  # noqa: E402


@pytest.mark.filterwarnings("ignore:`nn.functional.upsample` is deprecated")
def test_layer_scales_fixed_reshapes_and_shared_batchnorms_keep_their_channels():
    torch.manual_seed(0)
    m = _Escapes2().eval()
    for layer in (m.a, m.b, m.c, m.d, m.e):
        _zero_out(layer, [3])
    r = remove_channels(m, torch.randn(1, 2, 3, 3))
    mods = r.entry["modules"]
    assert "a" not in mods and "b" not in mods and "c" not in mods and "d" not in mods and "bn" not in mods
    assert "e" not in mods  # F.upsample is not modelled: e's channel stays, and its warning refused nothing


def test_a_quantized_constant_folded_into_a_linear_passes_the_check():
    from prunq.quant import QuantConfig, calibrate, convert, prepare

    torch.manual_seed(0)
    m = _ConstNet().eval()
    _zero_out(m.fc1, [3], bias=-1.0)  # sigmoid(-1) = 0.2689..., quantized on fc2's 4-bit input grid
    x = torch.randn(3, 2, 6, 6)
    prepare(m, QuantConfig(weight_bits=4, act_bits=4))
    calibrate(m, [x])
    convert(m)
    r = _check(m, x)
    assert r.model.fc1.out_features == 5 and r.folded == 1


def test_a_run_with_masks_only_records_its_conversion_and_loads_back(tmp_path):
    import prunq
    from prunq.prune import masks as M
    from prunq.quant import convert
    from prunq.tasks.classification.models import build

    torch.manual_seed(0)
    m = build("digits_cnn").eval()
    layers = [mod for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    for layer in layers[:-1]:
        M.attach_mask(layer, soft=False)
        with torch.no_grad():
            M.get_mask(layer).mask[::2] = 0.0
    manifest = {"format": 2, "model": {"origin": "zoo", "task": "digits", "name": "digits_cnn", "kwargs": {}},
                "transforms": [{"op": "mask", "layers": [n for n, mod in m.named_modules() if mod in layers[:-1]]}]}  # fmt: skip
    convert(m)
    x = torch.randn(4, 1, 8, 8)
    r = remove_channels(m, x, manifest)
    assert [t["op"] for t in r.manifest["transforms"]] == ["mask", "convert", "remove_channels"]
    prunq.save((r.model, r.manifest), tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(prunq.load(tmp_path / "run")(x), r.model(x))


def test_kept_channels_are_named_by_their_original_index_even_when_rounds_run_out():
    torch.manual_seed(0)
    m = _Residual().eval()
    _zero_out(m.stem, [1, 3])
    _zero_out(m.b, [1])
    r = remove_channels(m, torch.randn(2, 3, 5, 5), max_rounds=1)
    assert "coupled" in r.kept["stem[3]"] and "stem[2]" not in r.kept


def test_the_self_check_refuses_a_misread_structure_even_beside_a_large_output(monkeypatch):
    """Review: the allowance for rounding flips once let a wrong small head through beside a big map."""
    from prunq.prune import structured as S

    class TwoOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)
            self.feat = nn.Conv2d(4, 16, 1, bias=False)
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            h = torch.relu(self.c(x))
            return self.feat(h), self.fc(h.mean((2, 3)))

    torch.manual_seed(0)
    m = TwoOutputs().eval()
    _zero_out(m.c, [1], bias=0.5)  # a constant channel: folded into feat (unpadded) ... if folding works
    monkeypatch.setattr(S, "_fold", lambda mod, consts: False)  # a stand-in for a misread structure
    with pytest.raises(PrunqError, match="structure the channel graph misreads"):
        remove_channels(m, torch.randn(2, 3, 32, 32))


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True, dropout=0.0)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1))


def test_whole_attention_heads_go_when_their_value_projection_is_zero(tmp_path):
    import prunq
    from prunq.core.attention import decompose_attention_

    torch.manual_seed(0)
    m = _Encoder().eval()
    decompose_attention_(m)
    att = m.layer.self_attn
    with torch.no_grad():
        att.v_proj.weight[4:8] = 0.0  # head 1 (head_dim 4): its output is 0 whatever the scores
        att.v_proj.bias[4:8] = 0.0
        att.q_proj.weight[8:12] = 0.0  # head 2's queries only: uniform attention, not zero: stays
    x = torch.randn(2, 5, 6)
    manifest = {"format": 2, "model": {"origin": "user", "class": "_Encoder"},
                "transforms": [{"op": "decompose_attention", "layers": ["layer.self_attn"]}]}  # fmt: skip
    r = _check(m, x, manifest=manifest)
    small = r.model.layer.self_attn
    assert r.heads == {"layer.self_attn": (4, 3)} and small.num_heads == 3
    assert small.q_proj.out_features == small.v_proj.out_features == 12 and small.out_proj.in_features == 12
    assert r.entry["modules"]["layer.self_attn"] == {"heads": [0, 2, 3]}
    assert r.removed == 0  # head 2's zero query rows stay: the encoder layer is one opaque op to the trace
    prunq.save((r.model, r.manifest), tmp_path / "run")
    fresh = _Encoder()
    with torch.no_grad():
        assert torch.equal(prunq.load(tmp_path / "run", model=fresh)(x), r.model(x))
    with pytest.raises(PrunqError, match="heads were removed"):
        small.to_mha()


def test_nothing_to_remove_leaves_the_manifest_as_it_was():
    torch.manual_seed(0)
    m = _Chain().eval()
    manifest = {"format": 2, "model": {"origin": "user"}, "transforms": [{"op": "mask", "layers": ["c1"]}]}
    r = remove_channels(m, torch.randn(1, 3, 8, 8), manifest)
    assert r.removed == 0 and r.entry["modules"] == {} and r.manifest == manifest
