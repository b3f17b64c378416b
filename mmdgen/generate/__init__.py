"""Text to music: ``Generator.from_pretrained(model).generate(texts, duration=10)``.

``model`` is anything ``mmdgen.pretrained.load_music_model`` reads: an LM directory that ``mmdgen train lm``
exports (the LM, its text conditioner and, in ``codec/``, the codec whose codes it learned), a transformers
MusicGen folder, audiocraft's exported files, or a repository id in the local Hugging Face cache. ``generate``
returns waveforms; ``generate_codes`` the codes; ``stream`` yields audio chunks while the decode loop runs.

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
