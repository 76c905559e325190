"""Whole jobs, ours against the tool a user would pick instead: same model, data, precision (the auto rule),
effective batch and step count, run A/B in one invocation.

    python -m bench.jobs [--jobs sft dpo pretrain generate hellaswag] [--quick] [--rounds 1] [--work DIR]
                         [--peer-venv DIR] [--json] [--save NAME] [--isa native|avx512_bf16|avx2] [--dry-run]

| job | ours | peer |
|---|---|---|
| sft | `train.py` TRAINING_STAGE=instruct from SmolLM2-135M-Instruct, SFT_BATCHING=packed (and padded) | TRL `SFTTrainer`, its defaults, and with `packing=True` |
| dpo | `train.py` TRAINING_STAGE=dpo with LoRA (reference = adapters off) | TRL `DPOTrainer` with a peft `LoraConfig` |
| pretrain | `train.py` MODEL_PRESET=small on the embedded corpus | transformers `Trainer` + `LlamaForCausalLM` |
| generate | bench/generate_throughput.py (greedy, batch 1 and 8, eager and `generate(compile=True)`, plus the memory-bandwidth bound) | transformers `generate`, and its static cache + torch.compile (the faster is the peer of our compiled decode) |
| hellaswag | bench/hellaswag_throughput.py | lm-evaluation-harness (its own venv) |

Precision: the auto rule is resolved once (its bf16-vs-fp32 probe can flip on a loaded machine) and the
result is given to both sides. Fairness: every side is a fresh process timed from start to exit (imports, model load, training, the final
held-out evaluation: the whole job), peak memory is that process's peak RSS (os.wait4). Both sides read the
token ids of this repo's prepared shards (the peer gets them as pre-tokenized rows), so "useful tokens"
(tokens that carry loss: SFT assistant content + end of turn, DPO responses, every pretraining target) is
one count (jobs_common.loss_tokens) over the same tokenization; for ours it is counted by replaying the
loader with the run's seed and geometry, for the peer by wrapping its collator. The held-out SFT loss is
the token-weighted mean CE over the same first validation examples (ours from train.py's validation, the
peer from jobs_common.heldout_loss). Learning rate (constant), weight decay 0, clipping 1.0, AdamW betas
(0.9, 0.999) and the random seed are set alike; everything else is each tool's default (TRL defaults to gradient
checkpointing; that is part of "its defaults").

The peer runs in a bench-only venv (default ~/.cache/llama3-train/jobs-trl-<ver>) created on first use with
`pip install trl==<ver> torch==<ours>` and this environment's packages visible through a .pth file, so the
CPU torch is reused, never replaced by a CUDA build. --quick shrinks every job to a smoke run. --isa runs every
side under an instruction-set profile (bench/isa.py: this process re-executes itself with the profile's
environment, which every side inherits; the header and the result file name the profile, verified in a child).
--dry-run prints that header and the jobs, runs nothing.
The orchestrator itself never imports torch: a child forked from a process holding a model would inherit
its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import isa
from bench.jobs_common import loss_tokens, parse_result, print_result, sft_labels, shard_examples
from fileio import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

TRL_VERSION = "1.16.0"
TORCH_VERSION = "2.13.0"
JOBS = ("sft", "dpo", "pretrain", "generate", "hellaswag")

# Shared settings per job; --quick takes the second dict's values.
SIZES = {
    "sft": ({"seq_len": 512, "batch": 4, "accum": 2, "steps": 12, "examples": 600, "max_chars": 1400, "heldout": 48,
             "lr": 2e-5},
            {"seq_len": 256, "batch": 2, "accum": 2, "steps": 2, "examples": 48, "max_chars": 400, "heldout": 8,
             "lr": 2e-5}),
    "dpo": ({"seq_len": 512, "batch": 2, "accum": 2, "steps": 10, "examples": 300, "max_chars": 700, "lr": 5e-5},
            {"seq_len": 256, "batch": 2, "accum": 1, "steps": 2, "examples": 32, "max_chars": 250, "lr": 5e-5}),
    "pretrain": ({"seq_len": 512, "batch": 4, "accum": 2, "steps": 8, "lr": 3e-4},
                 {"seq_len": 128, "batch": 2, "accum": 1, "steps": 2, "lr": 3e-4}),
}
LORA = {"lora_rank": 8, "lora_alpha": 8.0, "lora_targets": ["wq", "wv"], "lora_targets_hf": ["q_proj", "v_proj"],
        "beta": 0.1}  # peft LoraConfig's defaults (r 8, alpha 8, q/v projections of a Llama), on both sides


# ---- processes ---------------------------------------------------------------------------------------


def measure(cmd: list[str], cwd: Path, log: Path, timeout: float) -> dict:
    """Run cmd to completion; -> {"status", "wall_s", "peak_mb", "stdout"}. Peak memory is the child's own
    peak RSS from wait4 (this process holds no model, so nothing large is inherited)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           # the repo root importable whatever the cwd: the peers run as `-m bench.jobs_peer` from the work dir
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    with open(log, "w") as f:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
        status = None
        while True:
            pid, code, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                p.kill()
                pid, code, usage = os.wait4(p.pid, 0)
                status = f"timeout after {timeout:.0f}s"
                break
            time.sleep(0.2)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(code)
    out = log.read_text(errors="replace")
    if status is None:
        status = "ok" if p.returncode == 0 else f"failed (rc {p.returncode}, log {log})"
    print(f"  {wall:6.1f}s {usage.ru_maxrss / 1024:7.0f} MB {status}: {' '.join(str(c) for c in cmd[1:4])}",
          file=sys.stderr, flush=True)
    return {"status": status, "wall_s": wall, "peak_mb": usage.ru_maxrss / 1024, "stdout": out}


def peer_python(venv: Path) -> Path:
    """The bench-only venv with TRL (created once): our site-packages visible through a .pth file placed
    after its own, torch pinned to ours so pip never pulls another build."""
    py = venv / "bin" / "python"
    probe = f"import trl, torch; assert trl.__version__ == '{TRL_VERSION}'"
    if py.exists() and subprocess.run([py, "-c", probe], capture_output=True).returncode == 0:
        return py
    print(f"creating {venv} with trl=={TRL_VERSION} (one time)", file=sys.stderr, flush=True)
    subprocess.run([PY, "-m", "venv", str(venv)], check=True)
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "zz_project_env.pth").write_text("\n".join(ours) + "\n")
    subprocess.run([py, "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}", f"torch=={TORCH_VERSION}"], check=True)
    return py


# ---- preparation (a child process: it imports torch) ------------------------------------------------------


def write_jsonl(path: Path, rows) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def run_cli_step(args: list[str], work: Path) -> None:
    r = subprocess.run([PY, *args], cwd=work, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(args[:2])} failed (rc {r.returncode}): {r.stderr.strip()[-800:]}")


def replay_tokens(kind: str, root: Path, spec: dict, packed: bool, pad_id: int) -> tuple[int, int]:
    """(useful tokens, rows) our loader feeds a run of spec's geometry and seed: the same batches train.py draws."""
    import dataloaders

    loader = dataloaders.build_loader(kind, root, "train", seq_len=spec["seq_len"], micro_batch=spec["batch"],
                                      global_batch=spec["batch"] * spec["accum"], rank=0, world_size=1,
                                      seed=spec["seed"], pad_id=pad_id, packed=packed)
    tokens = rows = 0
    for _ in range(spec["steps"] * spec["accum"]):
        b = loader.next_batch()
        keys = ["chosen_labels", "rejected_labels"] if kind == "dpo" else ["labels"]
        tokens += sum(loss_tokens(b[k], shifted=True) for k in keys)
        rows += b[keys[0]].shape[0]
    return tokens, rows


def prepare(work: Path, specs: dict) -> dict:
    """Model, data and the replayed counts every side needs; -> facts for the table."""
    import torch

    import dataloaders
    import demo_data
    import model_utils
    import precision
    import tokenizer as tokenizer_mod

    work.mkdir(parents=True, exist_ok=True)
    facts: dict = {"precision": precision.resolve("auto", "cpu").name}
    hf = work / "smollm2_hf"
    if not (hf / "config.json").exists():
        gguf = str(model_utils.smollm2_gguf())
        model, args = model_utils.load_model(gguf, dtype=torch.float32)
        model_utils.export_hf(model, args, hf, tokenizer=tokenizer_mod.load_tokenizer(gguf))
    tok = tokenizer_mod.load_tokenizer(str(hf))
    facts["model"] = str(hf)
    common = [f"TOKENIZER_CHECKPOINT_PATH={hf}", "NUMBER_OF_CPU_PROCESSES=1", "SEED=0"]

    if "sft" in specs:
        s = specs["sft"]
        items = demo_data.demo_instruct_set(max_chars=s["max_chars"])
        rows = [items[i % len(items)] for i in range(s["examples"])]
        for i, r in enumerate(rows[len(items):], len(items)):  # repeats differ in their question's wording
            r["messages"][0] = {**r["messages"][0], "content": f"{r['messages'][0]['content']} ({i // len(items)})"}
        write_jsonl(work / "sft.jsonl", rows)
        root = work / "sft_shards"
        run_cli_step([str(ROOT / "load_instruct_dataset.py"), "--dataset", str(work / "sft.jsonl"), "--out", str(root),
                      "--overwrite", "--no-progress", f"MAX_SEQ_LEN={s['seq_len']}", "VAL_FRACTION=0.1", *common], work)
        import numpy as np

        train, val = shard_examples(root, "train"), shard_examples(root, "val")
        write_jsonl(work / "sft_train.jsonl", ({"input_ids": e["tokens"].tolist(),
                                                 "labels": sft_labels(e["tokens"], e["mask"])} for e in train))
        lengths = [len(e["tokens"]) for e in train]
        facts["sft"] = {"root": str(root), "train_examples": len(train), "mean_len": sum(lengths) / len(lengths),
                        "max_len": max(lengths)}
        # held-out = the val examples (file order) our validation covers in whole micro-batches, up to s["heldout"]
        K, B = min(s["heldout"], len(val)), s["batch"]
        starts = dataloaders.pack_rows(np.array([len(e["tokens"]) for e in val]) - 1, np.arange(len(val)),
                                       s["seq_len"])
        packed_steps = max(1, int((starts[1:] <= K).sum()) // B)
        covered = {"padded": (max(1, K // B), max(1, K // B) * B),
                   "packed": (packed_steps, int(starts[min(packed_steps * B, len(starts) - 1)]))}
        for packed in (False, True):
            name = "packed" if packed else "padded"
            val_steps, n_held = covered[name]
            write_jsonl(work / f"sft_heldout_{name}.jsonl", ({"input_ids": e["tokens"].tolist(),
                                                             "labels": sft_labels(e["tokens"], e["mask"])}
                                                            for e in val[:n_held]))
            tokens, n_rows = replay_tokens("sft", root, s, packed, tok.pad_id)
            facts["sft"][name] = {"useful_tokens": tokens, "rows": n_rows, "val_steps": val_steps,
                                  "heldout_examples": n_held}

    if "dpo" in specs:
        s = specs["dpo"]
        pairs = demo_data.demo_preference_set(max_chars=s["max_chars"])[: s["examples"]]
        write_jsonl(work / "dpo.jsonl", pairs)
        root = work / "dpo_shards"
        run_cli_step([str(ROOT / "load_dpo_dataset.py"), "--dataset", str(work / "dpo.jsonl"), "--out", str(root),
                      "--overwrite", "--no-progress", f"MAX_SEQ_LEN={s['seq_len']}", "VAL_FRACTION=0.05", *common], work)
        train = shard_examples(root, "train")
        write_jsonl(work / "dpo_train.jsonl", ({"prompt_ids": e["prompt"].tolist(), "chosen_ids": e["chosen"].tolist(),
                                                "rejected_ids": e["rejected"].tolist()} for e in train))
        tokens, n_rows = replay_tokens("dpo", root, s, False, tok.pad_id)
        facts["dpo"] = {"root": str(root), "train_pairs": len(train), "useful_tokens": tokens, "pairs": n_rows}

    if "pretrain" in specs:
        s = specs["pretrain"]
        import config
        from model import Transformer

        root = work / "pretrain_shards"
        run_cli_step([str(ROOT / "load_pretrain_dataset.py"), "--out", str(root), "--overwrite", "--no-progress",
                      f"TOKENIZER_CHECKPOINT_PATH={ROOT / 'tokenizer.model'}", "NUMBER_OF_CPU_PROCESSES=1"], work)
        ptok = tokenizer_mod.load_tokenizer(str(ROOT / "tokenizer.model"))
        cfg = config.load_config(None, {"MODEL_PRESET": "small", "MAX_SEQ_LEN": str(s["seq_len"])}, use_environ=False)
        margs = cfg.model_args(ptok.vocab_size)
        init = Transformer(margs)
        init.init_weights(generator=torch.Generator().manual_seed(0))
        model_utils.export_hf(init, margs, work / "small_init_hf", tokenizer=ptok)
        import numpy as np

        stream = np.concatenate([e for e in (np.load(root / sh["files"]["tokens"]["path"]) for sh in
                                             json.loads((root / "manifest.json").read_text())["splits"]["train"]
                                             ["shards"])]).astype(np.int64)
        T = s["seq_len"]
        n = (len(stream) - 1) // T
        write_jsonl(work / "pretrain_windows.jsonl", ({"input_ids": stream[i * T:i * T + T + 1].tolist()}
                                                      for i in range(n)))
        tokens, n_rows = replay_tokens("pretrain", root, s, False, 0)
        facts["pretrain"] = {"root": str(root), "model": str(work / "small_init_hf"), "windows": n,
                             "useful_tokens": tokens, "rows": n_rows}
    return facts


# ---- our side ----------------------------------------------------------------------------------------------


def ours_cmd(job: str, s: dict, facts: dict, work: Path, variant: str) -> tuple[list[str], Path]:
    run_dir = work / f"ours_{job}_{variant}"  # ab() empties it before every round
    G = s["batch"] * s["accum"]
    kv = {"MAX_SEQ_LEN": s["seq_len"], "MAX_BATCH_SIZE": s["batch"], "TOTAL_BATCH_SIZE": G * s["seq_len"],
          "MAX_STEPS": s["steps"], "MAX_LR": s["lr"], "MIN_LR": s["lr"], "LR_SCHEDULE": "constant",
          "WARMUP_STEPS": 0, "WEIGHT_DECAY": 0.0, "ADAMW_BETAS": "[0.9,0.999]", "GRAD_CLIP": 1.0,
          "SEED": s["seed"], "TRAINING_PRECISION": facts["precision"], "SAVE_CHECKPOINTS": "false", "GENERATE_EVERY_X_STEPS": 0,
          "EARLY_STOPPING_PATIENCE": 0, "RUN_DIR": run_dir, "RESUME": "never",
          "PRETRAIN_SAVE_CHECKPOINTS_PATH": run_dir / "ckpt", "INSTRUCT_SAVE_CHECKPOINTS_PATH": run_dir / "ckpt",
          "DPO_SAVE_CHECKPOINTS_PATH": run_dir / "ckpt", "VALIDATE_EVERY_X_STEPS": 0}
    if job == "sft":
        f = facts["sft"]
        kv.update(TRAINING_STAGE="instruct", INIT_FROM=facts["model"], TOKENIZER_CHECKPOINT_PATH=facts["model"],
                  INSTRUCT_DATALOADER_ROOT_PATH=f["root"], SFT_BATCHING=variant, VALIDATE_EVERY_X_STEPS=s["steps"],
                  VAL_STEPS=f[variant]["val_steps"])
    elif job == "dpo":
        kv.update(TRAINING_STAGE="dpo", INIT_FROM=facts["model"], TOKENIZER_CHECKPOINT_PATH=facts["model"],
                  DPO_DATALOADER_ROOT_PATH=facts["dpo"]["root"], LORA_ENABLED="true", LORA_RANK=LORA["lora_rank"],
                  LORA_ALPHA=LORA["lora_alpha"], LORA_DROPOUT=0.0, LORA_TARGET_MODULES=",".join(LORA["lora_targets"]),
                  DPO_BETA=LORA["beta"])
    else:
        kv.update(TRAINING_STAGE="pretrain", MODEL_PRESET="small", INIT_FROM=facts["pretrain"]["model"],
                  TOKENIZER_CHECKPOINT_PATH=ROOT / "tokenizer.model",
                  PRETRAIN_DATALOADER_ROOT_PATH=facts["pretrain"]["root"])
    return [PY, str(ROOT / "train.py"), *(f"{k}={v}" for k, v in kv.items())], run_dir


def read_metrics(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()] if f.exists() else []


# ---- the table ---------------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def fmt(x, spec: str = ",.0f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def row(job, setting, ours, peer, r, target, met) -> tuple:
    verdict = "—" if met is None else ("yes" if met else "**no**")
    return (job, setting, ours, peer, fmt(r, ".2f") + ("×" if r else ""), target, verdict)


def ab(sides: dict[str, tuple[list[str], Path | None]], rounds: int, work: Path, timeout: float) -> dict[str, list]:
    """Every side once per round, in a fixed A B A B order; -> name -> list of measure() results. A side with a
    run directory starts each round from an empty one (our runs refuse to overwrite a finished run)."""
    out: dict[str, list] = {k: [] for k in sides}
    for r in range(rounds):
        for name, (cmd, run_dir) in sides.items():
            if run_dir is not None:
                shutil.rmtree(run_dir, ignore_errors=True)
            out[name].append(measure(cmd, work, work / f"log_{name}_{r}.txt", timeout))
    return out


def median_ok(results: list[dict], key: str) -> float | None:
    vals = [r[key] for r in results if r["status"] == "ok"]
    return statistics.median(vals) if vals else None


def sft_rows(a, specs, facts, work, peer_py, table, record) -> None:
    s, f = specs["sft"], facts["sft"]
    sides = {}
    for variant in ("packed", "padded"):
        sides[f"ours_{variant}"] = ours_cmd("sft", s, facts, work, variant)
    for name, packing in (("trl_defaults", False), ("trl_packing", True)):
        spec = {**s, "model": facts["model"], "precision": facts["precision"], "packing": packing, "name": name,
                "heldout_file": f"sft_heldout_{'packed' if packing else 'padded'}.jsonl"}
        sides[name] = ([str(peer_py), "-m", "bench.jobs_peer", "sft", "--work", str(work), "--spec",
                        json.dumps(spec)], None)
    res = ab(sides, a.rounds, work, a.timeout)
    stats = {}
    for name, (_, run_dir) in sides.items():
        wall, peak = median_ok(res[name], "wall_s"), median_ok(res[name], "peak_mb")
        if run_dir is not None:
            variant = name.split("_", 1)[1]
            tokens = f[variant]["useful_tokens"]
            vals = [m["val_loss"] for m in read_metrics(run_dir) if "val_loss" in m]
            held = vals[-1] if vals else None
        else:
            pr = parse_result(res[name][-1]["stdout"]) or {}
            tokens, held = pr.get("useful_tokens"), pr.get("heldout_loss")
        stats[name] = {"wall_s": wall, "peak_mb": peak, "useful_tokens": tokens, "heldout_loss": held,
                       "tok_s": tokens / wall if tokens and wall else None, "status": res[name][-1]["status"]}
    record["sft"] = {"facts": f, "sides": stats}
    setting = (f"SmolLM2-135M-Instruct, {facts['precision']}, {s['steps']} steps x {s['batch']}x{s['accum']} rows "
               f"of {s['seq_len']}")
    o = stats["ours_packed"]
    for peer, target in (("trl_defaults", 1.5), ("trl_packing", 1.2)):
        p = stats[peer]
        r = ratio(o["tok_s"], p["tok_s"])
        table.append(row("SFT useful tokens/s", f"{setting}; ours packed vs {peer.replace('_', ' ')}",
                         fmt(o["tok_s"], ",.1f"), fmt(p["tok_s"], ",.1f"), r, f"≥ {target}×",
                         None if r is None else r >= target))
    p = stats["trl_defaults"]
    r = ratio(stats["ours_padded"]["tok_s"], p["tok_s"])
    table.append(row("SFT useful tokens/s", "ours padded vs trl defaults", fmt(stats["ours_padded"]["tok_s"], ",.1f"),
                     fmt(p["tok_s"], ",.1f"), r, "", None))
    for ours_name, peer in (("ours_packed", "trl_packing"), ("ours_padded", "trl_defaults")):
        ho, hp = stats[ours_name]["heldout_loss"], stats[peer]["heldout_loss"]
        table.append(row("SFT held-out loss", f"{ours_name.replace('_', ' ')} vs {peer.replace('_', ' ')} "
                         f"({f[ours_name.split('_')[1]]['heldout_examples']} examples)", fmt(ho, ".4f"), fmt(hp, ".4f"),
                         None, "within noise", None))
    for name in stats:
        table.append(row("SFT job wall s / peak MB", name.replace("_", " "),
                         f"{fmt(stats[name]['wall_s'], '.1f')} s / {fmt(stats[name]['peak_mb'])} MB",
                         "", None, "", None) if name.startswith("ours") else
                     row("SFT job wall s / peak MB", name.replace("_", " "), "",
                         f"{fmt(stats[name]['wall_s'], '.1f')} s / {fmt(stats[name]['peak_mb'])} MB", None, "", None))


def dpo_rows(a, specs, facts, work, peer_py, table, record) -> None:
    s, f = specs["dpo"], facts["dpo"]
    spec = {**s, **LORA, "model": facts["model"], "precision": facts["precision"], "name": "dpo"}
    sides = {"ours": ours_cmd("dpo", s, facts, work, "lora"),
             "trl": ([str(peer_py), "-m", "bench.jobs_peer", "dpo", "--work", str(work), "--spec", json.dumps(spec)],
                     None)}
    res = ab(sides, a.rounds, work, a.timeout)
    ours_m = read_metrics(sides["ours"][1])
    acc = [m["reward_accuracy"] for m in ours_m if "reward_accuracy" in m]
    pr = parse_result(res["trl"][-1]["stdout"]) or {}
    stats = {"ours": {"wall_s": median_ok(res["ours"], "wall_s"), "peak_mb": median_ok(res["ours"], "peak_mb"),
                      "pairs": f["pairs"], "reward_accuracy": sum(acc) / len(acc) if acc else None},
             "trl": {"wall_s": median_ok(res["trl"], "wall_s"), "peak_mb": median_ok(res["trl"], "peak_mb"),
                     "pairs": pr.get("pairs"), "reward_accuracy": pr.get("reward_accuracy")}}
    for v in stats.values():
        v["pairs_s"] = v["pairs"] / v["wall_s"] if v["pairs"] and v["wall_s"] else None
    record["dpo"] = {"facts": f, "sides": stats}
    r = ratio(stats["ours"]["pairs_s"], stats["trl"]["pairs_s"])
    setting = (f"SmolLM2-135M-Instruct + LoRA r{LORA['lora_rank']} q/v, {facts['precision']}, {s['steps']} steps x "
               f"{s['batch'] * s['accum']} pairs")
    table.append(row("DPO pairs/s", f"{setting} vs trl DPOTrainer", fmt(stats["ours"]["pairs_s"], ".3f"),
                     fmt(stats["trl"]["pairs_s"], ".3f"), r, "≥ 1.3×", None if r is None else r >= 1.3))
    table.append(row("DPO mean train reward accuracy", "", fmt(stats["ours"]["reward_accuracy"], ".3f"),
                     fmt(stats["trl"]["reward_accuracy"], ".3f"), None, "within noise", None))
    table.append(row("DPO job wall s / peak MB", "", f"{fmt(stats['ours']['wall_s'], '.1f')} s / "
                     f"{fmt(stats['ours']['peak_mb'])} MB", f"{fmt(stats['trl']['wall_s'], '.1f')} s / "
                     f"{fmt(stats['trl']['peak_mb'])} MB", ratio(stats["ours"]["peak_mb"], stats["trl"]["peak_mb"]),
                     "", None))


def pretrain_rows(a, specs, facts, work, peer_py, table, record) -> None:
    s, f = specs["pretrain"], facts["pretrain"]
    spec = {**s, "model": f["model"], "precision": facts["precision"], "name": "pretrain"}
    sides = {"ours": ours_cmd("pretrain", s, facts, work, "small"),
             "hf": ([str(peer_py), "-m", "bench.jobs_peer", "pretrain", "--work", str(work), "--spec",
                     json.dumps(spec)], None)}
    res = ab(sides, a.rounds, work, a.timeout)
    pr = parse_result(res["hf"][-1]["stdout"]) or {}
    stats = {"ours": {"wall_s": median_ok(res["ours"], "wall_s"), "peak_mb": median_ok(res["ours"], "peak_mb"),
                      "useful_tokens": f["useful_tokens"]},
             "hf": {"wall_s": median_ok(res["hf"], "wall_s"), "peak_mb": median_ok(res["hf"], "peak_mb"),
                    "useful_tokens": pr.get("useful_tokens")}}
    for v in stats.values():
        v["tok_s"] = v["useful_tokens"] / v["wall_s"] if v["useful_tokens"] and v["wall_s"] else None
    record["pretrain"] = {"facts": f, "sides": stats}
    r = ratio(stats["ours"]["tok_s"], stats["hf"]["tok_s"])
    table.append(row("pretrain tokens/s", f"small, {facts['precision']}, {s['steps']} steps x "
                     f"{s['batch'] * s['accum']} x {s['seq_len']} vs transformers Trainer",
                     fmt(stats["ours"]["tok_s"], ",.0f"), fmt(stats["hf"]["tok_s"], ",.0f"), r, "≥ 1.2×",
                     None if r is None else r >= 1.2))
    table.append(row("pretrain job wall s / peak MB", "", f"{fmt(stats['ours']['wall_s'], '.1f')} s / "
                     f"{fmt(stats['ours']['peak_mb'])} MB", f"{fmt(stats['hf']['wall_s'], '.1f')} s / "
                     f"{fmt(stats['hf']['peak_mb'])} MB", ratio(stats["ours"]["peak_mb"], stats["hf"]["peak_mb"]),
                     "", None))


def generate_rows(a, specs, facts, work, peer_py, table, record) -> None:
    cmd = [PY, "-m", "bench.generate_throughput", "--json", "--models", "smollm2", "--dtypes",
           facts["precision"], "--batches", "1", "8", "--new-tokens", "16" if a.quick else "64",
           "--rounds", "1" if a.quick else "3", "--bandwidth", "--int8", "--compiled"]
    res = measure(cmd, ROOT, work / "log_generate.txt", a.timeout * 3)
    rows = [json.loads(ln) for ln in res["stdout"].splitlines() if ln.startswith("{")]
    record["generate"] = rows
    if not rows:
        table.append(row("generate tokens/s", "", res["status"], "", None, "", None))
    for r in rows:
        target = r["batch"] == 1
        bound = r.get("bound_tokens_per_s")
        if "compiled_ratio" in r:
            best = r["hf_best"]
            peer = "generate (its default dynamic cache)" if best == "hf" else "static cache + torch.compile"
            table.append(row("generate tokens/s (greedy), compiled", f"SmolLM2-135M {r['dtype']} batch {r['batch']}: "
                             f"ours generate(compile=True) vs transformers' faster setting, {peer}; of the bandwidth "
                             f"bound: ours {fmt(r.get('ours_compiled_fraction_of_bound'), '.0%')}, transformers "
                             f"{fmt(r.get(f'{best}_fraction_of_bound'), '.0%')}; compile s ours "
                             f"{r['compile_s']['ours_compiled']:.0f} / transformers {r['compile_s']['hf_compiled']:.0f}"
                             f"; greedy tokens equal to our eager decode {r['compiled_same_tokens']:.0%}",
                             fmt(r["ours_compiled_tokens_per_s"], ".1f"), fmt(r[f"{best}_tokens_per_s"], ".1f"),
                             r["compiled_ratio"], "≥ 1.5×" if target else "",
                             r["compiled_ratio"] >= 1.5 if target else None))
        table.append(row("generate tokens/s (greedy), eager", f"SmolLM2-135M {r['dtype']} batch {r['batch']} vs "
                         f"transformers generate (default); of the bandwidth bound: ours "
                         f"{fmt(r.get('ours_fraction_of_bound'), '.0%')}, transformers "
                         f"{fmt(r.get('hf_fraction_of_bound'), '.0%')} (bound {fmt(bound, '.1f')} tok/s)",
                         fmt(r["ours_tokens_per_s"], ".1f"), fmt(r["hf_tokens_per_s"], ".1f"), r["ratio"], "", None))
        if "int8_ratio" in r:
            quality = (f"; greedy agreement with {r['dtype']} {r['int8_greedy_agreement']:.0%}, perplexity "
                       f"{r['ppl']:.2f} -> {r['int8_ppl']:.2f}" if "int8_ppl" in r else "")
            table.append(row("generate tokens/s (greedy), int8 weights", f"SmolLM2-135M batch {r['batch']}: ours "
                             f"int8 weight-only vs transformers + torch dynamic int8{quality}; of the int8 bound "
                             f"({fmt(r.get('int8_bound_tokens_per_s'), '.1f')} tok/s): ours "
                             f"{fmt(r.get('ours_int8_fraction_of_bound'), '.0%')}, transformers "
                             f"{fmt(r.get('hf_int8_fraction_of_bound'), '.0%')}",
                             fmt(r["ours_int8_tokens_per_s"], ".1f"), fmt(r["hf_int8_tokens_per_s"], ".1f"),
                             r["int8_ratio"], "", None))


def hellaswag_rows(a, specs, facts, work, peer_py, table, record) -> None:
    cmd = [PY, "-m", "bench.hellaswag_throughput", "--repeats", "1", "--limit", "8" if a.quick else "48"]
    res = measure(cmd, ROOT, work / "log_hellaswag.txt", a.timeout * 3)
    lines = [ln for ln in res["stdout"].splitlines() if ln.startswith("|") and "---" not in ln][1:]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    ours = next((c for c in cells if c[0].startswith("ours: batched, context once")), None)
    lm = next((c for c in cells if c[0].startswith("lm-eval")), None)
    record["hellaswag"] = cells
    if ours is None or lm is None:
        table.append(row("HellaSwag examples/s", "vs lm-evaluation-harness", res["status"], "", None, "≥ 2×", None))
        return
    r = float(ours[1]) / float(lm[1])
    table.append(row("HellaSwag examples/s", f"SmolLM2-135M fp32 vs {lm[0]} (acc equal: {ours[3] == lm[3]})",
                     ours[1], lm[1], r, "≥ 2×", r >= 2.0))


ROWS = {"sft": sft_rows, "dpo": dpo_rows, "pretrain": pretrain_rows, "generate": generate_rows,
        "hellaswag": hellaswag_rows}


def host_line() -> str:
    """The host and its CPU profile as a child process sees them (this process never imports torch)."""
    r = subprocess.run([PY, "-m", "bench.results_file"], cwd=ROOT, capture_output=True, text=True)
    try:
        rec = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return "unknown host"
    return f"{rec['host']}, {rec['cpu_profile']}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", nargs="+", default=list(JOBS), choices=JOBS)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes (a couple of minutes)")
    p.add_argument("--rounds", type=int, default=1, help="A B rounds per job (medians are reported)")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per side")
    p.add_argument("--work", default=None, help="work dir (default: a fresh dir under /tmp)")
    p.add_argument("--peer-venv", default=str(Path.home() / ".cache" / "llama3-train" / f"jobs-trl-{TRL_VERSION}"))
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    p.add_argument("--json", action="store_true", help="print every measured figure as one JSON line too")
    p.add_argument("--save", default=None, metavar="NAME",
                   help="also write every figure to bench/results/NAME.json (read by bench/readme_tables.py)")
    p.add_argument("--prepare", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="print the host line and the jobs, run nothing")
    isa.add_argument(p)
    a = p.parse_args()
    isa.relaunch(a.isa, "bench.jobs")
    if a.dry_run:
        print(f"bench/jobs.py --dry-run: jobs {' '.join(a.jobs)}\n\nhost: {host_line()}")
        return 0
    if a.prepare:  # child mode: build model + data, print facts
        print_result(prepare(Path(a.work), json.loads(a.prepare)))
        return 0
    t0 = time.perf_counter()
    import tempfile

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench_jobs_"))
    work.mkdir(parents=True, exist_ok=True)
    specs = {j: {**SIZES[j][1 if a.quick else 0], "seed": 0} for j in ("sft", "dpo", "pretrain") if j in a.jobs}
    peer_py = peer_python(Path(a.peer_venv)) if specs else None
    facts: dict = {"precision": "fp32"}
    if specs:
        print("[prepare]", file=sys.stderr, flush=True)
        res = measure([PY, "-m", "bench.jobs", "--work", str(work), "--prepare", json.dumps(specs)], ROOT,
                      work / "log_prepare.txt", a.timeout)
        facts = parse_result(res["stdout"])
        if facts is None:
            print(res["stdout"][-3000:], file=sys.stderr)
            raise SystemExit(f"bench/jobs.py: preparing the data failed ({res['status']}); see {work / 'log_prepare.txt'}")
    else:
        r = subprocess.run([PY, "-c", "import precision; print(precision.resolve('auto', 'cpu').name)"], cwd=ROOT,
                           capture_output=True, text=True)
        facts["precision"] = r.stdout.strip() or "fp32"
    table: list[tuple] = []
    record: dict = {"facts": facts, "specs": specs}
    for job in a.jobs:
        print(f"[{job}]", file=sys.stderr, flush=True)
        try:
            ROWS[job](a, specs, facts, work, peer_py, table, record)
        except Exception as e:  # one broken job must not lose the others' rows
            table.append(row(job, "", f"error: {type(e).__name__}: {e}", "", None, "", None))
    lines = ["| job | setting | ours | peer | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in table]
    header = (f"bench/jobs.py{' --quick' if a.quick else ''}: {time.strftime('%Y-%m-%d %H:%M')}, "
              f"{time.perf_counter() - t0:.0f}s total, {a.rounds} round(s), work dir {work}\n\nhost: {host_line()}")
    text = header + "\n\n" + "\n".join(lines) + "\n"
    print(text)
    if a.json:
        print(json.dumps(record, default=str))
    if a.out:
        write_text_atomic(a.out, text)
    if a.save:
        from bench import results_file

        results_file.write(a.save, "python -m bench.jobs " + " ".join(sys.argv[1:]), record,
                           host_and_profile=results_file.split_host_line(host_line()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
