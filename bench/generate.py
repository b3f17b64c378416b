"""LM decoding speed: mmdgen's decode loop (delay and flattening patterns) against transformers' MusicGen.

For each model size ONE random transformers ``MusicgenForConditionalGeneration`` is built from a fixed seed
(a tiny T5 text encoder over a word-level tokenizer, a tiny EnCodec at 50 frames/s, and a decoder of the
size asked for over 4 codebooks of 2048 codes); ours is converted from the same weights
(saved as a transformers folder and read by ``mmdgen.pretrained.load_music_model``: our T5, LM and codec).
The flattening case loads the same state dict into a MusicLM whose ``cfg.pattern`` is ``"flatten"``.

What is timed, on both sides, is text to codes: tokenizing the prompts, the T5 encoder, and the whole
decode loop (KV caches, guidance batched as 2B rows, top-k sampling); the codec's decode is not run:
- ours: ``Generator.generate_codes(texts, duration=frames / 50, sampling=Sampling(...), seed=0)``;
- transformers: ``tokenizer(texts)`` + ``model.generate(**inputs, max_new_tokens=frames + 3, ...)`` with
  ``model.audio_encoder.decode`` replaced by a stub that records the codes' shape and returns zeros of the
  right shape as ``.audio_values`` (its default dynamic KV cache, its default attention implementation).
Both decode frames + K - 1 steps with the delay pattern (503 for 10 s); ours with flattening K * frames
(2000). Every run checks that it returned [B, K, frames] codes. ``ours-*-compiled``: the same loop with
``DecodeRuntime(compile=True)`` on CPU (the decode step through ``torch.compile``, one graph per length bucket) and
``DecodeRuntime(cuda_graph=True)`` on CUDA (the step captured in a CUDA graph) as the ``Generator``'s runtime;
its first run at the timed length compiles
or captures (its time is reported apart: "first run, compiling"), and the timed runs follow. Ours runs the
``Generator``'s default linear layers: on CPU, fp32 weights packed by oneDNN (``mmdgen.model.packing``);
``ours-delay-plain*``: the same with ``cpu_linear="plain"`` (``F.linear``, MKL, as transformers runs), to show
the packing's gain side by side. ``-kvbf16``: the KV cache in bf16 (``DecodeRuntime(kv_cache="bfloat16")``; the
bound below still counts an fp32 cache).

Per case (its own subprocess on CPU): median over repeats of the whole generation's time, divided by the
steps: seconds per step, steps/s, the real-time factor (audio seconds / wall seconds), the peak memory the
generations added (harness; on CPU the process's high-water mark is reset after the set-up, so it is the
timed runs' own), and the speed against transformers at the same size and batch (their time / ours, for
the same audio). Before the timed runs a case estimates one generation's time: a ``--probe-steps`` run
(after a warm-up run of the same length) times the early steps, and one decoder step timed at the last
position against one near the probe's (full-length KV cache of zeros) adds the growth of attention and
cache cost with position (assumed linear in it). A case runs ``--repeats`` times if that fits in
``--max-seconds``, fewer if only fewer fit, and is skipped ("skipped (est. N s)") if not even one does.
The table shows the estimate against the measured time where a case ran.

The memory-read bound: the copy bandwidth is the median time of ``dst.copy_(src)`` on a ``--copy-gib`` GiB
fp32 tensor, counting the bytes read plus the bytes written; a decode step must read every weight it uses
once: the self-attention q/k/v/out, the cross-attention q/out (its k/v projections are applied once to the
text), the FFN, the norms and the K heads, in fp32 (not the embeddings, of which a step reads K rows, nor
the text projection); and the keys and values it attends, fp32, of every layer and row (2B with guidance):
the self-attention cache up to the filled length (step s reads s + 1 positions: (steps + 1) / 2 on average
over the clip) and the text's cross-attention memory (the batch's padded token count). bound steps/s =
bandwidth / (weights + that average KV read), per model, batch and pattern (the cache grows with the steps:
flattening reads four times the positions). Prints a table and writes ``bench/results/generate-<device>.json``
and the table as ``.txt``.

    python bench/generate.py                                    # tiny, 40M, small; batch 1 and 8; 10 s
    python bench/generate.py --models tiny --frames 30 --repeats 1 --check
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import time
from types import SimpleNamespace

import torch
from harness import RESULTS, device_name, fmt_mem, parse_args, run_case, synchronize, time_and_peak, write_json

CODEBOOKS, CODES = 4, 2048
FRAME_RATE = 50  # the tiny EnCodec below: 3200 Hz, hop 8 * 8 = 64
MODELS = {  # decoder sizes: tiny and small are lm_config("tiny") / lm_config("small")'s dimensions
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256),
    "40M": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, ffn_dim=2048),
    "small": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096),
}
TEXT_DIM = 32  # the tiny T5's width (the text projection maps it to the decoder's)
IMPLS = ("transformers", "transformers-int8", "ours-delay", "ours-delay-compiled", "ours-delay-plain",
         "ours-delay-plain-compiled", "ours-delay-int8",
         "ours-delay-int8-compiled", "ours-delay-int8-dynamic", "ours-delay-int8-dynamic-compiled",
         "ours-delay-int8-dynamic-kvbf16-compiled", "ours-flatten", "ours-flatten-compiled")
BASELINES = ("transformers", "transformers-int8")
CAPTIONS = ["a calm jig on flute", "a fast reel on fiddle with drums", "slow piano ballad in a minor key",
            "upbeat electronic dance track with a heavy bass line", "acoustic guitar and soft vocals",
            "epic orchestral score with brass and timpani", "lofi hip hop beat", "jazz trio with walking bass"]


# -- the models ---------------------------------------------------------------------------------------------

def build_transformers(size: str, seed: int = 0):
    """(model, tokenizer): a random MusicgenForConditionalGeneration, the same weights for the same seed."""
    import transformers

    from mmdgen.model.text import word_level_t5_tokenizer

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    tokenizer = word_level_t5_tokenizer(CAPTIONS)
    text = transformers.T5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_ff=64, num_layers=1, num_heads=2,
                                 d_kv=16)
    # frame rate 3200 / 64 = 50; K = 1000 * 2.2 // (50 * 11 bits) = 4 codebooks of 2048
    audio = transformers.EncodecConfig(target_bandwidths=[2.2], sampling_rate=3200, audio_channels=1, hidden_size=8,
                                       num_filters=4, upsampling_ratios=[8, 8], num_lstm_layers=1,
                                       codebook_size=CODES)
    decoder = transformers.MusicgenDecoderConfig(vocab_size=CODES, num_codebooks=CODEBOOKS, pad_token_id=CODES,
                                                 bos_token_id=CODES, decoder_start_token_id=CODES, **MODELS[size])
    config = transformers.MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(),
                                         decoder=decoder.to_dict())
    model = transformers.MusicgenForConditionalGeneration(config).eval()
    codec = model.audio_encoder.config
    assert codec.num_quantizers == CODEBOOKS and codec.frame_rate == FRAME_RATE, "the tiny EnCodec's K or frame rate"
    with torch.no_grad():
        for layer in model.audio_encoder.quantizer.layers:  # transformers initialises codebooks to zero
            layer.codebook.embed.copy_(torch.randn_like(layer.codebook.embed))
        for head in model.decoder.lm_heads:  # sharper logits, as a trained model has: greedy far from ties
            head.weight.mul_(20.0)
    model.generation_config.update(decoder_start_token_id=CODES, pad_token_id=CODES, bos_token_id=CODES)
    return model, tokenizer


def build_ours(model, tokenizer, pattern: str, device: torch.device, cpu_linear: str = "auto"):
    """Ours from the same weights, the way a user gets it: the model saved as a transformers folder and read by
    mmdgen's loader (no transformers object involved on our side); ``cpu_linear``: the Generator's (packed
    oneDNN weights on CPU by default)."""
    import tempfile

    from mmdgen.generate import Generator
    from mmdgen.model.lm import MusicLM
    from mmdgen.pretrained import load_music_model

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        parts = load_music_model(folder, device=device)
    lm = parts.lm
    if pattern != lm.cfg.pattern:
        patterned = MusicLM(dataclasses.replace(lm.cfg, pattern=pattern))
        patterned.load_state_dict(lm.state_dict())
        lm = patterned.to(device)
    return Generator(lm, parts.text, parts.codec, cpu_linear=cpu_linear)


def _eager_twin(impl: str) -> str:
    """The eager case whose run estimates a compiled case's time (a bf16 cache's too: eager it copies to fp32)."""
    return impl.removesuffix("-compiled").replace("-kvbf16", "")


def _sampling(spec: dict):
    from mmdgen.generate import Sampling

    greedy = spec["sampling"] == "greedy"
    return Sampling(guidance_scale=spec["guidance"], temperature=0.0 if greedy else 1.0,
                    top_k=1 if greedy else spec["top_k"])


def _transformers_kwargs(spec: dict) -> dict:
    kwargs = {"guidance_scale": spec["guidance"]}
    if spec["sampling"] == "greedy":
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, top_k=spec["top_k"], temperature=1.0)
    return kwargs


class Side:
    """One implementation on one model: ``run(frames)`` (text to codes) and ``step_seconds(position, steps)``
    (one decoder step at ``position`` over a KV cache sized for ``steps``, for the estimate)."""

    def __init__(self, spec: dict, device: torch.device):
        self.spec, self.device = spec, device
        self.texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(spec["batch"])]
        self.guided = spec["guidance"] is not None
        self.rows = 2 * spec["batch"] if self.guided else spec["batch"]
        model, self.tokenizer = build_transformers(spec["model"])
        if spec["impl"] in BASELINES:
            if spec["impl"] == "transformers-int8":  # what a CPU user picks: torch.ao's dynamic int8 linears
                model.decoder = torch.ao.quantization.quantize_dynamic(model.decoder, {torch.nn.Linear},
                                                                        dtype=torch.qint8)
            self.model = model.to(device)
            self.seen: dict = {}
            hop = model.audio_encoder.config.hop_length

            def decode_stub(codes, *args, **kwargs):  # the codec's decode is not what we measure
                self.seen["codes"] = codes
                return SimpleNamespace(audio_values=torch.zeros(codes.shape[1], 1, codes.shape[-1] * hop,
                                                                device=codes.device))

            self.model.audio_encoder.decode = decode_stub
            self.pattern_name = "delay"
        else:
            self.pattern_name = spec["impl"].split("-")[1]
            mode = next((m for m in ("int8-dynamic", "int8") if f"-{m}" in spec["impl"]), None)
            plain = mode is not None or "-plain" in spec["impl"]  # int8 rows quantise the plain layers
            self.generator = build_ours(model, self.tokenizer, self.pattern_name, device,
                                        "plain" if plain else "auto")
            if mode is not None:
                from mmdgen.model.quantize import quantize_lm

                quantize_lm(self.generator.lm, mode)
            from mmdgen.generate.loop import DecodeRuntime

            static = spec["impl"].endswith("-compiled")  # CPU: torch.compile; CUDA: the step in a CUDA graph
            self.generator.runtime = DecodeRuntime(compile=static and device.type != "cuda",
                                                   cuda_graph=static and device.type == "cuda",
                                                   kv_cache="bfloat16" if "-kvbf16" in spec["impl"] else "model")
            del model  # the text encoder lives on in the generator; the transformers decoder goes
        gc.collect()

    def steps(self, frames: int) -> int:
        return CODEBOOKS * frames if self.pattern_name == "flatten" else frames + CODEBOOKS - 1

    def frames_for(self, steps: int) -> int:
        return max(steps // CODEBOOKS, 1) if self.pattern_name == "flatten" else max(steps - CODEBOOKS + 1, 1)

    @torch.no_grad()
    def run(self, frames: int, sampling: str | None = None) -> torch.Tensor:
        spec = dict(self.spec, sampling=sampling or self.spec["sampling"])
        batch = spec["batch"]
        if spec["impl"] in BASELINES:
            torch.manual_seed(0)
            inputs = self.tokenizer(self.texts, padding=True, return_tensors="pt").to(self.device)
            self.seen.clear()
            self.model.generate(**inputs, max_new_tokens=self.steps(frames), **_transformers_kwargs(spec))
            codes = self.seen["codes"][0]
        else:
            codes = self.generator.generate_codes(self.texts, duration=frames / FRAME_RATE, sampling=_sampling(spec),
                                                  seed=0)
        if tuple(codes.shape) != (batch, CODEBOOKS, frames):
            raise AssertionError(f"{spec['impl']} returned codes {tuple(codes.shape)}, expected "
                                 f"{(batch, CODEBOOKS, frames)}")
        return codes

    @torch.no_grad()
    def step_seconds(self, positions: list[int], steps: int, repeats: int = 3) -> list[float]:
        """Median seconds of one decoder forward (hidden states and the K heads' logits) at each position."""
        k, special = CODEBOOKS, CODES
        if self.spec["impl"] not in BASELINES:
            lm = self.generator.lm
            memory = self.generator._memory(self.texts, self.guided)
            caches = lm.new_caches(self.rows, steps, self.generator.runtime.cache_dtype(lm))  # static: every position
            tokens = torch.full((self.rows, k, 1), special, dtype=torch.long, device=self.device)

            def prepare(position):
                return position

            def forward(position):
                lm.step(tokens, position, caches, memory, self.generator.runtime.backend)
        else:
            from transformers.cache_utils import DynamicCache, EncoderDecoderCache

            config = self.model.decoder.config
            heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
            states = torch.randn(self.rows, 8, config.hidden_size, device=self.device)  # projected text states
            mask = torch.ones(self.rows, 8, dtype=torch.long, device=self.device)
            ids = torch.full((self.rows * k, 1), special, dtype=torch.long, device=self.device)

            def prepare(position):  # a dynamic cache already holding ``position`` steps (built untimed)
                shape = (self.rows, heads, position, head_dim)
                layers = [(torch.zeros(shape, device=self.device), torch.zeros(shape, device=self.device))
                          for _ in range(config.num_hidden_layers)]
                return EncoderDecoderCache(DynamicCache(layers), DynamicCache())

            def forward(cache):  # MusicgenForCausalLM: hidden states and the K heads' logits
                self.model.decoder(input_ids=ids, encoder_hidden_states=states, encoder_attention_mask=mask,
                                   cache=cache, use_cache=True)

        out = []
        for position in positions:
            times = []
            for i in range(repeats + 1):  # the first is a warm-up
                prepared = prepare(position)
                synchronize(self.device)
                start = time.perf_counter()
                forward(prepared)
                synchronize(self.device)
                if i:
                    times.append(time.perf_counter() - start)
                del prepared
            out.append(statistics.median(times))
        return out


# -- measuring ----------------------------------------------------------------------------------------------

def _reset_peak(device: torch.device) -> bool:
    """Give freed heap pages back to the system (glibc ``malloc_trim``: else the timed runs reuse pages the
    set-up left resident, and their memory is not seen) and reset the process's peak resident memory
    (Linux: ``clear_refs`` 5 resets VmHWM and ru_maxrss), so that the harness's peak is the timed runs' own
    and not the model building's."""
    if device.type == "cuda":
        return True  # time_and_peak resets the CUDA peak itself
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_bandwidth(spec: dict) -> dict:
    device = torch.device(spec["device"])
    n = int(spec["gib"] * 2**30) // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of the pages and warm-up
    result = time_and_peak(lambda: dst.copy_(src), spec["repeats"], device)
    moved = 2 * n * 4  # bytes read + bytes written
    return {"seconds": result["seconds"], "times": result["times"], "bytes_moved": moved,
            "bytes_per_s": moved / result["seconds"], "tensor_bytes": n * 4, "threads": torch.get_num_threads()}


def measure_check(spec: dict) -> dict:
    """Greedy codes of ours (delay) and transformers on the same weights, batch 1, with guidance."""
    device = torch.device(spec["device"])
    mine = Side(dict(spec, impl="ours-delay"), device)
    theirs = Side(dict(spec, impl="transformers"), device)
    a, b = mine.run(spec["frames"], "greedy"), theirs.run(spec["frames"], "greedy")
    diff = (a != b).nonzero()
    return {"equal": bool(torch.equal(a, b)), "frames": spec["frames"],
            "distinct_codes": len(set(a.flatten().tolist())),
            "first_difference": diff[0].tolist() if len(diff) else None}


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def measure_generate(spec: dict) -> dict:
    device = torch.device(spec["device"])
    side = Side(spec, device)
    frames, steps = spec["frames"], side.steps(spec["frames"])
    if spec["impl"].endswith("-compiled"):
        info = _compiled_warm_up(side, spec, frames, steps)
    else:
        info = _estimate(side, spec, frames, steps)
    estimate = info["estimate_seconds"]
    repeats = min(spec["repeats"], int(spec["max_seconds"] // estimate)) if estimate > 0 else spec["repeats"]
    if repeats < 1:
        return dict(info, skipped=f"estimated {_seconds(estimate)} s for one generation > --max-seconds "
                                  f"{spec['max_seconds']:g}")
    gc.collect()
    info["peak_reset"] = _reset_peak(device)
    result = time_and_peak(lambda: side.run(frames), repeats, device)
    seconds = result["seconds"]
    return dict(result, **info, repeats=repeats, seconds_per_step=seconds / steps, steps_per_s=steps / seconds,
                rtf=frames / FRAME_RATE / seconds)


def _compiled_warm_up(side: Side, spec: dict, frames: int, steps: int) -> dict:
    """The compiled loop's first run at the timed length compiles its step (one graph per batch, length and bucket);
    its estimate is the eager loop's (an upper bound), and it is not run when even that does not fit."""
    info = {"steps": steps, "frames": frames, "estimate_seconds": spec["eager_estimate_seconds"]}
    if spec["eager_estimate_seconds"] > spec["max_seconds"]:
        return info
    start = time.perf_counter()
    side.run(frames)
    synchronize(side.device)
    return dict(info, first_run_seconds=time.perf_counter() - start)


def _estimate(side: Side, spec: dict, frames: int, steps: int) -> dict:
    device = side.device
    probe_frames = side.frames_for(spec["probe_steps"])
    probe_steps = side.steps(probe_frames)
    side.run(probe_frames)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    side.run(probe_frames)
    synchronize(device)
    probe_seconds = time.perf_counter() - start
    # growth with position: one step near the probe's mean position against one at the last position
    early_position, late_position = probe_steps // 2, steps - 1
    slope = 0.0
    if late_position > early_position:
        early, late = side.step_seconds([early_position, late_position], steps)
        slope = max(late - early, 0.0) / (late_position - early_position)
    estimate = probe_seconds * steps / probe_steps + slope * steps * ((steps - 1) / 2 - early_position)
    return {"steps": steps, "frames": frames, "probe_steps": probe_steps, "probe_seconds": probe_seconds,
            "seconds_per_step_growth": slope, "estimate_seconds": estimate}


def measure(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    return {"bandwidth": measure_bandwidth, "check": measure_check, "generate": measure_generate}[spec["kind"]](spec)


# -- sizes and the bound ------------------------------------------------------------------------------------

def parameter_counts(size: str) -> dict:
    """Exact parameter counts of our LM at this size (built on the meta device), and what a step reads."""
    from mmdgen.model.lm import LMConfig, MusicLM

    dims = MODELS[size]
    cfg = LMConfig(num_codebooks=CODEBOOKS, codebook_size=CODES, dim=dims["hidden_size"],
                   layers=dims["num_hidden_layers"], heads=dims["num_attention_heads"], ffn_dim=dims["ffn_dim"],
                   text_dim=TEXT_DIM)
    with torch.device("meta"):
        lm = MusicLM(cfg)
    total = sum(p.numel() for p in lm.parameters())
    embeddings = sum(p.numel() for p in lm.embeddings.parameters())
    text = sum(p.numel() for p in lm.text_projection.parameters())
    cross_kv = sum(p.numel() for name, p in lm.named_parameters()
                   if ".cross_attn.k_proj." in name or ".cross_attn.v_proj." in name)
    per_step = total - embeddings - text - cross_kv
    # int8 decoding keeps the norms (and biases) in fp32; the linear weights it reads are one byte each, plus
    # an fp32 scale per output channel
    linears = [m for name, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and name.startswith(
        ("layers.", "heads.")) and ".cross_attn.k_proj" not in name and ".cross_attn.v_proj" not in name]
    weights = sum(m.weight.numel() for m in linears)
    int8_bytes = 4 * (per_step - weights) + weights + 4 * sum(m.out_features for m in linears)
    return {"total": total, "embeddings": embeddings, "text_projection": text, "cross_attention_kv": cross_kv,
            "read_per_step": per_step, "read_bytes_per_step": 4 * per_step, "int8_read_bytes_per_step": int8_bytes}


def kv_read_bytes(size: str, rows: int, steps: int, text_positions: int) -> dict:
    """Bytes of keys and values (fp32) one step reads on average over a decode of ``steps`` steps of ``rows``
    rows, over every layer: the self-attention cache up to the filled length ((steps + 1) / 2 positions on
    average) and the text's cross-attention memory (``text_positions``)."""
    dims = MODELS[size]
    per_position = 2 * rows * dims["hidden_size"] * 4 * dims["num_hidden_layers"]  # keys + values, all layers
    self_attention = per_position * (steps + 1) / 2
    cross_attention = per_position * text_positions
    return {"self_attention_kv_bytes_per_step": self_attention, "cross_attention_kv_bytes_per_step": cross_attention,
            "kv_bytes_per_step": self_attention + cross_attention}


def row_bound(rate: float, counts: dict, kv: dict, impl: str) -> float:
    """The memory-read bound of ``impl`` in steps/s: int8 rows read one byte per weight (plus one fp32 scale per
    output channel: under 0.5% here), ``-kvbf16`` rows their self-attention cache in 2 bytes per element (the
    text's cross-attention memory stays fp32)."""
    weights = counts["int8_read_bytes_per_step"] if "int8" in impl else counts["read_bytes_per_step"]
    self_attention = kv["self_attention_kv_bytes_per_step"] * (0.5 if "-kvbf16" in impl else 1.0)
    return rate / (weights + self_attention + kv["cross_attention_kv_bytes_per_step"])


def text_positions(batch: int) -> int:
    """The padded token count of the batch's captions (the cross-attention memory's length), as both sides
    tokenize them."""
    from mmdgen.model.text import word_level_t5_tokenizer

    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    return word_level_t5_tokenizer(CAPTIONS)(texts, padding=True, return_tensors="pt")["input_ids"].shape[1]


def bounds(rate: float, args, guidance: float | None, rows: list[dict]) -> tuple[list[str], dict]:
    """The memory-read bound per model, batch and pattern (module docstring), and each row's steps/s against it:
    (the table's lines, the JSON's ``bound``)."""
    lines = ["", f"memory-read bound: copy bandwidth {rate / 1e9:.1f} GB/s (median of 5 dst.copy_(src) on a "
                 f"{args.copy_gib:g} GiB fp32 tensor, bytes read + written / time); a step reads each weight it uses "
                 "once (fp32; layers without the cross-attention k/v, final norm, K heads; not the embeddings or the "
                 "text projection) and the keys and values it attends (fp32, every layer and row: the self-attention "
                 "cache up to the filled length, averaged over the clip, in bf16 for -kvbf16 rows, and the text's "
                 "cross-attention memory)"]
    out = {}
    for size in args.models:
        counts = parameter_counts(size)
        weights_bound = rate / counts["read_bytes_per_step"]
        out[size] = dict(counts, weights_only_bound_steps_per_s=weights_bound, cases={})
        lines.append(f"{size}: {counts['total']:,} LM parameters ({counts['embeddings']:,} in embeddings); weights "
                     f"{counts['read_bytes_per_step'] / 1e6:.1f} MB read per step (alone: {weights_bound:.1f} steps/s"
                     f"); int8 weights {counts['int8_read_bytes_per_step'] / 1e6:.1f} MB")
        for batch in args.batches:
            for pattern in ("delay", "flatten"):
                measured = [row for row in rows if row["model"] == size and row["batch"] == batch
                            and (row["impl"].startswith(f"ours-{pattern}") or (pattern == "delay"
                                                                                and row["impl"] in BASELINES))]
                if not measured:
                    continue
                steps = measured[0]["steps"]
                kv = kv_read_bytes(size, 2 * batch if guidance is not None else batch, steps, text_positions(batch))
                bound, int8_bound = (row_bound(rate, counts, kv, impl) for impl in ("", "int8"))
                achieved = {row["impl"]: row["result"]["steps_per_s"] / row_bound(rate, counts, kv, row["impl"])
                            for row in measured if "steps_per_s" in row["result"]}
                out[size]["cases"][f"B{batch} {pattern}"] = dict(
                    kv, batch=batch, pattern=pattern, steps=steps, bound_steps_per_s=bound,
                    int8_bound_steps_per_s=int8_bound,
                    int8_bf16_cache_bound_steps_per_s=row_bound(rate, counts, kv, "int8-kvbf16"),
                    achieved_fraction=achieved)
                lines.append(f"  B{batch} {pattern} ({steps} steps): KV read {kv['kv_bytes_per_step'] / 1e6:.1f} MB "
                             f"per step (self {kv['self_attention_kv_bytes_per_step'] / 1e6:.1f}, cross "
                             f"{kv['cross_attention_kv_bytes_per_step'] / 1e6:.2f}) -> bound {bound:.1f} steps/s, "
                             f"int8 {int8_bound:.1f}")
                if achieved:
                    lines.append("    achieved / bound (int8 rows: / int8 bound; -kvbf16 rows: their cache in bf16): "
                                 + ", ".join(
                        f"{impl} {value:.2f}" for impl, value in achieved.items()))
    return lines, out


# -- the table ----------------------------------------------------------------------------------------------

HEADER = (f"{'model':<6} {'impl':<32} {'B':>2} {'steps':>5} {'s/step':>9} {'steps/s':>8} {'RTF':>7} "
          f"{'peak mem':>9} {'reps':>4} {'est/real':>8} {'vs transformers':>15} {'vs tf-int8':>10}")


def _row(size: str, impl: str, batch: int, steps: int, result: dict, baselines: dict) -> str:
    """A table row; ``baselines``: the transformers rows measured so far at this size and batch (their time /
    ours, for the same audio)."""
    lead = f"{size:<6} {impl:<32} {batch:>2} {steps:>5} "
    if "oom" in result:
        return lead + f"OOM ({result['oom']})"
    if "skipped" in result:
        return lead + f"skipped (est. {_seconds(result['estimate_seconds'])} s)"
    versus = ["-", "-"]
    for index, name in enumerate(BASELINES):
        baseline = baselines.get(name)
        if impl not in BASELINES and baseline and "seconds" in baseline:
            versus[index] = f"{baseline['seconds'] / result['seconds']:.2f}x"
    compiled = "first_run_seconds" in result
    estimate = "-" if compiled else f"{result['estimate_seconds'] / result['seconds']:.2f}"
    line = (lead + f"{result['seconds_per_step']:>9.5f} {result['steps_per_s']:>8.1f} {result['rtf']:>6.2f}x "
            f"{fmt_mem(result):>9} {result['repeats']:>4} {estimate:>8} {versus[0]:>15} {versus[1]:>10}")
    return line + (f"  (first run, compiling: {result['first_run_seconds']:.1f} s)" if compiled else "")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--frames", type=int, default=500, help="frames to generate (50 per second; 500 = 10 s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=600.0,
                        help="time budget of a case's timed runs (fewer repeats, or skipped, past it)")
    parser.add_argument("--probe-steps", type=int, default=20, help="steps of the run that estimates a case's time")
    parser.add_argument("--sampling", choices=["sample", "greedy"], default="sample",
                        help="top-k sampling (default, the realistic setting) or greedy")
    parser.add_argument("--top-k", type=int, default=250)
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (0: none)")
    parser.add_argument("--copy-gib", type=float, default=1.0, help="tensor size for the copy bandwidth")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default, one per core); fewer helps on a busy machine")
    parser.add_argument("--check", action="store_true",
                        help="first assert that ours and transformers give the same greedy codes (tiny, batch 1)")
    parser.add_argument("--check-frames", type=int, default=50)
    args = parse_args(parser, measure, argv)
    if args is None:
        return
    for impl in args.impls:
        if impl.endswith("-compiled") and _eager_twin(impl) not in args.impls:
            parser.error(f"{impl} needs {_eager_twin(impl)} in --impls too (its time estimate)")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = device_name(device)
    guidance = args.guidance if args.guidance > 0 else None
    sampling = "greedy" if args.sampling == "greedy" else f"top-k {args.top_k} sampling"
    lines = [f"LM decoding, text to codes (codec decode excluded), {args.frames} frames = "
             f"{args.frames / FRAME_RATE:g} s, "
             f"K={CODEBOOKS} x {CODES} codes, guidance {guidance}, {sampling}, fp32, on {name}; "
             f"median of up to {args.repeats} (budget {args.max_seconds:g} s per case)"]
    print(lines[0], flush=True)
    payload = {"device": name, "torch": torch.__version__, "frames": args.frames, "frame_rate": FRAME_RATE,
               "codebooks": CODEBOOKS, "codes": CODES, "guidance": guidance, "sampling": args.sampling,
               "top_k": args.top_k, "repeats": args.repeats, "max_seconds": args.max_seconds,
               "probe_steps": args.probe_steps, "threads": torch.get_num_threads(),
               "models": {k: MODELS[k] for k in args.models},
               "date": time.strftime("%Y-%m-%d")}
    import transformers

    payload["transformers"] = transformers.__version__

    if args.check:
        spec = {"kind": "check", "model": "tiny", "batch": 1, "frames": args.check_frames, "guidance": guidance,
                "sampling": "greedy", "top_k": args.top_k, "device": str(device), "impl": "ours-delay",
                "threads": args.threads}
        check = run_case(__file__, measure, spec, device)
        line = (f"check: greedy codes of ours (delay) and transformers, tiny, batch 1, guidance {guidance}, "
                f"{args.check_frames} frames: {'equal' if check.get('equal') else 'DIFFERENT'} "
                f"({check.get('distinct_codes')} distinct codes)")
        print(line, flush=True)
        lines.append(line)
        payload["check"] = check
        if not check.get("equal"):
            raise SystemExit(f"ours and transformers disagree on greedy codes: {check}")

    bandwidth = run_case(__file__, measure, {"kind": "bandwidth", "gib": args.copy_gib, "repeats": 5,
                                             "device": str(device), "threads": args.threads}, device)
    payload["bandwidth"] = bandwidth
    lines += [HEADER, "-" * len(HEADER)]
    print("\n".join(lines[-2:]), flush=True)
    rows = []
    for size in args.models:
        for batch in args.batches:
            results = {}
            for impl in [impl for impl in IMPLS if impl in args.impls]:  # transformers first: the others' baseline
                spec = {"kind": "generate", "model": size, "impl": impl, "batch": batch, "frames": args.frames,
                        "repeats": args.repeats, "max_seconds": args.max_seconds, "probe_steps": args.probe_steps,
                        "guidance": guidance, "sampling": args.sampling, "top_k": args.top_k, "device": str(device),
                        "threads": args.threads}
                if impl.endswith("-compiled"):
                    eager = results[_eager_twin(impl)]
                    spec["eager_estimate_seconds"] = eager.get("estimate_seconds", float("inf"))
                result = results[impl] = run_case(__file__, measure, spec, device)
                steps = CODEBOOKS * args.frames if impl.startswith("ours-flatten") else args.frames + CODEBOOKS - 1
                line = _row(size, impl, batch, steps, result, results)
                print(line, flush=True)
                lines.append(line)
                rows.append({"model": size, "impl": impl, "batch": batch, "steps": steps, "result": result})

    if "oom" not in bandwidth:
        bound_lines, payload["bound"] = bounds(bandwidth["bytes_per_s"], args, guidance, rows)
        print("\n".join(bound_lines), flush=True)
        lines += bound_lines
    payload["rows"] = rows
    out = args.out or RESULTS / f"generate-{device.type}.json"
    write_json(out, payload)
    from mmdgen.files import write_text_atomic

    write_text_atomic(out.with_suffix(".txt"), "\n".join(lines) + f"\nwrote {out}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
