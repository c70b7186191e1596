SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test]" 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -c "import torchvision.ops, flwr, ray, hydra"
	touch $(STAMP)

install: $(STAMP)

# The headline: DualLoRA on the default experiment, then the fine-tuning lower bound on the same ViT.
run: $(STAMP)
	$(PY) simulations/compare_methods.py --methods duallora,finetune --out outputs/make_run -- \
		model=vit optimizer=adam lr=0.001 $(ARGS)

# Two test processes: most tests wait on Ray and process start-up, so on the 2-core machine the suite
# takes ~7 min instead of ~9 (PYTEST_ARGS="-n 0" runs it in one process).
test: $(STAMP)
	$(PY) -m ruff check fedcl tests simulations
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
