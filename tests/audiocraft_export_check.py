"""mmdgen's audiocraft exports read by audiocraft's own loaders: tests/fixtures/audiocraft_export/. Run by hand, in
two steps; the tests (tests/test_export.py) only read what they write.

1. ``write`` (mmdgen's environment): random tiny LMs with a T5 conditioner (mono; stereo with delays 0, 0, 1, 1, ...)
   and a tiny codec, exported by ``mmdgen.pretrained.export_model(..., "audiocraft", t5_name="t5-base")`` to
   ``mono/`` and ``stereo/``, and what mmdgen computes with the exports as it reads them back (``reference.
   safetensors``): LM logits for given text states (a whole text, a padded one, a null condition), greedy codes
   with guidance 3 for one text, the codec's codes and audio.
       PYTHONPATH=$PWD python tests/audiocraft_export_check.py write
2. ``check`` (the throwaway audiocraft 1.3.0 environment of tests/audiocraft_reference.py, same stand-ins for
   xformers and T5; mmdgen is not imported): ``models.loaders.load_lm_model`` / ``load_compression_model`` and
   ``MusicGen.get_pretrained`` on the exported folders, their outputs against the reference, into
   ``result.json``.
       /tmp/acenv/bin/python tests/audiocraft_export_check.py check

The T5 stand-in returns the reference's text states as ``last_hidden_state`` (its tokenizer stand-in gives every
caption one row of the states' length), so audiocraft's own ``T5Conditioner`` (output_proj, masking, the null
condition of classifier-free guidance) runs on the states mmdgen was given.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "audiocraft_export"
MODELS = {"mono": 1, "stereo": 2}
T5_WIDTH = 768  # t5-base, the name the exports carry
FRAMES = 8  # greedy generation
CONTEXT_FRAMES = 1500  # 30 s: audiocraft's MusicGen asserts its default 18 s extend_stride is below max_duration
SEED = 2041
TOLERANCE = 1e-5  # max |difference| accepted for audio, and for logits relative to their largest value


# -- step 1: mmdgen writes the exports and its reference ----------------------------------------------------------

def write() -> None:
    import tempfile

    import transformers
    from safetensors.torch import save_file

    from mmdgen.generate import Generator, Sampling
    from mmdgen.model.codec import Codec, CodecConfig
    from mmdgen.model.lm import LMConfig, MusicLM
    from mmdgen.model.patterns import make_pattern
    from mmdgen.model.quantizer import QuantizerConfig
    from mmdgen.model.text import T5TextEncoder, TextConditioner, TextConditioning, word_level_t5_tokenizer
    from mmdgen.pretrained import codec_identity, copy_codec, export_model, load_music_model, save_codec, \
        save_music_lm

    class FixedStates(TextConditioner):
        """Every caption gets the same given states (what audiocraft's T5 stand-in returns)."""

        def __init__(self, states: torch.Tensor):
            super().__init__()
            self.states, self.dim = states, states.shape[-1]

        def encode_texts(self, captions):
            states = self.states.expand(len(captions), -1, -1)
            return TextConditioning(states, torch.ones(states.shape[:2], dtype=torch.bool))

    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    reference: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        tokenizer = word_level_t5_tokenizer(["a calm jig"])
        transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=64, d_ff=32,
                                                          num_layers=1, num_heads=12)).save_pretrained(scratch / "t5")
        tokenizer.save_pretrained(scratch / "t5")
        text = T5TextEncoder.from_folder(scratch / "t5")
        codec = Codec(CodecConfig(sample_rate=400, num_filters=4, ratios=(4, 2), dimension=8, lstm_layers=1,
                                  quantizer=QuantizerConfig(dim=8, codebook_size=32, num_codebooks=4,
                                                            kmeans_init=False)))
        with torch.no_grad():
            scale = codec.encoder(0.3 * torch.randn(2, 1, 400, generator=generator)).std()
            for stage in codec.quantizer.stages:
                stage.embed.mul_(scale)
        codec_dir = save_codec(codec, scratch / "codec")
        audio = 0.3 * torch.randn(2, 1, 100, generator=generator)  # not a multiple of the hop (8)
        reference["codec.input"] = audio
        for name, channels in MODELS.items():
            codebooks = 4 * channels
            delays = tuple(k for k in range(4) for _ in range(channels))
            lm = MusicLM(LMConfig(num_codebooks=codebooks, codebook_size=32, dim=32, layers=2, heads=4, ffn_dim=64,
                                  text_dim=T5_WIDTH, delays=delays, audio_channels=channels,
                                  context_frames=CONTEXT_FRAMES)).eval()
            with torch.no_grad():
                for parameter_name, parameter in lm.named_parameters():
                    if "norm" in parameter_name:
                        offset = 1.0 if parameter_name.endswith("weight") else 0.0
                        parameter.copy_(offset + 0.2 * torch.randn(parameter.shape, generator=generator))
                for head in lm.heads:  # sharp logits: greedy choices far from ties
                    head.weight.mul_(20.0)
            source = scratch / f"{name}-model"
            save_music_lm(source, lm, text, {"kind": "t5", "path": str(scratch / "t5")}, codec_identity(codec_dir))
            copy_codec(codec_dir, source / "codec")
            print(export_model(source, FIXTURES / name, "audiocraft", overwrite=True, t5_name="t5-base"))
            exported = load_music_model(FIXTURES / name, text_encoder=scratch / "t5")

            states = torch.randn(3, 5, T5_WIDTH, generator=generator)
            mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
            states = states * mask[..., None]  # T5 states are zero at padding (mmdgen's conditioners promise it)
            codes = torch.randint(0, 32, (3, codebooks, 9), generator=generator)
            sequence = make_pattern("delay", codebooks, delays).build(codes, lm.cfg.special_token)
            start = torch.full((3, codebooks, 1), lm.cfg.special_token)  # audiocraft's sequences open with it
            tokens = torch.cat([start, sequence], dim=-1)
            with torch.no_grad():
                logits = exported.lm(tokens, states, mask)
            prompt_states = torch.randn(1, 4, T5_WIDTH, generator=generator)
            greedy = Generator(exported.lm, FixedStates(prompt_states), exported.codec)
            sampling = Sampling(guidance_scale=3.0, temperature=0)
            generated = greedy.generate_codes(["one text"], duration=FRAMES / 50, sampling=sampling)
            generated_audio = greedy.generate(["one text"], duration=FRAMES / 50, sampling=sampling)
            with torch.no_grad():
                codec_codes = exported.codec.encode(audio)
                decoded = exported.codec.decode(codec_codes)
            reference.update({f"{name}.codes": codes, f"{name}.tokens": tokens, f"{name}.text_states": states,
                              f"{name}.text_mask": mask, f"{name}.logits": logits,
                              f"{name}.prompt_states": prompt_states, f"{name}.generated": generated,
                              f"{name}.generated_audio": generated_audio, f"{name}.codec_codes": codec_codes,
                              f"{name}.codec_audio": decoded})
    save_file({key: value.contiguous() for key, value in reference.items()}, str(FIXTURES / "reference.safetensors"))
    total = sum(path.stat().st_size for path in FIXTURES.rglob("*") if path.is_file())
    print(f"wrote {FIXTURES} ({total / 1024:.0f} KiB)")


# -- step 2: audiocraft reads them ----------------------------------------------------------------------------------

def install_stand_ins() -> None:
    """audiocraft_reference.py's xformers stand-in; a T5 whose output is ``_StandInT5.states``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from audiocraft_reference import install_xformers_stand_in

    install_xformers_stand_in()
    from audiocraft.modules import conditioners

    def tokenize(entries, return_tensors=None, padding=None):
        length = _StandInT5.states.shape[1]
        return _Batch(input_ids=torch.zeros(len(entries), length, dtype=torch.long),
                      attention_mask=torch.ones(len(entries), length, dtype=torch.long))

    conditioners.T5Tokenizer = types.SimpleNamespace(from_pretrained=lambda name: tokenize)
    conditioners.T5EncoderModel = types.SimpleNamespace(from_pretrained=lambda name: _StandInT5())


class _Batch(dict):
    def to(self, device):
        return _Batch({key: value.to(device) for key, value in self.items()})


class _StandInT5(torch.nn.Module):
    states: torch.Tensor | None = None

    def forward(self, input_ids=None, attention_mask=None):
        return types.SimpleNamespace(last_hidden_state=_StandInT5.states[: input_ids.shape[0]])


def _difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def check() -> None:
    install_stand_ins()
    import audiocraft
    from audiocraft.models import MusicGen, loaders
    from audiocraft.modules.conditioners import ConditioningAttributes
    from safetensors.torch import load_file

    reference = load_file(str(FIXTURES / "reference.safetensors"))
    result: dict = {"written_by": "tests/audiocraft_export_check.py check", "audiocraft": audiocraft.__version__,
                    "torch": torch.__version__, "tolerance": TOLERANCE}
    for name in MODELS:
        folder = FIXTURES / name
        lm = loaders.load_lm_model(folder / "state_dict.bin")  # torch.load with torch's default weights_only=True
        codec = loaders.load_compression_model(folder / "compression_state_dict.bin")
        codes = reference[f"{name}.codes"]
        pattern = lm.pattern_provider.get_pattern(codes.shape[-1])
        sequence, _, _ = pattern.build_pattern_sequence(codes, lm.special_token_id, keep_only_valid_steps=False)
        _StandInT5.states = reference[f"{name}.text_states"]
        tokenized = {"description": {"input_ids": torch.zeros(_StandInT5.states.shape[:2], dtype=torch.long),
                                     "attention_mask": reference[f"{name}.text_mask"].long()}}
        with torch.no_grad():
            logits = lm(sequence, conditions=[], condition_tensors=lm.condition_provider(tokenized))
        prompt = reference[f"{name}.prompt_states"]
        _StandInT5.states = torch.cat([prompt, torch.zeros_like(prompt)])  # the text, then guidance's null row
        with torch.no_grad():
            generated = lm.generate(conditions=[ConditioningAttributes(text={"description": "one text"})],
                                    max_gen_len=FRAMES, use_sampling=False, cfg_coef=3.0)
            codec_codes, scale = codec.encode(reference["codec.input"])
            decoded = codec.decode(reference[f"{name}.codec_codes"])
        musicgen = MusicGen.get_pretrained(str(folder), device="cpu")
        musicgen.set_generation_params(use_sampling=False, duration=FRAMES / musicgen.frame_rate, cfg_coef=3.0)
        with torch.no_grad():
            audio, tokens = musicgen.generate(["one text"], return_tokens=True)
        result[name] = {
            "pattern_sequence_equal": bool(torch.equal(sequence, reference[f"{name}.tokens"])),
            "logits_max_difference": _difference(logits, reference[f"{name}.logits"]),
            "logits_max_value": float(reference[f"{name}.logits"].abs().max()),
            "greedy_codes_equal": bool(torch.equal(generated, reference[f"{name}.generated"])),
            "musicgen_tokens_equal": bool(torch.equal(tokens, reference[f"{name}.generated"])),
            "musicgen_audio_max_difference": _difference(audio, reference[f"{name}.generated_audio"]),
            "codec_codes_equal": bool(scale is None and torch.equal(codec_codes, reference[f"{name}.codec_codes"])),
            "codec_audio_max_difference": _difference(decoded, reference[f"{name}.codec_audio"]),
            "musicgen_max_duration": musicgen.max_duration,
            "musicgen_sample_rate": musicgen.sample_rate, "musicgen_audio_channels": musicgen.audio_channels,
        }
    ok = all(entry["pattern_sequence_equal"] and entry["greedy_codes_equal"] and entry["musicgen_tokens_equal"]
             and entry["codec_codes_equal"] and entry["logits_max_difference"] < TOLERANCE * entry["logits_max_value"]
             and entry["musicgen_audio_max_difference"] < TOLERANCE and entry["codec_audio_max_difference"] < TOLERANCE
             for entry in (result[name] for name in MODELS))
    result["all_within_tolerance"] = ok
    (FIXTURES / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    if sys.argv[1:] == ["write"]:
        write()
    elif sys.argv[1:] == ["check"]:
        check()
    else:
        sys.exit("usage: audiocraft_export_check.py write|check")
