# The README's two set-up commands: `make demo` and `make test`. Each creates .venv if missing
# and installs the project into it, so either works as the only command on a fresh machine.
# On a machine without a CUDA GPU the bootstrap installs torch==2.13.0 (CPU wheel, local disk)
# first, so nothing downloads a multi-GB CUDA build. The extras: `train` (our trainer, pipeline,
# gate: datasets, tensorboard, matplotlib), `trl` (the TRL/PEFT/HF Trainer integrations), `peers`
# (what the benchmarks and tests compare against), `dev` (pytest, hypothesis, ruff), `eval`
# (lm-evaluation-harness).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.r7b-installed
DEPS   := pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)

.PHONY: venv test test-quick lint demo bench clean

$(STAMP): $(DEPS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if ! nvidia-smi -L >/dev/null 2>&1; then \
	  echo "no CUDA GPU: installing the CPU build torch==2.13.0"; \
	  $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[dev,peers,train,trl,eval]"
	@touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q --durations=15

test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -x

demo: $(STAMP)
	$(PY) -m r7b_fast.pipeline pipeline_demo

bench: $(STAMP)
	@echo "Benchmarks (each prints a table and writes JSON under benchmarks/results/):"
	@for f in benchmarks/*.py; do case $$f in */__init__.py|*/_*|*/render_results.py) ;; *) \
	  n=$$(basename $$f .py); echo "  $(PY) -m benchmarks.$$n"; esac; done
	@echo "  bash benchmarks/gpu_suite.sh        (GPU: correctness at real shapes, then timing)"
	@echo "  bash benchmarks/gpu_suite.sh --dry-run   (CPU: the same script on tiny shapes)"

clean:
	rm -rf build *.egg-info r7b_fast/_merge*.so
