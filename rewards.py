"""Reward functions for GRPO: the built-ins, user functions named `module:function`, and scoring a batch.

Every reward function follows TRL's GRPOTrainer calling convention:

    fn(prompts: list, completions: list, completion_ids: list[list[int]], **fields) -> list[float | None]

one entry per sample (a prompt x one of its completions). `prompts` are the records' prompts as stored (a
string, or a list of chat messages); `completions` are the generated texts for string prompts and, for chat
prompts, one-message lists `[{"role": "assistant", "content": text}]`; `fields` are the records' other
columns as lists aligned with the samples (e.g. `answer=[...]`, `prompt_id=[...]`). A function may return
None for a sample it does not judge: that function then adds nothing to that sample's reward, and a sample
no function judged gets a NaN total (GRPO gives it advantage 0). A user function should accept **kwargs, as
TRL asks, since every column of the records is passed.

Built-ins:
- `exact_answer`: 1.0 when the completion's final answer equals the record's `answer` numerically, else 0.0
  (None when the record's answer is None). The final answer is the content of the last \\boxed{...} if there
  is one, else the last number in the text; "1,234", "1234", "1234.0" and "$1,234" are the same number. A
  non-numeric answer is compared as text with the boxed content (whitespace and $ stripped).
- `format`: 1.0 when the regex (GRPO_FORMAT_REGEX) matches the completion text, else 0.0; `re.search` with
  DOTALL, so `.` spans lines and ^...$ anchors a whole-completion match.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, NamedTuple

import torch

from errors import UserError

RewardFn = Callable[..., list]
BUILTINS = ("exact_answer", "format")
# Column names the call itself uses: a record's field of that name is not passed (TRL leaves them out too).
RESERVED_FIELDS = ("prompt", "prompts", "completion", "completions", "completion_ids")


class RewardFunction(NamedTuple):
    name: str  # the metric name: the built-in's name or the user's module:function
    fn: RewardFn


# ---- final answers ---------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|-?\.\d+")


def _number(text: str) -> Decimal | None:
    """A whole string as a number ("1,234.0", "$ -3", "42."), else None."""
    s = text.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if not s:
        return None
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (nested braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def final_answer(text: str) -> str | None:
    """The answer a completion gives: the last boxed content, else the last number, else None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def same_answer(given: str | None, expected: Any) -> bool:
    if given is None:
        return False
    a, b = _number(given), _number(str(expected))
    if a is not None and b is not None:
        return a == b
    norm = lambda s: str(s).strip().replace("$", "").replace(" ", "")  # noqa: E731
    return norm(given) == norm(expected)


def completion_text(completion: Any) -> str:
    """The text of a completion as passed to reward functions (a string or a one-message list)."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def exact_answer(prompts: list, completions: list, answer: list | None = None, **_: Any) -> list[float | None]:
    if answer is None:
        raise ValueError("the records have no 'answer' field; exact_answer needs one (load_rl_dataset.py keeps it)")
    return [None if a is None else float(same_answer(final_answer(completion_text(c)), a))
            for c, a in zip(completions, answer, strict=True)]


def make_format_reward(pattern: str, setting: str = "GRPO_FORMAT_REGEX") -> RewardFn:
    if not pattern:
        raise UserError(f"the `format` reward needs a regex: set {setting} (e.g. {setting}='<answer>.*</answer>')")
    try:
        rx = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise UserError(f"{setting}={pattern!r} is not a valid regular expression ({e}); fix it") from None

    def format_reward(prompts: list, completions: list, **_: Any) -> list[float | None]:
        return [float(rx.search(completion_text(c)) is not None) for c in completions]

    return format_reward


# ---- loading -------------------------------------------------------------------------------------------------


def _import_from_path_or_cwd(module_name: str) -> Any:
    """Import `module_name` from sys.path or, when its top-level package is not found there, from the current
    directory (where a user keeps the rewards file of an experiment), without adding the directory to sys.path."""
    top = module_name.split(".")[0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        spec = importlib.machinery.PathFinder.find_spec(top, [str(Path.cwd())]) if e.name == top else None
        if spec is None or spec.loader is None:
            raise
    package = importlib.util.module_from_spec(spec)
    sys.modules[top] = package
    try:
        spec.loader.exec_module(package)
        return importlib.import_module(module_name)
    except BaseException:
        sys.modules.pop(top, None)
        raise


def _import_file(file: Path) -> Any:
    """A reward file imported as a module registered in sys.modules (dataclasses and pickling look it up)."""
    name = f"_reward_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise UserError(f"reward file {file} is not a Python module; name a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_user_function(path: str, setting: str = "GRPO_REWARDS") -> RewardFn:
    """`package.module:function` (importable, the current directory included) or `file.py:function`."""
    module_name, _, attr = path.rpartition(":")
    if not module_name or not attr:
        raise UserError(f"{setting}: {path!r} is neither a built-in reward ({', '.join(BUILTINS)}) nor "
                        "module:function; fix the name")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise UserError(f"{setting}: reward file {module_name} not found (relative to {Path.cwd()})")
            module = _import_file(file)
        else:
            module = _import_from_path_or_cwd(module_name)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{setting}: importing {module_name} for {path!r} failed ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); check the module name and that it imports") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{setting}: {module_name} has no function {attr!r}; check the name after the colon")
    return fn


def load_reward_functions(names: str | Sequence[str], format_regex: str = "",
                          setting: str = "GRPO_REWARDS") -> list[RewardFunction]:
    """A comma list (or a list) of built-in names and module:function paths -> RewardFunctions in order."""
    items = [s.strip() for s in (names.split(",") if isinstance(names, str) else names) if s.strip()]
    if not items:
        raise UserError(f"{setting} is empty; name at least one reward ({', '.join(BUILTINS)} or module:function)")
    dup = sorted({s for s in items if items.count(s) > 1})
    if dup:
        raise UserError(f"{setting} names {dup[0]!r} twice; list each reward function once (weights scale them)")
    out = []
    for s in items:
        if s == "exact_answer":
            out.append(RewardFunction(s, exact_answer))
        elif s == "format":
            out.append(RewardFunction(s, make_format_reward(format_regex)))
        else:
            out.append(RewardFunction(s, load_user_function(s, setting)))
    return out


# ---- scoring -------------------------------------------------------------------------------------------------


def reward_inputs(prompts: Sequence[Any], completions: Sequence[str], records: Sequence[dict[str, Any]],
                  ) -> tuple[list[Any], dict[str, list]]:
    """The completions as TRL passes them (message lists for chat prompts) and the records' other fields as
    lists (a field missing from a record is None there)."""
    shown = [[{"role": "assistant", "content": c}] if isinstance(p, list) else c
             for p, c in zip(prompts, completions, strict=True)]
    keys = list(dict.fromkeys(k for r in records for k in r if k not in RESERVED_FIELDS))
    return shown, {k: [r.get(k) for r in records] for k in keys}


def _sample_label(i: int, fields: dict[str, list]) -> str:
    pid = fields.get("prompt_id")
    return f"sample {i}" + (f" (prompt_id {pid[i]})" if pid is not None and pid[i] is not None else "")


def _call(f: RewardFunction, prompts: list, shown: list, ids: list, fields: dict[str, list]) -> list:
    try:
        return f.fn(prompts=prompts, completions=shown, completion_ids=ids, **fields)
    except Exception as batch_error:
        # Find the sample it fails on: the same call on one sample at a time.
        for i in range(len(prompts)):
            try:
                f.fn(prompts=prompts[i:i + 1], completions=shown[i:i + 1], completion_ids=ids[i:i + 1],
                     **{k: v[i:i + 1] for k, v in fields.items()})
            except Exception as e:
                where, err = _sample_label(i, fields), e
                break
        else:
            where, err = f"a batch of {len(prompts)} samples", batch_error
        msg = str(err).splitlines()[0] if str(err) else ""
        raise UserError(f"reward function {f.name!r} raised {type(err).__name__} on {where}: {msg}; fix the "
                        "function or its inputs") from batch_error


def combine(per_function: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, K) rewards, NaN = not judged -> (N,) weighted sums over the judged ones; NaN where none judged
    (TRL: nansum over the functions, then the unscorable rows set to NaN)."""
    total = (per_function * weights.to(per_function).unsqueeze(0)).nansum(dim=1)
    return total.masked_fill(torch.isnan(per_function).all(dim=1), float("nan"))


def score(functions: Sequence[RewardFunction], weights: Sequence[float] | None, prompts: Sequence[Any],
          completions: Sequence[str], completion_ids: Sequence[Sequence[int]], records: Sequence[dict[str, Any]],
          dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Every function on every sample -> (total rewards (N,), per-function rewards (N, K)); None -> NaN in the
    per-function rewards; the total is the weighted sum over the functions that judged the sample (NaN if
    none did). `records` are the samples' records (a prompt's record repeated for each of its completions);
    completions are texts. fp32 by default, as TRL keeps rewards."""
    n = len(prompts)
    if not (len(completions) == len(completion_ids) == len(records) == n):
        raise ValueError(f"score: {n} prompts, {len(completions)} completions, {len(completion_ids)} id lists, "
                         f"{len(records)} records")
    w = [1.0] * len(functions) if weights is None else [float(x) for x in weights]
    if len(w) != len(functions):
        raise UserError(f"GRPO_REWARD_WEIGHTS has {len(w)} weights for {len(functions)} reward functions "
                        f"({', '.join(f.name for f in functions)}); give one weight per function")
    prompts, ids = list(prompts), [list(x) for x in completion_ids]
    shown, fields = reward_inputs(prompts, completions, records)
    per_function = torch.full((n, len(functions)), float("nan"), dtype=dtype)
    for k, f in enumerate(functions):
        out = _call(f, prompts, shown, ids, fields)
        if not isinstance(out, list | tuple) or len(out) != n:
            got = f"{len(out)} values" if isinstance(out, list | tuple) else f"a {type(out).__name__}"
            raise UserError(f"reward function {f.name!r} returned {got} for {n} samples; it must return a list "
                            "with one float (or None) per completion")
        for i, v in enumerate(out):
            if v is None:
                continue
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if not isinstance(v, numbers.Real):  # bools, ints and numpy scalars included, as TRL takes them
                raise UserError(f"reward function {f.name!r} returned {type(v).__name__} {str(v)[:40]!r} for "
                                f"{_sample_label(i, fields)}; return a float or None")
            per_function[i, k] = float(v)
    return combine(per_function, torch.tensor(w, dtype=dtype)), per_function
