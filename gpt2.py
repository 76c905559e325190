"""The GPT-2 architecture (Radford et al. 2019, OpenAI's released weights), read top to bottom as a spec.

Parameter names follow OpenAI's / Hugging Face's GPT-2 without the `transformer.` prefix: wte, wpe,
h.N.ln_1, h.N.attn.c_attn (q, k, v fused, in that order), h.N.attn.c_proj, h.N.ln_2, h.N.mlp.c_fc,
h.N.mlp.c_proj, ln_f; the head `lm_head` is tied to wte. Projections are nn.Linear, weights (out, in):
HF's Conv1D stores them (in, out), so conversion (model_formats.py) is a prefix and a transpose.

What differs from Llama (model.py): learned absolute positions (at most `max_seq_len` = n_positions), LayerNorm
with bias before each sub-block and after the last block, a GELU (tanh approximation, HF's `gelu_new`) MLP of
4 * dim units, biases in every projection, multi-head attention, and dropout after the embeddings, on the
attention weights and on each residual branch (active in training mode only).

The interface is Transformer's: forward(tokens, start_pos, positions=, key_mask=, attn_mask=, labels=, per_row=,
return_hidden=), setup_caches / clear_caches / decode_step for KV-cache generation, init_weights /
init_parameter, and `args`. Architecture only: no devices, no process groups, no checkpoint policy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from errors import UserError
from fused_ce import head_loss
from model import KVCache, attention_mask, cache_slots_mask, default_positions, tensor_generator

FAMILY = "gpt2"


@dataclass
class GPT2Args:
    dim: int = 768  # n_embd
    n_layers: int = 12
    n_heads: int = 12
    vocab_size: int = 50257
    max_seq_len: int = 1024  # n_positions: the learned position table's length
    ffn_hidden_dim: int | None = None  # n_inner; None = 4 * dim
    norm_eps: float = 1e-5
    dropout: float = 0.0  # embedding, attention and residual dropout (GPT-2 was trained with 0.1)
    attn_impl: str = "auto"  # kept for the loop's settings; every path here is SDPA
    family: str = FAMILY
    extra: dict = field(default_factory=dict)  # free-form provenance, never read by the model

    def __post_init__(self) -> None:
        if self.family != FAMILY:
            raise ValueError(f"family={self.family!r} in GPT-2 arguments")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")

    # what generic code reads from a model's args (the same names as model.ModelArgs)
    @property
    def n_kv_heads(self) -> int:
        return self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return self.ffn_hidden_dim or 4 * self.dim

    @property
    def tie_embeddings(self) -> bool:
        return True  # GPT-2's head is its token embedding

    @property
    def moe_num_experts(self) -> int:
        return 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPT2Args:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


class Attention(nn.Module):
    def __init__(self, args: GPT2Args):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = args.n_heads, args.head_dim, args.dropout
        self.c_attn = nn.Linear(args.dim, 3 * args.dim)
        self.c_proj = nn.Linear(args.dim, args.dim)
        self.resid_dropout = nn.Dropout(args.dropout)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, start_pos: int | torch.Tensor) -> torch.Tensor:
        """start_pos: the cache index of x[:, 0] (int), or the cache slots of x's T tokens (T,) long (a decode
        step: attention spans the whole cache and `mask` hides what a query may not see). mask: None = causal
        over x alone, else an additive bias (B|1, 1, T, S)."""
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        if isinstance(start_pos, torch.Tensor):
            assert self.cache is not None  # decode steps (cache slots) run after setup_caches
            k, v = self.cache.write_at(start_pos, k, v)
        elif self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)
        p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=p)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, -1)))


class MLP(nn.Module):
    def __init__(self, args: GPT2Args):
        super().__init__()
        self.c_fc = nn.Linear(args.dim, args.hidden_dim)
        self.c_proj = nn.Linear(args.hidden_dim, args.dim)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # gelu_new


class Block(nn.Module):
    def __init__(self, args: GPT2Args):
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.attn = Attention(args)
        self.ln_2 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, mask, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        h = x + self.attn(self.ln_1(x), mask, start_pos)
        return h + self.mlp(self.ln_2(h))


# the two residual-stream writers of each block: initialised at std / sqrt(2 * n_layers)
RESIDUAL_PROJECTIONS = ("attn.c_proj.weight", "mlp.c_proj.weight")


class GPT2(nn.Module):
    def __init__(self, args: GPT2Args):
        super().__init__()
        self.args = args
        self.wte = nn.Embedding(args.vocab_size, args.dim)
        self.wpe = nn.Embedding(args.max_seq_len, args.dim)
        self.drop = nn.Dropout(args.dropout)
        self.h = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.ln_f = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.cache_len = 0

    @property
    def layers(self) -> nn.ModuleList:
        """The blocks, under the name generic code (distributed.parallelize) wraps them by: h itself."""
        return self.h

    # ---- initialization -------------------------------------------------------------------------
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """GPT-2's init: N(0, std) for the embeddings and projections, the residual projections (attn.c_proj,
        mlp.c_proj) at std / sqrt(2 * n_layers), biases 0, LayerNorm gains 1. The head shares wte's values."""
        for name, p in self.named_parameters():
            self.init_parameter(name, p, std, generator)

    def init_parameter(self, name: str, t: torch.Tensor, std: float = 0.02,
                       generator: torch.Generator | None = None) -> None:
        """init_weights' rule for the parameter `name`, in place on `t`; with a generator, each tensor draws from
        its own (model.tensor_generator of the seed and the name), independent of order and of other tensors."""
        g = tensor_generator(generator.initial_seed(), name, generator.device) if generator is not None else None
        if name.endswith(".bias"):
            nn.init.zeros_(t)
        elif t.ndim == 1:
            nn.init.ones_(t)
        elif name.endswith(RESIDUAL_PROJECTIONS):
            nn.init.normal_(t, 0.0, std / math.sqrt(2 * self.args.n_layers), generator=g)
        else:
            nn.init.normal_(t, 0.0, std, generator=g)

    # ---- KV cache ---------------------------------------------------------------------------------
    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype=None, device=None,
                     fuse_projections: bool = False) -> None:
        """A static KV cache of max_seq_len slots per layer; forward() then writes at start_pos. The cache may be
        longer than the position table (compiled generation rounds it up); the positions written may not. The
        projections are fused already (c_attn), so fuse_projections changes nothing."""
        w = self.wte.weight
        for block in cast(Iterable[Block], self.h):
            block.attn.cache = KVCache(max_batch_size, self.args.n_heads, max_seq_len, self.args.head_dim,
                                       dtype or w.dtype, device or w.device)
        self.cache_len = max_seq_len

    def clear_caches(self) -> None:
        for block in cast(Iterable[Block], self.h):
            del block.attn.cache
            block.attn.cache = None
        self.cache_len = 0

    def decode_step(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                    key_mask: torch.Tensor) -> torch.Tensor:
        """Transformer.decode_step's contract: tokens (B, T) written at cache `slots` (T,), at `positions` (B, T),
        attending the whole cache except later slots and keys where key_mask (B, cache_len) is False -> logits."""
        bias = cache_slots_mask(slots, key_mask)
        h = self.drop(self.wte(tokens) + self.wpe(positions))
        for block in self.h:
            h = block(h, bias, slots)
        return self.lm_head(self.ln_f(h))

    def check_length(self, length: int) -> None:
        """A sequence of `length` positions (prompt + new tokens in generation) fits the position table, else a
        UserError."""
        if length > self.args.max_seq_len:
            raise UserError(f"a sequence of {length} positions is longer than this GPT-2 model's {self.args.max_seq_len} "
                            "learned positions (n_positions): use at most that many (MAX_SEQ_LEN, prompt + new tokens)")

    # ---- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int = 0,
        *,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
        labels: torch.Tensor | None = None,
        per_row: bool = False,
    ) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V); the arguments are Transformer.forward's. Positions index the
        learned table, so start_pos + T (or the largest given position) must stay below max_seq_len."""
        B, T = tokens.shape
        self.check_length(start_pos + T)
        mask = attention_mask(B, T, start_pos, self.cache_len, "sdpa", tokens.device, doc_ids=doc_ids,
                              key_mask=key_mask, attn_mask=attn_mask)
        if positions is None:
            positions = default_positions(B, T, start_pos, tokens.device, doc_ids)
        h = self.drop(self.wte(tokens) + self.wpe(positions))
        for block in self.h:
            h = block(h, mask, start_pos)
        h = self.ln_f(h)
        if return_hidden:
            return h
        if labels is not None:
            return head_loss(h, self.lm_head, labels, per_row)  # () or (B,) fp32
        return self.lm_head(h)
