"""Tokenizer tests against independent references: Meta's own tokenizer.model and ids, transformers'
GGUF tokenizer and apply_chat_template (incl. its {% generation %} assistant mask), hand-derived BPE merges."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import tokenizer as T
from errors import UserError
from fileio import sha256_file

ROOT = Path(__file__).resolve().parent.parent
LLAMA_MODELS_VERSION = "0.3.0"  # PyPI package that ships Meta's Llama 3 tokenizer.model
META_TOKENIZER_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Python build the committed tokenizer.model was trained on (the embedded corpus follows the stdlib).
COMMITTED_PYTHON = (3, 11, 7)


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=check, timeout=300)


@pytest.fixture(scope="session")
def meta_model_file(tmp_path_factory) -> Path:
    """Meta's Llama 3 tokenizer.model from the llama-models wheel (installed, or fetched with pip)."""
    spec = importlib.util.find_spec("llama_models")
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "llama3" / "tokenizer.model"
        if path.is_file() and sha256_file(path) == META_TOKENIZER_SHA256:
            return path
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama3-train-tests"
    path = cache / f"llama_models-{LLAMA_MODELS_VERSION}" / "tokenizer.model"
    if not path.is_file():
        wheel_dir = tmp_path_factory.mktemp("wheel")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        f"llama-models=={LLAMA_MODELS_VERSION}", "-d", str(wheel_dir)], check=True, timeout=300)
        (wheel,) = wheel_dir.glob("*.whl")
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            (path.parent / "tokenizer.model.tmp").write_bytes(z.read("llama_models/llama3/tokenizer.model"))
        os.replace(path.parent / "tokenizer.model.tmp", path)
    assert sha256_file(path) == META_TOKENIZER_SHA256
    return path


@pytest.fixture(scope="session")
def meta(meta_model_file) -> T.Tokenizer:
    return T.load_tokenizer(meta_model_file)


@pytest.fixture(scope="session")
def own() -> T.Tokenizer:
    return T.load_tokenizer(ROOT / "tokenizer.model")


@pytest.fixture(scope="session")
def smol_path() -> Path:
    from model_utils import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="session")
def smol(smol_path) -> T.Tokenizer:
    return T.load_tokenizer(smol_path)


@pytest.fixture(scope="session")
def smol_hf(smol_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_path.parent, gguf_file=smol_path.name)


# ------------------------------------------------------------------------------------- Meta's tokenizer


def test_meta_file_ids(meta):
    assert meta.kind == "tiktoken"
    assert meta.encode("Hello world") == [9906, 1917]
    assert meta.encode("Hello world", bos=True, eos=True) == [128000, 9906, 1917, 128001]
    sp = meta.special_tokens
    assert (sp["<|begin_of_text|>"], sp["<|end_of_text|>"]) == (128000, 128001)
    assert (sp["<|start_header_id|>"], sp["<|end_header_id|>"], sp["<|eot_id|>"]) == (128006, 128007, 128009)
    assert sp["<|reserved_special_token_4|>"] == 128008 and sp["<|reserved_special_token_250|>"] == 128255
    assert (meta.bos_id, meta.eos_id, meta.eot_id, meta.pad_id) == (128000, 128001, 128009, 128004)
    assert meta.vocab_size == meta.n_words == 128256 and len(sp) == 256
    assert meta.decode([128000, 9906, 1917, 128009]) == "<|begin_of_text|>Hello world<|eot_id|>"


def test_llama3_two_turn_dialog_exact(meta):
    # Expected ids written from the format spec: BOS, then per turn
    # <|start_header_id|>(128006) role <|end_header_id|>(128007) "\n\n"(271) content <|eot_id|>(128009).
    # Role ids: system 9125, user 882, assistant 78191. Content ids: Meta's BPE of each (stripped) string.
    dialog = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2 equals 4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": " 6.\n"},  # stripped like Meta's ChatFormat
    ]
    expected = [
        128000,
        128006, 9125, 128007, 271, 2675, 527, 264, 11190, 18328, 13, 128009,
        128006, 882, 128007, 271, 3923, 374, 220, 17, 10, 17, 30, 128009,
        128006, 78191, 128007, 271, 17, 10, 17, 17239, 220, 19, 13, 128009,
        128006, 882, 128007, 271, 3112, 220, 18, 10, 18, 30, 128009,
        128006, 78191, 128007, 271, 21, 13, 128009,
    ]
    expected_mask = (
        [0]  # BOS
        + [0] * 11  # system: header(4) + 6 content + eot
        + [0] * 12  # user: header(4) + 7 content + eot
        + [0, 0, 0, 0] + [1] * 8  # assistant: header, then 7 content + eot trained
        + [0] * 11  # user: header(4) + 6 content + eot
        + [0, 0, 0, 0] + [1, 1, 1]  # assistant: header, then "6." + eot trained
    )
    ids, mask = T.ChatFormat(meta).encode_dialog(dialog)
    assert ids == expected
    assert mask == expected_mask
    ids2, mask2 = T.ChatFormat(meta).encode_dialog(dialog[:4], add_generation_prompt=True)
    assert ids2 == expected[:47] + [128006, 78191, 128007, 271]
    assert mask2 == expected_mask[:47] + [0, 0, 0, 0]


def test_special_strings_stay_text_unless_allowed(meta, own):
    for tok in (meta, own):
        n_base = tok.vocab_size - 256
        text = "a <|eot_id|> b <|begin_of_text|>"
        plain = tok.encode(text)
        assert max(plain) < n_base and tok.decode(plain) == text
        eot, bot = tok.special_tokens["<|eot_id|>"], tok.special_tokens["<|begin_of_text|>"]
        some = tok.encode(text, allowed_special={"<|eot_id|>"})
        assert some.count(eot) == 1 and bot not in some and tok.decode(some) == text
        every = tok.encode(text, allowed_special="all")
        assert every.count(eot) == 1 and every.count(bot) == 1 and tok.decode(every) == text
    # A user who types a control token cannot end the turn or earn loss.
    ids, mask = T.ChatFormat(meta).encode_dialog([{"role": "user", "content": "x<|eot_id|>"},
                                                   {"role": "assistant", "content": "ok"}])
    assert ids.count(128009) == 2 and sum(mask) == 2


def test_matches_raw_tiktoken_and_round_trips(meta, own, meta_model_file):
    import tiktoken

    raw = tiktoken.Encoding(name="ref", pat_str=T.LLAMA3_PAT, special_tokens={},
                            mergeable_ranks=T.read_tiktoken_file(meta_model_file))
    samples = ["", " ", "\n\n\n", "  leading\tand trailing  ", "héllo wörld ß ẞ", "世界 こんにちは 🙂👍🏽",
               "tabs\t\tand\r\nCRLF", "don't I'LL we've", "1234567 3.14159", "\u200b\u00a0nbsp", "a" * 1000]
    for s in samples:
        assert meta.encode(s) == raw.encode_ordinary(s)
        for tok in (meta, own):
            assert tok.decode(tok.encode(s)) == s


def test_hf_backend_of_meta_ranks_equals_tiktoken(meta):
    # The tokenizer.json an HF export writes, built from Meta's 128k ranks: Meta's ids (tests/test_hf_export.py
    # checks ours through transformers' AutoTokenizer).
    from tokenizers import pre_tokenizers

    assert sorted(T.byte_level_alphabet()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = meta.to_hf_backend()
    assert backend.get_vocab_size(with_added_tokens=True) == 128256
    assert backend.encode("Hello world").ids == [128000, 9906, 1917]
    assert backend.token_to_id("<|eot_id|>") == 128009
    backend.encode_special_tokens = True  # compare plain text: special-token strings are text in encode()
    texts = list(T.embedded_corpus())[::3] + [
        "  \r\n\r\n  x\r\n", "\n\n\n", "1234567890123", "日本語のテキスト", "Привет, мир!", "🙂👍🏽 👨‍👩‍👧‍👦",
        "don't I'LL 's", "\u200b\u00a0x", " " * 3000 + "a", "mixed: naïve café 東京 42€ 🙂\r\n\tend", "a<|eot_id|>",
        # pre-tokens that are Meta tokens but which its merges alone would split: ignore_merges matters here
        "Nhiều việc ở Việt Nam; ایران; geliyor mektedir"]
    assert [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)] == [meta.encode(t) for t in texts]
    assert backend.decode(meta.encode(texts[0])) == texts[0]
    assert len(meta.encode(" việc")) == 1  # one Meta token; its merges alone give more than one


def test_long_inputs_round_trip(own):
    # > 400k characters plus runs of > 25k spaces / non-spaces: the cases tiktoken cannot take in one call.
    text = ("The quick brown fox. Ünïcödé 🙂\n" * 14_000) + " " * 30_000 + "x" * 30_000 + "\n end"
    assert len(text) > 400_000
    ids = own.encode(text)
    assert own.decode(ids) == text


def test_encode_array_equals_encode(own):
    # the data-prep fast path (tiktoken's numpy buffer) gives encode()'s ids: plain text, special-token
    # text (plain text unless allowed), the over-long split, empty
    texts = list(T.embedded_corpus())[:20] + ["<|begin_of_text|>hi<|eot_id|> x", "x" * 30_000 + " end", ""]
    for text in texts:
        arr = own.encode_array(text)
        assert arr.dtype.kind == "u" and arr.tolist() == own.encode(text)
    assert own.encode_array("<|eot_id|>").tolist() != [own.special_tokens["<|eot_id|>"]]


def test_long_run_probe_never_misses_a_run():
    # the cheap probe may say "maybe" for a run of h+1..2h characters, but must say yes for every run of
    # more than max_run characters: checked against a full scan on random space/word texts
    import random
    import re

    rng = random.Random(0)
    for max_run in (1, 2, 3, 6, 7):
        full = re.compile(rf"\s{{{max_run + 1}}}|\S{{{max_run + 1}}}")
        for _ in range(3000):
            text = "".join(rng.choice(" \tab\u00e9\n") * rng.randint(1, 2 * max_run + 3)
                           for _ in range(rng.randint(0, 8)))
            if full.search(text):
                assert T._may_hold_long_run(text, max_run), (max_run, text)
    assert not T._may_hold_long_run("word " * 20_000)
    assert T._may_hold_long_run("word " * 10 + "x" * 25_001 + " end")
    assert T._may_hold_long_run("x" * 10 + " " * 25_001)


def test_round_trip_property(own):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=150, deadline=None)
    @given(st.text(max_size=200))
    def check(s: str) -> None:
        assert own.decode(own.encode(s)) == s

    check()


# ----------------------------------------------------------------------------------------- GGUF / HF


def test_gguf_ids_match_transformers(smol, smol_hf):
    assert smol.kind == "gguf" and smol.vocab_size == len(smol_hf) == 49152
    assert (smol.bos_id, smol.eos_id) == (smol_hf.bos_token_id, smol_hf.eos_token_id)
    assert smol.eot_id == smol_hf.convert_tokens_to_ids("<|im_end|>")
    texts = ["Hello world", "  leading spaces\n\nand\ttabs ", "héllo 世界 🙂 naïve", "12345 + 678 = 7023",
             "def f(x):\n    return x**2  # comment", "don't STOP it's", ""]
    for s in texts:
        assert smol.encode(s) == smol_hf.encode(s, add_special_tokens=False), s
        assert smol.decode(smol.encode(s)) == s
    chat = "<|im_start|>user\nHi there<|im_end|>\n"
    assert smol.encode(chat, allowed_special="all") == smol_hf.encode(chat, add_special_tokens=False)
    assert 1 not in smol.encode(chat)  # not allowed: the marker is plain text


CHATML_WITH_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_chatml_ids_and_mask_match_transformers(smol, smol_hf):
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    fmt = T.ChatFormat(smol)
    assert fmt.style == "template"
    ids, mask = fmt.encode_dialog(dialog)
    # The file's own template gives the ids; the same ChatML with {% generation %} around assistant
    # content + <|im_end|> gives transformers' independent assistant mask.
    assert ids == smol_hf.apply_chat_template(dialog, tokenize=True, return_dict=True)["input_ids"]
    ref = smol_hf.apply_chat_template(dialog, chat_template=CHATML_WITH_GENERATION, tokenize=True,
                                      return_dict=True, return_assistant_tokens_mask=True)
    assert ids == ref["input_ids"]
    assert mask == ref["assistant_masks"]
    assert [i for i, m in zip(ids, mask, strict=True) if m].count(smol.eot_id) == 2
    gen_ids, gen_mask = fmt.encode_dialog(dialog[:4], add_generation_prompt=True)
    assert gen_ids == smol_hf.apply_chat_template(dialog[:4], add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]
    assert gen_ids[-4:] == smol_hf.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert sum(gen_mask) == sum(mask[:len(gen_ids) - 4])
    # The default system prompt the template inserts is never trained on.
    ids3, mask3 = fmt.encode_dialog(dialog[1:3])
    assert smol.decode([i for i, m in zip(ids3, mask3, strict=True) if m]) == "Hello! How can I help?<|im_end|>"


def test_hf_dir_matches_gguf(smol, smol_hf, tmp_path):
    smol_hf.save_pretrained(tmp_path)
    hf = T.load_tokenizer(tmp_path)
    assert hf.kind == "hf" and hf.vocab_size == smol.vocab_size
    assert (hf.bos_id, hf.eos_id, hf.eot_id) == (smol.bos_id, smol.eos_id, smol.eot_id)
    s = "Hello <|im_end|> wörld\n\n 42"
    assert hf.encode(s) == smol.encode(s) and hf.encode(s, allowed_special="all") == smol.encode(s, allowed_special="all")
    dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert T.ChatFormat(hf).encode_dialog(dialog) == T.ChatFormat(smol).encode_dialog(dialog)
    ident = hf.identity()
    assert ident["sha256"] == hf.identity()["sha256"] and len(ident["sha256"]) == 64


def test_sources_and_errors(tmp_path, own, smol_path):
    with pytest.raises(UserError, match="not found"):
        T.load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(UserError, match="hub"):
        T.load_tokenizer("no-such-org-xyz/no-such-model")  # offline: a clear error, not a traceback
    bad = tmp_path / "bad.model"
    bad.write_text("aGVsbG8= 0\nnot-base64!! 1\n")
    with pytest.raises(UserError, match="bad.model:2"):
        T.load_tokenizer(bad)
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    (meta_dir / "tokenizer.model").write_bytes((ROOT / "tokenizer.model").read_bytes())
    assert T.load_tokenizer(meta_dir).encode("Hello world") == own.encode("Hello world")
    ident = own.identity()
    assert ident == {"kind": "tiktoken", "source": str((ROOT / "tokenizer.model").resolve()),
                     "sha256": hashlib.sha256((ROOT / "tokenizer.model").read_bytes()).hexdigest(),
                     "vocab_size": 8448, "bos_id": 8192, "eos_id": 8193, "eot_id": 8201, "pad_id": 8196}
    assert pickle.loads(pickle.dumps(own)).encode("pickle me") == own.encode("pickle me")


# ------------------------------------------------------------------------------------- BOS convention


def _gguf_vocab(path: Path, add_bos: bool | None, bos: int | None = 0) -> Path:
    """A metadata-only byte-level GGUF vocabulary: <s> (control), a, b, ab."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<s>", "a", "b", "ab"])
    w.add_token_types([3, 1, 1, 1])
    w.add_token_merges(["a b"])
    if bos is not None:
        w.add_bos_token_id(bos)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _hf_vocab(out: Path, post_processor: bool, bos: str | None = "<|begin_of_text|>") -> Path:
    """A tokenizer.json + tokenizer_config.json whose BOS is named like Llama 3's, with or without a
    post-processor that prepends it."""
    from tokenizers import AddedToken, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as RawTokenizer

    raw = RawTokenizer(models.BPE(vocab={"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "a": 2, "b": 3, "ab": 4},
                                  merges=[("a", "b")]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.add_special_tokens([AddedToken("<|begin_of_text|>", special=True), AddedToken("<|end_of_text|>", special=True)])
    if post_processor:
        raw.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
    out.mkdir()
    raw.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|end_of_text|>"}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg | ({"bos_token": bos} if bos else {})))
    return out


def test_wants_bos_tiktoken(own, meta):
    assert own.wants_bos is True and meta.wants_bos is True  # <|begin_of_text|> starts every document
    tok = T.load_tokenizer(ROOT / "tokenizer.model")
    tok.add_bos = False  # an explicit choice wins over the backend's convention
    assert tok.wants_bos is False and own.wants_bos is True


def test_wants_bos_gguf_follows_its_add_bos_flag(smol, smol_hf, tmp_path):
    # SmolLM2: BOS is <|im_start|> and add_bos_token is false; transformers' default encode agrees.
    assert smol.wants_bos is False
    assert smol_hf("a")["input_ids"][:1] != [smol_hf.bos_token_id]
    assert T.load_tokenizer(_gguf_vocab(tmp_path / "yes.gguf", True)).wants_bos is True
    assert T.load_tokenizer(_gguf_vocab(tmp_path / "no.gguf", False)).wants_bos is False
    assert T.load_tokenizer(_gguf_vocab(tmp_path / "unset.gguf", None)).wants_bos is True
    assert T.load_tokenizer(_gguf_vocab(tmp_path / "nobos.gguf", True, bos=None)).wants_bos is False


def test_wants_bos_hf_follows_its_post_processor(smol_hf, tmp_path):
    """The rule equals transformers' default encode (lm-evaluation-harness's HellaSwag convention): the BOS
    token's name does not matter, only whether the post-processor prepends it."""
    from transformers import AutoTokenizer

    smol_hf.save_pretrained(tmp_path / "smol")
    dirs = {"smol": (tmp_path / "smol", False),
            "llama-named, no post-processor": (_hf_vocab(tmp_path / "plain", False), False),
            "llama-named, prepends": (_hf_vocab(tmp_path / "template", True), True)}
    for name, (d, want) in dirs.items():
        ours, ref = T.load_tokenizer(d), AutoTokenizer.from_pretrained(d)
        assert ours.kind == "hf" and ours.wants_bos is want, name
        assert (ref("ab")["input_ids"][:1] == [ref.bos_token_id]) is want, name
        assert ours.encode("ab", bos=ours.wants_bos) == ref("ab")["input_ids"], name
    assert T.load_tokenizer(_hf_vocab(tmp_path / "nobos", True, bos=None)).wants_bos is False


# ---------------------------------------------------------------------------------------------- BPE


def test_bpe_hand_example():
    # "aaabdaaabac" is one Llama 3 pre-token. Pair counts: aa=4, ab=2, others 1 -> merge "aa";
    # then (a,b)=2 ties (aa,a)=2, smaller ids win -> "ab"; then (aa,ab)=2 -> "aaab"; then all 1s,
    # smallest pair (a=97, c=99) -> "ac".
    ranks = T.train_bpe(["aaabdaaabac"], vocab_size=260, progress=False)
    assert [t for t, r in sorted(ranks.items(), key=lambda kv: kv[1])][256:] == [b"aa", b"ab", b"aaab", b"ac"]
    assert all(ranks[bytes([b])] == b for b in range(256))


def test_bpe_deterministic_and_order_free():
    docs = list(T.embedded_corpus())[:40]
    a = T.train_bpe(docs, 1024, progress=False)
    assert a == T.train_bpe(list(reversed(docs)), 1024, progress=False)
    assert len(a) == 1024 and sorted(a.values()) == list(range(1024))


def test_train_cli_reproducible(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(list(T.embedded_corpus())[:10]), encoding="utf-8")
    outs = []
    for name in ("a.model", "b.model"):
        r = _run("tokenizer.py", "train", "--input", str(src), "--vocab-size", "600", "--out", str(tmp_path / name))
        assert "600 ranks" in r.stdout
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]
    tok = T.load_tokenizer(tmp_path / "a.model")
    assert tok.vocab_size == 856 and tok.decode(tok.encode(src.read_text())) == src.read_text()
    r = _run("tokenizer.py", "train", "--input", str(tmp_path / "nope.txt"), "--vocab-size", "300",
             "--out", str(tmp_path / "c.model"), check=False)
    assert r.returncode == 2 and r.stderr.startswith("error:") and not (tmp_path / "c.model").exists()
    r = _run("tokenizer.py", "encode", "--tokenizer", str(tmp_path / "a.model"), "--text", "hi", "--bos")
    assert json.loads(r.stdout) == [600] + tok.encode("hi")
    assert _run("tokenizer.py", "--help").returncode == 0


def test_committed_tokenizer_model_reproduces(tmp_path):
    """`python tokenizer.py train --vocab-size 8192 --out tokenizer.model` rebuilds the committed file."""
    if sys.version_info[:3] != COMMITTED_PYTHON:
        pytest.skip(f"embedded corpus follows the stdlib; committed file was trained on Python {COMMITTED_PYTHON}")
    out = tmp_path / "tokenizer.model"
    _run("tokenizer.py", "train", "--vocab-size", "8192", "--out", str(out))
    assert out.read_bytes() == (ROOT / "tokenizer.model").read_bytes()
