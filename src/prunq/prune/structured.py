"""Physical channel removal: a smaller dense model whose outputs equal the pruned model's.

Pruning leaves zeros in full-size tensors; dense kernels multiply them anyway. :func:`remove_channels`
finds every output channel of a layer that no longer depends on its input — a channel mask removed the
filter, or unstructured pruning left it entirely zero, or every weight it keeps sees a dead input — and
deletes it, with the matching input channels of every layer it feeds and the BatchNorm channels between:

* the channel's output is the constant ``bias`` (after a BatchNorm, the BN's shift; after the ops
  between, whatever they make of it). Where the consumer sees exactly 0 the channel is dropped. A
  non-zero constant is **folded** into the consumer's bias (``b += v · Σ_k W[:, j, k]``) where that is
  exact — a Linear, or a convolution without padding —; a zero-padded convolution sees the constant
  only inside the border, so that channel is kept (reported in :attr:`Removal.kept`);
* channels meeting at a residual add, a product or a batch concatenation are removed together or not
  at all; a depthwise convolution loses an input channel only with its output channel;
* a whole attention head goes when its value projection is all zero (its output is 0 whatever the scores):
  its q/k/v rows and its out_proj columns, ``num_heads`` one less (:class:`~prunq.core.attention.
  DecomposedAttention`; this needs no trace, so a model ``torch.fx`` cannot trace still loses its heads;
  the attention *weights* returned with ``need_weights=True`` then average over the kept heads);
* a channel used anywhere other than a layer's input through channel-preserving ops (the model's output,
  an op the graph does not model, a reduction over channels, a fixed index into the channel dim: see
  :meth:`prunq.core.graph.ChannelGraph.escaped`) is kept, as are the channels of grouped (not
  depthwise) convolutions and every layer keeps at least one output channel.

It works on a *converted* model (:func:`prunq.convert`: plain weights) and the inputs it runs on, repeats
until nothing more goes (a folded constant can empty the next layer's row), and checks the result on the
example inputs and a perturbed copy of them. The change is recorded as one ``remove_channels`` transform
(the kept indices of every sliced module, the layers that gained a bias) that :func:`replay` re-applies to
a fresh model, so ``prunq.load``, ``prunq.save`` and every exporter work on the smaller model.

>>> m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 1))
>>> with torch.no_grad():
...     m[0].weight[1] = 0.0
...     m[0].bias[1] = 0.5      # channel 1 is the constant relu(0.5): folded into m[2]'s bias
>>> r = remove_channels(m, torch.randn(2, 1, 6, 6))
>>> r.model[0].out_channels, r.model[2].in_channels, r.entry["modules"]["0"]["out"]
(2, 2, [0, 2])
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from prunq.core.errors import PrunqError
from prunq.core.graph import ChannelGraph, Source
from prunq.core.layers import channel_dim, input_count, is_compressible, out_channels
from prunq.core.records import CONVERTED_STEP

__all__ = ["Removal", "remove_channels", "replay"]

_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: Largest relative output change the self-check accepts (float summation order changes more than fp32
#: round-off; a wrong removal much more). With activation fake-quantizers, an activation that lands on a
#: rounding boundary may round the other way (one step): then, per output tensor, up to
#: :data:`CHECK_FRACTION` of the values may differ by more than 1e-5 of its scale, by at most
#: :data:`CHECK_FLIP` of it.
CHECK_RTOL = 1e-3
CHECK_FRACTION = 0.005
CHECK_FLIP = 0.1


@dataclass
class Removal:
    """What :func:`remove_channels` did.

    ``model``: the smaller model (a new object; the input is untouched). ``entry``: the manifest
    transform. ``layers``: per sliced layer ``{"out": (before, after), "in": (before, after)}``.
    ``folded``: constant channels folded into a consumer's bias. ``kept``: channels that are constant but
    stayed, ``{"layer[c]": why}``. ``max_rel_diff``: the self-check's largest output change, relative to
    the output's largest magnitude (activation fake-quantizers on: see :data:`CHECK_FRACTION`).
    ``manifest``: the run's manifest with the transform appended (when one was given). ``heads``: per
    attention module whose value projection left whole heads zero, ``(heads before, after)``.
    """

    model: nn.Module
    entry: dict[str, Any]
    layers: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    folded: int = 0
    kept: dict[str, str] = field(default_factory=dict)
    max_rel_diff: float = 0.0
    heads: dict[str, tuple[int, int]] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None

    @property
    def removed(self) -> int:
        """Output channels removed, over all layers."""
        return sum(v["out"][0] - v["out"][1] for v in self.layers.values() if "out" in v)


# -- what can be sliced -----------------------------------------------------------------------------------
def _depthwise(mod: nn.Module) -> bool:
    g = int(getattr(mod, "groups", 1))
    return g > 1 and g == input_count(mod) == out_channels(mod)


def _sliceable(mod: nn.Module) -> bool:
    return is_compressible(mod) and (int(getattr(mod, "groups", 1)) == 1 or _depthwise(mod))


def _foldable(mod: nn.Module) -> bool:
    """A constant input channel adds the same amount at every output position: a Linear, or an ordinary
    convolution that never pads."""
    if isinstance(mod, nn.Linear):
        return True
    if isinstance(mod, _CONV_T) or int(getattr(mod, "groups", 1)) != 1:
        return False
    pad = mod.padding
    return pad == "valid" or (isinstance(pad, tuple) and all(p == 0 for p in pad))


# -- one round --------------------------------------------------------------------------------------------
def _constant_outputs(model: nn.Module, graph: ChannelGraph) -> set[Source]:
    """Output channels of sliceable layers that do not depend on the input: ``bias[c]`` for every input."""
    mods = dict(model.named_modules())
    return {(name, int(c)) for name, const in graph.constant_outputs(model).items() if _sliceable(mods[name])
            for c in const.nonzero().flatten()}  # fmt: skip


@torch.no_grad()
def _input_constants(model: nn.Module, layers: list[str], example_inputs: tuple) -> dict[str, Any]:
    """Per layer, ``(is_constant, value)`` of each input channel over batch and space, as the layer's
    weights see it (after its input quantizer); ``None`` for a layer called more than once."""
    seen: dict[str, Any] = {}
    calls: dict[str, int] = {}

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple) -> None:
            calls[name] = calls.get(name, 0) + 1
            x = args[0]
            d = channel_dim(mod, x.dim())
            c = x.movedim(d, 0).reshape(x.shape[d], -1)
            lo, hi = c.amin(1), c.amax(1)
            seen[name] = ((lo == hi) & torch.isfinite(lo), lo.double())

        return fn

    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in layers]  # after prunq's input quantizers
    try:
        model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return {n: (seen.get(n) if calls.get(n, 0) == 1 else None) for n in layers}


def _plan(model: nn.Module, graph: ChannelGraph, example_inputs: tuple, kept: dict[Source, str]) -> dict[str, Any] | None:
    """The channels one round removes: ``{"out": {layer: set}, "in": {layer: {j: v}}, "bn": {bn: set}}``
    (``v``: the constant the consumer saw, folded when non-zero), or ``None`` when nothing goes."""
    mods = dict(model.named_modules())
    remove = _constant_outputs(model, graph) - graph.escaped()
    if not remove:
        return None
    consumers = {n: s for n, s in ((n, graph.sources(n)) for n in graph.layers) if s is not None}
    consts = _input_constants(model, list(consumers), example_inputs)
    groups = graph.coupled_groups()
    bns = graph.channel_modules()
    why: dict[Source, str] = {}
    changed = True
    while changed:
        changed = False

        def drop(srcs: frozenset[Source] | set[Source], reason: str) -> None:
            nonlocal changed
            hit = set(srcs) & remove
            if hit:
                remove.difference_update(hit)
                for s in hit:
                    why.setdefault(s, reason)
                changed = True

        for g in groups:  # removed together or not at all
            if not g <= remove:
                drop(g, "coupled with a channel that stays")
        for name, per_channel in bns.items():
            for srcs in per_channel:
                if srcs & remove and not srcs <= remove:
                    drop(srcs, f"shares BatchNorm {name!r} with a channel that stays")
        for name, per_input in consumers.items():
            mod = mods[name]
            c = consts.get(name)
            for j, srcs in enumerate(per_input):
                if not srcs & remove:
                    continue
                if not srcs <= remove:
                    drop(srcs, f"feeds input {j} of {name!r} together with a channel that stays")
                elif not _sliceable(mod):
                    drop(srcs, f"feeds grouped layer {name!r}")
                elif c is None:
                    drop(srcs, f"feeds {name!r}, which is called more than once")
                elif not bool(c[0][j]):
                    drop(srcs, f"input {j} of {name!r} is not constant (an op between pads or mixes it)")
                elif float(c[1][j]) != 0.0 and not _foldable(mod):
                    drop(srcs, f"the constant {float(c[1][j]):.4g} reaches zero-padded {name!r} (not foldable exactly)")
        for name, mod in mods.items():  # every layer keeps one output channel
            if is_compressible(mod) and all((name, o) in remove for o in range(out_channels(mod))):
                drop({(name, 0)}, "the last channel of its layer")
    kept.update(why)
    if not remove:
        return None
    plan: dict[str, Any] = {"out": {}, "in": {}, "bn": {}}
    for name, o in remove:
        plan["out"].setdefault(name, set()).add(o)
    for name, per_input in consumers.items():
        gone = {j: float(consts[name][1][j]) for j, srcs in enumerate(per_input) if srcs and srcs <= remove}
        if gone:
            plan["in"][name] = gone
    for name, per_channel in bns.items():
        gone = {k for k, srcs in enumerate(per_channel) if srcs and srcs <= remove}
        if gone:
            plan["bn"][name] = gone
    return plan


@torch.no_grad()
def _fold(mod: nn.Module, constants: dict[int, float]) -> bool:
    """Add each non-zero constant input channel's contribution to ``mod``'s bias; True if a bias was added."""
    live = {j: v for j, v in constants.items() if v != 0.0}
    if not live:
        return False
    w = mod.weight.detach().double()
    idx = torch.tensor(sorted(live), dtype=torch.long, device=w.device)
    vals = torch.tensor([live[j] for j in sorted(live)], dtype=torch.float64, device=w.device)
    cols = w.index_select(1, idx)  # (out, k, *kernel): Linear and groups-1 convs only (see _foldable)
    delta = (cols.reshape(cols.shape[0], cols.shape[1], -1).sum(-1) * vals).sum(1)
    added = mod.bias is None
    if added:
        mod.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=mod.weight.dtype, device=w.device))
    mod.bias.copy_((mod.bias.double() + delta).to(mod.bias.dtype))
    return added


# -- slicing (shared by removal and replay) ----------------------------------------------------------------
def _keep(indices: list[int], size: int, what: str) -> torch.Tensor:
    if not indices or any(not 0 <= i < size for i in indices) or any(a >= b for a, b in zip(indices, indices[1:])):
        raise ValueError(f"{what}: kept channels must be increasing indices below {size}, at least one")
    return torch.tensor(indices, dtype=torch.long)


def _slice_layer(mod: nn.Module, out_keep: list[int] | None, in_keep: list[int] | None, name: str) -> None:
    if parametrize.is_parametrized(mod):
        raise ValueError(f"{name}: still has masks or weight quantizers (remove_channels needs a converted model)")
    n_out, n_in = out_channels(mod), input_count(mod)
    depthwise = _depthwise(mod)
    w = mod.weight.detach()
    if depthwise:
        if out_keep != in_keep:
            raise ValueError(f"{name}: a depthwise layer keeps the same input and output channels")
        o = _keep(out_keep, n_out, name)
        w = w.index_select(0, o.to(w.device))
        mod.groups = len(out_keep)
    elif int(getattr(mod, "groups", 1)) == 1:
        od, idim = (1, 0) if isinstance(mod, _CONV_T) else (0, 1)
        o = _keep(out_keep, n_out, name) if out_keep is not None else None
        if o is not None:
            w = w.index_select(od, o.to(w.device))
        if in_keep is not None:
            w = w.index_select(idim, _keep(in_keep, n_in, name).to(w.device))
    else:
        raise ValueError(f"{name}: grouped layers keep their channels")
    own = {k for k, _ in mod.named_parameters(recurse=False)} | {k for k, _ in mod.named_buffers(recurse=False)}
    unknown = own - {"weight", "bias", CONVERTED_STEP, "weight_bits"}
    if unknown:
        raise ValueError(f"{name}: holds state remove_channels does not know how to slice ({sorted(unknown)[0]})")
    mod.weight = nn.Parameter(w.contiguous(), requires_grad=mod.weight.requires_grad)
    if out_keep is not None:
        o = torch.tensor(out_keep, dtype=torch.long)
        if mod.bias is not None:
            mod.bias = nn.Parameter(mod.bias.detach()[o.to(mod.bias.device)].contiguous(), mod.bias.requires_grad)
        step = getattr(mod, CONVERTED_STEP, None)
        if isinstance(step, torch.Tensor) and step.numel() == n_out and n_out > 1:
            setattr(mod, CONVERTED_STEP, step[o.to(step.device)].contiguous())
    new_out = len(out_keep) if out_keep is not None else n_out
    new_in = new_out if depthwise else len(in_keep) if in_keep is not None else n_in
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = new_out, new_in
    else:
        mod.out_channels, mod.in_channels = new_out, new_in


def _slice_bn(mod: nn.Module, keep: list[int], name: str) -> None:
    if not isinstance(mod, _BatchNorm):
        raise ValueError(f"{name}: not a BatchNorm")
    k = _keep(keep, mod.num_features, name)
    for attr in ("weight", "bias"):
        p = getattr(mod, attr)
        if p is not None:
            setattr(mod, attr, nn.Parameter(p.detach()[k.to(p.device)].contiguous(), p.requires_grad))
    for attr in ("running_mean", "running_var"):
        b = getattr(mod, attr)
        if b is not None:
            setattr(mod, attr, b[k.to(b.device)].contiguous())
    mod.num_features = len(keep)


def replay(model: nn.Module, entry: dict[str, Any]) -> None:
    """Give ``model`` the shapes a ``remove_channels`` entry records (values come from the state dict;
    a layer listed under ``bias`` gets a zero bias first)."""
    named = dict(model.named_modules(remove_duplicate=False))
    for name, spec in entry["modules"].items():  # heads first: the layers' indices are relative to after
        if spec.get("heads") is not None:
            if not _is_attention(named[name]):
                raise ValueError(f"{name}: not an attention module")
            _slice_heads(named[name], list(spec["heads"]), name)
    for name in entry.get("bias", []):
        mod = named[name]
        if not is_compressible(mod) or mod.bias is not None:
            raise ValueError(f"{name}: cannot gain a bias")
        mod.bias = nn.Parameter(torch.zeros(out_channels(mod), dtype=mod.weight.dtype, device=mod.weight.device))
    for name, spec in entry["modules"].items():
        mod = named[name]
        if spec.get("heads") is not None:
            continue
        if "channels" in spec and spec["channels"] is not None:
            _slice_bn(mod, list(spec["channels"]), name)
        elif is_compressible(mod):
            _slice_layer(mod, spec.get("out"), spec.get("in"), name)
        else:
            raise ValueError(f"{name}: {type(mod).__name__} has no channels to remove")


# -- attention heads --------------------------------------------------------------------------------------
def _is_attention(mod: nn.Module) -> bool:
    return all(hasattr(mod, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "head_dim"))


def _head_rows(heads: list[int], d: int) -> list[int]:
    return [h * d + i for h in heads for i in range(d)]


@torch.no_grad()
def _dead_heads(att: nn.Module) -> list[int]:
    """Heads whose value projection is all zero (weights and bias): their attention output is exactly 0
    whatever the scores, so the head's q/k/v rows and out_proj columns only ever meet zeros."""
    d, n = int(att.head_dim), int(att.num_heads)
    w = att.v_proj.weight.detach().reshape(n, d, -1).ne(0).any(-1).any(-1)
    b = att.v_proj.bias
    if b is not None:
        w |= b.detach().reshape(n, d).ne(0).any(-1)
    return [h for h in range(n) if not bool(w[h])]


def _slice_heads(att: nn.Module, keep: list[int], name: str) -> None:
    n, d = int(att.num_heads), int(att.head_dim)
    _keep(keep, n, f"{name} heads")
    rows = _head_rows(keep, d)
    for proj in ("q_proj", "k_proj", "v_proj"):
        _slice_layer(getattr(att, proj), rows, None, f"{name}.{proj}")
    _slice_layer(att.out_proj, None, rows, f"{name}.out_proj")
    att.num_heads = len(keep)


# -- the public entry point -------------------------------------------------------------------------------
def _probe(example_inputs: tuple) -> tuple:
    g = torch.Generator().manual_seed(0)
    out = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            noise = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
            out.append(x + 0.1 * noise * x.detach().float().std().clamp_min(1e-3))
        else:
            out.append(x)
    return tuple(out)


def _flat(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x.detach().reshape(-1).double()]
    if isinstance(x, (tuple, list)):
        return [t for y in x for t in _flat(y)]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _flat(x[k])]
    return []


def _compare(a: Any, b: Any) -> tuple[float, float]:
    """Over the output tensors: the largest ``max |a − b| / max |a|`` and the largest fraction of a tensor's
    values off by more than 1e-5 of its scale (NaN anywhere: ``(inf, 1)``)."""
    worst, frac = 0.0, 0.0
    xs, ys = _flat(a), _flat(b)
    if len(xs) != len(ys):
        return float("inf"), 1.0
    for x, y in zip(xs, ys):
        if not x.numel():
            continue
        if x.shape != y.shape or bool(torch.isnan(x).any() != torch.isnan(y).any()):
            return float("inf"), 1.0
        scale = max(float(torch.nan_to_num(x).abs().max()), 1e-12)
        d = torch.nan_to_num((x - y).abs(), nan=0.0)
        worst = max(worst, float(d.max()) / scale)
        frac = max(frac, float((d > 1e-5 * scale).double().mean()))
    return worst, frac


@torch.no_grad()
def remove_channels(
    model: nn.Module, example_inputs: Any, manifest: dict[str, Any] | None = None, *, max_rounds: int = 32
) -> Removal:
    """A smaller copy of a converted ``model`` without the channels that no longer depend on its input.

    With the run's ``manifest`` the result carries a copy of it that records the removal (after a
    ``convert`` entry, added when the model was converted after the run), so that
    ``prunq.save((r.model, r.manifest), dir)`` writes a run ``prunq.load`` rebuilds.

    ``example_inputs`` (a tensor or a tuple) trace the model's channel graph and show which constant
    channels reach which layers; the removal is checked on them and on a perturbed copy (a PrunqError
    when the outputs change by more than :data:`CHECK_RTOL` of their scale — a structure the graph
    misreads — beyond the rounding flips :data:`CHECK_FRACTION` allows). The model must be converted (:func:`prunq.convert`) and traceable by ``torch.fx``.
    """
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise PrunqError("remove_channels: the model still has masks or weight quantizers; prunq.convert it first")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    modes = {m: m.training for m in model.modules()}
    small = copy.deepcopy(model).eval()
    kept: dict[Source, str] = {}
    names: dict[str, str] = {}  # the last round's kept channels, by original index
    # original indices of each sliced module's channels, and the layers that gained a bias
    out_idx: dict[str, list[int]] = {}
    in_idx: dict[str, list[int]] = {}
    bn_idx: dict[str, list[int]] = {}
    sizes: dict[str, dict[str, tuple[int, int]]] = {}
    added_bias: list[str] = []
    folded = 0
    heads: dict[str, list[int]] = {}
    head_sizes: dict[str, tuple[int, int]] = {}
    for name, mod in list(small.named_modules()):  # whole attention heads first: local to their module
        if _is_attention(mod):
            n = int(mod.num_heads)
            keep = [h for h in range(n) if h not in set(_dead_heads(mod))] or [0]
            if len(keep) < n:
                _slice_heads(mod, keep, name)
                heads[name], head_sizes[name] = keep, (n, len(keep))
    for _ in range(max_rounds):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graph = ChannelGraph.build(small, args)
        if not graph.traced:  # ChannelGraph warns why; here that is an error, unless heads went already
            why = next((str(w.message) for w in caught if "ChannelGraph" in str(w.message)), "it cannot be traced")
            if not heads:
                raise PrunqError(f"remove_channels: {why}")
            names = {"*": f"no channel removed: {why}"}
            break
        kept.clear()
        plan = _plan(small, graph, args, kept)
        names = {f"{n}[{out_idx[n][c] if n in out_idx else c}]": why for (n, c), why in kept.items()}
        if plan is None:
            break
        mods = dict(small.named_modules())
        for name, consts in plan["in"].items():
            folded += sum(1 for v in consts.values() if v != 0.0)
            if _fold(mods[name], consts) and name not in added_bias:
                added_bias.append(name)
        touched = set(plan["out"]) | set(plan["in"])
        for name in sorted(touched):
            mod = mods[name]
            n_out, n_in = out_channels(mod), input_count(mod)
            o_keep = [o for o in range(n_out) if o not in plan["out"].get(name, ())]
            i_keep = [j for j in range(n_in) if j not in plan["in"].get(name, {})]
            if _depthwise(mod):
                i_keep = o_keep
            o_orig = out_idx.setdefault(name, list(range(n_out)))
            i_orig = in_idx.setdefault(name, list(range(n_in)))
            out_idx[name] = [o_orig[o] for o in o_keep]
            in_idx[name] = [i_orig[j] for j in i_keep]
            entry = sizes.setdefault(name, {"out": (n_out, n_out), "in": (n_in, n_in)})
            _slice_layer(mod, o_keep if len(o_keep) < n_out else None, i_keep if len(i_keep) < n_in else None, name)
            sizes[name] = {"out": (entry["out"][0], len(o_keep)), "in": (entry["in"][0], len(i_keep))}
        for name, gone in plan["bn"].items():
            mod = mods[name]
            keep = [k for k in range(mod.num_features) if k not in gone]
            orig = bn_idx.setdefault(name, list(range(mod.num_features)))
            bn_idx[name] = [orig[k] for k in keep]
            _slice_bn(mod, keep, name)
    modules: dict[str, dict[str, Any]] = {name: {"heads": keep} for name, keep in sorted(heads.items())}
    for name in sorted(set(out_idx) | set(in_idx)):
        spec: dict[str, Any] = {}
        (o0, o1), (i0, i1) = sizes[name]["out"], sizes[name]["in"]
        if o1 < o0:
            spec["out"] = out_idx[name]
        if i1 < i0:
            spec["in"] = in_idx[name]
        if spec:
            modules[name] = spec
    for name in sorted(bn_idx):
        modules[name] = {"channels": bn_idx[name]}
    entry = {"op": "remove_channels", "modules": modules, "bias": sorted(added_bias)}
    result = Removal(small, entry, {n: v for n, v in sizes.items() if v["out"][1] < v["out"][0] or
                                    v["in"][1] < v["in"][0]}, folded, names, heads=head_sizes)  # fmt: skip
    model.eval()
    try:
        worst, frac = 0.0, 0.0
        for a in (args, _probe(args)):
            w, f = _compare(model(*a), small(*a))
            worst, frac = max(worst, w), max(frac, f)
    finally:
        for m, training in modes.items():
            m.training = training
    result.max_rel_diff = worst
    from prunq.core._graph_trace import _is_quantizer

    quantized = any(_is_quantizer(m) for m in model.modules())
    ok = worst <= CHECK_RTOL or quantized and frac <= CHECK_FRACTION and worst <= CHECK_FLIP
    if not ok:
        raise PrunqError(
            f"remove_channels: the smaller model's outputs differ by {worst:.3g} of their scale ({100 * frac:.2g} % "
            "of them) on the example inputs; the model has a structure the channel graph misreads (nothing was changed)"
        )
    by_name = {n: m.training for n, m in model.named_modules()}
    for n, m in small.named_modules():
        m.training = by_name.get(n, model.training)
    if manifest is not None:
        from prunq.core.records import record_conversion

        m = json.loads(json.dumps(manifest))
        if not modules and not added_bias:  # nothing went: the manifest (and any file from it) stays as it was
            result.manifest = m
            return result
        record_conversion(m, model)  # masks and quantizers are baked before the slicing replays
        m.setdefault("transforms", []).append(entry)
        result.manifest = m
    return result
