"""HellaSwag: lm-eval's rendering, batched scoring = one forward per ending, 2 ranks = 1 rank, bad data."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
import torch

import evaluation
import hellaswag_utils as hs
import load_hellaswag_dataset as lhd
from errors import UserError
from model import Transformer
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "fixtures" / "hellaswag_golden.jsonl"


class ByteTokenizer(Tokenizer):
    """Stand-in tokenizer: UTF-8 bytes, plus optional greedy merges (multi-byte strings -> one id); the
    base class's BOS convention (BOS when there is one)."""

    bos_id, eos_id, pad_id, vocab_size = 256, 257, 258, 264

    def __init__(self, merges: tuple[str, ...] = ()):
        self.merges = {m.encode(): 259 + i for i, m in enumerate(merges)}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        data, ids, i = text.encode(), [], 0
        while i < len(data):
            for m, mid in sorted(self.merges.items(), key=lambda kv: -len(kv[0])):
                if data.startswith(m, i):
                    ids.append(mid)
                    i += len(m)
                    break
            else:
                ids.append(data[i])
                i += 1
        return [self.bos_id] * bos + ids + [self.eos_id] * eos


def tiny_model(seed: int = 0) -> Transformer:
    # large std: confident, varied
    return helpers.tiny_model(seed, std=0.3, dim=32, multiple_of=16, vocab_size=264, max_seq_len=512).eval()


# ---- rendering: expected strings derived by hand from lm-eval's preprocess / process_docs -----------------
@pytest.mark.parametrize("raw, expected", [
    ("  A man is sitting on a roof.  ", "A man is sitting on a roof."),
    ("How to grow tomatoes [title] Pick a window.", "How to grow tomatoes. Pick a window."),
    ("[header] How to sleep [step] Lie down.", " How to sleep Lie down."),  # no strip after removal
    ("[substeps] Water daily.", " Water daily."),
    ("a [step]  cat", "a  cat"),  # three spaces -> one pass of "  " -> " " leaves two
    ("the crowd  cheers", "the crowd cheers"),
    ("[title] Buy a lamp", " Buy a lamp"),  # no space before [title]: removed, not turned into ". "
])
def test_preprocess_golden(raw: str, expected: str) -> None:
    assert hs.preprocess(raw) == expected


def test_render_golden_set() -> None:
    exs = hs.load_examples(GOLDEN)
    assert [e.context for e in exs] == [
        "Removing ice from car: Then, the man writes over the snow covering the window of a car, and a woman "
        "wearing winter clothes smiles. Then",
        "Home and Garden: How to grow tomatoes indoors. Pick a sunny window. Tomatoes need at least six hours "
        "of light.",
        "Disc dog: A dog runs across a field after a frisbee. The dj plays music while",
    ]
    assert exs[0].endings[3] == ", the man continues removing the snow on his car."
    assert exs[1].endings == [" Water the plants every morning.", "You can paint the pot. Add soil.",
                              " Buy a lamp Any lamp works.", "Tomatoes grow on the moon."]
    assert exs[2].endings == ["the dog catches it in the air.", "the crowd cheers loudly.", "a  cat sleeps.",
                              "the frisbee melts."]
    assert [e.label for e in exs] == [3, 0, 1]  # "0" (HF layout, string label) -> 0


def test_encode_pair_follows_lm_eval_split() -> None:
    # lm-eval HFLM._encode_pair: trailing context spaces move to the continuation; continuation tokens are
    # encode(context + continuation)[len(encode(context)):], even when a merge crosses the boundary.
    tok = ByteTokenizer(merges=(". T",))
    ctx, cont = evaluation.encode_pair(tok, "x.", " Ty", add_bos=False)
    assert ctx == [ord("x"), ord(".")] and cont == [ord("y")]  # whole = [x, ". T", y]
    ctx, cont = evaluation.encode_pair(tok, "ab ", " c", add_bos=True)
    assert ctx == [256, ord("a"), ord("b")] and cont == [32, 32, ord("c")]


# ---- scoring: batched evaluator vs an independent one-forward-per-ending computation ------------------------
def reference_scores(model: Transformer, tok: ByteTokenizer, examples: list[hs.Example], add_bos: bool):
    """Per example: 4 (summed ll, n tokens); one forward per ending, full logits, no padding."""
    out = []
    for ex in examples:
        rows = []
        for ending in ex.endings:
            ctx_ids = tok.encode(ex.context)
            cont_ids = tok.encode(ex.context + " " + ending)[len(ctx_ids):]
            ids = [tok.bos_id] * add_bos + ctx_ids + cont_ids
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)  # (L-1, V)
            n = len(cont_ids)
            ll = sum(logp[len(ids) - 1 - n + j, cont_ids[j]].item() for j in range(n))
            rows.append((ll, n))
        out.append(rows)
    return out


def reference_metrics(scores, examples: list[hs.Example]) -> dict:
    def first_argmax(v):
        return max(range(len(v)), key=lambda i: (v[i], -i))

    acc = sum(first_argmax([ll for ll, _ in s]) == e.label for s, e in zip(scores, examples, strict=True))
    accn = sum(first_argmax([ll / len(end) for (ll, _), end in zip(s, e.endings, strict=True)]) == e.label
               for s, e in zip(scores, examples, strict=True))
    acct = sum(first_argmax([ll / n for ll, n in s]) == e.label for s, e in zip(scores, examples, strict=True))
    n = len(examples)
    return {"acc": acc / n, "acc_norm": accn / n, "acc_token_norm": acct / n, "n": n}


class LogitsOnly(torch.nn.Module):
    """A wrapper exposing only model(tokens) -> logits: exercises the generic (full-logits) path."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.inner(tokens)


@pytest.mark.parametrize("add_bos", [True, False])
def test_batched_equals_one_forward_per_ending(add_bos: bool) -> None:
    torch.manual_seed(0)
    model, tok = tiny_model(), ByteTokenizer()
    exs = hs.load_examples(GOLDEN)
    with torch.no_grad():
        ref = reference_scores(model, tok, exs, add_bos)
    encoded = [hs._encode(tok, e, add_bos) for e in exs]
    got = hs.score_batch(model, encoded, torch.device("cpu"), None, 512, tok.pad_id)  # one forward, 12 rows
    for (lls, ntoks), rows in zip(got, ref, strict=True):
        assert ntoks == [n for _, n in rows]
        assert lls == pytest.approx([ll for ll, _ in rows], abs=1e-4)
    tree = hs.score_batch_tree(model, encoded, torch.device("cpu"), None)  # context once, tree mask
    for (lls, ntoks), rows in zip(tree, ref, strict=True):
        assert ntoks == [n for _, n in rows]
        assert lls == pytest.approx([ll for ll, _ in rows], abs=1e-4)
    want = reference_metrics(ref, exs)
    for bs in (1, 2, 3):
        assert hs.evaluate(model, tok, exs, batch_size=bs, progress=False, add_bos=add_bos) == want
    assert hs.evaluate(LogitsOnly(model), tok, exs, batch_size=2, device="cpu", progress=False,
                       add_bos=add_bos) == want


def test_evaluate_takes_the_tree_path_for_our_transformer_only(monkeypatch) -> None:
    model, tok = tiny_model(), ByteTokenizer()
    exs = hs.load_examples(GOLDEN)
    want = hs.evaluate(model, tok, exs, batch_size=2, progress=False)

    def refuse(*a, **k):
        raise AssertionError("wrong scorer")

    monkeypatch.setattr(hs, "score_batch", refuse)  # our plain Transformer: tree rows only
    assert hs.evaluate(model, tok, exs, batch_size=2, progress=False) == want
    monkeypatch.undo()
    monkeypatch.setattr(hs, "score_batch_tree", refuse)  # any other model: full rows only
    assert hs.evaluate(LogitsOnly(model), tok, exs, batch_size=2, device="cpu", progress=False) == want


class FixedLogProbs(torch.nn.Module):
    """A fake LM: the same next-token log-probabilities at every position."""

    def __init__(self, logp: dict[str, float], vocab: int = 264):
        super().__init__()
        rest = (1.0 - sum(math.exp(v) for v in logp.values())) / (vocab - len(logp))
        table = torch.full((vocab,), math.log(rest), dtype=torch.float64)
        for ch, v in logp.items():
            table[ord(ch)] = v
        self.register_buffer("table", table)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.float().expand(*tokens.shape, -1)  # (B, T, V); log_softmax gives back the table


def test_tree_rows_with_one_token_endings() -> None:
    # " x" merges to one token: that ending has no input tokens of its own in the row
    model, tok = tiny_model(seed=1), ByteTokenizer(merges=(" x", " yy"))
    exs = [hs.Example("Short.", ["x", "yy", "x y", "zzz zz"], 0),
           hs.Example("A much longer context than the other one.", ["x", "x", "yy", "q"], 2)]
    with torch.no_grad():
        ref = reference_scores(model, tok, exs, True)
    assert ref[0][0][1] == 1  # a one-token continuation
    enc = [hs._encode(tok, e, True) for e in exs]
    for (lls, _), rows in zip(hs.score_batch_tree(model, enc, torch.device("cpu"), None), ref,
                              strict=True):
        assert lls == pytest.approx([ll for ll, _ in rows], abs=1e-4)
    one = [hs._encode(tok, hs.Example("Ctx.", ["x", "x", "x", "x"], 0), True)]  # every ending 1 token
    lls, _ = hs.score_batch_tree(model, one, torch.device("cpu"), None)[0]
    assert lls == pytest.approx([reference_scores(model, tok, [hs.Example("Ctx.", ["x"] * 4, 0)], True)[0][0][0]] * 4,
                                abs=1e-4)


def test_three_scores_use_their_own_divisors() -> None:
    # Endings A="x", B="yyy", C="zz", D="wwww"; each is scored as " " + ending (one byte per token), so
    # ll(A)=s+x=-6, ll(B)=s+3y=-11.2, ll(C)=s+2z=-8.2, with s=-2, x=-4, y=-3.0667, z=-3.1, w=-20:
    #   acc:            max ll              -> A
    #   acc_norm:       max ll / len(end)   -> B (-3.73 > -4.1 > -6)   lm-eval: characters, no space
    #   acc_token_norm: max ll / n_tokens   -> C (-2.733 > -2.8 > -3)   (n_tokens = len + 1 here)
    # Dividing acc_norm by len(" " + end) instead would pick C, and summing over the context would not
    # give these numbers at all.
    model = FixedLogProbs({" ": -2.0, "x": -4.0, "y": -9.2 / 3, "z": -3.1, "w": -20.0})
    tok = ByteTokenizer()
    expect = {0: (1, 0, 0), 1: (0, 1, 0), 2: (0, 0, 1), 3: (0, 0, 0)}
    for label, (acc, acc_norm, acc_tok) in expect.items():
        ex = hs.Example(context="Some context.", endings=["x", "yyy", "zz", "wwww"], label=label)
        res = hs.evaluate(model, tok, [ex], progress=False, add_bos=False, device="cpu")
        assert res == {"acc": acc, "acc_norm": acc_norm, "acc_token_norm": acc_tok, "n": 1}, label


def test_add_bos_convention() -> None:
    class NoBos(Tokenizer):
        bos_id = None

    class Flagged(Tokenizer):
        bos_id, add_bos = 1, False

    assert evaluation.resolve_add_bos(ByteTokenizer(), None) is True
    assert evaluation.resolve_add_bos(NoBos(), None) is False
    assert evaluation.resolve_add_bos(Flagged(), None) is False
    assert evaluation.resolve_add_bos(Flagged(), True) is True


# ---- distributed: 2 gloo ranks == 1 process on 5 examples (not divisible by 2) -----------------------------
def _dist_worker(rank: int, world: int, port: int, data: str, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, tok = tiny_model(), ByteTokenizer()
        res = hs.hellaswag_hook(model, tok, data, limit=5, batch_size=2, add_bos=True)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def _five_examples(tmp_path: Path) -> Path:
    lines = GOLDEN.read_text().splitlines()
    demo = lhd.build_demo(n=3, seed=7)
    path = tmp_path / "five.jsonl"
    path.write_text("\n".join(lines + [json.dumps(d) for d in demo]) + "\n")  # 6 records; limit=5
    return path


def test_two_gloo_ranks_equal_single_process(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    data = _five_examples(tmp_path)
    exs = hs.load_examples(data, limit=5)
    assert len(exs) == 5
    model, tok = tiny_model(), ByteTokenizer()
    single = hs.evaluate(model, tok, exs, batch_size=2, progress=False, add_bos=True)
    with torch.no_grad():
        assert single == reference_metrics(reference_scores(model, tok, exs, True), exs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker, args=(2, port, str(data), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == single  # padding copy never counted


# ---- bad data -------------------------------------------------------------------------------------------------------
def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    good = GOLDEN.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good[0] + "\n{not json\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON"):
        hs.read_jsonl(bad)
    rec = json.loads(good[0])
    rec["endings"] = rec["endings"][:3]
    bad.write_text(good[0] + "\n\n" + json.dumps(rec) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:3: 'endings' must be a list of 4 strings"):
        hs.read_jsonl(bad)
    rec = json.loads(good[0])
    del rec["ctx_b"]
    bad.write_text(json.dumps(rec) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:1: missing field\(s\) ctx_b"):
        lhd.load_source(str(bad))
    rec = json.loads(good[0])
    rec["label"] = "7"
    bad.write_text(json.dumps(rec) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:1: 'label' must be 0\.\.3"):
        hs.read_jsonl(bad)


def test_loader_cli_local_file_and_errors(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "data" / "val.jsonl"
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "load_hellaswag_dataset.py"), *a],
                                    capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    r = run("--source", str(GOLDEN), "--out", str(out))
    assert r.returncode == 0, r.stderr
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [d["label"] for d in written] == [3, 0, 1] and all(isinstance(d["label"], int) for d in written)
    assert [hs.render(d) for d in written] == hs.load_examples(GOLDEN)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOLDEN.read_text().splitlines()[0] + "\n[1, 2]\n")
    r = run("--source", str(bad), "--out", str(tmp_path / "never.jsonl"))
    assert r.returncode == 2 and f"{bad}:2: expected a JSON object" in r.stderr
    assert not list(tmp_path.glob("never.jsonl*"))  # nothing partial on disk

    r = run("--out", str(tmp_path / "never.jsonl"))  # default = official URL; no network here
    assert r.returncode == 2 and "--source FILE" in r.stderr and r.stderr.count("\n") == 1


def test_clis_start_from_another_directory_without_pythonpath(tmp_path: Path) -> None:
    """`python /path/to/FILE.py` puts the repository on sys.path itself: no PYTHONPATH, any working directory."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for script in ("hellaswag_utils.py", "load_hellaswag_dataset.py"):
        r = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=120)
        assert r.returncode == 0 and r.stdout.startswith("usage:"), (script, r.stderr[-2000:])


def test_hf_layout_via_datasets(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(x) for x in GOLDEN.read_text().splitlines()]
    for r in rows:
        r["label"] = str(r["label"])  # Rowan/hellaswag stores the label as a string
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "validation.parquet")
    recs = lhd.load_source(str(tmp_path / "validation.parquet"))
    assert [r["label"] for r in recs] == [3, 0, 1]
    assert [hs.render(r) for r in recs] == hs.load_examples(GOLDEN)


def test_demo_set_is_deterministic_and_valid() -> None:
    a, b = lhd.build_demo(n=40, seed=5), lhd.build_demo(n=40, seed=5)
    assert a == b and a != lhd.build_demo(n=40, seed=6)
    for i, d in enumerate(a):
        hs.validate_record(d, f"demo[{i}]")
        assert d["split_type"] == "demo" and d["source_id"].startswith("demo:pydoc_data.topics/")
        assert len(set(d["endings"])) == 4
    assert len({d["label"] for d in a}) == 4


def test_cli_end_to_end_matches_in_process(tmp_path: Path) -> None:
    # A tiny model exported as an HF dir + the project's tiktoken tokenizer: the CLI's JSON line must equal
    # evaluate() on the same weights (tiktoken convention: BOS prepended).
    import model_utils
    import tokenizer as tokenizer_mod

    tok = tokenizer_mod.load_tokenizer(ROOT / "tokenizer.model")
    model = helpers.tiny_model(std=0.3, dim=32, multiple_of=16, vocab_size=tok.vocab_size, max_seq_len=256)
    args = model.args
    model_utils.export_hf(model, args, tmp_path / "hf")
    loaded, _ = model_utils.load_model(tmp_path / "hf")
    want = hs.evaluate(loaded, tok, hs.load_examples(GOLDEN), batch_size=2, progress=False)
    r = subprocess.run([sys.executable, str(ROOT / "hellaswag_utils.py"), "--model", str(tmp_path / "hf"),
                        "--tokenizer", str(ROOT / "tokenizer.model"), "--data", str(GOLDEN), "--batch-size", "2"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert {k: got[k] for k in want} == want and got["add_bos"] is True and got["seconds"] > 0
    r = subprocess.run([sys.executable, str(ROOT / "hellaswag_utils.py"), "--model", str(tmp_path / "hf"),
                        "--tokenizer", str(ROOT / "tokenizer.model"), "--data", str(tmp_path / "missing.jsonl")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 2 and "missing.jsonl does not exist" in r.stderr


def test_demo_file_is_found_by_the_default_path(tmp_path: Path, monkeypatch, capsys) -> None:
    """`load_hellaswag_dataset.py --demo` then the evaluator with default paths: the demo set is read (with a
    note saying it is demo data) while the real file is absent, and the real file wins once it exists."""
    monkeypatch.chdir(tmp_path)
    assert lhd.main(["--demo", "--demo-n", "12"]) == 0
    capsys.readouterr()
    demo = hs.load_examples(hs.DEFAULT_DATA)
    assert len(demo) == 12 and "DEMO" in capsys.readouterr().err
    real = lhd.build_demo(n=5, seed=99)
    lhd.write_jsonl_atomic(real, hs.DEFAULT_DATA)
    assert len(hs.load_examples(hs.DEFAULT_DATA)) == 5 and "DEMO" not in capsys.readouterr().err
    with pytest.raises(UserError, match="nowhere.jsonl"):  # an explicit path never falls back
        hs.load_examples(tmp_path / "nowhere.jsonl")
