"""Trained and published models in: our model directories (``directory``), transformers folders
(``transformers_folder``), audiocraft's exported files (``audiocraft_files``), repository ids in the local Hugging
Face cache (``hub_cache``), and the one loader that tells them apart by content (``loader``); and out again, in
transformers' or audiocraft's format (``export``)."""

from mmdgen.pretrained.directory import (codec_identity, copy_codec, load_codec, load_lm_codec, load_music_lm,
                                         save_codec, save_music_lm)
from mmdgen.pretrained.export import export_model
from mmdgen.pretrained.loader import MusicModel, load_codec_model, load_music_model, locate

__all__ = ["MusicModel", "codec_identity", "copy_codec", "export_model", "load_codec", "load_codec_model",
           "load_lm_codec", "load_music_lm", "load_music_model", "locate", "save_codec", "save_music_lm"]
