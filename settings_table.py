"""Every setting the project reads: key, group, type, default, help — one table, one source of truth.

`config.py` parses and validates against this table; `.env.example` is generated from it
(`python config.py example > .env.example`) and a test keeps the two in sync.
Key names follow the earlier Llama 3 training scripts' `.env` keys, so such a file works unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Setting:
    key: str
    group: str
    kind: str  # int | float | bool | str | list | floats | json (config.convert reads it; config_sections types it)
    default: Any
    help: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    secret: bool = False  # never printed; see is_secret for the name rule that also applies
    env: bool = False  # also exported to the process environment, where a library reads it


S = Setting
SETTINGS: list[Setting] = [
    # ---- model -------------------------------------------------------------------------------
    S("MODEL_PRESET", "model", "str", "", "named size (debug, tiny, small, 125m, 350m, 1b, smollm2-135m, "
      "llama3.2-1b, llama3.2-3b, llama3.1-8b, llama3.1-70b; Mixture of Experts: moe-debug, moe-small; GPT-2 "
      "(MODEL_FAMILY=gpt2): gpt2-debug, gpt2-124m, gpt2-350m, gpt2-774m, gpt2-1.5b); explicit model keys below "
      "override it"),
    S("DIM", "model", "int", 768, "model width", min=8),
    S("N_LAYERS", "model", "int", 16, "number of transformer blocks", min=1),
    S("N_HEADS", "model", "int", 16, "attention heads", min=1),
    S("N_KV_HEADS", "model", "int", 8, "key/value heads (GQA); = N_HEADS for multi-head attention", min=1),
    S("VOCAB_SIZE", "model", "int", 0, "0 = the tokenizer's vocabulary size", min=0),
    S("MULTIPLE_OF", "model", "int", 1024, "SwiGLU hidden size is rounded up to a multiple of this", min=1),
    S("FFN_DIM_MULTIPLIER", "model", "float", 1.0, "multiplier on the 8/3*DIM SwiGLU hidden size", min=0.01),
    S("FFN_HIDDEN_DIM", "model", "int", 0, "explicit SwiGLU hidden size; 0 = derive from the rule above", min=0),
    S("NORM_EPS", "model", "float", 1e-5, "RMSNorm epsilon", min=0.0),
    S("ROPE_THETA", "model", "float", 500000.0, "RoPE base frequency", min=1.0),
    S("ROPE_SCALING", "model", "json", None, "Llama 3.1 rope scaling as JSON, e.g. {\"factor\": 8, "
      "\"low_freq_factor\": 1, \"high_freq_factor\": 4, \"original_max_position_embeddings\": 8192}; empty = none"),
    S("ROPE_SCALING_FACTOR", "model", "float", 0.0, "Llama 3 RoPE scaling factor of a Meta params.json with "
      "use_scaled_rope (INIT_FROM / TEACHER_MODEL_CHECKPOINT); 0 = its rope_scaling_factor, else 32 for the "
      "Llama 3.2 1B/3B shapes (their HF configs), else 8 (Llama 3.1)", min=0.0),
    S("TIE_EMBEDDINGS", "model", "bool", False, "share the input embedding with the output projection"),
    S("MAX_SEQ_LEN", "model", "int", 1024, "training context length in tokens", min=2),
    S("MOE_NUM_EXPERTS", "model", "int", 0, "Mixture-of-Experts FFN with this many SwiGLU experts per block (each of "
      "the FFN size above, Mixtral routing); 0 = the dense FFN", min=0),
    S("MOE_TOP_K", "model", "int", 2, "experts each token is routed to (softmax over all experts, top-k, "
      "renormalized)", min=1),
    S("MOE_CAPACITY_FACTOR", "model", "float", 0.0, "training only: an expert takes at most ceil(factor * tokens * "
      "MOE_TOP_K / MOE_NUM_EXPERTS) assignments per micro-batch, the rest are dropped (first choices served first); "
      "0 = no-drop, as Mixtral", min=0.0),
    S("MOE_SHARED_EXPERT", "model", "bool", False, "add one always-on SwiGLU expert every token goes through "
      "(DeepSeekMoE); such a model has no HF Mixtral export"),
    S("INIT_FROM", "model", "str", "", "start weights: empty = random init (pretrain) or the previous stage's "
      "latest checkpoint; else a checkpoint dir, Meta dir, HF dir/hub id or .gguf file"),
    S("MODEL_FAMILY", "model", "str", "llama", "architecture: llama (model.py: Llama 3, RoPE, RMSNorm, SwiGLU or "
      "MoE) | gpt2 (gpt2.py: learned positions up to MAX_SEQ_LEN, LayerNorm, GELU MLP of 4*DIM, biases, tied head; "
      "reads DIM N_LAYERS N_HEADS VOCAB_SIZE MAX_SEQ_LEN NORM_EPS DROPOUT and ignores the RoPE, FFN and KV-head keys; MoE is "
      "llama only); a model loaded from INIT_FROM keeps its own family", choices=("llama", "gpt2")),
    S("DROPOUT", "model", "float", 0.0, "gpt2: dropout on the embeddings, the attention weights and each residual "
      "branch while training (GPT-2 was trained with 0.1, which its presets set); llama has no dropout and refuses "
      "a non-zero value", min=0.0, max=0.9),
    # ---- tokenizer / chat --------------------------------------------------------------------
    S("TOKENIZER_CHECKPOINT_PATH", "tokenizer", "str", "./tokenizer.model",
      "tiktoken-format file, HF tokenizer dir/hub id, or .gguf; 'model' = the tokenizer of INIT_FROM"),
    S("SYSTEM_PROMPT", "tokenizer", "str", "You are a helpful AI assistant", "system prompt for chat data"),
    # ---- data preparation --------------------------------------------------------------------
    S("HF_HOME", "data", "str", "", "Hugging Face datasets / hub cache, exported for huggingface_hub and datasets; "
      "empty = their default (~/.cache/huggingface)", env=True),
    S("HF_PRETRAIN_DATASET_MIX_FILE", "data", "str", "", "JSON mix file for pretraining data (seed format)"),
    S("HF_INSTRUCT_DATASET_MIX_FILE", "data", "str", "", "JSON mix file for instruction data"),
    S("HF_DPO_DATASET_MIX_FILE", "data", "str", "", "JSON mix file for preference data"),
    S("HF_PRETRAIN_DATASET_TARGET_PATH", "data", "str", "data/pretrain", "where pretraining shards are written"),
    S("HF_INSTRUCT_DATASET_TARGET_PATH", "data", "str", "data/instruct", "where SFT shards are written"),
    S("HF_DPO_DATASET_TARGET_PATH", "data", "str", "data/dpo", "where DPO shards are written"),
    S("NUMBER_OF_CPU_PROCESSES", "data", "int", 0, "tokenization workers; 0 = automatic (half the cores)", min=0),
    S("SHARD_SIZE", "data", "int", 10_000_000, "tokens per shard", min=1024),
    S("VAL_FRACTION", "data", "float", 0.01, "fraction of documents (hash-split) kept for validation",
      min=0.0, max=0.5),
    S("MAX_TURNS", "data", "int", 0, "keep at most this many turns per conversation; 0 = all", min=0),
    # ---- data loading ------------------------------------------------------------------------
    S("PRETRAIN_DATALOADER_ROOT_PATH", "data", "str", "data/pretrain", "pretraining shards read by train.py; "
      "when only one of this and HF_PRETRAIN_DATASET_TARGET_PATH is set, the other follows it"),
    S("INSTRUCT_DATALOADER_ROOT_PATH", "data", "str", "data/instruct", "SFT shards read by train.py; "
      "follows HF_INSTRUCT_DATASET_TARGET_PATH when only that is set (and the reverse)"),
    S("DPO_DATALOADER_ROOT_PATH", "data", "str", "data/dpo", "DPO shards read by train.py; "
      "follows HF_DPO_DATASET_TARGET_PATH when only that is set (and the reverse)"),
    S("SFT_BATCHING", "data", "str", "padded", "padded (right padding) or packed (document masking)",
      choices=("padded", "packed")),
    S("PRETRAIN_DOC_MASKING", "data", "bool", False, "pretraining: each token attends only to earlier tokens of "
      "its own document (documents start at BOS) instead of across the whole window; on GPU this dense mask "
      "keeps SDPA off the flash kernel (see README)"),
    S("PRETRAIN_DOC_RESET_POSITIONS", "data", "bool", False, "with PRETRAIN_DOC_MASKING: RoPE positions restart "
      "at 0 for each document in the window (false: positions count from the window start; under the mask "
      "RoPE sees only in-document distances, so both give the same logits up to rounding)"),
    S("TRIM_PADDING", "data", "bool", True, "one-example-per-row batches (padded SFT, DPO) are padded only to their "
      "longest row (rounded up to 16) and each optimizer step's samples are sorted by length before they are split "
      "into micro-batches (the step trains on the same samples); false = every batch is MAX_SEQ_LEN wide"),
    S("VERIFY_DATA", "data", "bool", False, "check every shard's sha256 against its manifest before training "
      "starts (reads the whole dataset once)"),
    # ---- training ------------------------------------------------------------------------------
    S("TRAINING_STAGE", "training", "str", "pretrain", "pretrain | instruct | dpo | grpo",
      choices=("pretrain", "instruct", "dpo", "grpo")),
    S("SEED", "training", "int", 42, "seed for init, data order and dropout"),
    S("TRAINING_PRECISION", "training", "str", "auto", "auto (bf16 where the device does it natively, else fp16 + "
      "GradScaler on CUDA, else fp32) | bf16 (autocast, fp32 master weights) | fp16 (GradScaler) | fp32",
      choices=("auto", "bf16", "fp16", "fp32")),
    S("TOTAL_BATCH_SIZE", "training", "int", 524288, "tokens per optimizer step (all ranks, all micro-steps)",
      min=1),
    S("MAX_BATCH_SIZE", "training", "int", 4, "micro-batch size in sequences per rank", min=1),
    S("MAX_STEPS", "training", "int", -1, "optimizer steps; -1 = one pass over the training data", min=-1),
    S("OPTIMIZER", "training", "str", "adamw", "adamw | sgd | muon (Muon on matrices, AdamW on the rest)",
      choices=("adamw", "sgd", "muon")),
    S("MAX_LR", "training", "float", 0.0018, "peak learning rate", min=0.0),
    S("MIN_LR", "training", "float", 0.00018, "final learning rate", min=0.0),
    S("WARMUP_STEPS", "training", "int", 715, "linear warmup steps", min=0),
    S("LR_SCHEDULE", "training", "str", "cosine", "cosine (with linear warmup) | wsd (warmup-stable-decay)",
      choices=("cosine", "wsd", "constant")),
    S("WSD_DECAY_FRACTION", "training", "float", 0.2, "wsd: fraction of steps spent decaying", min=0.0, max=1.0),
    S("WEIGHT_DECAY", "training", "float", 0.1, "decoupled weight decay (matrices only)", min=0.0),
    S("ADAMW_BETAS", "training", "floats", [0.9, 0.95], "AdamW betas as a JSON list"),
    S("ADAMW_EPS", "training", "float", 1e-8, "AdamW epsilon", min=0.0),
    S("ADAMW_USE_FUSED", "training", "bool", True, "fused AdamW kernel when the device has one"),
    S("SGD_MOMENTUM", "training", "float", 0.9, "SGD momentum", min=0.0, max=1.0),
    S("USE_MUON", "training", "bool", False, "predecessor compatibility: true = OPTIMIZER=muon"),
    S("MUON_MAX_LR", "training", "float", 0.02, "Muon peak learning rate", min=0.0),
    S("MUON_MIN_LR", "training", "float", 0.002, "Muon final learning rate", min=0.0),
    S("MUON_WEIGHT_DECAY", "training", "float", 0.0, "Muon weight decay", min=0.0),
    S("MUON_MOMENTUM", "training", "float", 0.95, "Muon Nesterov momentum", min=0.0, max=1.0),
    S("MUON_WARMUP_STEPS", "training", "int", -1, "Muon warmup; -1 = WARMUP_STEPS", min=-1),
    S("GRAD_CLIP", "training", "float", 1.0, "clip the global grad norm to this; 0 = off", min=0.0),
    S("MAX_NONFINITE_STEPS", "training", "int", 3, "stop after this many non-finite steps in a row", min=1),
    # ---- early stopping / checkpoints ----------------------------------------------------------
    S("EARLY_STOPPING_PATIENCE", "checkpoint", "int", 3, "validations without improvement before stopping; "
      "0 = off", min=0),
    S("EARLY_STOPPING_PATIENCE_SKIP_STEPS", "checkpoint", "int", 0, "steps before early stopping counts", min=0),
    S("EARLY_STOPPING_MIN_DELTA", "checkpoint", "float", 0.0, "improvement smaller than this does not count",
      min=0.0),
    S("SAVE_CHECKPOINTS", "checkpoint", "bool", True, "write checkpoints at all"),
    S("RESUME", "checkpoint", "str", "auto", "auto: continue the stage's latest checkpoint when one exists (its "
      "model settings must match) | never: refuse to reuse a run dir or checkpoint dir that holds a run | "
      "require: refuse to start without a checkpoint to continue", choices=("auto", "never", "require")),
    S("SAVE_EVERY_X_STEPS", "checkpoint", "int", 500, "periodic checkpoint; 0 = only on validation improvement",
      min=0),
    S("SAVE_BEST_ONLY", "checkpoint", "bool", False, "only write a checkpoint when validation improves"),
    S("MAX_NUMBER_CHECKPOINTS", "checkpoint", "int", 2, "periodic checkpoints kept (the best is kept besides)",
      min=1),
    S("CHECKPOINT_ASYNC", "checkpoint", "bool", False, "write checkpoints in the background (torch.distributed."
      "checkpoint.async_save): training continues once the state is copied to memory (one more copy of this rank's "
      "weights and optimizer state in RAM); `latest` moves when the write is complete; the next save and the end of "
      "the run wait for it"),
    S("PRETRAIN_SAVE_CHECKPOINTS_PATH", "checkpoint", "str", "checkpoints", "root; pretrain/ is appended"),
    S("INSTRUCT_SAVE_CHECKPOINTS_PATH", "checkpoint", "str", "checkpoints", "root; instruct/ is appended"),
    S("DPO_SAVE_CHECKPOINTS_PATH", "checkpoint", "str", "checkpoints", "root; dpo/ is appended"),
    S("GRPO_SAVE_CHECKPOINTS_PATH", "checkpoint", "str", "checkpoints", "root; grpo/ is appended"),
    S("PRETRAIN_LOAD_CHECKPOINTS_PATH", "checkpoint", "str", "", "predecessor compatibility: root to resume pretraining "
      "from; empty = the save path"),
    S("INSTRUCT_LOAD_CHECKPOINTS_PATH", "checkpoint", "str", "", "root to resume SFT from; empty = save path"),
    S("DPO_LOAD_CHECKPOINTS_PATH", "checkpoint", "str", "", "root to resume DPO from; empty = save path"),
    S("GRPO_LOAD_CHECKPOINTS_PATH", "checkpoint", "str", "", "root to resume GRPO from; empty = save path"),
    # ---- evaluation ----------------------------------------------------------------------------
    S("VALIDATE_EVERY_X_STEPS", "eval", "int", 200, "validation cadence (and after the last step); 0 = off",
      min=0),
    S("VAL_STEPS", "eval", "int", 100, "validation micro-batches per rank", min=1),
    S("HELLASWAG_EVERY_X_STEPS", "eval", "int", -1, "HellaSwag cadence; -1 = off", min=-1),
    S("HELLASWAG_NUMBER_OF_EXAMPLES", "eval", "int", 100, "HellaSwag examples per evaluation", min=1),
    S("HELLASWAG_PATH", "eval", "str", "data/hellaswag/hellaswag_val.jsonl", "HellaSwag jsonl"),
    S("WINOGRANDE_EVERY_X_STEPS", "eval", "int", -1, "WinoGrande (partial scoring) cadence; -1 = off", min=-1),
    S("WINOGRANDE_NUMBER_OF_EXAMPLES", "eval", "int", 200, "WinoGrande records per evaluation", min=1),
    S("WINOGRANDE_PATH", "eval", "str", "data/winogrande/winogrande_dev.jsonl",
      "WinoGrande jsonl (sentence with one '_', option1, option2, answer)"),
    S("GENERATE_EVERY_X_STEPS", "eval", "int", 200, "sample from TEST_PROMPTS_FILE; 0 = off", min=0),
    S("MAX_TEST_GEN_LEN", "eval", "int", 64, "tokens sampled per test prompt", min=1),
    S("TEST_PROMPTS_FILE", "eval", "str", "test_prompts.json", "JSON with keys pretrain / instruct / dpo"),
    # ---- post-training -------------------------------------------------------------------------
    S("IS_MODEL_DISTILLATION", "distill", "bool", False, "add a distillation term (pretrain or instruct)"),
    S("TEACHER_MODEL_CHECKPOINT", "distill", "str", "", "teacher: any load_model source"),
    S("DISTILLATION_TEMPERATURE", "distill", "float", 2.0, "softmax temperature T", min=0.01),
    S("DISTILLATION_ALPHA", "distill", "float", 0.5, "loss = (1-a)*CE + a*T^2*KL(teacher||student)",
      min=0.0, max=1.0),
    S("TEACHER_PRECISION", "distill", "str", "fp32", "teacher weights dtype (auto = the training precision rule)",
      choices=("fp32", "bf16", "fp16", "auto")),
    S("TEACHER_CACHE_PATH", "distill", "str", "", "precomputed teacher top-k log-probs (objectives.py "
      "cache-teacher); empty = run the teacher live"),
    S("TEACHER_CACHE_TOP_K", "distill", "int", 64, "log-probs kept per position in the teacher cache", min=1),
    S("DPO_BETA", "dpo", "float", 0.1, "DPO inverse temperature beta", min=0.0),
    S("DPO_LOSS_TYPE", "dpo", "str", "sigmoid", "sigmoid | hinge | ipo", choices=("sigmoid", "hinge", "ipo")),
    S("DPO_LABEL_SMOOTHING", "dpo", "float", 0.0, "conservative DPO label smoothing", min=0.0, max=0.5),
    S("DPO_REFERENCE_LOGPS_PATH", "dpo", "str", "", "precomputed reference log-probs; empty = compute live"),
    S("PREFERENCE_OBJECTIVE", "dpo", "str", "dpo", "the loss of TRAINING_STAGE=dpo on the same preference data: dpo "
      "(against a reference model) | orpo (Hong et al. 2024) | simpo (Meng et al. 2024); orpo and simpo are "
      "reference-free: no reference model is built", choices=("dpo", "orpo", "simpo")),
    S("ORPO_LAMBDA", "dpo", "float", 0.1, "ORPO: weight lambda of the odds-ratio term added to the chosen "
      "response's mean NLL (0.1 as in the paper's runs)", min=0.0),
    S("SIMPO_BETA", "dpo", "float", 2.0, "SimPO: reward scale beta on the mean log-prob per response token (the "
      "authors use 2.0 to 2.5, far above DPO_BETA)", min=0.0),
    S("SIMPO_GAMMA", "dpo", "float", 1.0, "SimPO: target reward margin gamma (the authors' Llama 3 Base setting: "
      "gamma / beta = 0.5; they suggest tuning the ratio in [0, 1])", min=0.0),
    S("GRPO_DATA_PATH", "grpo", "str", "data/rl", "RL prompts read by TRAINING_STAGE=grpo: the directory "
      "load_rl_dataset.py writes (train.jsonl, val.jsonl, manifest.json)"),
    S("GRPO_PROMPTS_PER_STEP", "grpo", "int", 8, "prompts per generation batch over all ranks (a multiple of the "
      "world size; each rank samples its share); a step trains on GRPO_PROMPTS_PER_STEP x GRPO_NUM_GENERATIONS "
      "completions, in micro-batches of MAX_BATCH_SIZE (TOTAL_BATCH_SIZE is not read)", min=1),
    S("GRPO_NUM_GENERATIONS", "grpo", "int", 8, "completions sampled per prompt (the group; TRL's default 8)",
      min=2),
    S("GRPO_TEMPERATURE", "grpo", "float", 1.0, "sampling temperature of the rollouts; the log-probs are taken at it "
      "too (TRL's default 1.0)", min=0.0),
    S("GRPO_TOP_P", "grpo", "float", 1.0, "nucleus sampling of the rollouts, in (0, 1] (TRL's default 1.0 = off)",
      min=0.0, max=1.0),
    S("GRPO_MAX_COMPLETION_LEN", "grpo", "int", 256, "tokens sampled per completion at most; a completion ends at the "
      "tokenizer's end of turn / end of text (TRL's default 256)", min=1),
    S("GRPO_REWARDS", "grpo", "str", "exact_answer", "comma list of reward functions: exact_answer (the completion's "
      "final number equals the record's answer), format (GRPO_FORMAT_REGEX matches), or module:function with TRL's "
      "convention fn(prompts, completions, completion_ids, **fields) -> list[float | None]"),
    S("GRPO_REWARD_WEIGHTS", "grpo", "floats", [], "one weight per GRPO_REWARDS entry as a JSON list; empty = all "
      "1.0 (TRL's default)"),
    S("GRPO_FORMAT_REGEX", "grpo", "str", "", "the regex the `format` reward searches for in a completion"),
    S("GRPO_SCALE_REWARDS", "grpo", "str", "group", "advantage = (reward - group mean) / std: group = the group's "
      "std (TRL's default) | batch = the std of the whole generation batch over all ranks | none = no division "
      "(Dr. GRPO)", choices=("group", "batch", "none")),
    S("GRPO_EPSILON", "grpo", "float", 0.2, "clip range below (and above, unless GRPO_EPSILON_HIGH) the ratio 1 "
      "(TRL's default 0.2)", min=0.0),
    S("GRPO_EPSILON_HIGH", "grpo", "float", 0.0, "upper clip range (DAPO's clip-higher, e.g. 0.28); 0 = "
      "GRPO_EPSILON (TRL's default)", min=0.0),
    S("GRPO_LOSS_TYPE", "grpo", "str", "dapo", "token aggregation: grpo (each completion's token mean, then their "
      "mean) | dapo (sum over the generation batch's completion tokens, all ranks; TRL's default) | dr_grpo "
      "(sum / (completions x GRPO_MAX_COMPLETION_LEN))", choices=("grpo", "dapo", "dr_grpo")),
    S("GRPO_BETA", "grpo", "float", 0.0, "weight of the k3 KL to the reference model (the starting policy: adapters "
      "off under LoRA, else a frozen copy); 0 = no reference model is built (TRL's default)", min=0.0),
    S("GRPO_NUM_ITERATIONS", "grpo", "int", 1, "optimizer steps per generation batch (each step trains on the "
      "whole batch; TRL's default 1); above 1, SAVE_EVERY_X_STEPS must be a multiple of it", min=1),
    S("LORA_ENABLED", "lora", "bool", False, "train low-rank adapters instead of all weights"),
    S("LORA_RANK", "lora", "int", 16, "adapter rank r", min=1),
    S("LORA_ALPHA", "lora", "float", 8.0, "adapter scaling is alpha / r", min=0.0),
    S("LORA_DROPOUT", "lora", "float", 0.05, "dropout on the adapter path only (< 1)", min=0.0, max=0.99),
    S("LORA_TARGET_MODULES", "lora", "list", ["wq", "wk", "wv", "wo", "w1", "w3"],
      "linear layers that get adapters (wq wk wv wo w1 w2 w3 output)"),
    S("LORA_SAVE_PEFT_ADAPTER", "lora", "bool", False, "each checkpoint also holds the adapters in Hugging Face "
      "PEFT format (<step dir>/peft_adapter/), for peft.PeftModel.from_pretrained on the HF export of the base"),
    # ---- performance / distribution --------------------------------------------------------------
    S("STEP_WATCHDOG_FACTOR", "system", "float", 20.0, "no progress for this many median step times (and at "
      "least STEP_WATCHDOG_MIN_SECONDS): dump every rank's Python stacks and exit 75 (resumable); 0 = off",
      min=0.0),
    S("STEP_WATCHDOG_MIN_SECONDS", "system", "float", 1800.0, "the watchdog never fires sooner than this",
      min=0.1),
    S("DEVICE", "system", "str", "auto", "auto (cuda -> mps -> cpu) | cpu | cuda | mps",
      choices=("auto", "cpu", "cuda", "mps")),
    S("USE_TORCH_COMPILE", "system", "bool", False, "torch.compile each block"),
    S("USE_FSDP", "system", "bool", False, "FSDP2 fully_shard per block instead of DDP"),
    S("FSDP_UNSHARDED_ACCUMULATION", "system", "bool", False, "FSDP2 gradient accumulation: false = "
      "reduce-scatter after every micro-batch (each GPU holds gradient shards only); true = reduce once per step "
      "(fewer collectives, but every GPU holds a full fp32 gradient copy: `model_utils.py plan` counts it)"),
    S("FSDP_SHARD_GROUP_SIZE", "system", "int", 0, "FSDP2 shards over groups of this many ranks and replicates "
      "across the groups (HSDP: shard within a node, e.g. 8 = GPUs per node); 0 = shard over all ranks",
      min=0),
    S("ACTIVATION_CHECKPOINTING", "system", "bool", False, "recompute block activations in backward"),
    S("ATTN_IMPL", "system", "str", "auto", "auto (= sdpa) | sdpa | math | flex: document masks (packed SFT, "
      "PRETRAIN_DOC_MASKING) through flex_attention's block-sparse mask, compiled on CUDA, instead of a dense "
      "(B, T, T) bias that keeps SDPA off the flash kernel; everything else stays on SDPA",
      choices=("auto", "sdpa", "math", "flex")),
    S("MOE_IMPL", "system", "str", "auto", "MoE experts: auto (= grouped: tokens sorted by expert, grouped GEMMs) "
      "| dense (every expert on every token; the reference path, slow)", choices=("auto", "grouped", "dense")),
    S("PEAK_FLOPS", "system", "float", 0.0, "peak FLOP/s per device for MFU; 0 = measured on CPU, GPU datasheet table",
      min=0.0),
    S("TORCH_PROFILER_ENABLED", "system", "bool", False, "profile a few steps with torch.profiler"),
    S("TORCH_PROFILER_SCHEDULE_SKIP_FIRST", "system", "int", 10, "profiler: steps skipped first", min=0),
    S("TORCH_PROFILER_SCHEDULE_WAIT", "system", "int", 1, "profiler schedule wait", min=0),
    S("TORCH_PROFILER_SCHEDULE_WARMUP", "system", "int", 1, "profiler schedule warmup", min=0),
    S("TORCH_PROFILER_SCHEDULE_ACTIVE", "system", "int", 3, "profiler schedule active", min=1),
    S("TORCH_PROFILER_SCHEDULE_REPEAT", "system", "int", 1, "profiler schedule repeat", min=0),
    S("TORCH_PROFILER_TENSORBOARD_ENABLED", "system", "bool", False, "write a TensorBoard trace"),
    S("TORCH_PROFILER_TENSORBOARD_LOG_PATH", "system", "str", "runs/profiler", "trace directory"),
    # ---- logging -----------------------------------------------------------------------------------
    S("RUN_DIR", "logging", "str", "", "metrics.jsonl, plots and W&B offline dir; empty = runs/<stage>"),
    S("LOG_EVERY_X_STEPS", "logging", "int", 1, "console/metrics cadence", min=1),
    S("WANDB_ENABLED", "logging", "bool", False, "log to Weights & Biases (WANDB_MODE=offline works)"),
    S("WANDB_PROJECT_NAME", "logging", "str", "llama3-train", "W&B project"),
    S("WANDB_RUN_NAME", "logging", "str", "", "W&B run name; empty = automatic"),
    S("WANDB_ENTITY", "logging", "str", "", "W&B entity (team)"),
    S("WANDB_API_KEY", "secrets", "str", "", "W&B key, exported for wandb (never printed)", secret=True, env=True),
    S("HF_TOKEN", "secrets", "str", "", "Hugging Face token, exported for huggingface_hub (never printed)",
      secret=True, env=True),
    S("MOE_LOAD_BALANCE_WEIGHT", "training", "float", 0.01, "weight of the MoE load-balancing loss (Switch / "
      "Mixtral, computed per micro-batch) added to the loss; 0 = off", min=0.0),
    S("MOE_Z_LOSS_WEIGHT", "training", "float", 0.001, "weight of the MoE router z-loss (ST-MoE: mean squared "
      "logsumexp of the router logits) added to the loss; 0 = off", min=0.0),
    S("LOSS_SPIKE_ZSCORE", "training", "float", 0.0, "skip an update whose loss is more than this many standard "
      "deviations above the mean of the last LOSS_SPIKE_WINDOW steps (counts toward MAX_NONFINITE_STEPS); 0 = off",
      min=0.0),
    S("LOSS_SPIKE_WINDOW", "training", "int", 50, "accepted steps the loss-spike guard averages over", min=2),
]

# Later versions of the predecessor repo named the AdamW settings with a prefix; they map onto ours.
ALIASES: dict[str, str] = {
    "ADAMW_MAX_LR": "MAX_LR",
    "ADAMW_MIN_LR": "MIN_LR",
    "ADAMW_WEIGHT_DECAY": "WEIGHT_DECAY",
    "ADAMW_WARMUP_STEPS": "WARMUP_STEPS",
}

# Presets set model keys (and a sensible context length); explicit keys override them.
PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(DIM=64, N_LAYERS=2, N_HEADS=4, N_KV_HEADS=2, MULTIPLE_OF=32, FFN_DIM_MULTIPLIER=1.0,
                  ROPE_THETA=10000.0, MAX_SEQ_LEN=64, TIE_EMBEDDINGS=False),
    "tiny": dict(DIM=256, N_LAYERS=8, N_HEADS=8, N_KV_HEADS=4, MULTIPLE_OF=64, FFN_DIM_MULTIPLIER=1.0,
                 ROPE_THETA=10000.0, MAX_SEQ_LEN=256, TIE_EMBEDDINGS=True),
    "small": dict(DIM=512, N_LAYERS=8, N_HEADS=8, N_KV_HEADS=8, FFN_HIDDEN_DIM=1536, ROPE_THETA=10000.0,
                  MAX_SEQ_LEN=512, TIE_EMBEDDINGS=False),
    # Mixture of Experts, Mixtral-style (8 experts, top-2 in moe-small): the FFN size is per expert
    "moe-debug": dict(DIM=64, N_LAYERS=2, N_HEADS=4, N_KV_HEADS=2, FFN_HIDDEN_DIM=96, MOE_NUM_EXPERTS=4,
                      MOE_TOP_K=2, ROPE_THETA=10000.0, MAX_SEQ_LEN=64, TIE_EMBEDDINGS=False),
    "moe-small": dict(DIM=512, N_LAYERS=8, N_HEADS=8, N_KV_HEADS=4, FFN_HIDDEN_DIM=768, MOE_NUM_EXPERTS=8,
                      MOE_TOP_K=2, ROPE_THETA=10000.0, MAX_SEQ_LEN=512, TIE_EMBEDDINGS=False),
    "125m": dict(DIM=768, N_LAYERS=12, N_HEADS=12, N_KV_HEADS=12, MULTIPLE_OF=256, FFN_DIM_MULTIPLIER=1.0,
                 ROPE_THETA=500000.0, MAX_SEQ_LEN=1024, TIE_EMBEDDINGS=True),
    "350m": dict(DIM=1024, N_LAYERS=24, N_HEADS=16, N_KV_HEADS=4, MULTIPLE_OF=256, FFN_DIM_MULTIPLIER=1.0,
                 ROPE_THETA=500000.0, MAX_SEQ_LEN=1024, TIE_EMBEDDINGS=True),
    "1b": dict(DIM=2048, N_LAYERS=22, N_HEADS=32, N_KV_HEADS=4, MULTIPLE_OF=256, FFN_DIM_MULTIPLIER=1.0,
               ROPE_THETA=500000.0, MAX_SEQ_LEN=2048, TIE_EMBEDDINGS=False),
    "smollm2-135m": dict(DIM=576, N_LAYERS=30, N_HEADS=9, N_KV_HEADS=3, FFN_HIDDEN_DIM=1536, VOCAB_SIZE=49152,
                         ROPE_THETA=100000.0, NORM_EPS=1e-5, MAX_SEQ_LEN=2048, TIE_EMBEDDINGS=True),
    "llama3.2-1b": dict(DIM=2048, N_LAYERS=16, N_HEADS=32, N_KV_HEADS=8, MULTIPLE_OF=256, FFN_DIM_MULTIPLIER=1.5,
                        VOCAB_SIZE=128256, ROPE_THETA=500000.0, TIE_EMBEDDINGS=True, MAX_SEQ_LEN=8192,
                        ROPE_SCALING={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}),
    "llama3.2-3b": dict(DIM=3072, N_LAYERS=28, N_HEADS=24, N_KV_HEADS=8, MULTIPLE_OF=256, FFN_DIM_MULTIPLIER=1.0,
                        VOCAB_SIZE=128256, ROPE_THETA=500000.0, TIE_EMBEDDINGS=True, MAX_SEQ_LEN=8192,
                        ROPE_SCALING={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}),
    "llama3.1-8b": dict(DIM=4096, N_LAYERS=32, N_HEADS=32, N_KV_HEADS=8, MULTIPLE_OF=1024, FFN_DIM_MULTIPLIER=1.3,
                        VOCAB_SIZE=128256, ROPE_THETA=500000.0, TIE_EMBEDDINGS=False, MAX_SEQ_LEN=8192,
                        ROPE_SCALING={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}),
    "llama3.1-70b": dict(DIM=8192, N_LAYERS=80, N_HEADS=64, N_KV_HEADS=8, MULTIPLE_OF=4096,
                         FFN_DIM_MULTIPLIER=1.3, VOCAB_SIZE=128256, ROPE_THETA=500000.0, TIE_EMBEDDINGS=False,
                         MAX_SEQ_LEN=8192,
                         ROPE_SCALING={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}),
    # GPT-2 (MODEL_FAMILY=gpt2) as OpenAI released it: GPT-2's own 50257-token vocabulary, 1024 positions
    "gpt2-debug": dict(MODEL_FAMILY="gpt2", DIM=64, N_LAYERS=2, N_HEADS=4, N_KV_HEADS=4, MAX_SEQ_LEN=64,
                       TIE_EMBEDDINGS=True, DROPOUT=0.1),
    "gpt2-124m": dict(MODEL_FAMILY="gpt2", DIM=768, N_LAYERS=12, N_HEADS=12, N_KV_HEADS=12, VOCAB_SIZE=50257,
                      MAX_SEQ_LEN=1024, TIE_EMBEDDINGS=True, DROPOUT=0.1),
    "gpt2-350m": dict(MODEL_FAMILY="gpt2", DIM=1024, N_LAYERS=24, N_HEADS=16, N_KV_HEADS=16, VOCAB_SIZE=50257,
                      MAX_SEQ_LEN=1024, TIE_EMBEDDINGS=True, DROPOUT=0.1),
    "gpt2-774m": dict(MODEL_FAMILY="gpt2", DIM=1280, N_LAYERS=36, N_HEADS=20, N_KV_HEADS=20, VOCAB_SIZE=50257,
                      MAX_SEQ_LEN=1024, TIE_EMBEDDINGS=True, DROPOUT=0.1),
    "gpt2-1.5b": dict(MODEL_FAMILY="gpt2", DIM=1600, N_LAYERS=48, N_HEADS=25, N_KV_HEADS=25, VOCAB_SIZE=50257,
                      MAX_SEQ_LEN=1024, TIE_EMBEDDINGS=True, DROPOUT=0.1),
}

# Keys of the predecessor repo that are no longer settings. An old `.env` still loads: each prints one note
# saying why the key is not read, instead of the unknown-key warning.
RETIRED: dict[str, str] = {
    "HUGGINGFACE_TOKENIZER": "the tokenizer kind is detected from TOKENIZER_CHECKPOINT_PATH (a tiktoken file, "
                             "an HF tokenizer dir or hub id, or a .gguf)",
    "IGNORE_INDEX": "label positions without a target are always -100 (the loaders write it, the losses skip it)",
}

# Pairs of keys that name one directory: (where a load_*_dataset.py writes, where train.py reads). When a
# settings source sets only one of a pair, the other takes its value.
SAME_DIR: tuple[tuple[str, str], ...] = (
    ("HF_PRETRAIN_DATASET_TARGET_PATH", "PRETRAIN_DATALOADER_ROOT_PATH"),
    ("HF_INSTRUCT_DATASET_TARGET_PATH", "INSTRUCT_DATALOADER_ROOT_PATH"),
    ("HF_DPO_DATASET_TARGET_PATH", "DPO_DATALOADER_ROOT_PATH"),
)

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(s.group for s in SETTINGS))

# A name with a `_`-separated word ending in one of these holds a secret (HF_TOKEN, WANDB_API_KEY, DB_PASSWORD,
# APIKEY). Words, not substrings: TOKENIZER_CHECKPOINT_PATH is a path and a MAX_TOKENS would be a count.
SECRET_WORDS: tuple[str, ...] = ("TOKEN", "KEY", "SECRET", "SECRETS", "PASSWORD", "PASSWD")


def is_secret(key: str) -> bool:
    """A value never printed (summaries, banners, error messages) nor saved or logged: flagged in the
    table, or named like a secret."""
    if key in BY_KEY and BY_KEY[key].secret:
        return True
    return any(word.endswith(SECRET_WORDS) for word in key.upper().split("_"))
