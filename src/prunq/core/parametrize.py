"""Safe removal of parametrizations from a module that may share its class with a copy.

torch gives a parametrized module a dynamically created class (``ParametrizedLinear``) that holds the
property of each parametrized tensor. ``copy.deepcopy`` keeps that class *shared* between the original
and the copy, and ``remove_parametrizations`` deletes the property from the class — so converting a copy
broke the original (its ``weight`` attribute vanished). Give the module a class of its own first.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

_SKIP = ("__dict__", "__weakref__")


def own_class(module: nn.Module) -> None:
    """Give a parametrized ``module`` a private copy of its parametrized class (a no-op otherwise)."""
    if not parametrize.is_parametrized(module):
        return
    cls = module.__class__
    body = {k: v for k, v in cls.__dict__.items() if k not in _SKIP}
    module.__class__ = type(cls.__name__, cls.__bases__, body)


def remove(module: nn.Module, name: str = "weight", *, leave_parametrized: bool = True) -> None:
    """``parametrize.remove_parametrizations`` that leaves every other module (copies included) intact."""
    own_class(module)
    parametrize.remove_parametrizations(module, name, leave_parametrized=leave_parametrized)
