"""The project's import graph: no cycles, and every import goes to the same or a lower layer (the layers of
docs/ARCHITECTURE.md). Imports inside functions count. Also: every public name README.md and
docs/ARCHITECTURE.md show as `module.name` imports."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module may import modules of its own layer or of a lower one.
LAYERS: dict[str, tuple[str, ...]] = {
    "foundation": ("errors", "fileio", "settings_table", "precision", "moe", "model", "losses", "bpe", "fused_ce",
                   "distributed", "run_control", "logger", "optim", "demo_data", "memory_plan", "quantize",
                   "rewards", "gpt2", "families"),
    "settings": ("config", "config_sections"),
    "data": ("tokenizer", "data_manifest", "data_preparation_utils", "data_sources", "dataloaders",
             "load_pretrain_dataset", "load_instruct_dataset", "load_dpo_dataset", "load_rl_dataset"),
    "model": ("model_formats", "lora", "checkpoint", "model_utils"),
    "objectives": ("objective_caches", "objectives"),
    "evaluation": ("evaluation",),
    "eval/export": ("generate", "hellaswag_utils", "winogrande_utils", "load_hellaswag_dataset", "evaluate"),
    "loop": ("train",),
}
LAYER_OF = {m: i for i, mods in enumerate(LAYERS.values()) for m in mods}
NAMES = list(LAYERS)
# The evaluation tasks: each a definition over evaluation.py, which holds what they share.
TASKS = ("hellaswag_utils", "winogrande_utils", "evaluate")


def project_modules() -> set[str]:
    return {p.stem for p in ROOT.glob("*.py")}


def imports_of(path: Path, project: set[str]) -> set[str]:
    """Project modules `path` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return (found & project) - {path.stem}


def graph() -> dict[str, set[str]]:
    project = project_modules()
    return {m: imports_of(ROOT / f"{m}.py", project) for m in sorted(project)}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(m: str, stack: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n] if n in stack else [m, n]
            if n not in state and (c := visit(n, stack + [n])):
                return c
        state[m] = 2
        return None

    for m in g:
        if m not in state and (c := visit(m, [m])):
            return c
    return None


def layer_violations(g: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({NAMES[LAYER_OF[m]]}) imports {n} ({NAMES[LAYER_OF[n]]})"
            for m, deps in g.items() for n in sorted(deps) if LAYER_OF[n] > LAYER_OF[m]]


def test_every_module_has_a_layer():
    assert project_modules() == set(LAYER_OF), "add new modules to LAYERS here and in docs/ARCHITECTURE.md"


def test_no_import_cycle():
    assert find_cycle(graph()) is None, f"import cycle: {' -> '.join(find_cycle(graph()))}"


def test_imports_only_go_down_the_layers():
    assert layer_violations(graph()) == []


def test_no_dataset_cli_imports_another():
    g = graph()
    clis = {m for m in g if m.startswith("load_") and m.endswith("_dataset")}
    assert {m: sorted(g[m] & clis) for m in sorted(clis) if g[m] & clis} == {}


def task_imports(g: dict[str, set[str]]) -> dict[str, list[str]]:
    """Task modules that import another task module (what tasks share belongs in evaluation.py)."""
    return {m: sorted(g[m] & set(TASKS)) for m in TASKS if g.get(m, set()) & set(TASKS)}


def test_no_task_imports_another():
    assert set(TASKS) <= set(LAYERS["eval/export"]) and LAYER_OF["evaluation"] < LAYER_OF["hellaswag_utils"]
    assert task_imports({"winogrande_utils": {"hellaswag_utils", "evaluation"}}) == {
        "winogrande_utils": ["hellaswag_utils"]}
    assert task_imports(graph()) == {}


# The model families' own modules (families.py maps MODEL_FAMILY and a checkpoint's or HF config's family to them).
# model.py is the llama family's and still lends the loop its ModelArgs / tensor_generator names.
FAMILY_MODULES = ("gpt2",)


def test_the_loop_imports_no_family_module():
    import families

    assert {f.module_class.__module__ for f in families.FAMILIES.values()} == {"model", *FAMILY_MODULES}
    assert sorted(graph()["train"] & set(FAMILY_MODULES)) == []
    assert "families" in graph()["model_utils"]


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) in (["a", "b", "c", "a"], ["b", "c", "a", "b"])
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_violations({"model": {"train"}, "train": {"model"}}) == ["model (foundation) imports train (loop)"]


def test_layers_in_architecture_doc_match():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for name, mods in LAYERS.items():
        row = next((line for line in doc.splitlines() if line.startswith(f"| {name} |")), None)
        assert row is not None, f"docs/ARCHITECTURE.md has no layer row for {name}"
        assert set(re.findall(r"`(\w+)\.py`", row)) == set(mods), name


def test_no_module_level_getattr():
    for p in ROOT.glob("*.py"):
        tree = ast.parse(p.read_text())
        assert not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body), p.name


def test_no_history_or_outside_documents_in_code():
    pattern = re.compile(r"seed system|seed (compatibility|keys|versions)|seed-style|retired seed|seed's|"
                         r"the seed (wrote|crashed|summed)|DESIGN|§|to keep files|split from|re-exports|original design",
                         re.IGNORECASE)
    files = [*ROOT.glob("*.py"), *ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("bench/*.py"),
             *ROOT.glob("bench/*.md"), *ROOT.glob("scripts/*"), *ROOT.glob("configs/*"), *ROOT.glob("tests/*.py")]
    files = [p for p in files if p.is_file() and p.name != "test_structure.py"]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def public_names() -> set[tuple[str, str]]:
    project = project_modules()
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    return {(m, n) for m, n in re.findall(r"`(\w+)\.(\w+)[(`]", text) if m in project and n not in ("py", "model")}


def test_docs_name_public_names():
    assert len(public_names()) >= 15


@pytest.mark.parametrize("module,name", sorted(public_names()))
def test_public_name_imports(module, name):
    assert hasattr(importlib.import_module(module), name), f"{module}.{name} is shown in the docs"


def test_the_entry_points_start_without_loading_torch_dynamo():
    """torch._dynamo costs about a second of every process's start; a dense run that does not compile never
    needs it (MoE layers and compiled paths load it when used)."""
    code = "import sys, train, generate, evaluate, model_utils; print('torch._dynamo' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]


def test_no_fault_injection_in_production_modules():
    """Faults are injected by test-only launchers (tests/train_with_faults.py) that replace a production
    function, never by settings or environment variables the production code reads."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("scripts/*")]
    hits = [f"{p.name}:{i}" for p in files if p.is_file()
            for i, line in enumerate(p.read_text().splitlines(), 1) if "FAULT_INJECT" in line]
    assert hits == []


def untyped_tokenizer_parameters(source: str) -> list[str]:
    """Parameters named `tok` / `tokenizer` not annotated with a Tokenizer class (missing, Any, ...)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            for arg in (*a.posonlyargs, *a.args, *a.kwonlyargs):
                if arg.arg in ("tok", "tokenizer") and (
                        arg.annotation is None or "Tokenizer" not in ast.unparse(arg.annotation)):
                    found.append(f"{node.name}({arg.arg}) line {node.lineno}")
    return found


def test_tokenizer_parameters_are_typed():
    found = {m: untyped_tokenizer_parameters((ROOT / f"{m}.py").read_text()) for m in sorted(project_modules())}
    assert {m: f for m, f in found.items() if f} == {}
    src = "def f(tok: Any, tokenizer, b: tk.Tokenizer | None, c: Tokenizer, token_id: int): pass"
    assert untyped_tokenizer_parameters(src) == ["f(tok) line 1", "f(tokenizer) line 1"]
