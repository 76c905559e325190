"""Per-GPU memory of an FSDP2 training run, from the model's shapes alone: parameters, gradients, optimizer
state, activations and the transient buffers around them, and the peak those add up to.

The arithmetic follows what this repo's training step does (distributed.parallelize, train.py):
- FSDP2 shards every parameter on dim 0 over the ranks of a shard group (all ranks, or under HSDP the
  FSDP_SHARD_GROUP_SIZE ranks of one node; replicas add no per-GPU state) and keeps fp32 master weights;
  gradients are fp32 shards of the same size.
- bf16 runs gather the parameters in bf16 (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)): a
  gathered block holds 2 bytes per parameter, its matmuls need no casts (autocast finds bf16 weights), the
  residual stream is bf16, and the gradients are computed in bf16, then reduce-scattered in fp32.
  fp32 runs gather and compute in fp32.
- Gradient accumulation over `grad_accum` micro-batches: by default every micro-batch's backward reduce-scatters
  into the fp32 shards, so a rank holds its gradient shards from the first micro-batch on (they are held at
  every later backward). With unsharded accumulation (FSDP_UNSHARDED_ACCUMULATION) no reduction happens before
  the last micro-batch: every rank holds a full fp32 copy of the model's gradients from the first micro-batch's
  backward until the last one's reduce-scatters free it block by block.
- Optimizer state per parameter: AdamW two fp32 moments; SGD one momentum buffer; Muon one momentum buffer on
  the hidden matrices (AdamW on embeddings, head and gains) plus, at the step, the whole matrix gathered and
  orthogonalized in bf16 on every rank (optim.Muon).
- The LM head and the loss run inside the model's forward (`model(x, labels=y)`, fused_ce.head_loss). When
  fusing pays (fused_ce.fusing_pays: at least ~0.4 x dim tokens per micro-batch) no (B, T, V) logits exist:
  the forward computes the fp32 (V, d) head gradient and the compute-dtype (B*T, d) hidden gradient and keeps
  both for backward, working through CHUNK_ROWS positions at a time (a chunk's logits in fp32, and under
  bf16 their compute-dtype copy, the softmax gradient cast back to bf16 and one bf16 (V, d) product per
  chunk); its backward scales the fp32 head gradient into a second fp32 (V, d) tensor and casts that to the
  gathered weight's dtype, beside the scaled hidden gradient. The head's gathered-dtype gradient then stays
  until the root's post-backward at the end of backward. A smaller micro-batch takes the plain path, whose
  loss backward holds the compute-dtype logits, their fp32 copy, the saved log-probabilities and their
  gradient (fp16 would too, but FSDP2 runs here gather bf16 or fp32).

The peak is the largest of four moments: the fused head's forward (every activation alive, one chunk's
logits), the head's backward (the last block's parameters already gathered), a block's backward (the block
gathered, its gradients, its recomputed activations and one activation gradient, the neighbours' all-gather
and reduce-scatter buffers, the head's gradient) and the optimizer step.
Activation bytes per token and layer are counted from the tensors autograd saves in model.py's blocks
(RMSNorm's fp32 input and its compute-dtype outputs, SDPA's q/k/v/output, SwiGLU's inputs).
tests/test_memory_plan.py checks the total against torch's FSDP2 memory tracker run under fake tensors on
real layer widths over the training step itself, `model(x, labels=y)` (one micro-batch: the tracker refuses
several forwards per step), and tests/test_distributed.py
checks the gradient term against the gradient buffers FSDP2 holds in a 2-process CPU run with 1 and 4
micro-batches in both accumulation modes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fused_ce import CHUNK_ROWS, fusing_pays
from model import ModelArgs, Transformer

# GPU memory sizes the plan checks against, GB (10^9 bytes) as the datasheets state them
GPU_SIZES_GB = (40, 80, 141)
# share of a GPU's memory the plan leaves for the CUDA context, NCCL buffers and allocator fragmentation
HEADROOM = 0.10
PRECISIONS = ("bf16", "fp32")
OPTIMIZERS = ("adamw", "sgd", "muon")


@dataclass
class MemoryPlan:
    """Bytes per GPU: the sharded fp32 parameters and optimizer state, the most gradient bytes a rank holds
    (its fp32 shards, or under unsharded accumulation the full fp32 copy), the activations saved for backward,
    and at the peak moment `peak_at` the transient buffers on top of those it holds (gathered parameters,
    gradient buffers, the LM head's work, recomputed activations, the optimizer's work buffers). Gradients are held at the
    head's backward only from the second micro-batch on (the previous step's were freed by zero_grad),
    activations not at the optimizer step."""

    gpus: int
    shard_group: int
    grad_accum: int
    unsharded_accumulation: bool
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    transient: int
    peak: int
    peak_at: str

    def fits(self, gb: float) -> bool:
        return self.peak <= gb * 1e9 * (1 - HEADROOM)


def _shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Transformer(args)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}  # a tied output is listed once


def _sharded_numel(shape: tuple[int, ...], gpus: int) -> int:
    """fully_shard splits dim 0 into `gpus` chunks (torch.chunk sizes, padded to the largest)."""
    return math.ceil(shape[0] / gpus) * math.prod(shape[1:])


def _is_hidden_matrix(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and name.startswith("layers.")


def activation_bytes_per_token(args: ModelArgs, precision: str) -> int:
    """Bytes one token leaves saved for backward in one block (no checkpointing), weights not included.
    c = bytes of the compute dtype (the gathered parameters' dtype, so no matmul casts its input). Each RMSNorm
    saves its input in fp32 (the upcast), its normalized output and the gained output (the matmuls' input) in
    c; RoPE saves nothing per token (its rotations need no gradient), and SDPA's output is already laid out
    (B, T, H, hd), so wo reuses it."""
    c = 2 if precision == "bf16" else 4
    d, q, kv, h = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.hidden_dim
    norms = 2 * (4 * d + 2 * c * d)  # attention_norm and ffn_norm
    attention = c * (q + 2 * kv) + c * q  # SDPA's q, k, v and output
    mlp = 4 * c * h  # silu input, silu output, w3 output, w2 input
    return norms + attention + mlp


def plan(args: ModelArgs, gpus: int, precision: str = "bf16", optimizer: str = "adamw",
         activation_checkpointing: bool = False, micro_batch: int = 1, seq_len: int | None = None,
         grad_accum: int = 1, unsharded_accumulation: bool = False, shard_group: int | None = None) -> MemoryPlan:
    """The per-GPU memory of training `args` with FSDP2 on `gpus` ranks, parameters sharded over groups of
    `shard_group` ranks (default: all; HSDP otherwise), `grad_accum` micro-batches per step (see the module
    docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r}: expected one of {OPTIMIZERS}")
    shard = shard_group or gpus
    if gpus % shard:
        raise ValueError(f"shard group {shard} does not divide {gpus} GPUs")
    shapes = _shapes(args)
    tokens = micro_batch * (seq_len or args.max_seq_len)
    c = 2 if precision == "bf16" else 4
    sharded = {n: _sharded_numel(s, shard) for n, s in shapes.items()}
    params = grads = 4 * sum(sharded.values())
    full_grads = 4 * sum(math.prod(s) for s in shapes.values())
    # what a later micro-batch's backward finds already held: the gradient shards, or the unsharded copy
    accumulated = 0 if grad_accum == 1 else full_grads if unsharded_accumulation else grads
    hidden = {n for n, s in shapes.items() if _is_hidden_matrix(n, s)}
    per_param = {"adamw": lambda n: 8, "sgd": lambda n: 4, "muon": lambda n: 4 if n in hidden else 8}[optimizer]
    opt = sum(per_param(n) * k for n, k in sharded.items())

    d, V = args.dim, args.vocab_size
    block = [n for n in shapes if n.startswith("layers.0.")]
    block_numel = sum(math.prod(shapes[n]) for n in block)
    block_gathered = c * block_numel  # one block's parameters as gathered (and its unsharded gradients)
    root_gathered = c * sum(math.prod(s) for n, s in shapes.items() if not n.startswith("layers."))
    per_layer = activation_bytes_per_token(args, precision) * tokens
    if activation_checkpointing:  # each block keeps its input; backward recomputes one block at a time
        layer_saved, recompute = c * d * tokens, per_layer
    else:
        layer_saved, recompute = per_layer, 0
    saved = args.n_layers * layer_saved
    saved += (4 + 2 * c) * d * tokens  # the final RMSNorm's fp32 input and outputs

    # a block's backward, while it computes: the block gathered, its unsharded gradients (compute dtype), its
    # recomputed activations, the previous block's fp32 reduce-scatter input (from the second block on) and the
    # next one's all-gather buffer (the second block from the top has both from 3 blocks on). Then its
    # post-backward: the parameters resharded and the previous reduce-scatter done, the gradients are copied
    # into its own fp32 reduce-scatter input beside the next block, gathered
    reduce_input = 4 * block_numel
    # in a block's backward one (tokens, hidden_dim) activation gradient is in flight beside what it recomputed
    in_flight = c * args.hidden_dim * tokens
    block_buffers = max(2 * block_gathered + recompute + in_flight + min(args.n_layers - 1, 1) * reduce_input
                        + (args.n_layers >= 3) * block_gathered,
                        block_gathered + reduce_input + (args.n_layers >= 2) * block_gathered)
    # the root's parameters (embedding, final norm, head) stay gathered from its forward to its backward
    # the head's gradient in the gathered dtype, held from the head's backward to the root's post-backward (after
    # the last block's backward)
    head_grad = c * V * d
    if fusing_pays(tokens, d):  # fused_ce: no (B, T, V) logits
        n = min(CHUNK_ROWS, tokens)
        # kept from the head's forward to its backward: the fp32 (V, d) head gradient, the hidden gradient
        head_held = 4 * V * d + c * tokens * d
        # one chunk: its fp32 logits, then (bf16) the softmax gradient cast to bf16 beside them and either the
        # (n, d) hidden-gradient product or the (V, d) bf16 product added into the fp32 head gradient; fp32
        # computes in place, with one (n, d) product
        chunk = 4 * n * V + (2 * n * V + 2 * max(n, V) * d if c == 2 else 4 * n * d)
        # backward: the scaled fp32 head gradient, its cast to the gathered dtype (bf16), the scaled hidden one
        head_backward = head_held + 4 * V * d + (c == 2) * c * V * d + c * tokens * d
        head_moments = {"head forward": root_gathered + saved + head_held + chunk + accumulated}
    else:  # the plain path: saved fp32 log-probabilities and two fp32 buffers of their gradient
        head_backward = 12 * V * tokens
        head_moments = {}
    moments = {
        **head_moments,
        # the last block's parameters are gathered (prefetched) while the head's backward runs
        "head backward": root_gathered + saved + head_backward + block_gathered + accumulated,
        # a block's backward: its buffers and recomputed activations. Going down the blocks, saved activations
        # are freed as gradient shards are written: the larger of the two is held (both, when a previous
        # micro-batch's gradients are held; an unsharded copy shrinks as it is reduce-scattered)
        "block backward": root_gathered + head_grad + block_buffers
        + (saved - layer_saved + accumulated if accumulated else max(saved - layer_saved, grads)),
    }
    if optimizer == "muon":  # the whole update gathered in fp32, orthogonalized in bf16 (x, A, A @ A)
        # per matrix: its fp32 update, and in bf16 x, A = x x^T and A @ A (A is min(rows, cols) square)
        moments["optimizer step"] = grads + max(4 * math.prod(shapes[n]) + 2 * (math.prod(shapes[n])
                                                + 2 * min(shapes[n]) ** 2) for n in hidden)
    else:
        moments["optimizer step"] = grads + 4 * max(sharded.values())  # one parameter's temporary at a time
    peak_at = max(moments, key=moments.get)
    at_peak = moments[peak_at]
    held = {"head forward": saved + accumulated, "head backward": saved + accumulated,
            "block backward": saved - layer_saved + accumulated if accumulated else max(saved - layer_saved, grads),
            "optimizer step": grads}[peak_at]
    return MemoryPlan(gpus=gpus, shard_group=shard, grad_accum=grad_accum,
                      unsharded_accumulation=unsharded_accumulation and grad_accum > 1, parameters=params,
                      gradients=max(grads, accumulated), optimizer=opt, activations=saved,
                      transient=at_peak - held, peak=params + opt + at_peak, peak_at=peak_at)
