"""Text to music: ``Generator.from_pretrained(model_dir).generate(texts, duration=10)``.

A model directory is what ``mmdgen train lm`` exports: the LM, its text conditioner and, in ``codec/``,
the codec whose codes it learned (its weights must hash to what the LM recorded). ``generate`` returns
waveforms; ``generate_codes`` the codes; ``stream`` yields audio chunks while the decode loop runs.

``Sampling`` (``config``) imports without torch, for the command line's ``--help``; ``Generator`` (``generator``)
is imported on first use.
"""

from mmdgen.generate.config import Sampling

__all__ = ["Generator", "Sampling"]


def __getattr__(name: str):
    if name == "Generator":
        from mmdgen.generate.generator import Generator

        return Generator
    raise AttributeError(f"module 'mmdgen.generate' has no attribute {name!r}")
