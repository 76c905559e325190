"""Post-training end to end: chat data -> shards -> loader -> objective -> backward (the SFT mask reaches the
gradient), DPO learns the embedded preference set, and the pretrain -> SFT -> DPO chain through train.py."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import data_preparation_utils as dpu
import dataloaders
import objectives as obj
import tokenizer as tk
from load_instruct_dataset import SFTEncoder
from model import ModelArgs, Transformer

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
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=16,
                              max_seq_len=T, rope_theta=10000.0))
    m.init_weights()
    return m


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
                    assert got[-1] == tok.eot_id  # the end-of-turn token IS trained (the seed's bug)
                    seen += 1
        model.zero_grad(set_to_none=True)
    assert seen >= len(CHATS)
