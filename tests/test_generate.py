"""generate.py: sampling rules against hand-computed distributions, batching = one prompt at a time,
stop ids; SmolLM2-135M-Instruct (GGUF) answers a factual chat question via the API and the CLI."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_model

import tokenizer as tokenizer_mod
from errors import UserError
from generate import (
    ChatSession,
    Decoder,
    RowStops,
    Sampling,
    TextStream,
    chat_loop,
    decode_n_tokens,
    fit_dialog,
    generate,
    left_pad,
    prefill,
)
from model import Transformer
from model_utils import load_model, smollm2_gguf

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def tiny() -> Transformer:
    return tiny_model(std=0.3).eval()


def test_left_pad_layout():
    tokens, key_mask, positions = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert tokens.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert key_mask.tolist() == [[True, True, True], [False, False, True]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_top_k_and_top_p_keep_exactly_the_expected_tokens():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    draw = lambda **kw: {int(Sampling(1.0, generator=g, **{"top_k": None, "top_p": None, **kw}).pick(logits))
                         for _ in range(300)}
    assert draw(top_k=2) == {1, 3}
    assert draw(top_p=0.75) == {1, 3}  # 0.5 < 0.75 <= 0.8: the nucleus is the first two
    assert draw(top_p=0.81) == {1, 3, 2}
    assert draw(top_p=0.3) == {1}  # the most likely token is always kept
    assert draw() == {0, 1, 2, 3}
    assert int(Sampling(0.0).pick(logits)) == 1  # greedy


def _truncated_distribution(logits: torch.Tensor, temperature: float, top_k: int | None,
                            top_p: float | None) -> torch.Tensor:
    """The distribution top-k then top-p sampling draws from, one row at a time in float64: the top_k most likely
    tokens, then of those (renormalized) the most likely ones until their mass reaches top_p."""
    out = torch.zeros(logits.shape, dtype=torch.float64)
    for b, row in enumerate(logits.double()):
        probs = torch.softmax(row / temperature, dim=-1)
        kept = sorted(range(len(row)), key=lambda i: -float(probs[i]))[: top_k or len(row)]
        mass = sum(float(probs[i]) for i in kept)
        if top_p is not None:
            nucleus, acc = [], 0.0
            for i in kept:
                nucleus.append(i)
                acc += float(probs[i]) / mass
                if acc >= top_p:
                    break
            kept = nucleus
        for i in kept:
            out[b, i] = probs[i] / sum(float(probs[j]) for j in kept)
    return out


def test_sampling_filter_equals_a_direct_computation():
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(3)) * 2
    for temperature, top_k, top_p in [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.6), (1.0, 12, 0.9),
                                      (2.0, 40, 1.0), (0.5, 1, 0.5)]:
        got = Sampling(temperature, top_k, top_p).filtered(logits).softmax(dim=-1)
        torch.testing.assert_close(got.double(), _truncated_distribution(logits, temperature, top_k, top_p),
                                   atol=1e-6, rtol=1e-5)
    with pytest.raises(UserError, match="top_k=0"):
        Sampling(1.0, top_k=0)
    with pytest.raises(UserError, match="top_p=1.5"):
        Sampling(1.0, top_p=1.5)


def test_row_stops_report_live_rows_and_finish_when_all_rows_stopped():
    seen: list[tuple[int, int]] = []
    rows = RowStops(3, [7, 9], torch.device("cpu"), on_token=lambda row, t: seen.append((row, t)))
    assert not rows.update(torch.tensor([1, 7, 2]))
    assert not rows.update(torch.tensor([9, 3, 4]))  # row 0 stops; row 1's token comes after its stop
    assert rows.update(torch.tensor([5, 5, 7]))
    assert seen == [(0, 1), (2, 2), (2, 4)]
    # processes decoding together finish together: the agreement decides, not this process's rows
    together = RowStops(1, [7], torch.device("cpu"), all_ranks_done=lambda mine: False)
    assert not together.update(torch.tensor([7]))


def test_prefill_and_decode_n_tokens_equal_generate_and_a_full_forward(tiny):
    """The pieces generate() runs (prefill, then decode_n_tokens over the Decoder's steps with a seeded Sampling)
    give generate()'s tokens and logits, and each step's logits equal a forward of the prompt plus the tokens so
    far without a KV cache."""
    prompts = [[3, 14, 15, 92, 65], [35], [89, 79, 32]]
    want, want_logits = generate(tiny, prompts, 6, temperature=1.0, top_k=20, seed=5, return_logits=True)
    tokens, key_mask, positions = left_pad(prompts)
    sampling = Sampling.seeded(1.0, 20, None, 5, torch.device("cpu"))
    seen: list[torch.Tensor] = []
    tiny.setup_caches(3, 5 + 6, fuse_projections=True)
    try:
        with torch.no_grad(), Decoder(tiny, positions, key_mask, compile=False) as decoder:
            logits = prefill(tiny, tokens, positions, key_mask)
            new = decode_n_tokens(decoder, logits, 6, sampling, RowStops(3, (), torch.device("cpu")),
                                  seen_logits=seen)
    finally:
        tiny.clear_caches()
    assert new.tolist() == want
    assert torch.equal(torch.stack(seen, 1), want_logits)
    for n in range(6):
        full_tokens, full_mask, full_positions = left_pad([p + r[:n] for p, r in zip(prompts, want, strict=True)])
        with torch.no_grad():
            ref = tiny(full_tokens, positions=full_positions, key_mask=full_mask)[:, -1]
        torch.testing.assert_close(seen[n], ref, atol=1e-5, rtol=1e-5)


def test_batched_generation_equals_one_prompt_at_a_time(tiny):
    prompts = [[3, 14, 15, 92, 65], [35], [89, 79, 32]]
    batched = generate(tiny, prompts, 12)
    assert batched == [generate(tiny, [p], 12)[0] for p in prompts]
    # seeded sampling is reproducible, and top_k=1 is greedy
    a = generate(tiny, prompts, 8, temperature=1.0, seed=7)
    assert a == generate(tiny, prompts, 8, temperature=1.0, seed=7)
    assert generate(tiny, prompts, 8, temperature=1.0, top_k=1, seed=1) == [r[:8] for r in batched]


def test_stop_ids_cut_each_row(tiny):
    prompts = [[3, 14, 15], [35, 8]]
    free = generate(tiny, prompts, 10)
    stop = free[0][4]  # row 0 stops at its 5th token (or earlier if it appeared before)
    cut = generate(tiny, prompts, 10, stop_ids=[stop])
    for row_free, row_cut in zip(free, cut, strict=True):
        expect = row_free[: row_free.index(stop)] if stop in row_free else row_free
        assert row_cut == expect


def test_bad_arguments_are_user_errors(tiny):
    with pytest.raises(UserError):
        generate(tiny, [[1]], 4, temperature=1.0, top_p=0.0)
    with pytest.raises(UserError):
        generate(tiny, [[]], 4)


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf()
    model, _ = load_model(path)
    return model, tokenizer_mod.load_tokenizer(path), path


def test_smollm2_chat_answer_via_api(smollm2):
    model, tok, _ = smollm2
    ids, _ = tokenizer_mod.ChatFormat(tok).encode_dialog([{"role": "user", "content": QUESTION}],
                                                         add_generation_prompt=True)
    # batched with a plain prompt of another length, so the left-padding path carries a real answer
    out = generate(model, [ids, tok.encode("The capital of Italy is")], 12, stop_ids=[tok.eos_id, tok.eot_id])
    assert "Paris" in tok.decode(out[0])
    assert "Rome" in tok.decode(out[1])


@pytest.mark.slow
def test_smollm2_chat_answer_via_cli(smollm2):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline"}
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(smollm2[2]), "--chat",
                        "--prompt", QUESTION, "--max-new-tokens", "12"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


# ---- streaming and the interactive chat -------------------------------------------------------------


def test_on_token_reports_exactly_the_returned_tokens(tiny):
    prompts = [[3, 14, 15, 92, 65], [35], [89, 79, 32]]
    free = generate(tiny, prompts, 10)
    stop = free[1][3]  # row 1 stops early; the other rows go on (or stop where they also sample it)
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    out = generate(tiny, prompts, 10, stop_ids=[stop], on_token=lambda row, t: seen[row].append(t))
    assert out == generate(tiny, prompts, 10, stop_ids=[stop])  # the callback changes nothing
    assert [seen[i] for i in range(3)] == out
    assert len(out[1]) < 10 and stop not in out[1]


def test_text_stream_never_splits_a_multibyte_character():
    tok = tokenizer_mod.load_tokenizer(str(ROOT / "tokenizer.model"))
    text = "naïve café — 日本語のテキスト 🙂🦙 done"
    ids = tok.encode(text)
    # the case under test occurs: some token boundary falls inside a character
    assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))
    pieces: list[str] = []
    stream = TextStream(tok, pieces.append)
    for t in ids:
        stream.push(t)
    assert stream.finish() == text
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert len(pieces) > len(text.split()) // 2  # written as it came, not all at the end


def test_fit_dialog_drops_the_oldest_exchanges_first():
    tok = tokenizer_mod.load_tokenizer(str(ROOT / "tokenizer.model"))
    fmt = tokenizer_mod.ChatFormat(tok)
    n_tokens = lambda m: len(fmt.encode_dialog(m, add_generation_prompt=True)[0])  # noqa: E731
    system = {"role": "system", "content": "Be brief."}
    turns = []
    for i in range(3):
        turns += [{"role": "user", "content": f"question number {i} about llamas"},
                  {"role": "assistant", "content": f"answer number {i}, which is rather long " * 3}]
    new = {"role": "user", "content": "and now?"}
    dialog = [system, *turns, new]
    assert fit_dialog(dialog, n_tokens, n_tokens(dialog)) == dialog  # fits: unchanged
    # one token short: the oldest exchange (user turn + reply) goes, the system message stays
    assert fit_dialog(dialog, n_tokens, n_tokens(dialog) - 1) == [system, *turns[2:], new]
    newest = [system, *turns[4:], new]
    assert fit_dialog(dialog, n_tokens, n_tokens(newest)) == newest
    assert fit_dialog(dialog, n_tokens, n_tokens(newest) - 1) == [system, new]
    assert fit_dialog(dialog[1:], n_tokens, n_tokens([new])) == [new]  # without a system message
    with pytest.raises(UserError, match="shorten the message"):
        fit_dialog(dialog, n_tokens, n_tokens([system, new]) - 1)


_ANSWERS: dict[str, str] = {}  # the SmolLM2 references, shared by the tests below (greedy: deterministic)


def _answer(model, tok, dialog: list[dict], max_new_tokens: int) -> str:
    """The reply to `dialog` without streaming: the reference for the chat session."""
    key = json.dumps([dialog, max_new_tokens])
    if key not in _ANSWERS:
        ids, _ = tokenizer_mod.ChatFormat(tok).encode_dialog(dialog, add_generation_prompt=True)
        _ANSWERS[key] = tok.decode(generate(model, [ids], max_new_tokens, stop_ids=[tok.eos_id, tok.eot_id])[0])
    return _ANSWERS[key]


def _session(model, tok, max_new_tokens: int = 16, system: str | None = None) -> ChatSession:
    return ChatSession(model, tok, system=system, max_new_tokens=max_new_tokens, sampling={},
                       stop_ids=[tok.eos_id, tok.eot_id], pad_id=0)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.mark.slow
def test_chat_keeps_the_dialog_streams_the_reply_and_resets(smollm2, monkeypatch, capsys):
    model, tok, _ = smollm2
    q1, q2 = QUESTION, "And of Italy?"
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{q1}\n\n{q2}\n/reset\n{q2}\n"))
    session = _session(model, tok)
    assert chat_loop(session, interactive=False) == 0  # end of input ends the session
    out = capsys.readouterr()
    a1 = _answer(model, tok, [_user(q1)], 16)
    a2 = _answer(model, tok, [_user(q1), _assistant(a1), _user(q2)], 16)  # the second turn sees the first
    a3 = _answer(model, tok, [_user(q2)], 16)  # after /reset: the same question without the dialog
    assert "Paris" in a1 and "Rome" in a2 and a3 != a2
    assert out.out == f"{a1}\n{a2}\n{a3}\n"  # streamed text = the non-streamed generation, turn by turn
    assert "dialog forgotten" in out.err
    assert session.history == [_user(q2), _assistant(a3)]


@pytest.mark.slow
def test_chat_drops_the_oldest_exchange_and_refuses_a_turn_too_long(smollm2, monkeypatch, capsys):
    model, tok, _ = smollm2
    system = {"role": "system", "content": "Answer in one word."}
    session = _session(model, tok, max_new_tokens=8, system=system["content"])
    session.budget = max(len(session.encode([system, _user(q)])) for q in ("Hi", "Yo"))  # one exchange fits
    monkeypatch.setattr(sys, "stdin", io.StringIO("tell me " * 50 + "\nHi\nYo\n/exit\nHi\n"))
    assert chat_loop(session, interactive=False) == 0
    out = capsys.readouterr()
    errors = [ln for ln in out.err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "shorten the message" in errors[0], out.err  # one line; the session goes on
    r1 = _answer(model, tok, [system, _user("Hi")], 8)
    assert len(session.encode([system, _user("Hi"), _assistant(r1), _user("Yo")])) > session.budget
    r2 = _answer(model, tok, [system, _user("Yo")], 8)  # the first exchange no longer fits: dropped
    assert out.out == f"{r1}\n{r2}\n"  # the long turn got no answer, nothing was read after /exit
    assert "the oldest 2 messages were dropped" in out.err
    assert session.history == [system, _user("Yo"), _assistant(r2)]
    with pytest.raises(UserError, match="lower --max-new-tokens"):
        _session(model, tok, max_new_tokens=model.args.max_seq_len)


def test_chat_prompts_on_a_terminal_and_ends_at_eof(smollm2, monkeypatch, capsys):
    model, tok, _ = smollm2
    prompts: list[str] = []

    def fake_input(prompt: str) -> str:
        prompts.append(prompt)
        raise EOFError

    monkeypatch.setattr("builtins.input", fake_input)
    assert chat_loop(_session(model, tok), interactive=True) == 0
    assert prompts == ["> "] and capsys.readouterr().out == "\n"


@pytest.mark.slow
def test_interactive_chat_cli_from_stdin(smollm2):
    model, tok, path = smollm2
    q1, q2 = QUESTION, "And of Italy?"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(path), "--chat", "--dtype", "fp32",
                        "--max-new-tokens", "16"], input=f"{q1}\n{q2}\n/exit\nWhat is the capital of Spain?\n",
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    a1 = _answer(model, tok, [_user(q1)], 16)
    a2 = _answer(model, tok, [_user(q1), _assistant(a1), _user(q2)], 16)
    assert r.stdout == f"{a1}\n{a2}\n" and "Madrid" not in r.stdout


def test_generate_cli_without_prompt_or_chat_is_a_one_line_error():
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", "unused"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--chat without --prompt" in r.stderr, r.stderr


def test_generate_cli_hands_the_env_files_hub_token_to_the_download(tmp_path, monkeypatch):
    import huggingface_hub

    import config
    import generate as generate_mod

    for k in ("HF_TOKEN", "HF_HOME"):  # set then deleted: monkeypatch removes the exported values after
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    monkeypatch.setattr(config, "_EXPORTED", {})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "user-cache"))  # the user's environment wins over the file
    monkeypatch.setenv("TOKEN_SOURCE", "hf_from_env")
    env = tmp_path / "x.env"
    env.write_text("HF_TOKEN=${TOKEN_SOURCE}\nHF_HOME=/not/this\nMAX_LR=fast  # other keys are not checked\n")
    seen: dict[str, str | None] = {}

    def snapshot_download(*args, **kw):
        seen.update({k: os.environ.get(k) for k in ("HF_TOKEN", "HF_HOME")})
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(sys, "argv", ["generate.py", "--model", "some-org/some-model", "--tokenizer",
                                      str(ROOT / "tokenizer.model"), "--prompt", "x", "--env-file", str(env)])
    with pytest.raises(UserError, match="could not be fetched"):
        generate_mod.main()
    assert seen == {"HF_TOKEN": "hf_from_env", "HF_HOME": str(tmp_path / "user-cache")}


def test_generate_cli_compile_flag_decodes_the_same_tokens(monkeypatch, capsys):
    """--compile reaches generate(compile=True) and prints what the eager CLI prints (fp32: identical greedy)."""
    import generate as generate_mod

    tok = tokenizer_mod.load_tokenizer(ROOT / "tokenizer.model")
    model = tiny_model(std=0.3, vocab_size=tok.n_words, max_seq_len=128)
    monkeypatch.setattr(generate_mod, "load_model", lambda *a, **kw: (model, model.args))
    calls = []
    real = generate_mod.generate
    monkeypatch.setattr(generate_mod, "generate", lambda *a, **kw: calls.append(kw["compile"]) or real(*a, **kw))
    texts = []
    for extra in ([], ["--compile"]):
        monkeypatch.setattr(sys, "argv", ["generate.py", "--model", "m", "--tokenizer", str(ROOT / "tokenizer.model"),
                                          "--prompt", "Once upon a time", "--max-new-tokens", "6", "--dtype",
                                          "fp32", *extra])
        assert generate_mod.main() == 0
        texts.append(capsys.readouterr().out)
    assert calls == [False, True] and texts[0] == texts[1] and texts[0].strip()
