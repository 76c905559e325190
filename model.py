"""The Llama 3 / 3.1 / 3.2 architecture, read top to bottom as a spec.

Parameter names follow Meta's reference implementation so that a Meta checkpoint loads by name:
tok_embeddings, layers.N.attention.{wq,wk,wv,wo}, layers.N.feed_forward.{w1,w2,w3},
layers.N.attention_norm, layers.N.ffn_norm, norm, output. With Mixture of Experts (moe.py) the FFN is
layers.N.feed_forward.{gate, experts.w1/w2/w3, shared_expert.w1/w2/w3} (Mixtral's reference names).

RoPE uses Meta's layout: each head's dimensions are rotated in interleaved pairs (0,1), (2,3), ...
HF checkpoints store q/k permuted for the "rotate half" layout; model_utils undoes that on import.

Architecture only: no process groups, no devices, no logging, no checkpoint policy.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from fused_ce import head_loss
from moe import MoEFeedForward


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = n_heads (multi-head attention)
    vocab_size: int = 128256
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None  # explicit SwiGLU hidden size (HF configs give it); overrides the rule
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Llama 3.1 scaling: {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    attn_impl: str = "auto"  # "sdpa" | "math" | "flex" | "auto" (= sdpa; "math" is the explicit reference path)
    # Mixture of Experts (moe.py): 0 experts = the dense SwiGLU FFN. Each expert has hidden_dim units.
    moe_num_experts: int = 0
    moe_top_k: int = 2  # experts per token
    moe_capacity_factor: float = 0.0  # 0 = no token dropped (Mixtral); c > 0: ceil(c * tokens * k / E) per expert
    moe_shared_expert: bool = False  # one more SwiGLU every token goes through, unweighted
    moe_impl: str = "auto"  # "grouped" | "dense" | "auto" (= grouped; "dense" is the reference path)
    extra: dict = field(default_factory=dict)  # free-form provenance, never read by the model

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim={self.dim // self.n_heads} must be even for RoPE")
        if self.attn_impl not in ("auto", "sdpa", "math", "flex"):
            raise ValueError(f"attn_impl={self.attn_impl!r}; expected auto, sdpa, math or flex")
        if self.moe_num_experts and not 1 <= self.moe_top_k <= self.moe_num_experts:
            raise ValueError(f"moe_top_k={self.moe_top_k} must be between 1 and moe_num_experts={self.moe_num_experts}")
        if self.moe_impl not in ("auto", "grouped", "dense"):
            raise ValueError(f"moe_impl={self.moe_impl!r}; expected auto, grouped or dense")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size: Meta's rule (2/3 * 4d, times the multiplier, rounded up) unless given."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 (as Meta and HF do), then cast back before the gain.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama 3.1 scaling when configured.

    Llama 3.1 scaling (Meta's apply_scaling): wavelengths longer than original_ctx/low_freq_factor are
    divided by `factor`, shorter than original_ctx/high_freq_factor are kept, and the band between is
    interpolated linearly in 1/wavelength.
    """
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    sc = args.rope_scaling
    if sc:
        factor = float(sc["factor"])
        low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
        old_ctx = float(sc.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(
            wavelen > low_wavelen,
            inv_freq / factor,
            torch.where(wavelen < high_wavelen, inv_freq, interpolated),
        )
    return inv_freq.float()


def rope_rotations(inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """positions (B, T) long -> (cos, sin) of pos * inv_freq as (B, T, 1, head_dim/2, 2) fp32, i.e. the unit
    complex rotations e^{i * pos * inv_freq} stored as real pairs (computed once per forward, shared by
    every layer)."""
    angles = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    if torch.compiler.is_compiling():  # inductor has no complex codegen (values equal to ~1 ulp)
        return torch.stack((angles.cos(), angles.sin()), dim=-1)[:, :, None]
    return torch.view_as_real(torch.polar(torch.ones_like(angles), angles))[:, :, None]


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, hd) by rot (B, T, 1, hd/2, 2) from
    rope_rotations, in fp32 like Meta: out[2i] = x[2i] cos - x[2i+1] sin, out[2i+1] = x[2i+1] cos + x[2i] sin.

    Eager: one complex multiply (~25x faster on CPU than real arithmetic with a pair swap). Under
    torch.compile: the real form, which inductor fuses into one kernel (it has no complex codegen)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
    if torch.compiler.is_compiling():
        x0, x1, c, s = xf[..., 0], xf[..., 1], rot[..., 0], rot[..., 1]
        return torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2).type_as(x)
    out = torch.view_as_complex(xf) * torch.view_as_complex(rot)
    return torch.view_as_real(out).flatten(-2).type_as(x)


ROW_KERNELS: dict[torch.dtype, tuple[int, str]] = {}  # weight dtype -> (threads, "mv" or "linear"), see row_kernel


def row_kernel(dtype: torch.dtype) -> str:
    """Which ATen call multiplies one row by a weight matrix faster on this CPU, for weights of `dtype` at the
    current thread count: "mv" (ATen's matrix-vector kernel) or "linear" (F.linear's matrix-multiply call, oneDNN
    or BLAS). Neither wins everywhere: on an AVX-512-BF16 host with AMX torch.mv streamed bf16 weights ~1.4x faster,
    on one without AMX (AMD EPYC) F.linear ~2x faster (bench/README.md, "Decoding"). So it is measured, once per
    process, dtype and thread count: both calls alternate over 16 MiB of decode-shaped weights (more than a core's
    caches, so they stream as in decoding), best of five to seven rounds each; F.linear keeps a tie. The answer is
    cached in ROW_KERNELS, which the compiled decode step reads while it is traced (never measured there)."""
    threads = torch.get_num_threads()
    if ROW_KERNELS.get(dtype, (None,))[0] != threads:
        import time

        n = max(1, (16 << 20) // (2048 * 1024 * torch.finfo(dtype).bits // 8))
        ws = [torch.full((2048, 1024), 0.01, dtype=dtype) for _ in range(n)]
        x = torch.full((1, 1024), 0.5, dtype=dtype)
        calls = {"mv": lambda w: torch.mv(w, x[0]), "linear": lambda w: F.linear(x, w)}
        best = dict.fromkeys(calls, float("inf"))
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(8):  # the first round warms up both calls and is not counted
                for name, call in calls.items():
                    t0 = time.perf_counter()
                    for w in ws:
                        call(w)
                    if i:
                        best[name] = min(best[name], time.perf_counter() - t0)
                if i >= 5 and time.perf_counter() - start > 0.25:
                    break  # five rounds each at least; more while they are cheap (a round another process
                    # preempted does not decide: the best of each counts)
        ROW_KERNELS[dtype] = (threads, "mv" if best["mv"] < 0.95 * best["linear"] else "linear")
    return ROW_KERNELS[dtype][1]


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) (no bias). A single row on CPU (one token at batch 1: decoding) goes through the faster of
    torch.mv and F.linear on this host (row_kernel; in fp32 both give the same values, in bf16 they may differ in
    the last bit). Under torch.compile the choice made eagerly before (the prefill's head) is used, and generate's
    compiled decode step keeps these calls whole."""
    if x.device.type == "cpu" and x.numel() == x.shape[-1] and not torch.is_autocast_enabled("cpu"):
        kernel = ROW_KERNELS.get(w.dtype, (0, "mv"))[1] if torch.compiler.is_compiling() else row_kernel(w.dtype)
        if kernel == "mv":
            return torch.mv(w, x.reshape(-1)).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)  # (autocast casts F.linear's operands, not torch.mv's)


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for a projection: plain nn.Linear layers go through linear(); LoRA and int8 layers run their own."""
    return linear(x, layer.weight) if type(layer) is nn.Linear else layer(x)


class KVCache(nn.Module):
    """Static per-layer key/value cache, allocated on demand by Transformer.setup_caches."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, hd) at [start, start+T) and return the filled prefix [0, start+T)."""
        end = start + k.shape[2]
        self.k[: k.shape[0], :, start:end] = k
        self.v[: v.shape[0], :, start:end] = v
        return self.k[: k.shape[0], :, :end], self.v[: v.shape[0], :, :end]

    def write_at(self, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, hd) at the cache slots `index` (T,) long and return the whole cache (B, Hkv,
        max_len, hd): shapes that do not change from step to step (Transformer.decode_step)."""
        self.k.index_copy_(2, index, k)
        self.v.index_copy_(2, index, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.attn_impl = args.attn_impl
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None
        self.wqkv: torch.Tensor | None = None  # inference-only concatenation, see Transformer.setup_caches

    def forward(self, x, rot, mask: torch.Tensor | None, start_pos: int | torch.Tensor) -> torch.Tensor:
        """start_pos: the cache index of x[:, 0] (int), or the cache slots of x's T tokens as a (T,) long tensor
        (a static-shape decode step: attention then spans the whole cache, `mask` hides the unwritten slots)."""
        B, T, _ = x.shape
        if self.wqkv is not None:  # one weight product instead of three (inference: fewer kernels per step)
            nq, nkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = linear(x, self.wqkv).split((nq, nkv, nkv), dim=-1)
            q = q.view(B, T, self.n_heads, self.head_dim)
            k, v = k.view(B, T, self.n_kv_heads, self.head_dim), v.view(B, T, self.n_kv_heads, self.head_dim)
        else:
            q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
            k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
            v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rot), apply_rope(k, rot)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if isinstance(start_pos, torch.Tensor):
            k, v = self.cache.write_at(start_pos, k, v)  # (B, Hkv, max_len, hd)
        elif self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)  # (B, Hkv, S, hd)
        y = attention(q, k, v, mask, resolve_attn_impl(self.attn_impl, x.device))  # (B, H, T, hd)
        return project(self.wo, y.transpose(1, 2).reshape(B, T, -1))


def resolve_attn_impl(attn_impl: str, device: torch.device) -> str:
    """"auto" -> sdpa on every device ("flex" is opt-in, CUDA only, for document masks: see document_block_mask).
    On this CPU (torch 2.13, AVX-512 bf16) SDPA's fused CPU kernel is
    1.5-2x faster than explicit matmul + softmax per layer in bf16 and fp32, forward + backward, causal
    or with a float mask, and never stores the (T, S) scores (bench/README.md has the measurements)."""
    if attn_impl == "flex" and device.type != "cuda":
        return "sdpa"  # torch 2.13's flex_attention has no backward on CPU: the dense mask serves there
    if attn_impl != "auto":
        return attn_impl
    return "sdpa"


def document_block_mask(doc_ids: torch.Tensor) -> BlockMask:
    """(B, T) document ids -> flex_attention's block-sparse mask of "same document and not in the future".
    Blocks (128 x 128) wholly outside every document are skipped, and no (B, T, T) tensor is kept (building it
    evaluates a transient (B, 1, T, T) bool): the alternative to a dense bias, which costs B * T^2 elements per
    forward and keeps CUDA's SDPA off its flash kernel."""
    B, T = doc_ids.shape

    def same_document_causal(b, h, q, kv):
        return (doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv)

    return create_block_mask(same_document_causal, B, None, T, T, device=doc_ids.device)


@functools.cache
def _compiled_flex_attention():
    """torch.compile(flex_attention), one wrapper for the process: building a wrapper costs about 0.3 ms of CPU
    time, too much to repeat in every layer's forward, and flex_attention is stateless (every input is an
    argument), so one wrapper serves every model and layer."""
    return torch.compile(flex_attention)


def flex(q, k, v, block_mask: BlockMask, enable_gqa: bool) -> torch.Tensor:
    """flex_attention, compiled on CUDA (eager flex_attention is an unfused reference that materializes the
    scores); eager elsewhere, where only a no-grad forward works (CPU tests)."""
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    return _compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def causal_bias(mask: torch.Tensor | None, T: int, S: int, device: torch.device) -> torch.Tensor:
    """bool mask (B|1, 1, T, S) (None = causal with the queries at the end) -> additive fp32 bias, 0 where
    attending and -inf elsewhere, built once per forward instead of once per layer."""
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]
    return torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_fill_(~mask, float("-inf"))


def attention(q, k, v, mask: torch.Tensor | None, impl: str) -> torch.Tensor:
    """q (B, H, T, hd); k, v (B, Hkv, S, hd) -> (B, H, T, hd).

    mask: None (= causal, queries are the last T of the S keys), bool (B|1, 1, T, S) True = attend, an
    additive float bias of that shape from causal_bias, or (flex) a BlockMask from document_block_mask.
    """
    B, H, T, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    n_rep = H // Hkv
    if isinstance(mask, BlockMask):
        return flex(q, k, v, mask, enable_gqa=n_rep > 1)
    if T == 1 and torch.compiler.is_compiling():  # one query per row: a compiled decode step
        if mask is None or mask.dtype == torch.bool:
            mask = causal_bias(mask, T, S, q.device)
        return single_query_attention(q, k, v, mask)  # fuses with its neighbours instead of a kernel call
    if impl == "flex":
        impl = "sdpa"  # flex serves document masks only; causal, padded and tree masks stay on SDPA
    if impl == "sdpa":
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_rep > 1)
        if mask.is_floating_point() and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)  # SDPA wants the bias in the compute dtype (bf16 under autocast)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_rep > 1)
    if mask is None or mask.dtype == torch.bool:
        mask = causal_bias(mask, T, S, q.device)
    # GQA without repeating k/v: the n_rep query heads sharing a kv head are stacked along T, so each kv
    # head is read once (query head h uses kv head h // n_rep, as repeat_interleave would give).
    qg = (q * (1.0 / math.sqrt(hd))).reshape(B, Hkv, n_rep * T, hd)  # scale the smaller operand
    scores = (qg @ k.transpose(-2, -1)).view(B, Hkv, n_rep, T, S)
    # bf16 scores + fp32 bias -> fp32: the mask and the upcast for the softmax in one op
    probs = torch.softmax(scores + mask[:, :, None], dim=-1).to(v.dtype)
    return (probs.view(B, Hkv, n_rep * T, S) @ v).view(B, H, T, hd)


def single_query_attention(q, k, v, bias: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row, written as multiply-and-sum reductions in fp32: q (B, H, 1, hd), k, v
    (B, Hkv, S, hd), bias (B|1, 1, 1, S) additive -> (B, H, 1, hd). Under torch.compile it becomes a few fused
    loops instead of an SDPA call per layer (attention() takes it for one query while compiling)."""
    B, H, _, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    qg = q.float().view(B, Hkv, H // Hkv, 1, hd) * (1.0 / math.sqrt(hd))  # query heads grouped by kv head
    scores = (qg * k.float()[:, :, None]).sum(-1)  # (B, Hkv, n_rep, S)
    probs = torch.softmax(scores + bias.float().reshape(-1, 1, 1, S), dim=-1)
    out = (probs[..., None] * v.float()[:, :, None]).sum(-2)  # (B, Hkv, n_rep, hd)
    return out.view(B, H, 1, hd).to(q.dtype)


# ---- masks and positions ---------------------------------------------------------------------------
# Built once per forward (not once per layer) and handed to every block.


def attention_mask(B: int, T: int, start_pos: int, cache_len: int, impl: str, device: torch.device, *,
                   doc_ids: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                   attn_mask: torch.Tensor | None = None) -> torch.Tensor | BlockMask | None:
    """The mask Transformer.forward gives every layer for T queries at cache index start_pos (arguments as there):

    - None: plain causal attention (SDPA's is_causal), the training case;
    - a BlockMask of doc_ids (impl "flex", no key_mask, no KV cache): block-sparse document masking;
    - otherwise an additive bias (B|1, 1, T, start_pos + T) from causal_bias, in the autocast dtype for SDPA:
      key_mask over the causal prefix of the cache (a padding query sees itself), or the queries filling a cache
      causally, or attn_mask, or same-document-and-causal for doc_ids; impl "math" always takes a bias.
    """
    if attn_mask is not None and (doc_ids is not None or key_mask is not None or start_pos or cache_len):
        raise ValueError("attn_mask excludes doc_ids, key_mask, start_pos and a KV cache")
    allowed = None  # bool (B|1, 1, T, S), True = attend
    if key_mask is not None or (cache_len and attn_mask is None and doc_ids is None and (start_pos > 0 or T > 1)):
        allowed = _cache_prefix_mask(B, T, start_pos, device, key_mask)
    elif attn_mask is not None:
        allowed = attn_mask[:, None]  # (B, 1, T, T)
    elif doc_ids is not None and impl == "flex" and not cache_len:
        return document_block_mask(doc_ids)  # block-sparse, never (B, T, T)
    elif doc_ids is not None:
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
        allowed = (same_doc & torch.ones(T, T, dtype=torch.bool, device=device).tril())[:, None]  # (B, 1, T, T)
    if allowed is None and impl != "math":
        return None
    bias = causal_bias(allowed, T, start_pos + T, device)
    if impl != "math" and torch.is_autocast_enabled(device.type):
        # SDPA wants the bias in the compute dtype: one lossless (0 / -inf) cast here instead of one per layer,
        # each of which autograd would keep for backward (n_layers copies of B * T * S)
        bias = bias.to(torch.get_autocast_dtype(device.type))
    return bias


def _cache_prefix_mask(B: int, T: int, start_pos: int, device: torch.device,
                       key_mask: torch.Tensor | None) -> torch.Tensor:
    """T queries at cache index start_pos over the S = start_pos + T keys before and at them -> (B, 1, T, S) bool:
    causal, and with key_mask (B, >= S) only the real keys, except that a query that is itself padding (it would
    see no key at all) sees itself."""
    S = start_pos + T
    mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(start_pos)[None, None].expand(B, 1, T, S)
    if key_mask is None:
        return mask
    own = torch.zeros(T, S, dtype=torch.bool, device=device)
    own[torch.arange(T), start_pos + torch.arange(T)] = True
    return (mask & key_mask[:, None, None, :S]) | own[None, None]


def cache_slots_mask(slots: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Transformer.decode_step's mask: queries written at cache `slots` (T,) attend the slots up to their own where
    key_mask (B, S) is True, and themselves (a padding query) -> additive bias (B, 1, T, S)."""
    index = torch.arange(key_mask.shape[1], device=slots.device)
    visible = (index[None, :] <= slots[:, None])[None, None] & key_mask[:, None, None, :]  # (B, 1, T, S)
    visible = visible | (index[None, :] == slots[:, None])[None, None]
    return causal_bias(visible, slots.shape[0], key_mask.shape[1], slots.device)


def default_positions(B: int, T: int, start_pos: int, device: torch.device,
                      doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Transformer.forward's RoPE positions (B, T) when none are given: start_pos + arange(T), or with doc_ids
    (non-decreasing along T) each token's index inside its document."""
    idx = torch.arange(start_pos, start_pos + T, device=device).expand(B, T)
    if doc_ids is None:
        return idx
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w13: torch.Tensor | None = None  # inference-only [w1; w3], see Transformer.setup_caches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = linear(x, self.w13).chunk(2, dim=-1)
            return project(self.w2, F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def feed_forward(args: ModelArgs) -> nn.Module:
    """The block's FFN: dense SwiGLU, or a Mixture of Experts when args.moe_num_experts > 0."""
    if not args.moe_num_experts:
        return FeedForward(args.dim, args.hidden_dim)
    shared = FeedForward(args.dim, args.hidden_dim) if args.moe_shared_expert else None
    return MoEFeedForward(args.dim, args.hidden_dim, args.moe_num_experts, args.moe_top_k,
                          args.moe_capacity_factor, shared, args.moe_impl)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = feed_forward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rot, mask, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rot, mask, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


def tensor_generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator of the tensor `name` alone, on `device`: seeded from the seed and the name (a stable hash),
    so the tensor's values are the same whichever other tensors were drawn, and where."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)
        self.cache_len = 0

    def _apply(self, fn, recurse: bool = True):
        # .to(dtype) / .to_empty() / .cuda() must not degrade or discard the RoPE frequencies: they are
        # always recomputed in fp32 on the new device (bf16 inv_freq drifts at long positions).
        super()._apply(fn, recurse)
        device = self.tok_embeddings.weight.device
        if device.type != "meta":
            self.inv_freq = rope_frequencies(self.args).to(device)
        return self

    # ---- initialization -------------------------------------------------------------------------
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """N(0, std) for embeddings and projections; the two residual-stream writers of each block
        (wo, w2 and every expert's w2) get std / sqrt(2 * n_layers) so the residual variance stays O(1) with depth
        (GPT-2 / nanoGPT); norms start at 1. Tied output shares the embedding init."""
        for name, p in self.named_parameters():
            self.init_parameter(name, p, std, generator)

    def init_parameter(self, name: str, t: torch.Tensor, std: float = 0.02,
                       generator: torch.Generator | None = None) -> None:
        """init_weights' rule for the parameter `name`, applied in place to `t` (the parameter, or a full-size
        tensor standing in for a sharded one). With a generator, the tensor draws from its own one
        (tensor_generator of the generator's seed and the name, on the generator's device): its values depend
        on neither the order nor the other tensors, so a sharded build can draw any tensor alone, on the GPU."""
        g = tensor_generator(generator.initial_seed(), name, generator.device) if generator is not None else None
        if t.ndim == 1:
            nn.init.ones_(t)
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "feed_forward.experts.w2",
                            "shared_expert.w2.weight")):
            nn.init.normal_(t, 0.0, std / math.sqrt(2 * self.args.n_layers), generator=g)
        else:
            nn.init.normal_(t, 0.0, std, generator=g)

    # ---- KV cache ---------------------------------------------------------------------------------
    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype=None, device=None,
                     fuse_projections: bool = False) -> None:
        """Allocate a static KV cache; forward() then appends at start_pos.

        fuse_projections: also concatenate wq|wk|wv and w1|w3 of each block into one weight each (a
        temporary copy, dropped by clear_caches), so a decode step runs 4 matmuls per block instead of
        7. Only for inference with frozen weights: the copy does not see later weight updates, and
        blocks whose projections are not plain nn.Linear (LoRA) are left unfused.
        """
        w = self.tok_embeddings.weight
        dtype = dtype or w.dtype
        device = device or w.device
        for layer in self.layers:
            attn = layer.attention
            attn.cache = KVCache(max_batch_size, attn.n_kv_heads, max_seq_len, attn.head_dim, dtype, device)
            ff = layer.feed_forward
            if fuse_projections and all(type(m) is nn.Linear for m in (attn.wq, attn.wk, attn.wv)):
                with torch.no_grad():
                    attn.wqkv = torch.cat((attn.wq.weight, attn.wk.weight, attn.wv.weight))
            if fuse_projections and isinstance(ff, FeedForward) and all(type(m) is nn.Linear for m in (ff.w1, ff.w3)):
                with torch.no_grad():
                    ff.w13 = torch.cat((ff.w1.weight, ff.w3.weight))
        self.cache_len = max_seq_len

    def clear_caches(self) -> None:
        for layer in self.layers:
            # setup_caches registered the cache as a submodule: removed, the block is again as built (a compiled
            # block's guards check its attributes, so a leftover `cache` entry would recompile it)
            del layer.attention.cache
            layer.attention.cache = None
            layer.attention.wqkv = None
            if isinstance(layer.feed_forward, FeedForward):
                layer.feed_forward.w13 = None
        self.cache_len = 0

    def decode_step(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                    key_mask: torch.Tensor) -> torch.Tensor:
        """One decoding step whose shapes never change, so one compiled graph serves every step.

        tokens (B, T) are written to the KV cache slots `slots` (T,) long, ascending; RoPE uses `positions`
        (B, T); each query attends the whole cache (B, Hkv, cache_len, hd) except slots after its own and keys
        where key_mask (B, cache_len) is False (padding). -> logits (B, T, V). Needs setup_caches first; the
        slots before `slots` must have been written (by forward() or earlier steps). Eager, the step attends the
        whole cache from the first step on (masked), which costs little next to the weight reads at decode
        lengths. The embedding and head are called directly, not through forward(): under FSDP2 the root's
        parameters stay unsharded after the prefill's forward, which is what generation runs first."""
        bias = cache_slots_mask(slots, key_mask)
        rot = rope_rotations(self.inv_freq, positions)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, rot, bias, slots)
        return project(self.output, self.norm(h))  # (B, T, V)

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
        """tokens (B, T) -> logits (B, T, V) in the compute dtype; with `labels`, the training loss instead.

        start_pos: index of tokens[:, 0] in the KV cache (decoding); 0 for training.
        positions: (B, T) RoPE positions; default start_pos + arange(T).
        doc_ids:   (B, T) document index of each token for packed sequences: attention stays inside a
                   document and positions restart at 0 for each one (training only).
        key_mask:  (B, S) bool, False for padding keys (left-padded generation); S = start_pos + T.
        attn_mask: (B, T, T) bool, True where query t may attend key s, for any other pattern (e.g.
                   HellaSwag's context + 4 endings in one row); give `positions` with it. No KV cache.
        return_hidden: return the final normed hidden states (B, T, dim) instead of logits.
        labels:    (B, T) next-token targets, already shifted (IGNORE_INDEX: none): return the summed fp32
                   cross-entropy, or with per_row each row's summed target log-probs (B,), from the head and
                   the loss fused in row chunks (fused_ce.head_loss: no (B, T, V) logits). Computed here, in
                   the root's forward, so every wrapper (DDP, FSDP2, compile) runs its hooks around it.
        """
        B, T = tokens.shape
        impl = resolve_attn_impl(self.args.attn_impl, tokens.device)
        mask = attention_mask(B, T, start_pos, self.cache_len, impl, tokens.device, doc_ids=doc_ids,
                              key_mask=key_mask, attn_mask=attn_mask)
        if positions is None:
            positions = default_positions(B, T, start_pos, tokens.device, doc_ids)
        rot = rope_rotations(self.inv_freq, positions)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, rot, mask, start_pos)
        h = self.norm(h)
        if return_hidden:
            return h
        if labels is not None:
            return head_loss(h, self.output, labels, per_row)  # () or (B,) fp32
        return self.output(h)  # (B, T, V)
