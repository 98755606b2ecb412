"""Shared (tied) weights: which modules use the same Parameter object.

A language model ties its input embedding to its output head (``head.weight = embed.weight``); a
siamese network reuses one conv for two inputs through two module objects. Compressing such a tensor
per module would zero it twice with different masks (a tied embedding loses its table) and count its
weights twice. Detecting the sharing lets the pruner compress the tensor once and give every user the
same mask.

>>> from torch import nn
>>> embed, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
>>> head.weight = embed.weight
>>> model = nn.ModuleDict({"embed": embed, "head": head})
>>> [[name for name, _ in users] for users in shared_weight_users(model).values()]
[['embed', 'head']]
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

_ORIGINAL = ".parametrizations.weight.original"


def stored_weight(module: nn.Module) -> nn.Parameter | None:
    """The Parameter ``module`` stores as ``weight`` (behind its parametrizations, if any), or None."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    w = module._parameters.get("weight")
    return w if isinstance(w, nn.Parameter) else None


def shared_weight_users(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """``id(Parameter) -> [(name, module), ...]`` for every Parameter that two or more modules of
    ``model`` store as their ``weight`` (parametrized or not), users in ``named_modules`` order."""
    users: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        w = stored_weight(mod)
        if w is not None:
            entry = users.setdefault(id(w), [])
            if all(m is not mod for _, m in entry):  # one module reachable by two names counts once
                entry.append((name, mod))
    return {k: v for k, v in users.items() if len(v) > 1}


def parameter_holders(model: nn.Module) -> dict[int, list[str]]:
    """``id(Parameter) -> qualified names`` under which ``model`` holds it, every alias included.

    A parametrized weight is named by its module (``"head.weight"``, not ``"head.parametrizations.
    weight.original"``), so a name ending in ``.weight`` means "stored as a module's weight".
    """
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.endswith(_ORIGINAL):
            name = name[: -len(_ORIGINAL)] + ".weight"
        elif name == _ORIGINAL[1:]:
            name = "weight"
        out.setdefault(id(p), []).append(name)
    return out


__all__ = ["parameter_holders", "shared_weight_users", "stored_weight"]
