"""Int8 weights for the LM's decoder and output heads (inference).

``quantize_lm(lm, mode)`` replaces, in place, every linear layer of every ``DecoderLayer`` (self- and
cross-attention q/k/v/out projections, fc1, fc2) and the K output heads by ``Int8Linear``: int8 codes with one fp32
scale per output channel (``mmdgen.kernels.int8_linear``). The code embeddings, the text projection and the layer
norms stay float. A decode step reads every weight once, so it reads a quarter of the bytes of fp32.

Modes (``mmdgen.kernels.int8_linear.MODES``): ``"int8"``, weight-only (the result of the dequantised weight to fp32
accuracy); ``"int8-dynamic"``, on CPU each row of activations is also rounded to int8, to its own step, and the
products run on int8 dot-product instructions (faster there at batch 8 and more, less accurate; a row's result
does not depend on the batch's other rows). On CUDA both run the same Triton kernel. The mode is recorded as
``lm.quantization`` for the model's config (a float model has no such attribute: ``getattr(lm, "quantization",
None)``); it is not part of the state dict, which holds the codes and scales as ``<layer>.qweight`` (int8) and
``<layer>.scale`` (fp32), so that ``quantize_lm(MusicLM(cfg), mode)`` followed by ``load_state_dict`` restores a
saved quantized model exactly without quantising again.

Inference only: ``Int8Linear`` has no parameters and ``int8_linear`` no gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from mmdgen.kernels.int8_linear import MODES, int8_linear, quantize_weight
from mmdgen.model.lm import MusicLM

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
MAX_SCALE = torch.finfo(torch.float32).max / 127  # the scale of a row whose largest weight is fp32's largest


class Int8Linear(nn.Module):
    """``y = (x @ qweight.T) * scale + bias`` over int8 codes ``qweight`` ``[out, in]`` and fp32 ``scale``
    ``[out]`` (buffers, saved in the state dict); ``bias`` ``[out]`` float or None."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, mode: str = "int8",
                 device: torch.device | str | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Int8Linear: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, mode: str = "int8") -> "Int8Linear":
        """The int8 version of ``linear`` (symmetric per output channel; the bias is kept as it is). A linear on
        the meta device gives an empty one on the meta device: the shape of a saved int8 model to load into."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, mode, linear.weight.device)
        if linear.weight.is_meta:
            return module
        module.qweight, module.scale = quantize_weight(linear.weight)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight ``[out, in]`` in the scale's dtype, built on each access: for code that reads a
        linear's weight (its device or dtype, ``MusicLM.head_weights``). The forward never builds it."""
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.scale, self.bias, mode=self.mode)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        scale = state_dict.get(prefix + "scale")
        if isinstance(scale, torch.Tensor) and scale.is_floating_point():
            valid = (scale > 0) & (scale <= MAX_SCALE)
            if not bool(valid.all()):
                error_msgs.append(f"{prefix}scale holds {int((~valid).sum())} values outside (0, {MAX_SCALE:.3g}] "
                                  "(zero, negative, NaN or past any finite fp32 weight / 127); expected the "
                                  "per-channel scales quantize_weight makes")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode}")


@torch.no_grad()
def quantize_lm(lm: MusicLM, mode: str = "int8") -> MusicLM:
    """Replace the decoder's and the heads' linear layers of ``lm`` by ``Int8Linear`` in place; return ``lm``
    with ``lm.quantization = mode``."""
    if mode not in MODES:
        raise ValueError(f"quantize_lm: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if getattr(lm, "quantization", None) is not None:
        raise ValueError(f"quantize_lm: the LM is already quantized (mode {lm.quantization!r}); expected a float LM")
    for layer in lm.layers:
        for attention in (layer.self_attn, layer.cross_attn):
            if attention is None:  # a prefix LM (MusicGen-melody) has no cross-attention
                continue
            for name in ATTENTION_PROJECTIONS:
                setattr(attention, name, Int8Linear.from_linear(getattr(attention, name), mode))
        layer.fc1 = Int8Linear.from_linear(layer.fc1, mode)
        layer.fc2 = Int8Linear.from_linear(layer.fc2, mode)
    for index, head in enumerate(lm.heads):
        lm.heads[index] = Int8Linear.from_linear(head, mode)
    lm.quantization = mode
    return lm
