"""The compression methods, one module each; importing this package registers them.

A method is a config class (:class:`prunq.core.config.MethodConfig`), a class with the hooks of
:class:`prunq.core.method.Method`, and one ``@register_method(Config)`` line. The replay functions of the
transforms a method records are registered beside it (``@register_transform``).
"""

import prunq.core.attention  # noqa: F401  (the decompose_attention transform)
from prunq.methods.prune import PruneMethod
from prunq.methods.quantize import QuantizeMethod

__all__ = ["PruneMethod", "QuantizeMethod"]
