"""Trained and published models in: our model directories (``directory``), transformers folders
(``transformers_folder``), audiocraft's exported files (``audiocraft_files``), repository ids in the local Hugging
Face cache (``hub_cache``), and the one loader that tells them apart by content (``loader``)."""

from mmdgen.pretrained.directory import (codec_identity, copy_codec, load_codec, load_lm_codec, load_music_lm,
                                         save_codec, save_music_lm)
from mmdgen.pretrained.loader import MusicModel, load_codec_model, load_music_model, locate

__all__ = ["MusicModel", "codec_identity", "copy_codec", "load_codec", "load_codec_model", "load_lm_codec",
           "load_music_lm", "load_music_model", "locate", "save_codec", "save_music_lm"]
