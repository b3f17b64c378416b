"""Train the EnCodec-MMD codec: reconstruction (L1, multi-scale mel), adversarial and feature-matching
losses through EnCodec's balancer, commitment, and the independence loss on the per-stage latents.

    mmdgen train codec --preset tiny --data data/corpus/manifest.jsonl --mmd-weight 1e4 --mmd-delay

The balanced losses set the gradient reaching the decoder output; commitment and the independence loss
(weight ``mmd_weight``, on the global batch under DDP) backpropagate beside them, and the independence
loss reaches only the encoder. It runs every ``mmd_every`` steps on a macro-batch: the batches of the last
``mmd_batches`` steps, the earlier ones re-encoded by the current encoder (the authors' released recipe is
``mmd_every=32, mmd_batches=32``; the default, 1 and 1, is every step on that step's batch). The
discriminator trains on the same step's detached reconstructions. A step whose losses or gradient norm are not
finite is skipped whole: the quantizer's EMA codebooks, which its forward pass updated, and the balancer's norms
are put back as they were, and neither optimiser steps. A run folder holds ``checkpoint/`` (resumed
automatically), ``metrics.jsonl`` and the final ``model/`` (config.json + codec.safetensors).

``--init CODEC`` fine-tunes a trained or published codec (any format the loader reads: a transformers EnCodec, the
one inside a MusicGen folder, audiocraft's compression_state_dict.bin...): its configuration and weights, EMA
codebooks included, before the first step (``mmdgen.train.finetune``); the discriminator starts afresh.

    mmdgen train codec --init facebook/encodec_32khz --data my_music/ --mmd-weight 1e4 --mmd-delay
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from mmdgen.data.audio import AudioDataset, collate, folder_entries, manifest_entries
from mmdgen.losses.adversarial import discriminator_loss, feature_matching_loss, generator_adversarial_loss
from mmdgen.losses.balancer import Balancer
from mmdgen.losses.independence import independence_loss
from mmdgen.losses.reconstruction import MultiScaleMelLoss, si_snr, waveform_l1
from mmdgen.metrics.dependence import dependence_report
from mmdgen.model.codec import Codec, codec_config
from mmdgen.model.discriminator import DiscriminatorConfig, MultiScaleSTFTDiscriminator
from mmdgen.pretrained.directory import save_codec
from mmdgen.train.config import CodecTrainConfig
from mmdgen.train.finetune import load_codec_init
from mmdgen.train.loop import Process, Trainer, autocast


def _entries(data: str, split: str):
    path = Path(data)
    if path.is_dir():
        return folder_entries(path) if split == "train" else []
    return manifest_entries(path, split)


class CodecTrainer(Trainer):
    label = "codec"

    def __init__(self, cfg: CodecTrainConfig, process: Process | None = None, progress: bool = True):
        super().__init__(cfg, process, progress)
        self.codec = load_codec_init(cfg) if cfg.init else Codec(codec_config(cfg.preset))
        codec_cfg = self.codec.cfg
        codec_cfg.quantizer.stage_latent = cfg.stage_latent  # the quantizer reads its configuration's
        self.codec_cfg = codec_cfg
        device = self.process.device
        self.codec.to(device)
        self.disc = MultiScaleSTFTDiscriminator(DiscriminatorConfig(filters=cfg.disc_filters)).to(device)
        self.g_opt = torch.optim.Adam(self.codec.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.d_opt = torch.optim.Adam(self.disc.parameters(), lr=cfg.lr, betas=cfg.betas)
        weights = {"l1": cfg.l1_weight, "mel": cfg.mel_weight}
        if cfg.adversarial:
            weights.update(adv=cfg.adv_weight, feat=cfg.feat_weight)
        self.balancer = Balancer(weights)
        self.mel = MultiScaleMelLoss(codec_cfg.sample_rate).to(device)
        self.mmd_generator = torch.Generator().manual_seed(cfg.seed + 1)
        # the micro-batches before the current one that the next independence loss re-encodes
        self.mmd_history: deque[torch.Tensor] = deque(maxlen=cfg.mmd_batches * cfg.grad_accum - 1)
        self.last_mmd = 0.0
        self.train_model = self.codec
        if self.process.world > 1:  # the quantizer keeps its codebooks in sync itself
            self.train_model = DistributedDataParallel(self.codec, broadcast_buffers=False)
            self.disc = DistributedDataParallel(self.disc, broadcast_buffers=False)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        crop_samples = int(round(cfg.crop_seconds * codec_cfg.sample_rate))
        if crop_samples < 2048:
            raise ValueError(f"crop_seconds={cfg.crop_seconds} gives {crop_samples} samples; the mel loss and the "
                             "discriminator need at least 2048")
        train_data = AudioDataset(_entries(cfg.data, "train"), codec_cfg.sample_rate, cfg.crop_seconds,
                                  random_crop=True, seed=cfg.seed)
        valid_entries = _entries(cfg.data, "valid")[: cfg.valid_clips]
        self.valid_data = AudioDataset(valid_entries, codec_cfg.sample_rate, cfg.crop_seconds,
                                       random_crop=False) if valid_entries else None
        self._start(train_data, collate)

    # -- what the shared loop asks for ---------------------------------------------------------------

    def checkpoint_config(self) -> dict:
        return {"codec": dataclasses.asdict(self.codec_cfg)}

    def checkpoint_models(self) -> dict:
        return {"codec": self.codec, "discriminator": self.disc}

    def optimizers(self) -> dict:
        return {"generator": self.g_opt, "discriminator": self.d_opt}

    def extra_state(self) -> dict:
        return {"balancer": self.balancer.state_dict(), "mmd_generator": self.mmd_generator.get_state(),
                "mmd_history": self._gather([audio.cpu() for audio in self.mmd_history])}

    def load_extra_state(self, state: dict) -> None:
        self.balancer.load_state_dict(state["balancer"])
        self.mmd_generator.set_state(state["mmd_generator"])
        history = state["mmd_history"]
        self.mmd_history.extend(a.to(self.process.device) for a in history[min(self.process.rank, len(history) - 1)])

    def to_device(self, batch: dict) -> torch.Tensor:
        return batch["audio"].to(self.process.device)

    def progress_fields(self, metrics: dict[str, float]) -> dict[str, str]:
        self.last_mmd = metrics.get("mmd", self.last_mmd)  # shown between the steps that compute it
        return {"mel": f"{metrics.get('mel', float('nan')):.3f}", "mmd": f"{self.last_mmd:.2e}"}

    def export(self) -> Path:
        """The trained codec as a model directory: config.json + codec.safetensors."""
        return save_codec(self.codec, self.out / "model")

    # -- training ---------------------------------------------------------------------------------

    def _independence_loss(self, latents: torch.Tensor) -> torch.Tensor:
        """On this micro-batch's stage latents and the re-encoded history; its gradient reaches the encoder."""
        with autocast(self.process, self.cfg.precision):
            macro = torch.cat([latents] + [self.codec.stage_latents(audio) for audio in self.mmd_history])
        # the global-batch loss's gradient reaches each rank's latents exactly; DDP then averages
        return independence_loss(macro.float(), delay=self.cfg.mmd_delay,
                                 generator=self.mmd_generator) * self.process.world

    def _generator_losses(self, audio: torch.Tensor, with_mmd: bool):
        with autocast(self.process, self.cfg.precision):
            out = self.train_model(audio)
        fake = out.audio.float()
        losses = {"l1": waveform_l1(fake, audio), "mel": self.mel(fake, audio)}
        if self.cfg.adversarial:
            fake_logits, fake_features = self.disc(fake)
            with torch.no_grad():
                _, real_features = self.disc(audio)
            losses["adv"] = generator_adversarial_loss(fake_logits)
            losses["feat"] = feature_matching_loss(real_features, fake_features)
        extra = {"commitment": out.quantizer.commitment_loss.float()}
        if with_mmd:
            extra["mmd"] = self._independence_loss(out.quantizer.stage_latents)
        return fake, losses, extra, out.quantizer.perplexity

    def train_step(self, micro_batches: list[torch.Tensor]) -> dict[str, float]:
        cfg = self.cfg
        # the forward passes update the EMA codebooks and the balancer its norms: a skipped step puts them back
        codebooks = {name: b.clone() for name, b in self.codec.quantizer.named_buffers()}
        balancer = self.balancer.state_dict()
        self.g_opt.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        fakes = []
        mmd_step = cfg.mmd_weight > 0 and self.step % cfg.mmd_every == 0
        for index, audio in enumerate(micro_batches):
            with_mmd = mmd_step and index == len(micro_batches) - 1
            fake, losses, extra, perplexity = self._generator_losses(audio, with_mmd)
            self.mmd_history.append(audio)
            values = {**{k: v.item() for k, v in losses.items()}, **{k: v.item() for k, v in extra.items()}}
            for k, v in values.items():  # the step's mean; the independence loss comes once per step
                metrics[k] = metrics.get(k, 0.0) + (v if k == "mmd" else v / len(micro_batches))
            if self.any_rank(not all(map(math.isfinite, values.values()))):
                continue  # the guard below skips the whole step; no backward through non-finite values
            combined, norms = self.balancer.gradient(losses, fake)
            side = cfg.commitment_weight * extra["commitment"] / len(micro_batches)
            if with_mmd:  # once per step, on the whole macro-batch
                side = side + cfg.mmd_weight * extra["mmd"]
            torch.autograd.backward([fake, side], [combined / len(micro_batches), None])
            fakes.append((audio, fake.detach()))
            metrics.update({f"grad_norm_{k}": v for k, v in norms.items()})
            metrics["perplexity"] = float(perplexity.mean())
        if len(fakes) == len(micro_batches):  # finite losses can still overflow in the backward
            metrics["grad_norm"] = float(torch.nn.utils.get_total_norm(
                [p.grad for p in self.codec.parameters() if p.grad is not None]))
            if cfg.adversarial:
                metrics["disc"] = self._discriminator_backward(fakes)
        if not self.guard.check(metrics):
            for name, buffer in self.codec.quantizer.named_buffers():
                buffer.copy_(codebooks[name])
            self.balancer.load_state_dict(balancer)
            self.g_opt.zero_grad(set_to_none=True)
            self.d_opt.zero_grad(set_to_none=True)
            metrics["skipped"] = 1.0
            return metrics
        self.g_opt.step()
        if cfg.adversarial:
            self.d_opt.step()
        return metrics

    def _discriminator_backward(self, fakes: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """The discriminator's gradient on the step's real and (detached) reconstructed audio; its loss."""
        self.d_opt.zero_grad(set_to_none=True)  # drops what the generator's backward left here
        total = 0.0
        for audio, fake in fakes:
            real_logits, _ = self.disc(audio)
            fake_logits, _ = self.disc(fake)
            d_loss = discriminator_loss(real_logits, fake_logits) / len(fakes)
            d_loss.backward()
            total += d_loss.item()
        return total

    @torch.no_grad()
    def validate(self) -> dict:
        if self.valid_data is None:
            return {}
        self.codec.eval()
        mel, snr, codes = [], [], []
        for start in range(0, len(self.valid_data), self.cfg.batch_size):
            batch = collate([self.valid_data[i] for i in range(start, min(start + self.cfg.batch_size,
                                                                          len(self.valid_data)))])
            audio = batch["audio"].to(self.process.device)
            out = self.codec(audio)
            mel.append(self.mel(out.audio, audio).item() * audio.shape[0])
            snr.append(si_snr(out.audio, audio).sum().item())
            codes.append(out.quantizer.codes.cpu())
        self.codec.train()
        count = len(self.valid_data)
        dependence = dependence_report(torch.cat(codes), delay=True)
        return {"mel_distance": sum(mel) / count, "si_snr_db": sum(snr) / count,
                "mi_percent_delay": dependence["mean_pairwise_mi_percent"],
                "mi_percent_delay_baseline": dependence["baseline_mean_pairwise_mi_percent"]}
