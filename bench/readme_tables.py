"""The README's measured tables, rendered from the result files under bench/results/ (bench/results_file.py's
form: host, CPU profile, date, command, figures). Each table sits in README.md (or bench/README.md) between

    <!-- table:NAME -->
    ...
    <!-- /table -->

and ends with a line naming the files it came from, their host, date and command. Ratios are computed from
the recorded figures unless the measuring script printed its own from unrounded values (then that one).

    python -m bench.readme_tables           # rewrite the documents' tables from the files
    python -m bench.readme_tables --check   # exit 1 when a document differs from what the files give
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import results_file

README = results_file.ROOT / "README.md"
DOCUMENTS = (README, results_file.ROOT / "bench" / "README.md")
MARKER = re.compile(r"(<!-- table:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)

Load = Callable[[str], dict[str, Any]]


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _head(*cells: str) -> list[str]:
    return [_row(*cells), "|" + "---|" * len(cells)]


def _sources(records: dict[str, dict[str, Any]]) -> str:
    parts = [f"`bench/results/{name}.json` ({r['host']}; {r['cpu_profile']}; {r['date']}; `{r['command']}`; "
             f"{r['recorded']})" for name, r in records.items()]
    return "Source: " + "; ".join(parts) + "."


def _x(ratio: float) -> str:
    return f"{ratio:.2f}×"


def _target(value: float, goal: float, at_least: bool = True) -> str:
    met = value >= goal if at_least else value <= goal
    return f"{'≥' if at_least else '≤'} {goal:g}× — {'met' if met else 'missed'}"


def _span(values: list[float], fmt: str) -> str:
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}–{hi}"


def _minsec(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s"


# ---- the tables ------------------------------------------------------------------------------------------


def demo(load: Load) -> list[str]:
    rec = load("make_demo_2026-11-30")
    f = rec["figures"]
    lines = _head("host", "auto picks", "training speed (mean of the logged steps)", "`make demo` (3 commands)",
                  "val loss 40 → 360")
    for label, d, mfu in (("AVX-512-BF16 / AMX (this machine)", f["native"], False),
                          ("AVX2-only, reproduced on the same CPU with `ATEN_CPU_CAPABILITY=avx2 "
                           "ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`", f["avx2"], True)):
        speed = f"~{round(sum(d['logged_tok_s']) / len(d['logged_tok_s']), -2):,.0f} tokens/s"
        if mfu:
            speed += (f", {sum(d['logged_mfu_pct']) / len(d['logged_mfu_pct']):.0f}% of the measured fp32 matmul "
                      "peak")
        lines.append(_row(label, f"{d['auto']} (\"{d['probe']} than fp32\")", speed, _minsec(d["wall_s"]),
                          f"{d['val_loss_first']:.2f} → {d['val_loss_last']:.2f}"))
    return lines + ["", _sources({"make_demo_2026-11-30": rec})]


def _num(cell: str) -> float:
    """A figure as bench/run_all.py printed it ("1,499", "27.3%", "1.03×") -> its number."""
    return float(cell.replace(",", "").rstrip("%×x"))


def performance(load: Load) -> list[str]:
    names = ("run_all", "data_prep_2026-11-23_1720", "hellaswag_2026-11-23_1712")
    recs = {n: load(n) for n in names}
    run, prep, hs = (recs[n]["figures"] for n in names)
    rows = {(r["benchmark"], r["setting"]): r for r in run["rows"]}

    def fig(benchmark: str, setting: str) -> tuple[float, float, float | None]:
        """(ours, reference, the ratio run_all printed from unrounded figures, None where it printed none)."""
        r = rows[(benchmark, setting)]
        return _num(r["ours"]), _num(r["reference"]), _num(r["ratio"]) if r["ratio"].endswith("×") else None

    lines = _head("", "ours", "transformers", "ratio", "target")
    for label, goal in (("bf16 eager", 1.5), ("bf16 compiled", 1.5), ("fp32 eager", None)):
        ours, ref, ratio = fig("train tokens/s", f"smollm2-135m {label}")
        lines.append(_row(f"training tokens/s, SmolLM2-135M shape, {label.replace(' ', ', ')}", f"{ours:,.0f}",
                          f"{ref:,.0f}", _x(ratio), _target(ratio, goal) if goal else ""))
    ours, ref, ratio = fig("train peak memory MB", "smollm2-135m bf16 eager")
    lines.append(_row("training peak memory, SmolLM2-135M shape, bf16, eager", f"{ours:,.0f} MB", f"{ref:,.0f} MB",
                      _x(ratio), _target(ratio, 1, at_least=False)))
    ours, ref, ratio = fig("generate tokens/s (greedy)", "smollm2 bf16 batch 1")
    lines.append(_row("greedy generation tokens/s, SmolLM2-135M, bf16, batch 1 (eager, one-row products through "
                      "F.linear in this run; whole-job rows below)", f"{ours:.1f}", f"{ref:.1f}", _x(ratio),
                      "≥ 1.5× — see the whole-job rows"))
    g1, g8 = fig("generate tokens/s (greedy)", "tiny bf16 batch 1"), fig("generate tokens/s (greedy)", "tiny bf16 batch 8")
    lines.append(_row("greedy generation tokens/s, `tiny`, bf16, batch 1 / 8", f"{g1[0]:.0f} / {g8[0]:.0f}",
                      f"{g1[1]:.0f} / {g8[1]:.0f}", f"{_x(g1[2])} / {_x(g8[2])}", ""))
    b = fig("train MFU (of the bf16 matmul peak)", "smollm2-135m bf16 compiled")
    f = fig("train MFU (of the fp32 matmul peak)", "smollm2-135m fp32 eager")
    met = [name for name, v in (("bf16", b[0]), ("fp32", f[0])) if v >= 50]
    lines.append(_row("MFU, SmolLM2 shape: bf16 compiled / fp32 eager", f"{b[0]:.1f}% / {f[0]:.1f}%",
                      f"{b[1]:.1f}% / {f[1]:.1f}%", "",
                      "≥ 50% — " + ("met" if len(met) == 2 else f"met in {met[0]} only" if met else "missed")))
    runs = prep["runs"]
    by = {w: [r for r in runs if r["workers"] == w] for w in (1, 2)}
    pct = [r["ours_over_raw_pct"] for r in runs]
    lines.append(_row(f"data prep vs raw tiktoken `encode_ordinary_batch`, 50 MB (1 / 2 workers, {len(by[1])} runs)",
                      " / ".join(_span([r["ours_mb_s"] for r in by[w]], ".1f") for w in (1, 2)) + " MB/s",
                      " / ".join(_span([r["raw_mb_s"] for r in by[w]], ".1f") for w in (1, 2)) + " MB/s",
                      " / ".join(_span([r["ours_over_raw_pct"] for r in by[w]], ".0f") + "%" for w in (1, 2)),
                      f"≥ 80% — {'met' if min(pct) >= 80 else 'missed'}"))
    share = prep["loader_next_batch_ms"] / prep["tiny_train_step_ms"] * 100
    lines.append(_row("loader `next_batch` vs a `tiny` training step", f"{prep['loader_next_batch_ms']} ms",
                      f"{prep['tiny_train_step_ms']} ms", f"{share:.3f}%", f"< 1% — {'met' if share < 1 else 'missed'}"))
    ex, sp = hs["examples_s"], hs["speedup_of_ours"]
    lines.append(_row(f"HellaSwag batched evaluator vs one forward per ending, SmolLM2 fp32, {hs['examples']} demo "
                      "examples", f"{ex['ours']:.2f} ex/s", f"{ex['loop']:.2f} ex/s", _x(sp["loop"]),
                      _target(sp["loop"], 3)))
    lines.append(_row(f"HellaSwag batched evaluator vs lm-evaluation-harness {hs['lm_eval_version']} (HF backend, "
                      f"batch {hs['batch']}, same run, acc_norm equal: {hs['acc_norm']:.4f})", f"{ex['ours']:.2f} ex/s",
                      f"{ex['lm_eval']:.2f} ex/s", _x(sp["lm_eval"]), _target(sp["lm_eval"], 2)))
    return lines + ["", _sources(recs)]


def generation_profiles(load: Load) -> list[str]:
    """Greedy decoding of SmolLM2-135M-Instruct at batch 1, every run on each CPU profile (bench/generate_throughput.py
    --save generate_<profile>[_<run>]), ours against transformers in the same process."""
    recs = {n: load(n) for n in ("generate_native_2threads", "generate_native", "generate_native_repeat",
                                 "generate_native_eager", "generate_avx2", "generate_avx2_repeat")}
    lines = _head("run: profile, dtype", "ours eager / transformers `generate`", "ours compiled / transformers' faster",
                  "of the bandwidth bound: ours eager / compiled", "one-row kernel: picked (torch.mv / F.linear)")
    for name, rec in recs.items():
        parts = rec["cpu_profile"].split(", ")  # "ATen capability X", "<name> profile (...)", "oneDNN isa ...", ...
        profile = f"{parts[1].split(' (')[0]}, ATen {parts[0].split()[-1]}"
        for r in rec["figures"]["rows"]:
            mv, lin = r.get("ours_mv_tokens_per_s"), r.get("ours_linear_tokens_per_s")
            kernels = f"{r['row_kernel']} ({mv:.1f} / {lin:.1f} tok/s)" if mv and lin else r["row_kernel"]
            compiled, fraction = "not run", f"{r['ours_fraction_of_bound']:.0%}"
            if "compiled_ratio" in r:
                compiled = (f"{r['ours_compiled_tokens_per_s']:.1f} / {r[r['hf_best'] + '_tokens_per_s']:.1f} tok/s = "
                            f"{_x(r['compiled_ratio'])} ({_target(r['compiled_ratio'], 1.5)})")
                fraction += f" / {r['ours_compiled_fraction_of_bound']:.0%}"
            lines.append(_row(
                f"`{name}` ({r['rounds']} rounds): {profile}; {r['dtype']}, {r['threads']} "
                f"thread{'s' if r['threads'] > 1 else ''}",
                f"{r['ours_tokens_per_s']:.1f} / {r['hf_tokens_per_s']:.1f} tok/s = {_x(r['ratio'])} "
                f"({_target(r['ratio'], 1.3)})", compiled,
                f"{fraction} of {r['bound_tokens_per_s']:.0f} tok/s (≥ 40%)", kernels))
    return lines + ["", _sources(recs)]


def _pretrain_ratio(figures: dict[str, Any]) -> float:
    sides = figures["pretrain"]["sides"]
    return sides["ours"]["tok_s"] / sides["hf"]["tok_s"]


def jobs(load: Load) -> list[str]:
    recs = {n: load(n) for n in ("jobs", "jobs_2026-11-30_0910")}
    f, earlier = recs["jobs"]["figures"], recs["jobs_2026-11-30_0910"]["figures"]
    checkpointing = "TRL 1.16 turns gradient checkpointing on by default: its steps recompute the forward"
    lines = _head("job", "ours", "peer", "ratio", "target")
    sft = f["sft"]["sides"]
    ours = sft["ours_packed"]["tok_s"]
    r = ours / sft["trl_defaults"]["tok_s"]
    lines.append(_row("SFT useful tokens/s, SmolLM2-135M-Instruct, ours packed vs TRL `SFTTrainer` defaults "
                      f"({checkpointing})", f"{ours:.1f}", f"{sft['trl_defaults']['tok_s']:.1f}", _x(r),
                      _target(r, 1.5)))
    r = ours / sft["trl_packing"]["tok_s"]
    lines.append(_row("the same vs TRL with packing (gradient checkpointing on, as above)", f"{ours:.1f}",
                      f"{sft['trl_packing']['tok_s']:.1f}", _x(r), _target(r, 1.2)))
    heldout = f["sft"]["facts"]["packed"]["heldout_examples"]
    lines.append(_row(f"SFT held-out loss (same {heldout} examples), ours packed vs TRL packing",
                      f"{sft['ours_packed']['heldout_loss']:.4f}", f"{sft['trl_packing']['heldout_loss']:.4f}", "",
                      "within noise"))
    dpo = f["dpo"]["sides"]
    r = dpo["ours"]["pairs_s"] / dpo["trl"]["pairs_s"]
    lines.append(_row("DPO + LoRA pairs/s vs TRL `DPOTrainer` + peft (gradient checkpointing on: TRL's default)",
                      f"{dpo['ours']['pairs_s']:.3f}", f"{dpo['trl']['pairs_s']:.3f}", _x(r), _target(r, 1.3)))
    pre = f["pretrain"]["sides"]
    r = _pretrain_ratio(f)
    target = _target(r, 1.2)
    if r < 1.2:
        target += f" in this run ({_x(_pretrain_ratio(earlier))} in the run of {recs['jobs_2026-11-30_0910']['date']})"
    lines.append(_row("pretraining `small` tokens/s vs transformers `Trainer`", f"{pre['ours']['tok_s']:,.0f}",
                      f"{pre['hf']['tok_s']:,.0f}", _x(r), target))
    gen = {g["batch"]: g for g in f["generate"]}
    g = gen[1]
    lines.append(_row("greedy generation tokens/s, SmolLM2-135M, batch 1, ours `compile=True` vs transformers' faster "
                      "setting (static cache + torch.compile); in one process after warm-up, compile time left out: "
                      f"ours {g['compile_s']['ours_compiled']:.0f} s, transformers {g['compile_s']['hf_compiled']:.0f} s; "
                      f"of the memory-bandwidth bound: ours {g['ours_compiled_fraction_of_bound']:.0%}, transformers "
                      f"{g['hf_compiled_fraction_of_bound']:.0%}",
                      f"{g['ours_compiled_tokens_per_s']:.1f}", f"{g['hf_compiled_tokens_per_s']:.1f}",
                      _x(g["compiled_ratio"]), _target(g["compiled_ratio"], 1.5)))
    lines.append(_row("the same, eager, vs transformers `generate` default", f"{g['ours_tokens_per_s']:.1f}",
                      f"{g['hf_tokens_per_s']:.1f}", _x(g["ratio"]), ""))
    g8 = gen[8]
    lines.append(_row("the same at batch 8, compiled / eager (compile time: ours "
                      f"{g8['compile_s']['ours_compiled']:.0f} s, transformers {g8['compile_s']['hf_compiled']:.0f} s)",
                      f"{g8['ours_compiled_tokens_per_s']:.1f} / {g8['ours_tokens_per_s']:.1f}",
                      f"{g8['hf_compiled_tokens_per_s']:.1f} / {g8['hf_tokens_per_s']:.1f}",
                      f"{_x(g8['compiled_ratio'])} / {_x(g8['ratio'])}", ""))
    speedups = [gen[b]["ours_compiled_tokens_per_s"] / gen[b]["ours_tokens_per_s"] for b in (1, 8)]
    lines.append(_row("ours compiled / ours eager (`generate.py --compile`), batch 1 / 8", "", "",
                      " / ".join(_x(s) for s in speedups), ""))
    rows = {r[0]: r for r in f["hellaswag"]}
    ours_hs = next(r for name, r in rows.items() if name.startswith("ours: batched, context once"))
    lm = next(r for name, r in rows.items() if name.startswith("lm-eval"))
    r = float(ours_hs[1]) / float(lm[1])
    lines.append(_row(f"HellaSwag examples/s vs {lm[0].split(' HF')[0]} (acc equal; in one process after warm-up)",
                      ours_hs[1], lm[1], _x(r), _target(r, 2)))
    return lines + ["", _sources(recs)]


def distill(load: Load) -> list[str]:
    rec = load("distill_pays")
    f = rec["figures"]
    st = f["settings"]
    lines = _head("run", "held-out cross-entropy", "time per step")
    lines.append(_row("plain cross-entropy", f"{f['ce']['held_out_ce']:.3f}", f"{f['ce']['ms_per_step'] / 1e3:.1f} s"))
    lines.append(_row(f"KD from SmolLM2-135M-Instruct, live teacher (α = {st['alpha']:g}, T = {st['temperature']:g})",
                      f"**{f['kd-live']['held_out_ce']:.3f}**", f"{f['kd-live']['ms_per_step'] / 1e3:.1f} s"))
    lines.append(_row(f"KD from the precomputed top-{st['top_k']} + tail teacher cache",
                      f"{f['kd-cache']['held_out_ce']:.3f} ({f['kd-cache']['share_of_live_kd_gain']:.0%} of the live "
                      "gain)", f"{f['kd-cache']['ms_per_step'] / 1e3:.1f} s"))
    return lines + ["", _sources({"distill_pays": rec})]


def plan_vs_tracker(load: Load) -> list[str]:
    rec = load("memory_plan")
    lines = _head("model", "GPUs", "precision", "act. ckpt", "B x T", "FSDPMemTracker peak", "plan peak",
                  "plan / tracker")
    worst = 0.0
    for c in rec["figures"]["cases"]:
        ratio = c["plan_peak_gib"] / c["tracker_peak_gib"]
        worst = max(worst, abs(ratio - 1))
        lines.append(_row(c["model"], c["gpus"], c["precision"], "yes" if c["activation_checkpointing"] else "no",
                          c["micro_batch"], f"{c['tracker_peak_gib']:.2f} GiB",
                          f"{c['plan_peak_gib']:.2f} GiB ({c['plan_peak_at']})", f"{ratio:.3f}"))
    return lines + ["", f"Largest deviation {worst:.1%}. " + _sources({"memory_plan": rec})]


def sharded_memory_full(load: Load) -> list[str]:
    rec = load("sharded_memory")
    f = rec["figures"]
    lines = _head("processes", "parameters", "gradients", "optimizer state", "params + optimizer x N", "tracker peak",
                  "plan peak", "peak RSS (VmHWM)")
    for r in f["mib_per_rank"]:
        n = r["processes"]
        lines.append(_row(n, f"{r['params']:.1f}", f"{r['grads']:.1f}", f"{r['optimizer']:.1f}",
                          f"{(r['params'] + r['optimizer']) * n:.1f}", f"{r['tracked_peak']:.1f}",
                          f"{r['plan_peak']:.1f}", f"{r['vm_hwm']:.0f}"))
    return lines + ["", _sources({"sharded_memory": rec})]


def sharded_memory(load: Load) -> list[str]:
    rec = load("sharded_memory")
    f = rec["figures"]
    lines = [f"Preset `{f['preset']}`, micro-batch {f['batch']} x {f['seq']}, {f['precision']} autocast, AdamW, CPU "
             "gloo, real tensors; MiB on rank 0:", ""]
    lines += _head("processes", "parameters + optimizer state per rank", "gradients", "tracker peak", "plan peak",
                   "plan / tracker")
    for r in f["mib_per_rank"]:
        lines.append(_row(r["processes"], f"{r['params'] + r['optimizer']:.1f}", f"{r['grads']:.1f}",
                          f"{r['tracked_peak']:.1f}", f"{r['plan_peak']:.1f}",
                          f"{r['plan_peak'] / r['tracked_peak']:.3f}"))
    return lines + ["", _sources({"sharded_memory": rec})]


def export_memory(load: Load) -> list[str]:
    rec = load("export_memory_125m")
    f = rec["figures"]
    lines = _head(f"HF export of a `{f['preset']}` checkpoint ({f['weights_mib']:.0f} MiB of fp32 weights, largest "
                  f"tensor {f['largest_tensor_mib']:.0f} MiB)", "peak memory above the imports")
    lines.append(_row("streamed, one tensor at a time (`model_utils.py export`)", f"{f['peak_mib_streamed']:.0f} MiB"))
    lines.append(_row("building the model, then exporting it (`load_model` + `export_hf`)",
                      f"{f['peak_mib_load_model']:.0f} MiB"))
    return lines + ["", _sources({"export_memory_125m": rec})]


def posttrain_demo(load: Load) -> list[str]:
    name = "posttrain_demo_2026-11-23_1830"
    rec = load(name)
    f = rec["figures"]
    lines = _head("`make demo-posttrain`", "before → after")
    lines.append(_row("held-out SFT cross-entropy of the assistant tokens", "{:.3f} → {:.3f}".format(*f["sft_heldout_ce"])))
    lines.append(_row(f"held-out DPO loss (step 1: {f['dpo_step1_loss']:.4f} = ln 2, policy = reference)",
                      "{:.3f} → {:.3f}".format(*f["dpo_heldout_loss"])))
    lines.append(_row("distilled student's held-out cross-entropy", "{:.3f} → {:.3f}".format(*f["distill_heldout_ce"])))
    lines.append(_row("wall time, 2 cores", _minsec(f["wall_s"])))
    return lines + ["", _sources({name: rec})]


def hellaswag_cli(load: Load) -> list[str]:
    name = "hellaswag_cli_2026-11-23_1717"
    rec = load(name)
    f = rec["figures"]
    lines = _head("n", "acc", "acc_norm", "acc_token_norm", "seconds")
    lines.append(_row(f["n"], f"{f['acc']:.3f}", f"{f['acc_norm']:.3f}", f"{f['acc_token_norm']:.3f}",
                      f"{f['seconds']:.0f}"))
    return lines + ["", _sources({name: rec})]


def _recipe(load: Load) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    rec = load("recipe_memory")
    configs = rec["figures"]["configs"]
    return rec, configs["llama3.2-1b-sft-lora.env"], configs["llama3.2-1b-dpo-lora.env"]


def recipe_memory(load: Load) -> list[str]:
    rec, sft, dpo = _recipe(load)
    gb = "{:.2f} GB".format
    lines = _head("", f"SFT, micro-batch {sft['micro_batch_rows']} x {sft['seq_len']} tokens",
                  f"DPO, micro-batch {dpo['micro_batch_rows'] // 2} pairs = {dpo['micro_batch_rows']} x "
                  f"{dpo['seq_len']} tokens")
    lines.append(_row(f"frozen base ({sft['parameters'] / 1e9:.3f} B parameters: Linear weights bf16, embedding and "
                      "norms fp32)", gb(sft["weights_gb"]), gb(dpo["weights_gb"])))
    lines.append(_row(f"LoRA ({sft['lora_parameters'] / 1e6:.2f} M parameters) + gradients + AdamW moments",
                      gb(sft["adapters_gb"]), gb(dpo["adapters_gb"])))
    lines.append(_row("activations kept for backward (checkpointed blocks)", gb(sft["activations_gb"]),
                      gb(dpo["activations_gb"])))
    lines.append(_row("one block recomputed in backward", gb(sft["recomputed_block_gb"]), gb(dpo["recomputed_block_gb"])))
    lines.append(_row("reference forward's head (bf16 head copy, one chunk of logits; transient)", "–",
                      gb(dpo["reference_logits_gb"])))
    lines.append(_row("**estimate without the CUDA context**", f"**{sft['estimate_gb']:.1f} GB**",
                      f"**{dpo['estimate_gb']:.1f} GB**"))
    lines.append(_row("activations without checkpointing", f"{sft['activations_without_checkpointing_gb']:.1f} GB",
                      f"{dpo['activations_without_checkpointing_gb']:.1f} GB"))
    return lines + ["", _sources({"recipe_memory": rec})]


def recipe_time(load: Load) -> list[str]:
    rec, sft, dpo = _recipe(load)
    tflops = rec["figures"]["gpu_bf16_tflops"]
    gpus = [g for g in ("H100", "A100", "L4") if g in tflops]
    names = {"H100": "H100 SXM"}
    lines = _head("", f"FLOPs for {sft['max_steps']} steps",
                  *(f"{names.get(g, g)} ({tflops[g]:.0f} TFLOP/s)" for g in gpus))
    for label, c in (("LoRA-SFT", sft), ("DPO", dpo)):
        lines.append(_row(label, f"{c['flops'] / 1e18:.2f} EFLOP",
                          *(f"{c['hours_at_assumed_mfu'][g]:.1f} h" for g in gpus)))
    return lines + ["", f"At an assumed {rec['figures']['assumed_mfu']:.0%} of each peak. "
                    + _sources({"recipe_memory": rec})]


TABLES: dict[str, Callable[[Load], list[str]]] = {
    "demo": demo, "performance": performance, "jobs": jobs, "generation_profiles": generation_profiles,
    "distill": distill, "plan_vs_tracker": plan_vs_tracker,
    "sharded_memory": sharded_memory, "export_memory": export_memory, "posttrain_demo": posttrain_demo,
    "hellaswag_cli": hellaswag_cli, "sharded_memory_full": sharded_memory_full, "recipe_memory": recipe_memory,
    "recipe_time": recipe_time}


def render(text: str, results: Path = results_file.RESULTS) -> str:
    """A document's text with every marked table replaced by what the result files give. Raises KeyError on a
    marker without a table, ValueError when a result file lacks a key of the form."""

    def fill(m: re.Match) -> str:
        body = "\n".join(TABLES[m.group("name")](lambda n: results_file.load(n, results)))
        return f"{m.group(1)}{body}\n{m.group(4)}"

    return MARKER.sub(fill, text)


def unplaced(texts: list[str]) -> set[str]:
    """The tables no document has a marker for."""
    return set(TABLES) - {m.group("name") for text in texts for m in MARKER.finditer(text)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when a document is out of date")
    a = ap.parse_args()
    texts = {doc: doc.read_text() for doc in DOCUMENTS}
    missing = unplaced(list(texts.values()))
    if missing:
        raise SystemExit(f"no document has a <!-- table:NAME --> marker for {', '.join(sorted(missing))}")
    stale = []
    for doc, text in texts.items():
        new = render(text)
        if new != text:
            stale.append(doc.name)
            if not a.check:
                doc.write_text(new)
    if a.check and stale:
        print(f"{', '.join(stale)}: the measured tables differ from bench/results/: run python -m bench.readme_tables",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
