"""Train the music LM on a token folder (``mmdgen data tokenize``) with a codebook pattern:

    mmdgen train lm --tokens runs/tokens --pattern delay --preset tiny --steps 2000

Each step: random crops of ``crop_frames`` frames, captions dropped to "" with ``condition_dropout``
(classifier-free guidance), the codes laid out by the pattern, inputs shifted one step right behind the
special token, and cross-entropy on the cells where the pattern holds a real code (audiocraft's loss: per
codebook over its valid cells, averaged over codebooks). The output heads and the loss are fused
(``mmdgen.kernels.cross_entropy``) unless ``fused_ce`` is off. AdamW with linear warm-up and cosine decay,
gradient clipping, bf16 autocast on CUDA, DDP under torchrun, exact resume, validation NLL per codebook.
A resumed run may change the optimisation settings (lr, warmup_steps, weight_decay, betas, grad_clip,
max_nonfinite): the schedule continues from the checkpoint's step under the new ones.

A run folder holds ``checkpoint/``, ``metrics.jsonl`` and the final ``model/`` (``mmdgen.pretrained``'s LM
directory, with the codec bundled).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mmdgen.data.tokenize import TokenSet
from mmdgen.losses.lm import IGNORE, codebook_losses
from mmdgen.model.lm import MusicLM, lm_config
from mmdgen.model.patterns import Pattern, make_pattern
from mmdgen.model.text import (LearnedTextEncoder, TextConditioner, drop_captions, text_conditioner,
                               train_caption_tokenizer)
from mmdgen.pretrained.directory import (BUNDLED_CODEC, codec_identity, copy_codec, is_codec_directory,
                                         save_music_lm)
from mmdgen.train.config import LMTrainConfig
from mmdgen.train.loop import Process, Trainer, autocast

log = logging.getLogger(__name__)


def learning_rate(step: int, cfg: LMTrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to 0 at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class CodeCrops(torch.utils.data.Dataset):
    """Crops of ``crop_frames`` frames from the clips of a token split (random offsets drawn from
    (seed, epoch, index); the start of each clip when ``random_crop`` is off)."""

    def __init__(self, tokens: TokenSet, crop_frames: int, random_crop: bool = True, seed: int = 0):
        self.tokens, self.crop, self.random_crop, self.seed, self.epoch = tokens, crop_frames, random_crop, seed, 0
        self.indices = [i for i, r in enumerate(tokens.records) if r["frames"] >= crop_frames]
        if not self.indices:
            longest = max((r["frames"] for r in tokens.records), default=0)
            raise ValueError(f"{tokens.folder}: no {tokens.split!r} clip has {crop_frames} frames to crop "
                             f"(longest {longest}); lower crop_frames")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        clip = self.tokens[self.indices[index]]
        spare = clip.codes.shape[-1] - self.crop
        start = int(np.random.default_rng([self.seed, self.epoch, index]).integers(spare + 1)) \
            if self.random_crop and spare > 0 else 0
        return {"codes": clip.codes[:, start: start + self.crop], "caption": clip.caption}


def collate_codes(batch: list[dict]) -> dict:
    return {"codes": torch.stack([item["codes"] for item in batch]), "captions": [item["caption"] for item in batch]}


def teacher_forcing(codes: torch.Tensor, pattern: Pattern, special: int) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [B, K, T] -> (inputs [B, K, S]: the pattern sequence shifted one step right behind the special
    token; targets [B, K, S]: the sequence with ``IGNORE`` where the pattern holds no code)."""
    sequence = pattern.build(codes, special)
    inputs = torch.cat([torch.full_like(sequence[..., :1], special), sequence[..., :-1]], dim=-1)
    valid = pattern.valid_mask(codes.shape[-1]).to(codes.device)
    return inputs, sequence.masked_fill(~valid, IGNORE)


class ConditionedLM(nn.Module):
    """The LM with its text conditioner; forward returns the loss, so DDP sees one graph per step."""

    def __init__(self, lm: MusicLM, text: TextConditioner):
        super().__init__()
        self.lm, self.text = lm, text

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, captions: list[str], fused: bool = True,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        condition = self.text(captions)
        hidden = self.lm.hidden(inputs, condition.states, condition.mask)
        return codebook_losses(self.lm, hidden, targets, fused, backend)


def build_text_conditioner(cfg: LMTrainConfig, tokens: TokenSet, out: Path, process: Process
                           ) -> tuple[TextConditioner, dict]:
    """The conditioner the config asks for, and what a model directory records to rebuild it."""
    if cfg.text == "learned":
        tokenizer_path = Path(cfg.text_path) if cfg.text_path else out / "text_tokenizer.model"
        if not cfg.text_path and not tokenizer_path.exists():
            if process.main:  # one rank trains it; the others wait and read it
                train_caption_tokenizer([r["caption"] for r in tokens.records], tokenizer_path)
            if process.world > 1:
                torch.distributed.barrier()
        encoder = LearnedTextEncoder.from_tokenizer_file(tokenizer_path, dim=cfg.text_dim, layers=cfg.text_layers,
                                                         heads=max(cfg.text_dim // 64, 1))
        return encoder, {"kind": "learned", "config": dataclasses.asdict(encoder.config)}
    if cfg.text == "minilm":
        return text_conditioner("minilm", **({"path": cfg.text_path} if cfg.text_path else {})), {
            "kind": "minilm", "path": cfg.text_path}
    return text_conditioner("t5", path=cfg.text_path), {"kind": "t5", "path": cfg.text_path}


class LMTrainer(Trainer):
    label = "lm"

    def __init__(self, cfg: LMTrainConfig, process: Process | None = None, progress: bool = True):
        super().__init__(cfg, process, progress)
        train_tokens = TokenSet(cfg.tokens, "train")
        if not len(train_tokens):
            raise ValueError(f"{cfg.tokens}: the token folder has no 'train' clips")
        self.pattern = make_pattern(cfg.pattern, train_tokens.num_codebooks, cfg.delay_values())
        self.out.mkdir(parents=True, exist_ok=True)
        self.text, self.text_record = build_text_conditioner(cfg, train_tokens, self.out, self.process)
        self.lm_cfg = lm_config(cfg.preset, num_codebooks=train_tokens.num_codebooks,
                                codebook_size=train_tokens.codebook_size, text_dim=self.text.dim,
                                pattern=cfg.pattern, delays=self.pattern.delays, context_frames=cfg.crop_frames)
        self.codec = train_tokens.codec
        device = self.process.device
        self.lm = MusicLM(self.lm_cfg).to(device)
        self.text.to(device)
        self.model = ConditionedLM(self.lm, self.text)
        self.train_model = self.model
        if self.process.world > 1:
            # a batch whose captions were all dropped never runs a learned text encoder
            self.train_model = DistributedDataParallel(self.model,
                                                       find_unused_parameters=self.text_record["kind"] == "learned")
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        decayed = [p for p in trainable if p.dim() >= 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decayed, "weight_decay": cfg.weight_decay},
             {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
        self.dropout_generator = torch.Generator().manual_seed(cfg.seed + 2)
        valid_tokens = TokenSet(cfg.tokens, "valid")
        self.valid_data = None
        if cfg.valid_clips and len(valid_tokens) and any(r["frames"] >= cfg.crop_frames for r in valid_tokens.records):
            self.valid_data = CodeCrops(valid_tokens, cfg.crop_frames, random_crop=False)
            self.valid_data.indices = self.valid_data.indices[: cfg.valid_clips]
        self._start(CodeCrops(train_tokens, cfg.crop_frames, seed=cfg.seed), collate_codes)

    # -- what the shared loop asks for ---------------------------------------------------------------

    def checkpoint_config(self) -> dict:
        return {"lm": dataclasses.asdict(self.lm_cfg), "text": self.text_record, "codec": self.codec}

    def checkpoint_paths(self) -> list[tuple[str, ...]]:
        return [("text", "config", "tokenizer_path"), ("text", "path")]

    def checkpoint_models(self) -> dict:
        return {"lm": self.lm, **({"text": self.text} if self.text_record["kind"] == "learned" else {})}

    def optimizers(self) -> dict:
        return {"lm": self.optimizer}

    def extra_state(self) -> dict:
        return {"dropout_generator": self.dropout_generator.get_state()}

    def load_extra_state(self, state: dict) -> None:
        self.dropout_generator.set_state(state["dropout_generator"])

    def to_device(self, batch: dict) -> dict:
        return {"codes": batch["codes"].to(self.process.device), "captions": batch["captions"]}

    def progress_fields(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics.get('loss', float('nan')):.3f}", "lr": f"{metrics.get('lr', 0.0):.1e}"}

    def export(self) -> Path:
        folder = save_music_lm(self.out / "model", self.lm, self.text, self.text_record, self.codec)
        self._bundle_codec(folder / BUNDLED_CODEC)
        return folder

    def _bundle_codec(self, target: Path) -> None:
        """Copy the codec the tokens came from beside the LM (when it is still where it was and unchanged), so
        that the model directory alone generates audio."""
        source = Path(self.train_data.tokens.header.get("codec_dir", ""))
        if not is_codec_directory(source) or codec_identity(source) != self.codec:
            log.warning("the codec of %s is not at %s any more (or changed): the model directory holds the LM only",
                        self.cfg.tokens, source)
            return
        copy_codec(source, target)

    # -- training ---------------------------------------------------------------------------------

    def _losses(self, model: nn.Module, batch: dict, captions: list[str]):
        inputs, targets = teacher_forcing(batch["codes"], self.pattern, self.lm_cfg.special_token)
        with autocast(self.process, self.cfg.precision):
            return model(inputs, targets, captions, fused=self.cfg.fused_ce, backend=self.cfg.backend)

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        cfg = self.cfg
        lr = learning_rate(self.step, cfg)
        self.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {"lr": lr}
        finite = True
        for batch in micro_batches:
            captions = drop_captions(batch["captions"], cfg.condition_dropout, self.dropout_generator)
            loss, per_codebook = self._losses(self.train_model, batch, captions)
            values = {"loss": loss.item(), **{f"loss_k{k}": v for k, v in enumerate(per_codebook.tolist())}}
            for key, value in values.items():
                metrics[key] = metrics.get(key, 0.0) + value / len(micro_batches)
            finite = finite and not self.any_rank(not all(math.isfinite(v) for v in values.values()))
            if finite:
                (loss.float() / len(micro_batches)).backward()
        if finite:
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], cfg.grad_clip))
        if not self.guard.check(metrics):
            self.optimizer.zero_grad(set_to_none=True)
            metrics["skipped"] = 1.0
            return metrics
        for group in self.optimizer.param_groups:  # set only now: a skipped step leaves the optimiser as it was
            group["lr"] = lr
        self.optimizer.step()
        return metrics

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean NLL per codebook (nats per code) and its perplexity on the validation crops, with captions."""
        if self.valid_data is None:
            return {}
        self.model.eval()
        sums = torch.zeros(self.lm_cfg.num_codebooks, dtype=torch.float64)
        counts = torch.zeros_like(sums)
        for start in range(0, len(self.valid_data), self.cfg.batch_size):
            items = [self.valid_data[i] for i in range(start, min(start + self.cfg.batch_size, len(self.valid_data)))]
            batch = self.to_device(collate_codes(items))
            _, per_codebook = self._losses(self.model, batch, batch["captions"])
            _, targets = teacher_forcing(batch["codes"], self.pattern, self.lm_cfg.special_token)
            valid = (targets != IGNORE).sum(dim=(0, 2)).double().cpu()
            sums += per_codebook.double().cpu() * valid
            counts += valid
        self.model.train()
        nll = (sums / counts.clamp_min(1)).tolist()
        return {"nll": sum(nll) / len(nll), **{f"nll_k{k}": v for k, v in enumerate(nll)},
                **{f"ppl_k{k}": math.exp(v) for k, v in enumerate(nll)}}
