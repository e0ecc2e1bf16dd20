# Set-up from a fresh clone. torch is installed only when none is importable, so a
# user's own build (CUDA, or CPU torch + torch_npu for Ascend) is kept.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: setup test demo lint bench soak clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

setup: $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"

test: setup
	$(BIN)/python -m pytest

# A second `make demo` resumes each run where it stopped (a finished run only re-exports
# and re-evaluates); remove runs/demo and runs/demo-grpo to start afresh.
demo: setup
	@if [ -f runs/demo/config.toml ]; then echo "make demo: runs/demo exists: resuming it"; \
		$(BIN)/anychip train --resume runs/demo; \
	else echo "make demo: starting runs/demo afresh"; $(BIN)/anychip train --run-dir runs/demo; fi
	@if [ -f runs/demo-grpo/config.toml ]; then echo "make demo: runs/demo-grpo exists: resuming it"; \
		$(BIN)/anychip grpo --resume runs/demo-grpo; \
	else echo "make demo: starting runs/demo-grpo afresh"; \
		$(BIN)/anychip grpo --init runs/demo --run-dir runs/demo-grpo; fi
	$(BIN)/anychip eval runs/demo
	$(BIN)/anychip eval runs/demo-grpo
	$(BIN)/anychip report runs/demo
	$(BIN)/anychip report runs/demo-grpo

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/model_step.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/checkpoint.py
	$(BIN)/python bench/guards.py
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/parallel.py

soak: setup
	$(BIN)/python bench/chaos_soak.py

clean:
	rm -rf $(VENV) build *.egg-info
