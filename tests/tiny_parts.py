"""Random tiny parts of a text-to-music generator for tests: a learned caption encoder, a codec whose codebooks
were initialised by one training-mode pass, and a tiny LM."""

from __future__ import annotations

from pathlib import Path

import torch

from mmdgen.model.codec import Codec, codec_config
from mmdgen.model.lm import MusicLM, lm_config
from mmdgen.model.text import LearnedTextEncoder, train_caption_tokenizer


def tiny_parts(folder: Path, texts: list[str]) -> tuple[MusicLM, LearnedTextEncoder, Codec]:
    """(lm, text encoder, codec) from seed 0; the caption tokenizer is trained on ``texts`` into ``folder``."""
    torch.manual_seed(0)
    tokenizer = train_caption_tokenizer(texts * 4, folder / "captions.model", vocab_size=60)
    text = LearnedTextEncoder.from_tokenizer_file(tokenizer.path, dim=32, layers=1, heads=2)
    codec = Codec(codec_config("tiny"))
    codec.train()
    codec(torch.randn(2, 1, 6400))  # k-means initialisation of the codebooks
    lm = MusicLM(lm_config("tiny", text_dim=32))
    return lm, text, codec.eval()
