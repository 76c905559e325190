"""TRAINING_STAGE=grpo: the settings, the keyed-noise rollouts, the objective's first update (ratio exactly 1),
gradient accumulation and DDP(2) against one process, resume (the same completions), LoRA with the KL term."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, make_parent, read_metrics, run_inprocess, subprocess_env, tiny_model, torchrun

import config
import generate
import load_rl_dataset
import objectives as obj
from errors import UserError

ID_REWARD = f"{ROOT / 'tests' / 'grpo_rewards.py'}:id_reward"
# a few seconds per step on the debug model: 2 prompts x 4 completions of at most 8 tokens
SMALL = dict(TRAINING_STAGE="grpo", GRPO_PROMPTS_PER_STEP=2, GRPO_NUM_GENERATIONS=4, GRPO_MAX_COMPLETION_LEN=8,
             MAX_SEQ_LEN=64, MAX_BATCH_SIZE=4, VALIDATE_EVERY_X_STEPS=0, LR_SCHEDULE="constant", WARMUP_STEPS=0,
             MAX_LR=1e-3, GRPO_REWARDS=ID_REWARD, SAVE_CHECKPOINTS="false")


@pytest.fixture(scope="module")
def rl(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo")
    assert load_rl_dataset.main(["--out", str(tmp / "rl")]) == 0
    return {"data": tmp / "rl", "parent": make_parent(tmp / "parent")}


def grpo_run(tmp: Path, rl: dict, *flags: str, **kw) -> list[dict]:
    kv = {**SMALL, "INIT_FROM": rl["parent"], "GRPO_DATA_PATH": rl["data"],
          "GRPO_SAVE_CHECKPOINTS_PATH": tmp / "ck", **kw}
    return run_inprocess(tmp, rl["data"], *flags, **kv)


def steps(metrics: list[dict]) -> dict[int, dict]:
    return {e["step"]: e for e in metrics if "loss" in e}


# ---- settings ---------------------------------------------------------------------------------------------


def grpo_cfg(**kv) -> config.Config:
    return config.load_config(None, {"TRAINING_STAGE": "grpo", **{k: str(v) for k, v in kv.items()}})


def test_settings_defaults_and_refusals():
    cfg = grpo_cfg()
    g = cfg.grpo
    # TRL 1.16's GRPOConfig defaults where it has one
    assert (g.grpo_num_generations, g.grpo_temperature, g.grpo_top_p, g.grpo_max_completion_len) == (8, 1.0, 1.0, 256)
    assert (g.grpo_loss_type, g.grpo_beta, g.grpo_epsilon, g.grpo_scale_rewards) == ("dapo", 0.0, 0.2, "group")
    assert g.grpo_num_iterations == 1
    # a step = the generation batch: prompts x G completions, in micro-batches of MAX_BATCH_SIZE per rank
    assert grpo_cfg(GRPO_PROMPTS_PER_STEP=4, GRPO_NUM_GENERATIONS=4, MAX_BATCH_SIZE=2).batch_geometry(2) == (16, 4)
    with pytest.raises(UserError, match="GRPO_PROMPTS_PER_STEP=3 must be a multiple of the world size 2"):
        grpo_cfg(GRPO_PROMPTS_PER_STEP=3).batch_geometry(2)
    for kv, msg in [({"GRPO_TEMPERATURE": 0}, "GRPO_TEMPERATURE=0.0"),
                    ({"GRPO_REWARD_WEIGHTS": "[1, 2]"}, "GRPO_REWARD_WEIGHTS has 2 weights"),
                    ({"GRPO_NUM_ITERATIONS": 2, "SAVE_EVERY_X_STEPS": 5}, "SAVE_EVERY_X_STEPS=5"),
                    ({"GRPO_NUM_ITERATIONS": 2, "SAVE_EVERY_X_STEPS": 4, "MAX_STEPS": 5}, "MAX_STEPS=5"),
                    ({"GRPO_LOSS_TYPE": "ppo"}, "GRPO_LOSS_TYPE"),
                    ({"MOE_NUM_EXPERTS": 4}, "Mixture-of-Experts"),
                    ({"USE_TORCH_COMPILE": "true"}, "USE_TORCH_COMPILE"),
                    ({"IS_MODEL_DISTILLATION": "true", "TEACHER_MODEL_CHECKPOINT": "x"}, "distillation")]:
        with pytest.raises(UserError, match=msg):
            grpo_cfg(**kv)


# ---- rollouts ---------------------------------------------------------------------------------------------


def test_rollout_noise_is_keyed_not_shared_by_the_batch():
    model = tiny_model(seed=0, std=0.2)
    prompts, keys = [[1, 5, 9], [2, 7], [3, 3, 3, 3, 3, 8]], [10, 11, 12]
    kw = dict(temperature=1.0, top_p=0.95, stop_ids=[4, 6], seed=1, step=3)
    batch = generate.rollout(model, prompts, keys, 3, 12, **kw)
    assert len(batch) == 9 and len({tuple(c) for c in batch}) == 9  # sampled, not greedy: all differ
    for i in range(3):  # each prompt alone gives its rows of the batch
        assert generate.rollout(model, [prompts[i]], [keys[i]], 3, 12, **kw) == batch[3 * i:3 * i + 3]
    assert generate.rollout(model, prompts[::-1], keys[::-1], 3, 12, **kw) == batch[6:] + batch[3:6] + batch[:3]
    # another step (or seed) draws other completions of the same prompt
    assert generate.rollout(model, [prompts[1]], [11], 3, 12, **{**kw, "step": 4}) != batch[3:6]
    # a completion ends with (and includes) its first stop id
    for c in batch:
        stops = [t for t in c if t in (4, 6)]
        assert stops == [] or (c[-1] in (4, 6) and len(stops) == 1)


def test_a_rollout_under_fsdp2_gathers_each_module_once_and_samples_the_unsharded_completions(tmp_path):
    """2 gloo ranks with different numbers of rows: each FSDP2 module (2 blocks + the root) all-gathers once
    for the whole 12-token rollout, not once per token; the completions are the unsharded model's; a training
    forward and backward afterwards gathers again as usual."""
    out = tmp_path / "gathers.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "rollout_gather_worker.py"), str(out)]
    env = {**subprocess_env(), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for rank in json.loads(out.read_text()):
        assert rank["gathers"] == 3 and rank["same"] and rank["after_training_gathers"] > 0, rank


def test_keyed_sampling_draws_the_filtered_distribution():
    """The inverse-CDF draw at keyed uniforms follows softmax(logits / T) (2000 keys, chi-square-like bound) and
    never picks a token outside the top-p nucleus."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -8.0]])
    s = generate.KeyedSampling(temperature=1.0, top_p=0.9, seed=0, step=0, keys=[(0, 0)])
    want = s.filtered(logits).softmax(-1)[0]
    counts = torch.zeros(5)
    for k in range(2000):
        s.keys, s.position = [(k, 0)], 0
        counts[s.pick(logits)] += 1
    assert counts[want == 0].sum() == 0
    assert torch.allclose(counts / 2000, want, atol=0.035)


# ---- the rollout source -----------------------------------------------------------------------------------


def test_generation_batches_name_the_same_prompts_on_any_world_size_and_resume_only_between_them():
    cfg = grpo_cfg(GRPO_PROMPTS_PER_STEP=4, GRPO_NUM_ITERATIONS=2, SAVE_EVERY_X_STEPS=2)
    objective = obj.build_objective(cfg)
    records = [{"prompt_id": i, "prompt": f"q{i}", "answer": str(i)} for i in range(10)]

    def source(rank, world):
        return obj.RolloutSource(objective, None, records, rank, world, accum=1)

    for k in range(6):  # 24 prompts: every epoch (10 prompts) a permutation of all of them
        one = source(0, 1).rank_records(k)
        assert source(0, 2).rank_records(k) + source(1, 2).rank_records(k) == one
        assert len(one) == 4
    stream = [r["prompt_id"] for k in range(5) for r in source(0, 1).rank_records(k)]
    assert sorted(stream[:10]) == sorted(stream[10:20]) == list(range(10)) and stream[:10] != stream[10:20]
    # the sampling keys are unique along the stream, also for a prompt met twice in one batch (epoch boundary)
    keys = [key for k in range(5) for _, key in source(0, 1).rank_prompts(k)]
    assert len(set(keys)) == 20 and keys[:10] == stream[:10]
    s = source(0, 1)
    assert s.samples_per_epoch == 10 * 8 * 2
    s.load_state_dict({"kind": "grpo", "consumed": 1})  # inside generation batch 0 (2 iterations of 1 micro-batch)
    with pytest.raises(UserError, match="inside a generation batch"):
        s.next_batch()
    with pytest.raises(UserError, match="not a GRPO one"):
        s.load_state_dict({"epoch": 0, "cursor": 3})


# ---- the objective ----------------------------------------------------------------------------------------


def test_ratio_is_exactly_one_at_the_first_update():
    """The old log-probs (a no-grad forward of the training model on the same micro-batch) equal the training
    forward's log-probs bit for bit, so the ratio is exactly 1 at the first update of a generation batch."""
    model = tiny_model(seed=0, std=0.2)
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, 4:] = ids[:, 4:]
    labels[1, 7:] = -100
    with torch.no_grad():
        old, _ = obj.token_logps(model, ids, labels, 0.7)
    new, _ = obj.token_logps(model, ids, labels, 0.7)
    assert new.requires_grad and torch.equal(old, new.detach())
    assert (old[labels == -100] == 0).all() and (old[labels != -100] < 0).all()
    # log-probs at the temperature: log_softmax(logits / T) of the next token
    logits = model(ids)[:, :-1].float() / 0.7
    want = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(new[:, 1:][labels[:, 1:] != -100], want[labels[:, 1:] != -100])


@pytest.mark.parametrize("iterations", [1, 2])
def test_short_run_writes_the_metrics_and_clips_nothing_at_the_first_update(tmp_path, rl, iterations, capsys):
    m = steps(grpo_run(tmp_path, rl, MAX_STEPS=2, GRPO_NUM_ITERATIONS=iterations,
                       GRPO_REWARDS=f"exact_answer,{ID_REWARD}", SAVE_EVERY_X_STEPS=2))
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  rollout | ")]
    assert len(shown) == 2 * (3 - iterations) and "What is" in shown[0] and "| reward " in shown[0]
    assert sorted(m) == [1, 2]
    first = m[1]
    for key in ("reward", "reward_exact_answer", "reward_id_reward", "reward_std", "frac_reward_zero_std",
                "completion_length", "clip_ratio", "entropy"):
        assert key in first and first[key] == first[key], key
    assert first["clip_ratio"] == 0.0  # ratio exactly 1 at the first update
    assert 0 < first["completion_length"] <= 8 and 0 <= first["frac_reward_zero_std"] <= 1
    assert first["reward"] == pytest.approx(first["reward_exact_answer"] + first["reward_id_reward"])
    assert first["grad_norm"] > 0
    if iterations == 2:  # the second step reuses the first's completions: the same generation statistics
        assert {k: m[2][k] for k in ("reward", "completion_length")} == \
            {k: first[k] for k in ("reward", "completion_length")}


# ---- injected rollouts: accumulation, resume ---------------------------------------------------------------


def fake_rollout(model, prompt_ids, prompt_keys, num_generations, max_new_tokens, **kw):
    """Completions fixed by (prompt key, sample index, step), of 2..6 tokens: the model does not sample them."""
    step = kw["step"]
    return [[(k * 7 + j * 3 + t + step) % 50 + 10 for t in range(2 + (k + j + step) % 5)][:max_new_tokens]
            for k in prompt_keys for j in range(num_generations)]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_accumulation_gives_the_single_micro_batch_step(tmp_path, rl, monkeypatch, loss_type):
    monkeypatch.setattr(generate, "rollout", fake_rollout)
    runs = {mb: steps(grpo_run(tmp_path / str(mb), rl, MAX_STEPS=2, MAX_BATCH_SIZE=mb, GRPO_LOSS_TYPE=loss_type))
            for mb in (8, 4)}
    for s in (1, 2):
        one, two = runs[8][s], runs[4][s]
        assert one["grad_norm"] > 0
        assert two["loss"] == pytest.approx(one["loss"], abs=1e-6)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
        assert (two["reward"], two["completion_length"]) == pytest.approx((one["reward"], one["completion_length"]))


def test_resume_samples_the_same_completions(tmp_path, rl, monkeypatch):
    seen: dict[str, list] = {}

    def recording(tag):
        def rollout(model, prompt_ids, prompt_keys, *args, **kw):
            out = real(model, prompt_ids, prompt_keys, *args, **kw)
            seen.setdefault(tag, []).append((kw["step"], list(prompt_keys), out))
            return out
        return rollout

    real = generate.rollout
    kw = dict(MAX_STEPS=4, SAVE_CHECKPOINTS="true", SAVE_EVERY_X_STEPS=2)
    monkeypatch.setattr(generate, "rollout", recording("whole"))
    whole = steps(grpo_run(tmp_path / "a", rl, **kw))
    monkeypatch.setattr(generate, "rollout", recording("resumed"))
    resumed = steps(grpo_run(tmp_path / "b", rl, f"--grpo_checkpoint={tmp_path / 'a' / 'ck' / 'grpo' / 'step_0000002'}",
                             **kw))
    assert sorted(resumed) == [3, 4]
    assert [s for s, _, _ in seen["resumed"]] == [2, 3]  # generation batches 2 and 3 (steps 3 and 4)
    assert seen["resumed"] == seen["whole"][2:]
    for s in (3, 4):
        assert resumed[s]["loss"] == pytest.approx(whole[s]["loss"], abs=1e-6)
        assert resumed[s]["grad_norm"] == pytest.approx(whole[s]["grad_norm"], rel=1e-5)


def test_a_stop_during_generation_checkpoints_the_last_step_and_resumes_with_the_same_completions(
        tmp_path, rl, monkeypatch):
    """A stop request that arrives while generation batch 2 is sampled (the loop's stop check runs before every
    token) abandons it: exit 75 with the checkpoint of step 2; run again, the run samples generation batches 2
    and 3 exactly as an uninterrupted run did, and trains the same steps."""
    from helpers import settings

    import train
    from run_control import RESUMABLE_EXIT, StopRequested

    real, seen = generate.rollout, {}

    def recording(tag, stop_at=None):
        def rollout(model, prompt_ids, prompt_keys, *args, **kw):
            if kw["step"] == stop_at:
                calls = []

                def check():
                    calls.append(1)
                    if len(calls) > 3:
                        raise StopRequested("stop requested during generation")
                kw = {**kw, "stop_check": check}
            out = real(model, prompt_ids, prompt_keys, *args, **kw)
            seen.setdefault(tag, []).append((kw["step"], list(prompt_keys), out))
            return out
        return rollout

    kw = dict(MAX_STEPS=4, SAVE_CHECKPOINTS="true", SAVE_EVERY_X_STEPS=100)
    monkeypatch.setattr(generate, "rollout", recording("whole"))
    whole = steps(grpo_run(tmp_path / "a", rl, **kw))
    b = {**SMALL, "INIT_FROM": rl["parent"], "GRPO_DATA_PATH": rl["data"],
         "GRPO_SAVE_CHECKPOINTS_PATH": tmp_path / "b" / "ck", **kw}
    monkeypatch.setattr(generate, "rollout", recording("b", stop_at=2))
    assert train.main(settings(tmp_path / "b", rl["data"], **b)) == RESUMABLE_EXIT
    assert (tmp_path / "b" / "ck" / "grpo" / "step_0000002").is_dir()
    monkeypatch.setattr(generate, "rollout", recording("b"))
    resumed = steps(grpo_run(tmp_path / "b", rl, **kw))
    assert [s for s, _, _ in seen["b"]] == [0, 1, 2, 3]
    assert seen["b"] == seen["whole"]
    for s in (3, 4):
        assert resumed[s]["loss"] == pytest.approx(whole[s]["loss"], abs=1e-6)
        assert resumed[s]["grad_norm"] == pytest.approx(whole[s]["grad_norm"], rel=1e-5)


def test_lora_with_the_kl_to_the_adapters_off_reference(tmp_path, rl):
    m = steps(grpo_run(tmp_path, rl, MAX_STEPS=2, LORA_ENABLED="true", LORA_DROPOUT=0.0, GRPO_BETA=0.1,
                       MAX_LR=1e-2))
    # the adapters start at zero: the policy is its reference at step 1, and moves away from it after
    assert m[1]["kl"] == 0.0 and m[2]["kl"] > 0.0
    assert m[1]["grad_norm"] > 0


# ---- DDP --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True])
def test_two_ranks_equal_one_process(tmp_path, rl, fsdp):
    """DDP and FSDP2 with real rollouts: each rank samples its share of the prompts with the keyed noise (the
    ranks decode until all are done), so the completions, the group statistics (rewards summed over ranks), the
    dapo token count and the update are one process's."""
    kv = {**SMALL, "INIT_FROM": rl["parent"], "GRPO_DATA_PATH": rl["data"], "MAX_STEPS": 2,
          "GRPO_PROMPTS_PER_STEP": 4, "MAX_BATCH_SIZE": 2, "GRPO_SCALE_REWARDS": "batch"}
    one = steps(run_inprocess(tmp_path / "one", rl["data"], **kv, GRPO_SAVE_CHECKPOINTS_PATH=tmp_path / "one" / "ck"))
    (tmp_path / "two").mkdir()
    torchrun(tmp_path / "two", rl["data"], 2, **kv, USE_FSDP=str(fsdp).lower(),
             GRPO_SAVE_CHECKPOINTS_PATH=tmp_path / "two" / "ck")
    two = steps(read_metrics(tmp_path / "two" / "run"))
    for s in (1, 2):
        assert one[s]["grad_norm"] > 0
        for k in ("reward", "reward_std", "completion_length", "frac_reward_zero_std"):
            assert two[s][k] == pytest.approx(one[s][k], abs=1e-6), (s, k)
        assert two[s]["loss"] == pytest.approx(one[s]["loss"], abs=1e-5)
        assert two[s]["grad_norm"] == pytest.approx(one[s]["grad_norm"], rel=1e-4)


# ---- learning -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_small_model_learns_a_prompt_dependent_reward_and_the_control_stays_flat(tmp_path, rl, monkeypatch):
    """16 prompts, each asking for a first completion token congruent to its index mod 4 (residue_reward): about
    1 in 4 at the start. GRPO raises the mean reward of the last 10 of 40 steps well above the first 10; the same
    run with the advantages zeroed (no policy gradient, the same prompts and keyed noise) stays where it began.
    The prompts end in different tokens (prompts that share their last token but want other residues, as "item 1"
    and "item 11" would, leave a random-init model little to tell them apart by), and groups of 16 completions
    keep the gradient's noise low: over seeds 1-3 on the native and AVX2 profiles the gain was 0.18-0.46."""
    prompts = ["The cat", "A dog", "My house", "Your car", "One tree", "Big river", "Old man", "New book",
               "Red apple", "Blue sky", "Hot tea", "Cold water", "Fast train", "Slow boat", "Green grass", "White snow"]
    src = tmp_path / "tasks.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "target": i % 4}) + "\n" for i, p in enumerate(prompts)))
    assert load_rl_dataset.main(["--dataset", str(src), "--out", str(tmp_path / "rl"), "--val-fraction", "0"]) == 0
    kv = dict(TRAINING_STAGE="grpo", INIT_FROM=rl["parent"], GRPO_DATA_PATH=tmp_path / "rl",
              SAVE_CHECKPOINTS="false", GRPO_PROMPTS_PER_STEP=8, GRPO_NUM_GENERATIONS=16, GRPO_MAX_COMPLETION_LEN=1,
              MAX_SEQ_LEN=32, MAX_BATCH_SIZE=128, VALIDATE_EVERY_X_STEPS=0, LR_SCHEDULE="constant", WARMUP_STEPS=0,
              MAX_LR=2e-2, MAX_STEPS=40, GRPO_REWARDS=f"{ROOT / 'tests' / 'grpo_rewards.py'}:residue_reward")

    def curve(tag: str) -> tuple[float, float]:
        r = [e["reward"] for e in run_inprocess(tmp_path / tag, tmp_path / "rl", **kv,
                                                GRPO_SAVE_CHECKPOINTS_PATH=tmp_path / tag / "ck") if "reward" in e]
        assert len(r) == 40
        return sum(r[:10]) / 10, sum(r[-10:]) / 10

    first, last = curve("learn")
    assert 0.05 <= first <= 0.5
    assert last >= first + 0.1, (first, last)
    real = obj.group_advantages
    monkeypatch.setattr(obj, "group_advantages", lambda r, g, scale: (lambda a: (torch.zeros_like(a[0]), *a[1:]))(
        real(r, g, scale)))
    c_first, c_last = curve("control")
    assert abs(c_last - c_first) < 0.08, (c_first, c_last)
