"""The names a configuration chooses from, one ``Literal`` each: the modules that act on a name take their tuple of
names from here (``PATTERNS = get_args(PatternName)``), and the command line shows them as an option's choices.

No torch here: ``mmdgen <command> --help`` lists these without loading a model.
"""

from __future__ import annotations

from typing import Literal

Backend = Literal["auto", "triton", "torch"]  # the fused ops' implementation (mmdgen.kernels.backend)
Precision = Literal["auto", "bf16", "fp32"]  # training: bf16 autocast on CUDA ("auto"), or full precision
OptimizerState = Literal["fp32", "bf16"]  # the dtype of the LM optimiser's moments (mmdgen.train.optim)
CodecPreset = Literal["tiny", "paper"]  # mmdgen.model.codec.PRESETS
LMPreset = Literal["tiny", "mini", "small"]  # mmdgen.model.lm.PRESETS
PatternName = Literal["parallel", "delay", "flatten", "valle"]  # the codebook patterns (mmdgen.model.patterns)
Conditioning = Literal["cross", "prefix"]  # how the LM's layers see the conditioning (mmdgen.model.lm)
StageLatent = Literal["quantized", "residual_after", "residual_before"]  # what the independence loss sees per stage
TextConditionerKind = Literal["learned", "minilm", "t5"]  # mmdgen.model.text
AudioFormat = Literal["flac", "wav"]  # the corpus clips' files
Split = Literal["train", "valid", "test"]  # a corpus manifest's splits
ExportFormat = Literal["transformers", "audiocraft", "mmdgen"]  # `mmdgen export` (mmdgen.pretrained.export)
Quantization = Literal["none", "int8", "int8-dynamic"]  # int8 decoding (mmdgen.model.quantize; "none": float)
CpuLinear = Literal["auto", "packed", "plain"]  # a float LM's linear layers on CPU (mmdgen.model.packing)
KVCacheDtype = Literal["model", "bfloat16", "float16"]  # the decode step's KV cache (mmdgen.generate.loop.DecodeRuntime)
Scheduling = Literal["auto", "continuous", "bucketed"]  # how a prompts file is batched (mmdgen.generate.batch)
