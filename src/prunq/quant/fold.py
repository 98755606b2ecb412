"""Fold BatchNorm into the preceding convolution before quantization (METHOD.md §3).

Folding multiplies each output filter by ``gamma / sqrt(var + eps)``, so pruned zeros stay zeros and
the mask parametrization is untouched: only the shadow weight and the bias change.

>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
>>> pairs = find_conv_bn_pairs(model)
>>> pairs
[('0', '1')]
>>> fold_bn_(model, pairs); model[1]
Identity()
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from prunq.core.errors import PrunqError
from prunq.core.graph import ChannelGraph
from prunq.core.layers import from_canonical, out_channels, to_canonical
from prunq.prune.masks import original
from prunq.quant.weight import weight_quantizer

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, _CONVS)
        and isinstance(bn, _BatchNorm)
        and bn.running_mean is not None
        and bn.num_features == out_channels(conv)
    )


def find_conv_bn_pairs(model: nn.Module, example_inputs: Any = None) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` for every Conv / ConvTranspose whose output feeds *only* a BatchNorm.

    With ``example_inputs`` the pairs come from the channel dependency graph
    (:meth:`prunq.core.graph.ChannelGraph.conv_bn_pairs`, the same graph the cost model reads dead
    channels from); without, from a plain ``torch.fx.symbolic_trace`` (masked, i.e. parametrized, convs
    are traced as leaf modules). A module called more than once is never paired. If tracing fails, falls back -- with a warning --
    to a conv immediately followed by a BatchNorm inside an ``nn.Sequential``; then, when
    ``example_inputs`` (a tensor or a tuple of positional inputs) is given, one eval-mode forward
    confirms that each such BatchNorm really receives that conv's output.
    """
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if example_inputs is not None and all(isinstance(a, torch.Tensor) for a in args):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # untraceable: the fallback below warns once
            graph = ChannelGraph.build(model, args)
        if graph.traced:
            return graph.conv_bn_pairs()
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as err:  # fx raises many types (TraceError, TypeError, ...) on dynamic code
        warnings.warn(
            f"find_conv_bn_pairs: torch.fx could not trace {type(model).__name__} ({type(err).__name__}: {err}); "
            "falling back to conv -> BatchNorm adjacency inside nn.Sequential containers",
            stacklevel=2,
        )
        pairs = _sequential_pairs(model)
        return pairs if example_inputs is None else _confirm_by_run(model, pairs, example_inputs)
    return _graph_pairs(gm, model)


def _graph_pairs(gm: torch.fx.GraphModule, model: nn.Module) -> list[tuple[str, str]]:
    modules = dict(model.named_modules())
    nodes = [n for n in gm.graph.nodes if n.op == "call_module"]
    calls = Counter(n.target for n in nodes)
    pairs = []
    for node in nodes:
        if not isinstance(modules.get(node.target), _CONVS) or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op != "call_module" or user.args != (node,) or user.kwargs:
            continue
        if calls[node.target] == 1 and calls[user.target] == 1 and _foldable(modules[node.target], modules.get(user.target)):
            pairs.append((node.target, user.target))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        prefix = f"{name}." if name else ""
        children = list(seq.named_children())
        for (a, conv), (b, bn) in zip(children, children[1:]):
            if _foldable(conv, bn):
                pairs.append((prefix + a, prefix + b))
    return pairs


@torch.no_grad()
def _confirm_by_run(model: nn.Module, pairs: list[tuple[str, str]], example_inputs: Any) -> list[tuple[str, str]]:
    """Keep the pairs whose BatchNorm is called exactly once, on the tensor its conv returned."""
    outputs: dict[str, list[torch.Tensor]] = {c: [] for c, _ in pairs}
    inputs: dict[str, list[torch.Tensor]] = {b: [] for _, b in pairs}
    handles = []
    for c, b in pairs:
        handles.append(model.get_submodule(c).register_forward_hook(lambda m, a, o, c=c: outputs[c].append(o)))
        handles.append(model.get_submodule(b).register_forward_pre_hook(lambda m, a, b=b: inputs[b].append(a[0])))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        model(*args)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return [
        (c, b)
        for c, b in pairs
        if len(outputs[c]) == 1 and len(inputs[b]) == 1 and inputs[b][0] is outputs[c][0]
    ]


@torch.no_grad()
def fold_bn_(model: nn.Module, pairs: Sequence[tuple[str, str]]) -> None:
    """Fold each BatchNorm into its conv (eval semantics: running statistics), in place.

    ``W' = W * g``, ``b' = (b - mean) * g + beta`` with ``g = gamma / sqrt(var + eps)`` per output
    channel (canonical dim 0, so ConvTranspose and grouped convs are right). A masked conv has its
    shadow weight scaled (the mask stays, zeros stay zero); a conv without bias gets one. The same
    Parameter objects are updated in place; a created bias is a new Parameter, so build optimizers
    after folding. The BatchNorm is replaced by ``nn.Identity()``. Fold before ``prepare``.
    """
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if not _foldable(conv, bn):
            raise PrunqError(f"fold_bn_: ({conv_name!r}, {bn_name!r}) is not a conv followed by a matching BatchNorm")
        if weight_quantizer(conv) is not None:
            raise PrunqError(f"fold_bn_: {conv_name!r} already has a weight quantizer; fold before prepare()")
        # float64 so that the folded model matches the unfolded one to float32 rounding.
        g = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.affine:
            g = g * bn.weight.double()
        w = original(conv)
        c = to_canonical(w.double(), conv)
        w.copy_(from_canonical(c * g.view(-1, *([1] * (c.dim() - 1))), conv).to(w.dtype))
        b = conv.bias.double() if conv.bias is not None else torch.zeros_like(g)
        new_b = (b - bn.running_mean.double()) * g + (bn.bias.double() if bn.affine else 0.0)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_b.to(device=w.device, dtype=w.dtype))
        else:
            conv.bias.copy_(new_b)
        parent_name, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, nn.Identity())
