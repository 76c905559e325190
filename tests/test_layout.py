"""How the repo's code finds its modules: pytest puts the repo root on the path (pyproject's `pythonpath`), the
bench and demo scripts run as modules from the root (`python -m bench.run_all`), and subprocesses get the root
through PYTHONPATH (helpers.subprocess_env) or their cwd. No file edits `sys.path` itself."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

from helpers import ROOT, subprocess_env

# a call that grows sys.path (insert / append / extend) or an assignment to it (whole, sliced or +=), also when
# it sits in generated code (a string run by `python -c` or written to a worker script)
SYS_PATH_EDIT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)\s*\(|\[[^\]]*\]\s*=[^=]|\+=|=[^=])")


def code_files() -> list:
    files = [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("scripts/*.py"),
             *ROOT.glob("bench/*.sh"), *ROOT.glob("scripts/*.sh")]
    return sorted(p for p in files if p.name != "test_layout.py")


def test_no_file_edits_sys_path():
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in code_files()
            for i, line in enumerate(p.read_text().splitlines(), 1) if SYS_PATH_EDIT.search(line)]
    assert hits == [], "edit sys.path nowhere: pyproject's pythonpath, `python -m bench.X` or PYTHONPATH instead"


def test_the_sys_path_check_sees_the_edits_it_forbids():
    for line in ("sys.path.insert(0, str(ROOT))", "sys.path.append(str(ROOT / 'bench'))", "sys.path[:0] = [a, b]",
                 "sys.path += [a]", "sys.path = [a, *sys.path]", "import sys; sys.path.insert(0, 'bench'); import x"):
        assert SYS_PATH_EDIT.search(line), line
    for line in ("ours = [p for p in sys.path if p.endswith('site-packages')]", "if sys.path[0] == root:"):
        assert not SYS_PATH_EDIT.search(line), line


def test_pytest_puts_the_repo_root_on_the_path():
    ini = (ROOT / "pyproject.toml").read_text().split("[tool.pytest.ini_options]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^pythonpath = \["\."\]$', ini, re.M), ini
    assert str(ROOT) in sys.path


def test_bench_scripts_import_each_other_through_the_bench_package():
    """Run as `python -m bench.X`, bench/ itself is not on the path: a bench helper is imported as `bench.NAME`
    (a bare `import memory_plan` is the project's module, which bench/memory_plan.py must not shadow)."""
    bench = {p.stem for p in (ROOT / "bench").glob("*.py")} - {"__init__"}
    project = {p.stem for p in ROOT.glob("*.py")}
    bare = []
    for p in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [])
            bare += [f"{p.name}: {n}" for n in names if n.split(".")[0] in bench - project]
    assert (ROOT / "bench" / "__init__.py").is_file() and bare == []


def test_a_bench_script_runs_as_a_module_from_the_root():
    """bench/memory_plan.py run as a module imports the project's memory_plan (not itself), readme_tables its
    result-file helper from the bench package; no PYTHONPATH: the root is on the path as the cwd of `-m`."""
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    for module in ("bench.memory_plan", "bench.readme_tables"):
        p = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0 and "usage:" in p.stdout, p.stderr[-2000:]
