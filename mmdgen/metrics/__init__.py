"""Measures, one per file: dependence between codebooks (``dependence``), reconstruction (``reconstruction``),
and the generation metrics (``fad``, ``instruments``, ``key``, ``tempo``, on the ``musicnn`` tagger read from its
TensorFlow checkpoint by ``tf_checkpoint``). The reports that combine them live in ``mmdgen.eval``."""
