#!/usr/bin/env bash
# Post-training demo (LoRA-SFT, DPO, distillation of SmolLM2-135M-Instruct) on CPU; see scripts/demo_posttrain.py.
# Called by `make demo-posttrain`; uses the project venv when present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" -m scripts.demo_posttrain "$@"
