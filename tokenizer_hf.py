"""The Hugging Face (`tokenizers`) and GGUF tokenizer backends, split from tokenizer.py.

tokenizer.load_tokenizer picks the backend; `tokenizer.HFTokenizer` and `tokenizer.read_gguf_metadata` keep
working (tokenizer.py re-exports them lazily: this module imports tokenizer.py for the `Tokenizer` base).
A GGUF file's byte-level BPE is rebuilt from its metadata with `tokenizers` directly; other GGUF vocabularies
and HF dirs / hub ids go through transformers' AutoTokenizer (its fast backend is copied out).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from errors import UserError
from tokenizer import LLAMA3_PAT, Tokenizer, _sha256_file

_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                       "vocab.json", "merges.txt", "chat_template.jinja")


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus the special ids and chat template from its config or GGUF metadata."""

    def __init__(self, backend: Any, *, kind: str, source: str, bos: int | None, eos: int | None,
                 pad: int | None, chat_template: str | None):
        self.kind, self.source, self.chat_template = kind, source, chat_template
        self.backend = backend
        # Special tokens in plain text are tokenized as text; `_split_special` decides what may be special.
        self.backend.encode_special_tokens = True
        self.special_tokens = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = bos, eos
        self.pad_id = pad if pad is not None else eos
        self._set_turn_ids()

    def _ordinary(self, text: str, offsets: bool) -> tuple[list[int], list[int]]:
        enc = self.backend.encode(text, add_special_tokens=False)
        return list(enc.ids), [start for start, _ in enc.offsets]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def _sha256_of_source(self) -> str:
        path = Path(self.source)
        if path.is_file():
            return _sha256_file(path)
        h = hashlib.sha256()  # a dir: hash of (name, file hash) over the tokenizer files it has
        for name in _HF_TOKENIZER_FILES:
            if (path / name).is_file():
                h.update(f"{name}\0{_sha256_file(path / name)}\n".encode())
        return h.hexdigest()


def _from_transformers(source: str, kind: str, **kwargs: Any) -> HFTokenizer:
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
                       pad=tok.pad_token_id, chat_template=tok.chat_template)


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
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":  # SentencePiece-style vocabularies: let transformers' converter handle them
        return _from_transformers(str(path.parent), "gguf", gguf_file=path.name)
    tokens: list[str] = meta.get("tokenizer.ggml.tokens")
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
                       chat_template=meta.get("tokenizer.chat_template"))
