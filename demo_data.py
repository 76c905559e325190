"""Offline demo sets built from the embedded corpus (pydoc_data.topics + stdlib module docstrings).

DEMO DATA, NOT A BENCHMARK: these sets exist so that SFT and DPO run end to end on any machine without the
network. They teach a tiny model to answer "Explain the Python topic X." with the opening prose of the
documentation of X; nothing measured on them says anything about model quality.

- `demo_instruct_set()`  -> [{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}]
- `demo_preference_set()` -> [{"prompt": str, "chosen": str, "rejected": str}]: chosen = the asked topic's
  text, rejected = another topic's text (picked by a seeded RNG, never the same topic)
- `demo_test_prompts()`  -> {"pretrain": [...], "instruct": [...], "dpo": [...]} (test_prompts.json's keys)
- `demo_arithmetic_set()` -> {"train": [...], "test": [...]} of {"prompt": "What is 37 + 48?", "answer": "85"}:
  questions with exact integer answers for RL with a verifiable reward (not from the corpus; seeded)
Everything is deterministic for a given Python version (the corpus ships with Python).
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

_UNDERLINE = re.compile(r"^[=*\-~^\"]{3,}$")


def prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running text (blank-line separated); headings, grammar and code blocks are skipped."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        if not lines or lines[0][:1].isspace() or any(_UNDERLINE.match(ln.strip()) for ln in lines):
            continue
        if len(lines) == 1 and not lines[0].rstrip().endswith((".", ":", "?")):
            continue  # a lone title line
        out.append(" ".join(ln.strip() for ln in lines))
    return out


def trim(paragraphs: list[str], max_chars: int) -> str:
    """Whole paragraphs while they fit (at least the first); an over-long first one ends at a sentence."""
    if not paragraphs:
        return ""
    text = paragraphs[0]
    if len(text) > max_chars:
        cut = text.rfind(". ", 0, max_chars)
        text = text[:cut + 1] if cut > 0 else text[:max_chars].rsplit(" ", 1)[0]
    for p in paragraphs[1:]:
        if len(text) + 2 + len(p) > max_chars:
            break
        text += "\n\n" + p
    return text


def _topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(k, topics[k]) for k in sorted(topics)]


def _module_docs() -> list[tuple[str, str]]:
    """(name, module docstring) for public pure-Python stdlib modules, read with ast (nothing imported)."""
    import ast
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_"):
            continue
        for f in (stdlib / f"{name}.py", stdlib / name / "__init__.py"):
            if f.is_file():
                doc = ast.get_docstring(ast.parse(f.read_text(encoding="utf-8")))
                if doc:
                    out.append((name, doc))
                break
    return out


def demo_items(max_chars: int = 700, modules: bool = True) -> list[tuple[str, str]]:
    """(question, answer) pairs: pydoc topics, then (optionally) stdlib modules; empty answers skipped."""
    items = []
    for key, text in _topics():
        answer = trim(prose_paragraphs(text), max_chars)
        if answer:
            items.append((f'Explain the Python topic "{key}".', answer))
    if modules:
        for name, doc in _module_docs():
            answer = trim(prose_paragraphs(doc), max_chars)
            if len(answer) >= 40:
                items.append((f"Explain the Python module {name}.", answer))
    return items


def demo_instruct_set(max_chars: int = 700, modules: bool = True) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in demo_items(max_chars, modules)]


def demo_preference_set(max_chars: int = 700, modules: bool = True, seed: int = 0) -> list[dict]:
    items = demo_items(max_chars, modules)
    rng = random.Random(seed)
    out = []
    for i, (q, a) in enumerate(items):
        j = rng.randrange(len(items) - 1)
        j += j >= i  # any other item, uniformly
        out.append({"prompt": q, "chosen": a, "rejected": items[j][1]})
    return out


def demo_test_prompts() -> dict[str, list[str]]:
    items = demo_items(modules=False)
    picks = [items[i] for i in range(0, len(items), max(1, len(items) // 4))][:4]
    return {"pretrain": [" ".join(a.split()[:6]) for _, a in picks],
            "instruct": [q for q, _ in picks],
            "dpo": [q for q, _ in picks]}


def demo_arithmetic_set(n_train: int = 2000, n_test: int = 200, seed: int = 0) -> dict[str, list[dict]]:
    """Distinct questions "What is a + b?" / "a - b" / "a * b" with exact integer answers (as strings), drawn by
    a seeded RNG (a, b in 10..99 for + and -, a - b >= 0; a in 2..12, b in 10..99 for *); the test questions
    never occur in train. Deterministic for a given seed on any Python 3."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < n_train + n_test:
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 12), rng.randint(10, 99)
        else:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            if op == "-" and a < b:
                a, b = b, a
        q = f"What is {a} {op} {b}?"
        if q not in seen:
            seen.add(q)
            out.append({"prompt": q, "answer": str(a + b if op == "+" else a - b if op == "-" else a * b)})
    return {"test": out[:n_test], "train": out[n_test:]}
