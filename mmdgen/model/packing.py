"""The LM's per-step linear layers over oneDNN's packed weights on CPU (inference; ``mmdgen.kernels.packed_linear``).

``pack_lm(lm)`` replaces, in place, the linear layers a decode step reads every weight of by ``PackedLinear``:
each ``DecoderLayer``'s self-attention q/k/v/out, cross-attention q/out (a cross-conditioned LM), fc1 and fc2,
and the K output heads. The cross-attention k/v projections (applied to the text once per generation), the
embeddings, the text and melody projections and the norms stay as they are. Each dense weight is dropped as its
packed copy is made (unless the caller holds it elsewhere), so the model never holds both.

The state dict is unchanged (``PackedLinear`` saves its weight unpacked, exactly, and packs what it loads), so a
packed LM saves, exports and loads as the plain one. ``unpack_lm(lm)`` puts plain ``nn.Linear`` layers back
(new parameters with the exact weights), e.g. before training or moving the model off the CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from mmdgen.kernels.packed_linear import PackedLinear, packing_unavailable_reason
from mmdgen.model.lm import MusicLM

SELF_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
CROSS_ATTENTION_PROJECTIONS = ("q_proj", "out_proj")  # k/v run once per prompt, on the text


def _step_linears(lm: MusicLM) -> list[tuple[nn.Module, str]]:
    """(owner, attribute name) of every linear layer ``pack_lm`` packs."""
    places = []
    for layer in lm.layers:
        places += [(layer.self_attn, name) for name in SELF_ATTENTION_PROJECTIONS]
        if layer.cross_attn is not None:
            places += [(layer.cross_attn, name) for name in CROSS_ATTENTION_PROJECTIONS]
        places += [(layer, "fc1"), (layer, "fc2")]
    return places + [(lm.heads, str(index)) for index in range(len(lm.heads))]


def packing_unavailable_for(lm: MusicLM) -> str | None:
    """Why ``pack_lm`` cannot pack ``lm``, or None when it can."""
    quantization = getattr(lm, "quantization", None)
    if quantization is not None:
        return f"its weights are {quantization}"
    return packing_unavailable_reason(lm.device, lm.dtype)


@torch.no_grad()
def pack_lm(lm: MusicLM) -> MusicLM:
    """Replace the per-step linear layers of ``lm`` (see the module docstring) by ``PackedLinear`` in place; the
    ones already packed stay. Return ``lm``; ValueError where it cannot be packed (``packing_unavailable_for``)."""
    reason = packing_unavailable_for(lm)
    if reason is not None:
        raise ValueError(f"pack_lm: the LM cannot be packed: {reason}; expected a float32 or bfloat16 LM on a CPU "
                         "with oneDNN")
    for owner, name in _step_linears(lm):
        linear = getattr(owner, name)
        if not isinstance(linear, PackedLinear):
            setattr(owner, name, PackedLinear.from_linear(linear))
    return lm


@torch.no_grad()
def unpack_lm(lm: MusicLM) -> MusicLM:
    """Put plain ``nn.Linear`` layers back in place of every ``PackedLinear`` of ``lm``; return ``lm``."""
    for owner, name in _step_linears(lm):
        linear = getattr(owner, name)
        if isinstance(linear, PackedLinear):
            setattr(owner, name, linear.to_linear())
    return lm
