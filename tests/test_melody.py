"""MusicGen-melody: our chroma extractor equals transformers' ``MusicgenMelodyFeatureExtractor``; a
``MusicgenMelodyForConditionalGeneration`` folder, read by our own loader (no transformers object on our side),
generates transformers' greedy codes and audio at the published widths (decoder 1536 x 24 heads, ffn 6144, 4 x 2048
codes; T5-base widths; the 32 kHz EnCodec; 2 decoder and 2 T5 layers), with and without guidance, with and without
a melody. Also: prefix conditioning's logits against transformers' forward, stereo, the Triton decode path, windows
beyond the context, and the errors for bad melodies.

Tolerances. The chroma before its argmax (``pitch_classes``, values in [0, 1]) within 1e-5 of transformers'; the
one-hot equal on every frame whose two largest classes are more than 1e-4 apart (closer ones may swap with any
change of summation order, so they are left out and counted: random audio has few). Tones: every frame equal.
Codes: equal; audio: within 1e-5 (the same codes through two EnCodec implementations).
"""

import math
import sys

import numpy as np
import pytest
import torch
import transformers
from transformers.audio_utils import chroma_filter_bank as transformers_chroma_filter_bank

from mmdgen.data.audio import read_melody
from mmdgen.generate import Generator, Sampling
from mmdgen.model.codec import Codec, codec_config
from mmdgen.model.convert import lm_key_from_transformers
from mmdgen.model.lm import LMConfig, MusicLM, lm_config
from mmdgen.model.melody import ChromaExtractor, chroma_filter_bank
from mmdgen.model.text import TextConditioner, TextConditioning, word_level_t5_tokenizer
from mmdgen.pretrained import load_music_model
from tests.transformers_musicgen import PUBLISHED_ENCODEC, PUBLISHED_T5, TINY_ENCODEC, TINY_T5

TEXTS = ["an upbeat pop song with a catchy melody", "slow piano ballad"]  # different lengths: padded text
FRAMES = 8
CLEAR_MARGIN = 1e-4
NOTES = {"C4": (261.63, 0), "E4": (329.63, 4), "G4": (392.00, 7), "A4": (440.00, 9)}  # Hz, pitch class from C


def _tones(names, seconds_each: float, rate: int, channels: int = 1) -> torch.Tensor:
    """[1, channels, samples]: each note for ``seconds_each`` (fundamental plus two weaker harmonics)."""
    t = torch.arange(int(seconds_each * rate), dtype=torch.float64) / rate
    parts = [sum(0.5 ** h * torch.sin(2 * math.pi * (h + 1) * NOTES[name][0] * t) for h in range(3))
             for name in names]
    audio = 0.3 * torch.cat(parts).float()
    return audio.expand(1, channels, -1).clone()


def _their_normalised_chroma(extractor, audio: torch.Tensor, rate: int):
    """transformers' one-hot chroma, and its chroma before the argmax (computed by its own spectrogram and filter
    bank from the waveform it prepared: resampled, mono, cut, padded)."""
    prepared = []
    real = extractor._torch_extract_fbank_features

    def capture(waveform):
        prepared.append(waveform)
        return real(waveform)

    extractor._torch_extract_fbank_features = capture
    try:
        one_hot = extractor(audio[:, 0] if audio.shape[1] == 1 else audio, sampling_rate=rate,
                            return_tensors="pt").input_features
    finally:
        extractor._torch_extract_fbank_features = real
    waveform = prepared[0]
    if waveform.shape[-1] < extractor.n_fft:  # the padding its feature function applies first
        missing = extractor.n_fft - waveform.shape[-1]
        waveform = torch.nn.functional.pad(waveform, (missing // 2, missing - missing // 2))
    spectrogram = extractor.spectrogram(waveform).squeeze(1)
    raw = torch.einsum("cf,...ft->...ct", extractor.chroma_filters, spectrogram)
    return one_hot, torch.nn.functional.normalize(raw, p=math.inf, dim=-2, eps=1e-6).transpose(1, 2)


def _clear_frames(chroma: torch.Tensor) -> torch.Tensor:
    top = chroma.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1] > CLEAR_MARGIN


@pytest.mark.parametrize("rate,n_fft,classes", [(32000, 16384, 12), (22050, 2048, 24), (200, 64, 12)])
def test_the_chroma_filter_bank_is_librosas(rate, n_fft, classes):
    ours = chroma_filter_bank(rate, n_fft, classes)
    theirs = torch.from_numpy(transformers_chroma_filter_bank(num_frequency_bins=n_fft, num_chroma=classes,
                                                              sampling_rate=rate, tuning=0))
    assert ours.shape == theirs.shape == (classes, n_fft // 2 + 1) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-10)


def test_tones_give_their_pitch_classes_as_transformers_does():
    names = ["C4", "E4", "G4", "A4"]
    audio = _tones(names, 1.2, 32000)
    ours = ChromaExtractor()(audio, 32000)
    theirs = transformers.MusicgenMelodyFeatureExtractor()(audio[:, 0], sampling_rate=32000,
                                                           return_tensors="pt").input_features
    assert ours.shape == theirs.shape == (1, 1 + audio.shape[-1] // 4096, 12) and torch.equal(ours, theirs)
    assert torch.equal(ours.sum(-1), torch.ones(1, ours.shape[1]))  # one-hot
    hop, half, samples = 4096, 8192, int(1.2 * 32000)
    for index, name in enumerate(names):  # frames whose whole window lies inside one note hear its pitch class
        inside = [t for t in range(ours.shape[1]) if index * samples <= t * hop - half and t * hop + half <= (
            index + 1) * samples]
        assert inside and all(int(ours[0, t].argmax()) == NOTES[name][1] for t in inside)


@pytest.mark.parametrize("shape,rate", [((2, 1, 100_001), 32000), ((2, 2, 2 * 44100 + 17), 44100),
                                        ((1, 1, 5000), 32000), ((1, 1, 31 * 32000 + 5), 32000)],
                         ids=["noise-32kHz", "stereo-44.1kHz", "shorter-than-a-window", "longer-than-30s"])
def test_random_audio_chroma_equals_transformers(shape, rate):
    audio = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    extractor = ChromaExtractor()
    ours = extractor.pitch_classes(audio, rate)
    their_one_hot, theirs = _their_normalised_chroma(transformers.MusicgenMelodyFeatureExtractor(), audio, rate)
    assert ours.shape == theirs.shape == their_one_hot.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    clear = _clear_frames(ours)
    assert clear.float().mean() > 0.9
    assert torch.equal(extractor(audio, rate)[clear], their_one_hot[clear])


def _reinitialise(model):
    """Weights that let the conditioning move the greedy codes: every decoder-side linear map at unit gain
    (std 1/sqrt(fan-in)), unit embeddings, heads 3x sharper (choices far from ties); random codebooks and
    non-trivial T5 norms, so the EnCodec and T5 checks mean something."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.startswith(("text_encoder", "audio_encoder")):
                continue
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, module.in_features ** -0.5)
            elif isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0, 1)
        for head in model.decoder.lm_heads:
            head.weight.mul_(3.0)
        for layer in model.audio_encoder.quantizer.layers:  # transformers initialises codebooks to zero
            layer.codebook.embed.copy_(torch.randn_like(layer.codebook.embed))
        for name, parameter in model.text_encoder.named_parameters():
            if "layer_norm" in name:
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))


def _melody_model(widths: str, channels: int = 1, seed: int = 0):
    """A random MusicgenMelodyForConditionalGeneration (``published``: the published melody decoder's widths, 2
    layers; T5-base widths, 2 layers; the 32 kHz EnCodec; chroma as published. ``tiny``: small everything, a
    200 Hz codec with a 64-point chroma STFT and 20 chroma positions), its tokenizer and feature extractor."""
    torch.manual_seed(seed)
    tokenizer = word_level_t5_tokenizer(TEXTS)
    if widths == "published":
        text, audio = PUBLISHED_T5, PUBLISHED_ENCODEC
        decoder = dict(vocab_size=2048, hidden_size=1536, num_attention_heads=24, ffn_dim=6144)
        melody, features = {}, transformers.MusicgenMelodyFeatureExtractor()
    else:
        text, audio = TINY_T5, TINY_ENCODEC
        decoder = dict(vocab_size=32, hidden_size=32, num_attention_heads=4, ffn_dim=48)
        melody = dict(chroma_length=20)
        features = transformers.MusicgenMelodyFeatureExtractor(sampling_rate=200, n_fft=64, hop_length=16)
    special = decoder["vocab_size"]
    config = transformers.MusicgenMelodyConfig(
        text_encoder=transformers.T5Config(vocab_size=len(tokenizer), **text).to_dict(),
        audio_encoder=transformers.EncodecConfig(audio_channels=1, **audio).to_dict(),
        decoder=transformers.MusicgenMelodyDecoderConfig(num_hidden_layers=2, num_codebooks=4 * channels,
                                                         audio_channels=channels, pad_token_id=special,
                                                         bos_token_id=special, **decoder).to_dict(), **melody)
    model = transformers.MusicgenMelodyForConditionalGeneration(config).eval()
    _reinitialise(model)
    model.generation_config.update(decoder_start_token_id=special, pad_token_id=special, bos_token_id=special)
    return model, tokenizer, features


def _save(parts, folder):
    model, tokenizer, features = parts
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    features.save_pretrained(folder)
    return folder


class Reference:
    """A melody model, its folder, and transformers' greedy generations (computed once per case)."""

    def __init__(self, parts, folder, melody: torch.Tensor, melody_rate: int):
        (self.model, self.tokenizer, self.features), self.folder = parts, folder
        self.melody, self.melody_rate = melody, melody_rate
        self.frame_rate = self.model.audio_encoder.config.frame_rate
        self._cache = {}

    def generate(self, guidance, with_melody: bool):
        """transformers' greedy codes (both channels' for stereo, interleaved) and audio."""
        key = (guidance, with_melody)
        if key not in self._cache:
            calls = []
            real_decode = self.model.audio_encoder.decode

            def capture(codes, *args, **kwargs):
                calls.append(codes[0])
                return real_decode(codes, *args, **kwargs)

            inputs = dict(self.tokenizer(TEXTS, padding=True, return_tensors="pt"))
            if with_melody:
                melody = self.melody[:, 0] if self.melody.shape[1] == 1 else self.melody
                chroma = self.features(melody, sampling_rate=self.melody_rate, return_tensors="pt").input_features
                inputs["input_features"] = chroma.expand(len(TEXTS), -1, -1)
            decoder = self.model.decoder.config
            self.model.audio_encoder.decode = capture
            try:
                with torch.no_grad():
                    audio = self.model.generate(**inputs, do_sample=False, guidance_scale=guidance,
                                                max_new_tokens=FRAMES + decoder.num_codebooks //
                                                decoder.audio_channels - 1)
            finally:
                self.model.audio_encoder.decode = real_decode
            codes = torch.stack(calls, dim=2).flatten(1, 2) if len(calls) == 2 else calls[0]
            self._cache[key] = codes, audio
        return self._cache[key]

    def ours(self, generator: Generator, guidance, with_melody: bool, audio: bool = False):
        kwargs = dict(duration=FRAMES / self.frame_rate, sampling=Sampling(guidance_scale=guidance, temperature=0))
        if with_melody:
            kwargs.update(melody=self.melody, melody_sample_rate=self.melody_rate)
        return generator.generate(TEXTS, **kwargs) if audio else generator.generate_codes(TEXTS, **kwargs)


@pytest.fixture(scope="module")
def published(module_folder):
    parts = _melody_model("published")
    folder = _save(parts, module_folder("musicgen-melody"))
    return Reference(parts, folder, _tones(["A4", "C4", "G4", "E4"], 0.5, 44100, channels=2), 44100)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    parts = _melody_model("tiny")
    melody = torch.randn(1, 1, 300, generator=torch.Generator().manual_seed(3))
    return Reference(parts, _save(parts, tmp_path_factory.mktemp("tiny-melody")), melody, 200)


def test_a_melody_folder_loads_as_a_prefix_lm_with_transformers_weights(published):
    parts = load_music_model(published.folder)
    cfg = parts.lm.cfg
    assert parts.format == "transformers" and cfg.conditioning == "prefix"
    assert (cfg.dim, cfg.heads, cfg.ffn_dim, cfg.num_codebooks, cfg.codebook_size) == (1536, 24, 6144, 4, 2048)
    assert (cfg.melody_dim, cfg.melody_frames, cfg.text_dim, cfg.context_frames) == (12, 235, 768, 1500)
    assert all(layer.cross_attn is None and layer.cross_attn_norm is None for layer in parts.lm.layers)
    ours = parts.lm.state_dict()
    theirs = {lm_key_from_transformers(name): value for name, value in published.model.state_dict().items()}
    theirs.pop(None)
    assert set(theirs) == set(ours) and all(torch.equal(ours[name], value) for name, value in theirs.items())
    assert "melody_projection.weight" in ours and "text_projection.weight" in ours
    assert parts.chroma.cfg == ChromaExtractor().cfg  # the published preprocessor_config.json's settings


@pytest.mark.parametrize("with_melody", [False, True], ids=["text-only", "melody"])
@pytest.mark.parametrize("guidance", [None, 3.0], ids=["no-guidance", "guidance-3"])
def test_greedy_codes_and_audio_equal_transformers_at_published_widths(published, guidance, with_melody):
    their_codes, their_audio = published.generate(guidance, with_melody)
    generator = Generator.from_pretrained(published.folder)
    codes = published.ours(generator, guidance, with_melody)
    assert codes.shape == their_codes.shape == (2, 4, FRAMES) and torch.equal(codes, their_codes)
    assert len(set(codes.flatten().tolist())) > 8
    audio = published.ours(generator, guidance, with_melody, audio=True)
    assert audio.shape == their_audio.shape == (2, 1, FRAMES * 640)
    torch.testing.assert_close(audio, their_audio, atol=1e-5, rtol=1e-4)


def test_the_melody_and_the_guidance_change_transformers_codes(published):
    """The comparisons above mean something: each of the four cases decodes differently."""
    codes = [published.generate(guidance, with_melody)[0] for guidance in (None, 3.0) for with_melody in (False, True)]
    assert all(not torch.equal(codes[i], codes[j]) for i in range(4) for j in range(i + 1, 4))


@pytest.mark.parametrize("with_melody", [False, True], ids=["null-melody", "melody"])
def test_prefix_logits_equal_transformers_forward(tiny, with_melody):
    """The whole-sequence path (teacher forcing): conditioning positions in front, padded text attended."""
    parts = load_music_model(tiny.folder)
    inputs = tiny.tokenizer(TEXTS, padding=True, return_tensors="pt")
    tokens = torch.randint(0, 33, (2, 4, 7), generator=torch.Generator().manual_seed(5))
    chroma = None
    if with_melody:  # two melodies of 16 chroma frames, repeated to the 20 prefix positions
        chroma = parts.chroma(torch.randn(2, 1, 250, generator=torch.Generator().manual_seed(6)), 200)
    with torch.no_grad():
        states = tiny.model.text_encoder(**inputs).last_hidden_state
        theirs = tiny.model(**inputs, input_features=chroma, decoder_input_ids=tokens.flatten(0, 1)).logits
        ours = parts.lm(tokens, states, inputs["attention_mask"].bool(), melody=chroma)
    theirs = theirs.unflatten(0, (2, 4))[:, :, -7:]
    assert ours.shape == theirs.shape == (2, 4, 7, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_the_tiny_folder_keeps_its_chroma_settings_and_the_triton_path_agrees(tiny):
    parts = load_music_model(tiny.folder)
    assert (parts.chroma.cfg.sample_rate, parts.chroma.cfg.n_fft, parts.chroma.cfg.hop_length) == (200, 64, 16)
    their_codes, _ = tiny.generate(3.0, True)
    for backend in ("torch", "triton"):  # Triton through its interpreter on CPU: the prefix prefill's 16-row passes
        generator = Generator(parts.lm, parts.text, parts.codec, backend=backend, chroma=parts.chroma)
        assert torch.equal(tiny.ours(generator, 3.0, True), their_codes)


def test_stereo_melody_codes_and_audio_equal_transformers(tmp_path):
    parts = _melody_model("tiny", channels=2, seed=1)
    reference = Reference(parts, _save(parts, tmp_path / "stereo"), _tones(["G4", "C4"], 1.0, 200, 2), 200)
    their_codes, their_audio = reference.generate(3.0, True)
    generator = Generator.from_pretrained(reference.folder)
    assert generator.channels == 2 and generator.lm.cfg.conditioning == "prefix"
    assert torch.equal(reference.ours(generator, 3.0, True), their_codes)
    torch.testing.assert_close(reference.ours(generator, 3.0, True, audio=True), their_audio, atol=1e-5, rtol=1e-4)


def test_windows_beyond_the_context_hear_the_melody_from_their_start(tiny, monkeypatch):
    generator = Generator.from_pretrained(tiny.folder)
    generator.lm.cfg.context_frames = 6  # windows of 6 frames, each next one adding 3
    heard = []
    real = generator.chroma.forward

    def spy(audio, sample_rate):
        heard.append(audio)
        return real(audio, sample_rate)

    monkeypatch.setattr(generator.chroma, "forward", spy)
    sampling = Sampling(guidance_scale=3.0, temperature=0)
    codes = generator.generate_codes(TEXTS, duration=14 / 25, sampling=sampling, melody=tiny.melody,
                                     melody_sample_rate=200)
    assert codes.shape == (2, 4, 14) and len(heard) == 4  # windows at frames 0, 3, 6 and 9
    for index, audio in enumerate(heard):  # frame 3 k of 25 frames/s is 24 k samples at 200 Hz
        assert torch.equal(audio, tiny.melody.roll(-24 * index, dims=-1))
    first = generator.generate_codes(TEXTS, duration=6 / 25, sampling=sampling, melody=tiny.melody,
                                     melody_sample_rate=200)
    assert torch.equal(codes[..., :6], first)


class _ZeroText(TextConditioner):
    dim = 64

    def encode_texts(self, captions):
        return TextConditioning(torch.zeros(len(captions), 3, self.dim), torch.ones(len(captions), 3, dtype=torch.bool))


def test_bad_melodies_are_refused(tiny):
    generator = Generator.from_pretrained(tiny.folder)
    sampling = Sampling(temperature=0)

    def generate(melody, rate=200, texts=TEXTS):
        return generator.generate_codes(texts, duration=4 / 25, sampling=sampling, melody=melody,
                                        melody_sample_rate=rate)

    with pytest.raises(ValueError, match=r"melody audio must be \[1 or 2, channels, samples\], got \(300,\)"):
        generate(tiny.melody[0, 0])
    with pytest.raises(ValueError, match=r"melody audio must be \[1 or 2, channels, samples\], got \(3, 1, 300\)"):
        generate(tiny.melody.expand(3, -1, -1))
    with pytest.raises(ValueError, match=r"melody audio is empty: shape \(1, 1, 0\)"):
        generate(tiny.melody[..., :0])
    broken = tiny.melody.clone()
    broken[0, 0, [5, 50]] = torch.tensor([float("nan"), float("inf")])
    with pytest.raises(ValueError, match=r"melody audio holds 2 non-finite samples"):
        generate(broken)
    with pytest.raises(ValueError, match=r"melody sample rate: expected a positive integer \(Hz\), got 0"):
        generate(tiny.melody, rate=0)
    plain = Generator(MusicLM(lm_config("tiny")), _ZeroText(), Codec(codec_config("tiny")))
    with pytest.raises(ValueError, match=r"this model takes no melody \(a MusicGen-melody checkpoint does\)"):
        plain.generate_codes(TEXTS, duration=0.1, sampling=sampling, melody=tiny.melody)


def test_melody_files_are_read_as_recorded_or_refused_by_name(tmp_path):
    import soundfile  # here only: bench/melody_gpu_check.py imports this module where soundfile is not installed

    stereo = _tones(["A4", "E4"], 0.25, 44100, channels=2)[0]
    stereo[1] *= 0.5
    soundfile.write(tmp_path / "melody.wav", stereo.T.numpy(), 44100, subtype="FLOAT")
    audio, rate = read_melody(tmp_path / "melody.wav")
    assert rate == 44100 and audio.shape == (1, 2, stereo.shape[-1]) and torch.equal(audio[0], stereo)
    (tmp_path / "notes.wav").write_text("not audio at all")
    with pytest.raises(ValueError, match=r"notes.wav: cannot read audio"):
        read_melody(tmp_path / "notes.wav")
    soundfile.write(tmp_path / "empty.wav", np.zeros((0, 1), dtype=np.float32), 32000, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"empty.wav: the melody holds no audio samples"):
        read_melody(tmp_path / "empty.wav")
    broken = np.zeros((100, 1), dtype=np.float32)
    broken[[3, 7]] = np.nan
    soundfile.write(tmp_path / "nan.wav", broken, 32000, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"nan.wav: non-finite samples \(2 NaN or infinite values"):
        read_melody(tmp_path / "nan.wav")


def test_lm_configurations_of_prefix_conditioning_are_checked():
    with pytest.raises(ValueError, match=r"conditioning must be one of cross, prefix, got 'side'"):
        LMConfig(conditioning="side")
    with pytest.raises(ValueError, match=r"a melody \(melody_dim=12\) needs conditioning='prefix', got 'cross'"):
        LMConfig(melody_dim=12, melody_frames=235)
    with pytest.raises(ValueError, match=r"melody_dim \(12\) and melody_frames \(None\) are set together"):
        LMConfig(conditioning="prefix", melody_dim=12)
    with pytest.raises(ValueError, match=r"melody_frames must be an integer >= 1, got 0"):
        LMConfig(conditioning="prefix", melody_dim=12, melody_frames=0)
    prefix_lm = MusicLM(LMConfig(conditioning="prefix", codebook_size=16, dim=32, layers=1, heads=2, ffn_dim=32,
                                 text_dim=8))
    states, mask = torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.bool)
    assert prefix_lm.prefix(states, mask).shape == (1, 3, 32)  # no melody: the text alone
    with pytest.raises(ValueError, match=r"this LM takes no melody"):
        prefix_lm.prefix(states, mask, torch.zeros(1, 4, 12))
    with pytest.raises(ValueError, match=r"a prefix-conditioned LM has no cross-attention memory"):
        prefix_lm.cross_memory(states, mask)
    with pytest.raises(ValueError, match=r"a cross-conditioned LM takes no prefix"):
        MusicLM(lm_config("tiny")).prefix(torch.zeros(1, 3, 64), mask)


def test_the_compiled_step_gives_the_eager_codes_behind_a_prefix(tiny):
    """``compile=True`` with a prefix: the compiled step's position is the step plus the prefix's length."""
    parts = load_music_model(tiny.folder)
    eager, compiled = (Generator(parts.lm, parts.text, parts.codec, compile=flag, chroma=parts.chroma).generate_codes(
        TEXTS, duration=FRAMES / 25, sampling=Sampling(guidance_scale=3.0, top_k=5), seed=2, melody=tiny.melody,
        melody_sample_rate=200) for flag in (False, True))
    assert compiled.shape == (2, 4, FRAMES) and torch.equal(compiled, eager)


def test_streaming_with_a_melody_adds_up_to_generate(published):
    """(The published widths: their EnCodec is non-causal, which streaming handles; a causal transformers EnCodec,
    as the tiny one, does not stream exactly, melody or not.)"""
    generator = Generator.from_pretrained(published.folder)
    kwargs = dict(sampling=Sampling(guidance_scale=3.0, temperature=0), melody=published.melody,
                  melody_sample_rate=published.melody_rate)
    whole = generator.generate(TEXTS, 16 / 50, **kwargs)
    chunks = list(generator.stream(TEXTS, 16 / 50, chunk_seconds=0.06, **kwargs))
    assert len(chunks) > 1
    torch.testing.assert_close(torch.cat(chunks, dim=-1), whole, atol=1e-5, rtol=0)


def test_exporting_a_melody_model_is_refused_before_anything_is_written(tiny, tmp_path):
    from mmdgen.pretrained import export_model

    for format in ("transformers", "audiocraft"):
        with pytest.raises(ValueError, match=r"a prefix-conditioned LM \(MusicGen-melody\); exporting one is not "
                                             r"supported yet \(nothing written\)"):
            export_model(tiny.folder, tmp_path / format, format)
        assert not (tmp_path / format).exists()


def test_a_melody_checkpoint_runs_without_transformers_or_audiocraft(tiny, monkeypatch):
    their_codes, _ = tiny.generate(3.0, True)  # computed before transformers is blocked
    for library in ("transformers", "audiocraft"):
        monkeypatch.setitem(sys.modules, library, None)  # any import of it now fails
    generator = Generator.from_pretrained(tiny.folder)
    assert torch.equal(tiny.ours(generator, 3.0, True), their_codes)


def test_the_generate_command_takes_a_melody_file(tiny, tmp_path, capsys):
    import soundfile

    from mmdgen import cli

    soundfile.write(tmp_path / "melody.wav", tiny.melody[0].T.numpy(), tiny.melody_rate, subtype="FLOAT")
    out = tmp_path / "clip.wav"
    args = ["generate", "a calm jig", "--model", str(tiny.folder), "--duration", "0.4", "--temperature", "0", "--out",
            str(out)]
    assert cli.main(args + ["--melody", str(tmp_path / "melody.wav")]) == 0
    written, _ = soundfile.read(out, dtype="float32")
    generator = Generator.from_pretrained(tiny.folder)
    expected = generator.generate(["a calm jig"], 0.4, Sampling(temperature=0), melody=tiny.melody,
                                  melody_sample_rate=tiny.melody_rate)[0, 0]
    assert abs(torch.from_numpy(written) - expected.clamp(-1, 1)).max() < 2 / 32768
    (tmp_path / "noise.txt").write_text("not audio")
    assert cli.main(args + ["--melody", str(tmp_path / "noise.txt")]) == 2
    assert "noise.txt: cannot read audio" in capsys.readouterr().err
