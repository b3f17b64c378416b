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

Fine-tuning: ``--init MODEL`` starts from a trained or published model (``mmdgen.train.finetune``) on tokens of its
codec. A frozen text encoder (T5, MiniLM) runs once per caption: its states are cached in the token folder
(``mmdgen.data.text_states``) and read at every step, the encoder itself staying on the CPU. Memory:
``--activation-checkpointing`` recomputes each decoder layer in the backward pass; ``--optimizer-state bf16`` keeps
AdamW's moments in bf16 (``mmdgen.train.optim``; the weights stay fp32, as with bf16 autocast); ``--fsdp`` shards
the model over the processes with FSDP2 (``fully_shard`` on each decoder layer, then on the whole: the fused
cross-entropy gets the gathered head weights inside the root's forward), its checkpoints going through
torch.distributed.checkpoint (``mmdgen.train.loop``) and its export gathering the full weights on rank 0. Under
torchrun, each process is one rank of the global batch; losses are logged as the global batch's mean.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mmdgen.data.text_states import CachedTextStates, cache_path, conditioner_key, fill_text_cache
from mmdgen.data.tokenize import TokenSet
from mmdgen.losses.lm import IGNORE, codebook_losses
from mmdgen.model.codec import Codec
from mmdgen.model.lm import MusicLM, lm_config
from mmdgen.model.patterns import Pattern, make_pattern
from mmdgen.model.text import (LearnedTextEncoder, TextConditioner, drop_captions, text_conditioner,
                               train_caption_tokenizer)
from mmdgen.pretrained.directory import (BUNDLED_CODEC, codec_identity, copy_codec, is_codec, is_codec_directory,
                                         save_codec, save_music_lm)
from mmdgen.pretrained.loader import load_codec_model
from mmdgen.train.config import LMTrainConfig
from mmdgen.train.finetune import load_lm_init
from mmdgen.train.loop import Process, Trainer, autocast
from mmdgen.train.optim import adamw

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
    """The LM with its text conditioner; forward returns the loss, so DDP and FSDP see one graph per step.

    ``every_parameter_in_graph``: a batch whose captions were all dropped never runs a trainable text encoder; its
    parameters then join the loss with a zero weight, so that they get a (zero) gradient on every rank, as FSDP's
    gradient reduction needs the same tensors from all of them."""

    def __init__(self, lm: MusicLM, text: TextConditioner, every_parameter_in_graph: bool = False):
        super().__init__()
        self.lm, self.text, self.every_parameter_in_graph = lm, text, every_parameter_in_graph

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, captions: list[str], fused: bool = True,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        condition = self.text(captions)
        hidden = self.lm.hidden(inputs, condition.states, condition.mask)
        loss, per_codebook = codebook_losses(self.lm, hidden, targets, fused, backend)
        unused = [p for p in self.text.parameters() if p.requires_grad] if self.every_parameter_in_graph and \
            not bool(condition.mask.any()) else []
        if unused:
            loss = loss + 0.0 * sum(p.sum() for p in unused)
        return loss, per_codebook


def shard_model(model: ConditionedLM) -> None:
    """FSDP2 over the current process group: each decoder layer a unit, then the rest (embeddings, text projection,
    final norm, heads, a learned text encoder) as the root; a frozen text encoder is left whole (not trained)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.lm.layers:
        fully_shard(layer)
    frozen = {p for p in model.text.parameters() if not p.requires_grad}
    fully_shard(model, ignored_params=frozen or None)


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
        valid_tokens = TokenSet(cfg.tokens, "valid")
        self.out.mkdir(parents=True, exist_ok=True)
        self.init_codec: Codec | None = None  # the codec of --init's model, bundled when the tokens came from it
        if cfg.init:
            init = load_lm_init(cfg, train_tokens)
            self.lm, self.lm_cfg, self.text, self.text_record = init.lm, init.lm.cfg, init.text, init.text_record
            self.init_codec = init.codec
            self.pattern = make_pattern(self.lm_cfg.pattern, self.lm_cfg.num_codebooks, self.lm_cfg.delays)
        else:
            self.pattern = make_pattern(cfg.pattern, train_tokens.num_codebooks, cfg.delay_values())
            self.text, self.text_record = build_text_conditioner(cfg, train_tokens, self.out, self.process)
            self.lm_cfg = lm_config(cfg.preset, num_codebooks=train_tokens.num_codebooks,
                                    codebook_size=train_tokens.codebook_size, text_dim=self.text.dim,
                                    pattern=cfg.pattern, delays=self.pattern.delays, context_frames=cfg.crop_frames)
            self.lm = MusicLM(self.lm_cfg)
        self.codec = train_tokens.codec
        device = self.process.device
        self.lm.to(device)
        self.lm.activation_checkpointing = cfg.activation_checkpointing
        step_text = self._step_conditioner(train_tokens.records + valid_tokens.records)
        self.model = ConditionedLM(self.lm, step_text, every_parameter_in_graph=cfg.fsdp)
        self.train_model = self.model
        if cfg.fsdp:
            self.sharded = self.model
            if self.process.world > 1:
                shard_model(self.model)
        elif self.process.world > 1:
            # a batch whose captions were all dropped never runs a learned text encoder
            self.train_model = DistributedDataParallel(self.model,
                                                       find_unused_parameters=self.text_record["kind"] == "learned")
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        decayed = [p for p in trainable if p.dim() >= 2]
        self.optimizer = adamw([{"params": decayed, "weight_decay": cfg.weight_decay},
                                {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}],
                               cfg.lr, cfg.betas, cfg.optimizer_state)
        self.dropout_generator = torch.Generator().manual_seed(cfg.seed + 2)
        self.valid_data = None
        if cfg.valid_clips and len(valid_tokens) and any(r["frames"] >= cfg.crop_frames for r in valid_tokens.records):
            self.valid_data = CodeCrops(valid_tokens, cfg.crop_frames, random_crop=False)
            self.valid_data.indices = self.valid_data.indices[: cfg.valid_clips]
        self._start(CodeCrops(train_tokens, cfg.crop_frames, seed=cfg.seed), collate_codes)

    def _step_conditioner(self, records: list[dict]) -> TextConditioner:
        """What turns captions into states at each step: a frozen encoder's cached states (computed here by rank 0
        for the captions of ``records`` the cache lacks; the encoder stays on the CPU), or the conditioner itself
        on the device."""
        if self.text_record["kind"] == "learned" or not self.cfg.text_cache:
            return self.text.to(self.process.device)
        path = cache_path(self.cfg.tokens, conditioner_key(self.text))
        if self.process.main:
            fill_text_cache(path, self.text, [r["caption"] for r in records], self.process.device)
        if self.process.world > 1:
            dist.barrier()
        return CachedTextStates(path, self.text.dim, self.process.device)

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

    def export(self) -> Path | None:
        """The model directory (rank 0; under FSDP every rank calls this to gather the full weights)."""
        lm, text = self._full_models()
        if not self.process.main:
            return None
        folder = save_music_lm(self.out / "model", lm, text, self.text_record, self.codec)
        self._bundle_codec(folder / BUNDLED_CODEC)
        return folder

    def _full_models(self) -> tuple[MusicLM, TextConditioner]:
        """The LM and the text conditioner with whole weights: under FSDP over several processes, unsharded copies
        on rank 0's CPU (the other ranks get the sharded modules back)."""
        if self.sharded is None or self.process.world == 1:
            return self.lm, self.text
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.process.main:
            return self.lm, self.text
        lm = MusicLM(self.lm_cfg)
        lm.load_state_dict({k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")})
        text = self.text
        if self.text_record["kind"] == "learned":
            text = LearnedTextEncoder(self.text.config)
            text.load_state_dict({k[len("text."):]: v for k, v in state.items() if k.startswith("text.")})
        return lm, text

    def _bundle_codec(self, target: Path) -> None:
        """The codec the tokens came from beside the LM (when it is still where it was and unchanged), so that the
        model directory alone generates audio: a codec directory copied, a published codec saved as one."""
        source = Path(self.train_data.tokens.header.get("codec_dir", ""))
        if "tensors_sha256" in self.codec:
            codec = self.init_codec if self.init_codec is not None and is_codec(self.codec, self.init_codec) else \
                self._published_codec(source)
            if codec is not None:
                save_codec(codec, target)
                return
        elif is_codec_directory(source) and codec_identity(source) == self.codec:
            copy_codec(source, target)
            return
        log.warning("the codec of %s is not at %s any more (or changed): the model directory holds the LM only",
                    self.cfg.tokens, source)

    def _published_codec(self, source: Path) -> Codec | None:
        """The codec at ``source`` when it is still the one the tokens came from, else None."""
        try:
            codec = load_codec_model(source)
        except ValueError:
            return None
        return codec if is_codec(self.codec, codec) else None

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
            captions = drop_captions(batch["captions"], cfg.condition_dropout, self.dropout_generator,
                                     self.process.rank, self.process.world)
            loss, per_codebook = self._losses(self.train_model, batch, captions)
            values = {"loss": loss.item(), **{f"loss_k{k}": v for k, v in enumerate(per_codebook.tolist())}}
            for key, value in values.items():
                metrics[key] = metrics.get(key, 0.0) + value / len(micro_batches)
            finite = finite and not self.any_rank(not all(math.isfinite(v) for v in values.values()))
            if finite:
                (loss.float() / len(micro_batches)).backward()
        self._mean_over_ranks(metrics)
        if finite:
            norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                  cfg.grad_clip)
            metrics["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not self.guard.check(metrics):
            self.optimizer.zero_grad(set_to_none=True)
            metrics["skipped"] = 1.0
            return metrics
        for group in self.optimizer.param_groups:  # set only now: a skipped step leaves the optimiser as it was
            group["lr"] = lr
        self.optimizer.step()
        return metrics

    def _mean_over_ranks(self, metrics: dict[str, float]) -> None:
        """The losses as the global batch's: each rank's mean over its items, averaged over the ranks (equal item
        counts, equal crops)."""
        if self.process.world == 1:
            return
        names = [name for name in metrics if name.startswith("loss")]
        values = torch.tensor([metrics[name] for name in names], dtype=torch.float64, device=self.process.device)
        dist.all_reduce(values)
        metrics.update(zip(names, (values / self.process.world).tolist()))

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
