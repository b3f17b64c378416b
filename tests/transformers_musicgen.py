"""What the tests comparing with transformers' MusicGen share: the widths of random checkpoints (the published
models' T5 and EnCodec, 2 layers each; a tiny stand-in) and its greedy generate, with the codes it decoded."""

import torch

# T5-base's widths (2 layers) and the 32 kHz EnCodec of the published checkpoints, as transformers config kwargs
PUBLISHED_T5 = dict(d_model=768, d_kv=64, d_ff=3072, num_layers=2, num_heads=12)
PUBLISHED_ENCODEC = dict(target_bandwidths=[2.2], sampling_rate=32000, hidden_size=128, num_filters=64,
                         upsampling_ratios=[8, 5, 4, 4], num_lstm_layers=2, codebook_size=2048,
                         use_causal_conv=False, use_conv_shortcut=False)
# small everything: a 200 Hz codec over 32 codes
TINY_T5 = dict(d_model=24, d_kv=12, d_ff=32, num_layers=1, num_heads=2)
TINY_ENCODEC = dict(target_bandwidths=[0.5], sampling_rate=200, hidden_size=8, num_filters=4,
                    upsampling_ratios=[4, 2], num_lstm_layers=1, codebook_size=32)


def their_codes_and_audio(model, tokenizer, texts, **generate):
    """transformers' greedy ``generate`` (``generate``: its keyword arguments): the codes its codec decoded (both
    channels' for stereo, interleaved as the LM predicts them: left k, right k, ...) and the audio."""
    calls = []
    real_decode = model.audio_encoder.decode

    def capture(codes, *args, **kwargs):
        calls.append(codes[0])
        return real_decode(codes, *args, **kwargs)

    model.audio_encoder.decode = capture
    try:
        inputs = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            audio = model.generate(**inputs, do_sample=False, **generate)
    finally:
        model.audio_encoder.decode = real_decode
    codes = torch.stack(calls, dim=2).flatten(1, 2) if len(calls) == 2 else calls[0]
    return codes, audio
