"""TRIM_PADDING: one-example-per-row batches (padded SFT, DPO) are cut to their longest row and each step's
samples are length-sorted into micro-batches; the step holds the same samples and the loss is unchanged."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import config
import data_preparation_utils as dpu
import dataloaders as dl
import demo_data
import load_dpo_dataset as ldpo
import load_instruct_dataset as lid
import objectives
import tokenizer
from losses import IGNORE_INDEX
from model import Transformer

ROOT = Path(__file__).resolve().parent.parent
T, B, G = 256, 2, 8


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load_tokenizer(ROOT / "tokenizer.model")


@pytest.fixture(scope="module")
def data(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("trim")
    kw = dict(tokenizer_identity=tok.identity(), source="test", seed=1, val_fraction=0.2, progress=False)
    dpu.prepare("sft", demo_data.demo_instruct_set(300, modules=False), root / "sft", lid.SFTEncoder(tok, "", 0, T),
                shard_size=2000, **kw)
    dpu.prepare("dpo", demo_data.demo_preference_set(300, modules=False), root / "dpo", ldpo.DPOEncoder(tok, "", T),
                shard_size=3000, **kw)
    return root


def loader(data, tok, kind, trim):
    return dl.build_loader(kind, data / kind, "train", seq_len=T, micro_batch=B, global_batch=G, rank=0,
                           world_size=1, seed=3, pad_id=tok.pad_id, tokenizer_identity=tok.identity(), trim=trim)


def rows_by_sample(batch: dict, keys: list[str]) -> dict[int, list[list[int]]]:
    return {int(i): [batch[k][r].tolist() for k in keys] for r, i in enumerate(batch["sample_index"])}


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_trimmed_steps_hold_the_same_samples_cut_to_their_longest_row(data, tok, kind):
    keys = ["input_ids", "labels"] if kind == "sft" else ["chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                                          "rejected_labels"]
    full, trimmed = loader(data, tok, kind, False), loader(data, tok, kind, True)
    narrower = 0
    for _ in range(3):  # optimizer steps
        want: dict[int, list[list[int]]] = {}
        got: dict[int, list[list[int]]] = {}
        longest = []
        for _ in range(G // B):
            want.update(rows_by_sample(full.next_batch(), keys))
            b = trimmed.next_batch()
            width = b[keys[0]].shape[1]
            assert width == T or width % dl.TRIM_MULTIPLE == 0
            narrower += width < T
            got.update(rows_by_sample(b, keys))
            ends = [max((j for j, y in enumerate(b[k][r].tolist()) if y != IGNORE_INDEX), default=0)
                    for r in range(B) for k in keys[1::2]]
            longest.append(max(ends))
        assert sorted(got) == sorted(want)  # the same samples in the step
        for i, rows in got.items():
            for n, (cut, whole) in enumerate(zip(rows, want[i], strict=True)):
                assert cut == whole[:len(cut)]
                if n % 2:  # labels: nothing trained was cut
                    assert set(whole[len(cut):]) <= {IGNORE_INDEX}
        assert longest == sorted(longest)  # micro-batches in length order
    assert narrower > 0


def test_trimmed_batch_gives_the_same_loss_and_gradients(data, tok):
    cfg = config.load_config(None, {"MODEL_PRESET": "debug", "TRAINING_STAGE": "dpo"}, use_environ=False)
    torch.manual_seed(0)
    model = Transformer(cfg.model_args(tok.vocab_size))
    for kind, objective in (("sft", objectives.SupervisedFineTuning(cfg)),
                            ("dpo", objectives.DirectPreferenceOptimization(cfg))):
        objective.setup(model, tok, torch.device("cpu"))
        batch = loader(data, tok, kind, True).next_batch()
        full = loader(data, tok, kind, False)
        by_index = {}
        for _ in range(G // B):
            fb = full.next_batch()
            for r, i in enumerate(fb["sample_index"].tolist()):
                by_index[i] = {k: v[r] for k, v in fb.items()}
        wide = {k: torch.stack([by_index[i][k] for i in batch["sample_index"].tolist()]) for k in batch}
        assert wide[next(iter(batch))].shape[1] > batch[next(iter(batch))].shape[1]
        results = []
        for b in (batch, wide):
            model.zero_grad()
            loss, _ = objective.loss(model, b)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
        for g1, g2 in zip(results[0][1], results[1][1], strict=True):
            torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


# ---- what a trimmed micro-batch costs (objectives.Objective.work) ------------------------------------------


def counted_flops(objective, model, batch) -> int:
    """FLOPs torch's FlopCounterMode sees in one loss step (forward + backward), with SDPA's math kernel so the
    attention matmuls are visible to it."""
    from helpers import flop_counter
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model.zero_grad()
    with flop_counter() as counter, sdpa_kernel(SDPBackend.MATH):
        loss, _ = objective.loss(model, batch)
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["instruct", "dpo", "orpo", "instruct+distill"])
def test_work_of_a_trimmed_batch_is_what_torch_counts(data, tok, name):
    """positions = the trimmed B x T fed to the model (2B x T for pairs), loss tokens = targets, and FLOPs equal
    torch's count of the loss step: attention at the batch's own width, the head on every position, the
    frozen teacher's / reference's forward included. Model FLOPs leave recomputation out: the per-row fused
    head of the preference losses recomputes its logits in backward (2 V d per position), which torch sees."""
    stage = name.split("+")[0]
    kind = {"instruct": "sft", "dpo": "dpo", "orpo": "dpo"}[stage]
    cfg = config.load_config(None, {"MODEL_PRESET": "debug", "TRAINING_STAGE": "dpo" if kind == "dpo" else stage,
                                    "PREFERENCE_OBJECTIVE": stage if kind == "dpo" else "dpo",
                                    "IS_MODEL_DISTILLATION": str(name.endswith("distill")).lower(),
                                    "TEACHER_MODEL_CHECKPOINT": "in-memory", "TEACHER_PRECISION": "fp32"},
                             use_environ=False)
    torch.manual_seed(0)
    args = cfg.model_args(tok.vocab_size)
    args.max_seq_len = T
    model = Transformer(args)
    objective = objectives.build_objective(cfg)
    if name.endswith("distill"):  # a teacher of another size: its own FLOPs per position
        objective.teacher = Transformer(replace(args, dim=32, n_layers=1, n_heads=2, n_kv_heads=1))
    objective.setup(model, tok, torch.device("cpu"))
    batch = loader(data, tok, kind, True).next_batch()
    ids = [batch[k] for k in ("input_ids", "chosen_input_ids", "rejected_input_ids") if k in batch]
    labels = [batch[k] for k in ("labels", "chosen_labels", "rejected_labels") if k in batch]
    width = ids[0].shape[1]
    assert width < T  # trimmed: a count at MAX_SEQ_LEN would be wrong
    work = objective.work(batch, args)
    assert work.positions == sum(x.numel() for x in ids)
    assert work.loss_tokens == sum(int((y != IGNORE_INDEX).sum()) for y in labels)
    recomputed = 2 * args.vocab_size * args.dim * work.positions if kind == "dpo" else 0
    assert work.flops + recomputed == counted_flops(objective, model, batch)
    frozen = objective.frozen_flops(batch)
    assert (frozen > 0) == (name in ("dpo", "instruct+distill"))


@pytest.mark.slow
def test_logged_throughput_and_mfu_follow_the_trimmed_batches(data, tok, tmp_path, monkeypatch, capsys):
    """A short-row SFT run with MAX_SEQ_LEN far above the rows: metrics.jsonl's positions are the B x T the
    model was fed (recorded at its forward), loss tokens are the targets, and the MFU numerator is the FLOPs
    torch counts in those passes; so MFU against the peak used stays below 1 (a count at MAX_SEQ_LEN puts it
    far above)."""
    from helpers import flop_counter, make_parent, read_metrics, settings
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import model
    import precision
    import train

    fed: list[tuple[int, int]] = []
    targets: list[int] = []
    forward = model.Transformer.forward

    def recording_forward(self, tokens, *args, **kw):
        if self.training and torch.is_grad_enabled():
            fed.append(tuple(tokens.shape))
        return forward(self, tokens, *args, **kw)

    next_batch = dl.Loader.next_batch

    def recording_next_batch(self):  # the training loader draws each micro-batch once (no validation here)
        batch = next_batch(self)
        targets.append(int((batch["labels"] != IGNORE_INDEX).sum()))
        return batch

    monkeypatch.setattr(model.Transformer, "forward", recording_forward)
    monkeypatch.setattr(dl.Loader, "next_batch", recording_next_batch)
    max_len, steps, accum = 4096, 3, 4
    peak, _ = precision.peak_flops("cpu", "fp32")  # measured (and cached) outside the FLOP counter
    parent = make_parent(tmp_path / "parent")
    argv = settings(tmp_path, data, TRAINING_STAGE="instruct", INSTRUCT_DATALOADER_ROOT_PATH=data / "sft", INIT_FROM=parent,
                    INSTRUCT_SAVE_CHECKPOINTS_PATH=tmp_path / "ck", MAX_SEQ_LEN=max_len,
                    TOTAL_BATCH_SIZE=max_len * B * accum, MAX_BATCH_SIZE=B, MAX_STEPS=steps, LOG_EVERY_X_STEPS=1,
                    VALIDATE_EVERY_X_STEPS=0, SAVE_CHECKPOINTS="false", TRIM_PADDING="true")
    with flop_counter() as counter, sdpa_kernel(SDPBackend.MATH):
        assert train.main(argv) == 0
    rows = [e for e in read_metrics(tmp_path / "run") if "loss" in e]
    assert len(rows) == steps and len(fed) == len(targets) == steps * accum
    assert all(t < max_len for _, t in fed)
    for n, e in enumerate(rows):
        dt = e["dt_ms"] / 1000
        step = slice(n * accum, (n + 1) * accum)
        assert e["tokens_per_s"] * dt == pytest.approx(sum(b * t for b, t in fed[step]), rel=1e-9)
        assert e["loss_tokens_per_s"] * dt == pytest.approx(sum(targets[step]), rel=1e-9)
        assert 0 < e["mfu"] <= 1.0
    assert rows[-1]["tokens"] == sum(b * t for b, t in fed)
    assert rows[-1]["loss_tokens"] == sum(targets)
    computed = sum(e["mfu"] * peak * e["dt_ms"] / 1000 for e in rows)
    assert computed == pytest.approx(counter.get_total_flops(), rel=1e-6)
    done = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("done:"))
    assert f"{sum(b * t for b, t in fed):,} positions computed" in done and f"{sum(targets):,} loss tokens" in done
