"""rewards.py: the built-in reward functions, user functions by module:function, and `score` — what the
functions receive and how None and the weights combine, against TRL 1.16 GRPOTrainer's `_calculate_rewards`
(called on a stand-in trainer with the same functions) and its nansum; the user-facing errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from helpers import subprocess_env

import rewards
from errors import UserError
from rewards import exact_answer, final_answer, load_reward_functions, make_format_reward, score

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


# ---- exact_answer ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("completion,answer,want", [
    ("So the total is 1,234.", "1234", 1.0),
    ("1234.0", "1,234", 1.0),
    ("It costs $1,234.00 in all", 1234, 1.0),
    ("First 3 + 4 = 7, then 7 * 2 = 14", "14", 1.0),
    ("First 3 + 4 = 7, then 7 * 2 = 14", "7", 0.0),  # the LAST number counts
    ("The answer is \\boxed{42} (checked with 43 apples)", "42", 1.0),  # the boxed answer wins
    ("\\boxed{41} at first, finally \\boxed{ 4{,}2 }", "42", 0.0),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),  # non-numeric: text comparison, nested braces
    ("x = -5", "-5", 1.0),
    ("x = 5", "-5", 0.0),
    ("0.5", ".5", 1.0),
    ("no number here", "3", 0.0),
    ("1,2345", "12345", 0.0),  # not a thousands grouping: the last number is 2345
])
def test_exact_answer(completion, answer, want):
    assert exact_answer(["q"], [completion], answer=[answer]) == [want]


def test_exact_answer_reads_chat_completions_and_skips_missing_answers():
    chat = [[{"role": "assistant", "content": "it is 12"}], [{"role": "assistant", "content": "it is 12"}]]
    assert exact_answer([[{"role": "user", "content": "q"}]] * 2, chat, answer=["12", None]) == [1.0, None]
    with pytest.raises(ValueError, match="no 'answer' field"):
        exact_answer(["q"], ["1"])


def test_final_answer():
    assert final_answer("a 1 b 22 c") == "22"
    assert final_answer("\\boxed{7} then 9") == "7"
    assert final_answer("\\boxed{unclosed 5") == "5"
    assert final_answer("nothing") is None


def test_format_reward_searches_across_lines():
    fn = make_format_reward(r"^<think>.*</think>\s*<answer>.*</answer>$")
    comps = ["<think>a\nb</think>\n<answer>3</answer>", "<answer>3</answer>", "x <think></think><answer></answer>"]
    assert fn(["p"] * 3, comps) == [1.0, 0.0, 0.0]
    assert make_format_reward("answer")(["p"], ["the answer: 3"]) == [1.0]


@pytest.mark.parametrize("pattern,match", [("", "needs a regex"), ("(unclosed", "not a valid regular expression")])
def test_format_reward_refuses_a_bad_regex(pattern, match):
    with pytest.raises(UserError, match=match):
        make_format_reward(pattern)


# ---- loading -------------------------------------------------------------------------------------------


USER_MODULE = '''
def length_penalty(prompts, completions, completion_ids, **kwargs):
    return [-0.1 * len(ids) for ids in completion_ids]

def judges_even(prompts, completions, prompt_id, **kwargs):
    return [1.0 if p % 2 == 0 else None for p in prompt_id]

def boom(prompts, completions, answer, **kwargs):
    return [1.0 / int(a) for a in answer]

def short(prompts, completions, **kwargs):
    return [1.0]

def text(prompts, completions, **kwargs):
    return ["high"] * len(prompts)

not_a_function = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)  # found in the current directory, which is not on sys.path
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_load_builtins_and_user_functions(user_module, tmp_path):
    path_before = list(sys.path)
    fns = load_reward_functions("exact_answer, format,my_rewards:length_penalty", format_regex="x")
    assert [f.name for f in fns] == ["exact_answer", "format", "my_rewards:length_penalty"]
    assert fns[2].fn(prompts=["p"], completions=["c"], completion_ids=[[1, 2]]) == [pytest.approx(-0.2)]
    assert sys.path == path_before
    by_file = load_reward_functions([f"{tmp_path / 'my_rewards.py'}:judges_even"])
    assert by_file[0].fn(prompts=["p", "q"], completions=["c", "d"], prompt_id=[2, 3]) == [1.0, None]


@pytest.mark.parametrize("spec,match", [
    ("", "is empty"),
    ("exact", "neither a built-in reward"),
    ("no_such_module_xyz:f", "importing no_such_module_xyz"),
    ("my_rewards:missing", "has no function 'missing'"),
    ("my_rewards:not_a_function", "has no function 'not_a_function'"),
    ("missing_file.py:f", "reward file missing_file.py not found"),
    ("exact_answer,exact_answer", "twice"),
    ("format", "needs a regex"),
])
def test_load_errors(user_module, spec, match):
    with pytest.raises(UserError, match=match):
        load_reward_functions(spec)


# ---- score ---------------------------------------------------------------------------------------------------


def _batch(chat: bool = False):
    """2 prompts x G=3: prompt_id, answer and an extra column; completions and their ids."""
    recs = [{"prompt_id": 0, "prompt": "What is 2+3?", "answer": "5", "level": "easy"},
            {"prompt_id": 1, "prompt": "What is 10*3?", "answer": "30", "level": "hard"}]
    if chat:
        recs = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in recs]
    records = [recs[i // 3] for i in range(6)]
    completions = ["5", "It is 6", "\\boxed{5}", "thirty", "30.0", "3"]
    ids = [[5], [1, 2, 6], [9, 5, 9], [7], [3, 0, 0], [3]]
    return [r["prompt"] for r in records], completions, ids, records


def _trl_rewards(functions, prompts, completions, ids, records):
    """TRL's _calculate_rewards on a stand-in trainer (only the attributes it reads)."""
    from trl.data_utils import is_conversational
    from trl.trainer.grpo_trainer import GRPOTrainer

    if is_conversational({"prompt": prompts[0]}):
        completions = [[{"role": "assistant", "content": c}] for c in completions]
    fake = SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu"), is_main_process=True),
                           reward_funcs=[f.fn for f in functions], reward_func_names=[f.name for f in functions],
                           reward_processing_classes=[None] * len(functions), state=SimpleNamespace(global_step=0),
                           args=SimpleNamespace(report_to=[]), environments=None,
                           _log_completion_extra=lambda *a: None, _log_metric=lambda *a: None)
    import trl.trainer.grpo_trainer as g

    gather = g.gather
    g.gather = lambda t: t  # one process: accelerate's gather is the identity
    try:
        return GRPOTrainer._calculate_rewards(fake, records, prompts, completions, ids)
    finally:
        g.gather = gather


@pytest.mark.parametrize("chat", [False, True])
def test_score_equals_trl_and_passes_what_trl_passes(user_module, chat):
    seen: dict[str, list] = {"ours": [], "trl": []}

    def spy(prompts, completions, completion_ids, **fields):
        seen[spy.who].append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                  **{k: v for k, v in fields.items() if k not in ("trainer_state", "log_extra",
                                                                                  "log_metric")}))
        return [0.25 * len(c) if isinstance(c, str) else 0.5 for c in completions]

    fns = [*load_reward_functions("exact_answer,my_rewards:judges_even,my_rewards:length_penalty"),
           rewards.RewardFunction("spy", spy)]
    prompts, completions, ids, records = _batch(chat)
    weights = [1.0, 0.5, 2.0, -1.0]
    spy.who = "ours"
    total, per_function = score(fns, weights, prompts, completions, ids, records)
    spy.who = "trl"
    want = _trl_rewards(fns, prompts, completions, ids, records)
    torch.testing.assert_close(per_function, want, equal_nan=True, rtol=0, atol=0)
    want_total = (want * torch.tensor(weights).unsqueeze(0)).nansum(dim=1)
    torch.testing.assert_close(total, want_total, rtol=0, atol=0)
    assert seen["ours"] == seen["trl"]
    assert seen["ours"][0]["level"] == ["easy"] * 3 + ["hard"] * 3 and seen["ours"][0]["answer"][3] == "30"
    assert isinstance(seen["ours"][0]["completions"][0], list) == chat
    assert per_function[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert math.isnan(per_function[3, 1]) and per_function[0, 1] == 1.0  # odd prompt_id: not judged


def test_none_skips_a_function_and_unjudged_samples_total_nan(user_module):
    fns = load_reward_functions("my_rewards:judges_even")
    prompts, completions, ids, records = _batch()
    total, per_function = score(fns, [2.0], prompts, completions, ids, records)
    assert total[:3].tolist() == [2.0] * 3 and torch.isnan(total[3:]).all()
    both = load_reward_functions("my_rewards:judges_even,exact_answer")
    total, _ = score(both, [2.0, 1.0], prompts, completions, ids, records)
    assert total.tolist() == [3.0, 2.0, 3.0, 0.0, 1.0, 0.0]  # the second prompt: exact_answer alone


@pytest.mark.parametrize("spec,match", [
    ("my_rewards:boom", r"reward function 'my_rewards:boom' raised ZeroDivisionError on sample 3 \(prompt_id 1\)"),
    ("my_rewards:short", r"'my_rewards:short' returned 1 values for 6 samples"),
    ("my_rewards:text", r"'my_rewards:text' returned str 'high' for sample 0 \(prompt_id 0\)"),
])
def test_score_errors_name_the_function_and_the_sample(user_module, spec, match):
    prompts, completions, ids, records = _batch()
    records = [{**r, "answer": "0"} if r["prompt_id"] == 1 else r for r in records]
    with pytest.raises(UserError, match=match):
        score(load_reward_functions(spec), None, prompts, completions, ids, records)


def test_score_refuses_a_weight_count_that_does_not_match():
    prompts, completions, ids, records = _batch()
    with pytest.raises(UserError, match="2 weights for 1 reward functions"):
        score(load_reward_functions("exact_answer"), [1.0, 2.0], prompts, completions, ids, records)


def test_a_failing_reward_is_one_line_and_exit_2(user_module, tmp_path):
    script = textwrap.dedent("""
        from errors import run_cli
        import rewards
        def main():
            fns = rewards.load_reward_functions("my_rewards:boom")
            rewards.score(fns, None, ["p"], ["c"], [[1]], [{"answer": "0", "prompt_id": 7}])
        run_cli(main)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env=subprocess_env())  # the repo root on PYTHONPATH; my_rewards found in the cwd
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: reward function 'my_rewards:boom' raised ZeroDivisionError on "
                                             "sample 0 (prompt_id 7): float division by zero; fix the function or its "
                                             "inputs"]


DATACLASS_FILE = '''
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Judge:
    target: str


def numpy_scores(prompts, completions, answer, **kwargs):
    return [np.float32(Judge(a).target == c) for a, c in zip(answer, completions, strict=True)]
'''


def test_a_reward_file_with_dataclasses_loads_and_numpy_scores_count(tmp_path):
    file = tmp_path / "judge_rewards.py"
    file.write_text(DATACLASS_FILE)
    fns = load_reward_functions([f"{file}:numpy_scores"])
    totals, per_function = score(fns, None, ["p", "q"], ["5", "7"], [[1], [2]],
                                 [{"answer": "5", "prompt_id": 0}, {"answer": "6", "prompt_id": 1}])
    assert totals.tolist() == [1.0, 0.0] and per_function[:, 0].tolist() == [1.0, 0.0]
