"""Sampling with the KV cache, batched over prompts of different lengths, and a chat CLI.

Prompts are left-padded to a common length so every row decodes at the same cache index; a key mask
hides the padding from attention and each row's RoPE positions start at 0 at its first real token,
so a padded row computes exactly what it would alone (tests/test_model.py checks this). generate() runs
`prefill` (the prompts fill the KV cache) and then `decode_n_tokens`: the `Sampling` policy picks each row's token,
`RowStops` tracks the rows that sampled a stop id, and `Decoder.decode_one_token` computes the next logits.

    python generate.py --model SOURCE [--tokenizer SRC] --prompt "..." [--prompt "..."] [--chat]
                       [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
    python generate.py --model SOURCE --chat [--system "..."]     # interactive: one user turn per line
    add --compile to compile the decode step, --int8 to decode with int8 weights

HF_TOKEN / HF_HOME for a hub download come from the environment, else from --env-file (default ./.env).

The interactive session streams each reply as it is generated, keeps the dialog (the oldest exchanges
are dropped when it would no longer fit the model's context with --max-new-tokens), and reads the
commands /reset (forget the dialog) and /exit (or end of input).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import torch

import config
import families
import precision
from errors import UserError, run_cli
from model import Transformer, project
from model_utils import load_model, tokenizer_source
from moe import moe_layers
from quantize import int8_weights
from tokenizer import ChatFormat, Tokenizer, load_tokenizer


class _LearnedPositions(Protocol):
    """A model of a family with a position table (Family.learned_positions): its context cannot grow."""

    def check_length(self, length: int) -> None: ...


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


@dataclass
class Sampling:
    """The sampling policy: how the next token of each row is drawn from its logits. temperature 0 is greedy
    (argmax); otherwise a draw from softmax(logits / temperature) kept to the top_k most likely tokens and to the
    nucleus (the smallest set of most likely tokens whose mass reaches top_p), with `generator` (None: torch's
    global one) as the source of randomness."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k={self.top_k} must be >= 1")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p={self.top_p} must be in (0, 1]")

    @classmethod
    def seeded(cls, temperature: float, top_k: int | None, top_p: float | None, seed: int | None,
               device: torch.device) -> Sampling:
        """The policy with its own generator on `device` seeded with `seed` (None: torch's global generator)."""
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        return cls(temperature, top_k, top_p, generator)

    def filtered(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> fp32 logits / temperature with -inf outside the top_k and the top_p nucleus: the
        distribution pick() draws from is their softmax (temperature > 0)."""
        logits = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= self.top_p  # the mass before it already reaches
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> the next id of each row (B,)."""
        if self.temperature <= 0:
            return logits.argmax(dim=-1)
        probs = self.filtered(logits).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


CACHE_MIN = 64  # a compiled decode step's KV cache length: a power of two, at least this


def compiled_cache_len(total: int) -> int:
    """The KV cache length a compiled generation of `total` tokens uses: the next power of two (at least
    CACHE_MIN), so a process compiles a handful of graphs per batch size however its prompts vary (a chat's
    grows every turn), well within torch.compile's per-function recompile limit (8)."""
    return max(CACHE_MIN, 1 << (total - 1).bit_length())


def _on_cuda(example_inputs) -> bool:
    return any(getattr(getattr(t, "device", None), "type", None) == "cuda" for t in example_inputs)


def _inductor_keeping_matvec(gm, example_inputs):
    """torch.compile backend: inductor, except that matrix-vector products stay ATen calls. Inductor would
    rewrite them as multiply-and-sum loops with their inputs' producers (the RMSNorm) fused in and recomputed
    for every output row, which made the compiled step slower than with ATen's kernel (bench/README.md,
    "Decoding"). On CUDA the step is also captured as a CUDA graph (inductor's cudagraph trees, what
    mode="reduce-overhead" turns on): a decode step is hundreds of small kernels whose launch cost would
    otherwise bound it. That path has not run on a GPU here."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.lowering import lowerings, make_fallback

    keep = (torch.ops.aten.mv.default, torch.ops.aten.addmv.default)
    for op in keep:
        # the ATen call is the lowering; registered here because inductor's implicit fallback refuses ops that
        # have a decomposition when the CI environment variable is set
        if op not in lowerings:
            make_fallback(op, warn=False, override_decomp=True)
    return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": True} if _on_cuda(example_inputs)
                      else None, decompositions={k: v for k, v in select_decomp_table().items() if k not in keep})


def compiled_decode_step(decode_step: Callable[..., torch.Tensor] = Transformer.decode_step
                         ) -> Callable[..., torch.Tensor]:
    """Transformer.decode_step (or another family's decode_step, families.py) through torch.compile. Static shapes: one graph per (model, batch, cache length),
    reused by every step. The small ops of a step (norms, RoPE, residuals, the cache write, the mask, one-query
    attention) fuse into a few kernels between the weight products, which is what is left of a step. Dynamo keeps
    the compiled graphs on decode_step's code, guarded by the backend: a later wrapper (the next generation, chat
    turn or in-training sample) reuses them without compiling again."""
    return torch.compile(decode_step, fullgraph=True, dynamic=False, backend=_inductor_keeping_matvec)


def has_sharded_weights(model: torch.nn.Module) -> bool:
    """True when a parameter is a DTensor (FSDP2): each rank holds a shard, which the block's forward gathers."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def prefill(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """The left-padded prompts tokens (B, L) (positions, key_mask from left_pad) through the model, filling the KV
    cache's first L slots -> the logits of each row's next token (B, V)."""
    h = model(tokens, 0, positions=positions, key_mask=key_mask, return_hidden=True)  # (B, L, dim)
    head = model.get_submodule(families.of_model(model).head)
    return project(head, h[:, -1])  # (B, V): only the last prompt position needs the head


class Decoder:
    """The decode steps after a prefill of L prompt tokens: each step writes one token per row at the next KV cache
    slot (the same for every row: prompts are left-padded) through Transformer.decode_step, whose shapes never
    change. With compile the step is compiled (compiled_decode_step); past torch's recompile limit it decodes
    eagerly. A context manager: leaving it restores torch.compile's guard checks."""

    def __init__(self, model: Transformer, prompt_positions: torch.Tensor, prompt_mask: torch.Tensor,
                 compile: bool):
        B, L = prompt_mask.shape
        device = prompt_mask.device
        self.model, self.compile = model, compile
        self.step = compiled_decode_step(type(model).decode_step) if compile else type(model).decode_step
        self.key_mask = torch.ones(B, model.cache_len, dtype=torch.bool, device=device)  # (B, cache_len)
        self.key_mask[:, :L] = prompt_mask
        self.positions = prompt_positions[:, -1:] + 1  # (B, 1): the next token's RoPE position
        self.slot = torch.tensor([L], device=device)  # the cache slot the next token is written to
        self.steps = 0
        self.guards = contextlib.ExitStack()

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc) -> None:
        self.guards.close()

    def decode_one_token(self, token: torch.Tensor) -> torch.Tensor:
        """token (B,) -> the logits of the token after it (B, V)."""
        args = (self.model, token[:, None], self.slot, self.positions, self.key_mask)
        try:
            logits = self.step(*args)[:, -1]
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            # this process compiled as many decode graphs as torch allows: the rest decodes eagerly
            # (same values; raised before the step ran, so nothing was written to the cache)
            print("generate: torch.compile's recompile limit is reached in this process; decoding eagerly",
                  file=sys.stderr)
            self.step = type(self.model).decode_step
            logits = self.step(*args)[:, -1]
        except torch._dynamo.exc.BackendCompilerFailed as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"compile=True (--compile): torch.compile could not build the decode step "
                            f"({first[:200]}); generate without it") from None
        if self.compile and logits.device.type == "cuda":
            logits = logits.clone()  # a CUDA graph's replay overwrites its output buffer
        self.positions, self.slot = self.positions + 1, self.slot + 1
        if self.compile and self.steps == 0:
            # the first step checked the compiled graph's guards; the same model and shapes follow, so later
            # steps evaluate only the guards that tell cached graphs apart
            self.guards.enter_context(torch.compiler.set_stance("default", skip_guard_eval_unsafe=True))
        self.steps += 1
        return logits


class RowStops:
    """Which rows are done: a row is done from the first stop id it samples on. on_token(row, token_id) sees each
    token sampled by a row that is not done, i.e. exactly the tokens generate() returns, in order;
    all_ranks_done(this process's rows are all done) -> whether every process's are (processes that decode
    together stop at the same step)."""

    def __init__(self, batch: int, stop_ids: Sequence[int], device: torch.device,
                 on_token: Callable[[int, int], None] | None = None,
                 all_ranks_done: Callable[[bool], bool] | None = None):
        self.stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.on_token, self.all_ranks_done = on_token, all_ranks_done

    def update(self, token: torch.Tensor) -> bool:
        """token (B,) sampled -> whether generation is finished."""
        stopped = torch.isin(token, self.stop)
        if self.on_token is not None:
            for row in (~self.done & ~stopped).nonzero().flatten().tolist():
                self.on_token(row, int(token[row]))
        self.done |= stopped
        finished = bool(self.done.all())
        return self.all_ranks_done(finished) if self.all_ranks_done is not None else finished


def decode_n_tokens(decoder: Decoder, logits: torch.Tensor, n: int, sampling: Sampling, rows: RowStops,
                    stop_check: Callable[[], None] | None = None,
                    seen_logits: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Sample up to n tokens per row, the first from `logits` (B, V) (the prefill's), each next one from the
    decoder's step on the last -> (B, m) the sampled tokens, m < n only when rows.update said every row is done.
    stop_check() runs before each token (it may raise to abandon the generation); seen_logits collects the fp32
    logits each token was sampled from."""
    out = torch.empty(logits.shape[0], n, dtype=torch.long, device=logits.device)
    for i in range(n):
        if stop_check is not None:
            stop_check()
        if seen_logits is not None:
            seen_logits.append(logits.float())
        token = sampling.pick(logits)  # (B,)
        out[:, i] = token
        if rows.update(token) or i == n - 1:
            return out[:, : i + 1]
        logits = decoder.decode_one_token(token)
    return out


def cut_at_stop(rows: list[list[int]], stop_ids: Sequence[int]) -> list[list[int]]:
    """Each row up to (not including) its first stop id."""
    stop_set = set(stop_ids)
    return [row[: next((i for i, t in enumerate(row) if t in stop_set), len(row))] for row in rows]


def check_compile(model: Transformer, compile: bool, int8: bool) -> None:
    """The combinations compiled generation refuses, as UserErrors."""
    if compile and int8:
        raise UserError("compile=True (--compile) and int8=True (--int8) do not combine (inductor cannot build "
                        "the int8 decode step here): use one of them")
    if int8 and any(isinstance(m, torch.nn.Linear) and m.bias is not None for m in model.modules()):
        raise UserError("int8=True (--int8) takes bias-free linear layers (the llama family); this model's have "
                        "biases (GPT-2): generate without it")
    if compile and moe_layers(model):
        raise UserError("compile=True (--compile) does not take Mixture-of-Experts models (their expert dispatch "
                        "runs outside torch.compile): generate without it")


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
    on_token: Callable[[int, int], None] | None = None,
    int8: bool = False,
    compile: bool = False,
    fuse_projections: bool = True,
    all_ranks_done: Callable[[bool], bool] | None = None,
) -> list[list[int]] | tuple[list[list[int]], torch.Tensor]:
    """Continue each prompt; returns the new tokens per row, cut before the first stop id (the stop
    token itself is not included). Uses a KV cache sized to the longest prompt + max_new_tokens.
    temperature, top_k, top_p: the Sampling policy, seeded with `seed` (None: torch's global generator).
    return_logits: also return the fp32 logits (B, n_steps, V) each new token was sampled from
    (for tests and debugging). stop_check: called before every new token; it may raise to abandon the
    generation (the training loop's stop signal). on_token(row, token_id): called as each token of the
    result is sampled (streaming), so exactly the returned tokens, in order. int8: decode with weight-only
    int8 copies of the linear layers (quantize.int8_weights; half the bytes per token of bf16). compile: run
    the decode step through torch.compile (Decoder; the first call per model, batch and cache length compiles,
    and the cache length is rounded up to a power of two; dense models, not with int8).
    fuse_projections: decode with wq|wk|wv and w1|w3 concatenated per block (temporary copies, about two thirds
    of a block's weights at Llama 3 shapes, dropped on return); never for sharded (FSDP2 DTensor) weights, whose
    blocks all-gather their own weights in every forward. all_ranks_done(this process's rows are all done) ->
    whether every process's are: processes that decode together (FSDP2 all-gathers in every step) must stop at the
    same step. The caller's autocast applies; the KV cache is then kept in the autocast dtype."""
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens} must be >= 0")
    device = cast(torch.Tensor, model.get_submodule(families.of_model(model).embedding).weight).device
    sampling = Sampling.seeded(temperature, top_k, top_p, seed, device)
    tokens, key_mask, positions = (t.to(device) for t in left_pad(prompt_ids, pad_id))
    check_compile(model, compile, int8)
    total = tokens.shape[1] + max_new_tokens
    if families.of_model(model).learned_positions:
        cast(_LearnedPositions, model).check_length(total)
    # compiled steps reuse their graph for any generation whose cache rounds up to the same length
    cache_len = compiled_cache_len(total) if compile else total
    rows = RowStops(len(prompt_ids), stop_ids, device, on_token, all_ranks_done)
    seen_logits: list[torch.Tensor] | None = [] if return_logits else None
    was_training = model.training
    model.eval()
    cache_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    with int8_weights(model) if int8 else contextlib.nullcontext():
        # frozen weights during generation; int8 keeps the projections apart (each one is an Int8Linear)
        model.setup_caches(len(prompt_ids), cache_len, dtype=cache_dtype,
                           fuse_projections=fuse_projections and not int8 and not has_sharded_weights(model))
        try:
            with Decoder(model, positions, key_mask, compile) as decoder:
                logits = prefill(model, tokens, positions, key_mask)
                new = decode_n_tokens(decoder, logits, max_new_tokens, sampling, rows, stop_check, seen_logits)
        finally:
            model.clear_caches()
            model.train(was_training)
    results = cut_at_stop(new.tolist(), stop_ids)
    if return_logits:
        V = model.args.vocab_size
        return results, torch.stack(seen_logits, 1) if seen_logits else torch.empty(len(results), 0, V)
    return results


# ---- rollouts: keyed sampling noise -------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finalizer (Steele et al. 2014): a bijection of 64-bit ints whose outputs look independent."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def keyed_uniform(*key: int) -> float:
    """A uniform number in [0, 1) that depends on the integers of `key` alone (53 bits, like random.random)."""
    h = _mix64(0)
    for v in key:
        h = _mix64(h ^ (v & _MASK64))
    return (h >> 11) / float(1 << 53)


@dataclass
class KeyedSampling(Sampling):
    """Sampling whose randomness is a function of each row's key and position: the token at position t of row
    i is the inverse-CDF draw, from the row's filtered distribution, at keyed_uniform(seed, step, *keys[i], t).
    A row's tokens therefore depend on its own logits and key only, not on its batch-mates, the batch size or
    a generator's history (a resumed run, or a row sampled alone, draws the same). pick() is called once per
    position, in order (decode_n_tokens does)."""

    seed: int = 0
    step: int = 0
    keys: Sequence[tuple[int, ...]] = ()
    position: int = 0

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        if len(self.keys) != logits.shape[0]:
            raise ValueError(f"KeyedSampling: {len(self.keys)} keys for {logits.shape[0]} rows")
        t, self.position = self.position, self.position + 1
        if self.temperature <= 0:
            return logits.argmax(dim=-1)
        probs = self.filtered(logits).softmax(dim=-1)
        cdf = probs.cumsum(dim=-1)
        u = torch.tensor([keyed_uniform(self.seed, self.step, *k, t) for k in self.keys], dtype=cdf.dtype,
                         device=cdf.device)
        # the first token whose cumulative mass exceeds u: never one of probability 0 (right=True); a u that
        # rounding puts past the total mass takes the most likely token
        token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        return torch.where(token < cdf.shape[-1], token, probs.argmax(dim=-1))


@contextlib.contextmanager
def gathered_once(model: torch.nn.Module):
    """Inside, every FSDP2 module of `model` holds its whole parameters: all-gathered once on entry and kept
    across forwards (no reshard after each), resharded on exit with each module's own reshard-after-forward
    setting restored. A rollout then gathers once, not once per token. No-op for a model without FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    groups = [m._get_fsdp_state()._fsdp_param_group for m in mods]
    # a module reshards after forward when its param group has a post-forward mesh (the root's lazy init clears it)
    before = [g is not None and g.post_forward_mesh_info is not None for g in groups]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m, b in zip(mods, before, strict=True):
            m.reshard()
            m.set_reshard_after_forward(b, recurse=False)


# no_grad, not inference mode: under FSDP2 the parameters all-gathered here would become inference tensors, which
# the training forward that follows cannot write into
@torch.no_grad()
def rollout(model: Transformer, prompt_ids: Sequence[Sequence[int]], prompt_keys: Sequence[int],
            num_generations: int, max_new_tokens: int, *, temperature: float, top_p: float | None = None,
            top_k: int | None = None, stop_ids: Sequence[int] = (), seed: int = 0, step: int = 0, pad_id: int = 0,
            stop_check: Callable[[], None] | None = None,
            all_ranks_done: Callable[[bool], bool] | None = None) -> list[list[int]]:
    """num_generations completions of each prompt with the KV cache -> one token list per (prompt, sample), the
    samples of a prompt contiguous ([p0 s0, p0 s1, ..., p1 s0, ...]), each up to AND including its first stop
    id (a completion that reached max_new_tokens has none). Sample j of the prompt keyed k draws its noise
    from (seed, step, k, j, position) (KeyedSampling), so it is the same alone, in any batch, on any number of
    ranks and after a resume. all_ranks_done as in generate(): processes that decode together stop at the same
    step (the check is a collective). Under FSDP2 the parameters are gathered once for the whole rollout
    (gathered_once). The caller's autocast applies."""
    if len(prompt_ids) != len(prompt_keys):
        raise ValueError(f"rollout: {len(prompt_ids)} prompts, {len(prompt_keys)} keys")
    rows = [list(p) for p in prompt_ids for _ in range(num_generations)]
    keys = [(int(k), j) for k in prompt_keys for j in range(num_generations)]
    device = model.tok_embeddings.weight.device
    sampling = KeyedSampling(temperature, top_k, top_p, None, seed=seed, step=step, keys=keys)
    tokens, key_mask, positions = (t.to(device) for t in left_pad(rows, pad_id))
    stops = RowStops(len(rows), stop_ids, device, all_ranks_done=all_ranks_done)
    was_training = model.training
    model.eval()
    cache_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    model.setup_caches(len(rows), tokens.shape[1] + max_new_tokens, dtype=cache_dtype,
                       fuse_projections=not has_sharded_weights(model))
    try:
        with gathered_once(model), Decoder(model, positions, key_mask, compile=False) as decoder:
            logits = prefill(model, tokens, positions, key_mask)
            new = decode_n_tokens(decoder, logits, max_new_tokens, sampling, stops, stop_check)
    finally:
        model.clear_caches()
        model.train(was_training)
    stop_set = set(stop_ids)
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))] for row in new.tolist()]


# ---- CLI --------------------------------------------------------------------------------------------
def _load_tokenizer(source: str) -> Tokenizer:
    try:
        return load_tokenizer(source)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"could not load a tokenizer from {source!r} ({type(e).__name__}: {e}); "
                        "pass --tokenizer PATH (tokenizer.model, HF dir or .gguf)") from e


def encode_prompt(tok: Tokenizer, text: str, chat: bool, system: str | None = None) -> list[int]:
    """Plain prompts start with BOS when the tokenizer's convention says so (`Tokenizer.wants_bos`); chat
    prompts go through ChatFormat."""
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        ids, _ = ChatFormat(tok).encode_dialog(messages, add_generation_prompt=True)
        return list(ids)
    return list(tok.encode(text, bos=tok.wants_bos))


Message = dict[str, str]


class TextStream:
    """Token ids in, text out as soon as it is final. The reply so far is decoded again at each token and only
    the new characters are written, held back while the text ends in U+FFFD: the bytes of a multi-byte UTF-8
    character can span several tokens, and decoding a part of them gives the replacement character."""

    def __init__(self, tok: Tokenizer, write: Callable[[str], object]):
        self.tok, self.write = tok, write
        self.ids: list[int] = []
        self.shown = ""

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._show(text)

    def finish(self) -> str:
        """Write what is still held back; returns the whole decoded reply."""
        text = self.tok.decode(self.ids)
        self._show(text)
        return text

    def _show(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text


def fit_dialog(messages: list[Message], n_tokens: Callable[[list[Message]], int], budget: int) -> list[Message]:
    """The dialog that fits: a leading system message is always kept, then the oldest exchanges (a user turn
    and the replies after it) are dropped until `n_tokens(dialog) <= budget`. The newest user turn is never
    dropped: when it does not fit even alone, a UserError says so."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(head):]
    while (n := n_tokens(head + rest)) > budget:
        nxt = next((i for i in range(1, len(rest)) if rest[i]["role"] == "user"), None)
        if nxt is None:
            raise UserError(f"the message needs {n} tokens with the chat format{' and system prompt' if head else ''}"
                            f", {n - budget} more than the {budget} the model's context leaves after "
                            "--max-new-tokens: shorten the message, the --system prompt or --max-new-tokens")
        rest = rest[nxt:]
    return head + rest


class ChatSession:
    """A multi-turn dialog with one model: `reply(text, write)` streams the answer and keeps the history."""

    def __init__(self, model: Transformer, tok: Tokenizer, *, system: str | None, max_new_tokens: int,
                 sampling: dict, stop_ids: Sequence[int], pad_id: int):
        self.model, self.tok, self.fmt = model, tok, ChatFormat(tok)
        self.system, self.max_new_tokens, self.sampling = system, max_new_tokens, sampling
        self.stop_ids, self.pad_id = list(stop_ids), pad_id
        context = model.args.max_seq_len
        self.budget = context - max_new_tokens  # prompt tokens left once the reply has room
        if self.budget < 1:
            raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for the dialog in the model's "
                            f"context of {context} tokens: lower --max-new-tokens")
        self.history: list[Message] = []
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def encode(self, messages: list[Message]) -> list[int]:
        return list(self.fmt.encode_dialog(messages, add_generation_prompt=True)[0])

    def reply(self, text: str, write: Callable[[str], object]) -> str:
        """Answer one user turn, writing the reply as it is generated; the history keeps the turn and the
        reply (a UserError when the turn does not fit leaves the history as it was)."""
        dialog = fit_dialog(self.history + [{"role": "user", "content": text}], lambda m: len(self.encode(m)),
                            self.budget)
        stream = TextStream(self.tok, write)
        generate(self.model, [self.encode(dialog)], self.max_new_tokens, stop_ids=self.stop_ids,
                 pad_id=self.pad_id, on_token=lambda _row, t: stream.push(t), **self.sampling)
        answer = stream.finish()
        self.history = dialog + [{"role": "assistant", "content": answer}]
        return answer


def chat_loop(session: ChatSession, interactive: bool) -> int:
    """Read user turns from stdin (one per line, `> ` prompt on a terminal) and stream the replies to stdout.
    /reset forgets the dialog, /exit or end of input ends the session; notes go to stderr."""
    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            session.reset()
            print("(dialog forgotten)", file=sys.stderr)
            continue
        if text.startswith("/") and text[1:].isalpha():
            print(f"unknown command {text}: /reset forgets the dialog, /exit ends the session", file=sys.stderr)
            continue
        before = len(session.history)
        try:
            session.reply(text, write)
        except UserError as e:  # this turn cannot be answered; the session goes on
            print(f"error: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
            if not interactive:
                raise
            print("\n(reply interrupted; not kept)", file=sys.stderr)
            continue
        write("\n")
        dropped = before + 2 - len(session.history)
        if dropped:
            print(f"(the oldest {dropped} messages were dropped to fit the model's context)", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint dir, Meta dir, HF dir or hub id, or .gguf")
    ap.add_argument("--tokenizer", default=None, help="tokenizer source (default: the model source)")
    ap.add_argument("--prompt", action="append", default=None, help="repeat for a batch")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat format; "
                    "without --prompt: an interactive session on stdin (/reset, /exit)")
    ap.add_argument("--system", default=None, help="system message for --chat")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--int8", action="store_true", help="decode with weight-only int8 linear layers (half the bytes "
                    "per token of bf16; see bench/README.md for its greedy agreement and perplexity change)")
    ap.add_argument("--compile", action="store_true", help="compile the decode step (torch.compile; the first "
                    "reply waits for it, later ones of a similar length reuse it; bench/README.md has the speed-up)")
    ap.add_argument("--dtype", default="auto", choices=[*precision.CHOICES, *precision.ALIASES],
                    help="auto = bf16 where the device does it natively, else fp32 (fp16 on older GPUs)")
    ap.add_argument("--env-file", default=None, help="settings file whose HF_TOKEN / HF_HOME apply to hub "
                    "downloads (default: ./.env when present; the environment wins)")
    a = ap.parse_args()
    if not a.prompt and not a.chat:
        raise UserError("generate.py needs --prompt TEXT (repeat for a batch), or --chat without --prompt for "
                        "an interactive session")
    config.export_library_settings(a.env_file)  # before anything may reach the hub
    tok = _load_tokenizer(a.tokenizer or tokenizer_source(a.model))
    model, _ = load_model(a.model, device=a.device, dtype=precision.inference_dtype(a.dtype, a.device))
    stop = tok.stop_ids
    pad = tok.pad_id if tok.pad_id is not None and tok.pad_id >= 0 else 0
    if not a.prompt:
        session = ChatSession(model, tok, system=a.system, max_new_tokens=a.max_new_tokens, stop_ids=stop,
                              pad_id=pad, sampling=dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                                                        seed=a.seed, int8=a.int8, compile=a.compile))
        interactive = sys.stdin.isatty()
        if interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
            print(f"chat with {a.model}: one message per line; /reset forgets the dialog, /exit or Ctrl-D ends",
                  file=sys.stderr)
        return chat_loop(session, interactive)
    prompts = [encode_prompt(tok, p, a.chat, a.system) for p in a.prompt]
    t0 = time.perf_counter()
    outs = cast(list[list[int]],  # no return_logits: the tokens alone
                generate(model, prompts, a.max_new_tokens, a.temperature, a.top_k, a.top_p, stop, a.seed,
                         pad_id=pad, int8=a.int8, compile=a.compile))
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
