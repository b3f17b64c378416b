"""What the tests comparing with transformers' MusicGen share: its greedy generate, with the codes it decoded."""

import torch


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
