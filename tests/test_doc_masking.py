"""Document masking in pretraining (PRETRAIN_DOC_MASKING): documents are numbered from their BOS, each window's
loss equals the loss of its documents forwarded one by one (RoPE positions restarted or not), and train.py
trains with it."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TOKENIZER, run_inprocess, train_losses

import config
import dataloaders
import objectives as obj
import tokenizer as tk
from losses import cross_entropy_sum
from model import Transformer


def test_document_ids_start_at_each_bos():
    bos, eos = 1, 2
    ids = torch.tensor([[5, 7, eos, bos, 9, 9, eos, bos, 3],
                        [bos, 4, eos, bos, eos, bos, 6, 6, 6]])
    assert dataloaders.document_ids(ids, bos, eos).tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2],
                                                                [1, 1, 1, 2, 2, 3, 3, 3, 3]]
    # one id for both: a document ends with it and the next one begins with it, so only the second of a pair starts
    x = 0
    ids = torch.tensor([[x, 4, 5, x, x, 6, x, x, 8]])
    assert dataloaders.document_ids(ids, x, x).tolist() == [[1, 1, 1, 1, 2, 2, 2, 3, 3]]


def _loader(data, split="train", **kw):
    tok = tk.load_tokenizer(TOKENIZER)
    return dataloaders.build_loader("pretrain", data, split, seq_len=64, micro_batch=4, global_batch=4, rank=0,
                                    world_size=1, seed=3, pad_id=tok.pad_id, **kw), tok


def test_loader_numbers_documents_without_changing_the_windows(pretrain_data):
    plain, tok = _loader(pretrain_data)
    masked, _ = _loader(pretrain_data, doc_delimiters=(tok.bos_id, tok.eos_id))
    window, _ = _loader(pretrain_data, doc_delimiters=(tok.bos_id, tok.eos_id), reset_positions=False)
    a, b, c = plain.next_batch(), masked.next_batch(), window.next_batch()
    assert "doc_ids" not in a and "positions" not in b
    for k in ("input_ids", "labels", "sample_index"):
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])
    ids = b["input_ids"]
    for row, docs in zip(ids.tolist(), b["doc_ids"].tolist(), strict=True):  # a new number exactly at each BOS
        assert [d - p for p, d in zip([docs[0]] + docs[:-1], docs, strict=True)][1:] == \
            [int(t == tok.bos_id) for t in row[1:]]
    assert int((ids == tok.bos_id).sum()) >= 4  # the windows do hold several documents (debug docs: 30-80 words)
    assert torch.equal(c["doc_ids"], b["doc_ids"]) and torch.equal(c["positions"], torch.arange(64).expand(4, 64))


def _segments(doc_row: torch.Tensor) -> list[tuple[int, int]]:
    edges = [0] + [t for t in range(1, len(doc_row)) if doc_row[t] != doc_row[t - 1]] + [len(doc_row)]
    return list(zip(edges[:-1], edges[1:], strict=True))


@pytest.mark.parametrize("reset", [True, False])
def test_masked_window_loss_equals_documents_forwarded_separately(pretrain_data, reset):
    """The Pretrain objective (loader options from the settings, fused head + loss path) on document-masked
    windows equals the sum over documents of each one forwarded alone; RoPE positions restart at 0 per
    document (reset) or continue from the window start (then the document alone is given those positions).
    Without the mask the same windows give another loss (attention crosses documents)."""
    cfg = config.load_config(None, {"MODEL_PRESET": "debug", "PRETRAIN_DOC_MASKING": "true",
                                    "PRETRAIN_DOC_RESET_POSITIONS": str(reset).lower()})
    tok = tk.load_tokenizer(TOKENIZER)
    objective = obj.build_objective(cfg)
    loader, _ = _loader(pretrain_data, **objective.loader_options(tok))
    batch = loader.next_batch()
    assert ("positions" in batch) == (not reset)
    torch.manual_seed(0)
    model = Transformer(cfg.model_args(tok.vocab_size))
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(1))  # large weights: attention matters
    seen = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw.get("positions")), with_kwargs=True)
    with torch.no_grad():
        got, _ = objective.loss(model, batch)
    hook.remove()
    assert (seen[0] is batch.get("positions")) if not reset else seen[0] is None  # the window positions reach RoPE
    with torch.no_grad():
        want, n_docs = torch.zeros(()), 0
        for b in range(batch["input_ids"].shape[0]):
            for s, e in _segments(batch["doc_ids"][b]):
                positions = None if reset else torch.arange(s, e)[None]
                logits = model(batch["input_ids"][b:b + 1, s:e], positions=positions)  # (1, e - s, V)
                want += cross_entropy_sum(logits, batch["labels"][b:b + 1, s:e])
                n_docs += 1
        unmasked = cross_entropy_sum(model(batch["input_ids"]), batch["labels"])
    assert n_docs >= 8
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert abs(unmasked.item() - want.item()) > 1e-4 * want.item()  # 10x the tolerance above: the mask matters


def test_restarting_positions_changes_only_rounding_under_the_mask(pretrain_data):
    """RoPE scores depend on the query-key distance alone and the mask keeps both in one document, so restarting
    positions per document (PRETRAIN_DOC_RESET_POSITIONS) moves the logits by rounding only."""
    tok = tk.load_tokenizer(TOKENIZER)
    batch = _loader(pretrain_data, doc_delimiters=(tok.bos_id, tok.eos_id), reset_positions=False)[0].next_batch()
    cfg = config.load_config(None, {"MODEL_PRESET": "debug"})
    model = Transformer(cfg.model_args(tok.vocab_size))
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        restart = model(batch["input_ids"], doc_ids=batch["doc_ids"])
        window = model(batch["input_ids"], doc_ids=batch["doc_ids"], positions=batch["positions"])
        no_mask = model(batch["input_ids"], positions=batch["positions"])
    assert (restart - window).abs().max().item() < 1e-4
    assert (no_mask - window).abs().max().item() > 1e-2


def test_train_py_trains_with_document_masking(tmp_path, pretrain_data):
    """configs/debug.env through train.py with PRETRAIN_DOC_MASKING: the loss falls, validation runs on masked
    windows too, and step 1 differs from the unmasked run's (the mask reaches the loop's forward)."""
    masked = run_inprocess(tmp_path / "m", pretrain_data, PRETRAIN_DOC_MASKING="true",
                           PRETRAIN_DOC_RESET_POSITIONS="true", MAX_STEPS=4, VALIDATE_EVERY_X_STEPS=4,
                           SAVE_CHECKPOINTS="false")
    plain = run_inprocess(tmp_path / "p", pretrain_data, MAX_STEPS=1, VALIDATE_EVERY_X_STEPS=0,
                          SAVE_CHECKPOINTS="false")
    losses = train_losses(masked)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    assert losses[4] < losses[1]
    assert any("val_loss" in e for e in masked)
    assert abs(losses[1] - train_losses(plain)[1]) > 1e-4


def test_one_saved_mask_per_forward_under_bf16_autocast():
    """A document mask is a (B, 1, T, T) bias: under bf16 autocast it is cast to the compute dtype once per forward,
    so backward keeps one copy, not one per layer."""
    model = Transformer(config.load_config(None, {"MODEL_PRESET": "debug", "N_LAYERS": "4"}).model_args(97))
    T = 48
    ids, docs = torch.randint(0, 97, (2, T)), torch.arange(T).div(20, rounding_mode="floor").expand(2, T)
    saved: dict[int, torch.dtype] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4 and t.shape[-2:] == (T, T):
            saved[t.untyped_storage().data_ptr()] = t.dtype
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        model(ids, doc_ids=docs).float().sum().backward()
    assert list(saved.values()) == [torch.bfloat16]



@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_document_mask_equals_the_dense_mask(monkeypatch):
    """ATTN_IMPL=flex (block-sparse document mask through flex_attention, compiled on CUDA) gives the dense-bias
    SDPA logits, with GQA and documents that span several 128-token blocks or end inside one. Forward only:
    torch 2.13 has no flex_attention backward on CPU, so the model uses the dense mask there (checked last)
    and the test routes this forward to flex as a CUDA device would."""
    import model as model_module

    def model_pair():
        dense = Transformer(config.load_config(None, {"MODEL_PRESET": "debug", "MAX_SEQ_LEN": "384"}).model_args(97))
        dense.init_weights(std=0.2, generator=torch.Generator().manual_seed(2))
        flex = Transformer(config.load_config(None, {"MODEL_PRESET": "debug", "MAX_SEQ_LEN": "384",
                                                     "ATTN_IMPL": "flex"}).model_args(97))
        flex.load_state_dict(dense.state_dict())
        return dense, flex

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, 384), generator=g)
    docs = torch.stack([(torch.arange(384) >= 256).long(), torch.arange(384).div(130, rounding_mode="floor")])
    blocks = model_module.document_block_mask(docs)
    # row 0's last 128-query block sees only its own key block (causal alone would visit all 3): skipped blocks
    assert (blocks.kv_num_blocks + blocks.full_kv_num_blocks)[0, 0].tolist() == [1, 2, 1]
    dense, flex = model_pair()
    with torch.no_grad():
        want, want_causal = dense(ids, doc_ids=docs), dense(ids)
        assert torch.equal(flex(ids, doc_ids=docs), want)  # on CPU "flex" resolves to SDPA with the dense mask
        monkeypatch.setattr(model_module, "resolve_attn_impl", lambda impl, device: impl)
        built, real = [], model_module.document_block_mask
        monkeypatch.setattr(model_module, "document_block_mask", lambda d: built.append(1) or real(d))
        got = flex(ids, doc_ids=docs)
        assert built == [1]  # the block mask path ran
        assert (got - want).abs().max().item() < 1e-4
        assert torch.equal(flex(ids), want_causal)  # without documents flex stays on SDPA's causal kernel
