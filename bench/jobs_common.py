"""What both sides of bench/jobs.py share: the one count of useful tokens and the one held-out loss, the
examples read back from prepared shards, and the RESULT line a side prints.

Imported by our side (the project venv) and by the peer side (the bench-only venv that adds TRL), so it
needs only torch, numpy and the standard library.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

IGNORE_INDEX = -100
RESULT_PREFIX = "RESULT "


def loss_tokens(labels: Any, shifted: bool) -> int:
    """Tokens that carry loss in a (B, T) label tensor or array. `shifted`: labels[t] is the target of
    position t (ours); otherwise labels are aligned with the inputs and the model shifts them itself
    (transformers / TRL), so position 0 is never a target."""
    arr = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
    if not shifted:
        arr = arr[..., 1:]
    return int((arr != IGNORE_INDEX).sum())


def shard_examples(root: str | Path, split: str) -> list[dict[str, np.ndarray]]:
    """Every example of a prepared SFT / DPO split in file order: role -> token array (sft: tokens, mask;
    dpo: prompt, chosen, rejected)."""
    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text())
    out: list[dict[str, np.ndarray]] = []
    for shard in manifest["splits"][split]["shards"]:
        arrays = {role: np.load(root / f["path"], mmap_mode="r") for role, f in shard["files"].items()}
        offsets = np.asarray(arrays.pop("offsets"))
        for j in range(len(offsets) - 1):
            if offsets.ndim == 1:
                out.append({r: np.asarray(a[offsets[j]:offsets[j + 1]]) for r, a in arrays.items()})
            else:  # (n + 1, 3): prompt / chosen / rejected offsets
                out.append({r: np.asarray(arrays[r][offsets[j, c]:offsets[j + 1, c]])
                            for c, r in enumerate(("prompt", "chosen", "rejected"))})
    return out


def sft_labels(tokens: np.ndarray, mask: np.ndarray) -> list[int]:
    """Unshifted labels (transformers' convention) of one SFT example: the token where the mask trains it."""
    return [int(t) if m else IGNORE_INDEX for t, m in zip(tokens.tolist(), mask.tolist(), strict=True)]


def heldout_loss(logits_fn: Any, examples: list[tuple[list[int], list[int]]], autocast: Any) -> float:
    """Mean next-token cross-entropy per loss-carrying token over (input_ids, unshifted labels) examples,
    one example per forward (no padding), under `autocast`; the same definition the training loop's
    validation uses (summed loss / target tokens)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in examples:
            x = torch.tensor([ids])
            y = torch.tensor([labels[1:]])
            with autocast():
                logits = logits_fn(x)[:, :-1]
            total += float(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                                             ignore_index=IGNORE_INDEX, reduction="sum"))
            count += loss_tokens(y, shifted=True)
    return total / max(count, 1)


def print_result(d: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(d), flush=True)


def parse_result(text: str) -> dict[str, Any] | None:
    lines = [ln for ln in text.splitlines() if ln.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else None
