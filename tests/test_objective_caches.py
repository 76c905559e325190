"""Precomputed frozen-model outputs (objective_caches.py): the DPO reference log-probs and the teacher
top-k cache read back by sample_index, write_cache's round trip and atomicity, and the cache-teacher CLI
end to end (shards -> cache -> loader batches -> the KD term)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.utils._python_dispatch
from test_objectives import (
    _tempered_topk,
    cfg_for,
    distill_objective,
    dpo_batch,
    lm_batch,
    ref_topk_tail_kl_sum,
    tiny_model,
)

import objective_caches
import objectives as obj
from errors import UserError
from objective_caches import concat_pairs


def test_reference_cache_reads_rows_by_sample_index(tmp_path):
    policy, batch = tiny_model(0), dpo_batch()
    ref = tiny_model(1)
    ids, labels = concat_pairs(batch)
    lp = obj.sequence_logps(ref(ids), labels).detach()
    rows = np.zeros((10, 2), np.float32)
    index = torch.tensor([7, 2, 5])
    rows[index.numpy(), 0], rows[index.numpy(), 1] = lp[:3].numpy(), lp[3:].numpy()
    np.save(tmp_path / "ref_logps.npy", rows)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": objective_caches.CACHE_FORMAT, "kind": "reference"}))
    live = obj.build_objective(cfg_for(TRAINING_STAGE="dpo"))
    live.setup(ref, None, torch.device("cpu"))
    cached = obj.build_objective(cfg_for(TRAINING_STAGE="dpo", DPO_REFERENCE_LOGPS_PATH=tmp_path))
    cached.setup(policy, None, torch.device("cpu"))
    assert cached.reference is None
    a, _ = live.loss(policy, batch)
    b, _ = cached.loss(policy, {**batch, "sample_index": index})
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    with pytest.raises(UserError, match="sample_index"):
        cached.loss(policy, batch)
    with pytest.raises(UserError, match="10 samples"):
        cached.loss(policy, {**batch, "sample_index": torch.tensor([1, 2, 10])})


def test_teacher_cache_reader_gives_the_topk_loss(tmp_path):
    student, teacher, batch = tiny_model(0), tiny_model(1), lm_batch()
    K, index = 5, torch.tensor([3, 0])
    with torch.no_grad():
        vals, ids, tail = (x.float() for x in _tempered_topk(teacher(batch["input_ids"]), K, 2.0))  # (B,T,K)x2, (B,T)
    lp, ii, tl = np.zeros((4, 8, K), np.float16), np.zeros((4, 8, K), np.uint16), np.zeros((4, 8), np.float32)
    lp[index.numpy()], ii[index.numpy()], tl[index.numpy()] = vals.numpy(), ids.numpy(), tail.numpy()
    np.save(tmp_path / "topk_logps.npy", lp)
    np.save(tmp_path / "topk_ids.npy", ii)
    np.save(tmp_path / "tail_logps.npy", tl)
    manifest = {"format": objective_caches.CACHE_FORMAT, "kind": "teacher", "vocab_size": 32, "top_k": K,
                "temperature": 2.0, "doc_masking": False, "doc_reset_positions": False}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    o = distill_objective(TEACHER_CACHE_PATH=tmp_path)
    info = o.setup(student, None, torch.device("cpu"))
    assert o.teacher is None and info["teacher_memory_mb"] == 0.0
    loss, m = o.loss(student, {**batch, "sample_index": index})
    mask = batch["labels"] != -100
    want = ref_topk_tail_kl_sum(student(batch["input_ids"]).detach(), teacher(batch["input_ids"]).detach(), mask,
                                2.0, K)
    assert m["kd"].item() == pytest.approx(want, rel=2e-3)  # fp16 storage of the log-probs
    with pytest.raises(UserError, match="SFT_BATCHING=padded"):
        o.loss(student, batch)  # no sample_index (a packed SFT batch)
    with pytest.raises(UserError, match="filler row"):
        o.loss(student, {**batch, "sample_index": torch.tensor([3, -1])})
    with pytest.raises(UserError, match="SFT_BATCHING=padded"):
        distill_objective("instruct", TEACHER_CACHE_PATH=tmp_path, SFT_BATCHING="packed").setup(
            student, None, torch.device("cpu"))
    with pytest.raises(UserError, match=r"temperature 2.0 but DISTILLATION_TEMPERATURE=1.0"):
        distill_objective(TEACHER_CACHE_PATH=tmp_path, DISTILLATION_TEMPERATURE=1.0).setup(
            student, None, torch.device("cpu"))
    # the teacher's attention must be the run's: a cache without document masking refuses a masked run
    older = {k: v for k, v in manifest.items() if not k.startswith("doc_")}  # a manifest from before the keys
    (tmp_path / "manifest.json").write_text(json.dumps(older))
    with pytest.raises(UserError, match="records no PRETRAIN_DOC_MASKING"):
        distill_objective(TEACHER_CACHE_PATH=tmp_path).setup(student, None, torch.device("cpu"))
    distill_objective("instruct", TEACHER_CACHE_PATH=tmp_path).setup(student, None, torch.device("cpu"))  # SFT: n/a
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="built with PRETRAIN_DOC_MASKING=false, PRETRAIN_DOC_RESET_POSITIONS=false"):
        distill_objective(TEACHER_CACHE_PATH=tmp_path, PRETRAIN_DOC_MASKING="true").setup(
            student, None, torch.device("cpu"))
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "doc_masking": True}))
    distill_objective(TEACHER_CACHE_PATH=tmp_path, PRETRAIN_DOC_MASKING="true").setup(student, None, torch.device("cpu"))
    with pytest.raises(UserError, match="PRETRAIN_DOC_MASKING=true"):
        distill_objective(TEACHER_CACHE_PATH=tmp_path).setup(student, None, torch.device("cpu"))
    with pytest.raises(UserError, match="PRETRAIN_DOC_RESET_POSITIONS=false"):
        distill_objective(TEACHER_CACHE_PATH=tmp_path, PRETRAIN_DOC_MASKING="true",
                          PRETRAIN_DOC_RESET_POSITIONS="true").setup(student, None, torch.device("cpu"))
    for bad, match in (({"vocab_size": 50}, r"50 tokens.*32"), ({"temperature": None}, "older teacher cache")):
        m = {**manifest, **bad}
        (tmp_path / "manifest.json").write_text(json.dumps({k: v for k, v in m.items() if v is not None}))
        with pytest.raises(UserError, match=match):
            distill_objective(TEACHER_CACHE_PATH=tmp_path).setup(student, None, torch.device("cpu"))


def test_write_cache_round_trip_and_atomicity(tmp_path):
    teacher = tiny_model(1)
    g = torch.Generator().manual_seed(5)
    data = torch.randint(0, 32, (6, 8), generator=g)  # 6 samples, in a shuffled order, batch 4 (last wraps)
    order = [4, 1, 5, 0, 3, 2, 4, 1]
    batches = [{"input_ids": data[order[i:i + 4]], "sample_index": torch.tensor(order[i:i + 4])} for i in (0, 4)]
    m = objective_caches.write_cache("teacher", teacher, iter(batches), 6, 8, str(tmp_path / "c"), top_k=4, temperature=1.5)
    assert m["n_samples"] == 6 and m["top_k"] == 4 and m["vocab_size"] == 32 and m["temperature"] == 1.5
    assert not (tmp_path / "c.tmp").exists()
    logps, ids, tail = objective_caches.TeacherCache(str(tmp_path / "c")).lookup(torch.tensor([2, 5]), torch.device("cpu"))
    with torch.no_grad():
        p = F.softmax(teacher(data[[2, 5]]).double() / 1.5, -1)  # (2, 8, V) tempered teacher
    want_p, want_i = p.topk(4, -1)
    torch.testing.assert_close(logps.exp().double(), want_p, atol=2e-3, rtol=2e-3)  # float16 log-probs
    assert torch.equal(ids, want_i)
    torch.testing.assert_close(tail.exp().double(), 1 - want_p.sum(-1), atol=1e-6, rtol=1e-5)  # exact tail mass
    # a cover that misses samples fails and leaves nothing behind
    with pytest.raises(UserError, match="never produced 2 of 6"):
        objective_caches.write_cache("teacher", teacher, iter(batches[:1]), 6, 8, str(tmp_path / "d"), top_k=4)
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.tmp").exists()
    # reference cache: rows equal the live reference log-probs
    batch = {**dpo_batch(B=3), "sample_index": torch.tensor([2, 0, 1])}
    objective_caches.write_cache("reference", teacher, iter([batch]), 3, 10, str(tmp_path / "r"))
    c, r = objective_caches.ReferenceCache(str(tmp_path / "r")).lookup(torch.tensor([2, 0, 1]), torch.device("cpu"))
    ids, labels = concat_pairs(batch)
    want = obj.sequence_logps(teacher(ids), labels)
    torch.testing.assert_close(torch.cat([c, r]), want)


class WidestLogits(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most rows any new tensor (..., V) produced under it holds (V = the vocabulary; views, such as
    the head weight's transpose (d, V), are not new memory)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):  # a view or an in-place result
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.ndim >= 2 and t.shape[-1] == self.vocab:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("kind", ["teacher", "reference"])
def test_write_cache_in_row_chunks_equals_one_chunk_and_bounds_the_logits(tmp_path, kind):
    """The logits exist chunk_rows rows at a time (the whole batch's would be B * T rows) and the stored
    values are the one-chunk (unchunked) ones, in fp32."""
    teacher = tiny_model(2, vocab=64)
    if kind == "teacher":
        data = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(3))
        batches = [{"input_ids": data, "sample_index": torch.arange(4)}]
        files, n, T = ("topk_logps.npy", "topk_ids.npy", "tail_logps.npy"), 4, 8
    else:
        batches = [{**dpo_batch(B=3, vocab=64), "sample_index": torch.arange(3)}]
        files, n, T = ("ref_logps.npy",), 3, 10
    whole = objective_caches.write_cache(kind, teacher, iter(batches), n, T, str(tmp_path / "whole"), top_k=5,
                                         temperature=1.5, chunk_rows=10**6)
    with WidestLogits(64) as seen:
        objective_caches.write_cache(kind, teacher, iter(batches), n, T, str(tmp_path / "chunked"), top_k=5,
                                     temperature=1.5, chunk_rows=3)
    assert 0 < seen.rows <= 3  # never more than a chunk of (rows, V) logits
    assert whole["n_samples"] == n
    for f in files:
        a, b = np.load(tmp_path / "whole" / f), np.load(tmp_path / "chunked" / f)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    if kind == "reference":  # and both are losses.sequence_logps of the full logits
        ids, labels = concat_pairs(batches[0])
        with torch.no_grad():
            want = obj.sequence_logps(teacher(ids), labels).numpy()
        np.testing.assert_allclose(np.load(tmp_path / "chunked" / "ref_logps.npy").T.reshape(-1), want, rtol=1e-5)


# ---- the teacher cache end to end: shards -> `objectives.py cache-teacher` -> loader batches -> KD term -----


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "instruct"])
def test_cache_teacher_cli_over_shards_feeds_the_distillation_term(tmp_path, stage):
    import subprocess
    import sys
    from pathlib import Path

    from helpers import subprocess_env
    from safetensors.torch import save_file

    import data_preparation_utils as dpu
    import dataloaders
    import demo_data
    import tokenizer as tk
    from load_instruct_dataset import SFTEncoder

    root = Path(__file__).resolve().parents[1]
    tok = tk.load_tokenizer(str(root / "tokenizer.model"))
    T, kind = 48, "pretrain" if stage == "pretrain" else "sft"
    kw = dict(tokenizer_identity=tok.identity(), source="test", seed=0, val_fraction=0.0, shard_size=1 << 16,
              workers=1, progress=False)
    if kind == "pretrain":
        from pydoc_data.topics import topics

        dpu.prepare("pretrain", [topics[k] for k in sorted(topics)[:3]], tmp_path / "data", dpu.PretrainEncoder(tok),
                    **kw)
    else:
        dpu.prepare("sft", demo_data.demo_instruct_set(60, modules=False)[:20], tmp_path / "data",
                    SFTEncoder(tok, "", 0, T), **kw)
    teacher = tiny_model(1, vocab=tok.vocab_size)
    (tmp_path / "teacher").mkdir()
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items() if k != "output.weight"
               or not teacher.args.tie_embeddings}, str(tmp_path / "teacher" / "model.safetensors"))
    (tmp_path / "teacher" / "config.json").write_text(json.dumps({"model_args": teacher.args.to_dict(),
                                                                  "settings": {}}))
    settings = [f"TRAINING_STAGE={stage}", f"MAX_SEQ_LEN={T}", "SEED=5", "DISTILLATION_TEMPERATURE=2.0",
                f"TOKENIZER_CHECKPOINT_PATH={root / 'tokenizer.model'}", "TRAINING_PRECISION=fp32"]
    cmd = [sys.executable, str(root / "objectives.py"), "cache-teacher", "--teacher", str(tmp_path / "teacher"),
           "--data", str(tmp_path / "data"), "--out", str(tmp_path / "cache"), "--top-k", "16", "--batch-size", "4"]
    p = subprocess.run(cmd + settings, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    if stage == "instruct":  # packed rows have no sample_index: refused with one line, exit 2, nothing written
        bad = subprocess.run(cmd[:-6] + ["--out", str(tmp_path / "c2")] + settings + ["SFT_BATCHING=packed"],
                             cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "SFT_BATCHING=padded" in bad.stderr and not (tmp_path / "c2").exists()

    built = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert (built["doc_masking"], built["doc_reset_positions"]) == (False, False)
    assert built["compute_precision"] == "fp32"  # the forward ran under the run's TRAINING_PRECISION
    # training reads it under another seed and world size: rows are found by sample_index, not by position
    o = distill_objective(stage, TEACHER_CACHE_PATH=tmp_path / "cache", MAX_SEQ_LEN=T)
    student = tiny_model(0, vocab=tok.vocab_size)
    o.setup(student, tok, torch.device("cpu"))
    ld = dataloaders.build_loader(kind, tmp_path / "data", "train", seq_len=T, micro_batch=3, global_batch=6, rank=1,
                                  world_size=2, seed=77, pad_id=tok.pad_id, tokenizer_identity=tok.identity())
    checked = 0
    for _ in range(3):
        batch = ld.next_batch()
        _, m = o.loss(student, batch)
        with torch.no_grad():  # the same term from the live teacher on the same rows (float64)
            vals, ids, tail = _tempered_topk(teacher(batch["input_ids"]), 16, 2.0)
            want = obj.topk_distillation_loss_sum(student(batch["input_ids"]).double(), vals, ids,
                                                  batch["labels"] != -100, 2.0, tail)
        assert m["kd"].item() == pytest.approx(want.item(), rel=3e-3)  # float16 log-probs in the cache
        checked += int((batch["labels"] != -100).sum())
    assert checked > 0


def test_write_cache_computes_under_the_given_precision(tmp_path):
    """compute_dtype=bf16: the reference log-probs are those of the bf16-autocast forward (what the live
    reference computes in a bf16 run), not the fp32 ones."""
    import precision

    model = tiny_model(2, vocab=64)
    batch = {**dpo_batch(B=3, vocab=64), "sample_index": torch.arange(3)}
    objective_caches.write_cache("reference", model, iter([batch]), 3, 10, str(tmp_path / "bf16"),
                                 compute_dtype=torch.bfloat16)
    got = np.load(tmp_path / "bf16" / "ref_logps.npy").T.reshape(-1)
    ids, labels = concat_pairs(batch)
    with torch.no_grad():
        with precision.autocast("cpu", torch.bfloat16):
            want = obj.sequence_logps(model(ids), labels).numpy()
        fp32 = obj.sequence_logps(model(ids), labels).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-2)
    assert np.abs(got - want).max() < np.abs(got - fp32).max()  # closer to the bf16 forward than to fp32
