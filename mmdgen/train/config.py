"""The trainers' configurations: ``LoopConfig`` (what the shared loop reads) and the codec's and the LM's, each field
declared with its help text and its rules (``mmdgen.validation``); ``mmdgen train codec|lm`` makes its options from
them. Checked when made: a bad value is refused before anything is built.

No torch here: the command line's ``--help`` reads these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mmdgen.choices import (Backend, CodecPreset, LMPreset, OptimizerState, PatternName, Precision, StageLatent,
                            TextConditionerKind)
from mmdgen.validation import INT64_MAX, MAX_SECONDS, check_fields, label, option, path_problem


def device_rule(device: str) -> str | None:
    """What a training device must be, unless ``device`` is one."""
    return None if re.fullmatch(r"auto|cpu|cuda(:\d+)?", device) else "auto, cpu, cuda or cuda:N"


def delays_rule(delays: str) -> str | None:
    """What per-codebook delays must be, unless ``delays`` is empty (the pattern's default) or such a list."""
    return None if re.fullmatch(r"\s*(\d+\s*(,\s*\d+\s*)*)?", delays) else \
        "comma-separated integers >= 0 like 0,1,2,3 (or empty: 0..K-1)"


@dataclass
class LoopConfig:
    """The fields the shared loop reads; each trainer's config extends it (and may change the defaults)."""

    out: str = option("runs/train", "the run folder: checkpoint/ (resumed when there), metrics.jsonl, model/",
                      required=True, path="new_folder")
    steps: int = option(1000, "optimiser steps in all (a resumed run continues to this many)", at_least=1)
    batch_size: int = option(8, "items per micro-batch on each process", at_least=1)
    grad_accum: int = option(1, "micro-batches accumulated per optimiser step", at_least=1)
    precision: Precision = option("auto", "auto: bf16 autocast on CUDA, full precision on CPU")
    compile: bool = option(False, "run the model through torch.compile")
    device: str = option("auto", "auto (CUDA when available), cpu, cuda or cuda:N", rule=device_rule)
    log_every: int = option(10, "steps between lines of metrics.jsonl", at_least=1)
    ckpt_every: int = option(100, "steps between checkpoints", at_least=1)
    valid_every: int = option(200, "steps between validations", at_least=1)
    valid_clips: int = option(16, "validation clips (0: no validation)", at_least=0)
    max_nonfinite: int = option(10, "steps in a row skipped for non-finite losses before the run stops", at_least=0)
    workers: int = option(0, "data-loading processes (0: in the training process)", at_least=0)
    seed: int = option(0, "seed of every random draw (data order, crops, initialisation)", at_least=0,
                       at_most=INT64_MAX)

    # what a resumed run may change (the length, the bookkeeping, the skip limit; each trainer adds its
    # optimiser's settings), and which fields are paths (saved relative to the run folder)
    FREE = ("steps", "out", "log_every", "ckpt_every", "valid_every", "workers", "device", "compile", "max_nonfinite")
    PATHS = ()

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """ValueError naming every field out of its range (the trainer checks again: fields may change)."""
        check_fields(self)


@dataclass
class CodecTrainConfig(LoopConfig):
    """``mmdgen train codec``'s options (``mmdgen.train.codec``)."""

    data: str = option("", "a corpus manifest.jsonl (its train and valid splits) or a folder of audio files",
                       required=True, path="file_or_folder")
    out: str = "runs/codec"
    init: str | None = option(None, "fine-tune this codec (its weights before the first step; the discriminator "
                                    "starts afresh): an mmdgen codec or LM directory, a transformers EnCodec or "
                                    "MusicGen folder, audiocraft's compression_state_dict.bin, or a repository id in "
                                    "the local cache", path="model")
    preset: CodecPreset | None = option(None, "the codec's size (paper: EnCodec 32 kHz, 4 x 2048 codes); default "
                                              "tiny, with --init the codec's own")
    crop_seconds: float = option(1.0, "seconds of audio per training item", above=0, at_most=MAX_SECONDS)
    lr: float = option(3e-4, "Adam's learning rate (codec and discriminator)", above=0)
    betas: tuple[float, float] = option((0.5, 0.9), "Adam's betas", at_least=0, below=1)
    mmd_weight: float = option(0.0, "weight of the independence loss (0: off)", at_least=0)
    mmd_delay: bool = option(False, "delay-align the stages for the independence loss (what the delay pattern "
                                    "predicts in one step)")
    mmd_every: int = option(1, "steps between independence losses (the authors' recipe: 32)", at_least=1)
    mmd_batches: int = option(1, "batches of recent steps the independence loss sees, re-encoded (the authors' "
                                 "recipe: 32)", at_least=1)
    stage_latent: StageLatent = option("quantized", "what stands for a stage in the independence loss")
    l1_weight: float = option(0.1, "weight of the waveform L1 loss", at_least=0)
    mel_weight: float = option(2.0, "weight of the multi-scale mel loss", at_least=0)
    adv_weight: float = option(4.0, "weight of the adversarial loss", at_least=0)
    feat_weight: float = option(4.0, "weight of the feature-matching loss", at_least=0)
    commitment_weight: float = option(1.0, "weight of the quantizer's commitment loss", at_least=0)
    adversarial: bool = option(True, "train with the multi-scale STFT discriminator")
    disc_filters: int = option(32, "the discriminator's filters", at_least=1)

    # a resumed run keeps its checkpoint's weights: --init only builds the model
    FREE = LoopConfig.FREE + ("lr", "betas", "init")
    PATHS = ("data",)

    def check(self) -> None:
        super().check()
        if self.init is None and self.preset is None:
            self.preset = "tiny"


@dataclass
class LMTrainConfig(LoopConfig):
    """``mmdgen train lm``'s options (``mmdgen.train.lm``)."""

    tokens: str = option("", "a token folder from `mmdgen data tokenize`", required=True, path="folder")
    out: str = "runs/lm"
    init: str | None = option(None, "fine-tune this model: an mmdgen LM directory, a transformers MusicGen folder, "
                                    "audiocraft's state_dict.bin (or its folder) or a repository id in the local "
                                    "cache; its LM (weights before the first step, its size and pattern) and its "
                                    "text conditioner (a T5 stays frozen); tokenize with its codec (`data tokenize "
                                    "--codec` the same model)", path="model")
    preset: LMPreset | None = option(None, "the LM's size (small: MusicGen small); default tiny, with --init the "
                                           "model's own")
    pattern: PatternName | None = option(None, "the codebook pattern; default delay, with --init the model's own")
    delays: str = option("", "comma-separated per-codebook delays of the delay pattern (empty: 0..K-1, or with "
                             "--init the model's own)", rule=delays_rule)
    text: TextConditionerKind | None = option(None, "the text conditioner; default learned, with --init the "
                                                    "model's own")
    text_path: str = option("", "learned: a sentencepiece model (default: trained on the captions); minilm: a model "
                                "folder (default: the installed package); t5: the encoder's folder (required; with "
                                "an audiocraft --init, default: the T5 it names, from the local cache)")
    text_cache: bool = option(True, "compute a frozen text encoder's states (t5, minilm) once per caption and keep "
                                    "them in the token folder (text_states/), instead of running it at every step")
    text_dim: int = option(128, "the learned text encoder's width", at_least=1)
    text_layers: int = option(2, "the learned text encoder's layers", at_least=1)
    batch_size: int = 16
    crop_frames: int = option(150, "frames per training crop (also the LM's context when generating)", at_least=1)
    lr: float = option(1e-3, "AdamW's peak learning rate", above=0)
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW's betas", at_least=0, below=1)
    weight_decay: float = option(0.1, "AdamW's weight decay (matrices only)", at_least=0)
    warmup_steps: int = option(100, "steps of linear warm-up before the cosine decay", at_least=0)
    grad_clip: float = option(1.0, "the gradients' largest norm", above=0)
    condition_dropout: float = option(0.3, "share of captions dropped for classifier-free guidance", at_least=0,
                                      at_most=1)
    fused_ce: bool = option(True, "fuse the output heads with the cross-entropy (mmdgen.kernels.cross_entropy)")
    backend: Backend = option("auto", "the fused ops' implementation")
    activation_checkpointing: bool = option(False, "keep each decoder layer's input only and recompute its "
                                                   "activations in the backward pass (less memory, one more forward)")
    optimizer_state: OptimizerState = option("fp32", "the dtype of AdamW's moments (bf16: half the optimiser's "
                                                     "memory; the weights stay fp32)")
    fsdp: bool = option(False, "shard the model over the processes with FSDP2 (each decoder layer, then the rest); "
                               "checkpoints through torch.distributed.checkpoint, resumable on another number of "
                               "processes")
    ckpt_every: int = 200
    valid_clips: int = 64

    FREE = LoopConfig.FREE + ("backend", "lr", "betas", "weight_decay", "warmup_steps", "grad_clip", "init",
                              "text_cache", "activation_checkpointing")
    PATHS = ("tokens", "text_path")

    def check(self) -> None:
        super().check()
        if self.init is None:  # the defaults; with --init the model's own
            self.preset, self.pattern = self.preset or "tiny", self.pattern or "delay"
            self.text = self.text or "learned"
        if self.text == "t5" and not self.text_path and self.init is None:
            raise ValueError(f"{label('text')} t5 needs {label('text_path')}: a local folder with the T5 encoder's "
                             "weights and tokenizer")
        kind = "file" if self.text == "learned" else "folder"
        problem = path_problem(self.text_path, kind, label("text_path")) if self.text_path else None
        if problem:
            raise ValueError(f"{problem} (for {label('text')} {self.text})")

    def delay_values(self) -> tuple[int, ...] | None:
        """The delays as integers, None for the pattern's default."""
        return tuple(int(d) for d in self.delays.split(",")) if self.delays.strip() else None
