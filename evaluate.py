"""Evaluate any model source with lm-evaluation-harness.

    python evaluate.py --model checkpoints/pretrain/latest --tasks hellaswag,winogrande,arc_easy [--limit N]
    python evaluate.py --model C --tasks my_task --include-path my_tasks/     # local task YAMLs, offline
    python evaluate.py --model C --tasks hellaswag --data hellaswag=data/hellaswag/hellaswag_val.jsonl

The model (a checkpoint of ours, a Meta or HF directory, a hub id or a .gguf file) is exported once to a
temporary HF directory (model_utils.export_hf: weights, config, tokenizer files) and handed to lm-eval's own
HF backend (`HFLM`), so the scores are lm-eval's, computed as it computes them for any HF model. The
results JSON lm-eval returns (per-task metrics, task configs, versions) is written to `<out>/results.json`
(default `runs/eval/<stage>-step_NNNNNNN` for a checkpoint of ours, `runs/eval/<name>` for other sources: see
default_out; never over another model's results); one summary line per task is printed.

lm-eval is an optional dependency (`pip install lm-eval`, included in requirements-dev.txt). Its
built-in tasks download their data from the Hugging Face hub; offline, `--data TASK=FILE` keeps a built-in
task's prompts, processing and metrics and reads its evaluation documents from a local file with the hub
dataset's columns (jsonl, json, csv or parquet), or `--include-path` adds task YAMLs whose
`dataset_path: json` reads local files. The in-loop HellaSwag evaluator (hellaswag_utils.py) stays the fast
path during training.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import checkpoint as ckpt
import model_utils
import precision
import tokenizer as tk
from errors import UserError, run_cli


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise UserError(f"lm-evaluation-harness is not installed ({e}): pip install -r requirements-dev.txt "
                        "(or pip install lm-eval)") from e
    return lm_eval, HFLM, TaskManager


DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def local_task(manager, name: str, data_file: str) -> dict:
    """lm-eval's task `name` as a config dict that reads its evaluation documents from `data_file`.

    The registered YAML is read with lm-eval's own loader (includes and `!function` hooks resolved) and
    only where the documents come from changes, so prompts, document processing and metrics stay lm-eval's.
    The split evaluated is the task's test split, else its validation split; no training split is read
    (few-shot examples would come from it, and --data serves zero-shot evaluation).
    """
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader TaskManager itself uses (lm-eval 0.4.13)

    entry = manager.task_index.get(name)
    if entry is None or entry.kind.name != "TASK" or entry.yaml_path is None:
        raise UserError(f"--data {name}={data_file}: {name} is not a single lm-eval task defined by a YAML file "
                        "(a group or tag has several data sets); name one of its tasks")
    path, builder = data_file_builder(name, data_file)
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    if cfg.get("num_fewshot"):
        raise UserError(f"--data {name}={data_file}: lm-eval's {name} is a {cfg['num_fewshot']}-shot task and "
                        "its examples would be drawn from the file being evaluated; --data serves zero-shot "
                        "tasks only: evaluate it from the hub")
    key = "test_split" if cfg.get("test_split") else "validation_split"
    split = cfg.get(key)
    if not split:
        raise UserError(f"--data {name}={data_file}: lm-eval's {name} has no test or validation split to replace")
    cfg.update(dataset_path=builder, dataset_name=None, dataset_kwargs={"data_files": {split: str(path.resolve())}},
               training_split=None, validation_split=None, test_split=None, fewshot_split=None)
    cfg[key] = split  # the one split the file provides
    return cfg


def data_file_builder(task: str, data_file: str) -> tuple[Path, str]:
    """(the file, the `datasets` builder that reads it) for `--data task=data_file`, or a UserError."""
    path = Path(data_file)
    if not path.is_file():
        raise UserError(f"--data {task}={data_file}: no such file")
    builder = DATA_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(f"--data {task}={data_file}: expected a {', '.join(DATA_BUILDERS)} file")
    return path, builder


def parse_data(values: list[str]) -> dict[str, str]:
    """["TASK=FILE", ...] -> {task: file}."""
    out: dict[str, str] = {}
    for v in values:
        task, sep, file = v.partition("=")
        if not sep or not task.strip() or not file.strip():
            raise UserError(f"--data {v}: expected TASK=FILE, e.g. hellaswag=data/hellaswag/hellaswag_val.jsonl")
        out[task.strip()] = file.strip()
    return out


def export_for_eval(source: str, out_dir: Path, dtype: str) -> Path:
    """Any model source -> an HF directory lm-eval's HFLM loads (weights in `dtype`)."""
    model, args = model_utils.load_model(source, dtype=precision.dtype_of(dtype))
    tok = tk.load_tokenizer(model_utils.tokenizer_source(source))
    return model_utils.export_hf(model, args, out_dir, tokenizer=tok)


def evaluate(source: str, tasks: list[str], out: Path, limit: int | None = None, include_path: str | None = None,
             batch_size: int = 8, device: str = "cpu", dtype: str = "fp32", data: dict[str, str] | None = None) -> dict:
    """Run lm-eval's tasks on `source`; write `<out>/results.json` (atomically); return lm-eval's results.
    `data` maps a task to a local file its evaluation split is read from (local_task)."""
    data = data or {}
    stray = [t for t in data if t not in tasks]
    if stray:
        raise UserError(f"--data names {', '.join(stray)}, which --tasks does not list: add it to --tasks")
    for task, file in data.items():
        data_file_builder(task, file)  # before lm-eval's slow task index
    lm_eval, HFLM, TaskManager = _lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include-path {include_path} is not a directory of task YAMLs")
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}: check the name (python -m lm_eval ls "
                        "tasks) or pass --include-path with their YAMLs")
    specs = [local_task(manager, t, data[t]) if t in data else t for t in tasks]
    dtype = precision.resolve(dtype, device).name
    with tempfile.TemporaryDirectory(prefix="lm-eval-export-") as tmp:
        hf_dir = export_for_eval(source, Path(tmp) / "hf", dtype)
        lm = HFLM(pretrained=str(hf_dir), dtype={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype],
                  device=device, batch_size=batch_size)
        t0 = time.perf_counter()
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit,
                                              log_samples=False)
        except (ConnectionError, OSError) as e:
            raise UserError(f"lm-eval could not read the data of {', '.join(tasks)} ({type(e).__name__}: {e}); "
                            "offline, pass --include-path with task YAMLs that read local files") from e
        seconds = time.perf_counter() - t0
    results = {k: v for k, v in results.items() if k in ("results", "configs", "versions", "n-shot", "config")}
    results["model_source"], results["seconds"] = str(source), round(seconds, 3)
    results["model"] = model_identity(source)
    out.mkdir(parents=True, exist_ok=True)
    tmp_file = out / "results.json.tmp"
    tmp_file.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp_file, out / "results.json")
    return results


def model_identity(source: str) -> str:
    """What a model source names, independent of how it was spelled: the resolved local directory or file
    (`latest` followed to its step), or the hub id."""
    if not Path(source).expanduser().exists():
        return str(source)
    return str(model_utils.resolve_source(source)[1])


def default_out(source: str) -> Path:
    """runs/eval/<name> from what the source resolves to: `<stage>-step_NNNNNNN` for a checkpoint of ours
    (`checkpoints/pretrain/latest` and `checkpoints/dpo/latest` get their own), the directory or file name for
    other local sources, `org--name` for a hub id. Refused when that directory holds another model's results
    (two runs' checkpoints at the same stage and step): results are never overwritten by default."""
    model = model_identity(source)
    path = Path(model)
    if not path.exists():
        name = model.replace("/", "--")
    elif ckpt.STEP_RE.match(path.name):
        name = f"{path.parent.name}-{path.name}"
    else:
        name = path.stem if path.is_file() else path.name
    out = Path("runs/eval") / name
    previous = out / "results.json"
    if previous.is_file():
        try:
            theirs = json.loads(previous.read_text()).get("model")
        except (OSError, json.JSONDecodeError, AttributeError):
            theirs = None
        if theirs != model:
            raise UserError(f"{previous} holds the results of {theirs or 'another model'}, not of {model}: pass "
                            "--out DIR for this evaluation (or move that directory)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", required=True, help="checkpoint dir, Meta/HF dir, hub id or .gguf")
    ap.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    ap.add_argument("--limit", type=int, default=None, help="the first N documents of each task")
    ap.add_argument("--include-path", default=None, help="a directory of extra task YAMLs (local data)")
    ap.add_argument("--data", action="append", default=[], metavar="TASK=FILE",
                    help="read TASK's evaluation documents from a local jsonl/json/csv/parquet file with the hub "
                    "dataset's columns (repeatable)")
    ap.add_argument("--out", default=None, help="where results.json goes (default runs/eval/<stage>-<step> for a "
                    "checkpoint of ours, runs/eval/<name> otherwise; never another model's)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=precision.CHOICES,
                    help="fp32 (default: scores comparable across hosts) or auto / bf16 / fp16")
    a = ap.parse_args(argv)
    if a.limit is not None and a.limit < 1:
        raise UserError(f"--limit {a.limit}; expected a positive number of documents")
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks is empty: name at least one lm-eval task")
    out = Path(a.out) if a.out else default_out(a.model)
    res = evaluate(a.model, tasks, out, a.limit, a.include_path, a.batch_size, a.device, a.dtype, parse_data(a.data))
    for task, metrics in res["results"].items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {shown}")
    print(f"lm-eval on {a.model}: {len(res['results'])} task(s) in {res['seconds']:.1f} s -> {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
