"""Train the EnCodec-MMD codec: reconstruction (L1, multi-scale mel), adversarial and feature-matching
losses through EnCodec's balancer, commitment, and the independence loss on the per-stage latents.

    mmdgen train codec --preset tiny --data data/corpus/manifest.jsonl --mmd-weight 1e4 --mmd-delay

The balanced losses set the gradient reaching the decoder output; commitment and the independence loss
(weight ``mmd_weight``, on the global batch under DDP) backpropagate beside them. The discriminator
trains on the same step's detached reconstructions. A run folder holds ``checkpoint/`` (resumed
automatically), ``metrics.jsonl`` and the final ``model/`` (config.json + codec.safetensors).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mmdgen.eval.independence import dependence_report
from mmdgen.kernels.mmd import independence_loss
from mmdgen.model.codec import Codec, codec_config, save_codec
from mmdgen.model.discriminator import (DiscriminatorConfig, MultiScaleSTFTDiscriminator, discriminator_loss,
                                        feature_matching_loss, generator_adversarial_loss)
from mmdgen.train.data import AudioDataset, ShardedSampler, collate, folder_entries, manifest_entries
from mmdgen.train.loop import (MetricLog, NonFiniteGuard, Process, autocast, checkpoint_folder, load_state,
                               load_weights, rng_state, save_checkpoint, seed_everything, set_rng_state,
                               setup_process)
from mmdgen.train.losses import Balancer, MultiScaleMelLoss, waveform_l1


@dataclass
class CodecTrainConfig:
    data: str = ""  # a manifest (its "train"/"valid" splits) or a folder of audio files
    out: str = "runs/codec"
    preset: str = "tiny"
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    crop_seconds: float = 1.0
    lr: float = 3e-4
    betas: tuple[float, float] = (0.5, 0.9)
    mmd_weight: float = 0.0
    mmd_delay: bool = False
    mmd_every: int = 1
    stage_latent: str = "quantized"
    l1_weight: float = 0.1
    mel_weight: float = 2.0
    adv_weight: float = 4.0
    feat_weight: float = 4.0
    commitment_weight: float = 1.0
    adversarial: bool = True
    disc_filters: int = 32
    precision: str = "auto"
    compile: bool = False
    device: str = "auto"
    log_every: int = 10
    ckpt_every: int = 100
    valid_every: int = 200
    valid_clips: int = 16
    max_nonfinite: int = 10
    workers: int = 0
    seed: int = 0

    def check(self) -> None:
        problems = []
        for name in ("steps", "batch_size", "grad_accum", "mmd_every", "log_every", "ckpt_every", "valid_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.mmd_weight < 0:
            problems.append(f"mmd_weight must be >= 0, got {self.mmd_weight}")
        if not self.data:
            problems.append("data is required: a manifest.jsonl or a folder of audio files")
        elif not Path(self.data).exists():
            problems.append(f"data {self.data}: no such file or folder")
        if problems:
            raise ValueError("; ".join(problems))

    def identity(self) -> dict:
        """What a resumed run must share with the checkpoint (all but the length and the bookkeeping)."""
        fields = dataclasses.asdict(self)
        for free in ("steps", "out", "log_every", "ckpt_every", "valid_every", "workers", "device", "compile"):
            fields.pop(free)
        fields["betas"] = list(self.betas)
        return fields


def _entries(data: str, split: str):
    path = Path(data)
    if path.is_dir():
        return folder_entries(path) if split == "train" else []
    return manifest_entries(path, split)


def si_snr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant signal-to-noise ratio in dB, per item ([B, C, L] -> [B])."""
    estimate = estimate - estimate.mean(-1, keepdim=True)
    reference = reference - reference.mean(-1, keepdim=True)
    scale = (estimate * reference).sum(-1, keepdim=True) / (reference.square().sum(-1, keepdim=True) + eps)
    target = scale * reference
    noise = estimate - target
    ratio = target.square().sum((-1, -2)) / (noise.square().sum((-1, -2)) + eps)
    return 10 * torch.log10(ratio + eps)


class CodecTrainer:
    def __init__(self, cfg: CodecTrainConfig, process: Process | None = None, progress: bool = True):
        cfg.check()
        self.cfg, self.progress = cfg, progress
        self.process = process or setup_process(cfg.device)
        self.out = Path(cfg.out)
        seed_everything(cfg.seed)
        codec_cfg = codec_config(cfg.preset)
        codec_cfg.quantizer.stage_latent = cfg.stage_latent
        self.codec_cfg = codec_cfg
        device = self.process.device
        self.codec = Codec(codec_cfg).to(device)
        self.disc = MultiScaleSTFTDiscriminator(DiscriminatorConfig(filters=cfg.disc_filters)).to(device)
        self.g_opt = torch.optim.Adam(self.codec.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.d_opt = torch.optim.Adam(self.disc.parameters(), lr=cfg.lr, betas=cfg.betas)
        weights = {"l1": cfg.l1_weight, "mel": cfg.mel_weight}
        if cfg.adversarial:
            weights.update(adv=cfg.adv_weight, feat=cfg.feat_weight)
        self.balancer = Balancer(weights)
        self.mel = MultiScaleMelLoss(codec_cfg.sample_rate).to(device)
        self.mmd_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.guard = NonFiniteGuard(cfg.max_nonfinite)
        self.step, self.epoch, self.consumed = 0, 0, 0
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
        self.train_data = AudioDataset(_entries(cfg.data, "train"), codec_cfg.sample_rate, cfg.crop_seconds,
                                       random_crop=True, seed=cfg.seed)
        valid_entries = _entries(cfg.data, "valid")[: cfg.valid_clips]
        self.valid_data = AudioDataset(valid_entries, codec_cfg.sample_rate, cfg.crop_seconds,
                                       random_crop=False) if valid_entries else None
        self.sampler = ShardedSampler.for_current_process(len(self.train_data), seed=cfg.seed)
        if self.sampler.per_rank < cfg.batch_size * cfg.grad_accum:
            raise ValueError(f"{self.sampler.per_rank} training clips per rank cannot fill one step of "
                             f"{cfg.grad_accum} x {cfg.batch_size}")
        self.log = MetricLog(self.out, enabled=self.process.main)
        self._resume()

    # -- checkpoints ------------------------------------------------------------------------------

    def _config(self) -> dict:
        return {"train": self.cfg.identity(), "codec": dataclasses.asdict(self.codec_cfg)}

    def _resume(self) -> None:
        folder = checkpoint_folder(self.out / "checkpoint")
        if folder is None:
            return
        saved = json.loads((folder / "config.json").read_text())
        if saved != json.loads(json.dumps(self._config())):
            differing = sorted(k for k in saved["train"] if saved["train"].get(k) != self.cfg.identity().get(k))
            raise ValueError(f"{folder} was written by a run with another configuration (differs in "
                             f"{differing or 'the codec'}); use another --out to start afresh")
        load_weights(self.codec, folder / "codec.safetensors")
        load_weights(self.disc, folder / "discriminator.safetensors")
        state = load_state(folder)
        self.g_opt.load_state_dict(state["g_opt"])
        self.d_opt.load_state_dict(state["d_opt"])
        self.balancer.load_state_dict(state["balancer"])
        self.step, self.epoch, self.consumed = state["step"], state["epoch"], state["consumed"]
        self.guard.skipped = state["skipped"]
        set_rng_state(state["rng"][self.process.rank] if self.process.rank < len(state["rng"]) else state["rng"][0])
        self.mmd_generator.set_state(state["mmd_generator"])
        self.log.truncate_after(self.step)

    def _save(self) -> None:
        rngs = [rng_state()]
        if self.process.world > 1:
            rngs = [None] * self.process.world
            torch.distributed.all_gather_object(rngs, rng_state())
        if not self.process.main:
            return
        state = {"step": self.step, "epoch": self.epoch, "consumed": self.consumed, "skipped": self.guard.skipped,
                 "g_opt": self.g_opt.state_dict(), "d_opt": self.d_opt.state_dict(),
                 "balancer": self.balancer.state_dict(), "rng": rngs,
                 "mmd_generator": self.mmd_generator.get_state()}
        save_checkpoint(self.out / "checkpoint", self._config(), {"codec": self.codec, "discriminator": self.disc},
                        state)

    def export(self) -> Path:
        """The trained codec as a model directory: config.json + codec.safetensors."""
        return save_codec(self.codec, self.out / "model")

    # -- training ---------------------------------------------------------------------------------

    def _batches(self):
        """Micro-batches from the current data position, moving to the next epoch at the end of one."""
        while True:
            self.train_data.set_epoch(self.epoch)
            self.sampler.set_position(self.epoch, self.consumed)
            # its own generator: a loader drawing its worker seed from the global RNG would shift every later
            # random draw when a resumed run builds one mid-epoch
            loader = torch.utils.data.DataLoader(self.train_data, batch_size=self.cfg.batch_size, sampler=self.sampler,
                                                 collate_fn=collate, drop_last=True, num_workers=self.cfg.workers,
                                                 generator=torch.Generator().manual_seed(self.cfg.seed + self.epoch))
            for batch in loader:
                self.consumed += self.cfg.batch_size
                yield batch["audio"].to(self.process.device)
            self.epoch, self.consumed = self.epoch + 1, 0

    def _generator_losses(self, audio: torch.Tensor):
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
        if self.cfg.mmd_weight > 0 and self.step % self.cfg.mmd_every == 0:
            # the global-batch loss's gradient reaches each rank's latents exactly; DDP then averages
            extra["mmd"] = independence_loss(out.quantizer.stage_latents.float(), delay=self.cfg.mmd_delay,
                                             generator=self.mmd_generator) * self.process.world
        return fake, losses, extra, out.quantizer.perplexity

    def train_step(self, micro_batches: list[torch.Tensor]) -> dict[str, float]:
        cfg = self.cfg
        self.g_opt.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        fakes = []
        for audio in micro_batches:
            fake, losses, extra, perplexity = self._generator_losses(audio)
            values = {**{k: v.item() for k, v in losses.items()}, **{k: v.item() for k, v in extra.items()}}
            for k, v in values.items():
                metrics[k] = metrics.get(k, 0.0) + v / len(micro_batches)
            if not all(map(lambda v: v == v and abs(v) != float("inf"), values.values())):
                continue  # the guard below skips the whole step; no backward through non-finite values
            combined, norms = self.balancer.gradient(losses, fake)
            side = cfg.commitment_weight * extra["commitment"] + cfg.mmd_weight * extra.get("mmd", 0.0)
            torch.autograd.backward([fake, side / len(micro_batches)], [combined / len(micro_batches), None])
            fakes.append((audio, fake.detach()))
            metrics.update({f"grad_norm_{k}": v for k, v in norms.items()})
            metrics["perplexity"] = float(perplexity.mean())
        if not self.guard.check(metrics, self.step):
            self.g_opt.zero_grad(set_to_none=True)
            metrics["skipped"] = 1.0
            return metrics
        self.g_opt.step()
        if cfg.adversarial:
            self.d_opt.zero_grad(set_to_none=True)  # drops what the generator's backward left here
            for audio, fake in fakes:
                real_logits, _ = self.disc(audio)
                fake_logits, _ = self.disc(fake)
                d_loss = discriminator_loss(real_logits, fake_logits) / len(fakes)
                d_loss.backward()
                metrics["disc"] = metrics.get("disc", 0.0) + d_loss.item()
            self.d_opt.step()
        return metrics

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

    def train(self) -> dict:
        cfg = self.cfg
        batches = self._batches()
        start_step, start_time = self.step, time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="codec", unit="step",
                   disable=not (self.progress and self.process.main))
        last = {}
        while self.step < cfg.steps:
            metrics = self.train_step([next(batches) for _ in range(cfg.grad_accum)])
            self.step += 1
            rate = (self.step - start_step) / (time.perf_counter() - start_time)
            bar.update(1)
            bar.set_postfix(mel=f"{metrics.get('mel', float('nan')):.3f}",
                            mmd=f"{metrics.get('mmd', 0.0):.2e}", steps_s=f"{rate:.2f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.log.write("train", self.step, {**metrics, "steps_per_s": rate, "skipped_total": self.guard.skipped})
            if self.process.main and (self.step % cfg.valid_every == 0 or self.step == cfg.steps):
                last = self.validate()
                if last:
                    self.log.write("valid", self.step, last)
                    bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()))
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self._save()
        bar.close()
        if self.process.main:
            self.export()
        return last
