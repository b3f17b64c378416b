"""The interface the LM consumes: ``TextConditioner`` turns captions into ``TextConditioning`` (``[B, L, dim]``
states and a ``[B, L]`` mask), with the null condition built in; ``FrozenConditioner`` for pretrained encoders.

The null condition. Classifier-free guidance needs an unconditional branch: a caption given as
``None``, ``""`` or whitespace only means "no condition". Its states are all zero and its mask is
all False. The LM zeroes its projected text memory where the mask is False (as transformers'
MusicGen does), so a null row's memory is exactly zero: the cross-attention projections have no
bias, so it adds exactly nothing to the output; the LM lets such a row attend to position 0 only
to keep the softmax defined. Every conditioner gets this from ``TextConditioner.forward``;
subclasses only encode real captions.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TextConditioning:
    """Encoded captions for cross-attention.

    states: ``[B, L, dim]`` float; zero rows where padded or where the caption was dropped.
    mask:   ``[B, L]`` bool, True for real tokens; all False for a dropped (null) caption.
    """

    states: torch.Tensor
    mask: torch.Tensor


def is_null_caption(caption: str | None) -> bool:
    """True for the captions that mean "no condition": None, "" and whitespace only.

    Whitespace counts as null because it tokenizes to nothing, which would leave a row with no
    real token at all.
    """
    return caption is None or not caption.strip()


class TextConditioner(nn.Module):
    """Base class: ``forward(captions) -> TextConditioning`` with the null condition built in.

    Subclasses set ``dim`` and implement ``encode_texts`` for a non-empty list of real captions.
    """

    dim: int

    def encode_texts(self, captions: list[str]) -> TextConditioning:
        raise NotImplementedError

    def forward(self, captions: list[str | None]) -> TextConditioning:
        captions = list(captions)
        if not captions:
            raise ValueError("captions is empty: expected at least one caption (use '' for no condition)")
        real_rows = [i for i, caption in enumerate(captions) if not is_null_caption(caption)]
        if len(real_rows) == len(captions):
            return _zero_padding(self.encode_texts(captions))

        dtype, device = self._output_dtype_and_device()
        length = 1
        if real_rows:
            encoded = _zero_padding(self.encode_texts([captions[i] for i in real_rows]))
            dtype, device = encoded.states.dtype, encoded.states.device
            length = encoded.states.shape[1]
        batch = len(captions)
        states = torch.zeros(batch, length, self.dim, dtype=dtype, device=device)
        mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        if real_rows:
            index = torch.tensor(real_rows, device=device)
            # Out-of-place index_copy so gradients flow back into a trainable encoder.
            states = states.index_copy(0, index, encoded.states)
            mask = mask.index_copy(0, index, encoded.mask)
        return TextConditioning(states=states, mask=mask)

    def _output_dtype_and_device(self) -> tuple[torch.dtype, torch.device]:
        # An all-null batch never runs the encoder, so take dtype/device from its weights.
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype, tensor.device
        return torch.float32, torch.device("cpu")


def _zero_padding(encoded: TextConditioning) -> TextConditioning:
    # Encoders leave arbitrary values at padded positions; the interface promises zeros there.
    # torch.where rather than a product, so even a non-finite padded value becomes an exact zero.
    mask = encoded.mask
    zero = torch.zeros((), dtype=encoded.states.dtype, device=mask.device)
    # (a caption that tokenized to nothing keeps an all-False row: a null condition)
    return TextConditioning(states=torch.where(mask.unsqueeze(-1), encoded.states, zero), mask=mask)


def drop_captions(
    captions: list[str | None], probability: float, generator: torch.Generator, rank: int = 0, world: int = 1
) -> list[str | None]:
    """Condition dropout for classifier-free guidance training (MusicGen uses 0.3).

    Each caption is replaced by "" with ``probability``, independently; the draws come from
    ``generator`` (a CPU generator), so the result is deterministic given its state.

    Across ``world`` processes, each holding every world-th item of a global batch from ``rank`` on, every process
    draws for the whole global batch (its generator stays in step with the others') and keeps its own items' draws:
    the captions dropped are those one process would drop holding the whole batch, whatever the world size.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"drop probability must be in [0, 1], got {probability}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} processes")
    # uniform draws lie in [0, 1): probability 0 keeps everything and 1 drops everything.
    draws = torch.rand(len(captions) * world, generator=generator)[rank::world]
    return ["" if float(draw) < probability else caption for draw, caption in zip(draws, captions)]


class FrozenConditioner(TextConditioner):
    """A pretrained encoder that never trains: no gradients, and always in eval mode."""

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenConditioner:
        # The LM's model.train() recurses into submodules; a frozen encoder must keep
        # inference behaviour (no dropout) whatever its parent's mode.
        return super().train(False)
