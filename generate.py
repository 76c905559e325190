"""Sampling with the KV cache, batched over prompts of different lengths, and a chat CLI.

Prompts are left-padded to a common length so every row decodes at the same cache index; a key mask
hides the padding from attention and each row's RoPE positions start at 0 at its first real token,
so a padded row computes exactly what it would alone (tests/test_model.py checks this).

    python generate.py --model SOURCE [--tokenizer SRC] --prompt "..." [--prompt "..."] [--chat]
                       [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import torch

import precision
from errors import UserError, run_cli
from model import Transformer
from model_utils import load_model, tokenizer_source
from tokenizer import ChatFormat, load_tokenizer


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> tokens (B, L) left-padded, key_mask (B, L) True on real tokens, positions (B, L) from 0 at
    each row's first real token (padding gets 0; it is masked anyway)."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise UserError("generate needs at least one prompt and every prompt needs at least one token")
    L = max(len(p) for p in prompt_ids)
    tokens = torch.full((len(prompt_ids), L), pad_id, dtype=torch.long)
    key_mask = torch.zeros(len(prompt_ids), L, dtype=torch.bool)
    for i, p in enumerate(prompt_ids):
        tokens[i, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
        key_mask[i, L - len(p):] = True
    positions = (key_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    return tokens, key_mask, positions


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # nucleus: keep the smallest prefix of the sorted distribution whose mass reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p  # mass before this token already enough
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] = (),
    seed: int | None = None,
    pad_id: int = 0,
    return_logits: bool = False,
    stop_check: Callable[[], None] | None = None,
) -> list[list[int]] | tuple[list[list[int]], torch.Tensor]:
    """Continue each prompt; returns the new tokens per row, cut before the first stop id (the stop
    token itself is not included). Uses a KV cache sized to the longest prompt + max_new_tokens.
    return_logits: also return the fp32 logits (B, n_steps, V) each new token was sampled from
    (for tests and debugging). stop_check: called before every new token; it may raise to abandon the
    generation (the training loop's stop signal)."""
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k={top_k} must be >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p={top_p} must be in (0, 1]")
    B = len(prompt_ids)
    device = model.tok_embeddings.weight.device
    tokens, key_mask, positions = (t.to(device) for t in left_pad(prompt_ids, pad_id))
    L = tokens.shape[1]
    total = L + max_new_tokens
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    full_mask = torch.ones(B, total, dtype=torch.bool, device=device)
    full_mask[:, :L] = key_mask
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    step_logits: list[torch.Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    next_pos = positions[:, -1:] + 1  # (B, 1)
    was_training = model.training
    model.eval()
    model.setup_caches(B, total, fuse_projections=True)  # frozen weights during generation
    try:
        logits = model(tokens, 0, positions=positions, key_mask=full_mask[:, :L])[:, -1]  # (B, V)
        n = 0
        for n in range(max_new_tokens):
            if stop_check is not None:
                stop_check()
            if return_logits:
                step_logits.append(logits.float())
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            out[:, n] = nxt
            done |= torch.isin(nxt, stop)
            if bool(done.all()) or n == max_new_tokens - 1:
                n += 1
                break
            logits = model(nxt[:, None], L + n, positions=next_pos, key_mask=full_mask[:, : L + n + 1])[:, -1]
            next_pos = next_pos + 1
    finally:
        model.clear_caches()
        model.train(was_training)
    results = []
    stop_set = set(stop_ids)
    for row in out[:, :n].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_set), len(row))
        results.append(row[:cut])
    if return_logits:
        V = model.args.vocab_size
        return results, torch.stack(step_logits, 1) if step_logits else torch.empty(B, 0, V)
    return results


# ---- CLI --------------------------------------------------------------------------------------------
def _load_tokenizer(source: str):
    try:
        return load_tokenizer(source)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"could not load a tokenizer from {source!r} ({type(e).__name__}: {e}); "
                        "pass --tokenizer PATH (tokenizer.model, HF dir or .gguf)") from e


def encode_prompt(tok, text: str, chat: bool, system: str | None = None) -> list[int]:
    """Plain prompts start with BOS when the tokenizer's convention says so (`Tokenizer.wants_bos`); chat
    prompts go through ChatFormat."""
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        ids, _ = ChatFormat(tok).encode_dialog(messages, add_generation_prompt=True)
        return list(ids)
    return list(tok.encode(text, bos=tok.wants_bos))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint dir, Meta dir, HF dir or hub id, or .gguf")
    ap.add_argument("--tokenizer", default=None, help="tokenizer source (default: the model source)")
    ap.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat format")
    ap.add_argument("--system", default=None, help="system message for --chat")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=[*precision.CHOICES, *precision.ALIASES],
                    help="auto = bf16 where the device does it natively, else fp32 (fp16 on older GPUs)")
    a = ap.parse_args()
    tok = _load_tokenizer(a.tokenizer or tokenizer_source(a.model))
    model, _ = load_model(a.model, device=a.device, dtype=precision.inference_dtype(a.dtype, a.device))
    prompts = [encode_prompt(tok, p, a.chat, a.system) for p in a.prompt]
    stop = [i for i in (getattr(tok, "eos_id", None), getattr(tok, "eot_id", None)) if i is not None]
    pad = getattr(tok, "pad_id", None)
    t0 = time.perf_counter()
    outs = generate(model, prompts, a.max_new_tokens, a.temperature, a.top_k, a.top_p, stop, a.seed,
                    pad_id=pad if pad is not None and pad >= 0 else 0)
    dt = time.perf_counter() - t0
    for i, ids in enumerate(outs):
        if len(outs) > 1:
            print(f"--- [{i}]")
        print(tok.decode(ids))
    n = sum(len(o) for o in outs)
    print(f"generated {n} tokens for {len(outs)} prompt(s) in {dt:.2f}s ({n / max(dt, 1e-9):.1f} tok/s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
