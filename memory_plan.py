"""Per-GPU memory of an FSDP2 training run, from the model's shapes alone: parameters, gradients, optimizer
state, activations and the transient buffers around them, and the peak those add up to.

The arithmetic follows what this repo's training step does (distributed.parallelize, train.py):
- FSDP2 shards every parameter on dim 0 over the ranks (fully_shard per block, then the root) and keeps
  fp32 master weights (MixedPrecisionPolicy(param_dtype=None)); gradients are fp32 shards of the same size.
- bf16 runs under torch.autocast: every matmul casts its fp32 weight to a bf16 copy that autograd saves for
  backward, so without activation checkpointing each layer holds a bf16 copy of its weights from its forward
  to its backward, besides its activations. fp32 runs have no casts.
- Optimizer state per parameter: AdamW two fp32 moments; SGD one momentum buffer; Muon one momentum buffer on
  the hidden matrices (AdamW on embeddings, head and gains) plus, at the step, the whole matrix gathered and
  orthogonalized in bf16 on every rank (optim.Muon).
- The LM head under FSDP2 materializes the logits (B, T, V): the compute-dtype logits, their fp32 copy for
  the log-softmax, the saved log-probabilities and their gradient.

The peak is the largest of three moments: the start of backward (every activation alive), the end of
backward (every gradient shard written, the root's full gradients not yet reduced) and the optimizer step.
Activation bytes per token and layer are counted from the tensors autograd saves in model.py's blocks
(fp32 residual stream and RMSNorm outputs, the bf16 casts of matmul inputs, RoPE's fp32 q/k, SDPA's
q/k/v/output, SwiGLU's inputs). tests/test_memory_plan.py checks the total against torch's FSDP2 memory
tracker run under fake tensors on real layer widths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model import ModelArgs, Transformer

# GPU memory sizes the plan checks against, GB (10^9 bytes) as the datasheets state them
GPU_SIZES_GB = (40, 80, 141)
# share of a GPU's memory the plan leaves for the CUDA context, NCCL buffers and allocator fragmentation
HEADROOM = 0.10
PRECISIONS = ("bf16", "fp32")
OPTIMIZERS = ("adamw", "sgd", "muon")


@dataclass
class MemoryPlan:
    """Bytes per GPU: the sharded fp32 parameters, gradients and optimizer state, the activations saved for
    backward (with the compute-dtype weight copies autocast saves), and at the peak moment `peak_at` the
    transient buffers on top of those it holds (gathered parameters, gradient buffers, logits, recomputed
    activations, the optimizer's work buffers). Gradients are not held at the head's backward (the previous
    step's were freed by zero_grad), activations not at the optimizer step."""

    gpus: int
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
    c = bytes of the compute dtype. RoPE saves nothing per token (its rotations need no gradient), and
    SDPA's output is already laid out (B, T, H, hd), so wo reuses it."""
    c = 2 if precision == "bf16" else 4
    d, q, kv, h = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.hidden_dim
    casts = (3 + 2) * c * d if c < 4 else 0  # wq, wk, wv and w1, w3 each cast their fp32 input
    norms = 2 * (4 * d + 4 * d)  # residual input and normalized output of both RMSNorms, fp32
    attention = c * (q + 2 * kv) + c * q  # SDPA's q, k, v and output
    mlp = 4 * c * h  # silu input, silu output, w3 output, w2 input
    return casts + norms + attention + mlp


def plan(args: ModelArgs, gpus: int, precision: str = "bf16", optimizer: str = "adamw",
         activation_checkpointing: bool = False, micro_batch: int = 1, seq_len: int | None = None) -> MemoryPlan:
    """The per-GPU memory of training `args` with FSDP2 on `gpus` ranks (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r}: expected one of {OPTIMIZERS}")
    shapes = _shapes(args)
    tokens = micro_batch * (seq_len or args.max_seq_len)
    c = 2 if precision == "bf16" else 4
    sharded = {n: _sharded_numel(s, gpus) for n, s in shapes.items()}
    params = grads = 4 * sum(sharded.values())
    hidden = {n for n, s in shapes.items() if _is_hidden_matrix(n, s)}
    per_param = {"adamw": lambda n: 8, "sgd": lambda n: 4, "muon": lambda n: 4 if n in hidden else 8}[optimizer]
    opt = sum(per_param(n) * k for n, k in sharded.items())

    d, V = args.dim, args.vocab_size
    block = [n for n in shapes if n.startswith("layers.0.")]
    block_full = 4 * sum(math.prod(shapes[n]) for n in block)  # one block's fp32 parameters, gathered
    block_matmul = sum(math.prod(shapes[n]) for n in block if len(shapes[n]) == 2)
    root_full = 4 * sum(math.prod(s) for n, s in shapes.items() if not n.startswith("layers."))
    low = c < 4  # autocast: matmuls run on compute-dtype copies of the fp32 weights
    weight_copy = c * block_matmul if low else 0  # what one block's matmuls save of their weights
    per_layer = activation_bytes_per_token(args, precision) * tokens
    if activation_checkpointing:  # each block keeps its fp32 input; backward recomputes one block at a time
        layer_saved, recompute = 4 * d * tokens, per_layer + weight_copy
    else:
        layer_saved, recompute = per_layer + weight_copy, 0
    saved = args.n_layers * layer_saved
    saved += 8 * d * tokens  # the final RMSNorm's input and output
    out_copy = c * V * d if low else 0  # the head's compute-dtype weight, saved for its backward

    # gathered block + its fp32 gradients, + the previous block's reduce-scatter and the next one's all-gather
    # buffers when there are such blocks (the second block from the top has both from 3 blocks on)
    block_buffers = 2 + min(args.n_layers - 1, 1) + (args.n_layers >= 3)
    # the root's parameters (embedding, final norm, head) stay gathered from its forward to its backward
    moments = {
        # the loss's backward: saved log-probabilities (fp32) and two fp32 buffers of their gradient
        "head backward": root_full + saved + out_copy + 12 * V * tokens,
        # a block's backward: the block gathered, the next one's all-gather buffer, the previous one's
        # reduce-scatter buffer (from the second block on: the first block's saved activations are freed by
        # then), its fp32 and compute-dtype weight gradients, its recomputed activations. Going down the
        # blocks, saved activations are freed as gradient shards are written: the larger of the two is held.
        "block backward": root_full + block_buffers * block_full + 2 * weight_copy + recompute
        + max(saved - layer_saved, grads),
    }
    if optimizer == "muon":  # the whole update gathered in fp32, orthogonalized in bf16 (x, A, A @ A)
        biggest = max(math.prod(shapes[n]) for n in hidden)
        moments["optimizer step"] = grads + 4 * biggest + 2 * (biggest + 2 * min(shapes[n][0] for n in hidden) ** 2)
    else:
        moments["optimizer step"] = grads + 4 * max(sharded.values())  # one parameter's temporary at a time
    peak_at = max(moments, key=moments.get)
    at_peak = moments[peak_at]
    held = {"head backward": saved, "block backward": max(saved - layer_saved, grads), "optimizer step": grads}[peak_at]
    return MemoryPlan(gpus=gpus, parameters=params, gradients=grads, optimizer=opt, activations=saved,
                      transient=at_peak - held, peak=params + opt + at_peak, peak_at=peak_at)
