"""Quantization for stage 2: weight / activation fake-quantizers, BatchNorm folding, prepare & calibrate.

Typical use (masks attached first, so ``W_eff = Q(mask * W)``)::

    fold_bn_(model, find_conv_bn_pairs(model))
    prepare(model, QuantConfig(weight_bits=4, act_bits=8))
    calibrate(model, batches)
    ...  # quantization-aware fine-tuning
"""

from prunq.quant.act import ActQuantizer
from prunq.quant.fold import find_conv_bn_pairs, fold_bn_
from prunq.quant.prepare import (
    LayerBits,
    QuantConfig,
    bits_for,
    calibrate,
    convert,
    converted_layers,
    prepare,
    prepare_layers,
    quant_plan,
    quantizer_modules,
    unprepare,
)
from prunq.quant.primitives import fake_quant, grad_scale, pow2_ste, qrange, round_ste
from prunq.quant.weight import WeightQuantizer

__all__ = [
    "ActQuantizer",
    "QuantConfig",
    "WeightQuantizer",
    "bits_for",
    "calibrate",
    "convert",
    "fake_quant",
    "find_conv_bn_pairs",
    "fold_bn_",
    "grad_scale",
    "LayerBits",
    "converted_layers",
    "prepare_layers",
    "quant_plan",
    "pow2_ste",
    "prepare",
    "qrange",
    "quantizer_modules",
    "round_ste",
    "unprepare",
]
