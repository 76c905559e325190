"""The evaluation and sampling hooks of the training loop under FSDP2 (2 gloo processes on CPU) give what one
process gives: losses, validation loss, HellaSwag accuracy and the greedy samples, dense and with LoRA."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, TOKENIZER, make_pretrain_data, read_metrics, run_inprocess, torchrun

HOOKS = dict(MAX_STEPS=4, VALIDATE_EVERY_X_STEPS=2, GENERATE_EVERY_X_STEPS=2, MAX_TEST_GEN_LEN=6,
             HELLASWAG_EVERY_X_STEPS=2, HELLASWAG_PATH=ROOT / "tests" / "fixtures" / "hellaswag_golden.jsonl",
             HELLASWAG_NUMBER_OF_EXAMPLES=4, SAVE_CHECKPOINTS="false", MAX_LR=1e-2)
# dropout off: each rank draws its own dropout masks, so with dropout the two runs differ (as they should)
LORA = dict(LORA_ENABLED="true", LORA_RANK=4, LORA_ALPHA=8, LORA_DROPOUT=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_pretrain_data(tmp_path_factory.mktemp("hooks_data") / "pretrain")


def _samples(stdout: str) -> list[str]:
    return re.findall(r"^\s*sample \| .*$", stdout, flags=re.M)


def _events(run_dir) -> dict[tuple[int, str], float]:
    return {(e["step"], k): v for e in read_metrics(run_dir) for k, v in e.items()
            if k in ("loss", "val_loss", "hellaswag_acc", "hellaswag_acc_norm")}


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["dense", "lora"])
def test_fsdp2_hooks_match_one_process(tmp_path, data, capsys, lora):
    kw = {**HOOKS, **(LORA if lora else {})}
    # a validation batch is MAX_BATCH_SIZE rows per rank: one process takes twice the batches for the same rows
    run_inprocess(tmp_path / "one", data, VAL_STEPS=4, **kw)
    one_out = capsys.readouterr().out
    (tmp_path / "two").mkdir()
    two_out = torchrun(tmp_path / "two", data, 2, USE_FSDP="true", VAL_STEPS=2, **kw).stdout
    one, two = _events(tmp_path / "one" / "run"), _events(tmp_path / "two" / "run")
    assert sorted(one) == sorted(two)
    assert {k for _, k in one} == {"loss", "val_loss", "hellaswag_acc", "hellaswag_acc_norm"}
    for key, value in one.items():
        assert two[key] == pytest.approx(value, abs=1e-4), key
    samples = _samples(one_out)
    assert len(samples) == 2 * 3  # the three pretrain prompts of test_prompts.json, at steps 2 and 4
    assert _samples(two_out) == samples


def test_sampling_in_training_runs_under_the_run_autocast_without_fused_copies(monkeypatch):
    import config
    import precision
    import tokenizer
    import train
    from model import Transformer

    cfg = config.load_config(str(ROOT / "configs" / "debug.env"), {"TEST_PROMPTS_FILE": str(ROOT / "test_prompts.json"),
                             "MAX_TEST_GEN_LEN": "3"}, use_environ=False)
    tok = tokenizer.load_tokenizer(TOKENIZER)
    model = Transformer(cfg.model_args(tok.vocab_size))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    seen = []
    setup_caches = Transformer.setup_caches

    def spy(self, *args, **kw):
        seen.append((torch.is_autocast_enabled("cpu"), kw.get("dtype"), kw.get("fuse_projections")))
        return setup_caches(self, *args, **kw)

    monkeypatch.setattr(Transformer, "setup_caches", spy)
    lines: list[str] = []
    train.sample_prompts(model, tok, cfg, SimpleNamespace(print=lines.append),
                         autocast=lambda: precision.autocast("cpu", torch.bfloat16))
    assert seen == [(True, torch.bfloat16, False)]  # bf16 compute and KV cache, no wq|wk|wv or w1|w3 copies
    assert len(lines) == 3 and all("sample |" in line for line in lines)
    assert all(b.attention.wqkv is None and b.feed_forward.w13 is None and b.attention.cache is None
               for b in model.layers)


@pytest.mark.slow
def test_evaluation_and_sampling_never_recompile_the_training_blocks(tmp_path, data, monkeypatch):
    """USE_TORCH_COMPILE compiles each block for the training step: train -> validate -> sample -> HellaSwag ->
    train compiles no graph after the first step (a no_grad, inference-mode, KV-cache or one-token variant of the
    blocks' frame would be one, up to torch's recompile limit)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import train

    torch._dynamo.reset()
    graphs_after: dict[int, int] = {}
    optimizer_step = train.optimizer_step

    def counting_step(run, spikes):
        result = optimizer_step(run, spikes)
        graphs_after[run.state.step] = counters["stats"]["unique_graphs"]
        return result

    monkeypatch.setattr(train, "optimizer_step", counting_step)
    start = counters["stats"]["unique_graphs"]
    m = run_inprocess(tmp_path, data, USE_TORCH_COMPILE="true", **{**HOOKS, "MAX_STEPS": 3})
    assert {e["step"] for e in m if "val_loss" in e} == {2, 3}  # the hooks ran between the steps
    assert {e["step"] for e in m if "hellaswag_acc" in e} == {2, 3}
    assert graphs_after[1] > start  # the blocks were compiled
    assert graphs_after[3] == graphs_after[1] == counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_each_rank_resumes_its_own_random_streams_and_draws_its_own_dropout(tmp_path, data):
    """2 FSDP2 ranks with LoRA dropout: each rank checkpoints its own streams (torch CPU, Python, NumPy) and
    gets them back on resume, and the ranks' dropout masks differ."""
    worker = ROOT / "tests" / "rank_rng_worker.py"
    kw = dict(USE_FSDP="true", MAX_STEPS=2, VALIDATE_EVERY_X_STEPS=0, **{**LORA, "LORA_DROPOUT": 0.5})
    torchrun(tmp_path, data, 2, "--worker-out", str(tmp_path / "fresh"), script=worker, **kw)
    step = tmp_path / "ck" / "pretrain" / "step_0000000"
    state = json.loads((step / "trainer_state.json").read_text())
    assert len(state["rng_ranks"]) == 2
    torchrun(tmp_path, data, 2, "--worker-out", str(tmp_path / "resumed"), "--pretrain_checkpoint", str(step),
             script=worker, **kw)
    fresh, resumed = ([json.loads((tmp_path / d / f"rank{r}.json").read_text()) for r in (0, 1)]
                      for d in ("fresh", "resumed"))
    assert [r["step"] for r in resumed] == [0, 0]
    assert fresh[0]["next"] != fresh[1]["next"]
    for r in (0, 1):
        assert resumed[r]["next"] == fresh[r]["next"], r
    assert fresh[0]["mask"] != fresh[1]["mask"]
    assert 0 < sum(fresh[0]["mask"]) < 256
