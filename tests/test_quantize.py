"""Weight-only int8 decoding: Int8Linear == a linear layer with the dequantized weight, the rounding error is
at most half a step per weight, and generate(int8=True) == greedy decoding with the dequantized weights
(full recompute, no cache), leaving the model's own weights untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_args
from torch import nn

from generate import generate
from model import ModelArgs, Transformer
from quantize import Int8Linear, int8_weights


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_int8_linear_equals_the_dequantized_weight(dtype, tol):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=False)
    q = Int8Linear(lin)
    w = lin.weight.detach()
    assert q.qweight.dtype == torch.int8
    assert ((q.dequantized() - w).abs() <= q.scale[:, None] / 2 + 1e-7).all()  # round to nearest
    x = torch.randn(3, 5, 96)
    want = x.double() @ q.dequantized().double().t()
    got = q(x.to(dtype)).double()
    assert got.shape == (3, 5, 40)
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=0)


def test_int8_generate_equals_greedy_with_dequantized_weights():
    torch.manual_seed(0)
    args = tiny_args(max_seq_len=64, tie_embeddings=True)
    model = Transformer(args).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in list(ref.modules()):
            if type(m) is nn.Linear:
                m.weight = nn.Parameter(Int8Linear(m).dequantized())  # unties the head: quantized as a head
    prompts = [[5, 17, 3, 9], [1, 2, 3, 4]]
    got = generate(model, prompts, 12, int8=True)
    want = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(12):
                ids.append(int(ref(torch.tensor([ids]))[0, -1].argmax()))
            want.append(ids[len(p):])
    assert got == want
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored, unmodified
    assert all(type(m) is not Int8Linear for m in model.modules())
    with int8_weights(model):
        assert sum(type(m) is Int8Linear for m in model.modules()) == 2 * 7 + 1  # 7 per block + the head


def test_int8_refuses_a_model_off_the_cpu():
    """Off the CPU Int8Linear would dequantize the whole weight on every call: refused with one line."""
    from errors import UserError

    with torch.device("meta"):
        model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                                      max_seq_len=16))
    with pytest.raises(UserError, match="CPU only.*meta.*bf16"):
        with int8_weights(model):
            pass
    assert all(type(m) is not Int8Linear for m in model.modules())
