"""Activation x activation products (METHOD.md §4): the multiplies no compressed layer owns.

Correlation volumes, attention ``Q K^T`` / ``A V``, soft-argmin's weighted sum: found by one forward under
a ``TorchFunctionMode`` (:func:`count_activation_products`, whose docstring has the rules: what is an
activation, the bits, constants, dead channels). The weight x activation MACs of the compressed layers are
:mod:`prunq.cost.macs`'s; this module reuses its batch and forward plumbing.

This is a lower layer: it imports :mod:`prunq.core`, :mod:`prunq.quant` and :mod:`prunq.cost.macs` only.
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from prunq.core.layers import is_compressible
from prunq.core.records import recorded_layers
from prunq.cost.macs import (
    _check_batch_size, _model_device, _per_example, _run_hooked, _tensors, _to, example_batch_size,
)  # fmt: skip
from prunq.quant.act import ActQuantizer
from prunq.quant.weight import WeightQuantizer

__all__ = ["ActSite", "count_activation_products"]

# --------------------------------------------------------------------------------------------------
# Activation x activation products (METHOD.md §4)
# --------------------------------------------------------------------------------------------------

#: Bits of an operand no quantizer produced: a float (the cost model's 32, as for an unquantized weight).
_FLOAT_BITS = 32

#: Elementwise products: one multiply per (broadcast) output element.
_MUL_OPS = frozenset({"mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply"})
#: Matrix products ``(..., M, K) @ (..., K, N)``: ``M * N * K`` multiply-accumulates per batch entry.
_MATMUL_OPS = frozenset({"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "mv", "dot", "vdot", "inner"})
#: ``op(input, m1, m2)``: the product of ``m1`` and ``m2`` (the added ``input`` is no multiply).
_ADD_MATMUL_OPS = frozenset({"addmm", "baddbmm", "addbmm", "addmv"})
#: Ops whose output holds the same values (or a subset, or zeros) on the same grid: a quantized input's
#: bits survive them. Any other op's output is a new, unquantized float tensor.
_GRID_OPS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "t", "permute", "movedim", "swapaxes",
    "__getitem__", "narrow", "select", "squeeze", "unsqueeze", "flatten", "unflatten", "expand", "expand_as",
    "repeat", "contiguous", "clone", "detach", "to", "cat", "concat", "concatenate", "stack", "split", "chunk",
    "unbind", "flip", "roll", "pad", "relu", "relu_", "max_pool1d", "max_pool2d", "max_pool3d", "dropout",
})  # fmt: skip
#: Multiplying or dividing by a scalar moves the grid's step, not its bit-width (folded into the step).
_SCALE_OPS = _MUL_OPS | frozenset({"div", "div_", "__truediv__", "__itruediv__"})

_TORCH_DIR = os.path.dirname(torch.__file__)
_COMPREHENSIONS = frozenset({"<listcomp>", "<genexpr>", "<dictcomp>", "<setcomp>"})


@dataclass
class ActSite:
    """Multiplies of one kind at one place of the forward that no compressed layer owns, per example.

    ``name``: ``"<module>.<function>:<op>"`` -- the qualified name of the module whose forward was running
    (omitted for the model itself), the Python function that called the op (omitted when it is that
    module's ``forward``) and the torch op, with ``#k`` when one function makes several such products
    (``self_attn:matmul#1`` is ``Q K^T``, ``#2`` is ``A V``); ``where`` is ``file:line``.
    ``kind``: ``"act*act"`` (both operands are activations) or ``"act*const"`` (one is a fixed tensor: a
    buffer, a parameter, a constant). ``bits``: the two operands' bits; ``macs`` the live products (dead
    channels and zero constants left out), ``dense_macs`` all of them; ``bops = macs * bits[0] * bits[1]``;
    ``calls``: op calls summed (e.g. one per disparity in a correlation loop).
    """

    name: str
    module: str
    op: str
    kind: str
    bits: tuple[int, int]
    calls: int
    dense_macs: int
    macs: int
    bops: float
    where: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (``bits`` as a list)."""
        return {
            "name": self.name, "module": self.module, "op": self.op, "kind": self.kind, "bits": list(self.bits),
            "calls": self.calls, "dense_macs": self.dense_macs, "macs": self.macs, "bops": float(self.bops),
            "where": self.where,
        }  # fmt: skip


def _op_name(func: Any) -> str:
    return getattr(func, "__name__", "") or str(func)


def _is_float(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _caller() -> tuple[str, str, int]:
    """``(function, file, line)`` of the nearest frame outside torch and this module; the function of a
    comprehension (a frame of its own before Python 3.12) is the one it sits in."""
    f = sys._getframe(2)
    where: tuple[str, int] | None = None
    while f is not None:
        fn = f.f_code.co_filename
        if not fn.startswith(_TORCH_DIR) and fn != __file__:
            where = where or (fn, f.f_lineno)
            if f.f_code.co_name not in _COMPREHENSIONS:
                return f.f_code.co_name, *where
        f = f.f_back
    return ("?", *where) if where else ("?", "?", 0)


def _alive_slices(t: torch.Tensor) -> list[torch.Tensor]:
    """Per dimension ``d``, which indices of ``t`` along ``d`` hold a non-zero anywhere (bool vectors).

    Two passes over ``t`` whatever its rank: reduce to the first half of the dimensions and to the second
    half, then each dimension from the small result of its half."""
    nz = t.detach() != 0
    n = nz.dim()
    if n <= 1:
        return [nz] if n else []
    k = n // 2
    halves = [(range(k), nz.any(dim=tuple(range(k, n)))), (range(k, n), nz.any(dim=tuple(range(k))))]
    out = []
    for dims, r in halves:
        for i, _ in enumerate(dims):
            others = tuple(j for j in range(len(dims)) if j != i)
            out.append(r.any(dim=others) if others else r)
    return out


def _live_mask(shape: torch.Size, alive: list[torch.Tensor] | None) -> torch.Tensor:
    """float64 mask of ``shape``: 0 on every slice some dimension marks dead, 1 elsewhere."""
    mask = torch.ones((), dtype=torch.float64).expand(shape)
    if alive is None:
        return mask
    for d, a in enumerate(alive):
        if not bool(a.all()):
            view = [1] * len(shape)
            view[d] = -1
            mask = mask * a.to(torch.float64).view(view)
    return mask.expand(shape)


def _matmul_count(a: torch.Tensor, b: torch.Tensor) -> int:
    """Multiply-accumulates of ``a @ b`` with products where either mask is 0 left out:
    ``sum_k (sum_m a[..., m, k]) * (sum_n b[..., k, n])`` per (broadcast) batch entry."""
    if a.dim() == 1:
        a = a.unsqueeze(0)
    if b.dim() == 1:
        b = b.unsqueeze(-1)
    ra, cb = a.sum(-2), b.sum(-1)  # (..., K) each
    return round(float((ra * cb).sum()))


class _Products(TorchFunctionMode):
    """Sees every torch function call of one forward; counts products of activations (see
    :func:`count_activation_products`)."""

    def __init__(self, names: dict[int, str], recorded_alive: list | None, replay: bool) -> None:
        super().__init__()
        self.names = names
        self.acts: WeakIdKeyDictionary = WeakIdKeyDictionary()  # activation -> its bits (None = float)
        self.stack: list[str] = []  # qualified names of the modules whose forward is running
        self.skip = 0  # > 0 inside a compressed layer or a quantizer: nothing there is counted
        self.events: list[tuple[str, list]] = []  # (op, per operand alive slices) in call order
        self.recorded = recorded_alive  # the other run's events, for dead slices (None: all alive)
        self.replay = replay  # this run makes the counts (else it only records alive slices)
        self.sites: dict[tuple, list] = {}
        self.mismatch = False

    # -- module context ---------------------------------------------------------------------------
    def push(self, module: nn.Module, args: Any) -> None:
        self.stack.append(self.names.get(id(module), ""))
        if getattr(module, "_prunq_act_skip", False):
            self.skip += 1

    def pop(self, module: nn.Module, args: Any, out: Any) -> Any:
        self.stack.pop()
        if getattr(module, "_prunq_act_skip", False):
            self.skip -= 1
        if isinstance(module, ActQuantizer) and isinstance(out, torch.Tensor) and self._is_act(args):
            if any(out is t for t in _tensors(args)):  # an observing quantizer passes its input through:
                out = out.view_as(out)  # mark a new view, not the input (other users of it are not quantized)
            self.acts[out] = int(module.bits)  # a quantized activation: its bits travel with it
            return out
        return None

    def _is_act(self, x: Any) -> bool:
        return any(t in self.acts for t in _tensors(x))

    # -- every torch function -----------------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [t for t in _tensors((args, kwargs)) if _is_float(t)]
        acts = [t for t in ins if t in self.acts]
        if not acts:
            return out
        op = _op_name(func)
        if not self.skip:
            self._count(op, args, kwargs)
        bits: int | None = None
        if op in _GRID_OPS or op in _SCALE_OPS:
            consts = [t for t in ins if t not in self.acts]
            scalar_only = all(t.numel() <= 1 for t in consts)
            grid = op in _GRID_OPS and not consts or op in _SCALE_OPS and scalar_only and len(acts) == 1
            if grid and all(self.acts[t] is not None for t in acts):
                bits = max(self.acts[t] for t in acts)
        for t in _tensors(out):
            self.acts[t] = bits
        return out

    def _operands(self, op: str, args: tuple, kwargs: dict) -> list[torch.Tensor] | None:
        if op in _MUL_OPS or op in _MATMUL_OPS:
            pair = list(args[:2]) + [kwargs.get("other")] if len(args) < 2 else list(args[:2])
            if op == "__rmatmul__":
                pair = pair[::-1]
        elif op in _ADD_MATMUL_OPS:
            pair = list(args[1:3])
        elif op == "linear":  # F.linear(x, w): only a weight that is itself an activation is counted here
            pair = [args[0], args[1] if len(args) > 1 else kwargs.get("weight")]
            if not (isinstance(pair[1], torch.Tensor) and pair[1] in self.acts):
                return None
        elif op == "einsum":
            ops = args[1:]
            if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
                ops = tuple(ops[0])
            pair = list(ops)
        elif op == "scaled_dot_product_attention":
            names = ("query", "key", "value")
            pair = [args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names)]
        elif op == "multi_head_attention_forward":
            pair = list(args[:3])
        else:
            return None
        if len(pair) < 2 or not all(_is_float(t) for t in pair):
            return None  # a product with a Python scalar (or an integer mask): a rescale, not counted
        if op in _MUL_OPS and any(t.numel() <= 1 and t not in self.acts for t in pair):
            return None  # times a one-element constant: a rescale folded into the step
        return pair

    def _count(self, op: str, args: tuple, kwargs: dict) -> None:
        pair = self._operands(op, args, kwargs)
        if pair is None:
            return
        is_act = [t in self.acts for t in pair]
        # Alive slices of each activation operand in this run; a constant is its own elementwise mask.
        alive = [_alive_slices(t) if a else None for t, a in zip(pair, is_act)]
        index = len(self.events)
        self.events.append((op, [tuple(t.shape) for t in pair], alive))
        if not self.replay:
            return
        if self.recorded is not None and not self.mismatch:
            other = self.recorded[index] if index < len(self.recorded) else None
            if other is None or other[0] != op or other[1] != [tuple(t.shape) for t in pair]:
                self.mismatch = True
            else:  # a slice is dead only when it is zero in both runs
                alive = [None if a is None else [x | y for x, y in zip(a, b)] for a, b in zip(alive, other[2])]
        if self.recorded is None or self.mismatch:
            alive = [None] * len(pair)
        masks = [
            (t.detach() != 0).to(torch.float64) if not a else _live_mask(t.shape, al)
            for t, a, al in zip(pair, is_act, alive)
        ]
        ones = [torch.ones((), dtype=torch.float64).expand(t.shape) for t in pair]
        live, dense = (self._macs(op, pair, args, m) for m in (masks, ones))
        bits = [(self.acts[t] or _FLOAT_BITS) if a else _FLOAT_BITS for t, a in zip(pair, is_act)]
        b = tuple(sorted(bits, reverse=True)[:2])
        kind = "act*act" if sum(is_act) >= 2 else "act*const"
        function, path, line = _caller()
        module = self.stack[-1] if self.stack else ""
        key = (module, function, path, line, op, kind, b)
        rec = self.sites.setdefault(key, [0, 0, 0])
        rec[0] += 1
        rec[1] += dense
        rec[2] += live

    @staticmethod
    def _macs(op: str, pair: list[torch.Tensor], args: tuple, m: list[torch.Tensor]) -> int:
        if op in _MUL_OPS:
            return round(float((m[0] * m[1]).sum()))
        if op in _MATMUL_OPS or op in _ADD_MATMUL_OPS:
            if op in ("dot", "vdot", "inner") and m[0].dim() == m[1].dim() == 1:
                return round(float((m[0] * m[1]).sum()))
            if op == "inner":
                return _matmul_count(m[0], m[1].transpose(-2, -1) if m[1].dim() > 1 else m[1])
            return _matmul_count(m[0], m[1])
        if op == "linear":
            return _matmul_count(m[0], m[1].transpose(-2, -1))
        if op == "einsum":  # every combination of indices is one multiply per pair of operands
            return (len(m) - 1) * round(float(torch.einsum(args[0], *m).sum()))
        if op == "scaled_dot_product_attention":
            q, k, v = m
            qk = _matmul_count(q, k.transpose(-2, -1))
            batch = torch.broadcast_shapes(q.shape[:-2], v.shape[:-2])
            av = q.shape[-2] * float(v.sum((-2, -1)).expand(batch).sum()) if batch else q.shape[-2] * float(v.sum())
            return qk + round(av)
        if op == "multi_head_attention_forward":  # (L, N, E) or unbatched (L, E); dense only
            q, k = pair[0], pair[1]
            n = q.shape[1] if q.dim() == 3 else 1
            return 2 * n * q.shape[0] * k.shape[0] * q.shape[-1]
        return 0

    def results(self, batch: int) -> list[ActSite]:
        by_function: dict[tuple, list[tuple]] = {}
        for key in self.sites:
            by_function.setdefault((key[0], key[1], key[4]), []).append(key)
        out = []
        for (module, function, op), keys in by_function.items():
            lines = list(dict.fromkeys((k[2], k[3]) for k in keys))  # in order of first call
            for key in keys:
                calls, dense, live = self.sites[key]
                prefix = ".".join(p for p in (module, "" if function == "forward" else function) if p) or "<model>"
                suffix = f"#{lines.index((key[2], key[3])) + 1}" if len(lines) > 1 else ""
                macs = _per_example(live, batch)
                out.append(
                    ActSite(
                        name=f"{prefix}:{op}{suffix}", module=module, op=op, kind=key[5], bits=key[6], calls=calls,
                        dense_macs=_per_example(dense, batch), macs=macs, bops=float(macs * key[6][0] * key[6][1]),
                        where=f"{os.path.basename(key[2])}:{key[3]}",
                    )
                )  # fmt: skip
        return out


def _random_like(x: Any, gen: torch.Generator) -> Any:
    """``x`` with every floating tensor replaced by standard normal noise (same shape, dtype, device)."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            return x
        return torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    if type(x) is dict:
        return {k: _random_like(v, gen) for k, v in x.items()}
    if type(x) in (tuple, list):
        return type(x)(_random_like(v, gen) for v in x)
    return x


@torch.no_grad()
def count_activation_products(
    model: nn.Module,
    example_inputs: Any,
    *,
    batch_size: int | None = None,
    dead_channels: bool = True,
) -> list[ActSite]:
    """Per example, the multiplies of one forward that no compressed layer owns: :class:`ActSite`\\ s.

    Runs ``model(*example_inputs)`` under a :class:`torch.overrides.TorchFunctionMode` (eval, ``no_grad``,
    train flags restored, uncalibrated activation quantizers passed through as in :func:`count_macs`).

    * **Activations** are the example inputs and every tensor computed from one; parameters, buffers and
      tensors built from them alone (a weight through its mask and quantizer) are constants.
    * **Counted ops**: elementwise ``mul`` (one multiply per broadcast output element), ``matmul`` / ``@`` /
      ``mm`` / ``bmm`` / ``mv`` / ``dot`` / ``addmm`` / ``baddbmm`` (``M * N * K``), ``einsum`` (one multiply
      per index combination and operand pair), ``scaled_dot_product_attention`` (``Q K^T`` and ``A V``: ``L S
      E`` each), ``F.linear`` whose weight is an activation, and ``nn.MultiheadAttention``'s functional
      kernel (``2 N L S E``; its projections are not seen -- decompose it). Both operands activations:
      ``"act*act"``. One a fixed tensor of more than one element (soft-argmin's disparity values, a
      parameter used as a scale): ``"act*const"``, a multiply the hardware does all the same.
    * **Not counted**: anything inside a compressed layer (its MACs are weight BOPs) or a quantizer module
      (the fake-quant arithmetic); products with a Python scalar or a one-element constant (a rescale,
      folded into the next step); convolutions / linears with constant weights (layers: their own
      account); divisions, normalisation, softmax, pooling, and interpolation (bilinear upsampling
      multiplies by fixed fractions: not counted, METHOD.md lists no interpolation cost).
    * **Bits** of an operand: those of the :class:`~prunq.quant.act.ActQuantizer` module whose output it
      is, carried through ops that keep values on the grid (views, slicing, ``cat``, ``pad``, ``relu``,
      max-pooling, scaling by a scalar); any other operand -- a layer's float output, a softmax, a constant
      -- is a float and costs 32 bits, as an unquantized weight does. prunq quantizes only the inputs of
      compressed layers today, so the products counted here are usually 32 x 32.
    * **Dead channels** (``dead_channels=True``): a second forward on standard-normal inputs (same shapes);
      a slice of an activation operand along any dimension (a channel, a head, a feature) that is exactly
      zero in both runs -- a pruned filter without bias or shift, whatever the input -- is left out, and
      so are the zero elements of a constant operand (as zero weights are). ``dense_macs`` counts
      everything. If the two runs call different ops (data-dependent control flow) nothing is dead.

    The batch is ``batch_size`` or the first input's leading dimension (:func:`example_batch_size`).
    Every compressible layer's insides are skipped, measured or excluded alike.

    >>> class Corr(nn.Module):
    ...     def forward(self, a, b):
    ...         return (a * b).sum(1)
    >>> [(s.name, s.kind, s.bits, s.macs) for s in count_activation_products(Corr(), (torch.ones(2, 4, 3),) * 2)]
    [('<model>:mul', 'act*act', (32, 32), 12)]
    """
    _check_batch_size(batch_size)
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if batch_size is None:
        batch_size = example_batch_size(example_inputs)
    names: dict[int, str] = {}
    for name, m in model.named_modules():
        names.setdefault(id(m), name)
    skip = {id(m) for _, m in recorded_layers(model, ())} | {
        id(m) for m in model.modules() if is_compressible(m) or isinstance(m, (ActQuantizer, WeightQuantizer))
    }
    modules = list({id(m): m for m in model.modules()}.values())
    flagged = []
    for m in modules:
        if id(m) in skip and not getattr(m, "_prunq_act_skip", False):
            m._prunq_act_skip = True
            flagged.append(m)

    def run(inputs: tuple, mode: _Products) -> None:
        def pre(module: nn.Module, args: tuple) -> None:
            mode.push(module, args)

        def post(module: nn.Module, args: tuple, out: Any) -> Any:
            return mode.pop(module, args, out)

        class _Inputs(AbstractContextManager):
            def __enter__(self) -> None:
                mode.__enter__()
                for t in _tensors(inputs):
                    if t.is_floating_point():
                        mode.acts[t] = None

            def __exit__(self, *exc: object) -> None:
                mode.__exit__(*exc)

        device = _model_device(model)
        if device is not None:
            inputs = tuple(_to(x, device) for x in inputs)
        _run_hooked(model, inputs, [], [(m, pre) for m in modules], [(m, post) for m in modules], _Inputs())

    try:
        recorded = None
        if dead_channels:
            probe = _Products(names, None, replay=False)
            run(tuple(_random_like(x, torch.Generator().manual_seed(0)) for x in example_inputs), probe)
            recorded = probe.events
        mode = _Products(names, recorded, replay=True)
        run(tuple(example_inputs), mode)
    finally:
        for m in flagged:
            del m._prunq_act_skip
    if mode.mismatch:
        warnings.warn(
            "count_activation_products: the probe forward called other ops than the example's; "
            "dead channels are not subtracted from activation products",
            stacklevel=2,
        )
    return mode.results(batch_size)
