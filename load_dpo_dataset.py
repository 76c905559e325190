"""Preference data -> DPO shards: prompt / chosen / rejected token arrays with offsets (same manifest).

    python load_dpo_dataset.py                                     # the offline demo preference set
    python load_dpo_dataset.py --dataset Anthropic/hh-rlhf --split train
    python load_dpo_dataset.py --dataset prefs.jsonl MAX_SEQ_LEN=1024

Record formats (per record):
- fields: {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}; a message list
  response uses its final message, which must be the assistant's; without "prompt", two message lists
  share everything but their final assistant message (the shared prefix is the prompt);
- hh-rlhf: {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}: the transcripts share all
  text up to the last "\\n\\nAssistant:"; that prefix is the prompt (parsed into user/assistant turns).
Rendering (tokenizer.ChatFormat): prompt ids = the dialog with the generation prompt (assistant header);
response ids = what the full dialog adds after the prompt, up to and including the end-of-turn token.
SYSTEM_PROMPT is prepended when the prompt has none (empty = none). A pair whose prompt + longer response
exceeds MAX_SEQ_LEN tokens is dropped (`dropped_too_long`); unparseable pairs count as `invalid`, pairs
with identical responses as `identical`; bad jsonl lines are skipped and counted (`malformed`).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import numpy as np

import data_preparation_utils as dpu
import demo_data
from data_sources import common_args, parse_cli, prepare_from_cli
from errors import run_cli

Messages = list[dict[str, str]]
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh(transcript: str) -> Messages | None:
    """"\\n\\nHuman: a\\n\\nAssistant: b" -> [{"user", a}, {"assistant", b}]."""
    parts = _HH_TURN.split(transcript)
    if parts[0].strip() or len(parts) < 3:
        return None
    return [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
            for who, text in zip(parts[1::2], parts[2::2], strict=True)]


def _messages(value: Any) -> Messages | None:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        return None
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or str(m.get("role")).lower() not in dpu.ROLES:
            return None
        out.append({"role": dpu.ROLES[str(m["role"]).lower()], "content": m["content"]})
    return out


def _response(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    msgs = _messages(value)
    return msgs[-1]["content"] if msgs and msgs[-1]["role"] == "assistant" else None


def to_pair(record: Any) -> tuple[Messages, str, str] | None:
    """-> (prompt messages, chosen text, rejected text) or None."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        return None
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" in record:
        prompt = _messages(record["prompt"])
        c, r = _response(chosen), _response(rejected)
        return (prompt, c, r) if prompt and c is not None and r is not None else None
    if isinstance(chosen, str) and isinstance(rejected, str):  # hh-rlhf transcripts
        cut_c, cut_r = chosen.rfind("\n\nAssistant:"), rejected.rfind("\n\nAssistant:")
        if cut_c < 0 or chosen[:cut_c] != rejected[:cut_r]:
            return None
        prompt = parse_hh(chosen[:cut_c])
        n = len("\n\nAssistant:")
        return (prompt, chosen[cut_c + n:].strip(), rejected[cut_r + n:].strip()) if prompt else None
    mc, mr = _messages(chosen), _messages(rejected)
    if not mc or not mr or mc[:-1] != mr[:-1] or len(mc) < 2:
        return None
    c, r = _response(chosen), _response(rejected)
    return (mc[:-1], c, r) if c is not None and r is not None else None


class DPOEncoder(dpu.ChatEncoder):
    """Record -> {"prompt", "chosen", "rejected"} ids (or None + the reason). Runs in the worker processes."""

    kind = "dpo"

    def render(self, prompt: Messages, chosen: str, rejected: str) -> tuple[list[int], list[int], list[int]] | None:
        prompt_ids, _ = self.chat.encode_dialog(prompt, add_generation_prompt=True)
        responses = []
        for text in (chosen, rejected):
            ids, mask = self.chat.encode_dialog([*prompt, {"role": "assistant", "content": text}])
            last = max(i for i, m in enumerate(mask) if m) if any(mask) else -1
            if ids[:len(prompt_ids)] != prompt_ids or last < len(prompt_ids):
                return None  # a template that is not prefix-stable, or an empty reply
            responses.append(ids[len(prompt_ids):last + 1])
        return prompt_ids, responses[0], responses[1]

    def __call__(self, record: Any) -> tuple[dict[str, np.ndarray] | None, str | None]:
        pair = to_pair(record)
        if pair is None or not pair[1].strip() or not pair[2].strip() or pair[0][-1]["role"] == "assistant":
            return None, "invalid"
        prompt, chosen, rejected = pair
        if chosen.strip() == rejected.strip():
            return None, "identical"
        if self.system_prompt and not any(m["role"] == "system" for m in prompt):
            prompt = [{"role": "system", "content": self.system_prompt}, *prompt]
        rendered = self.render(prompt, chosen, rejected)
        if rendered is None:
            return None, "invalid"
        p, c, r = rendered
        if len(p) + max(len(c), len(r)) > self.max_seq_len:
            return None, "dropped_too_long"
        return {"prompt": np.asarray(p, self.dtype), "chosen": np.asarray(c, self.dtype),
                "rejected": np.asarray(r, self.dtype)}, None


def demo_source() -> tuple[list[dict], str]:
    return demo_data.demo_preference_set(), f"demo preference set (demo_data.py, Python {sys.version.split()[0]})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render preference pairs into DPO shards.")
    common_args(parser)
    args, cfg = parse_cli(parser, argv)
    options = {"system_prompt": cfg["SYSTEM_PROMPT"], "max_seq_len": cfg["MAX_SEQ_LEN"]}
    prepare_from_cli("dpo", args, cfg, mix_key="HF_DPO_DATASET_MIX_FILE", out_key="HF_DPO_DATASET_TARGET_PATH",
                     demo=demo_source, options=options,
                     make_encoder=lambda tok: DPOEncoder(tok, cfg["SYSTEM_PROMPT"], cfg["MAX_SEQ_LEN"]))
    return 0


if __name__ == "__main__":
    run_cli(main)
