"""Writes tests/fixtures/audiocraft/: small MusicGen checkpoints made and exported by audiocraft's own code, and
what audiocraft computes with them. Run once, by hand, in a throwaway environment OUTSIDE the repository; the
tests (tests/test_audiocraft_format.py) only read what it writes and never need audiocraft.

Environment (what this script was run with):
    python3 -m venv /tmp/acenv
    /tmp/acenv/bin/pip install torch==2.14.1
    /tmp/acenv/bin/pip install --no-deps audiocraft==1.3.0 torchaudio==2.11.1
    /tmp/acenv/bin/pip install omegaconf einops numpy pyyaml safetensors soundfile av julius num2words \
        huggingface_hub spacy transformers sentencepiece librosa flashy torchmetrics
    /tmp/acenv/bin/python tests/audiocraft_reference.py
(audiocraft 1.3.0 pins torch 2.1 and xformers < 0.0.23; the pins are ignored: the code below runs on torch 2.14.1.)

Stand-ins, since neither xformers (no build for this torch) nor T5's weights (no download) can be had:
- ``xformers``: audiocraft/modules/transformer.py imports ``xformers.ops`` at module level. MusicGen's LM
  (``memory_efficient: true``) with ``efficient_attention_backend`` "torch" (audiocraft's default, also at
  inference) calls only ``ops.unbind`` (given as ``torch.unbind``, which it is) and instantiates
  ``LowerTriangularMask`` only to test it against None (the torch backend then runs
  ``scaled_dot_product_attention(is_causal=True)``); ``memory_efficient_attention`` raises if ever called.
- T5: ``T5Tokenizer`` / ``T5EncoderModel.from_pretrained`` are replaced in audiocraft.modules.conditioners by
  objects whose encoder returns fixed random "T5 states" [B, L, 768] (t5-base's width) as ``last_hidden_state``;
  audiocraft's ``T5Conditioner`` itself (its ``output_proj`` 768 -> dim and its masking) runs unchanged, and
  as in audiocraft the T5 model is no part of the state dict.

What runs (all audiocraft 1.3.0 code):
- the configurations are OmegaConf trees of audiocraft's MusicGen defaults (config/solver/musicgen/
  musicgen_base_32khz.yaml -> model/lm/musicgen_lm.yaml -> lm/default.yaml, conditioner/text2music.yaml;
  solver/compression/encodec_musicgen_32khz.yaml -> model/encodec/encodec_large_nq4_s640.yaml -> default.yaml)
  at small widths, interpolations (``${sample_rate}``, ``${encodec.causal}``) kept as hydra keeps them;
- ``models.builders.get_lm_model`` / ``get_compression_model`` build the models; random weights (seeded) replace
  every parameter and the codebooks (non-trivial LayerNorms, weight-norm gains, codebooks);
- a training checkpoint ``{"best_state": {"model": ...}, "fsdp_best_state": {}, "xp.cfg": DictConfig}`` is
  written and ``utils.export.export_lm`` / ``export_encodec`` export it; ``export_pretrained_compression_model``
  writes the reference-only compression file;
- ``models.loaders.load_lm_model`` / ``load_compression_model`` rebuild the models from the exported files, and
  the reference outputs come from those rebuilt models:
  LM: ``LMModel.forward(sequence, conditions=[], condition_tensors=condition_provider(tokenized))``, the call
  ``LMModel._sample_next_token`` makes, on the whole sequence at once (not streamed), the conditional half only
  (classifier-free guidance off); ``tokenized = {"description": {"input_ids", "attention_mask"}}`` as
  ``T5Conditioner.tokenize`` returns it. The sequence is ``DelayedPatternProvider.build_pattern_sequence`` of
  random codes (keep_only_valid_steps=False), so special tokens sit where generation puts them.
  Codec: ``EncodecModel.encode(audio)`` -> codes, ``EncodecModel.decode(codes)`` -> audio.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import types
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "audiocraft"
T5_WIDTH = 768  # t5-base
SEED = 2036


def install_xformers_stand_in() -> None:
    ops = types.ModuleType("xformers.ops")
    ops.unbind = torch.unbind

    class LowerTriangularMask:  # only ever compared with None on the torch attention backend
        pass

    def memory_efficient_attention(*args, **kwargs):
        raise RuntimeError("xformers stand-in: memory_efficient_attention is not available")

    ops.LowerTriangularMask = LowerTriangularMask
    ops.memory_efficient_attention = memory_efficient_attention
    package = types.ModuleType("xformers")
    package.ops = ops
    sys.modules["xformers"] = package
    sys.modules["xformers.ops"] = ops


class _StandInT5(torch.nn.Module):
    """T5EncoderModel's call signature; its output is whatever ``states`` holds."""

    states: torch.Tensor | None = None

    def forward(self, input_ids=None, attention_mask=None):
        return types.SimpleNamespace(last_hidden_state=self.states)


def install_t5_stand_in() -> None:
    from audiocraft.modules import conditioners

    conditioners.T5Tokenizer = types.SimpleNamespace(from_pretrained=lambda name: None)
    conditioners.T5EncoderModel = types.SimpleNamespace(from_pretrained=lambda name: _StandInT5())


# -- configurations: audiocraft's defaults (the files named above), at small widths ----------------------------

LM_CONFIG = """
device: cpu
dtype: float32
autocast: false
autocast_dtype: float16
seed: 2036
efficient_attention_backend: torch
solver: musicgen
sample_rate: 32000
channels: 1
compression_model_checkpoint: //pretrained/facebook/encodec_32khz
tokens:
  padding_with_special_token: false
dataset:
  batch_size: 1
  num_workers: 10
  segment_duration: 30
  min_segment_ratio: 0.8
  return_info: true
  sample_on_duration: false
  sample_on_weight: false
  train:
    num_samples: 1000000
    merge_text_p: 0.25
    drop_desc_p: 0.5
    drop_other_p: 0.5
generate:
  audio:
    sample_rate: ${sample_rate}
  lm:
    use_sampling: true
    top_k: 250
    top_p: 0.0
lm_model: transformer_lm
codebooks_pattern:
  modeling: delay
  delay:
    delays: [0, 1, 2, 3]
    flatten_first: 0
    empty_initial: 0
  unroll:
    flattening: [0, 1, 2, 3]
    delays: [0, 0, 0, 0]
  music_lm:
    group_by: 2
  coarse_first:
    delays: [0, 0, 0]
transformer_lm:
  dim: 32
  num_heads: 4
  num_layers: 2
  hidden_scale: 4
  n_q: 4
  card: 32
  dropout: 0.
  emb_lr: null
  activation: gelu
  norm_first: true
  bias_ff: false
  bias_attn: false
  bias_proj: false
  past_context: null
  causal: true
  custom: false
  memory_efficient: true
  attention_as_float32: false
  layer_scale: null
  positional_embedding: sin
  xpos: false
  checkpointing: none
  weight_init: gaussian
  depthwise_init: current
  zero_bias_init: true
  norm: layer_norm
  cross_attention: false
  qk_layer_norm: false
  qk_layer_norm_cross: false
  attention_dropout: null
  kv_repeat: 1
  two_step_cfg: false
classifier_free_guidance:
  training_dropout: 0.3
  inference_coef: 3.0
attribute_dropout: {}
fuser:
  cross_attention_pos_emb: false
  cross_attention_pos_emb_scale: 1
  sum: []
  prepend: []
  cross: [description]
  input_interpolate: []
conditioners:
  description:
    model: t5
    t5:
      name: t5-base
      finetune: false
      word_dropout: 0.3
      normalize_text: false
"""

CODEC_CONFIG = """
device: cpu
dtype: float32
seed: 2036
solver: compression
sample_rate: 32000
channels: 1
losses:
  adv: 4.
  feat: 4.
  l1: 0.1
  mel: 0.
  msspec: 2.
  sisnr: 0.
mel:
  sample_rate: ${sample_rate}
  n_fft: 1024
dataset:
  batch_size: 64
  segment_duration: 1
optim:
  ema:
    use: true
    updates: 1
    device: ${device}
    decay: 0.99
compression_model: encodec
encodec:
  autoencoder: seanet
  quantizer: rvq
  sample_rate: ${sample_rate}
  channels: ${channels}
  causal: false
  renormalize: false
seanet:
  dimension: 8
  channels: ${channels}
  causal: ${encodec.causal}
  n_filters: 4
  n_residual_layers: 1
  ratios: [4, 2]
  activation: ELU
  activation_params: {"alpha": 1.}
  norm: weight_norm
  norm_params: {}
  kernel_size: 7
  residual_kernel_size: 3
  last_kernel_size: 7
  dilation_base: 2
  pad_mode: constant
  true_skip: true
  compress: 2
  lstm: 2
  disable_norm_outer_blocks: 0
  decoder:
    trim_right_ratio: 1.0
    final_activation: null
    final_activation_params: null
  encoder: {}
rvq:
  n_q: 4
  q_dropout: false
  bins: 32
  decay: 0.99
  kmeans_init: true
  kmeans_iters: 50
  threshold_ema_dead_code: 2
  orthogonal_reg_weight: 0.0
  orthogonal_reg_active_codes_only: false
no_quant: {}
"""

# The second codec exercises the other settings: convolutional skips (true_skip false), causal through the
# ${encodec.causal} interpolation, reflect padding, a right/left split of the transposed convolutions' trim,
# two dilated residual blocks per scale, one LSTM layer.
CODEC_VARIANT = {"encodec": {"causal": True}, "seanet": {"true_skip": False, "pad_mode": "reflect", "lstm": 1,
                                                          "n_residual_layers": 2,
                                                          "decoder": {"trim_right_ratio": 0.5}}}


# -- random weights --------------------------------------------------------------------------------------------

def randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter and floating buffer drawn anew: matrices ~ N(0, 1/fan_in), vectors (LayerNorm weights,
    weight-norm gains) around 1, biases around 0, so that no weight keeps an initial value a wrong mapping
    could hide behind."""
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
            if name.endswith("weight_g") or (tensor.dim() == 1 and name.endswith("weight")):
                value = 1.0 + 0.3 * noise
            elif tensor.dim() <= 1:
                value = 0.2 * noise
            else:
                value = noise / max(tensor[0].numel(), 1) ** 0.5
            tensor.copy_(value.to(tensor.dtype))


def randomise_codebooks(model, generator: torch.Generator, scale: float) -> None:
    """audiocraft starts codebooks at zero (k-means on the first batch); here they are random codewords of the
    latents' scale, marked initialised, with positive EMA counts."""
    with torch.no_grad():
        for layer in model.quantizer.vq.layers:
            book = layer._codebook
            book.embed.copy_(scale * torch.randn(book.embed.shape, generator=generator))
            book.embed_avg.copy_(book.embed * 3.0)
            book.cluster_size.copy_(1.0 + torch.rand(book.cluster_size.shape, generator=generator))
            book.inited.fill_(1.0)


def export(model: torch.nn.Module, cfg, path: Path, exporter) -> None:
    """A training checkpoint as audiocraft's solvers save it, then audiocraft's exporter."""
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "checkpoint.th"
        torch.save({"best_state": {"model": model.state_dict()}, "fsdp_best_state": {}, "xp.cfg": cfg}, checkpoint)
        exporter(checkpoint, path)


def quantizer_margins(model, audio: torch.Tensor) -> torch.Tensor:
    """Per stage and frame, the gap between the nearest and second-nearest codeword's squared distance: how
    far each code is from a tie (float32 noise is ~1e-6 of the distances)."""
    residual = model.encoder(audio).transpose(1, 2).reshape(-1, model.quantizer.dimension).double()
    gaps = []
    for layer in model.quantizer.vq.layers:
        book = layer._codebook.embed.double()
        distances = torch.cdist(residual, book) ** 2
        nearest = distances.topk(2, largest=False).values
        gaps.append(nearest[:, 1] - nearest[:, 0])
        residual = residual - book[distances.argmin(1)]
    return torch.stack(gaps)


def main() -> None:
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # audiocraft's exporters torch.load a full training
    # checkpoint (a DictConfig inside), as torch 2.1 did by default; the exported files hold tensors only
    install_xformers_stand_in()
    install_t5_stand_in()
    from omegaconf import OmegaConf

    import audiocraft
    from audiocraft.models import builders, loaders
    from audiocraft.utils import export as exporting
    from safetensors.torch import save_file

    FIXTURES.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(SEED)
    reference: dict[str, torch.Tensor] = {}

    # -- the LM --
    lm_cfg = OmegaConf.create(LM_CONFIG)
    lm = builders.get_lm_model(lm_cfg)
    randomise(lm, generator)
    export(lm, lm_cfg, FIXTURES / "state_dict.bin", exporting.export_lm)
    lm = loaders.load_lm_model(FIXTURES / "state_dict.bin")
    batch, text_length, frames = 3, 5, 9
    states = torch.randn(batch, text_length, T5_WIDTH, generator=generator)
    # row 0: the whole text; row 1: padded after 3 tokens; row 2: no text (a null condition, all masked)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    codes = torch.randint(0, lm.card, (batch, lm.n_q, frames), generator=generator)
    pattern = lm.pattern_provider.get_pattern(frames)
    sequence, _, _ = pattern.build_pattern_sequence(codes, lm.special_token_id, keep_only_valid_steps=False)
    description = lm.condition_provider.conditioners["description"]
    description.t5.states = states
    tokenized = {"description": {"input_ids": torch.zeros(batch, text_length, dtype=torch.long),
                                 "attention_mask": mask}}
    with torch.no_grad():
        condition_tensors = lm.condition_provider(tokenized)
        logits = lm(sequence, conditions=[], condition_tensors=condition_tensors)
    reference.update({"lm.tokens": sequence.contiguous(), "lm.text_states": states, "lm.text_mask": mask,
                      "lm.logits": logits.contiguous()})

    # -- the codecs --
    audio = 0.3 * torch.randn(2, 1, 100, generator=generator)  # 100 samples: not a multiple of the hop (8)
    base = OmegaConf.create(CODEC_CONFIG)
    codecs = {"compression_state_dict.bin": base,
              "compression_state_dict_causal.bin": OmegaConf.merge(base, OmegaConf.create(CODEC_VARIANT))}
    margins = {}
    for filename, cfg in codecs.items():
        model = builders.get_compression_model(cfg)
        randomise(model, generator)
        with torch.no_grad():
            scale = model.encoder(audio).std().item()
        randomise_codebooks(model, generator, scale)
        export(model, cfg, FIXTURES / filename, exporting.export_encodec)
        model = loaders.load_compression_model(FIXTURES / filename)
        with torch.no_grad():
            codes, scale_out = model.encode(audio)
            assert scale_out is None
            decoded = model.decode(codes)
            margins[filename] = quantizer_margins(model, audio).min().item()
        key = filename.removesuffix(".bin")
        reference.update({f"{key}.codes": codes.contiguous(), f"{key}.audio": decoded.contiguous()})
    reference["codec.input"] = audio
    exporting.export_pretrained_compression_model("facebook/encodec_32khz",
                                                  FIXTURES / "compression_state_dict_pretrained.bin")

    save_file(reference, str(FIXTURES / "reference.safetensors"))
    (FIXTURES / "reference.json").write_text(json.dumps({
        "written_by": "tests/audiocraft_reference.py", "audiocraft": audiocraft.__version__,
        "torch": torch.__version__, "seed": SEED,
        "lm": {"file": "state_dict.bin", "call": "LMModel.forward(sequence, conditions=[], condition_tensors="
                                                  "lm.condition_provider(tokenized)); CFG off, not streamed",
               "tokens": "DelayedPatternProvider.build_pattern_sequence(random codes, card, "
                         "keep_only_valid_steps=False)",
               "text_mask_rows": ["whole text", "padded after 3 of 5", "no text (null condition)"]},
        "codec": {"files": list(codecs), "calls": "EncodecModel.encode(codec.input) -> codes; "
                                                   "EncodecModel.decode(codes) -> audio",
                  "smallest_code_margin": margins,
                  "smallest_code_margin_means": "min over stages and frames of (2nd nearest - nearest) "
                                                "squared distance, float64"},
        "pretrained_file": "compression_state_dict_pretrained.bin (export_pretrained_compression_model "
                           "('facebook/encodec_32khz'))",
    }, indent=1) + "\n")
    total = sum(path.stat().st_size for path in FIXTURES.iterdir())
    print(f"wrote {FIXTURES} ({total / 1024:.0f} KiB); smallest code margins {margins}")


if __name__ == "__main__":
    main()
