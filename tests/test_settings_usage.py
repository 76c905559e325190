"""Every key of settings_table.py is read by the project's code: a setting that is accepted, printed and
saved but changes nothing is worse than an unknown key (that one at least warns).

The scan is static (ast) over the project's top-level modules. A key counts as read where code takes it
from a Config:
- `cfg.<group>.<key>` (the group's namespace reached directly, or through a local name bound to it:
  `t = cfg.training` ... `t.max_steps`); the key must belong to that group;
- `cfg["KEY"]`, `cfg.get("KEY")`, `cfg.source("KEY")`, `f(out_key="KEY")`: the exact key as a subscript or a
  call argument (positional or keyword: a function that takes the key's name reads it);
- a `("group", "key")` pair of string constants (a table of settings looked up with getattr);
- an f-string subscript or argument whose literal parts match the key around its placeholders
  (`cfg[f"{stage.upper()}_DATALOADER_ROOT_PATH"]`).
- a setting flagged `env=True`: config.load_config exports it to the process environment, where the
  library named in its help (huggingface_hub, datasets, wandb) reads it (test_config checks the export).
Not counted: the table itself, and config.py's cross-checks (validating a value is not using it). Help
texts and error messages never count: only whole-string subscripts/arguments do.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from settings_table import BY_KEY, GROUPS, SETTINGS

ROOT = Path(__file__).resolve().parent.parent
NOT_USE = {"settings_table.py": None, "config.py": {"_cross_check"}}  # None = the whole file


def _group_aliases(func: ast.AST) -> dict[str, str]:
    """Local names bound to a group namespace in this function/module: {name: group}."""
    out: dict[str, str] = {}
    for node in ast.walk(func):
        if not isinstance(node, ast.Assign):
            continue
        pairs: list[tuple[ast.AST, ast.AST]] = []
        for target in node.targets:
            if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                pairs += list(zip(target.elts, node.value.elts, strict=False))
            else:
                pairs.append((target, node.value))
        for target, value in pairs:
            if isinstance(target, ast.Name) and isinstance(value, ast.Attribute) and value.attr in GROUPS:
                out[target.id] = value.attr
    return out


def _key_pattern(node: ast.AST) -> re.Pattern | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return re.compile(re.escape(node.value))
    if isinstance(node, ast.JoinedStr) and any(isinstance(v, ast.Constant) for v in node.values):
        return re.compile("".join(re.escape(v.value) if isinstance(v, ast.Constant) else "[A-Z0-9_]+"
                                  for v in node.values))
    return None


def keys_read(tree: ast.AST, skip_functions: set[str] = frozenset()) -> set[str]:
    """Setting keys this module's code reads (see the module docstring for what counts)."""
    group_of = {s.key.lower(): s.group for s in SETTINGS}
    found: set[str] = set()
    scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module))]
    skipped = {id(n) for s in scopes if getattr(s, "name", None) in skip_functions for n in ast.walk(s)}
    for scope in scopes:
        aliases = _group_aliases(scope)
        for node in ast.walk(scope):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Attribute) and node.attr in group_of:
                v = node.value
                group = v.attr if isinstance(v, ast.Attribute) else aliases.get(v.id) if isinstance(v, ast.Name) \
                    else None
                if group == group_of[node.attr]:
                    found.add(node.attr.upper())
            if isinstance(node, ast.Tuple) and len(node.elts) == 2 and all(
                    isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                group, key = (e.value for e in node.elts)
                if group_of.get(key) == group:
                    found.add(key.upper())
            candidates = [node.slice] if isinstance(node, ast.Subscript) else \
                [*node.args, *(k.value for k in node.keywords)] if isinstance(node, ast.Call) else []
            for c in candidates:
                pattern = _key_pattern(c)
                if pattern is not None:
                    found.update(k for k in BY_KEY if pattern.fullmatch(k))
    return found


def project_keys_read() -> set[str]:
    found = {s.key for s in SETTINGS if s.env}
    for path in sorted(ROOT.glob("*.py")):
        skip = NOT_USE.get(path.name, set())
        if skip is None:
            continue
        found |= keys_read(ast.parse(path.read_text(), str(path)), skip)
    return found


def test_every_setting_is_read_by_the_code():
    unread = sorted(set(BY_KEY) - project_keys_read())
    assert not unread, (f"settings accepted but never read: {unread}; wire each one, or retire it "
                        "(settings_table.RETIRED) so an old .env still loads with a note")


def test_the_scan_sees_each_way_of_reading_and_ignores_mentions():
    src = '''
def f(cfg, stage):
    t = cfg.training
    a, m = 1, cfg.model
    x = t.max_steps + m.dim + cfg.eval.val_steps
    y = cfg["SEED"], cfg.get("GRAD_CLIP"), cfg[f"{stage.upper()}_DATALOADER_ROOT_PATH"]
    prepare(cfg, out_key="HF_DPO_DATASET_TARGET_PATH")  # a function given the key name reads it
    table = {("lora", "lora_rank"): 1, ("model", "lora_alpha"): 2}  # the second pair names no setting
    cfg.model.seed  # SEED is not in the model group
    other.max_lr  # not a group namespace
    raise ValueError(f"set MAX_LR=... or WARMUP_STEPS")
    return {"MIN_LR": 1}

def _cross_check(v):
    return v["WEIGHT_DECAY"]
'''
    got = keys_read(ast.parse(src), {"_cross_check"})
    assert got == {"MAX_STEPS", "DIM", "VAL_STEPS", "SEED", "GRAD_CLIP", "PRETRAIN_DATALOADER_ROOT_PATH",
                   "INSTRUCT_DATALOADER_ROOT_PATH", "DPO_DATALOADER_ROOT_PATH", "HF_DPO_DATASET_TARGET_PATH",
                   "LORA_RANK"}
