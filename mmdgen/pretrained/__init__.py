"""Trained models in and out: our model directories (``directory``)."""

from mmdgen.pretrained.directory import (codec_identity, copy_codec, load_any_codec, load_codec, load_lm_codec,
                                         load_music_lm, save_codec, save_music_lm)

__all__ = ["codec_identity", "copy_codec", "load_any_codec", "load_codec", "load_lm_codec", "load_music_lm",
           "save_codec", "save_music_lm"]
