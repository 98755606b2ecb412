"""A sparse CPU runtime: each layer runs the implementation measured fastest on its real input.

:func:`sparsify` takes a *converted* model (:func:`prunq.convert`: masks and weight grids baked into plain
weights) and the inputs it will see, and times every candidate layer on its captured input — the dense
kernel against the sparse ones — keeping a sparse one only where it is faster (by ``min_speedup``):

* **Conv2d** (groups 1, zero padding, square stride/padding/dilation): the **direct sparse kernel**
  (:mod:`prunq.runtime._direct`, C++/OpenMP compiled on first use: only the non-zero weights' work, input
  read in place), or ``unfold`` + CSR matmul (``torch.sparse``; 1×1 convs on the ``(C, B·H·W)`` view);
* **ConvTranspose2d** 4×4, stride 2, padding 1 (the usual 2× upsampling): rewritten exactly as a 3×3
  conv with four times the output channels followed by ``pixel_shuffle(2)``, run by the direct kernel;
* **Linear**: ``y = W_csr @ xᵀ`` (CSR × dense, MKL on x86).

With ``fuse=True`` (default) a conv followed by a BatchNorm2d and/or a ReLU (modules called once, each the
only user of the previous output) runs as one pass when the sparse form is chosen: the BatchNorm is folded
into the kernel's weights and bias (``torch.nn.utils.fusion``), the ReLU applied to the accumulators; the
BatchNorm and ReLU modules become pass-throughs. The timing compares like with like (dense conv + BN +
ReLU against the fused sparse pass). This is for inference: the model is put in eval mode, and
:func:`desparsify` undoes every swap before training or export.

A swap snapshots the weights (CSR parts, kernel plans): after changing them, :func:`desparsify` and
sparsify again. Swaps change a module's class to a subclass (``SparseConv2d``, ``SparseConvTranspose2d``, ``SparseLinear``,
``AbsorbedBatchNorm2d``, ``AbsorbedReLU``); every parameter and buffer stays as it was, so the state dict,
the cost model and ``desparsify`` see the same model; outputs equal the dense converted model's up to float
summation order. Quantized weights run as their float values (``k · step``): an integer path (int8 values,
int32 accumulators, one rescale per output channel in the epilogue) would read a quarter of the weight
bytes and let the input stay int8 (a quarter of the activation traffic, which dominates these kernels);
not built.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_weights

from prunq.core.errors import PrunqError
from prunq.runtime import _direct

__all__ = ["sparsify", "desparsify", "SparseLinear", "SparseConv2d", "SparseConvTranspose2d"]


# -- CSR parts ------------------------------------------------------------------------------------------
def _csr(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The CSR parts of the weight's ``(out, rest)`` view: plain tensors, so the module deep-copies
    (a sparse CSR tensor has no storage to copy); :func:`_as_csr` assembles them without a copy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        m = weight.detach().reshape(weight.shape[0], -1).to_sparse_csr()
    return m.crow_indices(), m.col_indices(), m.values(), tuple(m.shape)  # type: ignore[return-value]


def _as_csr(parts: tuple) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(*parts[:3], size=parts[3])


# -- a conv-like computation the sparse layers share ----------------------------------------------------
class _Spec:
    """``relu?(conv2d(x, w, b, stride, padding, dilation))``, then ``pixel_shuffle(shuffle)`` if set: what a
    swapped conv computes, with BatchNorm already folded into ``w`` / ``b``. ``impl``: ``"direct"`` or
    ``"csr"``. Direct-kernel plans are made per input shape and kept."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, stride: int, padding: int, dilation: int,
                 relu: bool, shuffle: int = 0, impl: str = "direct") -> None:  # fmt: skip
        self.w, self.b = w.detach().float().contiguous(), None if b is None else b.detach().float().contiguous()
        self.stride, self.padding, self.dilation, self.relu, self.shuffle, self.impl = (
            stride, padding, dilation, relu, shuffle, impl)  # fmt: skip
        self.plans: dict[tuple[int, ...], Any] = {}
        self.csr = _csr(self.w) if impl == "csr" else None

    def __deepcopy__(self, memo: dict) -> _Spec:  # plans hold scratch buffers: rebuilt on demand
        new = _Spec(self.w.clone(), None if self.b is None else self.b.clone(), self.stride, self.padding,
                    self.dilation, self.relu, self.shuffle, self.impl)  # fmt: skip
        for attr in ("convt_w", "convt_b"):
            if hasattr(self, attr):
                v = getattr(self, attr)
                setattr(new, attr, None if v is None else v.clone())
        return new

    @torch.no_grad()  # inference only: no gradient flows through a swapped layer
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x[None]
        if x.dim() != 4 or x.shape[1] != self.w.shape[1] or x.dtype != torch.float32 or x.device.type != "cpu":
            raise RuntimeError(f"sparse conv: expected a float32 CPU input of {self.w.shape[1]} channels, got "
                               f"{x.dtype} {tuple(x.shape)} on {x.device}")  # fmt: skip
        x = x.detach().contiguous()
        if self.impl == "direct":
            key = tuple(x.shape)
            plan = self.plans.get(key)
            if plan is None:
                plan = self.plans[key] = _direct.make_plan(self.w, self.b, self.stride, self.padding, self.dilation,
                                                           key, relu=self.relu, shuffle=self.shuffle == 2)  # fmt: skip
            y = plan(x)  # the pixel shuffle is fused into the kernel's stores
        else:
            y = self._csr_conv(x)
            if self.relu:
                y = torch.relu_(y)
            if self.shuffle:
                y = F.pixel_shuffle(y, self.shuffle)
        return y[0] if unbatched else y

    def _csr_conv(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        o, _, kh, kw = self.w.shape
        s, p, d = self.stride, self.padding, self.dilation
        if (kh, kw) == (1, 1) and s == 1 and p == 0:
            cols, ho, wo = x.permute(1, 0, 2, 3).reshape(c, b * h * w), h, w
        else:
            u = F.unfold(x, (kh, kw), dilation=d, padding=p, stride=s)  # (B, C*k*k, L)
            ho, wo = (h + 2 * p - d * (kh - 1) - 1) // s + 1, (w + 2 * p - d * (kw - 1) - 1) // s + 1
            cols = u.permute(1, 0, 2).reshape(u.shape[1], b * ho * wo)
        y = (_as_csr(self.csr) @ cols).reshape(o, b, ho, wo).permute(1, 0, 2, 3)
        if self.b is not None:
            y = y + self.b.reshape(1, o, 1, 1)
        return y.contiguous()


class SparseConv2d(nn.Conv2d):
    """A Conv2d (possibly with its BatchNorm and ReLU fused) run by the direct kernel or CSR."""

    _prunq_spec: _Spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self._prunq_spec(x)


class SparseConvTranspose2d(nn.ConvTranspose2d):
    """A ConvTranspose2d(k=4, s=2, p=1) run as a sparse 3×3 conv + ``pixel_shuffle(2)``."""

    _prunq_spec: _Spec

    def forward(self, x: torch.Tensor, output_size: Any = None) -> torch.Tensor:  # noqa: D102
        if output_size is None:
            return self._prunq_spec(x)
        # an explicit output size (odd sizes in a U-Net) needs output padding: the dense kernel, same fusion
        spec = self._prunq_spec
        pad = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation)
        with torch.no_grad():
            y = F.conv_transpose2d(x, spec.convt_w, spec.convt_b, self.stride, self.padding, pad, 1, self.dilation)
        return torch.relu(y) if spec.relu else y


class SparseLinear(nn.Linear):
    """A Linear computing ``x @ Wᵀ`` as ``(W_csr @ xᵀ)ᵀ``; the dense weight stays its parameter."""

    _prunq_csr: tuple

    @torch.no_grad()  # inference only, like the other swapped layers
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        lead = x.shape[:-1]
        y = (_as_csr(self._prunq_csr) @ x.reshape(-1, x.shape[-1]).t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


class AbsorbedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d folded into the sparse conv before it: a pass-through (its state is kept)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x


class AbsorbedReLU(nn.ReLU):
    """A ReLU applied inside the sparse conv before it: a pass-through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x


_RESTORE = {SparseConv2d: nn.Conv2d, SparseConvTranspose2d: nn.ConvTranspose2d, SparseLinear: nn.Linear,
            AbsorbedBatchNorm2d: nn.BatchNorm2d, AbsorbedReLU: nn.ReLU}  # fmt: skip


# -- what can be swapped -----------------------------------------------------------------------------------
def _square(t: Any) -> int | None:
    t = tuple(t) if isinstance(t, (tuple, list)) else (t, t)
    return int(t[0]) if len(set(t)) == 1 else None


def _conv_geometry(m: nn.Module) -> tuple[int, int, int] | None:
    """``(stride, padding, dilation)`` of a Conv2d the sparse forms handle, else None."""
    if type(m) is not nn.Conv2d or m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
        return None
    g = (_square(m.stride), _square(m.padding), _square(m.dilation))
    return None if None in g else g  # type: ignore[return-value]


def _upsampling(m: nn.Module) -> bool:
    return (type(m) is nn.ConvTranspose2d and m.groups == 1 and tuple(m.kernel_size) == (4, 4)
            and tuple(m.stride) == (2, 2) and tuple(m.padding) == (1, 1) and tuple(m.dilation) == (1, 1)
            and tuple(m.output_padding) == (0, 0) and m.padding_mode == "zeros")  # fmt: skip


def convtranspose_as_conv3x3(weight: torch.Tensor) -> torch.Tensor:
    """A ConvTranspose2d(k=4, s=2, p=1) weight ``(Cin, Cout, 4, 4)`` as the weight ``(4·Cout, Cin, 3, 3)`` of a
    3×3 conv (padding 1) whose output, through ``pixel_shuffle(2)``, equals the transposed conv: output
    pixel ``(2i + py, 2j + px)`` sums input ``(i + r − 1, j + q − 1)`` times kernel tap ``(kmap[py][r],
    kmap[px][q])``."""
    cin, cout = weight.shape[:2]
    kmap = ({0: 3, 1: 1}, {1: 2, 2: 0})  # output phase -> {3x3 tap: 4x4 kernel index}
    w = weight.new_zeros(cout, 2, 2, cin, 3, 3)
    for py in range(2):
        for px in range(2):
            for r, kr in kmap[py].items():
                for q, kq in kmap[px].items():
                    w[:, py, px, :, r, q] = weight[:, :, kr, kq].t()
    return w.reshape(cout * 4, cin, 3, 3)


def _chains(model: nn.Module, args: tuple) -> dict[str, tuple[str | None, str | None]]:
    """``{conv: (batchnorm or None, relu or None)}`` to fuse: the channel graph's conv chains
    (:meth:`~prunq.core.graph.ChannelGraph.conv_chains`) whose BatchNorm is a BatchNorm2d."""
    from prunq.core.graph import ChannelGraph

    with warnings.catch_warnings():  # untraceable: no fusion, layers are still swapped one by one
        warnings.simplefilter("ignore")
        graph = ChannelGraph.build(model, args)
    mods = dict(model.named_modules())
    return {conv: (bn, relu) if bn is None or type(mods[bn]) is nn.BatchNorm2d else (None, None)
            for conv, (bn, relu) in graph.conv_chains().items()}  # fmt: skip


def _effective(m: nn.Module, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The conv's weight and bias with the BatchNorm (eval statistics) folded in."""
    w, b = m.weight.detach(), None if m.bias is None else m.bias.detach()
    if bn is None:
        return w, b
    gamma = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_mean)
    beta = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
    fw, fb = fuse_conv_bn_weights(w, b, bn.running_mean, bn.running_var, bn.eps, gamma, beta,
                                  transpose=isinstance(m, nn.ConvTranspose2d))  # fmt: skip
    return fw.detach(), fb.detach()


def _specs(m: nn.Module, bn: nn.Module | None, relu: bool, impls: list[str]) -> dict[str, _Spec]:
    """The sparse forms to try for conv ``m`` (BatchNorm ``bn`` folded, ``relu`` fused)."""
    w, b = _effective(m, bn)
    if type(m) is nn.ConvTranspose2d:
        b4 = None if b is None else b.repeat_interleave(4)
        specs = {i: _Spec(convtranspose_as_conv3x3(w), b4, 1, 1, 1, relu, shuffle=2, impl=i) for i in impls}
        for spec in specs.values():  # the folded transposed weights, for a call with output_size
            spec.convt_w, spec.convt_b = w.contiguous(), b
        return specs
    s, p, d = _conv_geometry(m)  # type: ignore[misc]
    return {i: _Spec(w, b, s, p, d, relu, impl=i) for i in impls}


def _time(fn: Callable[[], Any], reps: int, min_s: float = 0.002) -> float:
    """Median seconds per call over ``reps`` timings (after one warm-up), each repeating the call until it
    lasts ``min_s`` (a layer of a few microseconds is otherwise timer noise)."""
    t0 = time.perf_counter()
    fn()
    n = max(1, min(1000, int(min_s / max(time.perf_counter() - t0, 1e-7))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return sorted(times)[len(times) // 2]


def _whole_model_faster(model: nn.Module, args: tuple, swaps: list[tuple[nn.Module, type, type]], reps: int) -> bool:
    """Time the whole model with and without ``swaps`` ``(module, dense class, sparse class)``, interleaved:
    layers timed alone can mislead (caches, threads); the swapped model must be faster as a whole."""

    def state(sparse: bool) -> None:
        for m, dense_cls, sparse_cls in swaps:
            m.__class__ = sparse_cls if sparse else dense_cls

    def run() -> None:
        model(*args)

    times: dict[bool, list[float]] = {True: [], False: []}
    faster = False
    try:
        for sparse in (False, True):
            state(sparse)
            run()
        for r in range(max(3, reps)):
            for sparse in ((False, True) if r % 2 == 0 else (True, False)):
                state(sparse)
                t0 = time.perf_counter()
                run()
                times[sparse].append(time.perf_counter() - t0)
        faster = sorted(times[True])[len(times[True]) // 2] < sorted(times[False])[len(times[False]) // 2]
    finally:
        state(faster)
    return faster


@torch.no_grad()
def sparsify(
    model: nn.Module, example_inputs: Any, *, min_speedup: float = 1.1, reps: int = 5, min_sparsity: float = 0.5,
    fuse: bool = True, kernel: bool = True,
) -> dict[str, dict[str, Any]]:
    """Swap every layer of a converted ``model`` whose sparse form is measured faster on its input.

    ``example_inputs`` (a tensor or a tuple) are run once to capture each layer's real input (the shape
    the deployment uses: the choice depends on it). A layer is a candidate when its weight sparsity is at
    least ``min_sparsity``; it is swapped when dense time / best sparse time ≥ ``min_speedup`` (median of
    ``reps`` timings each). Then the whole model is timed with and without the swaps (interleaved): if it
    is not faster as a whole, every swap is undone (``"reverted": True`` per layer). ``min_speedup=0``
    swaps every candidate without that check (to test the kernels). ``fuse``: fold a following BatchNorm2d / ReLU into a swapped conv. ``kernel``:
    try the direct C++ kernel (built on first use; without a compiler the CSR forms are tried alone and
    ``prunq.runtime._direct.available()`` says why). Returns, per candidate layer, ``{"sparsity",
    "dense_ms", "<impl>_ms" ..., "sparse_ms" (the best sparse), "impl", "sparse", "fused"}``. In place; the
    model is left in eval mode.
    """
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise PrunqError("sparsify: the model still has masks or weight quantizers; prunq.convert it first")
    model.eval()
    mods = dict(model.named_modules())
    candidates = {n: m for n, m in mods.items()
                  if (type(m) is nn.Linear or _conv_geometry(m) is not None or _upsampling(m))
                  and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"}  # fmt: skip
    have_kernel = _direct.available()[0] if kernel else False
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple) -> None:  # runs after prunq's input quantizers
            captured.setdefault(name, args[0].detach().contiguous())

        return hook

    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    chains = _chains(model, args) if fuse else {}
    hooks = [m.register_forward_pre_hook(keep(n)) for n, m in candidates.items()]
    try:
        model(*args)
    finally:
        for h in hooks:
            h.remove()
    report: dict[str, dict[str, Any]] = {}
    swaps: list[tuple[nn.Module, type, type]] = []
    for name, module in candidates.items():
        x = captured.get(name)
        if x is None or x.dtype != torch.float32:
            continue  # not used by this forward, or not a float32 input
        w = module.weight
        sparsity = float((w == 0).sum()) / w.numel()
        entry: dict[str, Any] = {"sparsity": sparsity, "sparse": False, "impl": "dense", "fused": []}
        report[name] = entry
        if sparsity < min_sparsity:
            continue
        if type(module) is nn.Linear:
            trial = SparseLinear.__new__(SparseLinear)
            trial.__dict__ = dict(module.__dict__)
            trial._prunq_csr = _csr(w)
            dense_s, sparse_s = _time(lambda: module(x), reps), _time(lambda: trial(x), reps)
            entry.update(dense_ms=1e3 * dense_s, csr_ms=1e3 * sparse_s, sparse_ms=1e3 * sparse_s)
            if dense_s / sparse_s >= min_speedup:
                swaps.append((module, type(module), SparseLinear))
                module.__class__ = SparseLinear
                module._prunq_csr = trial._prunq_csr
                entry.update(sparse=True, impl="csr")
            continue
        bn_name, relu_name = chains.get(name, (None, None))
        bn, relu = mods.get(bn_name) if bn_name else None, mods.get(relu_name) if relu_name else None

        def dense_fn(module=module, bn=bn, relu=relu) -> torch.Tensor:
            y = module(x)
            y = bn(y) if bn is not None else y
            return relu(y) if relu is not None else y

        impls = (["direct"] if have_kernel else []) + (["csr"] if type(module) is nn.Conv2d else [])
        if not impls:
            continue
        specs = _specs(module, bn, relu is not None, impls)
        dense_s = _time(dense_fn, reps)
        times = {i: _time(lambda s=s: s(x), reps) for i, s in specs.items()}
        best = min(times, key=times.__getitem__)
        entry.update(dense_ms=1e3 * dense_s, sparse_ms=1e3 * times[best], **{f"{i}_ms": 1e3 * t for i, t in times.items()})
        if dense_s / times[best] < min_speedup:
            continue
        cls = SparseConv2d if type(module) is nn.Conv2d else SparseConvTranspose2d
        swaps.append((module, type(module), cls))
        module.__class__ = cls
        module._prunq_spec = specs[best]
        if bn is not None:
            swaps.append((bn, type(bn), AbsorbedBatchNorm2d))
            bn.__class__ = AbsorbedBatchNorm2d
        if relu is not None:
            swaps.append((relu, type(relu), AbsorbedReLU))
            relu.__class__ = AbsorbedReLU
        entry.update(sparse=True, impl=best, fused=[n for n in (bn_name, relu_name) if n])
    if swaps and min_speedup > 0 and not _whole_model_faster(model, args, swaps, reps):
        for m, _, _ in swaps:
            for attr in ("_prunq_spec", "_prunq_csr"):
                m.__dict__.pop(attr, None)
        for entry in report.values():  # measured slower as a whole: back to dense, said per layer
            if entry["sparse"]:
                entry.update(sparse=False, impl="dense", reverted=True, fused=[])
    return report


def desparsify(model: nn.Module) -> nn.Module:
    """Back to the dense classes (no parameter or buffer ever changed)."""
    for m in model.modules():
        cls = _RESTORE.get(type(m))
        if cls is not None:
            m.__class__ = cls
            for attr in ("_prunq_spec", "_prunq_csr"):
                m.__dict__.pop(attr, None)
    return model
