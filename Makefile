# `make demo` and `make test` each create or refresh .venv first, so both work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Installs skip byte-compiling (a minute for torch's and Ray's thousands of files); Python caches the modules a run
# imports instead, which it cannot do where the environment sets PYTHONDONTWRITEBYTECODE, so it is cleared here.
export PYTHONDONTWRITEBYTECODE :=
# Pinned to the releases this project is tested with; `make TORCH_SPEC="torch torchvision" ...` takes newer ones.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR := outputs/demo

.PHONY: venv demo test test-fast lint bench clean

# The stamp is rebuilt when pyproject.toml changes or the environment no longer imports.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile $(TORCH_SPEC)
	$(PY) -m pip install -q --no-compile -e '.[dev,tune,mlflow]'
	@touch $@

venv:
	@$(PY) -c "import segx, torch, torchvision, pytorch_lightning, hydra" 2>/dev/null || rm -f $(VENV)/.installed
	@$(MAKE) --no-print-directory $(VENV)/.installed

demo: venv
	rm -rf $(DEMO_DIR)
	$(PY) train.py experiment=demo hydra.run.dir=$(DEMO_DIR)
	$(PY) evaluate.py ckpt=$(DEMO_DIR)/checkpoints/best.ckpt hydra.run.dir=$(DEMO_DIR)/evaluate
	$(PY) -m segx.report $(DEMO_DIR)
	@echo ""
	@echo "Run directory:   $(DEMO_DIR)  (metrics.json, checkpoints/best.ckpt, checkpoints/last.ckpt)"
	@echo "Evaluation:      $(DEMO_DIR)/evaluate/metrics.json"
	@echo "Report:          $(DEMO_DIR)/report.md (plots in $(DEMO_DIR)/plots)"
	@echo "TensorBoard:     $(VENV)/bin/tensorboard --logdir $(DEMO_DIR)/tensorboard"

# --durations: the slowest tests close the log, so a suite that creeps towards its time limit shows where.
test: venv
	$(PY) -m pytest -q --durations=20

# The edit loop: everything but the end-to-end tests marked `slow`.
test-fast: venv
	$(PY) -m pytest -q -m "not slow"

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	$(PY) -m segx.bench --json bench.json

clean:
	rm -rf outputs multirun data/shapes .pytest_cache gpu-check.json

# Checks a CUDA machine (python -m segx.bench.gpu_check): `make gpu-check PY=python3` runs with that interpreter as
# it is (no .venv is built); without PY it uses .venv, built first like the other targets. GPU_CHECK_ARGS passes
# flags on, e.g. GPU_CHECK_ARGS="--parts train-bf16 evaluate --json out.json".
.PHONY: gpu-check
gpu-check: $(if $(filter command line,$(origin PY)),,venv)
	$(PY) -m segx.bench.gpu_check $(GPU_CHECK_ARGS)
