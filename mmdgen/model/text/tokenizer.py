"""The caption tokenizers: ``CaptionTokenizer`` (a deterministic sentencepiece BPE model trained on the corpus
captions, for the learned encoder) and ``word_level_t5_tokenizer`` (an offline stand-in for T5's tokenizer).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch

from mmdgen.files import read_jsonl, write_atomic
from mmdgen.model.text.conditioning import is_null_caption

_VOCAB_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_VOCAB_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def _import_sentencepiece():
    try:
        import sentencepiece
    except ImportError as error:
        raise ModuleNotFoundError(
            "the caption tokenizer needs the 'sentencepiece' package: pip install sentencepiece"
        ) from error
    return sentencepiece


class CaptionTokenizer:
    """A trained sentencepiece model: captions -> padded ``[B, L]`` ids + mask.

    Piece 0 is padding and piece 1 the unknown piece; there are no BOS/EOS pieces (the encoder is
    bidirectional and needs no sequence markers).
    """

    pad_id = 0

    def __init__(self, processor, path: Path | None = None):
        self.processor = processor
        self.path = path
        if processor.pad_id() != self.pad_id:
            raise ValueError(
                f"tokenizer {path}: pad id is {processor.pad_id()}, expected {self.pad_id}; "
                "train it with train_caption_tokenizer"
            )

    @classmethod
    def load(cls, path: str | Path) -> CaptionTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"caption tokenizer model {path} not found; build one with "
                "`mmdgen text tokenizer --manifest MANIFEST --out PATH`"
            )
        spm = _import_sentencepiece()
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(path.read_bytes())
        except Exception as error:  # sentencepiece raises RuntimeError/OSError for a bad proto
            raise ValueError(f"{path} is not a sentencepiece model file: {error}") from error
        return cls(processor, path)

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, captions: list[str], max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B, L]`` int64 padded with ``pad_id`` and mask ``[B, L]`` bool (True = real).

        Captions longer than ``max_length`` pieces are truncated. L is the longest row (at least
        1); an empty caption gives an all-False mask row.
        """
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        return pad_rows([self.processor.encode(caption or "")[:max_length] for caption in captions], self.pad_id)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of one row of ids; padding is skipped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.processor.decode([i for i in ids if i != self.pad_id])


def _train_sentencepiece_bytes(captions: list[str], vocab_size: int) -> bytes:
    spm = _import_sentencepiece()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        # Training from an iterator into memory keeps file names out of the stored trainer spec,
        # so the model bytes depend only on the captions and these options.
        sentence_iterator=iter(captions),
        model_writer=model,
        vocab_size=vocab_size,
        # BPE, because on template captions it can grow to whole words (short sequences), where
        # unigram stops below the number of distinct words.
        model_type="bpe",
        character_coverage=1.0,  # every character of the captions gets a piece
        split_digits=True,  # tempos like "101" become digits, so unseen tempos still tokenize well
        # Determinism: one thread, every sentence, no shuffling.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        pad_id=CaptionTokenizer.pad_id,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        minloglevel=2,
    )
    return model.getvalue()


def _train_sized_to_text(captions: list[str], vocab_size: int) -> bytes:
    """Train with ``vocab_size`` or, if the captions cannot support that many pieces, the largest
    size sentencepiece reports it can reach (its error names the bound; one deterministic retry).
    """
    try:
        return _train_sentencepiece_bytes(captions, vocab_size)
    except RuntimeError as error:
        too_small = _VOCAB_TOO_SMALL.search(str(error))
        if too_small:
            raise ValueError(
                f"vocab_size {vocab_size} is too small for these captions: sentencepiece needs at "
                f"least {too_small.group(2)} pieces (their distinct characters plus special pieces)"
            ) from error
        too_high = _VOCAB_TOO_HIGH.search(str(error))
        if not too_high:
            raise
    return _train_sentencepiece_bytes(captions, int(too_high.group(2)))


def train_caption_tokenizer(
    captions: list[str], model_path: str | Path, vocab_size: int = 1000
) -> CaptionTokenizer:
    """Train a deterministic sentencepiece BPE model on ``captions`` and write it to ``model_path``.

    Two runs on the same captions write byte-identical files. If the captions support fewer than
    ``vocab_size`` pieces (template text has few distinct words), the largest size they support
    is used instead; the result's ``vocab_size`` says which. The file is written atomically.
    """
    captions = [caption for caption in captions if not is_null_caption(caption)]
    if not captions:
        raise ValueError("no non-empty captions to train the caption tokenizer on")
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be >= 3 (padding, unknown and one piece), got {vocab_size}")
    model_bytes = _train_sized_to_text(captions, vocab_size)
    model_path = Path(model_path)
    write_atomic(model_path, lambda tmp: tmp.write_bytes(model_bytes))
    return CaptionTokenizer.load(model_path)


def captions_from_manifest(manifest_path: str | Path, split: str | None = "train") -> list[str]:
    """Captions of the corpus manifest (JSONL with "caption" and "split" keys) in file order.

    ``split=None`` takes every split.
    """
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        raise FileNotFoundError(f"corpus manifest {manifest_path} not found (expected a JSONL file)")
    captions, splits_seen = [], set()
    for record in read_jsonl(manifest_path, required=("caption",)):
        splits_seen.add(record.get("split"))
        if split is None or record.get("split") == split:
            captions.append(str(record["caption"]))
    if not captions:
        raise ValueError(
            f"{manifest_path}: no captions in split {split!r}; splits present: "
            f"{sorted(str(s) for s in splits_seen)}"
        )
    return captions


def build_tokenizer_from_manifest(
    manifest: str | Path, out_path: str | Path, vocab_size: int = 1000, split: str | None = "train"
) -> tuple[Path, int]:
    """Train the caption tokenizer on a manifest's captions; returns (model path, vocab size used)."""
    tokenizer = train_caption_tokenizer(captions_from_manifest(manifest, split), out_path, vocab_size)
    return Path(out_path), tokenizer.vocab_size


def word_level_t5_tokenizer(texts: list[str]):
    """A transformers tokenizer over the words of ``texts`` with T5's special ids (pad 0, ``</s>`` 1 appended,
    unk 2), built offline: what a randomly initialised T5 needs where no real tokenizer is on disk (tests,
    benchmarks)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    splitter = pre_tokenizers.Whitespace()
    for text in texts:
        for word, _ in splitter.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = splitter
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows -> ids ``[B, L]`` int64 padded with ``pad_id`` to the longest row (at least 1) and the mask
    ``[B, L]`` bool, True on real tokens."""
    length = max([1] + [len(row) for row in rows])
    ids = torch.full((len(rows), length), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row, dtype=torch.int64)
        mask[index, : len(row)] = True
    return ids, mask
