"""The peers' recipes for bench/peers.py: what a user of each tool would run, at prunq's fine-tuning budget.

Every method gets the same dense model, the same training batches (``prunq.pipeline.training.fit``: same optimizer,
learning rate and data order as prunq's stages), ``P`` pruning fine-tuning steps and ``Q`` quantization
steps, and is measured by prunq's cost model from its *effective* weights (the tensors its forward pass
really multiplies with) -- never from the tool's own statistics.

* ``gmp_prune``      -- ``torch.nn.utils.prune.global_unstructured`` (L1) on prunq's cubic schedule (Zhu & Gupta),
                        the masks kept as the tool's forward pre-hooks (hard: a pruned weight never returns);
* ``PlainQAT``       -- the classic fake-quant QAT a PyTorch user assembles from ``torch.fake_quantize_*``:
                        per-channel symmetric weights (max-abs step), per-tensor activations with a moving
                        min/max observer (unsigned when the observed input is non-negative), BN not folded;
* ``nncf_run``       -- NNCF 3.x: ``nncf.prune`` (global magnitude) with its exponential scheduler while
                        fine-tuning, then ``nncf.quantize`` (its only bit-width: 8) and QAT on its model;
* ``tp_run``         -- Torch-Pruning: channel pruning (L2 magnitude, uniform ratio) to a BOPs target, one
                        shot, fine-tuned, then ``PlainQAT``;
* ``brevitas_qat``   -- Brevitas ``QuantConv2d``/``QuantLinear`` (per-channel weights, per-tensor inputs) QAT
                        of the magnitude-pruned model, the pruning masks kept.

Imports of the peers are local to each function: the digits and stereo tasks run with whatever subset is
installed (``pip install -e '.[peers]'``), and a missing peer is reported, not fatal.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from prunq.cost import measure as C
from prunq.core.layers import compressible_layers, out_channels
from prunq.pipeline.run import quant_calibration_batches
from prunq.pipeline.recipes import Recipe
from prunq.prune.schedules import Schedule
from prunq.tasks.base import Task
from prunq.pipeline.training import fit


# ---------------------------------------------------------------------------------------------- helpers
def model_inputs(task: Task, batch: tuple) -> tuple:
    """The model's positional inputs in a training batch (the task's example inputs say how many)."""
    return tuple(batch[: len(task.example_inputs())])


def _is_transposed(module: nn.Module) -> bool:
    return isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))


def fake_quant_weight(w: torch.Tensor, module: nn.Module, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric narrow-range fake quantization, step = max|w| / (2^(b-1) - 1)."""
    axis = 1 if _is_transposed(module) else 0
    qmax = 2 ** (bits - 1) - 1
    dims = [d for d in range(w.dim()) if d != axis]
    scale = (w.detach().abs().amax(dim=dims) / qmax).clamp_min(1e-12).float()
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, axis, -qmax, qmax)


def sparsity_against(weights: dict[str, torch.Tensor], dense_prunable: int) -> float:
    """``1 - non-zeros / dense prunable weights``: comparable between masks and removed channels."""
    return 1.0 - sum(int((w != 0).sum()) for w in weights.values()) / dense_prunable


def measure_weights(
    arch: nn.Module, weights: dict[str, torch.Tensor], wb: int, ab: int, task: Task, reference: C.ModelCost,
    act_bits: dict[str, int] | None = None,
) -> C.ModelCost:
    """prunq's cost model on ``arch`` (a plain module of the right shapes) holding ``weights``.

    Every compressible layer is declared ``wb``-bit weights (one step per output channel) and ``ab``-bit
    inputs (one step), or ``act_bits[name]`` where given (32 = not quantized).
    """
    m = copy.deepcopy(arch)
    quant = {}
    for name, layer in compressible_layers(m):
        with torch.no_grad():
            layer.weight.copy_(weights[name])
        a = (act_bits or {}).get(name, ab)
        quant[name] = C.LayerQuant(weight_bits=wb, act_bits=a, weight_scales=out_channels(layer),
                                   act_scales=1 if a < 16 else 0)  # fmt: skip
    return C.measure(m, task.example_inputs(), quant=quant, reference=reference)


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy without torch.nn.utils.prune hooks (the mask multiplied in) and without other hooks."""
    for _, layer in compressible_layers(model):
        if prune.is_pruned(layer):  # the hooks' last output may be part of an autograd graph: not copyable
            layer.weight = (layer.weight_orig * layer.weight_mask).detach()
    m = copy.deepcopy(model)
    for _, layer in compressible_layers(m):
        if prune.is_pruned(layer):
            prune.remove(layer, "weight")
        layer._forward_pre_hooks.clear()
    return m


def gmp_schedule(spec, steps: int, sparsity: float) -> Schedule:
    """prunq's own gradual (cubic) schedule over the recipe's pruning window, for the GMP baseline."""
    begin, end = int(round(spec.begin * steps)), int(round(spec.end * steps))
    return Schedule("gradual", sparsity, begin, max(end, begin + 1), frequency=spec.frequency)


# ---------------------------------------------------------------------------------------------- torch.nn.utils.prune
def _global_l1_to(params: list[tuple[nn.Module, str]], target: float) -> None:
    """Prune (L1, global) the extra weights that bring the masked fraction to ``target``."""
    total = sum(m.weight_mask.numel() for m, _ in params)
    zeros = sum(int((m.weight_mask == 0).sum()) for m, _ in params)
    k = int(round(target * total)) - zeros
    if k > 0:
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=k)


def gmp_prune(dense: nn.Module, task: Task, recipe: Recipe, sparsity: float) -> nn.Module:
    """Gradual magnitude pruning with torch.nn.utils.prune (global L1, cubic schedule, hard masks)."""
    model = copy.deepcopy(dense)
    params = [(m, "weight") for _, m in compressible_layers(model)]
    for m, _ in params:
        prune.identity(m, "weight")
    spec = recipe.prune
    schedule = gmp_schedule(spec, spec.finetune.steps, sparsity)

    def after_step(t: int) -> None:
        if t >= schedule.begin and (t - schedule.begin) % spec.frequency == 0:
            _global_l1_to(params, schedule.target(t + 1))

    fit(model, task, spec.finetune, batch_size=recipe.task.batch_size, seed=recipe.seed + 1, stage="gmp",
        after_step=after_step, quiet=True)  # fmt: skip
    _global_l1_to(params, sparsity)  # the schedule's last cut, if the budget ended before it
    return model


class PlainQAT:
    """Fake-quant QAT from plain ``torch.fake_quantize_*`` ops, as forward pre-hooks on every compressible layer.

    Runs after torch.nn.utils.prune's own hook (so ``weight = Q(orig * mask)``: zeros stay zeros); a layer
    without a pruning hook gets ``prune.identity``. Activation observers: min/max of the first batch, then a
    moving average (constant 0.01, as torch.ao's ``MovingAverageMinMaxObserver``) while training or
    calibrating; frozen in eval.
    """

    def __init__(self, model: nn.Module, wb: int, ab: int, momentum: float = 0.01) -> None:
        self.wb, self.ab, self.momentum = wb, ab, momentum
        self.calibrating = False
        self.range: dict[nn.Module, list[float]] = {}
        self.layers = list(compressible_layers(model))
        for _, m in self.layers:
            if not prune.is_pruned(m):
                prune.identity(m, "weight")
            m.register_forward_pre_hook(self._hook)

    def _act(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        lo, hi = float(x.detach().min()), float(x.detach().max())
        r = self.range.get(module)
        if module.training or self.calibrating:
            if r is None:
                r = self.range[module] = [lo, hi]
            else:
                r[0] += self.momentum * (lo - r[0])
                r[1] += self.momentum * (hi - r[1])
        if r is None:
            return x
        if r[0] >= 0:  # non-negative input (after ReLU): unsigned levels
            qmin, qmax, scale = 0, 2**self.ab - 1, r[1] / (2**self.ab - 1)
        else:
            qmax = 2 ** (self.ab - 1) - 1
            qmin, scale = -qmax - 1, max(abs(r[0]), abs(r[1])) / qmax
        return torch.fake_quantize_per_tensor_affine(x, max(scale, 1e-12), 0, qmin, qmax)

    def _hook(self, module: nn.Module, args: tuple) -> tuple:
        module.weight = fake_quant_weight(module.weight, module, self.wb)  # set by prune's hook just before
        return (self._act(module, args[0]), *args[1:])

    def effective_weights(self) -> dict[str, torch.Tensor]:
        return {n: fake_quant_weight(m.weight_orig * m.weight_mask, m, self.wb).detach() for n, m in self.layers}

    def calibrate(self, model: nn.Module, task: Task, batches: list) -> None:
        was = model.training
        model.eval()
        self.calibrating = True
        with torch.no_grad():
            for b in batches:
                model(*model_inputs(task, b))
        self.calibrating = False
        model.train(was)


def plain_qat(pruned: nn.Module, task: Task, recipe: Recipe, wb: int, ab: int) -> tuple[nn.Module, PlainQAT]:
    """Calibrate and fine-tune ``PlainQAT`` on a copy of ``pruned`` with the recipe's stage-2 budget."""
    model = copy.deepcopy(pruned)
    qat = PlainQAT(model, wb, ab)
    spec = recipe.quant
    qat.calibrate(model, task, quant_calibration_batches(task, recipe))
    fit(model, task, spec.finetune, batch_size=recipe.task.batch_size, seed=recipe.seed + 2, stage="qat", quiet=True)
    return model, qat


# ---------------------------------------------------------------------------------------------- NNCF
def _nncf_hooks(model: nn.Module) -> nn.Module:
    return model._modules["__nncf_hooks"]


def nncf_effective(model: nn.Module, dense: nn.Module) -> tuple[dict[str, torch.Tensor], set[int], set[int]]:
    """The weights NNCF's hooks feed each layer (mask, then weight quantizer), and the bit-widths of its
    weight and activation quantizers."""
    hooks = _nncf_hooks(model)
    post, pre = hooks.post_hooks, hooks.pre_hooks
    out, wbits, abits = {}, set(), set()
    weight_q = set()
    params = dict(model.named_parameters())
    for name, _ in compressible_layers(dense):
        w = params[f"{name}.weight"].detach()
        key = name.replace(".", ":") + ":weight__0"
        if key in post:
            for h in post[key].values():
                w = h(w)
        for k, hs in pre.items():
            if k.startswith(name.replace(".", "/") + "/") and k.endswith("__1"):  # port 1: the weight
                for h in hs.values():
                    w = h(w)
                    wbits.add(int(h.num_bits))
                    weight_q.add(id(h))
        out[name] = w.detach()
    for m in hooks.modules():
        if hasattr(m, "num_bits") and id(m) not in weight_q and not isinstance(m, nn.ModuleDict):
            abits.add(int(m.num_bits))
    return out, wbits, abits


def nncf_run(dense: nn.Module, task: Task, recipe: Recipe, sparsity: float) -> dict[str, Any]:
    """NNCF 3.x: nncf.prune (global magnitude, exponential schedule) + fine-tune, nncf.quantize + QAT."""
    import nncf
    from nncf.torch.function_hook.pruning.magnitude.schedulers import ExponentialMagnitudePruningScheduler

    mode = nncf.PruneMode.UNSTRUCTURED_MAGNITUDE_GLOBAL
    model = copy.deepcopy(dense)
    ex = task.example_inputs()
    t0 = time.perf_counter()
    model = nncf.prune(model, mode=mode, ratio=0.0, examples_inputs=ex if len(ex) > 1 else ex[0])
    spec = recipe.prune
    steps = spec.finetune.steps
    t_begin, t_end = int(spec.begin * steps), max(int(spec.end * steps), int(spec.begin * steps) + 1)
    n_updates = max(1, (t_end - t_begin) // spec.frequency)
    sched = ExponentialMagnitudePruningScheduler(model, mode=mode, initial_ratio=0.0, target_ratio=sparsity,
                                                 target_epoch=n_updates)  # fmt: skip

    def after_step(t: int) -> None:
        if t_begin <= t < t_end and (t - t_begin) % spec.frequency == 0:
            sched.step()

    fit(model, task, spec.finetune, batch_size=recipe.task.batch_size, seed=recipe.seed + 1, stage="nncf-prune",
        after_step=after_step, quiet=True)  # fmt: skip
    sched.step(n_updates)  # the target ratio, whatever the schedule reached
    pruned_w, _, _ = nncf_effective(model, dense)
    pruned_metric = task.evaluate(model)["metric"]
    t1 = time.perf_counter()
    calib = quant_calibration_batches(task, recipe)
    n_in = len(ex)
    data = nncf.Dataset(calib, lambda b: b[0] if n_in == 1 else tuple(b[:n_in]))
    model = nncf.quantize(model, data, subset_size=len(calib) * recipe.task.batch_size)
    ptq_w, _, _ = nncf_effective(model, dense)
    ptq_metric = task.evaluate(model)["metric"]
    fit(model, task, recipe.quant.finetune, batch_size=recipe.task.batch_size, seed=recipe.seed + 2, stage="nncf-qat",
        quiet=True)  # fmt: skip
    weights, wbits, abits = nncf_effective(model, dense)
    return {"model": model, "weights": weights, "pruned_weights": pruned_w, "ptq_weights": ptq_w,
            "pruned_metric": pruned_metric, "ptq_metric": ptq_metric, "weight_bits": wbits, "act_bits": abits,
            "prune_s": t1 - t0, "quant_s": time.perf_counter() - t1}  # fmt: skip


# ---------------------------------------------------------------------------------------------- Torch-Pruning
def tp_prune(model: nn.Module, task: Task, ratio: float, ignore: list[str]) -> nn.Module:
    """Torch-Pruning's MagnitudePruner (L2 groups, the same ratio in every layer) on ``model`` in place."""
    import torch_pruning as tp

    ex = task.example_inputs()
    ignored = [model.get_submodule(n) for n in ignore]
    pruner = tp.pruner.MagnitudePruner(model, ex if len(ex) > 1 else ex[0], importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=ratio, ignored_layers=ignored, global_pruning=False)  # fmt: skip
    pruner.step()
    return model


def tp_ratio_for(dense: nn.Module, task: Task, mac_fraction: float, ignore: list[str]) -> tuple[float, float]:
    """The smallest channel ratio whose pruned model keeps at most ``mac_fraction`` of the dense MACs, and
    that fraction; the ratio with the fewest MACs when none gets there.

    Not monotonic near 1: Torch-Pruning leaves a layer whole when the ratio would remove all its channels
    (StereoNet at 0.98 keeps 86 % of its MACs), so a coarse scan (steps of 0.05) finds the first ratio under
    the target and a bisection refines it between that one and the scan's previous one.
    """
    ex = task.example_inputs()
    base = sum(C.count_macs(dense, ex).values())

    def frac(r: float) -> float:
        return sum(C.count_macs(tp_prune(copy.deepcopy(dense), task, r, ignore), ex).values()) / base

    scan = [(r / 100, frac(r / 100)) for r in range(5, 100, 5)]
    hits = [i for i, (_, f) in enumerate(scan) if f <= mac_fraction]
    if not hits:
        return min(scan, key=lambda rf: rf[1])
    i = hits[0]
    lo, hi, f_hi = (scan[i - 1][0] if i else 0.0), scan[i][0], scan[i][1]
    for _ in range(8):
        mid = (lo + hi) / 2
        f = frac(mid)
        if f > mac_fraction:
            lo = mid
        else:
            hi, f_hi = mid, f
    return hi, f_hi


def tp_run(dense: nn.Module, task: Task, recipe: Recipe, bops_ratio: float, wb: int, ab: int,
           ignore: list[str]) -> dict[str, Any]:  # fmt: skip
    """Channel pruning to prunq's BOPs (at the same bit-widths), fine-tuning, then PlainQAT."""
    t0 = time.perf_counter()
    mac_target = bops_ratio * 32 * 32 / (wb * ab)
    ratio, frac = tp_ratio_for(dense, task, mac_target, ignore)
    model = tp_prune(copy.deepcopy(dense), task, ratio, ignore)
    fit(model, task, recipe.prune.finetune, batch_size=recipe.task.batch_size, seed=recipe.seed + 1, stage="tp",
        quiet=True)  # fmt: skip
    pruned_metric = task.evaluate(model)["metric"]
    t1 = time.perf_counter()
    qmodel, qat = plain_qat(model, task, recipe, wb, ab)
    return {"arch": plain_copy(qmodel), "model": qmodel, "weights": qat.effective_weights(), "ratio": ratio,
            "mac_fraction": frac, "mac_target": mac_target, "pruned_metric": pruned_metric, "prune_s": t1 - t0,
            "quant_s": time.perf_counter() - t1}  # fmt: skip


# ---------------------------------------------------------------------------------------------- Brevitas
def _input_nonneg(model: nn.Module, task: Task, batches: list) -> dict[str, bool]:
    """Whether each compressible layer's input was non-negative on ``batches`` (to pick unsigned inputs)."""
    seen: dict[str, bool] = {}
    handles = []
    for name, m in compressible_layers(model):
        def hook(_m, args, name=name):
            seen[name] = seen.get(name, True) and bool(args[0].min() >= 0)
        handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        was = model.training
        model.eval()
        for b in batches:
            model(*model_inputs(task, b))
        model.train(was)
    for h in handles:
        h.remove()
    return seen


def brevitas_qat(pruned: nn.Module, task: Task, recipe: Recipe, wb: int, ab: int) -> dict[str, Any]:
    """Brevitas QAT of a torch.nn.utils.prune model: each layer swapped for its Brevitas twin
    (``Int8WeightPerChannelFloat`` at ``wb`` bits, ``(U)Int8ActPerTensorFloat`` inputs at ``ab`` bits), the
    pruning mask re-attached with ``prune.custom_from_mask`` so pruned weights stay zero."""
    from brevitas import nn as qnn
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Uint8ActPerTensorFloat

    t0 = time.perf_counter()
    model = copy.deepcopy(pruned)
    spec = recipe.quant
    calib = quant_calibration_batches(task, recipe)
    nonneg = _input_nonneg(model, task, calib)
    twins: dict[type, Callable] = {nn.Conv2d: qnn.QuantConv2d, nn.ConvTranspose2d: qnn.QuantConvTranspose2d,
                                   nn.Linear: qnn.QuantLinear, nn.Conv1d: qnn.QuantConv1d}  # fmt: skip
    swapped = []
    for name, m in list(compressible_layers(model)):
        mask = m.weight_mask.clone() if prune.is_pruned(m) else torch.ones_like(m.weight)
        if prune.is_pruned(m):
            prune.remove(m, "weight")
        kind = twins[type(m)]
        common = dict(bias=m.bias is not None, weight_quant=Int8WeightPerChannelFloat, weight_bit_width=wb,
                      input_quant=Uint8ActPerTensorFloat if nonneg.get(name, False) else Int8ActPerTensorFloat,
                      input_bit_width=ab, return_quant_tensor=False)  # fmt: skip
        if isinstance(m, nn.Linear):
            q = kind(m.in_features, m.out_features, **common)
        else:
            extra = {"output_padding": m.output_padding} if _is_transposed(m) else {}
            q = kind(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                     dilation=m.dilation, groups=m.groups, **extra, **common)  # fmt: skip
        with torch.no_grad():
            q.weight.copy_(m.weight)
            if m.bias is not None:
                q.bias.copy_(m.bias)
        prune.custom_from_mask(q, "weight", mask)
        model.set_submodule(name, q)
        swapped.append((name, q))
    model.eval()
    with torch.no_grad(), calibration_mode(model):
        for b in calib:
            model(*model_inputs(task, b))
    fit(model, task, spec.finetune, batch_size=recipe.task.batch_size, seed=recipe.seed + 2, stage="brevitas",
        quiet=True)  # fmt: skip
    model.eval()
    with torch.no_grad():
        model(*task.example_inputs())  # prune's hooks set each layer's masked weight
        weights = {n: q.quant_weight().value.detach().clone() for n, q in swapped}
    return {"model": model, "weights": weights, "quant_s": time.perf_counter() - t0}
