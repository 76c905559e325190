"""Loaders: the global order is world-size independent, epochs reshuffle, resume works across world sizes,
windows/rows/pairs are laid out exactly as the objectives expect."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data_manifest
import data_preparation_utils as dpu
import dataloaders as dl
import demo_data
import load_dpo_dataset as ldpo
import load_instruct_dataset as lid
import tokenizer
from errors import UserError

ROOT = Path(__file__).resolve().parent.parent
G, B = 8, 2


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load_tokenizer(ROOT / "tokenizer.model")


@pytest.fixture(scope="module")
def data(tok, tmp_path_factory):
    """Small prepared datasets of every kind (val_fraction 0.2, small shards so windows cross shards)."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("data")
    kw = dict(tokenizer_identity=tok.identity(), source="test", seed=1, val_fraction=0.2, progress=False)
    docs = [topics[k] for k in sorted(topics)[:20]]
    dpu.prepare("pretrain", docs, root / "pretrain", dpu.PretrainEncoder(tok), shard_size=300, **kw)
    dpu.prepare("sft", demo_data.demo_instruct_set(300, modules=False), root / "sft", lid.SFTEncoder(tok, "", 0, 200),
                shard_size=2000, **kw)
    dpu.prepare("dpo", demo_data.demo_preference_set(300, modules=False), root / "dpo", ldpo.DPOEncoder(tok, "", 256),
                shard_size=3000, **kw)
    return root


def loader(data, tok, kind, split="train", *, rank=0, world=1, packed=False, T=None, b=B, g=G):
    T = T or (64 if kind == "pretrain" else 256)
    return dl.build_loader(kind, data / ("pretrain" if kind == "pretrain" else kind), split, seq_len=T,
                           micro_batch=b, global_batch=g, rank=rank, world_size=world, seed=3, pad_id=tok.pad_id,
                           packed=packed, tokenizer_identity=tok.identity())


def global_steps(data, tok, kind, world, steps, packed=False, state=None):
    """Rows of each optimizer step in global order (micro-step m, then rank r), as tuples."""
    loaders = [loader(data, tok, kind, rank=r, world=world, packed=packed) for r in range(world)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    accum = G // (B * world)
    out = []
    for _ in range(steps):
        rows = []
        for _m in range(accum):
            for ld in loaders:
                batch = ld.next_batch()
                key = "chosen_input_ids" if kind == "dpo" else "input_ids"
                rows += [tuple(r) for r in batch[key].tolist()]
        out.append(rows)
    return out, loaders


@pytest.mark.parametrize("kind,packed", [("pretrain", False), ("sft", False), ("sft", True), ("dpo", False)])
def test_same_global_samples_for_1_2_4_ranks(data, tok, kind, packed):
    steps = 12  # crosses at least one epoch boundary for sft/dpo (~70 examples, 8 per step)
    ref, _ = global_steps(data, tok, kind, 1, steps, packed)
    for world in (2, 4):
        got, _ = global_steps(data, tok, kind, world, steps, packed)
        assert got == ref
    assert len({r for step in ref for r in step}) > G  # not the same rows over and over


@pytest.mark.parametrize("kind,packed", [("pretrain", False), ("sft", True)])
def test_resume_including_2_ranks_to_1(data, tok, kind, packed):
    ref, _ = global_steps(data, tok, kind, 1, 9, packed)
    _, two = global_steps(data, tok, kind, 2, 4, packed)
    state = two[0].state_dict()
    assert state == two[1].state_dict()  # no rank in the state
    assert state["offset"] == (4 * G) % two[0].samples_per_epoch or state["epoch"] > 0
    resumed, _ = global_steps(data, tok, kind, 1, 5, packed, state=state)
    assert resumed == ref[4:]
    resumed2, _ = global_steps(data, tok, kind, 2, 5, packed, state=state)
    assert resumed2 == ref[4:]


def test_epochs_reshuffle_and_cover_everything(data, tok):
    ld = loader(data, tok, "sft", b=1, g=1)
    n = ld.samples_per_epoch
    seen = [tuple(ld.next_batch()["input_ids"][0].tolist()) for _ in range(2 * n)]
    assert ld.epoch == 2
    assert len(set(seen[:n])) == n and set(seen[:n]) == set(seen[n:])  # each epoch: every example once
    assert seen[:n] != seen[n:]  # a new permutation per epoch


def test_pretrain_windows_are_the_token_stream(data, tok):
    m = data_manifest.read_manifest(data / "pretrain")
    stream = np.concatenate([np.load(data / "pretrain" / s["files"]["tokens"]["path"])
                             for s in m["splits"]["val"]["shards"]]).astype(np.int64)
    T = 64
    val = loader(data, tok, "pretrain", "val", T=T)
    n = val.samples_per_epoch
    assert n == (len(stream) - 1) // T and len(m["splits"]["val"]["shards"]) > 1
    rows = []
    for _ in range(n // B):
        batch = val.next_batch()
        assert (batch["labels"][:, :-1] == batch["input_ids"][:, 1:]).all()
        rows += [(x.tolist(), y.tolist()) for x, y in zip(batch["input_ids"], batch["labels"], strict=True)]
    for i, (x, y) in enumerate(rows):  # sequential, windows of T+1 across shard boundaries
        assert x == stream[i * T:i * T + T].tolist() and y == stream[i * T + 1:i * T + T + 1].tolist()
    val.reset()
    assert val.next_batch()["input_ids"][0].tolist() == rows[0][0]
    r1 = loader(data, tok, "pretrain", "val", T=T, rank=1, world=2)  # rank 1 takes the next B windows
    assert r1.next_batch()["input_ids"][0].tolist() == rows[B][0]


def test_sft_packed_rows_hold_whole_examples(data, tok):
    padded = loader(data, tok, "sft", b=1, g=1)
    examples = set()
    for _ in range(padded.samples_per_epoch):
        x = padded.next_batch()["input_ids"][0].tolist()
        while x and x[-1] == tok.pad_id:
            x.pop()
        examples.add(tuple(x))
    packed = loader(data, tok, "sft", b=1, g=1, packed=True)
    found = []
    for _ in range(packed.samples_per_epoch):
        b = packed.next_batch()
        x, y, d = (b[k][0].tolist() for k in ("input_ids", "labels", "doc_ids"))
        assert d == sorted(d)
        for doc in range(d[-1] + 1):
            seg = [t for t, di in zip(x, d, strict=True) if di == doc]
            if seg and doc == d[-1] and all(t == tok.pad_id for t in seg):
                assert all(lab == -100 for lab, di in zip(y, d, strict=True) if di == doc)  # padding trains nothing
                continue
            found.append(tuple(seg))
    assert sorted(found) == sorted(examples)  # every example exactly once per epoch, none cut
    assert packed.samples_per_epoch < padded.samples_per_epoch


def test_dpo_batch_layout(tok, tmp_path):
    enc = ldpo.DPOEncoder(tok, "", 128)
    pairs = [{"prompt": "Why is the sky blue?", "chosen": "Rayleigh scattering.", "rejected": "Paint."},
             {"prompt": "2+2?", "chosen": "4", "rejected": "Five, probably, or maybe six."}]
    dpu.prepare("dpo", pairs, tmp_path / "d", enc, tokenizer_identity=tok.identity(), source="t", seed=0,
                val_fraction=0.0, shard_size=1024, progress=False)
    ld = dl.build_loader("dpo", tmp_path / "d", "train", seq_len=40, micro_batch=2, global_batch=2, rank=0,
                         world_size=1, seed=0, pad_id=tok.pad_id)
    batch = ld.next_batch()
    encoded = {tuple(enc(p)[0]["prompt"].tolist()): enc(p)[0] for p in pairs}
    for b in range(2):
        for side in ("chosen", "rejected"):
            x, y = batch[f"{side}_input_ids"][b].tolist(), batch[f"{side}_labels"][b].tolist()
            arrays = next(a for p, a in encoded.items() if tuple(x[:len(p)]) == p)
            p, r = arrays["prompt"].tolist(), arrays[side].tolist()
            n = len(p) + len(r) - 1
            assert x[:n] == (p + r)[:-1]  # prompt and response contiguous: no padding in between
            assert x[n:] == [tok.pad_id] * (40 - n)
            assert y[:len(p) - 1] == [-100] * (len(p) - 1)  # no loss on the prompt
            assert y[len(p) - 1:n] == r  # the response tokens, end-of-turn included
            assert y[n:] == [-100] * (40 - n)


def test_too_short_seq_len_is_refused_not_truncated(data, tok):
    with pytest.raises(UserError, match="never cut"):
        loader(data, tok, "sft", T=16)


def test_loader_is_fast(data, tok):
    ld = loader(data, tok, "pretrain", T=256, b=4, g=4)
    ld.next_batch()
    t0 = time.perf_counter()
    for _ in range(50):
        ld.next_batch()
    assert (time.perf_counter() - t0) / 50 < 0.005  # a tiny-preset train step takes ~1 s on this CPU


# ---- sample_index: a row's id within its split (what precomputed teacher/reference caches are keyed by) ----


def _split_arrays(root: Path, split: str) -> dict[str, list[np.ndarray]]:
    """The split's shard arrays read with plain np.load from the manifest (independent of the loader)."""
    m = data_manifest.read_manifest(root)
    out: dict[str, list[np.ndarray]] = {}
    for s in m["splits"][split]["shards"]:
        for role, f in s["files"].items():
            out.setdefault(role, []).append(np.load(root / f["path"]))
    return out


def expected_sample(data: Path, kind: str, i: int, T: int) -> dict[str, list[int]]:
    """Sample number i of the unshuffled train split, laid out as the loader's row (independent of it)."""
    if kind == "pretrain":
        stream = np.concatenate(_split_arrays(data / "pretrain", "train")["tokens"]).astype(np.int64)
        return {"input_ids": stream[i * T:i * T + T].tolist(), "labels": stream[i * T + 1:i * T + T + 1].tolist()}
    arrays = _split_arrays(data / kind, "train")
    examples = []  # every example of every shard, in file order
    for s, offsets in enumerate(arrays["offsets"]):
        for j in range(len(offsets) - 1):
            if kind == "sft":
                lo, hi = int(offsets[j]), int(offsets[j + 1])
                examples.append((arrays["tokens"][s][lo:hi].tolist(),))
            else:
                examples.append(tuple(arrays[r][s][int(offsets[j, c]):int(offsets[j + 1, c])].tolist()
                                      for c, r in enumerate(("prompt", "chosen", "rejected"))))
    if kind == "sft":
        tok = examples[i][0]
        return {"input_ids": tok[:-1]}
    p, c, _ = examples[i]
    return {"chosen_input_ids": (p + c)[:-1]}


def _steps_with_index(data, tok, kind, world, steps, state=None):
    loaders = [loader(data, tok, kind, rank=r, world=world) for r in range(world)]
    for ld in loaders:
        if state is not None:
            ld.load_state_dict(state)
    out = []
    for _ in range(steps):
        idx = []
        for _m in range(G // (B * world)):
            for ld in loaders:
                batch = ld.next_batch()
                assert batch["sample_index"].dtype == torch.long and batch["sample_index"].shape == (B,)
                idx += batch["sample_index"].tolist()
        out.append(idx)
    return out, loaders


@pytest.mark.parametrize("kind", ["pretrain", "sft", "dpo"])
def test_sample_index_is_world_size_independent_and_survives_resume(data, tok, kind):
    ref, _ = _steps_with_index(data, tok, kind, 1, 12)
    for world in (2, 4):
        assert _steps_with_index(data, tok, kind, world, 12)[0] == ref
    _, two = _steps_with_index(data, tok, kind, 2, 5)
    for world in (1, 2, 4):  # resume from a 2-rank state under any world size
        assert _steps_with_index(data, tok, kind, world, 7, state=two[0].state_dict())[0] == ref[5:]
    # independent of the seed: a different seed visits the same ids in another order
    other = dl.build_loader(kind, data / kind, "train", seq_len=64 if kind == "pretrain" else 256, micro_batch=B,
                            global_batch=G, rank=0, world_size=1, seed=99, pad_id=tok.pad_id)
    n = other.samples_per_epoch
    seen = [i for _ in range(-(-n // B)) for i in other.next_batch()["sample_index"].tolist()][:n]
    assert sorted(seen) == list(range(n))  # one epoch covers 0..n-1 exactly once
    flat = [i for step in ref for i in step]
    first = flat[:n]  # seed 3's first epoch (or its start): distinct ids in range, another order than seed 99's
    assert len(set(first)) == len(first) and set(first) <= set(range(n)) and seen[:len(first)] != first


@pytest.mark.parametrize("kind", ["pretrain", "sft", "dpo"])
def test_batch_rows_are_the_samples_their_index_names(data, tok, kind):
    T = 64 if kind == "pretrain" else 256
    ld = loader(data, tok, kind, b=4, g=4)
    for _ in range(6):
        batch = ld.next_batch()
        for b, i in enumerate(batch["sample_index"].tolist()):
            for key, want in expected_sample(data, kind, i, T).items():
                got = batch[key][b].tolist()
                assert got[:len(want)] == want and all(t == tok.pad_id for t in got[len(want):])


def test_val_sample_index_is_sequential_and_packed_rows_have_none(data, tok):
    val = loader(data, tok, "sft", "val", b=2, g=2)
    got = [i for _ in range(val.samples_per_epoch // 2) for i in val.next_batch()["sample_index"].tolist()]
    assert got == list(range(len(got)))
    assert "sample_index" not in loader(data, tok, "sft", packed=True).next_batch()
