"""A frozen T5 encoder from transformers, for users who have T5 weights on disk (MusicGen's conditioner)."""

from __future__ import annotations

from pathlib import Path

import torch

from mmdgen.model.text.conditioning import FrozenConditioner, TextConditioning


class T5TextEncoder(FrozenConditioner):
    """Frozen ``transformers.T5EncoderModel`` token states; dim = d_model (768 for T5-base)."""

    def __init__(self, model, tokenizer, max_length: int = 512):
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.dim = model.config.d_model
        self.max_length = max_length
        self.freeze()

    @classmethod
    def from_folder(cls, path: str | Path, max_length: int = 512) -> T5TextEncoder:
        """Load model and tokenizer from a local folder (``save_pretrained`` layout); never downloads."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"T5 folder {path} not found: expected a local folder with config.json, the weights "
                "and a tokenizer (as written by save_pretrained); nothing is downloaded"
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path / 'config.json'} not found: {path} is not a transformers model folder"
            )
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError as error:
            raise ModuleNotFoundError(
                "T5TextEncoder needs the 'transformers' package: pip install transformers"
            ) from error
        model = T5EncoderModel.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(model, tokenizer, max_length)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return batch["input_ids"], batch["attention_mask"].bool()

    @torch.no_grad()
    def encode_texts(self, captions: list[str]) -> TextConditioning:
        ids, mask = self.tokenize(captions)
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        states = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return TextConditioning(states=states, mask=mask)
