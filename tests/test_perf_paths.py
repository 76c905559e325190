"""Every fast path against the plain path it replaces.

- attention: SDPA (the "auto" choice on every device) == explicit matmul + softmax == a hand-written
  per-head reference with repeat_interleave for GQA and an explicit -inf mask; causal, padded
  (bool key mask), packed documents; fp32 (1e-5) and bf16 (bf16 tolerance); gradients too.
- interleaved-pair RoPE with precomputed (cos, -sin/+sin) == rotating each pair by hand (complex multiply).
- fused chunked output projection + cross-entropy == logits @ F.cross_entropy(sum): loss and both
  gradients, with ignored labels, ragged last chunk, tied weights, fp32 and bf16 autocast.
- per-row response log-probs through the fused head (fused_sequence_logps, the DPO path) == log_softmax of
  the full logits (losses.sequence_logps), values and gradients, with a non-linear loss on the rows; it holds
  one fp32 (V, d) weight gradient whatever the number of rows.
- the distillation terms in row chunks == the whole-rows formulas, without an fp32 copy of the logits.
- one-row projections (decoding at batch 1) through torch.mv == F.linear bit for bit; one-query attention as
  reductions == attention(); the compiled decode step in generate() == eager generate() token for token (fp32
  logits within 1e-4).
"""

import math
import weakref

import helpers
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import model as model_mod
from errors import UserError
from fused_ce import fused_linear_cross_entropy_sum, fused_sequence_logps
from generate import compiled_cache_len, generate
from losses import sequence_logps
from model import ModelArgs, Transformer


def reference_attention(q, k, v, allowed):
    """Textbook attention: per head, repeat kv heads, -inf where not allowed, fp32 softmax."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, 1).float(), v.repeat_interleave(n_rep, 1).float()
    s = q.float() @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("n_kv", [4, 2])
@pytest.mark.parametrize("kind", ["causal", "padded", "decode"])
def test_attention_impls_match_reference(dtype, tol, n_kv, kind):
    g = torch.Generator().manual_seed(0)
    B, H, T, hd = 2, 4, 7, 16
    S = T if kind != "decode" else T + 5
    q = torch.randn(B, H, T, hd, generator=g).to(dtype)
    k = torch.randn(B, n_kv, S, hd, generator=g).to(dtype)
    v = torch.randn(B, n_kv, S, hd, generator=g).to(dtype)
    allowed = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None].expand(B, 1, T, S).clone()
    if kind == "padded":
        allowed[1, :, :, :3] = False
        allowed[1, :, :3, :] = torch.eye(T, S, dtype=torch.bool)[:3]  # padded queries see themselves
    ref = reference_attention(q, k, v, allowed)
    bias = model_mod.causal_bias(allowed, T, S, q.device)
    outs = {"math+bias": model_mod.attention(q, k, v, bias, "math"),
            "sdpa+bias": model_mod.attention(q, k, v, bias, "sdpa"),
            "sdpa+bool": model_mod.attention(q, k, v, allowed, "sdpa")}
    if kind == "causal":
        outs["sdpa causal"] = model_mod.attention(q, k, v, None, "sdpa")
        outs["math causal"] = model_mod.attention(q, k, v, None, "math")
    for name, out in outs.items():
        assert out.dtype == dtype, name
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol, msg=name)


def test_attention_gradients_sdpa_equal_math():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, s, 9, 8, generator=g, requires_grad=True) for s in (6, 3, 3))
    grads = {}
    for impl in ("sdpa", "math"):
        for t in (q, k, v):
            t.grad = None
        (model_mod.attention(q, k, v, None, impl) ** 2).sum().backward()
        grads[impl] = [t.grad.clone() for t in (q, k, v)]
    for a, b in zip(grads["sdpa"], grads["math"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rope_matches_the_published_pairwise_rotation():
    args = ModelArgs(dim=32, n_heads=2, vocab_size=11, rope_theta=10000.0)
    inv = model_mod.rope_frequencies(args)
    pos = torch.tensor([[0, 3, 17, 1000]])
    x = torch.randn(1, 4, 2, 16, generator=torch.Generator().manual_seed(2))
    out = model_mod.apply_rope(x, model_mod.rope_rotations(inv, pos))
    # independent reference, element by element in float64 (RoFormer eq. 34 on interleaved pairs):
    # out[2i] = x[2i] cos(p w_i) - x[2i+1] sin(p w_i), out[2i+1] = x[2i+1] cos(p w_i) + x[2i] sin(p w_i)
    ref = torch.empty(1, 4, 2, 16, dtype=torch.float64)
    for t in range(4):
        for h in range(2):
            for i in range(8):
                a = pos[0, t].item() * inv[i].item()  # w_i = theta^(-2i/d), checked just below
                x0, x1 = x[0, t, h, 2 * i].double(), x[0, t, h, 2 * i + 1].double()
                ref[0, t, h, 2 * i] = x0 * math.cos(a) - x1 * math.sin(a)
                ref[0, t, h, 2 * i + 1] = x1 * math.cos(a) + x0 * math.sin(a)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inv.double(), 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16))


@pytest.fixture(scope="module")
def tiny_model() -> Transformer:
    return helpers.tiny_model(std=0.2, vocab_size=257, tie_embeddings=True, max_seq_len=64)


@pytest.mark.parametrize("mask_kind", ["causal", "docs", "padded"])
def test_model_forward_sdpa_equals_math_fp32(tiny_model, mask_kind):
    x = torch.randint(0, 257, (2, 13), generator=torch.Generator().manual_seed(3))
    kw = {}
    if mask_kind == "docs":
        kw["doc_ids"] = torch.tensor([[0] * 5 + [1] * 8, [0] * 13])
    if mask_kind == "padded":
        km = torch.ones(2, 13, dtype=torch.bool)
        km[1, :4] = False
        kw["key_mask"] = km
    outs = {}
    for impl in ("math", "sdpa"):
        for layer in tiny_model.layers:
            layer.attention.attn_impl = impl
        tiny_model.args.attn_impl = impl
        with torch.no_grad():
            outs[impl] = tiny_model(x, **kw)
    tiny_model.args.attn_impl = "auto"
    for layer in tiny_model.layers:
        layer.attention.attn_impl = "auto"
    torch.testing.assert_close(outs["sdpa"], outs["math"], atol=1e-4, rtol=1e-4)


def _ce_loss_and_grads(model, x, y, path: str, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if path == "plain":
            logits = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
        else:
            h = model(x, return_hidden=True)
            loss = fused_linear_cross_entropy_sum(h, model.output.weight, y, chunk_size=7)  # ragged
    (loss * 0.5).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _ce_batch():
    x = torch.randint(0, 257, (3, 11), generator=torch.Generator().manual_seed(4))
    y = torch.randint(0, 257, (3, 11), generator=torch.Generator().manual_seed(5))
    y[0, :4] = -100
    y[2, -1] = -100
    return x, y


def test_fused_ce_equals_plain_loss_and_grads_fp32(tiny_model):
    x, y = _ce_batch()
    plain = _ce_loss_and_grads(tiny_model, x, y, "plain", autocast=False)
    fused = _ce_loss_and_grads(tiny_model, x, y, "fused", autocast=False)
    torch.testing.assert_close(fused[0], plain[0], atol=1e-3, rtol=1e-4)
    for n, g in plain[1].items():
        torch.testing.assert_close(fused[1][n], g, atol=1e-4, rtol=1e-4, msg=n)
    assert fused[0].dtype == torch.float32


def test_fused_ce_bf16_error_matches_the_plain_bf16_path(tiny_model):
    """Under bf16 autocast both paths round, and differently on different CPUs (native bf16 kernels or
    AVX2 emulation accumulate in different orders), so each is measured against an fp64 reference: the
    fused path's relative error must be no worse than 1.25x the plain path's, for the loss and for every
    gradient. A real defect (a wrong scale, a dropped chunk, fp16-like rounding) multiplies the error."""
    import copy

    x, y = _ce_batch()
    ref = _ce_loss_and_grads(copy.deepcopy(tiny_model).double(), x, y, "plain", autocast=False)
    plain = _ce_loss_and_grads(tiny_model, x, y, "plain", autocast=True)
    fused = _ce_loss_and_grads(tiny_model, x, y, "fused", autocast=True)
    assert fused[0].dtype == torch.float32

    def rel_err(got, want):
        return ((got.double() - want).norm() / want.norm()).item()

    for name, want in [("loss", ref[0]), *ref[1].items()]:
        got_plain = plain[0] if name == "loss" else plain[1][name]
        got_fused = fused[0] if name == "loss" else fused[1][name]
        e_plain, e_fused = rel_err(got_plain, want), rel_err(got_fused, want)
        assert e_plain < 0.1, (name, e_plain)  # the bf16 reference path itself is sane
        assert e_fused <= 1.25 * e_plain + 1e-6, (name, e_fused, e_plain)


def test_fused_ce_no_grad_and_all_ignored():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with torch.no_grad():
        got = fused_linear_cross_entropy_sum(h, w, torch.tensor([1, 2, 3, 4]))
    ref = F.cross_entropy(h @ w.t(), torch.tensor([1, 2, 3, 4]), reduction="sum")
    torch.testing.assert_close(got, ref)
    hh = h.clone().requires_grad_()
    loss = fused_linear_cross_entropy_sum(hh, w, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and hh.grad.abs().max().item() == 0.0


def test_fused_sequence_logps_equals_full_logits_values_and_grads(tiny_model):
    x, y = _ce_batch()
    results = []
    for fused in (False, True):
        tiny_model.zero_grad()
        if fused:
            lp = fused_sequence_logps(tiny_model(x, return_hidden=True), tiny_model.output.weight, y)
        else:
            lp = sequence_logps(tiny_model(x), y)
        # a loss that is not linear in the rows (like DPO's): each row's gradient must carry its own weight
        loss = -F.logsigmoid(lp * torch.linspace(0.01, 0.05, lp.shape[0])).sum()
        loss.backward()
        results.append((lp.detach(), {n: p.grad.clone() for n, p in tiny_model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-3, rtol=1e-5)
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, atol=1e-5, rtol=1e-4, msg=n)


class LiveStorages(TorchDispatchMode):
    """The most storages alive at once among the op outputs that `keep(tensor)` selects (a storage counted once,
    however many views of it exist), and how many bytes they held then."""

    def __init__(self, keep):
        super().__init__()
        self.keep, self.refs, self.nbytes, self.peak, self.peak_bytes = keep, {}, {}, 0, 0

    def _drop(self, key):
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key], self.nbytes[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and self.keep(t):
                key = t.untyped_storage().data_ptr()
                self.refs[key] = self.refs.get(key, 0) + 1
                self.nbytes[key] = t.untyped_storage().nbytes()
                weakref.finalize(t, self._drop, key)
                self.peak = max(self.peak, len(self.refs))
                self.peak_bytes = max(self.peak_bytes, sum(self.nbytes.values()))
        return out


def test_fused_sequence_logps_holds_one_head_gradient_whatever_the_rows():
    """DPO's per-row log-probs through the fused head: forward and backward of 6 rows never hold more than one
    fp32 (V, d) weight gradient (one per row would be 2.1 GB each at 8B), and ragged chunks give the values and
    gradients of the full logits."""
    g = torch.Generator().manual_seed(0)
    R, T, d, V = 6, 9, 16, 50
    h = torch.randn(R, T, d, generator=g, requires_grad=True)
    w = torch.randn(V, d, generator=g, requires_grad=True)
    y = torch.randint(0, V, (R, T), generator=g)
    y[:, :3] = -100
    row_weights = torch.linspace(0.1, 0.6, R)
    with LiveStorages(lambda t: tuple(t.shape) == (V, d) and t.dtype == torch.float32) as live:
        lp = fused_sequence_logps(h, w, y, chunk_size=7)
        (lp * row_weights).exp().sum().backward()
    assert live.peak == 1
    got = (lp.detach(), h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    ref = sequence_logps(h @ w.t(), y)
    (ref * row_weights).exp().sum().backward()
    for a, b in zip(got, (ref.detach(), h.grad, w.grad), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("topk", [False, True])
def test_distillation_terms_keep_no_fp32_copy_of_the_logits_and_equal_the_whole_rows(monkeypatch, topk):
    """CE + KD over bf16 student logits (B, T, V) in row chunks: no fp32 tensor of the logits' size ever exists
    (the whole-tensor formulas hold ~5), and the loss and gradient equal those formulas in fp32."""
    import losses

    g = torch.Generator().manual_seed(1)
    B, T, V, K, temp = 2, 6, 40, 5, 2.0
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 3 * V)  # 3 rows per chunk, the last one ragged
    student = torch.randn(B, T, V, generator=g).bfloat16().requires_grad_()
    teacher = torch.randn(B, T, V, generator=g).bfloat16()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    mask = labels != -100
    top_logps, top_ids = torch.log_softmax(teacher.float() / temp, -1).topk(K, -1)

    def loss_of(s):
        kd = (losses.topk_distillation_loss_sum(s, top_logps, top_ids, mask, temp) if topk
              else losses.distillation_loss_sum(s, teacher, mask, temp))
        return 0.7 * losses.chunked_cross_entropy_sum(s, labels) + 0.3 * kd

    n_logits = int(mask.sum()) * V  # the logits of the positions that count
    with LiveStorages(lambda t: t.dtype == torch.float32 and t.numel() >= n_logits) as live:
        loss = loss_of(student)
        loss.backward()
    assert live.peak == 0
    # the whole-rows formulas in fp32 on the selected positions (an independent statement of both terms)
    s32 = student.detach().float().requires_grad_()
    sel = s32[mask] / temp
    log_q = F.log_softmax(sel, -1)
    if topk:
        log_p = top_logps[mask]
        kl = (log_p.exp() * (log_p - log_q.gather(-1, top_ids[mask]))).sum(-1)
        p_tail = (1 - log_p.exp().sum(-1)).clamp(min=0)
        q_tail = log_q.exp().scatter(-1, top_ids[mask], 0.0).sum(-1)
        kl = kl + p_tail * (p_tail.log() - q_tail.log())
    else:
        log_p = F.log_softmax(teacher.float()[mask] / temp, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    ref = 0.7 * F.cross_entropy(s32.flatten(0, 1), labels.flatten(), reduction="sum") + 0.3 * temp**2 * kl.sum()
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(student.grad.float(), s32.grad.bfloat16().float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_fast_decode_equals_full_recompute(tiny_model, dtype, tol):
    """generate() (KV cache, fused qkv / w1|w3 projections, float-bias SDPA) vs the plain path: the whole
    sequence re-run through forward() without a cache at every step, unfused."""
    m = tiny_model.to(dtype)
    try:
        prompts = [[5, 9, 11, 200, 3], [17, 4]]
        outs, logits = generate(m, prompts, 6, return_logits=True)
        assert all(layer.attention.wqkv is None and layer.feed_forward.w13 is None for layer in m.layers)
        for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
            seq = list(p)
            for n in range(6):
                with torch.no_grad():
                    ref = m(torch.tensor([seq]))[0, -1].float()
                torch.testing.assert_close(logits[i, n], ref, atol=tol, rtol=tol)
                if dtype == torch.float32:
                    assert o[n] == int(ref.argmax())
                seq.append(o[n])
    finally:
        tiny_model.to(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_row_linear_is_f_linear_exactly(dtype):
    """model.linear sends one row (decoding at batch 1) through torch.mv in eager mode: bit-identical to F.linear."""
    g = torch.Generator().manual_seed(0)
    for out_f, in_f in [(960, 576), (97, 64), (576, 1536), (5, 3)]:
        w = torch.randn(out_f, in_f, generator=g).to(dtype)
        for shape in [(1, 1, in_f), (1, in_f), (in_f,)]:
            x = torch.randn(shape, generator=g).to(dtype)
            got = model_mod.linear(x, w)
            assert got.shape == F.linear(x, w).shape and torch.equal(got, F.linear(x, w))
        x = torch.randn(2, 3, in_f, generator=g).to(dtype)  # more rows: F.linear itself
        assert torch.equal(model_mod.linear(x, w), F.linear(x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts F.linear's operands: one row too
        x, w = torch.randn(1, 64, generator=g), torch.randn(32, 64, generator=g)
        got, want = model_mod.linear(x, w), F.linear(x, w)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)


def test_single_query_attention_is_attention():
    """The one-query attention compiled decoding uses (reductions in fp32) == attention()'s SDPA and math paths:
    grouped query heads, a padded row, a bias shared by the batch (B=1 dim) and one per row."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, S, hd = 3, 6, 2, 11, 16
    q, k, v = (torch.randn(B, h, t, hd, generator=g) for h, t in ((H, 1), (Hkv, S), (Hkv, S)))
    keys = torch.ones(B, 1, 1, S, dtype=torch.bool)
    keys[1, ..., :4] = False  # left padding of row 1
    for mask in (keys, keys[:1]):
        bias = model_mod.causal_bias(mask, 1, S, q.device)
        got = model_mod.single_query_attention(q, k, v, bias)
        for impl in ("sdpa", "math"):
            torch.testing.assert_close(got, model_mod.attention(q, k, v, mask, impl), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_compiled_decode_equals_eager_and_compiles_once(tiny_model, dtype, tol, monkeypatch):
    """generate(compile=True) (static cache of a rounded length, torch.compile'd Transformer.decode_step whose
    one-row products at batch 1 stay ATen matrix-vector calls) == eager generate(): tokens (fp32),
    logits within tol; left padding and a stop id behave alike; a second generation whose cache rounds up to the
    same length reuses the compiled graph. (One-row products through torch.mv, whatever this host measures:
    the F.linear choice has its own test below.)"""
    monkeypatch.setitem(model_mod.ROW_KERNELS, dtype, (torch.get_num_threads(), "mv"))
    m = tiny_model.to(dtype)
    try:
        for prompts, steps in [([[5, 9, 11, 200, 3], [17, 4]], 7), ([[42, 7, 19]], 9)]:
            eager, eager_logits = generate(m, prompts, steps, return_logits=True)
            before = counters["stats"]["unique_graphs"]
            compiled, comp_logits = generate(m, prompts, steps, return_logits=True, compile=True)
            compiles = counters["stats"]["unique_graphs"] - before
            assert compiles <= 1
            if len(prompts) == 1:  # batch 1: every projection and the head stay ATen matrix-vector calls
                with torch.profiler.profile() as prof:
                    generate(m, prompts, steps, compile=True)
                count = {e.key: e.count for e in prof.key_averages()}
                assert count["aten::mv"] == (steps - 1) * (4 * len(m.layers) + 1) + 1  # + the prefill's head
                # the compiled steps' one-query attention is fused reductions: SDPA runs in the prefill only
                assert count["aten::scaled_dot_product_attention"] == len(m.layers)
            torch.testing.assert_close(comp_logits, eager_logits, atol=tol, rtol=tol)
            if dtype == torch.float32:
                assert compiled == eager
            # same batch, a length that rounds to the same cache: no new graph
            L = max(map(len, prompts))
            assert compiled_cache_len(L + steps + 3) == compiled_cache_len(L + steps) == 64
            before = counters["stats"]["unique_graphs"]
            again = generate(m, prompts, steps + 3, compile=True, stop_ids=[eager[0][2]])
            assert counters["stats"]["unique_graphs"] == before
            if dtype == torch.float32:
                assert again[0] == eager[0][:2]
    finally:
        tiny_model.to(torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["mv", "linear"])
def test_row_kernel_choice_gives_the_same_decode_eager_and_compiled(tiny_model, kernel, monkeypatch):
    """Whichever one-row kernel row_kernel picks on a host (torch.mv or F.linear), greedy decoding in fp32 gives
    the same tokens and logits as the other, eager and compiled, and the compiled step runs that ATen call for
    every projection and the head (no inductor reduction in its place). The measured choice is one of the two and
    is cached for the process."""
    assert model_mod.row_kernel(torch.float32) in ("mv", "linear")
    assert model_mod.ROW_KERNELS[torch.float32][0] == torch.get_num_threads()
    prompts, steps = [[42, 7, 19]], 9
    monkeypatch.setitem(model_mod.ROW_KERNELS, torch.float32, (torch.get_num_threads(), "mv"))
    ref, ref_logits = generate(tiny_model, prompts, steps, return_logits=True)
    monkeypatch.setitem(model_mod.ROW_KERNELS, torch.float32, (torch.get_num_threads(), kernel))
    for compile in (False, True):
        got, logits = generate(tiny_model, prompts, steps, return_logits=True, compile=compile)
        assert got == ref
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    with torch.profiler.profile() as prof:
        generate(tiny_model, prompts, steps, compile=True)
    count = {e.key: e.count for e in prof.key_averages()}
    n_layers = len(tiny_model.layers)
    if kernel == "mv":  # every decode product and the prefill's head
        assert count["aten::mv"] == (steps - 1) * (4 * n_layers + 1) + 1
    else:  # the same through aten::mm, plus the prefill's 4 products per block (several rows)
        assert "aten::mv" not in count
        assert count["aten::mm"] == (steps - 1) * (4 * n_layers + 1) + 1 + 4 * n_layers


def test_compiled_cache_lengths_are_few_and_the_recompile_limit_falls_back_to_eager(tiny_model, capsys):
    """Cache lengths are powers of two (a chat's growing prompts compile a handful of graphs); past torch's
    recompile limit, generate(compile=True) decodes eagerly with a note instead of failing."""
    assert [compiled_cache_len(n) for n in (1, 64, 65, 100, 129, 5000)] == [64, 64, 128, 128, 256, 8192]
    runs = [([[5, 9, 11]], 4), ([[5, 9, 11], [7, 1, 2], [3, 3, 3]], 4)]  # two batch sizes: two graphs
    with torch._dynamo.config.patch(recompile_limit=1):  # (monkeypatch cannot restore torch's config modules)
        for prompts, steps in runs:
            assert generate(tiny_model, prompts, steps, compile=True) == generate(tiny_model, prompts, steps)
    assert "recompile limit is reached in this process; decoding eagerly" in capsys.readouterr().err


def test_compiled_generation_refuses_moe_models_and_int8():
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=16,
                              moe_num_experts=2, moe_top_k=1))
    with pytest.raises(UserError, match="does not take Mixture-of-Experts models"):
        generate(m, [[1, 2]], 3, compile=True)
    with pytest.raises(UserError, match="do not combine"):
        generate(m, [[1, 2]], 3, compile=True, int8=True)


def test_compiled_decode_backend_asks_for_cuda_graphs_on_cuda_only(monkeypatch):
    """The decode step's backend turns on inductor's CUDA graphs for a graph whose inputs are on CUDA and leaves
    the CPU compile as it is (the CUDA path itself runs only on a GPU)."""
    import torch._inductor.compile_fx as cfx

    import generate as gen

    seen = []
    monkeypatch.setattr(cfx, "compile_fx", lambda gm, inputs, config_patches=None, decompositions=None:
                        seen.append(config_patches))

    class OnCuda:
        device = torch.device("cuda")

    gen._inductor_keeping_matvec(None, [torch.zeros(2), OnCuda()])
    gen._inductor_keeping_matvec(None, [torch.zeros(2)])
    assert seen == [{"triton.cudagraphs": True}, None]
