# The two commands a newcomer runs: `make demo` and `make test`.
# Both create .venv on first use (CPU JAX); rerun after pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-all bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# The demo trains on the smoke config (synthetic data through the JAX pipeline, no
# TensorFlow) and skips validation (its compile is as long as the training step's); the
# example's matte afterwards shows the network's output.
demo: $(VENV)/.installed
	$(PY) train.py --config configs/smoke.py --workdir demo_out/run --config.eval_every=0
	$(PY) -m a2u_jax.demo --checkpoint demo_out/run/model --out demo_out

# One pytest worker per core (at most 4); a test file stays on one worker, so its
# module-scoped compiled fixtures are built once.
test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" -n auto --maxprocesses=4 --dist loadfile --durations=12

# Everything, the slow tests included (what CI runs). One process: the multi-process and
# resume tests time their own child processes.
test-all: $(VENV)/.installed
	$(PY) -m pytest -q --durations=20

bench: $(VENV)/.installed
	$(PY) benchmarks/reassembly.py
