"""Channel dependency graph: which producer output channels feed each input channel of a layer.

Why: a filter that pruning zeroed (with no bias or BatchNorm shift turning it into a constant) leaves the
consumer's matching input channel *dead* -- its weights only ever multiply zeros -- so the cost model
must not pay its MACs (METHOD.md §4 "Dead channels", REVIEW B6 and 5.1c). BN folding, channel removal
and compensation need the same producer -> consumer map and the channels tied together at a residual add.

The graph is built once from a ``torch.fx`` trace (compressible layers, BatchNorm and fake-quantizer
modules are leaves, so masks, weight quantizers and input pre-hooks are invisible to it) and one shape
pass. Weights are read only when asked (:meth:`ChannelGraph.dead_input_channels`), so one graph serves a
model through pruning and quantization as long as its structure does not change.

>>> from torch import nn
>>> m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 1, 1))
>>> with torch.no_grad():
...     m[0].weight[1] = 0.0
...     m[0].bias[1] = 0.0
>>> g = ChannelGraph.build(m, torch.zeros(1, 1, 5, 5))
>>> g.dead_input_channels(m)["2"].tolist()
[False, True]
>>> sorted(g.sources("2")[1])
[('0', 1)]
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx
from torch import nn

from prunq.core._graph_trace import (
    _LAYER, _MERGE, _PRODUCT, Source, _Analysis, _Expander, _Producer, _Ref, _ShapePass, _Tracer,
)  # fmt: skip
from prunq.core.layers import compressible_layers, input_count, is_compressible, out_channels, to_canonical

__all__ = ["ChannelGraph", "Source", "input_count"]

#: ``Source`` = ``(producer, output channel)``: a compressible layer's qualified name; ``"<input:NAME>"`` for a
#: model input (never dead); ``"<op:NODE>"`` for the output of an operation the graph does not model (never
#: dead). The tracer, the op tables and the propagation live in :mod:`prunq.core._graph_trace`.


class ChannelGraph:
    """Producer -> consumer channel coupling of a model, from one ``torch.fx`` trace.

    Build with :meth:`build`. When the model cannot be traced the graph knows nothing: :attr:`traced` is
    false, every input channel is alive, there are no pairs, groups or sources.
    """

    def __init__(self) -> None:
        self.traced = False
        self._prods: list[_Producer] = []
        self._layer_ids: dict[str, int] = {}
        self._ties: list[frozenset[_Ref]] = []
        self._chains: dict[str, tuple[str | None, str | None]] = {}
        self._sources: dict[str, list[frozenset[Source]]] = {}
        self._channel_modules: dict[str, list[frozenset[Source]]] = {}
        self._escaped: frozenset[Source] = frozenset()

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def build(cls, model: nn.Module, example_inputs: Any) -> ChannelGraph:
        """Trace ``model`` (``example_inputs``: a tensor or a tuple of positional inputs) and analyse it.

        The shape pass runs one forward in eval mode without autograd and without module hooks; training
        flags are restored. A failure to trace warns once and returns a graph that knows nothing.
        """
        graph = cls()
        args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        modes = {m: m.training for m in model.modules()}
        try:
            tracer = _Tracer()
            traced = tracer.trace(model)
            gm = torch.fx.GraphModule(tracer.root, traced)
            shapes = _ShapePass(gm)
            model.eval()
            with torch.no_grad():
                shapes.run(*args)
            _Analysis(graph, gm, shapes.meta).run()
        except Exception as err:  # fx raises many types (TraceError, TypeError, ...) on dynamic code
            warnings.warn(
                f"ChannelGraph: could not trace {type(model).__name__} ({type(err).__name__}: {err}); "
                "every input channel is treated as alive",
                stacklevel=2,
            )
            return cls()
        finally:
            for m, training in modes.items():
                m.training = training
        graph.traced = True
        return graph

    # -- queries ----------------------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[str, ...]:
        """Compressible layers the trace calls, in order of their first call."""
        return tuple(self._layer_ids)

    def sources(self, layer: str) -> list[frozenset[Source]] | None:
        """For each input channel of ``layer``, the producer channels that reach it (``None``: not in the graph)."""
        return self._sources.get(layer)

    def consumers(self, layer: str) -> dict[str, list[tuple[int, int]]]:
        """``{consumer: [(output channel of layer, input channel of consumer), ...]}`` -- what removing or
        compensating one of ``layer``'s output channels touches."""
        result: dict[str, list[tuple[int, int]]] = {}
        for consumer, per_channel in self._sources.items():
            pairs = [(c, j) for j, srcs in enumerate(per_channel) for name, c in srcs if name == layer]
            if pairs:
                result[consumer] = sorted(pairs)
        return result

    def channel_modules(self) -> dict[str, list[frozenset[Source]]]:
        """``{batchnorm: [sources of channel k, ...]}``: the per-channel modules between producers and
        consumers, which removing a producer channel must slice too."""
        return dict(self._channel_modules)

    def escaped(self) -> frozenset[Source]:
        """Producer channels used somewhere other than a layer's input channel reached through
        channel-preserving ops: the model's output, an op the graph does not model, an op that mixes
        channels (a reduction over them, a view that groups them), a fixed index or split of the channel
        dim, a module with per-channel state other than BatchNorm. Removing such a channel is not a
        matter of slicing weights (:mod:`prunq.prune.structured` keeps them)."""
        return self._escaped

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """``(conv, bn)`` pairs that may be folded: the conv's output feeds only that BatchNorm, each module
        is called once, and the BatchNorm has running statistics for the conv's channels (fold.py's rule)."""
        return [(conv, bn) for conv, (bn, _) in self._chains.items() if bn is not None]

    def conv_chains(self) -> dict[str, tuple[str | None, str | None]]:
        """``{conv: (batchnorm or None, relu or None)}``: what may be fused into each conv called once — the
        BatchNorm of :meth:`conv_bn_pairs`, then an ``nn.ReLU`` module that alone reads its output (or the
        conv's), called once (the sparse runtime's fusion)."""
        return dict(self._chains)

    def coupled_groups(self) -> list[frozenset[Source]]:
        """Producer channels that must be removed together: those meeting at an elementwise op (residual
        add, product, batch concatenation), and a depthwise conv's output channel with its input's sources.

        Only groups of two or more; a group holding an ``<input:...>`` or ``<op:...>`` source cannot be removed.
        """
        parent: dict[Source, Source] = {}

        def find(s: Source) -> Source:
            parent.setdefault(s, s)
            while parent[s] != s:
                parent[s] = parent[parent[s]]
                s = parent[s]
            return s

        expand = _Expander(self._prods)
        for tie in self._ties:
            members = list(expand.set(tie))
            for s in members[1:]:
                parent[find(s)] = find(members[0])
        groups: dict[Source, set[Source]] = {}
        for s in parent:
            groups.setdefault(find(s), set()).add(s)
        return sorted((frozenset(g) for g in groups.values() if len(g) > 1), key=sorted)

    @torch.no_grad()
    def dead_input_channels(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``{layer: BoolTensor(input channels)}`` for every compressible layer of ``model``, from its current
        effective weights (masked and quantized under prunq's parametrizations) and biases.

        An output channel is dead when it is exactly zero for every input: bias 0 (or none) and every
        non-zero weight on a dead input channel -- a pruned filter, or a depthwise channel whose input is
        dead. Dead survives ops that map 0 to 0; a BatchNorm keeps it only where ``beta - mean * gamma /
        sqrt(var + eps)`` is 0 (``beta`` in training mode). An input channel is dead when all its sources
        are. Anything the graph does not model counts as alive.
        ``model`` is the traced model (or a copy): layers are looked up by name.
        """
        result = {n: torch.zeros(input_count(m), dtype=torch.bool) for n, m in compressible_layers(model)}
        prods = self._prods
        fixed: dict[int, Any] = {i: _layer_rows(model, p) for i, p in enumerate(prods) if p.kind == _LAYER}
        fixed.update((i, _merge_alive0(model, p)) for i, p in enumerate(prods) if p.kind == _MERGE)
        dead = [[False] * p.size for p in prods]

        def all_dead(s: frozenset[_Ref]) -> bool:
            return all(dead[i][c] for i, c in s)

        changed = True
        while changed:  # least fixpoint from "all alive": exact on a DAG, conservative around a reused layer
            changed = False
            for i, p in enumerate(prods):
                if p.kind == _LAYER:
                    din = [all_dead(s) for s in p.inputs[0]]
                    if len(result.get(p.name, ())) == len(din):
                        result[p.name] = torch.tensor(din, dtype=torch.bool)
                    new = _dead_outputs(fixed[i], din, p.size)
                elif p.kind == _MERGE:
                    new = [not a and all_dead(s) for s, a in zip(p.inputs[0], fixed[i])]
                elif p.kind == _PRODUCT:
                    new = [any(all_dead(f[k]) for f in p.inputs) for k in range(p.size)]
                else:
                    continue
                if new != dead[i]:
                    dead[i], changed = new, True
        return result


    @torch.no_grad()
    def constant_outputs(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``{layer: BoolTensor(output channels)}`` for the layers the trace calls: channels that do not
        depend on the input — every non-zero weight of the row sees a dead input —, so each outputs its bias
        (0 without one) everywhere. :meth:`dead_input_channels`'s rule with the bias left out."""
        dead = self.dead_input_channels(model)
        result = {}
        for name, i in self._layer_ids.items():
            rows = _layer_rows(model, self._prods[i])
            if rows is not None and name in dead:
                nonzero, _, groups = rows
                result[name] = torch.tensor(_dead_outputs((nonzero, None, groups), dead[name].tolist(), self._prods[i].size))
        return result


def _merge_alive0(model: nn.Module, p: _Producer) -> list[bool]:
    a0 = p.alive0(model) if callable(p.alive0) else p.alive0
    return [False] * p.size if a0 is None else a0.tolist()


def _layer_rows(model: nn.Module, p: _Producer) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
    """``(non-zero (out, in_per_group), bias != 0, groups)`` of a layer's effective weight, or ``None``."""
    try:
        mod = model.get_submodule(p.name)
    except AttributeError:
        return None
    if not is_compressible(mod) or out_channels(mod) != p.size or p.inputs and input_count(mod) != len(p.inputs[0]):
        return None
    w = to_canonical(mod.weight.detach(), mod)
    bias = mod.bias.detach().ne(0) if mod.bias is not None else None
    return w.reshape(w.shape[0], w.shape[1], -1).ne(0).any(-1), bias, int(getattr(mod, "groups", 1))


def _dead_outputs(
    rows: tuple[torch.Tensor, torch.Tensor | None, int] | None, dead_in: list[bool], size: int
) -> list[bool]:
    """Output channel o is dead iff its bias is 0 and each non-zero weight of row o sees a dead input."""
    if rows is None:
        return [False] * size
    nonzero, bias, groups = rows
    live_in = ~torch.tensor(dead_in, dtype=torch.bool, device=nonzero.device)
    live = live_in.reshape(groups, -1).repeat_interleave(size // groups, dim=0)
    alive = (nonzero & live).any(1)
    if bias is not None:
        alive |= bias
    return (~alive).tolist()
