"""Tokenizers: tiktoken-format BPE with Llama 3 specials, HF / GGUF tokenizers, chat rendering with loss
masks, the tokenizer files of an HF export, and the CLI that trains the BPE (bpe.py) into a tiktoken-format file.

Every backend has one interface (`Tokenizer`): `encode(text, bos, eos, allowed_special)`, `decode(ids)`,
`bos_id`, `eos_id`, `eot_id`, `pad_id`, `vocab_size`, `wants_bos`, `identity()`. Plain text never becomes a
special token unless the caller allows it (`allowed_special={"<|eot_id|>"}` or `"all"`): text that merely looks
like `<|eot_id|>` is encoded as ordinary bytes, so training data cannot forge control tokens.

The BOS convention (`wants_bos`: does a plain document start with BOS?) is the tokenizer's own default, the
one transformers' `encode(text)` follows and lm-evaluation-harness's HF backend inherits: an explicit
`add_bos` attribute wins; no BOS token -> no; tiktoken (Llama 3, our own) -> yes, `<|begin_of_text|>` starts
every document; GGUF -> its `tokenizer.ggml.add_bos_token` flag (SmolLM2: no); HF -> whether its
post-processor prepends BOS (Llama 3: yes; a tokenizer.json without that post-processor: no, whatever
the BOS token is called).

HF export (`save_hf_tokenizer`): a tiktoken file becomes a tokenizer.json that gives the same ids in
transformers, with `LLAMA3_CHAT_TEMPLATE` (ChatFormat's format as jinja); HF and GGUF tokenizers keep theirs.

    python tokenizer.py train --vocab-size 8192 --out tokenizer.model     # the committed file
    python tokenizer.py encode --tokenizer tokenizer.model --text "Hello world"
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from bpe import LLAMA3_PAT, embedded_corpus, train_bpe
from errors import UserError, run_cli
from fileio import check_hub_id, sha256_file

NUM_SPECIAL_TOKENS = 256
# Names and order exactly as Meta's Llama 3 tokenizer, so Meta's tokenizer.model drops in with its ids.
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>",
    "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, NUM_SPECIAL_TOKENS - 5)]
# The padding id: the slot Llama 3.1 later named <|finetune_right_pad_id|>; never produced by text.
LLAMA3_PAD_TOKEN = "<|reserved_special_token_2|>"
# tiktoken's regex engine panics past ~400k chars or very long runs without a (non-)space switch
# (openai/tiktoken#195); split like Meta's reference does. Decoding the pieces concatenates exactly.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000
END_OF_TURN_NAMES = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")


def _llama3_chat_template() -> str:
    """ChatFormat's "llama3" style as a jinja chat template (for transformers, vLLM, TGI): `<|begin_of_text|>`,
    then per message `<|start_header_id|>role<|end_header_id|>\\n\\n` + content | trim + `<|eot_id|>`, assistant
    content and its `<|eot_id|>` inside `{% generation %}` (transformers' `return_assistant_tokens_mask`).

    A role or content holding control-token text is refused (raise_exception): a tokenizer that renders
    the chat to a string and then matches special tokens in it (transformers' apply_chat_template, vLLM)
    would otherwise turn a typed `<|eot_id|>` into a real turn boundary. ChatFormat encodes such text as
    ordinary bytes instead; both sides refuse to let content forge a turn."""
    control = [t for t in LLAMA3_SPECIAL_TOKENS if not t.startswith("<|reserved_special_token_")]
    control.append("<|reserved_special_token_")  # a prefix: covers every reserved token
    names = ", ".join(repr(t) for t in control)
    return (
        "<|begin_of_text|>"
        "{% for message in messages %}{% set i = loop.index0 %}"
        "{% for field in ['role', 'content'] %}{% for name in [" + names + "] %}{% if name in message[field] %}"
        "{{ raise_exception('message ' ~ i ~ ' ' ~ field ~ ' contains the control-token text ' ~ name ~ "
        "'; it would forge a turn boundary: remove it from the text') }}{% endif %}{% endfor %}{% endfor %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    )


LLAMA3_CHAT_TEMPLATE = _llama3_chat_template()

_SPACE_RUN, _WORD_RUN = re.compile(r"\s*"), re.compile(r"\S*")


def _may_hold_long_run(text: str, max_run: int = MAX_NO_WHITESPACES_CHARS) -> bool:
    """False only if `text` has no run of more than `max_run` whitespace or non-whitespace characters.

    Probes every h = max_run // 2 characters: a run of >= 2h + 1 characters contains two consecutive
    multiples p, p + h of h, so text[p : p + h + 1] is one run and is found by a match starting at p.
    A probe costs the length of the run it starts in (a few characters in ordinary text), so this is
    ~1000x cheaper than searching the whole text; a "True" only sends the text down the exact split.
    """
    h = max(max_run // 2, 1)
    for p in range(0, len(text) - h, h):
        run = _SPACE_RUN if text[p].isspace() else _WORD_RUN
        m = run.match(text, p, p + h + 1)  # `\s*` and `\S*` match (maybe empty) at every position
        if m is not None and m.end() > p + h:
            return True
    return False

AllowedSpecial = Literal["all"] | Iterable[str]


class Tokenizer:
    """The common interface. Subclasses implement `_ordinary(text) -> (ids, char_starts)` and `decode`."""

    kind: str
    source: str
    special_tokens: dict[str, int]
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    pad_id: int | None
    chat_template: str | None = None
    add_bos: bool | None = None  # True / False overrides the backend's BOS convention (see wants_bos)
    _sha256: str | None = None

    @property
    def n_words(self) -> int:
        return self.vocab_size

    @property
    def wants_bos(self) -> bool:
        """Whether a plain document starts with BOS (the module docstring has the rule per backend)."""
        if isinstance(self.add_bos, bool):
            return self.add_bos
        return self.bos_id is not None and self._prepends_bos()

    @property
    def stop_ids(self) -> list[int]:
        """Where generation ends: the end-of-text and end-of-turn ids (one id when they coincide)."""
        return list(dict.fromkeys(i for i in (self.eos_id, self.eot_id) if i is not None))

    def _prepends_bos(self) -> bool:
        """The backend's own convention, asked only when there is a BOS token. Llama 3's: always."""
        return True

    def _ordinary(self, text: str, offsets: bool) -> tuple[list[int], list[int]]:  # ids, start char of each
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def _sha256_of_source(self) -> str:
        return sha256_file(self.source)

    def __reduce__(self):  # worker processes re-load from the source instead of pickling native objects
        return (load_tokenizer, (self.source,))

    def _split_special(self, text: str, allowed_special: AllowedSpecial) -> list[tuple[str, int | None]]:
        """Cut text at allowed special strings: [(piece, None) for text, (name, id) for a special]."""
        allowed = frozenset(self.special_tokens if allowed_special == "all" else allowed_special)
        if not allowed:
            return [(text, None)]
        cache = self.__dict__.setdefault("_special_patterns", {})  # compiled once per allowed set
        pattern = cache.get(allowed)
        if pattern is None:
            unknown = allowed - set(self.special_tokens)
            if unknown:
                raise ValueError(f"allowed_special names tokens this tokenizer lacks: {sorted(unknown)[:5]}")
            pattern = re.compile("|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True)))
            cache[allowed] = pattern
        out: list[tuple[str, int | None]] = []
        pos = 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                out.append((text[pos:m.start()], None))
            out.append((m.group(), self.special_tokens[m.group()]))
            pos = m.end()
        if pos < len(text):
            out.append((text[pos:], None))
        return out

    def encode_with_offsets(self, text: str, allowed_special: AllowedSpecial = (),
                            offsets: bool = True) -> tuple[list[int], list[int]]:
        """Token ids and, for each, the index in `text` of the first character it covers."""
        ids: list[int] = []
        starts: list[int] = []
        pos = 0
        for piece, special_id in self._split_special(text, allowed_special):
            if special_id is not None:
                ids.append(special_id)
                starts.append(pos)
            else:
                piece_ids, piece_starts = self._ordinary(piece, offsets)
                ids += piece_ids
                starts += [pos + s for s in piece_starts]
            pos += len(piece)
        return ids, starts

    def encode(self, text: str, bos: bool = False, eos: bool = False,
               allowed_special: AllowedSpecial = ()) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self.encode_with_offsets(text, allowed_special, offsets=False)[0]
        if bos:
            ids.insert(0, self._require(self.bos_id, "bos_id"))
        if eos:
            ids.append(self._require(self.eos_id, "eos_id"))
        return ids

    def encode_array(self, text: str) -> Any:
        """encode(text) (no BOS/EOS, no specials) as a numpy integer array; backends may skip the list."""
        import numpy as np

        return np.asarray(self.encode(text), dtype=np.int64)

    def _require(self, token_id: int | None, name: str) -> int:
        if token_id is None:
            raise UserError(f"tokenizer {self.source} has no {name}; use a tokenizer that defines one")
        return token_id

    def identity(self) -> dict[str, Any]:
        """What data manifests record so shards can be checked against the tokenizer that reads them."""
        if self._sha256 is None:
            self._sha256 = self._sha256_of_source()
        return {"kind": self.kind, "source": self.source, "sha256": self._sha256, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "eot_id": self.eot_id, "pad_id": self.pad_id}

    def _set_turn_ids(self) -> None:
        self.eot_id = next((self.special_tokens[n] for n in END_OF_TURN_NAMES if n in self.special_tokens),
                           self.eos_id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, source={self.source!r}, vocab_size={self.vocab_size})"


# ----------------------------------------------------------------------------------------------- tiktoken


def read_tiktoken_file(path: str | Path) -> dict[bytes, int]:
    """Parse `base64(token_bytes) rank` lines (Meta's and OpenAI's format)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise UserError(f"{path}:{lineno} is not a tiktoken BPE line (`base64 rank`): {e}; "
                                "pass a tiktoken tokenizer.model, an HF tokenizer dir or a .gguf file") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps; the file is corrupt")
    return ranks


def write_tiktoken_file(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write atomically (tmp + rename) so a crash never leaves half a tokenizer."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    os.replace(tmp, path)


def byte_level_alphabet() -> list[str]:
    """The character that stands for each byte in byte-level BPE vocabularies (GPT-2's convention, which
    tokenizers' ByteLevel pre-tokenizer and decoder use): printable Latin-1 bytes stand for themselves, the
    other 68 (controls, space, 0x7F-0xA0, 0xAD) for chr(256), chr(257), ... in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)}
    out, n = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + n))
            n += 1
    return out


def tiktoken_to_hf_bpe(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> (vocab, merges) of an HF byte-level BPE that encodes every pre-token identically.

    tiktoken merges, again and again, the adjacent pair whose concatenation has the lowest rank. HF's BPE
    applies the listed merge with the lowest index. So every split of a token into two tokens is a merge,
    ordered by the rank of the result (ties: the ranks of the halves), plus `ignore_merges` (a pre-token that
    is itself a token is kept whole, as tiktoken does). They could still differ where two overlapping pairs
    form the same token by different splits (tiktoken merges the left one first); the tests find no such case
    in the embedded corpus, hard text and random text, for ours and for Meta's 128k ranks."""
    alphabet = byte_level_alphabet()

    def text(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return {text(t): r for t, r in ranks.items()}, [(text(m[3]), text(m[4])) for m in merges]


def _split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """Cut `s` so no piece holds more than `max_run` consecutive spaces or non-spaces (Meta's workaround)."""
    run, run_is_space, start = 0, s[:1].isspace(), 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if is_space != run_is_space:
            run, run_is_space = 1, is_space
        else:
            run += 1
            if run > max_run:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


def _one_tiktoken_call(text: str) -> bool:
    """Whether tiktoken can take `text` in one call: short enough, and no over-long run to split."""
    return len(text) <= MAX_NO_WHITESPACES_CHARS or (len(text) <= TIKTOKEN_MAX_ENCODE_CHARS
                                                     and not _may_hold_long_run(text))


class TiktokenTokenizer(Tokenizer):
    kind = "tiktoken"

    def __init__(self, path: str | Path):
        import tiktoken

        self.source = str(Path(path).resolve())
        ranks = read_tiktoken_file(path)
        n_base = len(ranks)
        self.special_tokens = {name: n_base + i for i, name in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=Path(path).name, pat_str=LLAMA3_PAT, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.vocab_size = n_base + NUM_SPECIAL_TOKENS
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens[LLAMA3_PAD_TOKEN]
        self._set_turn_ids()

    def _ordinary(self, text: str, offsets: bool) -> tuple[list[int], list[int]]:
        if _one_tiktoken_call(text):
            ids = self.model.encode_ordinary(text)  # common case: one call (no run is long enough to split)
        else:
            ids = []
            for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
                for piece in _split_long_runs(text[i:i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                    ids += self.model.encode_ordinary(piece)
        return ids, self.model.decode_with_offsets(ids)[1] if offsets else []

    def encode_array(self, text: str) -> Any:
        """Ordinary ids as a uint32 array straight from tiktoken's buffer (no Python list of ints: data
        preparation's hot path). Equal to encode(text): the empty allowed set makes special-token text
        plain text, and over-long inputs take the same split as _ordinary."""
        import numpy as np

        if not isinstance(text, str):
            raise TypeError(f"encode_array expects str, got {type(text).__name__}")
        if _one_tiktoken_call(text):
            return self.model.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        return np.asarray(self._ordinary(text, False)[0], dtype=np.uint32)

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))

    def to_hf_backend(self) -> Any:
        """This tokenizer as a `tokenizers.Tokenizer` (the backend of transformers' fast tokenizers): the BPE of
        `tiktoken_to_hf_bpe`, the Llama 3 split pattern, byte-level decoding, the 256 specials as special added
        tokens with our ids, and BOS prepended by the post-processor when `wants_bos`."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
        from tokenizers import Tokenizer as RawTokenizer

        vocab, merges = tiktoken_to_hf_bpe(read_tiktoken_file(self.source))
        backend = RawTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PAT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        names = sorted(self.special_tokens, key=self.special_tokens.__getitem__)
        backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
        if [backend.token_to_id(n) for n in names] != [self.special_tokens[n] for n in names]:
            raise UserError(f"{self.source}: the special tokens do not follow the ranks without a gap; "
                            "cannot convert it to tokenizer.json")
        if self.wants_bos:
            bos = next(n for n in names if self.special_tokens[n] == self.bos_id)
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, self.bos_id)])
        return backend


# ---------------------------------------------------------------------------- HF and GGUF backends


_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                       "vocab.json", "merges.txt", "chat_template.jinja")


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus the special ids and chat template from its config or GGUF metadata."""

    def __init__(self, backend: Any, *, kind: str, source: str, bos: int | None, eos: int | None,
                 pad: int | None, chat_template: str | None, prepends_bos: bool | None = None):
        self.kind, self.source, self.chat_template = kind, source, chat_template
        self.backend = backend
        self._bos_flag = prepends_bos  # GGUF's add_bos_token; None = ask the post-processor
        # Special tokens in plain text are tokenized as text; `_split_special` decides what may be special.
        self.backend.encode_special_tokens = True
        self.special_tokens = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = bos, eos
        self.pad_id = pad if pad is not None else eos
        self._set_turn_ids()

    def _prepends_bos(self) -> bool:
        if self._bos_flag is not None:
            return self._bos_flag
        return self.backend.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]

    def _ordinary(self, text: str, offsets: bool) -> tuple[list[int], list[int]]:
        enc = self.backend.encode(text, add_special_tokens=False)
        return list(enc.ids), [start for start, _ in enc.offsets]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def _sha256_of_source(self) -> str:
        path = Path(self.source)
        if path.is_file():
            return sha256_file(path)
        h = hashlib.sha256()  # a dir: hash of (name, file hash) over the tokenizer files it has
        for name in _HF_TOKENIZER_FILES:
            if (path / name).is_file():
                h.update(f"{name}\0{sha256_file(path / name)}\n".encode())
        return h.hexdigest()


def _from_transformers(source: str, kind: str, prepends_bos: bool | None = None, **kwargs: Any) -> HFTokenizer:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        where = "a local dir" if Path(source).exists() else "the Hugging Face hub (offline, or no such repo?)"
        raise UserError(f"could not load tokenizer {source!r} from {where}: {str(e).splitlines()[0]}; pass a "
                        "tiktoken tokenizer.model, a dir with tokenizer.json, or a .gguf file") from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"tokenizer {source!r} has no fast (tokenizers) backend; convert it to tokenizer.json")
    backend = tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str())  # private copy
    src = str(Path(source).resolve() / kwargs["gguf_file"]) if "gguf_file" in kwargs else (
        str(Path(source).resolve()) if Path(source).exists() else source)
    return HFTokenizer(backend, kind=kind, source=src, bos=tok.bos_token_id, eos=tok.eos_token_id,
                       pad=tok.pad_token_id, chat_template=tok.chat_template, prepends_bos=prepends_bos)


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The key/value header of a GGUF file (v2/v3, little-endian), without touching the tensors.

    A plain sequential parse: `gguf.GGUFReader` builds a numpy view per array element and needs ~2 s for a
    49k-token vocabulary; this needs ~0.1 s.
    """
    import struct

    with open(path, "rb") as f:
        def scalar(fmt: str) -> Any:
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(scalar("<Q")).decode("utf-8", errors="replace")

        def value(vtype: int) -> Any:
            if vtype == 8:
                return string()
            if vtype == 9:
                item_type, n = scalar("<I"), scalar("<Q")
                return [value(item_type) for _ in range(n)]
            if vtype not in _GGUF_SCALARS:
                raise UserError(f"{path}: unknown GGUF metadata type {vtype}; is the file corrupt?")
            return scalar(_GGUF_SCALARS[vtype])

        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (bad magic); pass a .gguf model file")
        version = scalar("<I")
        if version not in (2, 3):
            raise UserError(f"{path}: GGUF version {version} is not supported (2 or 3 expected)")
        _n_tensors, n_kv = scalar("<Q"), scalar("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(scalar("<I"))
        return meta


def _from_gguf(path: Path) -> HFTokenizer:
    """Build the byte-level BPE that llama.cpp would use, straight from the GGUF metadata (no weights read)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer

    meta = read_gguf_metadata(path)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))  # no key: the Llama convention
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":  # SentencePiece-style vocabularies: let transformers' converter handle them
        return _from_transformers(str(path.parent), "gguf", prepends_bos=add_bos, gguf_file=path.name)
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre", "default")
    llama3_style = pre in ("llama-bpe", "llama3", "smaug-bpe")
    # Llama 3 vocabularies follow tiktoken semantics: a pre-token that is itself in the vocab is kept whole.
    backend = RawTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                      ignore_merges=llama3_style))
    if llama3_style:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PAT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # token_type 3 = control (special), 4 = user-defined (matched in text but not special), per GGUF spec.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types, strict=True) if k == 3])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types, strict=True) if k == 4])
    return HFTokenizer(backend, kind="gguf", source=str(path.resolve()),
                       bos=meta.get("tokenizer.ggml.bos_token_id"),
                       eos=meta.get("tokenizer.ggml.eos_token_id"),
                       pad=meta.get("tokenizer.ggml.padding_token_id"),
                       chat_template=meta.get("tokenizer.chat_template"), prepends_bos=add_bos)


def save_hf_tokenizer(tok: Tokenizer, out_dir: str | Path, model_max_length: int | None = None) -> list[str]:
    """Write the files transformers' AutoTokenizer loads (vLLM, TGI and lm-evaluation-harness read the same):
    tokenizer.json, tokenizer_config.json (special tokens, the BOS rule, the chat template) and
    special_tokens_map.json. Returns their names.

    tiktoken: tokenizer.json is `to_hf_backend()`, the chat template LLAMA3_CHAT_TEMPLATE (ChatFormat's
    format). HF / GGUF: their own backend and chat template."""
    out = Path(out_dir)
    template: str | None
    if isinstance(tok, TiktokenTokenizer):
        backend, template = tok.to_hf_backend(), LLAMA3_CHAT_TEMPLATE
    elif isinstance(tok, HFTokenizer):
        # (HFTokenizer's encode_special_tokens=True is a runtime flag; tokenizer.json does not keep it)
        backend, template = tok.backend, tok.chat_template
    else:
        raise UserError(f"tokenizer {tok!r} has no Hugging Face format; export without it or convert it first")
    backend.save(str(out / "tokenizer.json"))
    names = {key: backend.id_to_token(i) for key, i in
             (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id)) if i is not None}
    # transformers >= 5 rebuilds the BOS post-processor from add_bos_token; older versions use tokenizer.json's
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "add_bos_token": tok.wants_bos,
              "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "attention_mask"]}
    if model_max_length:
        config["model_max_length"] = model_max_length
    if template:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2, ensure_ascii=False) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def _looks_like_tiktoken(path: Path) -> bool:
    with open(path, "rb") as f:
        parts = f.readline().split()
    return len(parts) == 2 and parts[1].isdigit() and re.fullmatch(rb"[A-Za-z0-9+/=]+", parts[0]) is not None


def load_tokenizer(source: str | Path | Tokenizer) -> Tokenizer:
    """A tiktoken `tokenizer.model` (or a Meta dir holding one), an HF tokenizer dir or hub id, or a `.gguf`."""
    if isinstance(source, Tokenizer):
        return source

    path = Path(source)
    if path.is_file():
        if path.suffix == ".gguf":
            return _from_gguf(path)
        if path.name == "tokenizer.json" or path.name == "tokenizer_config.json":
            return _from_transformers(str(path.parent), "hf")
        if _looks_like_tiktoken(path):
            return TiktokenTokenizer(path)
        raise UserError(f"{path} is neither a tiktoken BPE file, a tokenizer.json nor a .gguf file")
    if path.is_dir():
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            return _from_transformers(str(path), "hf")
        if (path / "tokenizer.model").is_file() and _looks_like_tiktoken(path / "tokenizer.model"):
            return TiktokenTokenizer(path / "tokenizer.model")
        raise UserError(f"{path} holds no tokenizer.json, tokenizer_config.json or tiktoken tokenizer.model")
    check_hub_id(str(source), "tokenizer")
    return _from_transformers(str(source), "hf")


# -------------------------------------------------------------------------------------------- chat format

Message = dict[str, str]


def _render_template(template: str, messages: list[Message], add_generation_prompt: bool,
                     tok: Tokenizer) -> str:
    """Render a chat template the way transformers does (sandboxed jinja2, trim/lstrip blocks). transformers'
    `{% generation %}...{% endgeneration %}` (its marker of assistant text) renders as its body: ChatFormat
    finds assistant spans by rendering prefixes instead."""
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> list[Any]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str) -> None:
        raise UserError(f"chat template rejected the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", GenerationBlock])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    names: dict[int | None, str] = {v: k for k, v in tok.special_tokens.items()}
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=names.get(tok.bos_id, ""), eos_token=names.get(tok.eos_id, ""))
    except jinja2.TemplateError as e:
        raise UserError(f"chat template of {tok.source} failed: {e}") from None


class ChatFormat:
    """Conversation -> (ids, loss_mask); the mask is 1 exactly on assistant content and its end-of-turn token.

    style "llama3": Meta's format built from ids (`<|begin_of_text|>` then per message
    `<|start_header_id|>role<|end_header_id|>\\n\\n` + content.strip() + `<|eot_id|>`).
    style "template": the tokenizer's own jinja chat template (e.g. ChatML); assistant spans are found by
    rendering prefixes of the conversation, so the mask is exact for any prefix-stable template.
    The default is the template when the tokenizer has one, except LLAMA3_CHAT_TEMPLATE (what an HF export of
    a tiktoken tokenizer carries), which is the "llama3" style itself.
    """

    def __init__(self, tok: Tokenizer, style: Literal["llama3", "template"] | None = None):
        self.tok = tok
        has_llama3 = all(t in tok.special_tokens for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
        own_template = tok.chat_template and tok.chat_template != LLAMA3_CHAT_TEMPLATE
        self.style = style or ("template" if own_template else "llama3" if has_llama3 else None)
        if self.style == "template" and not tok.chat_template or self.style == "llama3" and not has_llama3:
            raise UserError(f"tokenizer {tok.source} has neither a chat template nor Llama 3 header tokens; "
                            "use a chat-capable tokenizer for SFT/DPO")

    # Llama 3 style ------------------------------------------------------------------------------------
    def encode_header(self, role: str) -> list[int]:
        sp = self.tok.special_tokens
        return [sp["<|start_header_id|>"], *self.tok.encode(role), sp["<|end_header_id|>"], *self.tok.encode("\n\n")]

    def encode_message(self, message: Message) -> tuple[list[int], list[int]]:
        """One Llama 3 turn; mask covers the content and <|eot_id|> of assistant turns."""
        header = self.encode_header(message["role"])
        body = self.tok.encode(message["content"].strip()) + [self.tok.special_tokens["<|eot_id|>"]]
        train = int(message["role"] == "assistant")
        return header + body, [0] * len(header) + [train] * len(body)

    # both styles --------------------------------------------------------------------------------------
    def encode_dialog(self, messages: Sequence[Message],
                      add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise UserError(f"message {i} must be a dict with str 'role' and 'content', got {m!r:.80}")
        if self.style == "llama3":
            ids, mask = [self.tok.special_tokens["<|begin_of_text|>"]], [0]
            for m in messages:
                m_ids, m_mask = self.encode_message(m)
                ids += m_ids
                mask += m_mask
            if add_generation_prompt:
                header = self.encode_header("assistant")
                ids += header
                mask += [0] * len(header)
            return ids, mask
        return self._encode_with_template(list(messages), add_generation_prompt)

    def _encode_with_template(self, messages: list[Message], add_generation_prompt: bool):
        template = self.tok.chat_template
        assert template is not None
        full = _render_template(template, messages, add_generation_prompt, self.tok)
        spans = []  # [start, end) character span of each assistant reply (content + end-of-turn + any suffix)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = _render_template(template, messages[:i], True, self.tok)
            upto = _render_template(template, messages[:i + 1], False, self.tok)
            if not (upto.startswith(prompt) and full.startswith(upto)):
                raise UserError(f"chat template of {self.tok.source} is not prefix-stable at message {i}; "
                                "cannot derive an exact loss mask for it")
            spans.append((len(prompt), len(upto)))
        ids, starts = self.tok.encode_with_offsets(full, allowed_special="all")
        mask = [0] * len(ids)
        stops = {self.tok.eot_id, self.tok.eos_id}
        for lo, hi in spans:
            for j, s in enumerate(starts):
                if lo <= s < hi:
                    mask[j] = 1
                    if ids[j] in stops:  # the end-of-turn is trained; what follows it (e.g. "\n") is not
                        break
        return ids, mask


def visualize_mask(tok: Tokenizer, ids: Sequence[int], mask: Sequence[int], file: Any = None) -> str:
    """Print tokens with trained ones (mask=1) in green and the rest dim; returns the plain rendering."""
    out, plain = [], []
    for i, m in zip(ids, mask, strict=True):
        piece = tok.decode([i])
        plain.append(f"[{piece}]" if m else piece)
        out.append(f"\033[92m{piece}\033[0m" if m else f"\033[2m{piece}\033[0m")
    print("".join(out), file=file or sys.stdout)
    return "".join(plain)


# ---------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a byte-level BPE and write a tiktoken-format file")
    tr.add_argument("--input", nargs="*", default=None,
                    help="UTF-8 text files (default: the embedded corpus, see embedded_corpus())")
    tr.add_argument("--vocab-size", type=int, required=True,
                    help="BPE ranks incl. the 256 single bytes; 256 special tokens are added on top when loading")
    tr.add_argument("--out", required=True, help="output path, e.g. tokenizer.model")
    en = sub.add_parser("encode", help="print the ids of --text")
    en.add_argument("--tokenizer", required=True, help="tokenizer.model, HF dir / hub id, or .gguf file")
    en.add_argument("--text", required=True)
    en.add_argument("--allow-special", action="store_true", help="let special-token strings become specials")
    en.add_argument("--bos", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "encode":
        tok = load_tokenizer(args.tokenizer)
        print(json.dumps(tok.encode(args.text, bos=args.bos, allowed_special="all" if args.allow_special else ())))
        return 0
    if args.input:
        for f in args.input:
            if not Path(f).is_file():
                raise UserError(f"--input {f} does not exist; pass UTF-8 text files or omit --input")
        texts: Iterable[str] = (Path(f).read_text(encoding="utf-8") for f in args.input)
        what = f"{len(args.input)} file(s)"
    else:
        texts, what = embedded_corpus(), "the embedded corpus"
    if args.vocab_size < 256:
        raise UserError(f"--vocab-size {args.vocab_size} is below 256 (the single bytes); use e.g. 8192")
    ranks = train_bpe(texts, args.vocab_size, progress=sys.stderr.isatty())
    write_tiktoken_file(ranks, args.out)
    print(f"wrote {args.out}: {len(ranks)} ranks (+{NUM_SPECIAL_TOKENS} specials) from {what}, "
          f"sha256 {sha256_file(args.out)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
