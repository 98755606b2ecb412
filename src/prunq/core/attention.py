"""Multi-head attention whose four projections are ordinary ``nn.Linear`` layers.

``nn.MultiheadAttention`` keeps its q/k/v projections in one bare ``in_proj_weight`` Parameter and never
calls ``out_proj.forward`` (it passes ``out_proj.weight`` to a functional kernel). prunq finds layers by
type and acts through their weight parametrizations and forward hooks, so on a stock attention block the
input projections were never pruned, quantized or counted, and the output projection's hooks never fired
(calibration failed, MACs were 0). :class:`DecomposedAttention` computes exactly the same function with
``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as child Linears; :func:`decompose_attention_` swaps it
into a model, e.g. inside torch's own ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``.

>>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
>>> att = DecomposedAttention.from_mha(mha)
>>> x = torch.randn(3, 5, 8)
>>> bool(torch.allclose(att(x, x, x)[0], mha(x, x, x)[0], atol=1e-6))
True
>>> [n for n, m in att.named_children()]
['q_proj', 'k_proj', 'v_proj', 'out_proj']

Decompose *before* attaching masks or quantizers (``from_mha`` refuses a parametrized attention).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from prunq.core.errors import PrunqError
from prunq.core.layers import stored_weight
from prunq.core.manifest import register_transform

__all__ = ["DecomposedAttention", "decompose_attention_"]

#: Constructor arguments of ``nn.MultiheadAttention`` that :meth:`DecomposedAttention.like` accepts.
_KWARGS = (
    "embed_dim",
    "num_heads",
    "dropout",
    "bias",
    "add_bias_kv",
    "add_zero_attn",
    "kdim",
    "vdim",
    "batch_first",
    "device",
    "dtype",
)


def _float_mask(mask: torch.Tensor | None, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = do not attend) as an additive float mask, like ``F._canonical_mask``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise ValueError(f"only bool and floating types of {name} are supported, got {mask.dtype}")
    return mask


class DecomposedAttention(nn.Module):
    """Drop-in ``nn.MultiheadAttention`` with separate ``q_proj``/``k_proj``/``v_proj``/``out_proj`` Linears.

    Same constructor, forward signature, outputs (``(attn_output, attn_weights or None)``), dropout on the
    attention weights in training, masks (``attn_mask``, ``key_padding_mask``, ``is_causal``), unbatched
    inputs, ``batch_first`` and ``kdim``/``vdim``. ``add_bias_kv`` and ``add_zero_attn`` are refused: they
    add keys that are no layer's output, which prunq could neither prune nor count.

    The class attributes below are what torch's fused fast paths read (``TransformerEncoder``,
    ``TransformerEncoderLayer``): there is no packed projection (``in_proj_weight is None``,
    ``_qkv_same_embed_dim`` False), so those layers take their ordinary path, which calls this module.
    """

    in_proj_weight: None = None
    in_proj_bias: None = None
    bias_k: None = None
    bias_v: None = None
    add_zero_attn: bool = False
    _qkv_same_embed_dim: bool = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if add_bias_kv or add_zero_attn:
            raise PrunqError(
                "DecomposedAttention: add_bias_kv and add_zero_attn are not supported "
                "(their extra key/value is no layer's output, so prunq could not prune, quantize or count it)"
            )
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise PrunqError(
                f"DecomposedAttention: embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})"
            )
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        f: dict[str, Any] = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **f)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **f)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **f)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **f)
        self._reset_parameters()

    @torch.no_grad()
    def _reset_parameters(self) -> None:
        # As nn.MultiheadAttention: Xavier-uniform over the *packed* (3E, E) matrix when kdim = vdim = E
        # (the fan differs from three separate Xavier draws), zero biases, default init for out_proj.weight.
        ins = (self.q_proj, self.k_proj, self.v_proj)
        if self.kdim == self.embed_dim and self.vdim == self.embed_dim:
            w = torch.empty(3 * self.embed_dim, self.embed_dim, device=self.q_proj.weight.device)
            nn.init.xavier_uniform_(w)
            for lin, part in zip(ins, w.chunk(3)):
                lin.weight.copy_(part)
        else:
            for lin in ins:
                nn.init.xavier_uniform_(lin.weight)
        for lin in (*ins, self.out_proj):
            if lin.bias is not None:
                lin.bias.zero_()

    # ----------------------------------------------------------------------------------------------
    # Construction from / to nn.MultiheadAttention
    # ----------------------------------------------------------------------------------------------

    @classmethod
    def like(cls, src: nn.MultiheadAttention | DecomposedAttention | Mapping[str, Any]) -> DecomposedAttention:
        """The same structure as ``src`` (an attention module or its constructor kwargs), fresh weights.

        For loading a saved ``state_dict``: ``DecomposedAttention.like(mha).load_state_dict(sd)``.
        """
        if isinstance(src, Mapping):
            unknown = sorted(set(src) - set(_KWARGS))
            if unknown:
                raise PrunqError(f"DecomposedAttention.like: unknown arguments {unknown}; expected some of {_KWARGS}")
            return cls(**src)
        if not isinstance(src, (nn.MultiheadAttention, DecomposedAttention)):
            raise PrunqError(
                f"DecomposedAttention.like: expected an nn.MultiheadAttention, a DecomposedAttention or a dict "
                f"of constructor arguments, got {type(src).__name__}"
            )
        w = stored_weight(src.out_proj)
        return cls(
            src.embed_dim,
            src.num_heads,
            dropout=src.dropout,
            bias=src.out_proj.bias is not None,
            add_bias_kv=src.bias_k is not None,
            add_zero_attn=bool(src.add_zero_attn),
            kdim=src.kdim,
            vdim=src.vdim,
            batch_first=src.batch_first,
            device=w.device,
            dtype=w.dtype,
        )

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> DecomposedAttention:
        """An exact copy of ``mha`` (weights, ``requires_grad`` flags and train/eval mode)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise PrunqError(f"DecomposedAttention.from_mha: expected nn.MultiheadAttention, got {type(mha).__name__}")
        if any(parametrize.is_parametrized(m) for m in mha.modules()):
            raise PrunqError(
                "DecomposedAttention.from_mha: the attention already has parametrizations (masks or quantizers); "
                "decompose attention before attaching them"
            )
        new = cls.like(mha)
        # (destination, value, the Parameter it comes from -- for its requires_grad flag)
        copies: list[tuple[nn.Parameter | None, torch.Tensor | None, nn.Parameter | None]] = [
            (new.out_proj.weight, mha.out_proj.weight, mha.out_proj.weight),
            (new.out_proj.bias, mha.out_proj.bias, mha.out_proj.bias),
        ]
        ins = (new.q_proj, new.k_proj, new.v_proj)
        if mha._qkv_same_embed_dim:
            copies += [(lin.weight, w, mha.in_proj_weight) for lin, w in zip(ins, mha.in_proj_weight.chunk(3))]
        else:
            separate = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            copies += [(lin.weight, w, w) for lin, w in zip(ins, separate)]
        if mha.in_proj_bias is not None:
            copies += [(lin.bias, b, mha.in_proj_bias) for lin, b in zip(ins, mha.in_proj_bias.chunk(3))]
        with torch.no_grad():
            for dst, value, origin in copies:
                if dst is not None and value is not None and origin is not None:
                    dst.copy_(value)
                    dst.requires_grad_(origin.requires_grad)
        return new.train(mha.training)

    def to_mha(self) -> nn.MultiheadAttention:
        """An ``nn.MultiheadAttention`` computing the same function (effective weights: masks and
        quantizers baked in), e.g. for export to runtimes that fuse attention."""
        if self.num_heads * self.head_dim != self.embed_dim:
            raise PrunqError(
                f"DecomposedAttention.to_mha: {self.embed_dim // self.head_dim - self.num_heads} heads were removed "
                "(prunq.remove_channels); nn.MultiheadAttention cannot express fewer heads than embed_dim / head_dim"
            )
        w = stored_weight(self.out_proj)
        mha = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            dropout=self.dropout,
            bias=self.out_proj.bias is not None,
            kdim=self.kdim,
            vdim=self.vdim,
            batch_first=self.batch_first,
            device=w.device,
            dtype=w.dtype,
        )
        ins = (self.q_proj, self.k_proj, self.v_proj)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                mha.in_proj_weight.copy_(torch.cat([lin.weight for lin in ins]))
            else:
                for lin, dst in zip(ins, (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)):
                    dst.copy_(lin.weight)
            if mha.in_proj_bias is not None:
                mha.in_proj_bias.copy_(torch.cat([lin.bias for lin in ins]))
                mha.out_proj.bias.copy_(self.out_proj.bias)
            mha.out_proj.weight.copy_(self.out_proj.weight)
        return mha.train(self.training)

    # ----------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        return x.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward`` (same arguments, shapes and outputs)."""
        if query.is_nested or key.is_nested or value.is_nested:
            raise PrunqError(
                "DecomposedAttention: nested-tensor inputs are not supported; set use_nested_tensor = False on "
                "the enclosing nn.TransformerEncoder (decompose_attention_ does)"
            )
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                "DecomposedAttention: query, key and value must all be 2-D (unbatched) or all 3-D (batched), "
                f"got {query.dim()}-D, {key.dim()}-D and {value.dim()}-D"
            )
        kpm = _float_mask(key_padding_mask, "key_padding_mask", query.dtype)
        mask = _float_mask(attn_mask, "attn_mask", query.dtype)
        if is_causal and mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        # As MHA: the causal hint replaces the mask only when nothing else needs the explicit mask.
        causal = is_causal and kpm is None and not need_weights
        if causal:
            mask = None

        # Work batch-first: (N, L, E).
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if kpm is not None:
                kpm = kpm.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt_len, _ = query.shape
        src_len = key.shape[1]
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"DecomposedAttention: key {tuple(key.shape)} and value {tuple(value.shape)} differ")

        q = self._split_heads(self.q_proj(query))
        k = self._split_heads(self.k_proj(key))
        v = self._split_heads(self.v_proj(value))

        if mask is not None:
            if mask.dim() == 2:
                if mask.shape != (tgt_len, src_len):
                    want = (tgt_len, src_len)
                    raise RuntimeError(f"The shape of the 2D attn_mask is {mask.shape}, should be {want}.")
                mask = mask.view(1, 1, tgt_len, src_len)
            elif mask.dim() == 3:
                want = (n * self.num_heads, tgt_len, src_len)
                if mask.shape != want:
                    raise RuntimeError(f"The shape of the 3D attn_mask is {mask.shape}, should be {want}.")
                mask = mask.view(n, self.num_heads, tgt_len, src_len)
            else:
                raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported")
        if kpm is not None:
            if kpm.shape != (n, src_len):
                raise RuntimeError(f"key_padding_mask has shape {tuple(kpm.shape)}, expected {(n, src_len)}")
            kpm = kpm.view(n, 1, 1, src_len)
            mask = kpm if mask is None else mask + kpm
        dropout_p = self.dropout if self.training else 0.0

        weights: torch.Tensor | None = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / self.head_dim)) @ k.transpose(-2, -1)
            if mask is not None:
                scores = mask + scores
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt_len, self.num_heads * self.head_dim))

        if not batched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def matmul_macs(self, query: torch.Tensor, key: torch.Tensor) -> int:
        """Activation x activation multiply-accumulates of one forward on these inputs, whole batch.

        ``Q K^T`` and ``A V`` each cost ``N * heads * L * S * head_dim = N * L * S * embed_dim``
        (METHOD.md §4 "activation x activation products"; dense: a causal mask is not subtracted).
        """
        if query.dim() == 2:
            n, tgt_len, src_len = 1, query.shape[0], key.shape[0]
        elif self.batch_first:
            n, tgt_len, src_len = query.shape[0], query.shape[1], key.shape[1]
        else:
            n, tgt_len, src_len = query.shape[1], query.shape[0], key.shape[0]
        return 2 * n * tgt_len * src_len * self.embed_dim

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        return s


def decompose_attention_(model: nn.Module) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` inside ``model`` by its exact :class:`DecomposedAttention`.

    Returns the qualified names swapped (every path, for an attention registered at several). A module
    shared between places stays shared. ``nn.TransformerEncoder``\\ s holding a decomposed attention get
    ``use_nested_tensor = False``: their padded-batch fast path hands nested tensors to the layers.

    >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2), 2, enable_nested_tensor=False)
    >>> decompose_attention_(enc)
    ['layers.0.self_attn', 'layers.1.self_attn']
    """
    if isinstance(model, nn.MultiheadAttention):
        raise PrunqError("decompose_attention_: the model is itself an attention; use DecomposedAttention.from_mha")
    found = [
        (parent, child_name, f"{prefix}.{child_name}" if prefix else child_name, child)
        for prefix, parent in model.named_modules(remove_duplicate=False)
        for child_name, child in parent.named_children()
        if isinstance(child, nn.MultiheadAttention)
    ]
    made: dict[int, DecomposedAttention] = {}
    for parent, child_name, _, child in found:
        if id(child) not in made:
            made[id(child)] = DecomposedAttention.from_mha(child)
        setattr(parent, child_name, made[id(child)])
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
            isinstance(getattr(layer, "self_attn", None), DecomposedAttention) for layer in m.layers
        ):
            m.use_nested_tensor = False
    return [qualified for _, _, qualified, _ in found]


@register_transform("decompose_attention")
def _replay_decompose(model: nn.Module, entry: dict[str, Any]) -> None:
    """``prunq.load``: decompose the fresh model's attention the same way before its state dict loads."""
    got = decompose_attention_(model)
    if sorted(got) != sorted(entry["layers"]):
        raise ValueError(f"the model's attention layers {got} differ from the recorded {entry['layers']}")
