# olavlm: every target sets itself up on a fresh clone (`make demo`, `make test`).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
OLA    := $(VENV)/bin/ola
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast test-gpu bench bench-gpu gpu-check lint clean

install: $(VENV)/.installed

# torch is pinned first: on these machines 2.13.0 is a local CPU build, while an
# unpinned torch would download a multi-GB CUDA build. Everything else comes from the
# locks with --no-deps: exact versions, no resolver backtracking. requirements-lock.txt
# pins olavlm[demo] (what `ola` and `make demo` run on), requirements-dev-lock.txt the
# test and lint tools; regenerate both with `.venv/bin/python -m tests._locks`.
$(VENV)/.installed: pyproject.toml requirements-lock.txt requirements-dev-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps -r requirements-lock.txt -r requirements-dev-lock.txt
	$(PY) -m pip install -q --no-deps -e '.[dev]'
	$(PY) -m pip check
	touch $@

demo: install
	$(OLA) demo --out demo-out

test: install
	$(PY) -m pytest -q --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# CUDA-only tests (tests/test_cuda.py; without CUDA each is skipped with its reason). The JUnit report
# feeds `ola bench gpu --cuda-tests` (the summary's cuda_tests_passed). With PY/OLA given (the GPU
# machine, which has no venv: `make gpu-check PY=python3 OLA=ola GPU_OUT=$$OUT`) nothing is installed.
GPU_OUT ?= out
SETUP := $(if $(filter $(VENV)/%,$(PY)),install)
test-gpu: $(SETUP)
	mkdir -p $(GPU_OUT)
	$(PY) -m pytest -q -p no:cacheprovider -m cuda --junitxml=$(GPU_OUT)/test-gpu.xml

bench: install
	mkdir -p out
	$(OLA) bench cache --json | tee out/bench-cache.json
	$(OLA) bench codecs --json | tee out/bench-codecs.json
	$(OLA) bench precompute --json | tee out/bench-precompute.json
	$(OLA) bench loader --json | tee out/bench-loader.json
	$(OLA) bench decode --json | tee out/bench-decode.json
	$(OLA) bench join --json | tee out/bench-join.json
	$(OLA) bench train --json | tee out/bench-train.json
	$(OLA) bench heads --json | tee out/bench-heads.json

# GPU figures (docs/BENCHMARKS.md, "GPU"): ~6 min on one H100; a < 60 s smoke run without CUDA.
# Progress on stderr; out/bench-gpu.json is rewritten after every section. Extra options: BENCH_GPU_ARGS="--images 4096".
bench-gpu: install
	mkdir -p out
	$(OLA) bench gpu --json --out out/bench-gpu.json $(BENCH_GPU_ARGS)

# The device run (docs/BENCHMARKS.md, "GPU"): the CUDA tests, then every figure, with the tests' count
# in the JSON's summary. The bench runs even when a test fails (the summary says how many passed).
gpu-check: $(SETUP)
	-$(MAKE) --no-print-directory test-gpu PY=$(PY) GPU_OUT=$(GPU_OUT)
	$(OLA) bench gpu --json --out $(GPU_OUT)/bench-gpu.json --cuda-tests $(GPU_OUT)/test-gpu.xml \
		$(BENCH_GPU_ARGS) > /dev/null  # the same JSON as --out; the table and progress go to stderr

# `ruff format` is the formatter; lint fails on unformatted code (run `.venv/bin/ruff format .`).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) out demo-out .pytest_cache
