"""WinoGrande partial scoring: rendering as lm-evaluation-harness does it, scores equal to hand-computed
log-likelihoods of a bigram model (independent of the scorer's batching, padding and offsets), batch sizes
agree, bad records fail naming file:line, and the training loop logs it."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import TOKENIZER, run_inprocess

import evaluation
import tokenizer as tk
import winogrande_utils as wg
from errors import UserError

RECORDS = [
    {"sentence": "The trophy doesn't fit into the brown suitcase because the _ is too large.",
     "option1": "trophy", "option2": "suitcase", "answer": "1"},
    {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
     "option1": "Sarah", "option2": "Maria", "answer": "1"},
    {"sentence": "The city councilmen refused the demonstrators a permit because _ feared violence.",
     "option1": "the councilmen", "option2": "the demonstrators", "answer": "2"},
    {"sentence": "_ poured water from the bottle into the cup until it was full.",
     "option1": "Anna", "option2": "The cup", "answer": "2"},
    {"sentence": "The fish ate the worm because the _ was hungry.", "option1": "fish", "option2": "worm",
     "answer": "1"},
]


def test_render_splits_at_the_blank_as_lm_eval_does():
    it = wg.render(RECORDS[0])
    assert it.contexts == ("The trophy doesn't fit into the brown suitcase because the trophy",
                           "The trophy doesn't fit into the brown suitcase because the suitcase")
    assert it.continuation == " is too large." and it.label == 0
    it = wg.render(RECORDS[3])  # blank first: the option starts the sentence
    assert it.contexts == ("Anna", "The cup") and it.continuation == " poured water from the bottle into the cup until it was full."
    assert it.label == 1


class Bigram(torch.nn.Module):
    """logits[t] = table[token t]: log p(next | prefix) depends on the previous token only."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)) * 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens]


def _by_hand(model: Bigram, tok, item: wg.Item) -> list[float]:
    logp = torch.log_softmax(model.table.double(), -1)
    out = []
    for ctx_text in item.contexts:
        ctx, cont = evaluation.encode_pair(tok, ctx_text, item.continuation, add_bos=False)
        prev, total = ctx[-1], 0.0
        for t in cont:
            total += logp[prev, t].item()
            prev = t
        out.append(total)
    return out


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_scores_equal_hand_computed_bigram_log_likelihoods(batch_size):
    tok = tk.load_tokenizer(TOKENIZER)
    model = Bigram(tok.vocab_size)
    items = [wg.render(r) for r in RECORDS]
    want = [_by_hand(model, tok, it) for it in items]
    for it, lls in zip(items, want, strict=True):
        pairs = [evaluation.encode_pair(tok, c, it.continuation, False) for c in it.contexts]
        got = evaluation.score_pairs(model, pairs, torch.device("cpu"), None, 0)
        assert got == pytest.approx(lls, abs=1e-4)
    # labels set from the hand-computed winners, wrong on purpose for items 1 and 3: acc must be exactly 3/5
    for i, (it, lls) in enumerate(zip(items, want, strict=True)):
        winner = 0 if lls[0] >= lls[1] else 1
        it.label = winner if i % 2 == 0 else 1 - winner
    res = wg.evaluate(model, tok, items, batch_size=batch_size, add_bos=False)
    assert res == {"acc": 3 / 5, "n": len(items)}


def test_bad_records_fail_naming_file_and_line(tmp_path):
    for bad, needle in [({"sentence": "no blank here", "option1": "a", "option2": "b", "answer": "1"}, "one blank"),
                        ({"sentence": "a _ b", "option1": "a", "option2": "b", "answer": "3"}, "answer is '3'"),
                        ({"sentence": "a _ b", "option1": "a"}, "missing field(s) option2, answer")]:
        p = tmp_path / "w.jsonl"
        p.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(UserError, match=re.escape(f"{p}:2: ") + ".*" + re.escape(needle)):
            wg.load_items(p)
    with pytest.raises(UserError, match="does not exist"):
        wg.load_items(tmp_path / "missing.jsonl")


def test_training_loop_logs_winogrande(tmp_path, pretrain_data):
    path = tmp_path / "wg.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    m = run_inprocess(tmp_path, pretrain_data, MAX_STEPS=2, VALIDATE_EVERY_X_STEPS=0, SAVE_EVERY_X_STEPS=0,
                      WINOGRANDE_EVERY_X_STEPS=2, WINOGRANDE_PATH=str(path), WINOGRANDE_NUMBER_OF_EXAMPLES=4)
    rows = [e for e in m if "winogrande_acc" in e]
    assert [e["step"] for e in rows] == [2] and rows[0]["winogrande_acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)
