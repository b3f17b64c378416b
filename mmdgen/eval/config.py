"""The configuration of ``mmdgen eval coupled-latents`` (``CoupledLatentsConfig``), each field declared with its help
text and its range (``mmdgen.validation``).

No torch here: the command line's ``--help`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmdgen.choices import Backend
from mmdgen.validation import INT64_MAX, check_fields, label, option


@dataclass
class CoupledLatentsConfig:
    steps: int = option(150, "Adam steps on the delay-aligned loss", at_least=1)
    clips: int = option(16, "clips per step", at_least=2)
    stages: int = option(4, "codebook latents (stages), coupled across delay steps", at_least=2)
    dim: int = option(8, "dimensions per stage", at_least=1)
    frames: int = option(50, "frames per clip", at_least=1)
    init_coupling: float = option(0.8, "the coupling's starting value")
    lr: float = option(0.05, "Adam's learning rate", above=0)
    seed: int = option(0, "seed of the sources and the permutations", at_least=0, at_most=INT64_MAX)
    compare_sizes: tuple[int, ...] = option((1024, 4096), "sample counts for the side-by-side with the naive "
                                                          "estimator (it holds three N x N matrices)",
                                            at_least=2, at_most=16384)
    backend: Backend = option("auto", "the fused ops' implementation")
    device: str = option("cpu", "cpu or cuda", required=True)

    def __post_init__(self):
        check_fields(self)
        if self.frames < self.stages:
            raise ValueError(f"{label('frames')} ({self.frames}) must be at least {label('stages')} "
                             f"({self.stages}): the delay alignment drops stages - 1 frames")
