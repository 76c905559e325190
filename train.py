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
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import checkpoint as ckpt
import config
import distributed as D
import objectives
import optim
import precision
from errors import UserError, run_cli
from logger import Logger, git_commit
from settings_table import BY_KEY

STAGES: tuple[str, ...] = BY_KEY["TRAINING_STAGE"].choices


def parse_args(argv: list[str]) -> tuple[config.Config, argparse.Namespace]:
    overrides, rest = config.split_overrides(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    if elastic_restart_count() > 0:  # torchelastic restarted the workers: continue the stage's latest checkpoint
        try:
            path = ckpt.resolve("latest", ckpt.stage_root(cfg, stage))
            return path, cfg.model.init_from or resumed_parent(path)
        except UserError:
            pass  # nothing saved yet: start as the first attempt did
    if args.checkpoint:
        ck_stage, spec = args.checkpoint
        path = ckpt.resolve(spec, ckpt.stage_root(cfg, ck_stage, for_loading=True))
        if ck_stage == stage:
            return path, cfg.model.init_from or resumed_parent(path)
        return None, str(path)
    if cfg.model.init_from or STAGES.index(stage) == 0:
        return None, cfg.model.init_from
    prev = STAGES[STAGES.index(stage) - 1]
    try:
        return None, str(ckpt.resolve("latest", ckpt.stage_root(cfg, prev, for_loading=True)))
    except UserError:
        raise UserError(f"TRAINING_STAGE={stage} starts from a trained model but INIT_FROM is empty and no "
                        f"{prev} checkpoint exists: set INIT_FROM (any model source)") from None


def elastic_restart_count() -> int:
    """How often torchelastic (torchrun --max-restarts) restarted this worker group; 0 on the first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def resumed_parent(path: Path) -> str:
    """The weights a resumed run was started from (its recorded parent, or a LoRA run's base model), so the
    model is rebuilt from them BEFORE objective.setup(): a frozen reference copy (or the LoRA base) must be the
    starting model, not random init. '' = the run started from random init."""
    state = ckpt.read_trainer_state(path) if (path / ckpt.STATE_FILE).is_file() else {}
    conf = ckpt.read_json(path / ckpt.CONFIG_FILE) if (path / ckpt.CONFIG_FILE).is_file() else {}
    parent = (conf.get("base_model") or {}).get("source") or state.get("parent") or ""
    if parent and not Path(parent).exists() and Path(parent).is_absolute():
        raise UserError(f"checkpoint {path} was started from {parent}, which no longer exists; the resumed run "
                        "needs those weights (frozen reference / LoRA base): set INIT_FROM to a copy of them")
    return str(parent)


def load_tokenizer(cfg: config.Config, init_source: str):
    import tokenizer as tk

    src = cfg.tokenizer.tokenizer_checkpoint_path
    if src == "model":
        if not init_source:
            raise UserError("TOKENIZER_CHECKPOINT_PATH=model needs INIT_FROM (or a checkpoint flag) to take it from")
        import model_utils

        src = model_utils.tokenizer_source(init_source)  # our checkpoints name the tokenizer they trained with
    return tk.load_tokenizer(src)


def build_model(cfg: config.Config, tok, init_source: str, device: torch.device):
    import model_utils
    from model import Transformer

    if init_source:
        model, margs = model_utils.load_model(init_source, device="cpu", dtype=torch.float32,
                                              rope_scaling_factor=cfg.model.rope_scaling_factor)
        if margs.vocab_size < tok.vocab_size:
            raise UserError(f"INIT_FROM={init_source} has vocab {margs.vocab_size} < the tokenizer's "
                            f"{tok.vocab_size}: use the tokenizer that model was trained with")
        margs.max_seq_len = max(margs.max_seq_len, cfg.model.max_seq_len)
    else:
        margs = cfg.model_args(tok.vocab_size)
        torch.manual_seed(cfg.training.seed)
        model = Transformer(margs)
        model.init_weights(generator=torch.Generator().manual_seed(cfg.training.seed))
    return model.to(device).train(), margs


def training_precision(cfg: config.Config, device: torch.device) -> precision.Choice:
    """TRAINING_PRECISION resolved for this device (auto -> bf16 / fp16 / fp32, see precision.resolve).
    fp16 under FSDP2 is refused: GradScaler would find overflow on one rank's shard and skip the step there
    only, so the ranks' weights would drift apart."""
    fsdp = cfg.system.use_fsdp
    choice = precision.resolve(cfg.training.training_precision, device, fsdp=fsdp)
    if choice.name == "fp16" and fsdp:
        raise UserError("TRAINING_PRECISION=fp16 with USE_FSDP=true: GradScaler checks overflow per shard, so "
                        "ranks would skip different steps; use TRAINING_PRECISION=auto, bf16 or fp32")
    return choice


def batch_geometry(cfg: config.Config, world: int) -> tuple[int, int]:
    """-> (global batch in sequences, grad accumulation steps), asserted exact (llm.c style)."""
    t, T = cfg.training, cfg.model.max_seq_len
    G = t.total_batch_size // T
    if G == 0 or t.total_batch_size % T or G % (t.max_batch_size * world):
        raise UserError(f"TOTAL_BATCH_SIZE={t.total_batch_size} tokens must be a multiple of MAX_SEQ_LEN={T} "
                        f"* MAX_BATCH_SIZE={t.max_batch_size} * world size {world} "
                        f"(= {T * t.max_batch_size * world}); adjust one of them")
    return G, G // (t.max_batch_size * world)


def build_loaders(cfg, objective, tok, info: D.DistInfo, G: int):
    import dataloaders

    stage, t = cfg.training.training_stage, cfg.training
    root = cfg[f"{stage.upper()}_DATALOADER_ROOT_PATH"]
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    common = dict(seq_len=cfg.model.max_seq_len, micro_batch=t.max_batch_size, rank=info.rank,
                  world_size=info.world_size, seed=t.seed, pad_id=pad, packed=cfg.data.sft_batching == "packed",
                  tokenizer_identity=tok.identity())
    train = dataloaders.build_loader(objective.batch_format, root, "train", global_batch=G,
                                     check_hashes=cfg.data.verify_data, **common)  # hashes every split's shards
    val = dataloaders.build_loader(objective.batch_format, root, "val",
                                   global_batch=t.max_batch_size * info.world_size, **common) \
        if cfg.eval.validate_every_x_steps else None
    return train, val


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop checks it once per step on every rank, then checkpoints and exits."""

    def __init__(self) -> None:
        self.received = 0
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum


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


def inject_rank_exit(step: int, rank: int) -> None:
    """TEST-ONLY fault injection: FAULT_INJECT_RANK_EXIT_AT_STEP="<rank>:<step>" makes that rank die (exit 1,
    no cleanup) during that step, on the first attempt only (TORCHELASTIC_RESTART_COUNT == 0), so a test can
    check that torchrun --max-restarts resumes from the latest checkpoint. Never set it in a real run."""
    spec = os.environ.get("FAULT_INJECT_RANK_EXIT_AT_STEP", "")
    if spec and elastic_restart_count() == 0:
        r, s = (int(x) for x in spec.split(":"))
        if (r, s) == (rank, step + 1):
            print(f"fault injection: rank {rank} exits during step {step + 1}", file=sys.stderr, flush=True)
            os._exit(1)


# ---- evaluation --------------------------------------------------------------------------------------


@torch.no_grad()
def validate(model, objective, val_loader, steps: int, device, autocast) -> float:
    model.eval()
    val_loader.reset()
    total, units = 0.0, 0
    for _ in range(steps):
        batch = {k: v.to(device) for k, v in val_loader.next_batch().items()}
        with autocast():
            loss_sum, n = objective.eval_loss(model, batch)
        total, units = total + float(loss_sum), units + int(n)
    model.train()
    total, units = D.sum_floats([total, units], device)
    return total / max(units, 1)


def sample_prompts(model, tok, cfg, log: Logger) -> None:
    """Continue the stage's test prompts (a str = plain text, a list = chat messages) on every rank."""
    import generate
    import tokenizer as tk

    path = Path(cfg.eval.test_prompts_file)
    prompts = json.loads(path.read_text()).get(cfg.training.training_stage, []) if path.is_file() else []
    ids = [tk.ChatFormat(tok).encode_dialog(p, add_generation_prompt=True)[0] if isinstance(p, list)
           else generate.encode_prompt(tok, p, chat=False) for p in prompts]
    if not ids:
        return
    stops = [i for i in {tok.eos_id, tok.eot_id} if i is not None]
    outs = generate.generate(model, ids, cfg.eval.max_test_gen_len, temperature=0.0, stop_ids=stops,
                             pad_id=tok.pad_id or 0)
    for p, o in zip(prompts, outs, strict=True):
        shown = p if isinstance(p, str) else p[-1]["content"]
        log.print(f"  sample | {shown!r} -> {tok.decode(o)!r}")


# ---- the loop ----------------------------------------------------------------------------------------


def train(cfg: config.Config, args: argparse.Namespace, info: D.DistInfo) -> int:
    t, stage, device = cfg.training, cfg.training.training_stage, info.device
    random.seed(t.seed)
    np.random.seed(t.seed)
    prec = training_precision(cfg, device)
    resume_dir, init_source = starting_point(cfg, args)
    tok = load_tokenizer(cfg, init_source)
    model, margs = build_model(cfg, tok, init_source, device)
    objective = objectives.build_objective(cfg)
    setup_facts = objective.setup(model, tok, device) or {}
    if cfg.lora.lora_enabled:
        import lora

        lora.apply_lora(model, cfg.lora.lora_target_modules, cfg.lora.lora_rank, cfg.lora.lora_alpha,
                        cfg.lora.lora_dropout)
    state: dict[str, Any] = dict(step=0, tokens_seen=0, stage=stage, parent=init_source or None, best_val=None,
                                 best_step=None, bad_validations=0, nonfinite_total=0, nonfinite_in_a_row=0,
                                 spike_steps=0)
    if resume_dir is not None:
        # before wrapping: FSDP2 then shards the loaded weights
        ckpt.load_model_weights(resume_dir, model, base_config_sha=ckpt.config_sha(margs.to_dict()))
        if not args.reset_optimizer:
            state.update(ckpt.read_trainer_state(resume_dir))
    if args.start_step is not None:
        state["step"] = args.start_step
    wrapped = D.parallelize(model, cfg, device)
    eval_model = wrapped if D.is_fsdp(wrapped) else model  # FSDP2 forwards gather; DDP's module does not sync
    optimizer = optim.build_optimizer(model, cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler(device.type) if prec.name == "fp16" else None
    ptdtype = prec.dtype

    def autocast():
        if ptdtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=ptdtype)

    G, accum = batch_geometry(cfg, info.world_size)
    T = cfg.model.max_seq_len
    train_loader, val_loader = build_loaders(cfg, objective, tok, info, G)
    if resume_dir is not None and not args.reset_optimizer:
        extra = ckpt.load_optimizer(resume_dir, model, optimizer)
        if scaler is not None and extra.get("grad_scaler"):
            scaler.load_state_dict(extra["grad_scaler"])
        train_loader.load_state_dict(state["dataloader"])
        ckpt.set_rng_state(state["rng"])
    max_steps = t.max_steps if t.max_steps >= 0 else train_loader.samples_per_epoch // G
    run_dir = Path(cfg.logging.run_dir or f"runs/{stage}")
    log = Logger(run_dir, D.is_main(), cfg.to_dict(), cfg.logging.wandb_enabled, cfg.logging.wandb_project_name,
                 cfg.logging.wandb_run_name, cfg.logging.wandb_entity, resume=resume_dir is not None)
    import model_utils

    fpt = model_utils.flops_per_token(margs, T)
    peak, peak_source = precision.peak_flops(device, prec.name, cfg.system.peak_flops)
    save_root = ckpt.stage_root(cfg, stage)
    log.banner({"commit": git_commit(), "stage": f"{stage} (objective {type(objective).__name__}, loader "
                f"{objective.batch_format})", "world size": info.world_size, "device": str(device),
                "precision": prec.describe(), "tokens per step": f"{G * T:,} = {G} seq x {T}",
                "grad accumulation": f"{accum} = {G} / ({t.max_batch_size} x {info.world_size} ranks)",
                "parameters": f"{model_utils.count_parameters(model):,} "
                              f"({sum(p.numel() for p in params):,} trainable)",
                "FLOPs per token": f"{fpt:.3e}",
                "MFU peak": f"{peak:.3g} FLOP/s per device ({peak_source})" if peak else peak_source,
                "steps": f"{state['step']} -> {max_steps}",
                "start": str(resume_dir or init_source or "random init"), "checkpoints": str(save_root),
                "run dir": str(run_dir), **setup_facts})
    log.print("\n".join(f"  {line}" for line in cfg.summary().splitlines() if line.endswith(")")))

    def save(step: int, best: bool = False) -> None:
        c = cfg.checkpoint
        conf: dict[str, Any] = {"model_args": margs.to_dict(), "settings": cfg.to_dict()}
        if cfg.lora.lora_enabled:
            import lora

            conf["lora"] = lora.lora_config(model)
            conf["base_model"] = {"source": init_source, "config_sha": ckpt.config_sha(margs.to_dict())}
        ts = {**state, "step": step, "dataloader": train_loader.state_dict(), "rng": ckpt.rng_state(),
              "world_size": info.world_size}
        extra = {"schedule": {"kind": t.lr_schedule, "step": step, "max_steps": max_steps},
                 "grad_scaler": scaler.state_dict() if scaler is not None else None}
        ckpt.save(save_root, step, model, optimizer, trainer_state=ts, config=conf, lora=cfg.lora.lora_enabled,
                  best=best, keep=c.max_number_checkpoints, extra_optimizer_json=extra)

    stopper = StopSignal()
    spikes = SpikeGuard(t.loss_spike_zscore, t.loss_spike_window)
    prof = make_profiler(cfg, run_dir)
    first, step, loss_val, t_start = True, state["step"], float("nan"), time.time()
    while True:
        last_step = step >= max_steps
        lr = optim.set_lr(optimizer, step, cfg, max_steps)
        if D.any_rank(bool(stopper.received), device):  # every rank agrees, then all save together
            log.print(f"signal received: checkpointing step {step} and exiting")
            if cfg.checkpoint.save_checkpoints:
                save(step)
            break
        # ---- evaluation and checkpoints (after the update of `step`; skipped right after a resume) -------
        stop_early = False
        if not (first and resume_dir is not None) and (step > 0 or last_step):
            c, e = cfg.checkpoint, cfg.eval
            improved = False
            if val_loader is not None and (step % e.validate_every_x_steps == 0 or last_step):
                val = validate(eval_model, objective, val_loader, e.val_steps, device, autocast)
                log.log({"step": step, "val_loss": val}, console=True)
                improved = state["best_val"] is None or val < state["best_val"] - c.early_stopping_min_delta
                if improved:
                    state["best_val"], state["best_step"], state["bad_validations"] = val, step, 0
                elif step >= c.early_stopping_patience_skip_steps:
                    state["bad_validations"] += 1
                    stop_early = 0 < c.early_stopping_patience <= state["bad_validations"]
            if cfg.eval.hellaswag_every_x_steps > 0 and (step % cfg.eval.hellaswag_every_x_steps == 0 or last_step):
                import hellaswag_utils

                hs = hellaswag_utils.hellaswag_hook(eval_model, tok, cfg.eval.hellaswag_path,
                                                    limit=cfg.eval.hellaswag_number_of_examples,
                                                    dtype=None if ptdtype == torch.float32 else ptdtype)
                log.log({"step": step, "hellaswag_acc": hs["acc"], "hellaswag_acc_norm": hs["acc_norm"]},
                        console=True)
            if e.generate_every_x_steps and (step % e.generate_every_x_steps == 0 or last_step):
                sample_prompts(eval_model, tok, cfg, log)
            periodic = c.save_every_x_steps and step % c.save_every_x_steps == 0 and not c.save_best_only
            if c.save_checkpoints and (improved or periodic or (last_step and not c.save_best_only)):
                save(step, best=improved)
            if stop_early:
                log.print(f"early stopping at step {step}: no validation improvement beyond "
                          f"{c.early_stopping_min_delta} for {state['bad_validations']} validations; best "
                          f"{state['best_val']:.4f} at step {state['best_step']}")
        first = False
        if last_step or stop_early:
            break
        # ---- one optimizer step: micro-steps -> clip -> step ---------------------------------------
        t0 = time.time()
        batches = [train_loader.next_batch() for _ in range(accum)]
        local_units = sum(objective.units(b) for b in batches)
        n_units = D.sum_floats([local_units], device)[0]
        scale = info.world_size / max(n_units, 1)  # DDP/FSDP average over ranks: undo, then / step's units
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        metric_sums: dict[str, torch.Tensor] = {}  # the objective's per-unit metrics, summed like the loss
        for m, batch in enumerate(batches):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with D.gradient_sync(wrapped, sync=m == accum - 1):
                with autocast():
                    micro_sum, micro_metrics = objective.loss(wrapped, batch)
                loss = micro_sum * scale
                (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum += micro_sum.detach()
            for k, v in (micro_metrics or {}).items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v.detach().double()
        # one collective for the loss and every metric (same sorted keys on every rank), and one host sync
        # for them together with the gradient norm
        names = sorted(metric_sums)
        reduced = D.all_reduce_sum(torch.stack([loss_sum, *(metric_sums[k] for k in names)]))
        inject_rank_exit(step, info.rank)
        if scaler is not None:
            scaler.unscale_(optimizer)
        norm_t = D.grad_norm_and_clip(params, t.grad_clip)
        *reduced, norm = torch.cat([reduced, norm_t.detach().reshape(1).to(reduced)]).tolist()
        loss_val = reduced[0] / max(n_units, 1)
        step_metrics = {k: v / max(n_units, 1) for k, v in zip(names, reduced[1:], strict=True)}
        finite = math.isfinite(loss_val) and (math.isfinite(norm) or scaler is not None)
        spike = finite and spikes.is_spike(loss_val)
        if finite and not spike:
            (scaler.step(optimizer), scaler.update()) if scaler is not None else optimizer.step()
            state["nonfinite_in_a_row"] = 0
            spikes.accept(loss_val)
        else:
            # skipped: the weights and optimizer moments stay those of the last good step
            kind, counter = ("loss spike", "spike_steps") if spike else ("non-finite", "nonfinite_total")
            state[counter] = state.get(counter, 0) + 1  # .get: checkpoints from before the spike guard
            state["nonfinite_in_a_row"] += 1
            log.print(f"step {step}: {kind} (loss {loss_val} / grad norm {norm}): update skipped "
                      f"({state['nonfinite_in_a_row']} in a row)")
            if state["nonfinite_in_a_row"] >= t.max_nonfinite_steps:
                kept = ckpt.latest_name(save_root) if D.is_main() else None
                raise UserError(f"loss or gradients were {kind} for {state['nonfinite_in_a_row']} steps in a row "
                                f"(step {step}); stopped without saving, last good checkpoint kept: "
                                f"{save_root / kept if kept else 'none'}; lower MAX_LR, enable GRAD_CLIP or use "
                                "TRAINING_PRECISION=bf16/fp32, then resume from it")
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        step += 1
        state["step"], state["tokens_seen"] = step, state["tokens_seen"] + G * T
        tps = G * T / dt
        if prof is not None:
            prof.step()
        if step % cfg.logging.log_every_x_steps == 0 or step == max_steps:
            log.log({"step": step, "loss": loss_val, "lr": lr, "tokens": state["tokens_seen"], "tokens_per_s": tps,
                     "mfu": fpt * tps / (peak * info.world_size) if peak else None, "grad_norm": norm,
                     "dt_ms": dt * 1000, "nonfinite_steps": state["nonfinite_total"], **step_metrics,
                     **({"spike_steps": state.get("spike_steps", 0)} if t.loss_spike_zscore > 0 else {})},
                    console=True)
    if prof is not None:
        prof.stop()
    log.plot_loss()
    best = f", best val {state['best_val']:.4f} @ {state['best_step']}" if state["best_val"] is not None else ""
    log.print(f"done: {stage} step {step}/{max_steps}, loss {loss_val:.4f}{best}, "
              f"{state['tokens_seen']:,} tokens in {time.time() - t_start:.1f} s, run dir {run_dir}")
    log.close()
    return 0


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
    info = D.init_distributed(cfg.system.device)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return train(cfg, args, info)
    finally:
        for s, h in handlers.items():  # StopSignal replaced them; matters when called in-process (tests)
            signal.signal(s, h)
        D.destroy()


if __name__ == "__main__":
    run_cli(main)
