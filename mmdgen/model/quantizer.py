"""Residual vector quantizer (RVQ) as in EnCodec: EMA codebooks, k-means initialisation, dead-code
replacement, straight-through gradients, commitment loss and quantizer dropout.

Shapes follow EnCodec: latents ``[B, D, T]``, codes ``[B, K, T]``. Besides the quantized sum, the
forward pass returns the per-stage latents ``[B, K, D, T]`` that the independence loss takes. Which
tensor stands for stage k is a switch (``stage_latent``), as it changed across the authors' commits:
``"quantized"`` (stage k's codeword), ``"residual_after"`` (what is left after stage k) or
``"residual_before"`` (stage k's input). All of them pass the gradient straight to the encoder output
(each stage's residual is ``x`` minus detached codewords); they differ in the values the loss sees.

Under torch.distributed the EMA statistics are summed over ranks and the k-means initialisation and
dead-code replacements come from rank 0, so every rank keeps the same codebooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmdgen.choices import StageLatent
from mmdgen.kernels.vq import nearest_codeword
from mmdgen.validation import check_fields, option

@dataclass
class QuantizerConfig:
    dim: int = option(128, "the latents' width", at_least=1)
    codebook_size: int = option(2048, "codewords per stage", at_least=1)
    num_codebooks: int = option(4, "stages (codebooks)", at_least=1)
    decay: float = option(0.99, "the EMA codebooks' decay", at_least=0, below=1)
    epsilon: float = option(1e-5, "Laplace smoothing of the EMA cluster sizes", above=0)
    kmeans_init: bool = option(True, "initialise each codebook by k-means on its first batch")
    kmeans_iters: int = option(50, "k-means iterations", at_least=0)
    dead_code_threshold: float = option(2.0, "EMA cluster size below which a codeword is replaced", at_least=0)
    dropout: bool = option(False, "train with a random number of stages (for variable bandwidth)")
    stage_latent: StageLatent = option("quantized", "what stands for stage k in the per-stage latents")

    def __post_init__(self):
        check_fields(self)


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # [B, D, T], straight-through to the input
    codes: torch.Tensor  # [B, K, T] int64 (K = stages used)
    stage_latents: torch.Tensor  # [B, K, D, T]
    commitment_loss: torch.Tensor  # mean over stages of mean |r_k - q_k|^2
    perplexity: torch.Tensor  # [K] codebook usage in this batch (exp of the code entropy)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(tensor)
    return tensor


def _broadcast(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(tensor, src=0)
    return tensor


def kmeans_plus_plus(vectors: torch.Tensor, clusters: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to its squared distance
    to the nearest centre so far (so separated clusters each get a centre)."""
    n = vectors.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [vectors[first]]
    nearest = (vectors - vectors[first]).square().sum(1)
    for _ in range(1, clusters):
        weights = nearest.double().cpu()
        index = int(torch.multinomial(weights, 1, generator=generator)) if weights.sum() > 0 else \
            int(torch.randint(n, (1,), generator=generator))
        centres.append(vectors[index])
        nearest = torch.minimum(nearest, (vectors - vectors[index]).square().sum(1))
    return torch.stack(centres).clone()


def kmeans(vectors: torch.Tensor, clusters: int, iters: int, generator: torch.Generator | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on ``[N, D]`` vectors from a k-means++ start: (centroids [clusters, D], sizes).

    An emptied cluster keeps its previous centroid (dead-code replacement deals with it later).
    """
    centroids = kmeans_plus_plus(vectors, clusters, generator)
    sizes = torch.zeros(clusters, dtype=vectors.dtype, device=vectors.device)
    for _ in range(iters):
        assign, _ = nearest_codeword(vectors, centroids)
        sizes = torch.bincount(assign, minlength=clusters).to(vectors.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, vectors)
        filled = sizes > 0
        centroids[filled] = sums[filled] / sizes[filled, None]
    return centroids, sizes


class EMACodebook(nn.Module):
    """One stage: a codebook whose vectors follow the EMA of the residuals assigned to them."""

    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("initialized", torch.tensor([float(not cfg.kmeans_init)]))  # [1] as in EnCodec
        embed = torch.randn(cfg.codebook_size, cfg.dim) if not cfg.kmeans_init else torch.zeros(cfg.codebook_size, cfg.dim)
        self.register_buffer("embed", embed)
        self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("cluster_size", torch.ones(cfg.codebook_size) if not cfg.kmeans_init
                             else torch.zeros(cfg.codebook_size))

    def encode(self, vectors: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [N] nearest codeword indices."""
        return nearest_codeword(vectors.to(self.embed.dtype), self.embed)[0]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.embed)

    @torch.no_grad()
    @torch.compiler.disable  # random draws: inductor would draw them from its own generator, not torch's
    def initialize(self, vectors: torch.Tensor) -> None:
        """k-means on the first training batch (rank 0's, broadcast)."""
        centroids, sizes = kmeans(vectors.float(), self.cfg.codebook_size, self.cfg.kmeans_iters)
        self.embed.copy_(_broadcast(centroids))
        self.cluster_size.copy_(_broadcast(sizes))
        self.embed_sum.copy_(self.embed * self.cluster_size[:, None])
        self.initialized.fill_(1.0)

    @torch.no_grad()
    def update(self, vectors: torch.Tensor, codes: torch.Tensor) -> None:
        """EMA of counts and sums over all ranks; Laplace-smoothed means; dead codes replaced."""
        cfg = self.cfg
        vectors = vectors.float()
        counts = _all_reduce_sum(torch.bincount(codes, minlength=cfg.codebook_size).float())
        sums = _all_reduce_sum(torch.zeros_like(self.embed).index_add_(0, codes, vectors))
        self.cluster_size.mul_(cfg.decay).add_(counts, alpha=1 - cfg.decay)
        self.embed_sum.mul_(cfg.decay).add_(sums, alpha=1 - cfg.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + cfg.epsilon) / (total + cfg.codebook_size * cfg.epsilon) * total
        self.embed.copy_(self.embed_sum / smoothed[:, None])
        self._replace_dead_codes(vectors)

    @torch.compiler.disable  # random draws: inductor would draw them from its own generator, not torch's
    def _replace_dead_codes(self, vectors: torch.Tensor) -> None:
        dead = self.cluster_size < self.cfg.dead_code_threshold
        if not bool(dead.any()):
            return
        picks = torch.randint(vectors.shape[0], (int(dead.sum()),), device=vectors.device)
        fresh = torch.zeros_like(self.embed)
        fresh[dead] = vectors[picks]
        fresh = _broadcast(fresh)
        self.embed[dead] = fresh[dead]
        self.embed_sum[dead] = fresh[dead] * self.cfg.dead_code_threshold
        self.cluster_size[dead] = self.cfg.dead_code_threshold


class ResidualVectorQuantizer(nn.Module):
    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.cfg = cfg
        self.stages = nn.ModuleList(EMACodebook(cfg) for _ in range(cfg.num_codebooks))

    @torch.compiler.disable  # a random draw (see EMACodebook.initialize)
    def _stages_to_use(self) -> int:
        if self.training and self.cfg.dropout:
            count = torch.randint(1, self.cfg.num_codebooks + 1, (1,), device=self.stages[0].embed.device)
            return int(_broadcast(count)[0])
        return self.cfg.num_codebooks

    # eager inside a compiled codec: data-dependent throughout (k-means on the first batch, random dead-code draws,
    # code counts), compiled it broke into a dozen graphs
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        """x: [B, D, T] encoder output."""
        if x.dim() != 3 or x.shape[1] != self.cfg.dim:
            raise ValueError(f"expected latents [B, {self.cfg.dim}, T], got {tuple(x.shape)}")
        batch, dim, frames = x.shape
        flat = x.transpose(1, 2).reshape(-1, dim)  # [N, D]
        residual = flat
        quantized_sum = torch.zeros_like(flat)
        codes, latents, commitment, perplexity = [], [], [], []
        for stage in self.stages[: self._stages_to_use()]:
            target = residual.detach()
            if self.training and not bool(stage.initialized):
                stage.initialize(target)
            stage_codes = stage.encode(target)
            codeword = stage.decode(stage_codes).to(flat.dtype)
            if self.training:
                stage.update(target, stage_codes)
            commitment.append(F.mse_loss(residual, codeword.detach()))
            latents.append(self._stage_latent(residual, codeword))
            codes.append(stage_codes)
            perplexity.append(_perplexity(stage_codes, self.cfg.codebook_size))
            quantized_sum = quantized_sum + codeword.detach()
            residual = residual - codeword.detach()
        quantized = flat + (quantized_sum - flat).detach()
        k = len(codes)
        return QuantizerOutput(
            quantized=quantized.reshape(batch, frames, dim).transpose(1, 2),
            codes=torch.stack(codes, 1).reshape(batch, frames, k).transpose(1, 2),
            stage_latents=torch.stack(latents, 1).reshape(batch, frames, k, dim).permute(0, 2, 3, 1),
            commitment_loss=torch.stack(commitment).mean(),
            perplexity=torch.stack(perplexity),
        )

    def _stage_latent(self, residual: torch.Tensor, codeword: torch.Tensor) -> torch.Tensor:
        """What the independence loss sees for one stage, its gradient passed straight to the input."""
        value = {"quantized": codeword, "residual_after": residual - codeword,
                 "residual_before": residual}[self.cfg.stage_latent]
        return residual + (value - residual).detach()

    def stage_latents(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D, T] -> the per-stage latents [B, K, D, T] of all stages with the current codebooks, without
        updating them (re-encoding past batches for the independence loss's macro-batch)."""
        batch, dim, frames = x.shape
        residual = x.transpose(1, 2).reshape(-1, dim)
        latents = []
        for stage in self.stages:
            codeword = stage.decode(stage.encode(residual.detach())).to(residual.dtype)
            latents.append(self._stage_latent(residual, codeword))
            residual = residual - codeword.detach()
        return torch.stack(latents, 1).reshape(batch, frames, len(latents), dim).permute(0, 2, 3, 1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, num_codebooks: int | None = None) -> torch.Tensor:
        """[B, D, T] -> codes [B, K, T] with the current codebooks (no update)."""
        batch, dim, frames = x.shape
        residual = x.transpose(1, 2).reshape(-1, dim)
        codes = []
        for stage in self.stages[: num_codebooks or self.cfg.num_codebooks]:
            stage_codes = stage.encode(residual)
            residual = residual - stage.decode(stage_codes).to(residual.dtype)
            codes.append(stage_codes)
        return torch.stack(codes, 1).reshape(batch, frames, len(codes)).transpose(1, 2)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] -> quantized latents [B, D, T] (the sum of the stages' codewords)."""
        if codes.dim() != 3 or codes.shape[1] > self.cfg.num_codebooks:
            raise ValueError(f"expected codes [B, K <= {self.cfg.num_codebooks}, T], got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.cfg.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.cfg.codebook_size}), got values in "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        out = sum(stage.decode(codes[:, k]) for k, stage in enumerate(self.stages[: codes.shape[1]]))
        return out.transpose(1, 2)


def _perplexity(codes: torch.Tensor, size: int) -> torch.Tensor:
    probs = torch.bincount(codes, minlength=size).float() / max(codes.numel(), 1)
    return torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
