"""Linear layers over oneDNN's prepacked weights on CPU: ``y = x @ weight.T + bias`` for the decode loop.

Why: a decode step multiplies a few rows (batch 1 with guidance: 2; batch 8: 16) by every weight of the LM once,
so it is bound by the bytes of weight it reads. ``F.linear`` in fp32 on CPU runs MKL's GEMV/GEMM on the plain
``[N, K]`` weight, which streamed weights at about a quarter of the copy bandwidth on an AMD EPYC (Zen 5); oneDNN's
inner product over a weight reordered once into its blocked layout streamed them at about 0.9 of it (the lead's
measurement, 2 to 16 rows, weights cold in cache: 0.4-0.5 ms against 1.4-1.7 ms per 1024 x 4096 weight).

Shapes and dtypes. ``pack_weight(weight)``: ``weight`` ``[N, K]`` fp32 or bf16 (CPU) -> the packed weight, an
opaque oneDNN tensor (layout ``torch._mkldnn``) of the same shape, dtype and bytes. ``packed_linear(x, packed,
bias)``: ``x`` ``[..., K]`` in the packed weight's dtype, ``bias`` ``[N]`` in that dtype or None -> ``[..., N]``
in x's dtype, any number of rows (0 included). bf16 only where oneDNN runs it
(``torch.ops.mkldnn._is_mkldnn_bf16_supported()``). ``unpack_weight(packed)``: the plain ``[N, K]`` weight,
bit for bit (oneDNN's reorder back to the plain layout moves values, it does no arithmetic).

The product: ``torch.ops.mkldnn._linear_pointwise`` (fp32 accumulation; the result differs from ``F.linear``'s
by fp32 rounding, the order of the sums being oneDNN's). The weight is packed for ``ROWS_HINT`` rows: packed for
2 or 16 rows (or no hint), 2 and 16 rows ran equally fast; packed for 1 row, both ran slower; so one packing
serves every batch and is never redone.

``torch.compile``: inductor lowers ``_linear_pointwise`` only for a weight it folds as a constant (its own
freezing pass), not for a graph input. The call therefore goes through the op ``mmdgen::packed_linear``, declared
with ``torch.library`` and implemented for every backend key (the packed weight's dispatch key is ``MkldnnCPU``,
not ``CPU``), with a fake implementation: the compiled graph calls it as an opaque kernel and takes the packed
weight as an input. A plain ``Library.impl`` is used rather than ``torch.library.custom_op``, whose Python
wrapper added about 3 us per call (measured on small shapes; oneDNN's own per-call cost is about 10 us there).

Memory: ``PackedLinear`` holds the packed weight only (``N * K`` elements, as the plain weight), never the plain
one beside it. Its ``weight`` property and its state dict unpack a plain copy on each access (the state dict
holds ``weight`` and ``bias`` exactly as ``nn.Linear``'s, so a packed model saves and exports as an unpacked one,
and ``load_state_dict`` packs what it loads). No gradient (inference only).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

PACKED_DTYPES = (torch.float32, torch.bfloat16)
ROWS_HINT = 2  # the row count oneDNN packs for; 2..16 rows ran the same on it, 1 row slower (see above)

_LIBRARY = torch.library.Library("mmdgen", "FRAGMENT")
_LIBRARY.define("packed_linear(Tensor x, Tensor packed, Tensor? bias) -> Tensor")


def _onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise.default(x, packed, bias, "none", [], "")


_LIBRARY.impl("packed_linear", _onednn_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("mmdgen::packed_linear", lib=_LIBRARY)
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0])


# ----------------------------------------------------------------------------------------------
# Where it runs
# ----------------------------------------------------------------------------------------------


def packing_unavailable_reason(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why a weight on ``device`` in ``dtype`` cannot be packed, or None when it can."""
    device = torch.device(device)
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    if device.type != "cpu":
        return f"oneDNN's packed weights are CPU tensors, the weight is on {device}"
    if dtype not in PACKED_DTYPES:
        return f"packed weights are float32 or bfloat16, the weight is {dtype}"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "oneDNN does not run bfloat16 on this CPU"
    return None


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        layout = "" if t.layout == torch.strided else f" {t.layout}"
        return f"{t.dtype}{layout} {tuple(t.shape)} on {t.device}"
    return type(t).__name__


def _check_packed(packed) -> None:
    if not isinstance(packed, torch.Tensor) or not packed.is_mkldnn or packed.dim() != 2:
        raise ValueError(f"packed_linear: packed must be a packed weight [N, K] (pack_weight), got "
                         f"{_describe(packed)}")


def _check(x, packed, bias) -> None:
    _check_packed(packed)
    out_features, in_features = packed.shape
    if not isinstance(x, torch.Tensor) or x.dtype != packed.dtype or x.dim() < 1 or x.device.type != "cpu" \
            or x.layout != torch.strided:
        raise ValueError(f"packed_linear: x must be a CPU {packed.dtype} tensor [..., K] (the packed weight's "
                         f"dtype), got {_describe(x)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"packed_linear: x {tuple(x.shape)} does not fit the packed weight {tuple(packed.shape)}: "
                         f"expected x [..., {in_features}]")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype != packed.dtype
                             or bias.shape != (out_features,) or bias.device.type != "cpu"):
        raise ValueError(f"packed_linear: bias must be a CPU {packed.dtype} tensor [N] = [{out_features}] or None, "
                         f"got {_describe(bias)}")


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def pack_weight(weight: torch.Tensor, rows_hint: int = ROWS_HINT) -> torch.Tensor:
    """``weight`` ``[N, K]`` (CPU, fp32 or bf16) -> oneDNN's packed copy, laid out for ``rows_hint`` rows per
    product; ValueError where it cannot be packed (``packing_unavailable_reason``)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.layout != torch.strided:
        raise ValueError(f"pack_weight: weight must be a tensor [N, K], got {_describe(weight)}")
    reason = packing_unavailable_reason(weight.device, weight.dtype)
    if reason is not None:
        raise ValueError(f"pack_weight: weight {_describe(weight)} cannot be packed: {reason}")
    if isinstance(rows_hint, bool) or not isinstance(rows_hint, int) or rows_hint < 1:
        raise ValueError(f"pack_weight: rows_hint must be a positive int, got {rows_hint!r}")
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows_hint)


def unpack_weight(packed: torch.Tensor) -> torch.Tensor:
    """The plain ``[N, K]`` weight of a packed one, bit for bit (a new tensor)."""
    _check_packed(packed)
    return packed.to_dense()


@torch.no_grad()
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x`` ``[..., K]``, ``packed`` the ``[N, K]`` weight from ``pack_weight``,
    ``bias`` ``[N]`` or None, all in one dtype (fp32 or bf16) on CPU; returns ``[..., N]``. Inference only."""
    _check(x, packed, bias)
    return torch.ops.mmdgen.packed_linear.default(x, packed, bias)


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose weight is held packed by oneDNN (``from_linear``): the same ``in_features``,
    ``out_features``, ``bias`` (a buffer), ``weight`` (a plain copy unpacked on each access) and state dict, and a
    forward that is ``packed_linear``. ``.to()`` and the like unpack, convert and pack again (ValueError where the
    result cannot be packed: unpack the model first, ``mmdgen.model.packing.unpack_lm``)."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        _check_packed(packed)
        self.out_features, self.in_features = packed.shape
        self.packed = packed  # not a buffer: no state dict entry, no generic .to() (see _apply)
        self.register_buffer("bias", None if bias is None else bias.detach())

    @classmethod
    def from_linear(cls, linear: nn.Linear, rows_hint: int = ROWS_HINT) -> "PackedLinear":
        """``linear``'s weight packed (``pack_weight``) and its bias kept; ``linear`` itself is left as it is."""
        return cls(pack_weight(linear.weight, rows_hint), linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The plain weight ``[out, in]``, unpacked on each access (for code that reads a linear's weight, its
        device or dtype). The forward never builds it."""
        return unpack_weight(self.packed)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with this layer's exact weight and bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.packed.device, dtype=self.packed.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)

    def _apply(self, fn, recurse=True):
        dense = self.weight
        converted = fn(dense)
        if converted is not dense:  # a real change of device or dtype: pack the converted weight again
            reason = packing_unavailable_reason(converted.device, converted.dtype)
            if reason is not None:
                raise ValueError(f"PackedLinear: its weight converted to {_describe(converted)} cannot be packed "
                                 f"({reason}); unpack the model first (mmdgen.model.packing.unpack_lm)")
            self.packed = pack_weight(converted)
        return super()._apply(fn, recurse)

    def __deepcopy__(self, memo):
        """A copy with its own packed weight (oneDNN tensors have no storage that deepcopy could copy)."""
        duplicate = self.__class__.__new__(self.__class__)
        memo[id(self)] = duplicate
        for name, value in self.__dict__.items():
            duplicate.__dict__[name] = pack_weight(unpack_weight(value)) if name == "packed" else \
                copy.deepcopy(value, memo)
        return duplicate

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
        else:
            weight = state_dict[key]
            if tuple(weight.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, the "
                                  f"shape in current model is {(self.out_features, self.in_features)}.")
            else:
                self.packed = pack_weight(weight.to(self.packed.dtype), ROWS_HINT)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key in unexpected_keys:  # nn.Module knows parameters and buffers only; the weight is this layer's
            unexpected_keys.remove(key)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.packed.dtype}")
