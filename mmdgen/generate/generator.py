"""``Generator``: text to music with any model ``mmdgen.pretrained.load_music_model`` reads; see ``mmdgen.generate``.

Stereo LMs (``LMConfig.audio_channels == 2``) predict 2K codebooks, left and right interleaved; each channel's K
codebooks go through the mono codec, and the waveforms have two channels.

Melody LMs (MusicGen-melody) take ``melody=`` audio ``[1 or B, channels, samples]`` (at ``melody_sample_rate``,
default the codec's): its chroma (``mmdgen.model.melody``) goes before the text in the LM's prefix; without a
melody, and in guidance's null rows, the null melody does. Beyond the LM's context each window hears the melody
from its own start time on, looped when the recording is shorter (audiocraft's rule for extended generation).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, get_args

import torch

from mmdgen.choices import CpuLinear
from mmdgen.generate.config import Sampling
from mmdgen.generate.loop import DecodeRuntime, decode
from mmdgen.model.codec import Codec
from mmdgen.model.lm import MusicLM
from mmdgen.model.melody import ChromaConfig, ChromaExtractor, null_chroma
from mmdgen.model.packing import pack_lm, packing_unavailable_for, unpack_lm
from mmdgen.model.patterns import make_pattern
from mmdgen.model.quantize import quantize_lm
from mmdgen.model.text import TextConditioner
from mmdgen.pretrained.loader import load_music_model
from mmdgen.validation import MAX_SECONDS, check_number

CPU_LINEARS = get_args(CpuLinear)


class Window(NamedTuple):
    """One decode call of a generation: frames ``[start, start + frames)`` of the whole, the first ``overlap`` of
    them given as its prompt; ``before``: the codes final before it (None for the first window)."""

    start: int
    frames: int
    overlap: int
    before: torch.Tensor | None


class Generator:
    def __init__(self, lm: MusicLM, text: TextConditioner, codec: Codec, backend: str = "auto", compile: bool = False,
                 cuda_graph: bool = False, quantize: str | None = None, chroma: ChromaExtractor | None = None,
                 cpu_linear: str = "auto", kv_cache: str = "model"):
        """``backend``, ``compile``, ``cuda_graph``, ``kv_cache``: how the decode step runs (``runtime``, a
        ``DecodeRuntime``: the fused ops' implementation; the step through torch.compile, faster after a compile per
        shape; on CUDA, the step captured in a CUDA graph and replayed every step; the KV cache in the LM's dtype,
        or in bfloat16/float16 under a float32 LM). ``quantize`` ("int8", "int8-dynamic"): the
        decoder's and heads' weights in int8 (``quantize_lm``, in place), unless the LM already holds them;
        ``chroma``: a melody LM's chroma extractor (default: transformers' settings at the codec's rate).

        ``cpu_linear`` (``choices.CpuLinear``): a float LM's per-step linear layers on CPU: ``"packed"``, their
        weights held packed by oneDNN (``mmdgen.model.packing.pack_lm``: the same results to fp32 rounding, read
        at several times the speed on some CPUs); ``"plain"``, ``nn.Linear`` (torch's ``F.linear``, MKL on x86);
        ``"auto"``, packed where that is possible (a float32/bfloat16 LM on a CPU with oneDNN, not quantized),
        plain elsewhere. Like ``quantize``, packing and unpacking replace the layers of the LM given in place
        (its state dict stays the same)."""
        if cpu_linear not in CPU_LINEARS:
            raise ValueError(f"Generator: cpu_linear must be one of {', '.join(CPU_LINEARS)}, got {cpu_linear!r}")
        quantizer, channels = codec.cfg.quantizer, lm.cfg.audio_channels
        if (quantizer.num_codebooks * channels, quantizer.codebook_size) != (lm.cfg.num_codebooks,
                                                                             lm.cfg.codebook_size):
            per_channel = f" ({channels} channels)" if channels > 1 else ""
            raise ValueError(f"the codec makes {quantizer.num_codebooks} x {quantizer.codebook_size} codes but the LM "
                             f"predicts {lm.cfg.num_codebooks} x {lm.cfg.codebook_size}{per_channel}")
        if channels > 1 and codec.cfg.channels != 1:
            raise ValueError(f"a stereo LM decodes each channel with a mono codec; this codec has "
                             f"{codec.cfg.channels} channels")
        if quantize not in (None, "none", getattr(lm, "quantization", None)):
            if getattr(lm, "quantization", None) is not None:
                raise ValueError(f"the LM's weights are already {lm.quantization}; {quantize} asked for")
            quantize_lm(lm, quantize)
        self._choose_linears(lm, cpu_linear)
        self.lm, self.text, self.codec = lm.eval(), text.eval(), codec.eval()
        self.device = lm.device
        self.runtime = DecodeRuntime(backend, compile, cuda_graph, kv_cache)
        self.runtime.check(self.device)
        self.runtime.cache_dtype(lm)  # refused here rather than at the first generation
        self.pattern = make_pattern(lm.cfg.pattern, lm.cfg.num_codebooks, lm.cfg.delays)
        self.chroma = self._chroma_extractor(chroma)

    @staticmethod
    def _choose_linears(lm: MusicLM, cpu_linear: str) -> None:
        reason = packing_unavailable_for(lm)
        if cpu_linear == "packed" and reason is not None:
            raise ValueError(f"cpu_linear='packed': the LM's linear layers cannot be packed: {reason}; expected a "
                             "float32 or bfloat16 LM on a CPU with oneDNN (cpu_linear='auto' packs only there)")
        if cpu_linear == "plain" or reason is not None:
            unpack_lm(lm)
        else:
            pack_lm(lm)

    def _chroma_extractor(self, chroma: ChromaExtractor | None) -> ChromaExtractor | None:
        bins = self.lm.cfg.melody_dim
        if bins is None:
            if chroma is not None:
                raise ValueError("a chroma extractor was given, but this LM takes no melody (LMConfig.melody_dim is "
                                 "None)")
            return None
        if chroma is None:
            chroma = ChromaExtractor(ChromaConfig(sample_rate=self.codec.cfg.sample_rate, num_chroma=bins))
        if chroma.cfg.num_chroma != bins:
            raise ValueError(f"the chroma extractor makes {chroma.cfg.num_chroma} classes, the LM takes {bins}")
        return chroma.to(self.device)

    @classmethod
    def from_pretrained(cls, model: str | Path, codec: str | Path | None = None, device: str = "cpu",
                        backend: str = "auto", compile: bool = False, cuda_graph: bool = False,
                        text_encoder: str | Path | None = None, quantize: str | None = None,
                        cpu_linear: str = "auto", kv_cache: str = "model") -> "Generator":
        """``model`` in any format ``load_music_model`` reads (detected by content); ``codec``: another codec to
        decode with; ``text_encoder``: the T5 folder or cache id an audiocraft checkpoint needs; ``quantize``: int8
        weights; ``cpu_linear``: packed or plain linear layers on CPU; ``kv_cache``: the KV cache's dtype (see
        ``__init__``)."""
        parts = load_music_model(model, codec, text_encoder, device)
        return cls(parts.lm, parts.text, parts.codec, backend, compile, cuda_graph, quantize, parts.chroma,
                   cpu_linear, kv_cache)

    @property
    def backend(self) -> str:
        """The kernel backend every op of a generation uses (the runtime's)."""
        return self.runtime.backend

    @property
    def channels(self) -> int:
        return self.lm.cfg.audio_channels

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio [B, channels, samples] -> the LM's codes [B, K, frames]: for a stereo LM each channel encoded by
        the mono codec and the codebooks interleaved (a mono prompt serves both channels)."""
        if self.channels == 1:
            return self.codec.encode(audio)
        if audio.shape[1] not in (1, self.channels):
            raise ValueError(f"a stereo model takes mono or stereo audio, got {audio.shape[1]} channels")
        audio = audio.expand(-1, self.channels, -1)
        codes = [self.codec.encode(audio[:, c: c + 1]) for c in range(self.channels)]
        return torch.stack(codes, dim=2).flatten(1, 2)  # [B, K, C] -> left k, right k, left k+1, ...

    def decode(self, codes: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """The LM's codes [B, K, frames] -> audio [B, channels, samples]."""
        if self.channels == 1:
            return self.codec.decode(codes, length)
        return torch.cat([self.codec.decode(codes[:, c:: self.channels], length) for c in range(self.channels)],
                         dim=1)

    @property
    def sample_rate(self) -> int:
        return self.codec.cfg.sample_rate

    def frames(self, duration: float, name: str = "duration") -> int:
        """The codec frames of ``duration`` seconds; ValueError naming ``name`` unless it is a finite number of
        seconds, at most ``MAX_SECONDS``, that holds at least one frame."""
        check_number(duration, name, above=0, at_most=MAX_SECONDS)
        frames = int(round(duration * self.codec.cfg.frame_rate))
        if frames < 1:
            raise ValueError(f"{name} must hold at least one frame of the codec ({1 / self.codec.cfg.frame_rate:g} s), "
                             f"got {duration:g} s")
        return frames

    @torch.no_grad()
    def _memory(self, texts: list[str], guided: bool, melody: torch.Tensor | None = None):
        """The LM's conditioning, 2B rows with guidance (conditional, then null): the text's cross-attention memory,
        or a prefix LM's prefix states (``melody``: the chroma [B, T, classes] of the conditional rows)."""
        texts = list(texts)
        if not texts:
            raise ValueError("no prompts: expected at least one text")
        condition = self.text(texts + [""] * len(texts) if guided else texts)
        states, mask = condition.states.to(self.device), condition.mask.to(self.device)
        if self.lm.cfg.conditioning == "cross":
            return self.lm.cross_memory(states, mask)
        if melody is not None and guided:
            melody = torch.cat([melody, null_chroma(*melody.shape, melody.dtype, melody.device)])
        return self.lm.prefix(states, mask, melody)

    def _melody_chroma(self, audio: torch.Tensor, sample_rate: int | None, batch: int,
                       start_frame: int) -> torch.Tensor:
        """[B, T, classes]: the chroma of the melody heard from frame ``start_frame`` of the generation on."""
        if self.chroma is None:
            raise ValueError("this model takes no melody (a MusicGen-melody checkpoint does); generate without one")
        if not isinstance(audio, torch.Tensor) or audio.dim() != 3 or audio.shape[0] not in (1, batch):
            found = tuple(audio.shape) if isinstance(audio, torch.Tensor) else type(audio).__name__
            raise ValueError(f"melody audio must be [1 or {batch}, channels, samples], got {found}")
        sample_rate = self.sample_rate if sample_rate is None else sample_rate
        if start_frame and audio.shape[-1]:  # looped from the window's start time (the first window's was checked)
            shift = round(start_frame / self.codec.cfg.frame_rate * sample_rate) % audio.shape[-1]
            audio = audio.roll(-shift, dims=-1)
        return self.chroma(audio, sample_rate).expand(batch, -1, -1)

    @property
    def context_frames(self) -> int | None:
        """The frames the LM was trained on at once; longer audio is generated in windows of this length."""
        return self.lm.cfg.context_frames

    @torch.no_grad()
    def generate_codes(self, texts: list[str], duration: float = 10.0, sampling: Sampling | None = None,
                       seed: int = 0, prompt_audio: torch.Tensor | None = None, on_step=None,
                       extend_stride: float | None = None, melody: torch.Tensor | None = None,
                       melody_sample_rate: int | None = None) -> torch.Tensor:
        """Codes [B, K, frames] for ``duration`` seconds (including a prompt's, which it continues); ``melody``
        (melody LMs): audio [1 or B, channels, samples] at ``melody_sample_rate`` (default the codec's).

        Beyond the LM's context (``context_frames``) the audio is generated in windows, as audiocraft does: the
        first window fills the context; each next one is prompted with the last ``context - stride`` frames and
        adds ``stride`` frames (``extend_stride`` seconds; default 60% of the context, audiocraft's 18 s of 30).
        ``on_step(step, sequence)`` is called after each decoding step of each window (the window's sequence).
        """
        return self._windows(texts, duration, sampling, seed, prompt_audio, extend_stride,
                             lambda window: on_step, melody, melody_sample_rate)

    def _windows(self, texts, duration, sampling, seed, prompt_audio, extend_stride, window_hook, melody=None,
                 melody_sample_rate=None) -> torch.Tensor:
        """The codes, window by window; ``window_hook(Window)`` gives each window's ``on_step`` (or None)."""
        sampling = sampling or Sampling()
        frames = self.frames(duration)
        prompt = self._prompt_codes(prompt_audio, len(texts), frames)
        generator = torch.Generator(self.device).manual_seed(seed)
        guided = sampling.guidance_scale is not None

        def memory_from(start_frame: int):  # a melody changes with the window; the text alone does not
            return self._memory(texts, guided, None if melody is None else self._melody_chroma(
                melody, melody_sample_rate, len(texts), start_frame))

        memory = memory_from(0)
        context = self.context_frames or frames
        stride = self._stride_frames(context, extend_stride)
        if prompt is not None and prompt.shape[-1] >= context:
            raise ValueError(f"the prompt is {prompt.shape[-1]} frames long, not shorter than the LM's context of "
                             f"{context} frames: give a shorter prompt")
        codes, first = prompt, True
        while first or codes.shape[-1] < frames:
            done = 0 if codes is None else codes.shape[-1]
            overlap = done if first else context - stride  # the frames the window is prompted with
            window = Window(done - overlap, min(context, frames - done + overlap), overlap, codes)
            if melody is not None and window.start:
                memory = memory_from(window.start)
            part = decode(self.lm, memory, len(texts), window.frames, self.pattern, sampling, generator=generator,
                          prompt=codes[..., done - overlap:] if overlap else None, on_step=window_hook(window),
                          runtime=self.runtime)
            codes = part if codes is None else torch.cat([codes, part[..., overlap:]], dim=-1)
            first = False
        return codes

    def _stride_frames(self, context: int, extend_stride: float | None) -> int:
        if extend_stride is None:
            return max(int(context * 0.6), 1)
        check_number(extend_stride, "extend_stride", above=0, at_most=MAX_SECONDS)
        stride = int(round(extend_stride * self.codec.cfg.frame_rate))
        if not 1 <= stride < context or extend_stride <= 0:
            raise ValueError(f"extend_stride must be positive and shorter than the LM's context of {context} "
                             f"frames ({context / self.codec.cfg.frame_rate:g} s), got {extend_stride} s")
        return stride

    def _prompt_codes(self, audio: torch.Tensor | None, batch: int, frames: int) -> torch.Tensor | None:
        if audio is None:
            return None
        if audio.dim() != 3 or audio.shape[0] not in (1, batch):
            raise ValueError(f"prompt audio must be [1 or {batch}, channels, samples], got {tuple(audio.shape)}")
        codes = self.encode(audio.to(self.device)).expand(batch, -1, -1)
        if codes.shape[-1] >= frames:
            raise ValueError(f"the prompt is {codes.shape[-1]} frames long, not shorter than the {frames} frames asked "
                             "for: ask for a longer duration")
        return codes

    def generate(self, texts: list[str], duration: float = 10.0, sampling: Sampling | None = None, seed: int = 0,
                 prompt_audio: torch.Tensor | None = None, melody: torch.Tensor | None = None,
                 melody_sample_rate: int | None = None) -> torch.Tensor:
        """Waveforms [B, channels, duration * sample_rate]; ``melody`` as in ``generate_codes``."""
        codes = self.generate_codes(texts, duration, sampling, seed, prompt_audio, melody=melody,
                                    melody_sample_rate=melody_sample_rate)
        return self.decode(codes, int(round(duration * self.sample_rate)))

    def stream(self, texts: list[str], duration: float = 10.0, sampling: Sampling | None = None, seed: int = 0,
               chunk_seconds: float = 1.0, prompt_audio: torch.Tensor | None = None,
               melody: torch.Tensor | None = None, melody_sample_rate: int | None = None) -> Iterator[torch.Tensor]:
        """Audio chunks [B, channels, n] in order, each as soon as its frames are final; together they equal
        ``generate``'s output (``melody`` as there). A chunk is decoded from the start (the decoder's LSTM carries
        state) and only audio the next frames cannot change any more is emitted (the convolutions look ahead a few
        frames)."""
        import queue
        import threading

        frames = self.frames(duration)
        check_number(chunk_seconds, "chunk_seconds", above=0, at_most=MAX_SECONDS)
        total = int(round(duration * self.sample_rate))
        hop = self.codec.cfg.hop_length
        chunk_frames = max(int(round(chunk_seconds * self.codec.cfg.frame_rate)), 1)
        ready: queue.Queue = queue.Queue()
        pattern, emitted = self.pattern, [0]

        def window_hook(window: Window):
            finished_at = pattern.step_index(window.frames).max(dim=0).values  # [T]: the step completing each frame

            def on_step(step: int, sequence: torch.Tensor) -> None:
                done = window.start + int((finished_at <= step).sum())  # frames of the whole that are final
                stable = done - self.lookahead_frames  # frames whose audio the next frames cannot change
                if done < frames and stable - emitted[0] >= chunk_frames:
                    new = pattern.revert(sequence)[..., window.overlap: done - window.start]
                    ready.put((done, new if window.before is None else torch.cat([window.before, new], dim=-1)))
                    emitted[0] = stable
            return on_step

        def run() -> None:
            try:
                codes = self._windows(texts, duration, sampling, seed, prompt_audio, None, window_hook, melody,
                                      melody_sample_rate)
                ready.put((frames, codes))
            except BaseException as error:  # surfaced in the consuming thread
                ready.put(error)
            ready.put(None)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        sent = 0
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            done, codes = item
            stable = total if done >= frames else min((done - self.lookahead_frames) * hop, total)
            if stable > sent:
                audio = self.decode(codes, min(done * hop, total))
                yield audio[..., sent:stable]
                sent = stable
        worker.join()

    @property
    def lookahead_frames(self) -> int:
        """Frames of right context the decoder reads (its non-causal convolutions; its LSTM runs forward only),
        rounded up with a frame to spare."""
        cfg = self.codec.cfg
        if cfg.causal:
            return 0
        reach, rate = cfg.kernel_size // 2, 1  # in frames; the first convolution runs at the frame rate
        for ratio in cfg.ratios:
            reach += 1 / rate  # the transposed convolution reads one step of its input to the right
            rate *= ratio
            reach += (cfg.residual_kernel_size // 2) * cfg.dilation_base ** (cfg.num_residual_layers - 1) \
                * cfg.num_residual_layers / rate
        reach += (cfg.last_kernel_size // 2) / rate
        return math.ceil(reach) + 1
