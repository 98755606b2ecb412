"""Speed of fake-quantized models on CPU, against their dense originals. Not a test.

    .venv/bin/python bench/quant_speed.py            # about 3 min on 2 quiet cores (it waits for quiet ones)
    .venv/bin/python bench/quant_speed.py --quick    # a smoke run (fewer rounds)

The issue: "a compressed conv net as prunq leaves it runs 3.7x slower than its dense original on CPU".
Three parts, every one measured side by side in one process (interleaved rounds, the same threads):

(a) eval latency (``no_grad``) of the dense model against the same model compressed as prunq leaves it
    (random masks at 95 % attached with ``attach_mask``, BatchNorm folded, ``prepare(w4a8)``, calibrated),
    the same under ``parametrize.cached()``, and after ``convert()``: digits CNN, ResNet-20, StereoNet;
(b) a ResNet-20 training step (batch 64, SGD): plain against activation fake-quant only, activation +
    weight fake-quant, and the stage-2 set-up (masks too), in NCHW and in channels_last;
(c) the fake-quant kernels on one 2 M-element activation, in eval and in training: which candidates
    give values bit-identical to ``fake_quant`` (the definition), and how fast each is.

(a) and (b) also run the previous implementation (torch's fused ``_fake_quantize_learnable_*`` kernels,
rebuilt here) as "before" rows. Each round times every variant back to back, in a rotating order; a
ratio is the median over rounds of the per-round ratio, with its interquartile range. The machine may
be shared: each round records the CPU time other processes took, and rounds where they took more than
``--max-foreign`` of the machine are dropped (their count is reported) as long as enough remain.

Writes ``bench/results/quant_speed.json`` and ``.md`` (README figures are copied from there).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

import prunq.quant as Q
from prunq.core.layers import compressible_layers
from prunq.prune.masks import attach_mask, set_mask, zero_pruned_
from prunq.quant.act import ActQuantizer
from prunq.quant.primitives import MIN_STEP, fake_quant, grad_scale, lsq_fake_quant
from prunq.quant.weight import WeightQuantizer
from prunq.tasks.classification.models import build as build_classifier
from prunq.tasks.stereo.models import build as build_stereo

ROOT = Path(__file__).resolve().parents[1]
TARGET_EVAL = 1.5  # compressed eval latency / dense, at most
TARGET_TRAIN = 1.35  # ResNet-20 training step with activation fake-quant / plain step, at most
SPARSITY = 0.95


# -- timing -----------------------------------------------------------------------------------------------
def _cpu_ticks() -> tuple[int, int, int] | None:
    """(all CPUs' busy ticks, all ticks, this process's ticks) from /proc, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return sum(v) - v[3] - v[4], sum(v), int(own[11]) + int(own[12])
    except (OSError, ValueError, IndexError):
        return None


def _foreign(a: tuple[int, int, int] | None, b: tuple[int, int, int] | None) -> float:
    """Share of the whole machine's CPU time taken by other processes between two _cpu_ticks()."""
    if a is None or b is None or b[1] == a[1]:
        return 0.0
    return max(0.0, ((b[0] - a[0]) - (b[2] - a[2])) / (b[1] - a[1]))


def _repeats(fn: Callable[[], Any], min_s: float) -> int:
    """Calls per timing so that one timing lasts at least ``min_s``."""
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-6)
    return max(1, math.ceil(min_s / one))


#: Seconds left for wait_quiet() in this run (set from --wait-total).
_WAIT_BUDGET = [0.0]


def wait_quiet(max_foreign: float, max_wait_s: float, probe_s: float = 0.5) -> None:
    """Wait (at most ``max_wait_s``, within the run's budget) until other processes use less than
    ``max_foreign`` of the CPUs.

    With 2 threads on 2 cores, one busy core stalls every parallel region at its barrier: a round timed
    then measures the other process, not the code.
    """
    t0 = time.monotonic()
    t_end = t0 + min(max_wait_s, _WAIT_BUDGET[0])
    try:
        while time.monotonic() < t_end:
            a = _cpu_ticks()
            time.sleep(probe_s)
            if _foreign(a, _cpu_ticks()) <= max_foreign:
                return
    finally:
        _WAIT_BUDGET[0] -= time.monotonic() - t0


def interleaved(
    fns: dict[str, Callable[[], Any]],
    rounds: int,
    min_s: float,
    max_foreign: float,
    contexts: dict[str, Callable[[], Any]] | None = None,
    max_wait_s: float = 0.0,
) -> dict[str, Any]:
    """Time every variant once per round, back to back, in a rotating order; seconds per call.

    ``contexts[name]`` (optional) makes the context manager that one timing of ``name`` runs inside
    (e.g. ``parametrize.cached``: entered once per timing, as a deployed loop would). Returns
    ``{"times": {name: [s per round]}, "foreign": [...], "kept": [round indices]}``.
    """
    contexts = contexts or {}
    for k, fn in fns.items():  # warm-up (allocator, oneDNN primitive caches)
        with contexts.get(k, contextlib.nullcontext)():
            fn()
            fn()
    reps = {k: _repeats(fn, min_s) for k, fn in fns.items()}
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    foreign = []
    for r in range(rounds):
        if max_wait_s > 0:
            wait_quiet(max_foreign, max_wait_s)
        a = _cpu_ticks()
        for k in names[r % len(names) :] + names[: r % len(names)]:
            fn, n = fns[k], reps[k]
            t0 = time.perf_counter()
            with contexts.get(k, contextlib.nullcontext)():
                for _ in range(n):
                    fn()
            times[k].append((time.perf_counter() - t0) / n)
        foreign.append(_foreign(a, _cpu_ticks()))
    kept = [r for r in range(rounds) if foreign[r] <= max_foreign]
    clean = len(kept) >= max(3, rounds // 3)
    if not clean:
        kept = list(range(rounds))  # too noisy to filter: keep all, and say so
    return {"times": times, "foreign": foreign, "kept": kept, "clean": clean}


def _quartiles(v: list[float]) -> tuple[float, float, float]:
    if len(v) < 2:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], statistics.median(v), q[2]


def summarize(res: dict[str, Any], base: str) -> dict[str, dict[str, float]]:
    """Per variant: median seconds and its quartiles, and the median per-round ratio to ``base``."""
    kept = res["kept"]
    out = {}
    for k, t in res["times"].items():
        tk = [t[r] for r in kept]
        ratios = [t[r] / res["times"][base][r] for r in kept]
        lo, med, hi = _quartiles(tk)
        rlo, rmed, rhi = _quartiles(ratios)
        out[k] = {"s": med, "s_q1": lo, "s_q3": hi, "ratio": rmed, "ratio_q1": rlo, "ratio_q3": rhi}
    return out


# -- the previous implementation (torch's fused learnable kernels), for "before" rows ---------------------
def _fused_act_forward(self: ActQuantizer, x: torch.Tensor) -> torch.Tensor:
    """ActQuantizer.forward as it was: fused learnable kernel with grad, fused frozen kernel without."""
    if self._observing or not self._ready:
        return ActQuantizer.forward(self, x)
    if self.learn and self.step.requires_grad and torch.is_grad_enabled():
        step, zp, g = self._live_step().reshape(1), torch.zeros(1, device=x.device), self._lsq_scale(x)
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            nhwc = x.permute(0, 2, 3, 1)
            return torch._fake_quantize_learnable_per_tensor_affine(nhwc, step, zp, self.qmin, self.qmax, g).permute(
                0, 3, 1, 2
            )
        return torch._fake_quantize_learnable_per_tensor_affine(x, step, zp, self.qmin, self.qmax, g)
    zp = torch.zeros(1, dtype=torch.int32, device=x.device)
    step = self.effective_step().reshape(1).float()
    return torch.fake_quantize_per_tensor_affine(x, step, zp, self.qmin, self.qmax).to(x.dtype)


def _fused_weight_forward(self: WeightQuantizer, w: torch.Tensor) -> torch.Tensor:
    """WeightQuantizer.forward as it was: fused learnable kernels (also without grad)."""
    c = self._canon(w)
    n = self.step.numel()
    if self.power_of_two or not c.is_contiguous():
        return self.reference_forward(w)
    factor = 1.0 / math.sqrt((c.numel() // n) * self.qmax) if self.learn else 1.0
    step = self.step.clamp_min(MIN_STEP)
    step = step if self.learn else step.detach()
    zp = torch.zeros(n, dtype=c.dtype, device=c.device)
    if n > 1:
        q = torch._fake_quantize_learnable_per_channel_affine(c, step, zp, 0, self.qmin, self.qmax, factor)
    else:
        q = torch._fake_quantize_learnable_per_tensor_affine(c, step, zp, self.qmin, self.qmax, factor)
    return self._uncanon(q)


def with_fused_kernels(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose quantizers run the previous (fused-kernel) forward."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.forward = types.MethodType(_fused_act_forward, m)
        elif isinstance(m, WeightQuantizer):
            m.forward = types.MethodType(_fused_weight_forward, m)
    return model


# -- models ------------------------------------------------------------------------------------------------
def _call(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    return model(*inputs)


def random_masks_(model: nn.Module, sparsity: float, seed: int = 0) -> None:
    """Attach a random mask keeping ``1 - sparsity`` of every compressible layer's weights."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in compressible_layers(model):
        attach_mask(layer)
        w = layer.parametrizations.weight.original
        set_mask(layer, (torch.rand(w.shape, generator=gen) >= sparsity).to(w.dtype))
        zero_pruned_(layer)


def compress(
    dense: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    calib: list[tuple[torch.Tensor, ...]],
    masks: bool,
    wbits: int,
    abits: int,
) -> nn.Module:
    """What prunq leaves: masks (optional), BatchNorm folded, ``prepare``, calibrated; in eval mode."""
    model = copy.deepcopy(dense).eval()
    if masks:
        random_masks_(model, SPARSITY)
    Q.fold_bn_(model, Q.find_conv_bn_pairs(model, inputs))
    Q.prepare(model, Q.QuantConfig(weight_bits=wbits, act_bits=abits))
    Q.calibrate(model, calib, _call)
    return model.eval()


def eval_models(quick: bool) -> list[tuple[str, nn.Module, tuple[torch.Tensor, ...], str]]:
    gen = torch.Generator().manual_seed(0)
    specs = [
        ("digits_cnn", lambda: build_classifier("digits_cnn"), [(1, 1, 8, 8), (64, 1, 8, 8)]),
        ("resnet20", lambda: build_classifier("resnet20"), [(64, 3, 32, 32)]),
        ("stereo_net", lambda: build_stereo("stereo_net"), [(1, 3, 128, 256), (1, 3, 128, 256)]),
    ]
    out = []
    for name, make, shapes in specs:
        torch.manual_seed(0)
        model = make().eval()
        if name == "stereo_net":
            batches = [(torch.rand(shapes[0], generator=gen), torch.rand(shapes[1], generator=gen))]
            out.append((name, model, batches[0], "2 × (1, 3, 128, 256)"))
        else:
            for shape in shapes:
                out.append((name, model, (torch.randn(shape, generator=gen),), str(tuple(shape))))
    return out


# -- (a) eval ------------------------------------------------------------------------------------------------
def bench_eval(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    built: dict[str, tuple[nn.Module, nn.Module]] = {}
    for name, dense, inputs, shape in eval_models(args.quick):
        if name not in built:  # one compressed model per network, calibrated on its first input
            built[name] = (dense, compress(dense, inputs, [inputs], masks=True, wbits=4, abits=8))
        dense, comp = built[name]
        converted = Q.convert(copy.deepcopy(comp))
        before = with_fused_kernels(comp)
        fns = {
            "dense": lambda m=dense, x=inputs: m(*x),
            "compressed": lambda m=comp, x=inputs: m(*x),
            "compressed, parametrize.cached()": lambda m=comp, x=inputs: m(*x),
            "compressed, convert()": lambda m=converted, x=inputs: m(*x),
            "compressed, before (fused kernels)": lambda m=before, x=inputs: m(*x),
        }
        with torch.no_grad():
            with parametrize.cached():
                cached_out = comp(*inputs)
            exact = all(torch.equal(a, b) for a, b in _pairs(comp(*inputs), cached_out))
            res = interleaved(fns, args.rounds, args.min_s, args.max_foreign,
                              contexts={"compressed, parametrize.cached()": parametrize.cached}, max_wait_s=args.wait)  # fmt: skip
        stats = summarize(res, "dense")
        row = {
            "model": name, "input": shape, "stats": stats, "rounds_kept": len(res["kept"]), "rounds": args.rounds,
            "foreign_cpu_median": statistics.median(res["foreign"]), "clean": res["clean"], "cached_equals_uncached": exact,
        }  # fmt: skip
        rows.append(row)
        print(f"[eval] {name} {shape}: dense {stats['dense']['s'] * 1e3:.2f} ms; "
              + ", ".join(f"{k} {v['ratio']:.2f}x" for k, v in stats.items() if k != "dense"), flush=True)  # fmt: skip
    return rows


def _pairs(a: Any, b: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(a, torch.Tensor):
        return [(a, b)]
    return [(x, y) for u, v in zip(a, b) for x, y in _pairs(u, v)]


# -- (b) training step -------------------------------------------------------------------------------------
def bench_train(args: argparse.Namespace, channels_last: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(64, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (64,))
    dense = build_classifier("resnet20").eval()
    plain = copy.deepcopy(dense)
    Q.fold_bn_(plain, Q.find_conv_bn_pairs(plain, (x,)))  # every variant is the same folded network
    calib = [(torch.randn(64, 3, 32, 32),)]
    models = {
        "plain": plain,
        "dense with BatchNorm (not folded)": copy.deepcopy(dense),
        "act FQ": compress(dense, (x,), calib, masks=False, wbits=32, abits=8),
        "act + weight FQ": compress(dense, (x,), calib, masks=False, wbits=4, abits=8),
        "masks + act + weight FQ (stage 2)": compress(dense, (x,), calib, masks=True, wbits=4, abits=8),
    }
    models["act FQ, before (fused kernels)"] = with_fused_kernels(models["act FQ"])
    models["act + weight FQ, before (fused kernels)"] = with_fused_kernels(models["act + weight FQ"])
    loss_fn = nn.CrossEntropyLoss()
    fns = {}
    for k, m in models.items():
        m.to(memory_format=fmt).train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

        def step(m: nn.Module = m, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(m(x), y).backward()
            opt.step()

        fns[k] = step
    res = interleaved(fns, args.train_rounds, args.train_min_s, args.max_foreign, max_wait_s=args.wait)
    stats = summarize(res, "plain")
    layout = "channels_last" if channels_last else "NCHW"
    print(f"[train] resnet20 batch 64 {layout}: plain {stats['plain']['s'] * 1e3:.1f} ms; "
          + ", ".join(f"{k} {v['ratio']:.2f}x" for k, v in stats.items() if k != "plain"), flush=True)  # fmt: skip
    return {
        "model": "resnet20", "batch": 64, "layout": layout, "optimizer": "SGD(momentum=0.9)", "stats": stats,
        "rounds_kept": len(res["kept"]), "rounds": args.train_rounds, "foreign_cpu_median": statistics.median(res["foreign"]),
        "clean": res["clean"],
    }  # fmt: skip


# -- (c) kernels -----------------------------------------------------------------------------------------------
def near_half_steps(like: torch.Tensor, step: torch.Tensor, qmax: int, gen: torch.Generator) -> torch.Tensor:
    """Values within 4 ulps of ``(k + 0.5) * step``: where ``x / step`` and ``x * (1 / step)`` can round apart."""
    k = torch.randint(0, qmax, like.shape, generator=gen).float()
    x = (k + 0.5) * step
    x = x + torch.randint(-4, 5, like.shape, generator=gen).float() * torch.finfo(torch.float32).eps * x
    return x.contiguous(memory_format=torch.channels_last) if not like.is_contiguous() else x


def bench_kernels(args: argparse.Namespace, channels_last: bool) -> dict[str, Any]:
    """Candidates for one per-tensor unsigned 8-bit activation fake-quant of (64, 32, 32, 32)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, 32, 32, generator=gen).relu_()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    qmin, qmax = 0, 255
    step = torch.tensor(float(x.max()) * 0.8 / qmax)  # some values clip
    ties = near_half_steps(x, step, qmax, gen)
    factor = 1.0 / math.sqrt(x[0].numel() * qmax)
    upstream = torch.randn(x.shape, generator=gen).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    zp_f, zp_i = torch.zeros(1), torch.zeros(1, dtype=torch.int32)
    s1 = step.reshape(1)

    def learnable(xx: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if channels_last:
            return torch._fake_quantize_learnable_per_tensor_affine(
                xx.permute(0, 2, 3, 1), s.reshape(1), zp_f, qmin, qmax, factor
            ).permute(0, 3, 1, 2)
        return torch._fake_quantize_learnable_per_tensor_affine(xx, s.reshape(1), zp_f, qmin, qmax, factor)

    evals: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "prunq lsq_fake_quant, no grad (in-place composed)": lambda t: lsq_fake_quant(t, step, qmin, qmax),
        "composed clamp(round(x / s)) * s": lambda t: torch.clamp(torch.round(t / step), qmin, qmax) * step,
        "torch.fake_quantize_per_tensor_affine": lambda t: torch.fake_quantize_per_tensor_affine(
            t, s1, zp_i, qmin, qmax
        ),
        "torch._fake_quantize_learnable_per_tensor_affine": lambda t: learnable(t, step),
    }
    out: dict[str, Any] = {
        "layout": "channels_last" if channels_last else "NCHW",
        "elements": x.numel(),
        "eval": {},
        "train": {},
    }
    with torch.no_grad():
        res = interleaved(
            {k: (lambda f=f: f(x)) for k, f in evals.items()},
            args.rounds,
            args.min_s,
            args.max_foreign,
            max_wait_s=args.wait,
        )
        stats = summarize(res, next(iter(evals)))
        for k, fn in evals.items():
            y, yt = fn(x), fn(ties)
            differ = int((y != fake_quant(x, step, qmin, qmax)).sum())
            differ_ties = int((yt != fake_quant(ties, step, qmin, qmax)).sum())
            out["eval"][k] = {**stats[k], "bit_identical": differ == 0 and differ_ties == 0, "values_differing": differ,
                              "values_differing_near_half_steps": differ_ties, "keeps_layout": y.stride() == x.stride()}  # fmt: skip
    out["foreign_cpu_median"] = statistics.median(res["foreign"])

    def run(
        fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor = x
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xx = x.detach().requires_grad_(True)
        s = step.detach().clone().requires_grad_(True)
        yy = fn(xx, s)
        yy.backward(upstream)
        return yy.detach(), xx.grad, s.grad

    trains = {
        "prunq lsq_fake_quant (autograd.Function)": lambda xx, s: lsq_fake_quant(xx, s, qmin, qmax, factor),
        "composed fake_quant(x, grad_scale(s, g))": lambda xx, s: fake_quant(xx, grad_scale(s, factor), qmin, qmax),
        "torch._fake_quantize_learnable_per_tensor_affine": learnable,
    }
    res = interleaved(
        {k: (lambda f=f: run(f)) for k, f in trains.items()},
        args.rounds,
        args.min_s,
        args.max_foreign,
        max_wait_s=args.wait,
    )
    stats = summarize(res, next(iter(trains)))
    yr, gxr, gsr = run(trains["composed fake_quant(x, grad_scale(s, g))"])
    ytr = run(trains["composed fake_quant(x, grad_scale(s, g))"], ties)[0]
    for k, f in trains.items():
        yy, gx, gs = run(f)
        differ, differ_ties = int((yy != yr).sum()), int((run(f, ties)[0] != ytr).sum())
        out["train"][k] = {
            **stats[k], "bit_identical": differ == 0 and differ_ties == 0, "values_differing": differ,
            "values_differing_near_half_steps": differ_ties,
            "grad_x_max_abs_diff": float((gx - gxr).abs().max()), "grad_step_rel_diff": float(abs(gs - gsr) / abs(gsr)),
            "keeps_layout": gx.stride() == x.stride(),
        }  # fmt: skip
    print(
        f"[kernels] {out['layout']}: "
        + "; ".join(f"{k} {v['s'] * 1e3:.2f} ms" for k, v in {**out["eval"], **out["train"]}.items()),
        flush=True,
    )
    return out


# -- report ------------------------------------------------------------------------------------------------------
def _r(v: dict[str, float]) -> str:
    return f"{v['ratio']:.2f}× ({v['ratio_q1']:.2f}–{v['ratio_q3']:.2f})"


def report(data: dict[str, Any]) -> str:
    meta = data["meta"]
    lines = [
        "# Fake-quantized models on CPU: speed against the dense original",
        "",
        (
            f"`python bench/quant_speed.py{' --quick' if meta['quick'] else ''}` — torch {meta['torch']}, "
            f"{meta['threads']} threads, {meta['machine']}, flush-denormal on; {meta['seconds']:.0f} s. "
            "Ratios: median over interleaved rounds of the per-round ratio, interquartile range in brackets. "
            f"Rounds in which other processes took more than {meta['max_foreign']:.0%} of the machine's CPU were "
            "dropped (kept/total per row)."
        ),
        "",
        (
            f"Targets: eval of the compressed model ≤ {TARGET_EVAL}× dense; ResNet-20 training step with activation "
            f"fake-quant ≤ {TARGET_TRAIN}× plain."
        ),
        "",
    ]
    for line in data["verdict"]:
        lines.append(f"- {line}")
    lines += [
        "",
        "## (a) Eval latency (`no_grad`), compressed as prunq leaves it",
        "",
        (
            f"Random masks at {SPARSITY:.0%} (`attach_mask`), BatchNorm folded, `prepare(QuantConfig(weight_bits=4, "
            'act_bits=8))`, calibrated. "before" = the previous quantizer forward (torch\'s fused fake-quant kernels).'
        ),
        "",
        "| model | input | dense (ms) | compressed | + `parametrize.cached()` | after `convert()` | before (fused kernels) | rounds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in data["eval"]:
        s = row["stats"]
        lines.append(
            f"| {row['model']} | {row['input']} | {s['dense']['s'] * 1e3:.2f} | {_r(s['compressed'])} | "
            f"{_r(s['compressed, parametrize.cached()'])} | {_r(s['compressed, convert()'])} | "
            f"{_r(s['compressed, before (fused kernels)'])} | {row['rounds_kept']}/{row['rounds']}{'' if row['clean'] else ' (busy)'} |"
        )
    lines += [
        "",
        "## (b) ResNet-20 training step (batch 64, SGD)",
        "",
        (
            "Plain and every fake-quant variant are the same BatchNorm-folded network (prunq folds before `prepare`), "
            "so the ratios are the cost of the quantizers alone; the dense network with its BatchNorms is shown "
            'for scale. "before" = the previous quantizer forward (torch\'s fused kernels).'
        ),
        "",
        "| layout | plain (ms) | dense with BN | act FQ | act + weight FQ | masks + act + weight FQ | act FQ, before | act + weight FQ, before | rounds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in data["train"]:
        s = row["stats"]
        lines.append(
            f"| {row['layout']} | {s['plain']['s'] * 1e3:.1f} | {_r(s['dense with BatchNorm (not folded)'])} | "
            f"{_r(s['act FQ'])} | {_r(s['act + weight FQ'])} | "
            f"{_r(s['masks + act + weight FQ (stage 2)'])} | {_r(s['act FQ, before (fused kernels)'])} | "
            f"{_r(s['act + weight FQ, before (fused kernels)'])} | {row['rounds_kept']}/{row['rounds']}{'' if row['clean'] else ' (busy)'} |"
        )
    lines += [
        "",
        "## (c) Fake-quant kernels on one activation (64, 32, 32, 32), unsigned 8-bit",
        "",
        (
            "Exact = bit-identical values to `fake_quant` (the composed definition), on the timed activation and on "
            "as many values placed within 4 ulps of half-steps (where `x / s` and torch's `x * (1 / s)` can round "
            "apart). Training = forward + backward to x and to the step; gradients compared with the composed "
            "autograd version (its `grad_x` is `(g * s) / s`, hence the 1-ulp differences)."
        ),
        "",
        "| layout | path | candidate | median (ms) | vs prunq | exact | values differing (timed / near half-steps) | grad_x max abs diff | grad_step rel diff |",
        "|---|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for k in data["kernels"]:
        for path in ("eval", "train"):
            for name, v in k[path].items():
                gx = f"{v['grad_x_max_abs_diff']:.1e}" if "grad_x_max_abs_diff" in v else ""
                gs = f"{v['grad_step_rel_diff']:.1e}" if "grad_step_rel_diff" in v else ""
                lines.append(
                    f"| {k['layout']} | {path} | {name} | {v['s'] * 1e3:.2f} | {v['ratio']:.2f}× | "
                    f"{'yes' if v['bit_identical'] else 'no'} | {v['values_differing']} / {v['values_differing_near_half_steps']} | {gx} | {gs} |"
                )
    return "\n".join(lines) + "\n"


def verdict(data: dict[str, Any]) -> list[str]:
    """One line per target; a row whose rounds could not be filtered for a busy machine says so."""

    def busy(row: dict[str, Any]) -> str:
        if row["clean"]:
            return ""
        foreign = row["foreign_cpu_median"]
        return f" (machine busy: other processes took {foreign:.0%} of the CPU; not trustworthy, rerun)"

    out = []
    for row in data["eval"]:
        r = row["stats"]["compressed"]["ratio"]
        ok = "met" if r <= TARGET_EVAL else "NOT met"
        out.append(
            f"eval {row['model']} {row['input']}: compressed {r:.2f}× dense — target ≤ {TARGET_EVAL}× {ok}{busy(row)}"
        )
    for row in data["train"]:
        r = row["stats"]["act FQ"]["ratio"]
        ok = "met" if r <= TARGET_TRAIN else "NOT met"
        out.append(
            f"training step ResNet-20 {row['layout']}: act FQ {r:.2f}× plain — target ≤ {TARGET_TRAIN}× {ok}{busy(row)}"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds for (a) and (c) (default 15, quick 4)")
    ap.add_argument("--train-rounds", type=int, default=None, help="rounds for (b) (default 12, quick 3)")
    ap.add_argument("--min-s", type=float, default=0.05, help="each timing repeats a call for at least this long")
    ap.add_argument("--train-min-s", type=float, default=0.25, help="the same for a training step")
    ap.add_argument("--max-foreign", type=float, default=0.1, help="drop rounds where other processes took more CPU")
    ap.add_argument(
        "--wait", type=float, default=15.0, help="before a round, wait up to this many seconds for a quiet machine"
    )
    ap.add_argument("--wait-total", type=float, default=300.0, help="at most this many seconds of such waiting in all")
    ap.add_argument("--only", choices=["eval", "train", "kernels"], action="append", help="run only these parts")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--name", default=None, help="output stem (default quant_speed, quick: quant_speed_quick)")
    args = ap.parse_args()
    args.rounds = args.rounds or (4 if args.quick else 15)
    args.train_rounds = args.train_rounds or (3 if args.quick else 12)
    torch.set_num_threads(args.threads)
    _WAIT_BUDGET[0] = args.wait_total
    torch.set_flush_denormal(True)  # random-init models must not be timed on denormal arithmetic
    parts = set(args.only or ["eval", "train", "kernels"])
    t0 = time.perf_counter()
    data: dict[str, Any] = {"eval": [], "train": [], "kernels": []}
    if "kernels" in parts:
        data["kernels"] = [bench_kernels(args, cl) for cl in (False, True)]
    if "eval" in parts:
        data["eval"] = bench_eval(args)
    if "train" in parts:
        data["train"] = [bench_train(args, cl) for cl in (False, True)]
    data["meta"] = {
        "torch": torch.__version__, "threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "quick": args.quick, "rounds": args.rounds, "train_rounds": args.train_rounds, "min_s": args.min_s,
        "train_min_s": args.train_min_s,
        "max_foreign": args.max_foreign, "seconds": time.perf_counter() - t0, "sparsity": SPARSITY,
        "waited_for_quiet_s": args.wait_total - _WAIT_BUDGET[0],
        "targets": {"eval_vs_dense": TARGET_EVAL, "train_act_fq_vs_plain": TARGET_TRAIN},
    }  # fmt: skip
    data["verdict"] = verdict(data)
    for line in data["verdict"]:
        print(line)
    stem = args.name or ("quant_speed_quick" if args.quick else "quant_speed")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(data, indent=2))
    (args.out / f"{stem}.md").write_text(report(data))
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
