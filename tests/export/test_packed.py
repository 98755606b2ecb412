"""The packed file (issue 11): per layer exactly the cost model's memory bits, read back bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunq.core.errors import PrunqError
from prunq.core.manifest import replay
from prunq.core.records import layer_records
from prunq.cost.measure import measure
from prunq.export.packed import LAYER_HEADER_BITS, BitReader, BitWriter, layer_payload_bits, pack, read_meta, unpack
from prunq.prune import masks as M
from prunq.quant import QuantConfig, calibrate, convert, prepare

import prunq.methods  # noqa: F401  (registers the replay functions unpack uses)

USER = {"model": {"origin": "user"}, "transforms": []}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-(2**40), 2**40), max_size=20), st.integers(1, 41))
def test_bit_fields_round_trip(values, width):
    lo, hi = -(2 ** (width - 1)), 2 ** (width - 1) - 1
    values = [min(max(v, lo), hi) for v in values]
    w = BitWriter()
    w.put(values, width)
    w.put([5], 3)
    data = w.to_bytes()
    assert len(data) == (len(values) * width + 3 + 7) // 8  # packed tight, one pad at the end
    r = BitReader(data)
    assert r.take(len(values), width, signed=True).tolist() == values and r.take(1, 3).tolist() == [5]


def test_bits_are_little_endian_low_bits_first():
    w = BitWriter()
    w.put([1, -1], 4)  # 0001, 1111 -> byte 0b1111_0001
    assert w.to_bytes() == bytes([0xF1])


class _Net(nn.Module):
    def __init__(self, kind: str, cin: int, cout: int, k: int, bias: bool) -> None:
        super().__init__()
        if kind == "conv":
            self.layer = nn.Conv2d(cin, cout, k, bias=bias, padding=k // 2)
        elif kind == "convt":
            self.layer = nn.ConvTranspose2d(cin, cout, k, bias=bias)
        else:
            self.layer = nn.Linear(cin, cout, bias=bias)
        self.kind = kind
        self.head = nn.Linear(1, 3)

    def forward(self, x):
        y = torch.relu(self.layer(x))
        return self.head(y.reshape(y.shape[0], -1).sum(1, keepdim=True))


def _model(kind, cin, cout, k, bias, density, wbits, abits, pow2, per_channel, seed):
    torch.manual_seed(seed)
    net = _Net(kind, cin, cout, k, bias)
    M.attach_mask(net.layer, soft=False)
    mask = (torch.rand_like(net.layer.weight) < density).float()
    M.set_mask(net.layer, mask)
    cfg = QuantConfig(weight_bits=wbits, act_bits=abits, power_of_two=pow2, per_channel=per_channel)
    prepare(net, cfg)
    x = torch.randn(2, cin, 5, 5) if kind != "linear" else torch.randn(2, cin)
    calibrate(net, [x])
    return convert(net).eval(), x


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["conv", "convt", "linear"]), cin=st.integers(1, 6), cout=st.integers(1, 9),
    k=st.sampled_from([1, 3]), bias=st.booleans(), density=st.sampled_from([0.0, 0.01, 0.1, 0.5, 0.9, 1.0]),
    wbits=st.integers(2, 8), abits=st.sampled_from([2, 4, 8, 16]), pow2=st.booleans(), per_channel=st.booleans(),
    seed=st.integers(0, 10_000),
)  # fmt: skip
def test_each_layer_writes_exactly_the_cost_models_memory_bits_and_reads_back_bitwise(
    kind, cin, cout, k, bias, density, wbits, abits, pow2, per_channel, seed
):
    model, x = _model(kind, cin, cout, k, bias, density, wbits, abits, pow2, per_channel, seed)
    cost = measure(model, (x,))
    for rec, lc in zip(layer_records(model), cost.layers):
        assert layer_payload_bits(rec) == lc.memory_bits, (rec.name, lc.encoding)
    data = pack(model, USER)
    blob = len(read_meta_bytes(data)[1]) * 8
    payload = sum(lc.memory_bits for lc in cost.layers) + LAYER_HEADER_BITS * len(cost.layers)
    assert payload <= blob < payload + 8  # one pad at the end
    fresh, _ = _model(kind, cin, cout, k, bias, density, wbits, abits, pow2, per_channel, seed + 1)
    skeleton = _Net(kind, cin, cout, k, bias)
    back = unpack(skeleton, *read_meta_bytes(data), "test", replay)
    a, b = model.state_dict(), back.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert torch.equal(model(x), back(x))
    del fresh


def read_meta_bytes(data: bytes):
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".packed") as f:
        f.write(data)
        f.flush()
        return read_meta(f.name)


def test_an_unconverted_model_and_a_foreign_file_are_one_line_errors(tmp_path):
    net = nn.Sequential(nn.Linear(4, 3))
    prepare(net, QuantConfig(weight_bits=4, act_bits=8))
    calibrate(net, [torch.randn(2, 4)])
    with pytest.raises(PrunqError, match=r"packed: layer '0' still has masks or weight quantizers; convert"):
        pack(net, USER)
    with pytest.raises(PrunqError, match="not supported by the packed format"):
        pack(convert(net), {"model": {}, "transforms": [{"op": "lowrank"}]})
    other = tmp_path / "x.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(PrunqError, match="not a prunq packed file"):
        read_meta(str(other))
    (tmp_path / "junk").write_bytes(b"junk")
    with pytest.raises(PrunqError, match="not a readable prunq packed file"):
        read_meta(str(tmp_path / "junk"))


@pytest.mark.parametrize("encoding", ["dense", "bitmap", "csr", "relative"])
def test_every_position_encoding_round_trips_even_when_the_cost_model_would_pick_another(monkeypatch, encoding):
    """CSR rarely wins on real masks (its row pointers cost more than gaps): force each encoding."""
    import prunq.export.packed as P
    from prunq.cost.measure import choose_encoding

    def forced(mask, value_bits):
        _, r, idx, totals = choose_encoding(mask, value_bits)
        return encoding, r, idx, totals

    model, x = _model("conv", 3, 5, 3, True, 0.3, 4, 8, False, True, 7)
    expected = {rec.name: choose_encoding(rec.weight != 0, 4)[3][encoding] for rec in layer_records(model)}
    monkeypatch.setattr(P, "choose_encoding", forced)
    for rec in layer_records(model):
        scales = 32 * (rec.weight_q.num_steps + (rec.act_q.num_steps if rec.act_q is not None else 0))
        bias = 32 * rec.bias.numel() if rec.bias is not None else 0
        assert layer_payload_bits(rec) == expected[rec.name] + scales + bias
    back = unpack(_Net("conv", 3, 5, 3, True), *read_meta_bytes(pack(model, USER)), "test", replay)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
