#!/usr/bin/env bash
# The first thing to run on a machine with GPUs: every shipped GPU config (configs/gpu-*.env) on its real path
# for a few steps, then one table. Needs the CUDA build of torch in $PY; offline; installs nothing.
#
#   bash bench/gpu.sh [--steps N] [--configs "gpu-125m gpu-1b-fsdp"] [--out DIR]
#   bash bench/gpu.sh --dry-run        # the same logic on CPU: debug preset, 2 gloo ranks (tests/test_bench_gpu.py)
#
# Per config, with its own settings (precision, torch.compile, activation checkpointing, FSDP2, micro-batch,
# MAX_SEQ_LEN) and only these changed: N steps (default 6) of 2 micro-steps per rank, validation, sampling and a
# checkpoint at step N, the repo's embedded corpus (prepared offline), W&B off.
#   run a:   N steps (FSDP2 configs on min(GPUs, 8) ranks, others on 1 GPU)
#   run b:   RESUME=require from run a's checkpoint to step N + 2
#   run one: FSDP2 configs with 2+ ranks, when the plan fits one GPU: the same global batch on 1 rank; losses
#            equal run a's within the precision's tolerance (bench/gpu_report.py)
# A config whose memory plan (memory_plan.py, `python model_utils.py plan`) does not fit the GPUs here is
# skipped, with the plan shown. Table: step time, MFU against the datasheet peak, peak memory (allocator peak
# on CUDA) against the plan. Logs and runs stay in --out (default runs/bench-gpu/<UTC time>).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=6
DRY=0
CONFIGS=""
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --steps) STEPS=$2; shift ;;
        --configs) CONFIGS=$2; shift ;;
        --out) OUT=$2; shift ;;
        *) echo "bench/gpu.sh: unknown argument $1 (expected --dry-run, --steps N, --configs \"NAMES\", --out DIR)" >&2
           exit 2 ;;
    esac
    shift
done
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/bench-gpu/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
if [ -z "$CONFIGS" ]; then
    CONFIGS=$(cd configs && ls gpu-*.env | sed 's/\.env$//' | tr '\n' ' ')
fi

if [ "$DRY" = 1 ]; then
    NGPU=2  # gloo ranks on CPU
    DEVICE_SETTINGS=(DEVICE=cpu MODEL_PRESET=debug MAX_SEQ_LEN=64 MAX_BATCH_SIZE=2 USE_TORCH_COMPILE=false
                     TRAINING_PRECISION=fp32 HELLASWAG_EVERY_X_STEPS=-1)
    export OMP_NUM_THREADS=1
else
    NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    if [ "$NGPU" -lt 1 ]; then
        echo "bench/gpu.sh: no CUDA device visible to $PY (torch.cuda.device_count() = 0): run it on a GPU machine" \
             "with the CUDA build of torch, or use --dry-run for the CPU smoke" >&2
        exit 2
    fi
    DEVICE_SETTINGS=()
fi

echo "[data] embedded corpus -> $OUT/data" >&2
"$PY" load_pretrain_dataset.py --out "$OUT/data" --no-progress > "$OUT/data.log" 2>&1 \
    || { echo "bench/gpu.sh: data preparation failed, see $OUT/data.log" >&2; exit 1; }

# launch NAME RUN_DIR RANKS SETTINGS...: train.py through bench/gpu_run.py (peak memory per rank); exit code
# in RUN_DIR/rc, output in RUN_DIR/train.log; a failure is recorded, not fatal
launch() {
    local run=$1 ranks=$2
    shift 2
    mkdir -p "$run"
    set +e
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$ranks" -m bench.gpu_run "$run" "$@" \
        > "$run/train.log" 2>&1
    echo $? > "$run/rc"
    set -e
    if [ "$(cat "$run/rc")" != 0 ]; then
        echo "  failed (exit $(cat "$run/rc")): $run/train.log" >&2
        tail -5 "$run/train.log" >&2
    fi
}

for name in $CONFIGS; do
    env_file=configs/$name.env
    [ -f "$env_file" ] || { echo "bench/gpu.sh: no $env_file" >&2; exit 2; }
    dir=$OUT/$name
    mkdir -p "$dir"
    echo "$STEPS" > "$dir/steps"
    vars=$("$PY" -m bench.gpu_report plan "$env_file" "$NGPU" "$dir/plan.json" "${DEVICE_SETTINGS[@]}")
    eval "$vars"  # RANKS FITS SEQ MB PREC
    if [ "$FITS" != 1 ]; then
        echo "[$name] skipped: its memory plan does not fit the GPUs here ($dir/plan.json)" >&2
        continue
    fi
    hs=()
    if [ "$DRY" != 1 ]; then
        hs_path=$("$PY" -c "import config; \
print(config.load_config('$env_file', use_environ=False)['HELLASWAG_PATH'])")
        if [ -f "$hs_path" ]; then
            hs=(HELLASWAG_EVERY_X_STEPS="$STEPS" HELLASWAG_NUMBER_OF_EXAMPLES=64)
        else
            hs=(HELLASWAG_EVERY_X_STEPS=-1)  # not downloaded: the bench stays offline
        fi
    fi
    # global batch: 2 micro-steps on each of RANKS ranks (the 1-rank comparison accumulates the same batch)
    common=(--env-file "$env_file" "${DEVICE_SETTINGS[@]}" "${hs[@]}"
            TOTAL_BATCH_SIZE=$((SEQ * MB * RANKS * 2)) WARMUP_STEPS=2
            VALIDATE_EVERY_X_STEPS="$STEPS" VAL_STEPS=2 GENERATE_EVERY_X_STEPS="$STEPS" MAX_TEST_GEN_LEN=16
            SAVE_CHECKPOINTS=true SAVE_EVERY_X_STEPS="$STEPS" MAX_NUMBER_CHECKPOINTS=2 WANDB_ENABLED=false
            EARLY_STOPPING_PATIENCE=0 TEST_PROMPTS_FILE=test_prompts.json PRETRAIN_DATALOADER_ROOT_PATH="$OUT/data")
    echo "[$name] $RANKS rank(s), $PREC, $STEPS steps + save" >&2
    launch "$dir/a" "$RANKS" "${common[@]}" MAX_STEPS="$STEPS" RESUME=never \
        PRETRAIN_SAVE_CHECKPOINTS_PATH="$dir/a/ck" RUN_DIR="$dir/a/run"
    echo "[$name] resume to step $((STEPS + 2))" >&2
    launch "$dir/b" "$RANKS" "${common[@]}" MAX_STEPS=$((STEPS + 2)) RESUME=require \
        PRETRAIN_SAVE_CHECKPOINTS_PATH="$dir/a/ck" RUN_DIR="$dir/b/run"
    one_fits=$("$PY" -m bench.gpu_report plan "$env_file" 1 "$dir/plan_one.json" "${DEVICE_SETTINGS[@]}" | \
               sed -n 's/.*FITS=\([01]\).*/\1/p')
    if [ "$RANKS" -ge 2 ] && [ "$one_fits" = 1 ]; then
        echo "[$name] the same global batch on 1 rank" >&2
        launch "$dir/one" 1 "${common[@]}" MAX_STEPS="$STEPS" RESUME=never SAVE_CHECKPOINTS=false \
            PRETRAIN_SAVE_CHECKPOINTS_PATH="$dir/one/ck" RUN_DIR="$dir/one/run"
    fi
done

{
    echo "bench/gpu.sh: $(date -u '+%Y-%m-%d %H:%M UTC'), $([ "$DRY" = 1 ] && echo "dry run on CPU (debug preset)" \
        || "$PY" -c 'import torch; print(torch.cuda.device_count(), "x", torch.cuda.get_device_name(0), "| torch", torch.__version__)')"
    echo
    "$PY" -m bench.gpu_report table "$OUT"
} > "$OUT/table.md" && status=0 || status=1
cat "$OUT/table.md"
echo
echo "logs and runs: $OUT" >&2
exit $status
