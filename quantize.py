"""Weight-only int8 for decoding: int8 weights with one fp32 scale per output channel (symmetric,
round-to-nearest), activations stay in their dtype.

Greedy decoding at batch 1 reads every weight once per token, so its speed is bounded by memory bandwidth /
weight bytes; int8 weights are half the bytes of bf16 and a quarter of fp32. `int8_weights(model)` swaps every
plain nn.Linear for an Int8Linear for the duration of a with-block and puts the originals back after (the
model's own weights are never modified). The matmul is ATen's CPU int8-weight kernel (`_weight_int8pack_mm`,
bf16 / fp32 activations; other activation dtypes dequantize the weight per call). A model on a GPU is refused:
there the weight would be dequantized to a full copy on every call, reading more bytes than bf16 weights do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from errors import UserError


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None]).T with q int8 (out, in) and scale fp32 (out,); no bias (the model has none)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear takes bias-free linear layers")
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        if x2.device.type == "cpu" and x2.dtype in (torch.bfloat16, torch.float32):
            y = torch._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scale.to(x2.dtype))
        else:
            y = F.linear(x2, self.qweight.to(x2.dtype)) * self.scale.to(x2.dtype)
        return y.reshape(*lead, -1)  # (..., out)


@contextlib.contextmanager
def int8_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Every plain nn.Linear of `model` runs with int8 weights inside the block (a tied output layer is
    quantized as the head; the embedding table stays as it is); the original modules come back after."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise UserError(f"int8 decoding (--int8) runs on CPU only, the model is on {device}: there each call would "
                        "dequantize the whole weight, slower than bf16; decode in bf16 (--dtype bf16) instead")
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    swapped.append((parent, name, child))
                    setattr(parent, name, Int8Linear(child))
        yield model
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)
