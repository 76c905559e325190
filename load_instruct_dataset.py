"""Chat / instruction data -> SFT shards: token ids + aligned loss mask + example offsets (same manifest).

    python load_instruct_dataset.py                                      # the offline demo set (demo_data.py)
    python load_instruct_dataset.py --dataset HuggingFaceH4/ultrachat_200k --split train_sft
    python load_instruct_dataset.py --dataset chats.jsonl --format sharegpt MAX_SEQ_LEN=2048

Record formats (auto-detected per record, or forced with --format):
- messages: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
- sharegpt: {"conversations": [{"from": "human"|"gpt"|"system"|..., "value": str}, ...]}
- alpaca:   {"instruction": str, "input": str (optional), "output": str} -> user = instruction + "\\n\\n" + input
Rules: SYSTEM_PROMPT is prepended when the conversation has no system message (empty = none). MAX_TURNS > 0
keeps the first MAX_TURNS non-system messages (a turn = one message), then drops trailing messages until
the last is the assistant's. Rendering is tokenizer.ChatFormat: the loss mask covers assistant content and
its end-of-turn token. A conversation longer than MAX_SEQ_LEN tokens loses whole trailing messages (never
a part of one) down to the longest prefix that ends with an assistant reply and fits, keeping at least the
first user+assistant exchange; if even that does not fit it is dropped. The summary counts `truncated`
and `dropped_too_long`; records with no assistant reply or unknown roles count as `invalid`.
Malformed input: a jsonl line that is not valid JSON is SKIPPED AND COUNTED (`malformed`) with a warning
naming file:line (the first 10 are printed) — one bad line in a million should not stop a long job, and
the count in the summary and manifest makes the loss visible.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

import data_preparation_utils as dpu
import demo_data
from data_sources import common_args, parse_cli, prepare_from_cli
from errors import run_cli
from tokenizer import Tokenizer

FORMATS = ("auto", "messages", "sharegpt", "alpaca")


def to_messages(record: Any, fmt: str = "auto") -> list[dict[str, str]] | None:
    """A record in any supported format -> [{"role", "content"}] with roles system/user/assistant, or None."""
    if not isinstance(record, dict):
        return None
    if fmt == "auto":
        fmt = ("messages" if "messages" in record else "sharegpt" if "conversations" in record
               else "alpaca" if "instruction" in record and "output" in record else "")
    if fmt == "alpaca":
        inst, extra, out = record.get("instruction"), record.get("input") or "", record.get("output")
        if not (isinstance(inst, str) and isinstance(out, str) and isinstance(extra, str)):
            return None
        return [{"role": "user", "content": inst + ("\n\n" + extra if extra.strip() else "")},
                {"role": "assistant", "content": out}]
    if fmt in ("messages", "sharegpt"):
        turns = record.get("messages" if fmt == "messages" else "conversations")
        if not isinstance(turns, list):
            return None
        msgs = []
        for t in turns:
            if not isinstance(t, dict):
                return None
            role, content = (t.get("role"), t.get("content")) if "role" in t else (t.get("from"), t.get("value"))
            if not isinstance(role, str) or role.lower() not in dpu.ROLES or not isinstance(content, str):
                return None
            msgs.append({"role": dpu.ROLES[role.lower()], "content": content})
        return msgs
    return None


def prepare_conversation(msgs: list[dict[str, str]], system_prompt: str, max_turns: int) -> list[dict] | None:
    """System prompt + MAX_TURNS; None when no assistant reply with content remains."""
    if system_prompt and not any(m["role"] == "system" for m in msgs):
        msgs = [{"role": "system", "content": system_prompt}, *msgs]
    if max_turns > 0:
        kept, n = [], 0
        for m in msgs:
            if m["role"] != "system":
                if n == max_turns:
                    break
                n += 1
            kept.append(m)
        msgs = kept
    while msgs and msgs[-1]["role"] != "assistant":
        msgs = msgs[:-1]
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        return None
    return msgs


class SFTEncoder(dpu.ChatEncoder):
    """Record -> {"tokens", "mask"} (or None + the reason). Runs in the worker processes."""

    kind = "sft"

    def __init__(self, tok: Tokenizer, system_prompt: str, max_turns: int, max_seq_len: int, fmt: str = "auto"):
        super().__init__(tok, system_prompt, max_seq_len)
        self.max_turns, self.fmt = max_turns, fmt

    def encode(self, msgs: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        return self.chat.encode_dialog(msgs)

    def __call__(self, record: Any) -> tuple[dict[str, np.ndarray] | None, str | None]:
        msgs = to_messages(record, self.fmt)
        msgs = prepare_conversation(msgs, self.system_prompt, self.max_turns) if msgs else None
        if msgs is None:
            return None, "invalid"
        ids, mask = self.encode(msgs)
        event = None
        if len(ids) > self.max_seq_len:
            # Longest prefix ending with an assistant reply that fits; the first exchange is the last resort.
            # Llama 3 format: each message encodes on its own, so a longer prefix never encodes shorter and a
            # binary search finds it in O(log turns) encodes. A jinja template may re-render earlier turns
            # depending on the last one, so there every candidate is tried from the longest down.
            ends = [i for i, m in enumerate(msgs) if m["role"] == "assistant"][:-1]
            best = None  # (ids, mask) of the longest fitting prefix
            if self.chat.style == "llama3":
                lo, hi = 0, len(ends) - 1
                while lo <= hi:
                    mid = (lo + hi) // 2
                    cand = self.encode(msgs[:ends[mid] + 1])
                    if len(cand[0]) <= self.max_seq_len:
                        best, lo = cand, mid + 1
                    else:
                        hi = mid - 1
            else:
                for end in reversed(ends):
                    cand = self.encode(msgs[:end + 1])
                    if len(cand[0]) <= self.max_seq_len:
                        best = cand
                        break
            if best is None:
                return None, "dropped_too_long"
            (ids, mask), event = best, "truncated"
        return {"tokens": np.asarray(ids, dtype=self.dtype), "mask": np.asarray(mask, dtype=np.uint8)}, event


def demo_source() -> tuple[list[dict], str]:
    return demo_data.demo_instruct_set(), f"demo instruct set (demo_data.py, Python {sys.version.split()[0]})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render chat data into SFT shards (ids + loss mask).")
    common_args(parser)
    parser.add_argument("--format", default="auto", choices=FORMATS, help="record format (default: per record)")
    args, cfg = parse_cli(parser, argv)
    options = {"system_prompt": cfg["SYSTEM_PROMPT"], "max_turns": cfg["MAX_TURNS"],
               "max_seq_len": cfg["MAX_SEQ_LEN"], "format": args.format}
    prepare_from_cli("sft", args, cfg, mix_key="HF_INSTRUCT_DATASET_MIX_FILE", out_key="HF_INSTRUCT_DATASET_TARGET_PATH",
                     demo=demo_source, options=options,
                     make_encoder=lambda tok: SFTEncoder(tok, cfg["SYSTEM_PROMPT"], cfg["MAX_TURNS"],
                                                         cfg["MAX_SEQ_LEN"], args.format))
    return 0


if __name__ == "__main__":
    run_cli(main)
