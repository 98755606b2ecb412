"""Dense multiply-accumulates per example (METHOD.md §4), by forward hooks.

A layer's input says nothing reliable about the batch: a Linear sees ``(B, T, D)``, sequence-first
``(T, B, D)`` (torch's default transformer layout) or a reshaped ``(B*T, D)``; a Conv may be called on one
unbatched ``(C, H, W)`` sample. So every layer's MACs are counted for the *whole* forward
(:func:`prunq.core.layers.forward_macs`) and divided once by the example batch -- the one number the
caller knows. FLOPs as ``torch.utils.flop_counter.FlopCounterMode`` counts them are 2 x these MACs.

The multiplies no compressed layer owns (activation x activation products) are counted by
:mod:`prunq.cost.products`.

This is a lower layer: it imports :mod:`prunq.core` only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from prunq.core.attention import DecomposedAttention
from prunq.core.errors import PrunqError
from prunq.core.layers import forward_macs, is_compressible, is_unbatched_input
from prunq.core.records import recorded_layers

#: Layers that know which dimension of their input is the batch (``batch_first``).
_ATTENTION = (nn.MultiheadAttention, DecomposedAttention)

__all__ = ["count_attention_macs", "count_macs", "example_batch_size"]


def _tensors(x: Any) -> Iterable[torch.Tensor]:
    """The tensors in a (nested) tuple / list / dict of inputs, in order."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if type(x) is dict:
        return {k: _to(v, device) for k, v in x.items()}
    if type(x) in (tuple, list):
        return type(x)(_to(v, device) for v in x)
    return x


def example_batch_size(example_inputs: Any) -> int:
    """The leading dimension of the first tensor in ``example_inputs``: the batch MACs are divided by
    (a vector is one example).

    >>> example_batch_size((torch.zeros(4, 3, 8, 8), torch.zeros(1)))
    4
    >>> example_batch_size(torch.zeros(6))
    1
    """
    for t in _tensors(example_inputs):
        if t.dim() == 0:
            break
        return int(t.shape[0]) if t.dim() > 1 else 1
    raise PrunqError("count_macs: example_inputs hold no tensor with a batch dimension; pass batch_size=")


def _check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise PrunqError(f"count_macs: batch_size must be a positive integer, got {batch_size!r}")


def _model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def _per_example(total: int, batch: int) -> int:
    # Exact for any consistent model (totals are multiples of the batch); rounds half up otherwise.
    q, r = divmod(total, batch)
    return q + (2 * r >= batch)


def _run_hooked(
    model: nn.Module,
    example_inputs: Any,
    hooks: list[tuple[nn.Module, Callable[..., None]]],
    pre_hooks: Iterable[tuple[nn.Module, Callable[..., None]]] = (),
    post_hooks: Iterable[tuple[nn.Module, Callable[..., None]]] = (),
    context: AbstractContextManager | None = None,
) -> None:
    """One ``model(*example_inputs)`` in eval mode with each ``(module, hook)`` attached (with kwargs).

    ``pre_hooks`` run before every other pre-hook of their module (so before an input quantizer's);
    ``post_hooks`` (``hook(module, args, output)``) run even when the forward raises, to close what a
    pre-hook opened. ``context`` is entered around the forward only."""
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    device = _model_device(model)
    if device is not None:
        example_inputs = tuple(_to(x, device) for x in example_inputs)
    modes = [(m, m.training) for m in model.modules()]
    handles = [module.register_forward_pre_hook(hook, prepend=True) for module, hook in pre_hooks]
    handles += [module.register_forward_hook(hook, with_kwargs=True) for module, hook in hooks]
    handles += [module.register_forward_hook(hook, always_call=True) for module, hook in post_hooks]
    # Activation quantizers not yet calibrated (a model measured right after ``prepare``) pass their
    # input through while observing; the observation is then dropped, leaving them as they were.
    waiting = [
        m for m in model.modules()
        if callable(getattr(m, "observe", None)) and callable(getattr(m, "stop_observing", None))
        and not bool(getattr(m, "calibrated", True)) and not getattr(m, "_observing", False)
    ]  # fmt: skip
    try:
        model.eval()
        for m in waiting:
            m.observe()
        with context if context is not None else nullcontext():
            model(*example_inputs)
    finally:
        for m in waiting:
            m.stop_observing()
        for h in handles:
            h.remove()
        for m, was_training in modes:
            m.training = was_training


def _query_key(args: tuple, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    named = dict(zip(("query", "key"), args))
    return kwargs.get("query", named.get("query")), kwargs.get("key", named.get("key"))


def _attention_batch(module: nn.Module, query: Any) -> int | None:
    """The batch an attention layer was called with (it knows its layout), None when unbatched."""
    if not isinstance(query, torch.Tensor) or query.dim() != 3:
        return None
    return int(query.shape[0] if module.batch_first else query.shape[1])


def _first_tensor(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    if args:
        return args[0] if isinstance(args[0], torch.Tensor) else None
    return next(iter(_tensors(kwargs)), None)


@torch.no_grad()
def count_macs(
    model: nn.Module, example_inputs: Any, exclude: Iterable[str] = (), *, batch_size: int | None = None
) -> dict[str, int]:
    """Dense multiply-accumulates *per example* of every compressible layer.

    Runs ``model(*example_inputs)`` once in eval mode under ``no_grad``, then restores every module's own
    train/eval flag. Each layer's MACs are those of the whole forward (a layer called several times, as in a
    siamese feature extractor, adds up its calls; a layer never called gets 0), divided once by the example
    batch: ``batch_size`` if given, else the leading dimension of the first tensor in ``example_inputs`` --
    or 1 when a layer is called on an unbatched sample (a Conv input of rank ``weight.dim() - 1``, a Linear
    on a vector). Pass ``batch_size`` when the first input's leading dimension is not the batch: a
    sequence-first ``(T, B, D)`` input (an attention layer that sees another batch triggers a warning), or an
    unbatched ``(T, D)`` sequence (``batch_size=1``). Tensors in ``example_inputs`` are moved to the model's
    device. An ``nn.MultiheadAttention`` hides its projections from the hooks (warned): call
    :func:`prunq.core.attention.decompose_attention_` first.

    >>> m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 4))
    >>> count_macs(m, (torch.zeros(1, 1, 5, 5),))
    {'0': 162, '2': 72}
    >>> seq_first = nn.Sequential(nn.Linear(6, 5))  # on (T=7, B=3, D=6): 7 x 5 x 6 per example
    >>> count_macs(seq_first, (torch.zeros(7, 3, 6),), batch_size=3)
    {'0': 210}
    """
    return _count_macs(model, example_inputs, exclude, batch_size)[0]


def _count_macs(
    model: nn.Module, example_inputs: Any, exclude: Iterable[str], batch_size: int | None
) -> tuple[dict[str, int], int]:
    """:func:`count_macs` and the batch it divided by (what
    :func:`prunq.cost.products.count_activation_products` must use)."""
    _check_batch_size(batch_size)
    layers = recorded_layers(model, exclude)
    totals = {name: 0 for name, _ in layers}
    unbatched: list[str] = []
    attention_batches: dict[str, int] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> None:
            inp = _first_tensor(args, kwargs)
            if inp is None or not isinstance(out, torch.Tensor):
                raise PrunqError(f"count_macs: layer {name!r} was not called with a tensor")
            if is_compressible(module):
                totals[name] += forward_macs(module, inp, out)
                # Only a Conv input's rank says "one sample" for sure; a Linear on a vector may be one
                # conditioning vector among batched layers (it must not make every layer count x B).
                if not isinstance(module, nn.Linear) and is_unbatched_input(module, inp):
                    unbatched.append(name)
            else:  # a module swapped in for a layer: output elements x its record's weights per output
                totals[name] += out.numel() * module.prunq_record(name).fan_in

        return hook

    def attention_hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> None:
            b = _attention_batch(module, _query_key(args, kwargs)[0])
            if b is not None:
                attention_batches.setdefault(name, b)

        return hook

    packed = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if packed:
        warnings.warn(
            f"count_macs: nn.MultiheadAttention {packed[0]!r} computes its projections outside any hooked layer, "
            "so their MACs are missing; call prunq.core.attention.decompose_attention_(model) first",
            stacklevel=3,
        )
    hooks = [(module, hook_for(name)) for name, module in layers]
    if batch_size is None:
        hooks += [(m, attention_hook_for(n)) for n, m in model.named_modules() if isinstance(m, _ATTENTION)]
    _run_hooked(model, example_inputs, hooks)
    if batch_size is None:
        batch_size = 1 if unbatched else example_batch_size(example_inputs)
        _warn_if_sequence_first(attention_batches, batch_size)
    return {name: _per_example(total, batch_size) for name, total in totals.items()}, batch_size


def _warn_if_sequence_first(attention_batches: dict[str, int], batch_size: int) -> None:
    # The usual way to get the batch wrong: torch's default (T, B, D) layout, whose leading dim is T.
    odd = {n: b for n, b in attention_batches.items() if b != batch_size}
    if odd:
        name, b = next(iter(odd.items()))
        warnings.warn(
            f"count_macs: dividing by the example's leading dimension {batch_size}, but attention {name!r} "
            f"was called with batch {b}; pass batch_size= if the example input is sequence-first (T, B, ...)",
            stacklevel=3,
        )


@torch.no_grad()
def count_attention_macs(model: nn.Module, example_inputs: Any, *, batch_size: int | None = None) -> dict[str, int]:
    """Activation x activation MACs per example of every :class:`DecomposedAttention` (``QK^T`` and ``AV``).

    These products have no weight, so :func:`count_macs` leaves them out; METHOD.md §4 costs them as
    ``act_bops``. Same run and batch rules as :func:`count_macs` (an unbatched input needs ``batch_size=1``).
    """
    _check_batch_size(batch_size)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, DecomposedAttention)]
    totals = {name: 0 for name, _ in layers}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: DecomposedAttention, args: tuple, kwargs: dict[str, Any], out: Any) -> None:
            query, key = _query_key(args, kwargs)
            totals[name] += module.matmul_macs(query, key)

        return hook

    _run_hooked(model, example_inputs, [(module, hook_for(name)) for name, module in layers])
    if batch_size is None:
        batch_size = example_batch_size(example_inputs)
    return {name: _per_example(total, batch_size) for name, total in totals.items()}
