"""The one training loop for every stage: settings -> distributed -> tokenizer -> model -> objective ->
LoRA -> parallelize -> optimizer -> loop (lr -> eval/ckpt -> micro-steps -> clip -> step -> log).

    python train.py [--env-file F] [KEY=VALUE ...] [--<stage>_checkpoint C] [--reset-optimizer] [--start-step N]
    torchrun --standalone --nproc_per_node N train.py ...

The stage (TRAINING_STAGE) only selects table entries: the objective (objectives.OBJECTIVES), its loader
kind, the data/checkpoint directories (<STAGE>_* settings) and the test prompts. This file names none.
`--<stage>_checkpoint C` (C = a dir, a step name in that stage's checkpoint dir, or `latest`) resumes when
<stage> is the configured stage, and otherwise starts from that checkpoint's weights (recorded as parent).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

import checkpoint as ckpt
import config
import dataloaders
import distributed as D
import families
import generate
import hellaswag_utils
import lora
import model_utils
import moe
import objectives
import optim
import precision
import tokenizer as tk
import winogrande_utils
from errors import UserError, run_cli
from fileio import read_json
from logger import Logger, git_commit
from model import ModelArgs, Transformer, tensor_generator
from model_formats import LazyStateDict
from run_control import RESUMABLE_EXIT, RunControl, StopRequested
from settings_table import BY_KEY

STAGES: tuple[str, ...] = cast(tuple[str, ...], BY_KEY["TRAINING_STAGE"].choices)


def parse_args(argv: list[str]) -> tuple[config.Config, argparse.Namespace]:
    overrides, rest = config.split_overrides(argv)
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s [--env-file F] [KEY=VALUE ...] [--<stage>_checkpoint C] [--reset-optimizer] "
              "[--start-step N]",
        epilog="KEY=VALUE: any setting (see .env.example), e.g. MAX_STEPS=100 MAX_LR=3e-4; it "
               "overrides the environment and the env file. `python config.py show --env-file F` prints the "
               f"resolved settings. Exit codes: 0 finished, {RESUMABLE_EXIT} stopped early by a signal or the "
               "watchdog with a checkpoint (run the same command to continue), 2 a setting or input to fix.")
    p.add_argument("--env-file", default=None, help="settings file (default: ./.env when present)")
    for stage in STAGES:
        p.add_argument(f"--{stage}_checkpoint", metavar="C", default=None,
                       help=f"resume from / start at a {stage} checkpoint: a dir, a step name, or latest")
    p.add_argument("--reset-optimizer", action="store_true", help="take only the weights from the checkpoint")
    p.add_argument("--start-step", type=int, default=None, help="override the step counter after loading")
    args = p.parse_args(rest)
    chosen = [(s, getattr(args, f"{s}_checkpoint")) for s in STAGES if getattr(args, f"{s}_checkpoint")]
    if len(chosen) > 1:
        raise UserError(f"{len(chosen)} checkpoint flags given: pass at most one --<stage>_checkpoint")
    args.checkpoint = chosen[0] if chosen else None
    return config.load_config(args.env_file, overrides), args


# ---- start-up pieces ----------------------------------------------------------------------------------


def starting_point(cfg: config.Config, args: argparse.Namespace) -> tuple[Path | None, str]:
    """-> (checkpoint dir to resume this stage from or None, weight source for a fresh model or '').
    INIT_FROM empty in a later stage means the previous stage's latest checkpoint."""
    stage = cfg.training.training_stage
    if D.elastic_restart_count() > 0:  # torchelastic restarted the workers: continue the stage's latest checkpoint
        try:
            path = ckpt.resolve("latest", ckpt.stage_root(cfg, stage))
            return path, resume_parent(cfg, path)
        except UserError:
            pass  # nothing saved yet: start as the first attempt did
    if args.checkpoint:
        ck_stage, spec = args.checkpoint
        path = ckpt.resolve(spec, ckpt.stage_root(cfg, ck_stage, for_loading=True))
        if ck_stage == stage:
            return path, resume_parent(cfg, path)
        return None, str(path)
    latest = auto_resume_checkpoint(cfg)
    if latest is not None:
        return latest, resume_parent(cfg, latest)
    if cfg.model.init_from or STAGES.index(stage) == 0:
        return None, cfg.model.init_from
    prev = STAGES[STAGES.index(stage) - 1]
    try:
        return None, str(ckpt.resolve("latest", ckpt.stage_root(cfg, prev, for_loading=True)))
    except UserError:
        raise UserError(f"TRAINING_STAGE={stage} starts from a trained model but INIT_FROM is empty and no "
                        f"{prev} checkpoint exists: set INIT_FROM (any model source)") from None


def resume_parent(cfg: config.Config, path: Path) -> str:
    """The weights a resumed run rebuilds its model from before loading the checkpoint (the frozen reference
    or LoRA base must be the run's starting model): the recorded parent — also when INIT_FROM repeats the
    name it was recorded under, though that name (a `latest` pointer) may point elsewhere by now — or the
    weights INIT_FROM names when it names others."""
    init_from = cfg.model.init_from
    if init_from and init_from != ckpt.parent_requested(path):
        return init_from
    return ckpt.parent_source(path)


# settings that fix the model's shape: RESUME=auto continues a checkpoint only when they are unchanged
SHAPE_KEYS = ("DIM", "N_LAYERS", "N_HEADS", "N_KV_HEADS", "VOCAB_SIZE", "MULTIPLE_OF", "FFN_DIM_MULTIPLIER",
              "FFN_HIDDEN_DIM", "TIE_EMBEDDINGS", "LORA_ENABLED", "LORA_RANK", "MOE_NUM_EXPERTS", "MOE_TOP_K",
              "MOE_SHARED_EXPERT")


def auto_resume_checkpoint(cfg: config.Config) -> Path | None:
    """RESUME (when no checkpoint flag names one): the stage's latest checkpoint to continue, or None to start
    fresh. auto: latest when it exists and SHAPE_KEYS match it; never: None, and an error when the run dir or
    the stage's checkpoint dir already holds a run; require: latest, an error when there is none."""
    stage, mode = cfg.training.training_stage, cfg.checkpoint.resume
    root = ckpt.stage_root(cfg, stage)
    run_dir = run_dir_of(cfg)
    if mode == "never":
        for d in (run_dir, root):
            if d.is_dir() and any(d.iterdir()):
                raise UserError(f"RESUME=never but {d} already holds a run: set RUN_DIR and "
                                f"{stage.upper()}_SAVE_CHECKPOINTS_PATH to new directories, or RESUME=auto to "
                                "continue it")
        return None
    if ckpt.latest_name(root) is None:
        if mode == "require":
            raise UserError(f"RESUME=require but {root} has no checkpoint to continue: train without it first "
                            "or set RESUME=auto")
        return None
    latest = ckpt.resolve("latest", root)
    saved = (read_json(latest / ckpt.CONFIG_FILE).get("settings") or {}) \
        if (latest / ckpt.CONFIG_FILE).is_file() else {}
    now = cfg.to_dict()
    changed = [f"{k}={saved[k]!r} there, {now.get(k)!r} now" for k in SHAPE_KEYS if k in saved and saved[k] != now.get(k)]
    if changed:
        raise UserError(f"RESUME={mode}: {latest} was trained with other model settings ({'; '.join(changed)}): "
                        f"restore them to continue it, or set {stage.upper()}_SAVE_CHECKPOINTS_PATH and RUN_DIR "
                        "to new directories to start another run")
    return latest


def load_tokenizer(cfg: config.Config, init_source: str) -> tk.Tokenizer:
    src = cfg.tokenizer.tokenizer_checkpoint_path
    if src == "model":
        if not init_source:
            raise UserError("TOKENIZER_CHECKPOINT_PATH=model needs INIT_FROM (or a checkpoint flag) to take it from")
        src = model_utils.tokenizer_source(init_source)  # our checkpoints name the tokenizer they trained with
    return tk.load_tokenizer(src)


def check_moe_settings(cfg: config.Config, margs: ModelArgs, init_source: str) -> None:
    """The router losses and metrics follow MOE_NUM_EXPERTS / MOE_TOP_K: they must describe the loaded model."""
    m = cfg.model
    have = (margs.moe_num_experts, margs.moe_top_k if margs.moe_num_experts else m.moe_top_k)
    if have != (m.moe_num_experts, m.moe_top_k):
        model = (f"{margs.moe_num_experts} experts per block, top-{margs.moe_top_k}" if margs.moe_num_experts
                 else "a dense FFN")
        fix = (f"MOE_NUM_EXPERTS={margs.moe_num_experts} MOE_TOP_K={margs.moe_top_k}" if margs.moe_num_experts
               else "MOE_NUM_EXPERTS=0")
        raise UserError(f"INIT_FROM={init_source} has {model} but the settings say MOE_NUM_EXPERTS={m.moe_num_experts},"
                        f" MOE_TOP_K={m.moe_top_k}: set {fix} (the model's), or start from another model")


def adopt_source_args(cfg: config.Config, tok: tk.Tokenizer, margs: ModelArgs, init_source: str) -> None:
    """The loaded model's args as this run uses them: checked against the tokenizer and the MoE settings, the
    context grown to MAX_SEQ_LEN, routing (capacity, implementation) taken from the run's settings."""
    check_vocab(margs, tok, init_source)
    if families.of_args(margs).learned_positions and cfg.model.max_seq_len > margs.max_seq_len:
        raise UserError(f"MAX_SEQ_LEN={cfg.model.max_seq_len} but INIT_FROM={init_source} has {margs.max_seq_len} "
                        f"learned positions: set MAX_SEQ_LEN <= {margs.max_seq_len}")
    margs.max_seq_len = max(margs.max_seq_len, cfg.model.max_seq_len)
    check_moe_settings(cfg, margs, init_source)
    margs.moe_capacity_factor, margs.moe_impl = cfg.model.moe_capacity_factor, cfg.system.moe_impl


def build_model(cfg: config.Config, tok: tk.Tokenizer, init_source: str,
                device: torch.device) -> tuple[Transformer, ModelArgs]:
    if init_source:
        model, margs = model_utils.load_model(init_source, device="cpu", dtype=torch.float32,
                                              rope_scaling_factor=cfg.model.rope_scaling_factor)
        adopt_source_args(cfg, tok, margs, init_source)
        moe.set_routing(model, margs.moe_capacity_factor, margs.moe_impl)
    else:
        margs = cfg.model_args(tok.vocab_size)
        torch.manual_seed(cfg.training.seed)
        with torch.device(device):  # drawn where it trains: a GPU draws the values the sharded build draws
            model = cast(Transformer, families.build(margs))
        model.init_weights(generator=torch.Generator(device).manual_seed(cfg.training.seed))
    return model.to(device).train(), margs


def builds_sharded(cfg: config.Config) -> bool:
    """FSDP2 runs build the model on the meta device and let each rank fill only its shards after fully_shard
    (a resumed run then reads only its shards of the checkpoint). LoRA adapters are swapped in on the meta
    model and drawn in the same pass; a frozen copy of the starting model (a preference reference) is sharded
    like the policy and filled from its shards (Objective.fill_frozen). No rank ever holds the whole model."""
    return cfg.system.use_fsdp and D.is_dist()


def build_meta_model(cfg: config.Config, tok: tk.Tokenizer,
                     init_source: str) -> tuple[Transformer, ModelArgs, Any]:
    """-> (the model on the meta device, its args, the weights to fill it from or None for random init). The
    weights are opened, not read (model_utils.open_weights): materialize_model reads them after sharding."""
    weights = None
    if init_source:
        margs, weights = model_utils.open_weights(init_source, cfg.model.rope_scaling_factor)
        adopt_source_args(cfg, tok, margs, init_source)  # the meta model is built from these args
    else:
        margs = cfg.model_args(tok.vocab_size)
        torch.manual_seed(cfg.training.seed)
    with torch.device("meta"):
        model = cast(Transformer, families.build(margs))
    return model.train(), margs, weights


def apply_lora(cfg: config.Config, model: Transformer, seed: int) -> None:
    """Swap in the LoRA adapters (on a built or a meta model) and draw them, each from its own generator
    (tensor_generator) on the model's device, so a sharded build fills the same values (materialize_model)."""
    c = cfg.lora
    lora.apply_lora(model, c.lora_target_modules, c.lora_rank, c.lora_alpha, c.lora_dropout)
    for name, p in model.named_parameters():
        if lora.is_adapter(name) and p.device.type != "meta":
            lora.init_adapter(name, p, tensor_generator(seed, name, p.device))


def hold_frozen_base_in(model: Transformer, prec: precision.Choice) -> None:
    """Under bf16, the frozen Linear weights of a LoRA model are stored in bf16, the compute dtype (QLoRA and
    torchtune hold the frozen base in it too). Autocast casts every matmul's weight to bf16 anyway (nn.Linear
    and the fused head alike), so the forward is the same to the bit while the base takes half the memory
    and FSDP2 gathers half the bytes; the adapters (trained) stay fp32. Embeddings and norms stay fp32, so
    the residual stream keeps its precision, and so does a head tied to the embedding. fp16 and fp32 keep
    the base in fp32 (fp16 weights would need GradScaler-free overflow care)."""
    if prec.name != "bf16":
        return
    embedding = dict(model.named_parameters())[families.of_model(model).embedding_weight]
    for m in model.modules():
        if isinstance(m, nn.Linear) and not m.weight.requires_grad and m.weight is not embedding:
            m.weight.data = m.weight.data.to(torch.bfloat16)


def materialize_model(model: Transformer, weights: Any, seed: int, device: torch.device, where: str) -> None:
    """Allocate a meta-built (sharded) model on `device`: from `weights`, or the random init of build_model —
    every tensor drawn on `device` from its own generator (model.tensor_generator), so each rank draws at the
    device's speed the values one process draws, and keeps its shards. LoRA adapters are drawn by name too,
    as apply_lora does on a built model."""

    def adapter(name: str, p: nn.Parameter) -> torch.Tensor:
        t = torch.empty(p.shape, dtype=torch.float32, device=device)
        lora.init_adapter(name, t, tensor_generator(seed, name, device))
        return t

    adapters = [n for n, _ in model.named_parameters() if lora.is_adapter(n)]
    if weights is not None:
        if adapters:
            params = dict(model.named_parameters())
            base = weights
            base_rows = getattr(base, "rows", None)
            weights = LazyStateDict(
                [*base, *adapters], lambda n: adapter(n, params[n]) if lora.is_adapter(n) else base[n],
                None if base_rows is None else lambda n, a, b: (params[n].shape, None if lora.is_adapter(n)
                                                                else base_rows(n, a, b, tuple(params[n].shape))))
        model_utils.load_sharded(model, weights, device, where)
        return
    generator = torch.Generator(device).manual_seed(seed)  # each tensor drawn on the device, from its own seed

    def init_value(name: str, p: nn.Parameter) -> torch.Tensor:
        if lora.is_adapter(name):
            return adapter(name, p)
        t = torch.empty(p.shape, dtype=torch.float32, device=device)
        model.init_parameter(name, t, generator=generator)
        return t

    D.materialize(model, device, init_value)


def check_vocab(margs: ModelArgs, tok: tk.Tokenizer, init_source: str) -> None:
    if margs.vocab_size < tok.vocab_size:
        raise UserError(f"INIT_FROM={init_source} has vocab {margs.vocab_size} < the tokenizer's "
                        f"{tok.vocab_size}: use the tokenizer that model was trained with")


def training_precision(cfg: config.Config, device: torch.device,
                       resume_dir: Path | None = None) -> precision.Choice:
    """TRAINING_PRECISION resolved for this device (auto -> bf16 / fp16 / fp32, see precision.resolve), one
    decision per job: rank 0 resolves `auto` (its CPU probe is a timing, which may answer differently on a
    loaded rank) and every rank takes its answer; a resumed run keeps the precision its checkpoint recorded.
    fp16 under FSDP2 is refused: GradScaler would find overflow on one rank's shard and skip the step there
    only, so the ranks' weights would drift apart. Collective."""
    fsdp, requested = cfg.system.use_fsdp, cfg.training.training_precision
    if precision.canonical(requested) == "auto":
        recorded = ckpt.read_trainer_state(resume_dir).precision if resume_dir is not None else None

        def decide() -> str:
            c = precision.resolve("auto", device, fsdp=fsdp, recorded=recorded)
            return f"{c.name}\t{c.reason}"

        name, reason = D.on_rank0(decide).split("\t", 1)
        choice = precision.Choice(name, "auto", reason)
    else:
        choice = precision.resolve(requested, device, fsdp=fsdp)
    if choice.name == "fp16" and fsdp:
        raise UserError("TRAINING_PRECISION=fp16 with USE_FSDP=true: GradScaler checks overflow per shard, so "
                        "ranks would skip different steps; use TRAINING_PRECISION=auto, bf16 or fp32")
    return choice


def planned_steps(cfg: config.Config, samples_per_epoch: int, G: int) -> int:
    """MAX_STEPS, or one pass over the training data for MAX_STEPS=-1 — which must be at least one step: a
    run that would train nothing is refused before anything is written."""
    t = cfg.training
    if t.max_steps >= 0:
        return t.max_steps
    steps = samples_per_epoch // G
    if steps == 0:
        stage = t.training_stage
        raise UserError(f"MAX_STEPS=-1 (one pass over the data) trains 0 steps: "
                        f"{cfg.get(f'{stage.upper()}_DATALOADER_ROOT_PATH') or 'the training data'} holds "
                        f"{samples_per_epoch} training "
                        f"sequences, fewer than one step's {G} (TOTAL_BATCH_SIZE={t.total_batch_size} / "
                        f"MAX_SEQ_LEN={cfg.model.max_seq_len}): prepare more data, lower TOTAL_BATCH_SIZE or "
                        "set MAX_STEPS")
    return steps


def build_loaders(cfg: config.Config, objective: objectives.Objective, tok: tk.Tokenizer, info: D.DistInfo,
                  G: int) -> tuple[dataloaders.Loader, dataloaders.Loader | None]:
    own = objective.own_loaders(tok, info.rank, info.world_size)
    if own is not None:
        return own
    stage, t = cfg.training.training_stage, cfg.training
    root = cfg[f"{stage.upper()}_DATALOADER_ROOT_PATH"]
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    common = dict(seq_len=cfg.model.max_seq_len, micro_batch=t.max_batch_size, rank=info.rank,
                  world_size=info.world_size, seed=t.seed, pad_id=pad, packed=cfg.data.sft_batching == "packed",
                  tokenizer_identity=tok.identity(), trim=cfg.data.trim_padding,
                  **objective.loader_options(tok))
    train = dataloaders.build_loader(objective.batch_format, root, "train", global_batch=G,
                                     check_hashes=cfg.data.verify_data, **common)  # hashes every split's shards
    val = dataloaders.build_loader(objective.batch_format, root, "val",
                                   global_batch=t.max_batch_size * info.world_size, **common) \
        if cfg.eval.validate_every_x_steps else None
    return train, val


class SpikeGuard:
    """Optional loss-spike guard (LOSS_SPIKE_ZSCORE > 0): a step whose loss lies more than z standard
    deviations above the mean of the last LOSS_SPIKE_WINDOW accepted steps is skipped like a non-finite one.
    Needs a full window first. Off (never a spike) by default."""

    def __init__(self, zscore: float, window: int) -> None:
        self.z, self.window, self.history = zscore, window, []  # type: float, int, list[float]

    def is_spike(self, loss: float) -> bool:
        if self.z <= 0 or len(self.history) < self.window:
            return False
        mean = sum(self.history) / len(self.history)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
        return loss > mean + self.z * max(std, 1e-8)

    def accept(self, loss: float) -> None:
        if self.z > 0:
            self.history = (self.history + [loss])[-self.window:]


# ---- evaluation --------------------------------------------------------------------------------------


@torch.no_grad()
def validate(model, objective, val_loader, steps: int, device, autocast,
             stop_check: Callable[[], None] | None = None) -> float:
    """Mean eval loss per unit over `steps` validation batches (all ranks). stop_check runs before every
    batch and may raise to abandon the validation."""
    model.eval()
    val_loader.reset()
    units: float  # an int until summed over ranks (D.sum_floats)
    total, units = 0.0, 0
    try:
        for _ in range(steps):
            if stop_check is not None:
                stop_check()
            batch = objectives.batch_to_device(val_loader.next_batch(), device)
            with autocast():
                loss_sum, n = objective.eval_loss(model, batch)
            total, units = total + float(loss_sum), units + int(n)
    finally:
        model.train()
    total, units = D.sum_floats([total, units])
    return total / max(units, 1)


def sample_prompts(model: nn.Module, tok: tk.Tokenizer, cfg: config.Config, log: Logger,
                   stop_check: Callable[[], None] | None = None,
                   autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
    """Continue the stage's test prompts (a str = plain text, a list = chat messages) on every rank, under the
    run's autocast. The ranks decode together (an FSDP2 block gathers its weights in every forward), so they stop
    at the same step; no fused projection copies are made (they would add about two thirds of the block weights)."""
    path = Path(cfg.eval.test_prompts_file)
    prompts = json.loads(path.read_text()).get(cfg.training.training_stage, []) if path.is_file() else []
    ids = [tk.ChatFormat(tok).encode_dialog(p, add_generation_prompt=True)[0] if isinstance(p, list)
           else generate.encode_prompt(tok, p, chat=False) for p in prompts]
    if not ids:
        return
    stops = [i for i in {tok.eos_id, tok.eot_id} if i is not None]
    with autocast():
        # the model, or the same object under FSDP2 (fully_shard keeps its class); no return_logits: tokens alone
        outs = cast(list[list[int]], generate.generate(
            cast(Transformer, model), ids, cfg.eval.max_test_gen_len, temperature=0.0, stop_ids=stops,
            pad_id=tok.pad_id or 0, stop_check=stop_check, fuse_projections=False,
            all_ranks_done=lambda done: not D.any_rank(not done)))
    for p, o in zip(prompts, outs, strict=True):
        shown = p if isinstance(p, str) else p[-1]["content"]
        log.print(f"  sample | {shown!r} -> {tok.decode(o)!r}")


# ---- building a run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Where a run starts: the checkpoint it continues (None: a fresh state) and the weights its model is
    built from."""

    resume_dir: Path | None
    requested: str  # the weights as named (a flag, INIT_FROM, the previous stage's `latest`); '' = random init
    init_source: str  # the same resolved to a directory or file, not a pointer that moves on
    verify_parent: bool  # a resumed run whose recorded parent must still hold the weights it started from


def find_start(cfg: config.Config, args: argparse.Namespace) -> Start:
    resume_dir, requested = starting_point(cfg, args)
    # the parent recorded by a resumed run must still hold the same weights; weights INIT_FROM names under
    # another name than the recorded one are the user's explicit choice
    verify = resume_dir is not None and bool(requested) and cfg.model.init_from in (
        "", ckpt.parent_requested(resume_dir))
    init_source = str(model_utils.resolve_source(requested)[1]) if requested else ""
    return Start(resume_dir, requested, init_source, verify)


@dataclass
class Numerics:
    """What the training step computes in: the run's precision (name, dtype, why), fp16's GradScaler (None
    under bf16 / fp32) and the forward's autocast."""

    precision: precision.Choice
    device_type: str
    scaler: torch.amp.GradScaler | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        return precision.autocast(self.device_type, self.precision.dtype)

    @property
    def eval_dtype(self) -> torch.dtype | None:
        """The dtype the evaluation hooks compute in (None: fp32, no autocast)."""
        return None if self.precision.dtype == torch.float32 else self.precision.dtype


@dataclass
class Throughput:
    """The run's work and its rate: training FLOPs per position of a full MAX_SEQ_LEN row (the banner's
    figure), one device's peak FLOP/s in the run's precision for MFU, and this process's steps so far."""

    flops_per_position: float
    peak: float | None  # None: MFU not reported
    peak_source: str  # where the peak comes from, or why there is none
    world_size: int
    done: objectives.Work = field(default_factory=objectives.Work)  # this process's steps, all ranks
    seconds: float = 0.0  # time in those steps

    def add(self, work: objectives.Work, seconds: float) -> None:
        self.done, self.seconds = self.done + work, self.seconds + seconds

    def mfu(self, flops: float, seconds: float) -> float | None:
        """Model FLOPs utilization: the FLOPs computed on all ranks over what their devices' peak allows in
        `seconds`. Never clamped: it stays below 1 because the FLOPs are the ones computed."""
        return flops / (seconds * self.peak * self.world_size) if self.peak and seconds > 0 else None

    def summary(self) -> str:
        """This process's training steps (all ranks): positions computed (the B x T fed to the model, after
        trimming) and loss tokens (targets with loss), their rates over the steps' time, and MFU."""
        w, sec = self.done, self.seconds
        if sec <= 0:
            return "no training step"
        util = self.mfu(w.flops, sec)
        return (f"steps: {w.positions:,} positions computed ({w.positions / sec:,.0f}/s), {w.loss_tokens:,} loss "
                f"tokens ({w.loss_tokens / sec:,.0f}/s)" + (f", mfu {util:.1%}" if util is not None else ""))


@dataclass
class Run:
    """Everything the loop works with, built once by build_run(): the model and what trains it, the data,
    where the run started and its counters, and where its outputs go."""

    cfg: config.Config
    info: D.DistInfo
    tok: tk.Tokenizer
    model: nn.Module  # unwrapped: state dicts, optimizer, checkpoints
    margs: ModelArgs
    wrapped: nn.Module  # what the training forward calls (DDP / FSDP2 / compiled blocks)
    objective: objectives.Objective
    optimizer: torch.optim.Optimizer
    numerics: Numerics
    train_loader: dataloaders.Loader
    val_loader: dataloaders.Loader | None
    G: int  # global batch in sequences
    accum: int  # micro-steps per optimizer step on each rank
    max_steps: int
    init_source: str
    resume_dir: Path | None
    state: ckpt.TrainerState
    checkpointer: ckpt.Checkpointer
    log: Logger
    run_dir: Path
    throughput: Throughput
    stop_check: Callable[[], None] = lambda: None  # raises StopRequested on every rank (set by train())
    params: list[nn.Parameter] = field(init=False)  # the trainable ones
    eval_model: nn.Module = field(init=False)  # FSDP2 forwards gather; DDP's module does not sync

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.eval_model = self.wrapped if D.is_fsdp(self.wrapped) else self.model


@dataclass
class StepResult:
    loss: float  # per unit (token / pair) of the whole step, all ranks
    grad_norm: float
    metrics: dict[str, float]  # the objective's metrics per unit
    dt: float  # seconds
    skipped: str | None = None  # "non-finite" / "loss spike" when the update was skipped
    work: objectives.Work = field(default_factory=objectives.Work)  # what the step computed, all ranks


def run_dir_of(cfg: config.Config) -> Path:
    return Path(cfg.logging.run_dir or f"runs/{cfg.training.training_stage}")


def initial_state(cfg: config.Config, args: argparse.Namespace, start: Start,
                  init_fingerprint: str | None = None) -> ckpt.TrainerState:
    """A fresh state, or the checkpoint's (its weights are loaded after parallelize, so each FSDP2 rank reads
    only its shards); --reset-optimizer takes only the weights, --start-step overrides the step counter."""
    state = ckpt.TrainerState(stage=cfg.training.training_stage, parent=start.init_source or None,
                              parent_fingerprint=init_fingerprint, parent_requested=start.requested or None)
    if start.resume_dir is not None and not args.reset_optimizer:
        state = ckpt.read_trainer_state(start.resume_dir)
    if args.start_step is not None:
        state.step = args.start_step
    return state


def restore_training(resume_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler | None, train_loader: dataloaders.Loader,
                     state: ckpt.TrainerState, device: torch.device | None = None) -> None:
    """Optimizer moments, loss scale, data position and this rank's RNG streams of a checkpoint."""
    extra = ckpt.load_optimizer(resume_dir, model, optimizer)
    if scaler is not None and extra.get("grad_scaler"):
        scaler.load_state_dict(extra["grad_scaler"])
    assert state.dataloader is not None  # every checkpoint records the loader's position
    train_loader.load_state_dict(state.dataloader)
    ckpt.set_rng_state(ckpt.own_rng_state(state, D.rank()), device)


def starting_model(cfg: config.Config, tok: tk.Tokenizer, init_source: str, device: torch.device
                   ) -> tuple[Transformer, ModelArgs, Any, Callable[[], Mapping[str, torch.Tensor]]]:
    """-> (the model with its starting weights, or on the meta device under builds_sharded; its args; the
    weights materialize_model fills a meta model from (None: built whole, or random init); the starting
    weights as a state dict, read when asked for)."""
    if builds_sharded(cfg):
        model, margs, weights = build_meta_model(cfg, tok, init_source)
        return model, margs, weights, lambda: model_utils.module_state_view(weights, margs)
    model, margs = build_model(cfg, tok, init_source, device)
    return model, margs, None, model.state_dict


def build_trained_model(cfg: config.Config, start: Start, tok: tk.Tokenizer, objective: objectives.Objective,
                        prec: precision.Choice, info: D.DistInfo
                        ) -> tuple[Transformer, ModelArgs, nn.Module, str | None, dict[str, Any]]:
    """model -> the objective's frozen helpers -> LoRA -> parallelize (-> the sharded model's weights, see
    builds_sharded) -> a resumed run's weights. -> (the model, its args, what the training forward calls, the
    fingerprint of the starting weights, the facts the objective's setup adds to the banner)."""
    seed, device, sharded = cfg.training.seed, info.device, builds_sharded(cfg)
    model, margs, weights, source_weights = starting_model(cfg, tok, start.init_source, device)
    # our checkpoints store their fingerprint; the weights of another source are hashed by one rank, not all
    init_fingerprint = D.on_rank0(lambda: ckpt.source_fingerprint(start.init_source, source_weights)) \
        if start.init_source else None
    if start.verify_parent:  # only for a resumed run started from named weights (find_start)
        assert start.resume_dir is not None and init_fingerprint is not None
        ckpt.check_parent(start.resume_dir, start.init_source, init_fingerprint, weights=source_weights)
    facts = objective.setup(model, tok, device) or {}
    if sharded:
        facts["model build"] = "meta device, each rank fills its FSDP2 shards"
    if cfg.lora.lora_enabled:
        apply_lora(cfg, model, seed)
        hold_frozen_base_in(model, prec)
    wrapped = D.parallelize(model, cfg, device, compute_dtype=prec.dtype)
    if sharded:
        materialize_model(model, weights, seed, device, start.init_source)
        objective.fill_frozen(model, device, prec.dtype)
    # the weights are drawn, the same on every rank; from here each rank draws its own stream (dropout masks
    # differ across data-parallel ranks)
    torch.manual_seed(seed + info.rank)
    if start.resume_dir is not None:
        ckpt.load_model_weights(start.resume_dir, model, base_config_sha=ckpt.config_sha(margs.to_dict()))
    return model, margs, wrapped, init_fingerprint, facts


def open_logger(cfg: config.Config, args: argparse.Namespace, start: Start, state: ckpt.TrainerState) -> Logger:
    """metrics.jsonl and W&B; a resumed run continues both (its metrics after the resumed step dropped)."""
    lg, continues = cfg.logging, start.resume_dir is not None
    return Logger(run_dir_of(cfg), D.is_main(), cfg.to_dict(), lg.wandb_enabled, lg.wandb_project_name,
                  lg.wandb_run_name, lg.wandb_entity, resume=continues,
                  resume_step=state.step if continues and not args.reset_optimizer else None)


def build_run(cfg: config.Config, args: argparse.Namespace, info: D.DistInfo) -> Run:
    """settings -> starting point -> precision -> tokenizer -> objective -> the trained model
    (build_trained_model) -> state -> optimizer -> data -> resume -> logger + banner."""
    t, device = cfg.training, info.device
    random.seed(t.seed)
    np.random.seed(t.seed)
    start = find_start(cfg, args)
    prec = training_precision(cfg, device, start.resume_dir)
    tok = load_tokenizer(cfg, start.init_source)
    objective = objectives.build_objective(cfg)
    model, margs, wrapped, init_fingerprint, setup_facts = build_trained_model(cfg, start, tok, objective, prec,
                                                                               info)
    state = initial_state(cfg, args, start, init_fingerprint)
    state.precision = prec.name  # recorded in every checkpoint: a resume computes in it
    optimizer = optim.build_optimizer(model, cfg, device)
    numerics = Numerics(prec, device.type, torch.amp.GradScaler(device.type) if prec.name == "fp16" else None)
    G, accum = cfg.batch_geometry(info.world_size)
    train_loader, val_loader = build_loaders(cfg, objective, tok, info, G)
    if start.resume_dir is not None and not args.reset_optimizer:
        restore_training(start.resume_dir, model, optimizer, numerics.scaler, train_loader, state, device)
    max_steps = planned_steps(cfg, train_loader.samples_per_epoch, G)  # before the logger writes anything
    log = open_logger(cfg, args, start, state)
    c = cfg.checkpoint
    checkpointer = ckpt.Checkpointer(ckpt.stage_root(cfg, t.training_stage), c.max_number_checkpoints,
                                     c.checkpoint_async)
    throughput = Throughput(model_utils.flops_per_token(margs, cfg.model.max_seq_len),
                            *precision.peak_flops(device, prec.name, cfg.system.peak_flops), info.world_size)
    run = Run(cfg=cfg, info=info, tok=tok, model=model, margs=margs, wrapped=wrapped, objective=objective,
              optimizer=optimizer, numerics=numerics, train_loader=train_loader, val_loader=val_loader, G=G,
              accum=accum, max_steps=max_steps, init_source=start.init_source, resume_dir=start.resume_dir,
              state=state, checkpointer=checkpointer, log=log, run_dir=run_dir_of(cfg), throughput=throughput)
    objective.bind(objectives.Policy(wrapped, run.eval_model, device, numerics.autocast, lambda: run.stop_check(),
                                     generate.rollout, log.print))
    print_banner(run, setup_facts)
    return run


def print_banner(run: Run, setup_facts: dict[str, Any]) -> None:
    cfg, t, info, G, T = run.cfg, run.cfg.training, run.info, run.G, run.cfg.model.max_seq_len
    tp = run.throughput
    run.log.banner({"commit": git_commit(), "stage": f"{t.training_stage} (objective "
                    f"{type(run.objective).__name__}, loader {run.objective.batch_format})",
                    "world size": info.world_size, "device": str(info.device),
                    "precision": run.numerics.precision.describe(),
                    "batch per step": f"{G} sequences of up to {T} positions (tokens/s counts those fed)",
                    "grad accumulation": f"{run.accum} = {G} / ({t.max_batch_size} x {info.world_size} ranks)",
                    "parameters": f"{model_utils.count_parameters(run.model):,} "
                                  f"({sum(p.numel() for p in run.params):,} trainable)",
                    "FLOPs per position": f"{tp.flops_per_position:.3e} at T={T} (MFU counts each micro-batch "
                                          "at its own T)",
                    "MFU peak": f"{tp.peak:.3g} FLOP/s per device ({tp.peak_source})" if tp.peak
                    else tp.peak_source,
                    "steps": f"{run.state.step} -> {run.max_steps}",
                    "start": f"continuing {run.resume_dir} at step {run.state.step}" if run.resume_dir
                    else str(run.init_source or "random init"),
                    "checkpoints": str(run.checkpointer.root), "run dir": str(run.run_dir), **setup_facts})
    run.log.print("\n".join(f"  {line}" for line in cfg.summary().splitlines() if line.endswith(")")))


# ---- checkpoints, evaluation ---------------------------------------------------------------------------


def save_checkpoint(run: Run, best: bool = False) -> None:
    """Collective: the training state at run.state.step (every rank calls it)."""
    cfg, t, scaler = run.cfg, run.cfg.training, run.numerics.scaler
    lora_config = lora.lora_config(run.model) if cfg.lora.lora_enabled else None
    conf = ckpt.config_json(run.margs.to_dict(), cfg.to_dict(), lora_config, run.init_source,
                            run.state.parent_fingerprint)
    state = replace(run.state, dataloader=run.train_loader.state_dict(), rng=None,
                    rng_ranks=ckpt.rank_rng_states(run.info.device), world_size=run.info.world_size)
    extra = {"schedule": {"kind": t.lr_schedule, "step": state.step, "max_steps": run.max_steps},
             "grad_scaler": scaler.state_dict() if scaler is not None else None}
    run.checkpointer.save(state.step, run.model, run.optimizer, trainer_state=state.to_dict(), config=conf,
                          lora=cfg.lora.lora_enabled, best=best, extra_optimizer_json=extra,
                          peft_adapter=cfg.lora.lora_save_peft_adapter)


def record_validation(state: ckpt.TrainerState, val: float, c: Any) -> tuple[bool, bool]:
    """Best-value and early-stopping bookkeeping for a validation loss at state.step -> (improved, stop)."""
    if state.best_val is None or val < state.best_val - c.early_stopping_min_delta:
        state.best_val, state.best_step, state.bad_validations = val, state.step, 0
        return True, False
    if state.step >= c.early_stopping_patience_skip_steps:
        state.bad_validations += 1
    return False, 0 < c.early_stopping_patience <= state.bad_validations


def due(every: int, step: int, last_step: bool) -> bool:
    """An every-N-steps hook runs at multiples of N and after the last update; N <= 0 turns it off."""
    return every > 0 and (step % every == 0 or last_step)


def wants_checkpoint(c: Any, step: int, improved: bool, last_step: bool) -> bool:
    periodic = c.save_every_x_steps and step % c.save_every_x_steps == 0 and not c.save_best_only
    return bool(c.save_checkpoints and (improved or periodic or (last_step and not c.save_best_only)))


@contextlib.contextmanager
def eager_blocks(model: nn.Module) -> Iterator[None]:
    """Inside, the modules compiled in place (USE_TORCH_COMPILE: nn.Module.compile, which keeps the compiled call
    in `_compiled_call_impl`) run their plain forward. Their compiled frames are the training step's; evaluation
    and sampling (no_grad, inference mode, a KV cache, one-token steps) would each add variants of them, compiled
    on every rank, until torch's recompile limit (8), past which the frame is no longer compiled at all."""
    compiled = [m for m in D.unwrap(model).modules() if getattr(m, "_compiled_call_impl", None) is not None]
    calls = [m._compiled_call_impl for m in compiled]
    for m in compiled:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, call in zip(compiled, calls, strict=True):
            m._compiled_call_impl = call


def evaluate_and_save(run: Run, last_step: bool) -> bool:
    """The hooks after the update of run.state.step: validation (+ early stopping), HellaSwag, samples,
    checkpoint, with the compiled blocks running eager (eager_blocks). -> True when early stopping ends the run."""
    with eager_blocks(run.model):
        return run_hooks(run, last_step)


def run_hooks(run: Run, last_step: bool) -> bool:
    cfg, state, log, step = run.cfg, run.state, run.log, run.state.step
    c, e = cfg.checkpoint, cfg.eval
    improved = stop_early = False
    if run.val_loader is not None and due(e.validate_every_x_steps, step, last_step):
        val = validate(run.eval_model, run.objective, run.val_loader, e.val_steps, run.info.device,
                       run.numerics.autocast, run.stop_check)
        log.log({"step": step, "val_loss": val}, console=True)
        improved, stop_early = record_validation(state, val, c)
    if due(e.hellaswag_every_x_steps, step, last_step):
        hs = hellaswag_utils.hellaswag_hook(run.eval_model, run.tok, e.hellaswag_path,
                                            limit=e.hellaswag_number_of_examples,
                                            dtype=run.numerics.eval_dtype,
                                            stop_check=run.stop_check)
        log.log({"step": step, "hellaswag_acc": hs["acc"], "hellaswag_acc_norm": hs["acc_norm"]}, console=True)
    if due(e.winogrande_every_x_steps, step, last_step):
        wg = winogrande_utils.winogrande_hook(run.eval_model, run.tok, e.winogrande_path,
                                              limit=e.winogrande_number_of_examples,
                                              dtype=run.numerics.eval_dtype,
                                              stop_check=run.stop_check)
        log.log({"step": step, "winogrande_acc": wg["acc"]}, console=True)
    if due(e.generate_every_x_steps, step, last_step):
        sample_prompts(run.eval_model, run.tok, cfg, log, run.stop_check, run.numerics.autocast)
    if wants_checkpoint(c, step, improved, last_step):
        save_checkpoint(run, best=improved)
    if stop_early:
        log.print(f"early stopping at step {step}: no validation improvement beyond {c.early_stopping_min_delta} "
                  f"for {state.bad_validations} validations; best {state.best_val:.4f} at step {state.best_step}")
    return stop_early


# ---- one optimizer step --------------------------------------------------------------------------------


def step_work(run: Run, batches: list[dict[str, torch.Tensor]]) -> objectives.Work:
    """What this rank's micro-batches cost (objectives.Objective.work), counted from the host batches as
    they will be fed (after trimming)."""
    work = objectives.Work()
    for b in batches:
        work += run.objective.work(b, run.margs, weight_grads=not run.cfg.lora.lora_enabled)
    return work


def forward_backward(run: Run) -> tuple[torch.Tensor, list[str], float, objectives.Work]:
    """The step's micro-batches through forward and backward, gradients scaled so the step's loss is per
    unit of the whole step (all ranks). -> (rank-summed [loss, *metrics] sums, metric names, units, the
    step's work summed over ranks). A stop between micro-batches abandons the step: gradients dropped, the
    loader back where the step began."""
    device, objective = run.info.device, run.objective
    loader_at_start = run.train_loader.state_dict()
    batches = [run.train_loader.next_batch() for _ in range(run.accum)]
    mine = step_work(run, batches)
    # the units and the work ride one collective (host numbers: no device sync)
    n_units, positions, loss_tokens, flops = D.sum_floats(
        [sum(objective.units(b) for b in batches), mine.positions, mine.loss_tokens, mine.flops])
    work = objectives.Work(int(positions), int(loss_tokens), flops)
    scale = run.info.world_size / max(n_units, 1)  # DDP/FSDP average over ranks: undo, then / step's units
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    metric_sums: dict[str, torch.Tensor] = {}  # the objective's per-unit metrics, summed like the loss
    for m, batch in enumerate(batches):
        if m > 0:
            try:
                run.stop_check()
            except StopRequested:
                run.optimizer.zero_grad(set_to_none=True)
                run.train_loader.load_state_dict(loader_at_start)
                raise
        batch = objectives.batch_to_device(batch, device)
        with D.gradient_sync(run.wrapped, sync=m == run.accum - 1,
                             unsharded_accumulation=run.cfg.system.fsdp_unsharded_accumulation):
            with run.numerics.autocast():
                micro_sum, micro_metrics = objective.loss(run.wrapped, batch)
            loss = micro_sum * scale
            scaler = run.numerics.scaler
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += micro_sum.detach()
        for k, v in (micro_metrics or {}).items():
            metric_sums[k] = metric_sums.get(k, 0.0) + v.detach().double()
    names = sorted(metric_sums)  # the same keys on every rank: one collective for all of them
    return D.all_reduce_sum(torch.stack([loss_sum, *(metric_sums[k] for k in names)])), names, n_units, work


def apply_update(run: Run, spikes: SpikeGuard, loss: float, norm: float) -> str | None:
    """optimizer.step() unless the loss / gradient norm is non-finite or a loss spike; a skipped step keeps the
    weights and moments of the last good one. -> the reason for a skip, or None. Too many skips in a row stop
    the run (UserError) without saving."""
    state, scaler, t = run.state, run.numerics.scaler, run.cfg.training
    finite = math.isfinite(loss) and (math.isfinite(norm) or scaler is not None)
    spike = finite and spikes.is_spike(loss)
    if finite and not spike:
        if scaler is not None:
            scaler.step(run.optimizer)
            scaler.update()
        else:
            run.optimizer.step()
        state.nonfinite_in_a_row = 0
        spikes.accept(loss)
        return None
    kind = "loss spike" if spike else "non-finite"
    if spike:
        state.spike_steps += 1
    else:
        state.nonfinite_total += 1
    state.nonfinite_in_a_row += 1
    run.log.print(f"step {state.step}: {kind} (loss {loss} / grad norm {norm}): update skipped "
                  f"({state.nonfinite_in_a_row} in a row)")
    if state.nonfinite_in_a_row >= t.max_nonfinite_steps:
        run.checkpointer.wait()  # an async save in flight is the last good checkpoint once written
        kept = run.checkpointer.latest() if D.is_main() else None
        raise UserError(f"loss or gradients were {kind} for {state.nonfinite_in_a_row} steps in a row "
                        f"(step {state.step}); stopped without saving, last good checkpoint kept: "
                        f"{kept or 'none'}; lower MAX_LR, enable GRAD_CLIP or use "
                        "TRAINING_PRECISION=bf16/fp32, then resume from it")
    return kind


def optimizer_step(run: Run, spikes: SpikeGuard) -> StepResult:
    """micro-steps -> clip -> step (or skip) -> zero grads; advances run.state by one step."""
    t0 = time.time()
    reduced, names, n_units, work = forward_backward(run)
    if run.numerics.scaler is not None:
        run.numerics.scaler.unscale_(run.optimizer)
    norm_t = D.grad_norm_and_clip(run.params, run.cfg.training.grad_clip)
    # one host sync for the loss, the metrics and the gradient norm together
    *sums, norm = torch.cat([reduced, norm_t.detach().reshape(1).to(reduced)]).tolist()
    loss = sums[0] / max(n_units, 1)
    skipped = apply_update(run, spikes, loss, norm)
    run.optimizer.zero_grad(set_to_none=True)
    if run.info.device.type == "cuda":
        torch.cuda.synchronize()
    run.state.step += 1
    run.state.tokens_seen += work.positions
    run.state.loss_tokens_seen += work.loss_tokens
    dt = time.time() - t0
    run.throughput.add(work, dt)
    return StepResult(loss, norm, {k: v / max(n_units, 1) for k, v in zip(names, sums[1:], strict=True)},
                      dt, skipped, work)


def log_step(run: Run, r: StepResult, lr: float) -> None:
    """The step's record. `tokens` / `tokens_per_s` count positions computed by the trained model (each
    micro-batch's B x T as fed to it, after trimming, all ranks), `loss_tokens` / `loss_tokens_per_s` the
    targets that carried loss; `mfu` counts all model FLOPs (frozen teacher / reference forwards included)."""
    t, state = run.cfg.training, run.state
    run.log.log({"step": state.step, "loss": r.loss, "lr": lr, "tokens": state.tokens_seen,
                 "tokens_per_s": r.work.positions / r.dt, "loss_tokens": state.loss_tokens_seen,
                 "loss_tokens_per_s": r.work.loss_tokens / r.dt, "mfu": run.throughput.mfu(r.work.flops, r.dt),
                 "grad_norm": r.grad_norm, "dt_ms": r.dt * 1000, "nonfinite_steps": state.nonfinite_total,
                 **r.metrics, **({"spike_steps": state.spike_steps} if t.loss_spike_zscore > 0 else {})},
                console=True)


# ---- the loop ----------------------------------------------------------------------------------------


def train(cfg: config.Config, args: argparse.Namespace, info: D.DistInfo) -> int:
    """-> 0 when the run finished (all steps or early stopping), RESUMABLE_EXIT when a signal or the
    watchdog stopped it early (with a checkpoint of the last completed step when checkpoints are on)."""
    if stopped_by_signal_before(cfg):
        return RESUMABLE_EXIT
    run = build_run(cfg, args, info)
    state, s = run.state, cfg.system
    spikes = SpikeGuard(cfg.training.loss_spike_zscore, cfg.training.loss_spike_window)
    prof = make_profiler(cfg, run.run_dir)
    just_resumed, loss, t_start, stopped = run.resume_dir is not None, float("nan"), time.time(), False
    with RunControl(s.step_watchdog_factor, s.step_watchdog_min_seconds) as control:
        run.stop_check = control.check
        try:
            while True:
                last_step = state.step >= run.max_steps
                lr = optim.set_lr(run.optimizer, state.step, cfg, run.max_steps)
                control.check()
                # evaluation and checkpoints come after the update of `state.step`; not again right after a resume
                stop_early = not just_resumed and (state.step > 0 or last_step) and evaluate_and_save(run, last_step)
                just_resumed = False
                if last_step or stop_early:
                    break
                result = optimizer_step(run, spikes)
                run.checkpointer.poll()  # an async save whose write finished is published now
                control.step_done(result.dt)
                loss = result.loss
                if prof is not None:
                    prof.step()
                if state.step % cfg.logging.log_every_x_steps == 0 or state.step == run.max_steps:
                    log_step(run, result, lr)
        except StopRequested as e:
            stopped = True
            stop_and_checkpoint(run, str(e))
        finally:
            run.checkpointer.wait()  # `latest` names the last save before the run ends, also when it fails
    if prof is not None:
        prof.stop()
    finish(run, loss, time.time() - t_start, stopped)
    return RESUMABLE_EXIT if stopped else 0


def stop_and_checkpoint(run: Run, why: str) -> None:
    """Collective: the checkpoint a stopped run leaves (the last completed step, unless this process saved
    it already)."""
    step, save = run.state.step, run.cfg.checkpoint.save_checkpoints
    run.log.print(f"stop requested ({why}): {'checkpointing' if save else 'not checkpointing (SAVE_CHECKPOINTS=false)'} "
                  f"step {step}, exit code {RESUMABLE_EXIT} (run the same command again to continue)")
    if save and run.checkpointer.saved_step != step:
        save_checkpoint(run)
    if D.is_main() and os.environ.get("TORCHELASTIC_RUN_ID"):
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / STOP_MARKER).write_text(json.dumps({"run_id": os.environ["TORCHELASTIC_RUN_ID"], "step": step}))


STOP_MARKER = "stopped_by_signal.json"


def stopped_by_signal_before(cfg: config.Config) -> bool:
    """Under torchrun --max-restarts a worker group that a signal stopped (exit RESUMABLE_EXIT) would be
    restarted and train on; a restarted worker whose previous attempt of the same torchrun job was stopped
    exits again instead. A crash leaves no marker, so a restart after one resumes as usual."""
    marker = run_dir_of(cfg) / STOP_MARKER
    if D.elastic_restart_count() == 0 or not marker.is_file():
        return False
    try:
        seen = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if seen.get("run_id") != os.environ.get("TORCHELASTIC_RUN_ID"):
        return False
    print(f"rank {D.rank()}: this torchrun job was stopped by a signal at step {seen.get('step')}; not training "
          f"on after torchrun's restart (exit {RESUMABLE_EXIT}: run the command again to continue)",
          file=sys.stderr, flush=True)
    return True


def finish(run: Run, loss: float, seconds: float, stopped: bool) -> None:
    """Loss plot, then the summary line and where the run's outputs are."""
    state, log = run.state, run.log
    plot = log.plot_loss()
    best = f", best val {state.best_val:.4f} @ {state.best_step}" if state.best_val is not None else ""
    log.print(f"{'stopped' if stopped else 'done'}: {run.cfg.training.training_stage} step {state.step}/"
              f"{run.max_steps}, loss {loss:.4f}{best}, {seconds:.1f} s; {run.throughput.summary()}")
    kept = run.checkpointer.latest() if D.is_main() else None
    log.print(f"  checkpoint: {kept or 'none saved'}")
    log.print(f"  metrics:    {run.run_dir / 'metrics.jsonl'}")
    log.print(f"  loss plot:  {plot if plot else 'none (no losses logged)'}")
    log.close()


def make_profiler(cfg: config.Config, run_dir: Path):
    s = cfg.system
    if not s.torch_profiler_enabled:
        return None
    sched = torch.profiler.schedule(skip_first=s.torch_profiler_schedule_skip_first, wait=s.torch_profiler_schedule_wait,
                                    warmup=s.torch_profiler_schedule_warmup, active=s.torch_profiler_schedule_active,
                                    repeat=s.torch_profiler_schedule_repeat)
    handler = torch.profiler.tensorboard_trace_handler(s.torch_profiler_tensorboard_log_path) \
        if s.torch_profiler_tensorboard_enabled else None
    prof = torch.profiler.profile(schedule=sched, on_trace_ready=handler)
    prof.start()
    return prof


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(sys.argv[1:] if argv is None else argv)
    info = D.init_distributed(cfg.system.device, group_of_one=cfg.system.use_fsdp)
    try:
        return train(cfg, args, info)
    finally:
        D.destroy()


if __name__ == "__main__":
    run_cli(main)
