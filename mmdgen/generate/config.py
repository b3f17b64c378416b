"""How the decode loop samples (``Sampling``), each field declared with its help text and its range
(``mmdgen.validation``); ``mmdgen generate`` makes its options from them.

No torch here: the command line's ``--help`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmdgen.validation import check_fields, option


@dataclass
class Sampling:
    """MusicGen's defaults: guidance 3, top-k 250, temperature 1 (``temperature=0``: greedy)."""

    guidance_scale: float | None = option(3.0, "classifier-free guidance: uncond + scale * (cond - uncond), one "
                                               "batch of both (0 or None: off)", at_least=0, flag="guidance")
    temperature: float = option(1.0, "the softmax temperature (0: greedy)", at_least=0)
    top_k: int = option(250, "sample among the k likeliest codes (0: off)", at_least=0)
    top_p: float = option(0.0, "sample among the likeliest codes holding this probability (0: off)", at_least=0,
                          at_most=1)

    def __post_init__(self):
        check_fields(self)
        if self.guidance_scale == 0:  # "0: off", as the command line says it
            self.guidance_scale = None
