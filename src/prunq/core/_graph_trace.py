"""The machinery behind :class:`prunq.core.graph.ChannelGraph`: the fx tracer and shape pass, the tables
of operations the graph models, and the per-node propagation of channel sources (``_Analysis``).

Private: :mod:`prunq.core.graph` is the public face (the graph, its queries and dead-channel evaluation);
this module is what a new supported operation edits.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_aggregate
from torch.nn.modules.batchnorm import _BatchNorm

from prunq.core.layers import channel_dim, input_count, is_compressible, out_channels

if TYPE_CHECKING:  # pragma: no cover
    from prunq.core.graph import ChannelGraph

#: ``(producer, output channel)``, as the public graph reports it (see :mod:`prunq.core.graph`).
Source = tuple[str, int]

_Ref = tuple[int, int]  # (internal producer id, channel)
_INPUT, _OPAQUE, _LAYER, _MERGE, _PRODUCT = range(5)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _is_quantizer(module: nn.Module) -> bool:
    # Duck-typed so that core does not import prunq.quant (which imports core): a fake-quantizer maps 0
    # to 0 and must not be traced into (an uncalibrated one raises in forward).
    return hasattr(module, "qmin") and hasattr(module, "qmax") and callable(getattr(module, "effective_step", None))


def _types(*names: str) -> tuple[type, ...]:
    return tuple(getattr(nn, n) for n in names if hasattr(nn, n))


# -- what the graph knows about operations ----------------------------------------------------------------
# "zero": per-channel and maps 0 to 0. "eval": per-channel with a constant f(0), found by running the op
# on zeros. Everything not listed is opaque: its outputs are never dead and hide their sources.
_ZERO_MODULES = _types(
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Hardswish", "Tanh",
    "Softsign", "Tanhshrink", "Hardshrink", "Softshrink", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d",
    "AlphaDropout", "FeatureAlphaDropout", "Identity", "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d",
    "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool1d",
    "AdaptiveMaxPool2d", "AdaptiveMaxPool3d", "LPPool1d", "LPPool2d", "Upsample", "UpsamplingNearest2d",
    "UpsamplingBilinear2d", "ZeroPad1d", "ZeroPad2d", "ZeroPad3d", "ReflectionPad1d", "ReflectionPad2d",
    "ReflectionPad3d", "ReplicationPad1d", "ReplicationPad2d", "ReplicationPad3d", "CircularPad1d",
    "CircularPad2d", "CircularPad3d",
)  # fmt: skip
_EVAL_MODULES = _types(
    "Hardtanh", "Threshold", "Sigmoid", "Hardsigmoid", "Softplus", "LogSigmoid", "ConstantPad1d",
    "ConstantPad2d", "ConstantPad3d",
)  # fmt: skip
_VIEW_MODULES = _types("Flatten", "Unflatten")

_FUNCTIONS: dict[Any, str] = {}
for _kind, _fns in {
    "zero": (
        torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
        F.mish, F.hardswish, torch.tanh, F.tanh, F.softsign, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
        F.alpha_dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
        F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
        F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, torch.abs, torch.neg, operator.neg,
    ),
    "eval": (
        torch.sigmoid, F.sigmoid, F.hardsigmoid, F.hardtanh, F.softplus, torch.clamp, torch.clip, F.pad, torch.exp,
    ),
    "add": (operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub),
    "mul": (operator.mul, operator.imul, torch.mul),
    "div": (operator.truediv, operator.itruediv, torch.div),
    "view": (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze),
    "cat": (torch.cat, torch.concat, torch.concatenate),
    "split": (torch.split, torch.chunk, torch.tensor_split),
    "reduce": (torch.mean, torch.sum, torch.amax, torch.amin),
    "permute": (torch.permute,),
    "transpose": (torch.transpose,),
    "getitem": (operator.getitem,),
}.items():  # fmt: skip
    _FUNCTIONS.update(dict.fromkeys(_fns, _kind))

_METHODS: dict[str, str] = {}
for _kind, _names in {
    "zero": ("relu", "relu_", "tanh", "tanh_", "abs", "neg", "contiguous", "clone", "detach", "float", "half",
             "double", "bfloat16", "to", "cpu", "cuda"),
    "eval": ("sigmoid", "sigmoid_", "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "exp"),
    "add": ("add", "add_", "sub", "sub_"),
    "mul": ("mul", "mul_"),
    "div": ("div", "div_"),
    "view": ("view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as"),
    "split": ("split", "chunk", "tensor_split"),
    "reduce": ("mean", "sum", "amax", "amin"),
    "permute": ("permute",),
    "transpose": ("transpose",),
}.items():  # fmt: skip
    _METHODS.update(dict.fromkeys(_names, _kind))


@dataclass(eq=False)
class _Producer:
    """An internal channel producer. ``inputs``: LAYER -- one list, the sources of each input channel (a
    union over calls); MERGE -- one list, output channel k is dead iff ``alive0[k]`` is false and all of
    ``inputs[0][k]`` are dead; PRODUCT -- one list per factor, channel k is dead iff one factor's is."""

    kind: int
    name: str
    size: int
    inputs: list[list[frozenset[_Ref]]] = field(default_factory=list)
    alive0: torch.Tensor | Callable[[nn.Module], torch.Tensor] | None = None  # MERGE: f(0) != 0 per channel


@dataclass(frozen=True, eq=False)
class _Val:
    """What a tensor's channels depend on. ``cdim is None``: uniform, every element depends on ``chans[0]``."""

    cdim: int | None
    chans: tuple[frozenset[_Ref], ...]


@dataclass(frozen=True)
class _T:
    """Shape-pass record of a tensor (no data kept)."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


class _Tracer(torch.fx.Tracer):
    """fx tracer whose leaves also include compressible layers (parametrized or subclassed), BatchNorm
    and fake-quantizer modules."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:  # noqa: D102
        if is_compressible(m) or isinstance(m, _BatchNorm) or _is_quantizer(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


class _ShapePass(torch.fx.Interpreter):
    """Runs the traced graph once and records each node's result (tensors as :class:`_T`).

    Leaf modules are called through ``forward`` so that hooks -- prunq's input fake-quantizers, which
    raise before calibration -- do not run; quantizer modules are skipped (they keep shapes).
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.meta: dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:  # noqa: D102
        result = super().run_node(n)
        if n.op == "get_attr":
            self.meta[n] = result  # a constant operand: keep the value itself
        else:
            self.meta[n] = map_aggregate(
                result, lambda x: _T(x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else x
            )
        return result

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:  # noqa: D102
        mod = self.fetch_attr(target)
        if _is_quantizer(mod):
            return args[0]
        return mod.forward(*args, **kwargs)


def _has_tensor(meta: Any) -> bool:
    found = False

    def visit(x: Any) -> Any:
        nonlocal found
        found = found or isinstance(x, _T)
        return x

    map_aggregate(meta, visit)
    return found


def _union(sets: Iterable[frozenset[_Ref]]) -> frozenset[_Ref]:
    return frozenset().union(*sets)


def _bn_alive0(target: str, size: int) -> Callable[[nn.Module], torch.Tensor]:
    """``f(0) != 0`` per channel for a BatchNorm, read when asked (statistics change while training)."""

    def alive0(model: nn.Module) -> torch.Tensor:
        try:
            bn = model.get_submodule(target)
        except AttributeError:
            return torch.ones(size, dtype=torch.bool)
        if isinstance(bn, nn.Identity):  # folded away
            return torch.zeros(size, dtype=torch.bool)
        if not isinstance(bn, _BatchNorm) or bn.num_features != size:
            return torch.ones(size, dtype=torch.bool)
        shift = bn.bias.detach().double() if bn.affine else torch.zeros(size, dtype=torch.float64)
        if not bn.training and bn.running_mean is not None:
            g = torch.rsqrt(bn.running_var.double() + bn.eps)
            if bn.affine:
                g = g * bn.weight.detach().double()
            shift = shift.to(g.device) - bn.running_mean.double() * g
        return shift.ne(0).cpu()

    return alive0


class _Expander:
    """Internal refs -> :data:`Source` sets (merges and products are looked through), memoised."""

    def __init__(self, prods: list[_Producer]) -> None:
        self.prods = prods
        self.memo: dict[int, list[frozenset[Source]]] = {}

    def ref(self, i: int, c: int) -> frozenset[Source]:
        p = self.prods[i]
        if p.kind == _LAYER:
            return frozenset({(p.name, c)})
        if p.kind == _INPUT:
            return frozenset({(f"<input:{p.name}>", c)})
        if p.kind == _OPAQUE:
            return frozenset({(f"<op:{p.name}>", c)})
        if i not in self.memo:  # merge/product inputs have smaller ids: expand in id order, no deep recursion
            for j in range(i + 1):
                q = self.prods[j]
                if j not in self.memo and q.kind in (_MERGE, _PRODUCT):
                    self.memo[j] = [frozenset().union(*(self.set(f[k]) for f in q.inputs)) for k in range(q.size)]
        return self.memo[i][c]

    def set(self, s: frozenset[_Ref]) -> frozenset[Source]:
        return frozenset().union(*(self.ref(i, c) for i, c in s))


class _Analysis:
    """One walk over the traced graph, in order, computing a :class:`_Val` for each tensor."""

    def __init__(self, graph: ChannelGraph, gm: torch.fx.GraphModule, meta: dict[torch.fx.Node, Any]) -> None:
        self.g = graph
        self.gm = gm
        self.meta = meta
        self.modules = dict(gm.named_modules())
        self.env: dict[torch.fx.Node, Any] = {}
        self.collapsed: dict[int, tuple[_Val, frozenset[_Ref]]] = {}
        self.escapes: set[_Ref] = set()
        self.channel_modules: dict[str, list[frozenset[_Ref]]] = {}  # BatchNorm target -> per-channel refs

    def run(self) -> None:
        for n in self.gm.graph.nodes:
            self.env[n] = self.visit(n)
        expand = _Expander(self.g._prods)
        for name, i in self.g._layer_ids.items():
            self.g._sources[name] = [expand.set(s) for s in self.g._prods[i].inputs[0]]
        self.g._channel_modules = {t: [expand.set(s) for s in chans] for t, chans in self.channel_modules.items()}
        self.g._escaped = expand.set(frozenset(self.escapes))
        self.g._chains = self.chains()

    # -- where channels leave what the graph can slice ------------------------------------------------------
    def escape(self, v: Any) -> None:
        """Every channel ``v`` (a value, or a tuple of values) holds is used where removing a channel is
        not a matter of slicing the layers: an opaque op, the model's output, a channel-mixing op, an index
        into the channel dim, a module with per-channel state the graph does not know."""
        if isinstance(v, _Val):
            self.escapes.update(self.collapse(v))
        elif isinstance(v, (tuple, list)):
            for x in v:
                self.escape(x)

    def escape_args(self, n: torch.fx.Node) -> None:
        def visit(a: Any) -> Any:
            if isinstance(a, torch.fx.Node):
                self.escape(self.env.get(a))
            return a

        map_aggregate((n.args, dict(n.kwargs)), visit)

    # -- producers and values -----------------------------------------------------------------------------
    def new(self, kind: int, name: str, size: int, inputs: list | None = None, alive0: Any = None) -> int:
        self.g._prods.append(_Producer(kind, name, size, inputs or [], alive0))
        return len(self.g._prods) - 1

    def fresh(self, kind: int, name: str, meta: Any) -> Any:
        """A never-dead value (model input or opaque op) with one channel per index of dim 1."""
        if isinstance(meta, (tuple, list)):  # name each part: "<op:split[1]>"
            return tuple(self.fresh(kind, f"{name}[{k}]", m) for k, m in enumerate(meta))
        if not isinstance(meta, _T):
            return None
        cdim = 1 if len(meta.shape) >= 2 else None
        size = meta.shape[1] if cdim is not None else 1
        i = self.new(kind, name, size)
        return _Val(cdim, tuple(frozenset({(i, c)}) for c in range(size)))

    def val(self, n: Any) -> _Val | None:
        """The value of a tensor argument (an opaque one for an untracked tensor), else ``None``."""
        if not isinstance(n, torch.fx.Node):
            return None
        v = self.env.get(n)
        if isinstance(v, _Val):
            return v
        if n.op != "get_attr" and isinstance(self.meta.get(n), _T):
            v = self.env[n] = self.fresh(_OPAQUE, n.name, self.meta[n])
            return v
        return None

    def collapse(self, v: _Val) -> frozenset[_Ref]:
        """Everything ``v`` depends on, as one set (sound whenever channels get mixed)."""
        if v.cdim is None:
            return v.chans[0]
        hit = self.collapsed.get(id(v))
        if hit is None:  # collapsing mixes channels: none of them can be removed by slicing
            hit = self.collapsed[id(v)] = (v, _union(v.chans))
            self.escapes.update(hit[1])
        return hit[1]

    def uniform(self, s: frozenset[_Ref]) -> _Val:
        return _Val(None, (s,))

    def merge(self, name: str, chans: list[frozenset[_Ref]], alive0: Any, cdim: int | None) -> _Val:
        i = self.new(_MERGE, name, len(chans), [list(chans)], alive0)
        return _Val(cdim, tuple(frozenset({(i, k)}) for k in range(len(chans))))

    def shape(self, n: Any) -> torch.Size | None:
        m = self.meta.get(n) if isinstance(n, torch.fx.Node) else None
        return m.shape if isinstance(m, _T) else None

    # -- dispatch ---------------------------------------------------------------------------------------
    def visit(self, n: torch.fx.Node) -> Any:
        meta = self.meta.get(n)
        if n.op == "placeholder":
            return self.fresh(_INPUT, str(n.target), meta)
        if n.op == "output":
            self.escape_args(n)
            return None
        if n.op == "get_attr" or not _has_tensor(meta):
            return None
        args, kwargs = n.args, n.kwargs
        if n.op == "call_module":
            mod = self.modules[n.target]
            if is_compressible(mod):
                return self.layer(n, mod)
            if isinstance(mod, _BatchNorm):
                return self.batchnorm(n, mod)
            if any(t.numel() > 1 for t in (*mod.parameters(), *mod.buffers())):  # per-channel state (PReLU)
                self.escape_args(n)
            if _is_quantizer(mod) or isinstance(mod, _ZERO_MODULES):
                kind = "zero"
            elif isinstance(mod, _EVAL_MODULES):
                kind = "eval"
            elif isinstance(mod, _VIEW_MODULES):
                kind = "view"
            else:
                kind = None
        elif n.op == "call_function":
            kind = _FUNCTIONS.get(n.target)
        else:
            kind = _METHODS.get(str(n.target))
        if kind in ("add", "mul", "div"):
            out = self.binary(n, args, kwargs, kind)
        else:
            handler = getattr(self, f"op_{kind}", None) if kind else None
            out = handler(n, args, kwargs) if handler else None
        if out is None:
            self.escape_args(n)
            return self.fresh(_OPAQUE, n.name, meta)
        return out

    # -- layers -----------------------------------------------------------------------------------------
    def layer(self, n: torch.fx.Node, mod: nn.Module) -> _Val | None:
        x = n.args[0] if n.args else None
        v, s, out = self.val(x), self.shape(x), self.shape(n)
        if v is None or s is None or out is None:
            return None
        cin, cout = input_count(mod), out_channels(mod)
        if v.cdim is not None and v.cdim == channel_dim(mod, len(s)) and len(v.chans) == cin:
            chans = list(v.chans)
        else:
            chans = [self.collapse(v)] * cin
        name = str(n.target)
        i = self.g._layer_ids.get(name)
        if i is None:
            i = self.g._layer_ids[name] = self.new(_LAYER, name, cout, [chans])
        else:  # called again: an input channel is dead only if dead at every call
            old = self.g._prods[i].inputs[0]
            self.g._prods[i].inputs[0] = [a | b for a, b in zip(old, chans)]
        groups = int(getattr(mod, "groups", 1))
        if groups > 1 and cin == groups:  # depthwise (x multiplier): output o is input o // mult, scaled
            mult = cout // groups
            self.g._ties.extend(chans[o // mult] | {(i, o)} for o in range(cout))
        return _Val(channel_dim(mod, len(out)), tuple(frozenset({(i, o)}) for o in range(cout)))

    def batchnorm(self, n: torch.fx.Node, mod: _BatchNorm) -> _Val | None:
        v, out = self.val(n.args[0] if n.args else None), self.shape(n)
        if v is None or out is None or v.cdim != 1 or len(v.chans) != mod.num_features:
            return None
        if str(n.target) in self.channel_modules:  # called twice: its channels serve two inputs
            self.escape(v)
            self.escape(_Val(1, tuple(self.channel_modules[str(n.target)])))
        self.channel_modules[str(n.target)] = list(v.chans)
        return self.merge(n.name, list(v.chans), _bn_alive0(str(n.target), mod.num_features), 1)

    # -- channel-preserving ops -------------------------------------------------------------------------
    def same_channels(self, v: _Val, n: torch.fx.Node, x: Any) -> bool:
        s, out = self.shape(x), self.shape(n)
        return s is not None and out is not None and len(s) == len(out) and (v.cdim is None or out[v.cdim] == s[v.cdim])

    def extra_tensors(self, n: torch.fx.Node, args: tuple, kwargs: dict) -> bool:
        """Whether an op reads tensors besides its first argument (then its per-channel reading of the
        first one cannot be sliced blindly)."""
        found = False

        def visit(a: Any) -> Any:
            nonlocal found
            m = self.meta.get(a) if isinstance(a, torch.fx.Node) else a
            found = found or isinstance(m, _T) or isinstance(m, torch.Tensor) and m.numel() > 1
            return a

        map_aggregate((args[1:], dict(kwargs)), visit)
        return found

    def op_zero(self, n: torch.fx.Node, args: tuple, kwargs: dict) -> _Val | None:
        if args and self.extra_tensors(n, args, kwargs):
            self.escape(self.val(args[0]))
        v = self.val(args[0]) if args else None
        return v if v is not None and self.same_channels(v, n, args[0]) else None

    def op_eval(self, n: torch.fx.Node, args: tuple, kwargs: dict) -> _Val | None:
        if args and self.extra_tensors(n, args, kwargs):
            self.escape(self.val(args[0]))
        v = self.val(args[0]) if args else None
        if v is None or not self.same_channels(v, n, args[0]):
            return None
        return self.from_zero_response(n, args[0], v)

    def from_zero_response(self, n: torch.fx.Node, x: torch.fx.Node, v: _Val) -> _Val:
        """Run the op with ``x`` replaced by zeros: channels where it returns non-zero are never dead."""
        alive = self.zero_response(n, x, v)
        if alive is not None and not bool(alive.any()):
            return v
        size = len(v.chans)
        alive = torch.ones(size, dtype=torch.bool) if alive is None else alive
        return self.merge(n.name, list(v.chans), alive, v.cdim)

    def zero_response(self, n: torch.fx.Node, x: torch.fx.Node, v: _Val) -> torch.Tensor | None:
        t = self.meta[x]

        def concrete(a: Any) -> Any:
            if not isinstance(a, torch.fx.Node):
                return a
            if a is x:
                return torch.zeros(t.shape, dtype=t.dtype, device=t.device)
            m = self.meta.get(a)
            if a.op != "get_attr" and _has_tensor(m):
                raise LookupError  # another tensor computed by the model: f(0) is not a constant
            return m

        try:
            args = map_aggregate(n.args, concrete)
            kwargs = map_aggregate(dict(n.kwargs), concrete)
            with torch.no_grad():
                if n.op == "call_module":
                    out = self.modules[n.target].forward(*args, **kwargs)
                elif n.op == "call_function":
                    out = n.target(*args, **kwargs)
                else:
                    out = getattr(args[0], n.target)(*args[1:], **kwargs)
        except Exception:
            return None
        if not isinstance(out, torch.Tensor):
            return None
        nonzero = out.ne(0) | ~torch.isfinite(out)
        if v.cdim is None:
            return nonzero.any().reshape(1).cpu()
        if out.dim() <= v.cdim or out.shape[v.cdim] != len(v.chans):
            return None
        return nonzero.movedim(v.cdim, 0).reshape(len(v.chans), -1).any(1).cpu()

    # -- elementwise between tensors --------------------------------------------------------------------
    def binary(self, n: torch.fx.Node, args: tuple, kwargs: dict, kind: str) -> _Val | None:
        a = args[0] if args else None
        b = args[1] if len(args) > 1 else kwargs.get("other")
        va, vb = self.val(a), self.val(b)
        if va is None and vb is None:
            return None
        if va is None or vb is None:  # tensor (op) constant: per channel, f(0) decides
            v, x = (va, a) if vb is None else (vb, b)
            other = b if vb is None else a
            const = self.meta.get(other) if isinstance(other, torch.fx.Node) else other
            if isinstance(const, torch.Tensor) and const.numel() > 1:  # a parameter (layer scale): per channel
                self.escape(v)
            return self.from_zero_response(n, x, v) if self.same_channels(v, n, x) else None
        out = self.shape(n)
        sa, sb = self.shape(a), self.shape(b)
        if out is None or sa is None or sb is None:
            return None
        cdim = next(
            (
                v.cdim + len(out) - len(s)
                for v, s in ((va, sa), (vb, sb))
                if v.cdim is not None and out[v.cdim + len(out) - len(s)] == len(v.chans)
            ),
            None,
        )
        if cdim is None:
            ca, cb, per_channel = [self.collapse(va)], [self.collapse(vb)], False
        else:
            (ca, pa), (cb, pb) = self.aligned(va, sa, out, cdim), self.aligned(vb, sb, out, cdim)
            per_channel = pa and pb
        if per_channel:
            self.g._ties.extend(x | y for x, y in zip(ca, cb))
        if kind == "add":
            return _Val(cdim, tuple(x | y for x, y in zip(ca, cb)))
        if kind == "mul":
            i = self.new(_PRODUCT, n.name, len(ca), [ca, cb])
            return _Val(cdim, tuple(frozenset({(i, k)}) for k in range(len(ca))))
        chans = [x | y for x, y in zip(ca, cb)]  # a / b: 0 / 0 is not 0, never dead
        return self.merge(n.name, chans, torch.ones(len(chans), dtype=torch.bool), cdim)

    def aligned(self, v: _Val, s: torch.Size, out: torch.Size, cdim: int) -> tuple[list[frozenset[_Ref]], bool]:
        """``v``'s sets for each output channel at ``cdim`` (broadcast), and whether they are per channel."""
        size = out[cdim]
        if v.cdim is not None and v.cdim + len(out) - len(s) == cdim and len(v.chans) == size:
            return list(v.chans), True
        return [self.collapse(v)] * size, False

    # -- shape ops --------------------------------------------------------------------------------------
    def op_view(self, n: torch.fx.Node, args: tuple, kwargs: dict) -> _Val | None:
        """Order-preserving reshape (view, flatten, squeeze...): a channel maps to a block of the new dim."""
        x = args[0] if args else None
        v, s, out = self.val(x), self.shape(x), self.shape(n)
        if v is None or s is None or out is None:
            return None
        if v.cdim is None:
            return v
        d, size = v.cdim, len(v.chans)
        if len(out) <= d or tuple(out[:d]) != tuple(s[:d]):
            return self.uniform(self.collapse(v))
        if self.fixed_size(n, args, kwargs, d):  # x.view(-1, 400), view_as(y): breaks once channels go
            self.escape(v)
        new, inner = out[d], math.prod(s[d + 1 :])
        if new % size == 0 and inner % (new // size) == 0:  # channel-major flatten: k features per channel
            k = new // size
            return _Val(d, tuple(v.chans[j // k] for j in range(new)))
        if size % new == 0:  # channels grouped into fewer
            m = size // new
            self.escape(v)
            return _Val(d, tuple(_union(v.chans[j * m : (j + 1) * m]) for j in range(new)))
        return self.uniform(self.collapse(v))

    def fixed_size(self, n: torch.fx.Node, args: tuple, kwargs: dict, d: int) -> bool:
        """Whether a reshape states the size of output dim ``d`` (the channel's) as a number or takes it
        from another tensor, rather than inferring it (-1) or reading it from the input itself."""
        target = str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", "")
        if target in ("view_as", "reshape_as"):
            return True
        if target not in ("view", "reshape"):
            return False  # flatten, squeeze, unsqueeze: derived from the input's own shape
        sizes = args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = tuple(sizes[0])
        sizes = sizes or tuple(kwargs.get("shape", kwargs.get("size", ())))
        return d < len(sizes) and isinstance(sizes[d], int) and sizes[d] != -1

    def op_permute(self, n: torch.fx.Node, args: tuple, kwargs: dict) -> _Val | None:
        v, s = self.val(args[0]), self.shape(args[0])
        if v is None or s is None or v.cdim is None:
            return v
        dims = args[1:] if n.op == "call_method" else args[1:2]
        dims = kwargs.get("dims", dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims)
        dims = [int(d) % len(s) for d in dims]
        return _Val(dims.index(v.cdim), v.chans) if sorted(dims) == list(range(len(s))) else None

    def op_transpose(self, n: torch.fx.Node, args: tuple, kwargs: dict) -> _Val | None:
        v, s = self.val(args[0]), self.shape(args[0])
        if v is None or s is None or v.cdim is None or len(args) < 3:
            return v if v is not None and v.cdim is None else None
        d0, d1 = int(args[1]) % len(s), int(args[2]) % len(s)
        cdim = d1 if v.cdim == d0 else d0 if v.cdim == d1 else v.cdim
        return _Val(cdim, v.chans)

    def op_reduce(self, n: torch.fx.Node, args: tuple, kwargs: dict) -> _Val | None:
        v, s, out = self.val(args[0]), self.shape(args[0]), self.shape(n)
        if v is None or s is None or out is None:
            return None
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        if v.cdim is None or dim is None or isinstance(dim, torch.fx.Node):
            return self.uniform(self.collapse(v))
        dims = {int(d) % len(s) for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
        if v.cdim in dims:
            return self.uniform(self.collapse(v))
        cdim = v.cdim if keep else v.cdim - sum(d < v.cdim for d in dims)
        return _Val(cdim, v.chans) if out[cdim] == len(v.chans) else None

    def op_cat(self, n: torch.fx.Node, args: tuple, kwargs: dict) -> _Val | None:
        parts = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        out = self.shape(n)
        if out is None or not isinstance(parts, (tuple, list)) or isinstance(dim, torch.fx.Node):
            return None
        vals = [self.val(p) for p in parts]
        shapes = [self.shape(p) for p in parts]
        if any(v is None for v in vals) or any(s is None or len(s) != len(out) for s in shapes):
            return None
        dim = int(dim) % len(out)
        if all(v.cdim == dim and len(v.chans) == s[dim] for v, s in zip(vals, shapes)):
            return _Val(dim, tuple(c for v in vals for c in v.chans))
        cdim = next((v.cdim for v in vals if v.cdim is not None and v.cdim != dim), None)
        if cdim is None or any(v.cdim is not None and v.cdim != cdim for v in vals):
            return self.uniform(_union(self.collapse(v) for v in vals))
        # joined along another dim (batch, space): channel k of the result is channel k of every part
        per = [self.aligned(v, s, out, cdim) for v, s in zip(vals, shapes)]
        chans = [_union(sets) for sets in zip(*(p[0] for p in per))]
        if len(vals) > 1 and all(p[1] for p in per):
            self.g._ties.extend(chans)
        return _Val(cdim, tuple(chans))

    def op_split(self, n: torch.fx.Node, args: tuple, kwargs: dict) -> tuple | None:
        v, s, out = self.val(args[0]), self.shape(args[0]), self.meta.get(n)
        if v is None or s is None or not isinstance(out, (tuple, list)) or not all(isinstance(t, _T) for t in out):
            return None
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        if isinstance(dim, torch.fx.Node):
            return None
        dim = int(dim) % len(s)
        if v.cdim != dim:
            return tuple(v if v.cdim is None or t.shape[v.cdim] == len(v.chans) else None for t in out)
        self.escape(v)  # fixed split sizes: removing a channel moves the boundaries
        parts, start = [], 0
        for t in out:
            parts.append(_Val(dim, v.chans[start : start + t.shape[dim]]))
            start += t.shape[dim]
        return tuple(parts)

    def op_getitem(self, n: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
        x, idx = args[0], args[1]
        container = self.env.get(x) if isinstance(x, torch.fx.Node) else None
        if isinstance(container, (tuple, list)) and isinstance(idx, (int, slice)):
            return container[idx]
        v, s, out = self.val(x), self.shape(x), self.shape(n)
        if v is None or s is None or out is None:
            return None
        if v.cdim is None:
            return v
        idx = map_aggregate(idx, lambda a: self.meta.get(a) if isinstance(a, torch.fx.Node) else a)
        idx = idx if isinstance(idx, tuple) else (idx,)
        if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) and not isinstance(i, bool) for i in idx):
            return self.uniform(self.collapse(v))
        used = sum(1 for i in idx if i is not None and i is not Ellipsis)
        expanded: list[Any] = []
        for i in idx:
            expanded.extend([slice(None)] * (len(s) - used) if i is Ellipsis else [i])
        expanded.extend([slice(None)] * (len(s) - sum(1 for i in expanded if i is not None)))
        d_in = d_out = 0
        for i in expanded:
            if i is None:
                d_out += 1
                continue
            if d_in == v.cdim:
                if isinstance(i, slice):
                    chans = v.chans[i]
                    if len(chans) != len(v.chans):  # fixed indices: removing a channel moves them
                        self.escape(v)
                    return _Val(d_out, chans) if out[d_out] == len(chans) else None
                self.escape(v)
                return self.uniform(v.chans[int(i)])
            d_in += 1
            d_out += 0 if isinstance(i, int) else 1
        return None

    # -- conv -> BatchNorm -> ReLU chains (folding, fusion) -----------------------------------------------
    def chains(self) -> dict[str, tuple[str | None, str | None]]:
        """``{conv: (batchnorm or None, relu or None)}`` for every conv called once: the BatchNorm (running
        statistics for the conv's channels) when it is the conv output's only user, called once; the
        ``nn.ReLU`` when it is the only user of that (or of the conv's) output, called once."""
        nodes = [n for n in self.gm.graph.nodes if n.op == "call_module"]
        calls = Counter(n.target for n in nodes)

        def only_user(n: torch.fx.Node) -> tuple[torch.fx.Node, nn.Module] | None:
            if len(n.users) != 1:
                return None
            (user,) = n.users
            if user.op != "call_module" or user.args != (n,) or user.kwargs or calls[user.target] != 1:
                return None
            return user, self.modules.get(user.target)

        result: dict[str, tuple[str | None, str | None]] = {}
        for node in nodes:
            conv = self.modules.get(node.target)
            if not isinstance(conv, _CONVS) or calls[node.target] != 1:
                continue
            bn, relu, last = None, None, node
            nxt = only_user(node)
            if nxt is not None and isinstance(nxt[1], _BatchNorm) and nxt[1].running_mean is not None \
                    and nxt[1].num_features == out_channels(conv):  # fmt: skip
                bn, last = str(nxt[0].target), nxt[0]
                nxt = only_user(last)
            if nxt is not None and type(nxt[1]) is nn.ReLU:
                relu = str(nxt[0].target)
            result[str(node.target)] = (bn, relu)
        return result
