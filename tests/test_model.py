"""model.py against transformers' LlamaForCausalLM, weights moved by model_utils' production converters;
KV-cache decoding and document packing against plain full forwards."""

import pytest
import torch
from helpers import tiny_args
from transformers import LlamaConfig, LlamaForCausalLM

import model as model_module
from generate import generate, left_pad
from model import ModelArgs, Transformer
from model_utils import export_hf, load_model

CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    # original context 16 < test length, so all three frequency bands of the 3.1 rule are exercised
    "rope_llama31": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


def hf_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, rms_norm_eps=1e-5,
                rope_theta=10000.0, max_position_embeddings=128, initializer_range=0.1)
    return LlamaConfig(**{**base, **kw})


def random_hf_model(cfg: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at 1: randomize them so a mis-mapped norm cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def random_ours(args: ModelArgs, seed: int = 0) -> Transformer:
    model = Transformer(args)
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_checkpoint_loads_with_same_logits(name, tmp_path):
    hf = random_hf_model(hf_config(**CONFIGS[name]))
    hf.save_pretrained(tmp_path)
    ours, args = load_model(tmp_path)
    assert args.tie_embeddings == hf.config.tie_word_embeddings
    assert (args.rope_scaling is not None) == ("rope_scaling" in CONFIGS[name])
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens)
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_export_hf_reloads_in_transformers_with_same_logits(name, tmp_path):
    kw = CONFIGS[name]
    sc = kw.get("rope_scaling")
    args = ModelArgs(dim=64, n_layers=2, n_heads=kw["num_attention_heads"], n_kv_heads=kw["num_key_value_heads"],
                     vocab_size=97, ffn_hidden_dim=96, rope_theta=10000.0, max_seq_len=128,
                     tie_embeddings=kw["tie_word_embeddings"],
                     rope_scaling={k: v for k, v in sc.items() if k != "rope_type"} if sc else None)
    ours = random_ours(args)
    export_hf(ours, args, tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    if args.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens)
    assert (got - ref).abs().max().item() < 1e-4


def test_kv_cache_decoding_equals_full_forward():
    model = random_ours(tiny_args(rope_theta=10000.0), seed=3)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 97, (11,), generator=g).tolist(), torch.randint(1, 97, (4,), generator=g).tolist()]
    steps = 32
    new, cached_logits = generate(model, prompts, steps, return_logits=True)  # greedy, no stop ids
    assert [len(r) for r in new] == [steps, steps] and cached_logits.shape == (2, steps, 97)
    assert model.layers[0].attention.cache is None  # caches are released

    # the same padded sequence in one forward, no cache: padding hidden by key_mask, positions per row
    tokens, key_mask, positions = left_pad([p + n for p, n in zip(prompts, new, strict=True)])
    L = max(len(p) for p in prompts)
    with torch.no_grad():
        full = model(tokens, positions=positions, key_mask=key_mask)  # (B, L+steps, V)
    assert (full[:, L - 1: L - 1 + steps] - cached_logits).abs().max().item() < 1e-4

    # and padding is invisible: the short row alone, unpadded, gives the same logits
    with torch.no_grad():
        alone = model(torch.tensor([prompts[1] + new[1]]))
    assert (alone[0, len(prompts[1]) - 1: len(prompts[1]) - 1 + steps] - cached_logits[1]).abs().max().item() < 1e-4


def test_doc_ids_packing_equals_separate_forwards():
    model = random_ours(tiny_args(), seed=5)
    g = torch.Generator().manual_seed(6)
    docs = [torch.randint(0, 97, (n,), generator=g) for n in (7, 12, 5)]
    packed = torch.cat(docs)[None]  # (1, 24)
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        got = model(packed, doc_ids=doc_ids)[0]
        ref = torch.cat([model(d[None])[0] for d in docs])
    assert (got - ref).abs().max().item() < 1e-5


def _bias(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


def test_mask_and_position_builders_equal_direct_constructions():
    """attention_mask / cache_slots_mask / default_positions against masks and positions written out element by
    element: a left-padded query block in a KV cache, documents, a given pattern, plain causal attention."""
    B, T, start = 2, 3, 4
    S = start + T
    key_mask = torch.ones(B, S + 2, dtype=torch.bool)
    key_mask[1, :5] = False  # row 1 is padding up to slot 4, which holds its first query
    allowed = torch.zeros(B, 1, T, S, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            for s in range(S):
                allowed[b, 0, t, s] = (s <= start + t and bool(key_mask[b, s])) or s == start + t
    got = model_module.attention_mask(B, T, start, 16, "sdpa", torch.device("cpu"), key_mask=key_mask)
    assert torch.equal(got, _bias(allowed))
    # the decode step's mask over the whole cache: the same rule, keys past the query hidden
    whole = torch.zeros(B, 1, T, S + 2, dtype=torch.bool)
    whole[..., :S] = allowed
    assert torch.equal(model_module.cache_slots_mask(torch.arange(start, S), key_mask), _bias(whole))

    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1]])
    same_doc_causal = torch.tensor([[[[doc_ids[b, t] == doc_ids[b, s] and s <= t for s in range(6)]
                                      for t in range(6)]] for b in range(2)])
    got = model_module.attention_mask(2, 6, 0, 0, "sdpa", torch.device("cpu"), doc_ids=doc_ids)
    assert torch.equal(got, _bias(same_doc_causal))
    assert model_module.default_positions(2, 6, 0, torch.device("cpu"), doc_ids).tolist() == [
        [0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1]]
    assert model_module.default_positions(2, 3, 5, torch.device("cpu")).tolist() == [[5, 6, 7], [5, 6, 7]]

    pattern = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(0)) > 0.5
    got = model_module.attention_mask(2, 6, 0, 0, "sdpa", torch.device("cpu"), attn_mask=pattern)
    assert torch.equal(got, _bias(pattern[:, None]))
    with pytest.raises(ValueError, match="attn_mask excludes"):
        model_module.attention_mask(2, 6, 0, 0, "sdpa", torch.device("cpu"), attn_mask=pattern, key_mask=key_mask)

    # plain causal: SDPA's is_causal (no tensor), an explicit bias for the math path
    assert model_module.attention_mask(2, 6, 0, 0, "sdpa", torch.device("cpu")) is None
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    assert torch.equal(model_module.attention_mask(2, 6, 0, 0, "math", torch.device("cpu")), _bias(causal))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # SDPA's bias comes in the compute dtype
        assert model_module.attention_mask(2, 6, 0, 0, "sdpa", torch.device("cpu"),
                                           doc_ids=doc_ids).dtype == torch.bfloat16


def test_forward_gives_every_block_the_mask_and_rotations_built_once(monkeypatch):
    """Transformer.forward builds the mask (attention_mask) and the RoPE positions (default_positions) once and
    hands the same objects to every block."""
    model = random_ours(ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=61, multiple_of=16))
    built: dict[str, list] = {"mask": [], "positions": []}
    for name, key in (("attention_mask", "mask"), ("default_positions", "positions")):
        real = getattr(model_module, name)
        monkeypatch.setattr(model_module, name, lambda *a, real=real, key=key, **kw: built[key].append(
            real(*a, **kw)) or built[key][-1])
    seen = []
    block_forward = model_module.TransformerBlock.forward
    monkeypatch.setattr(model_module.TransformerBlock, "forward",
                        lambda self, x, rot, mask, start_pos=0: seen.append((rot, mask)) or block_forward(
                            self, x, rot, mask, start_pos))
    doc_ids = torch.tensor([[0, 0, 0, 1, 1]])
    with torch.no_grad():
        model(torch.tensor([[3, 1, 4, 1, 5]]), doc_ids=doc_ids)
    assert len(built["mask"]) == len(built["positions"]) == 1 and len(seen) == 3
    assert all(mask is built["mask"][0] and rot is seen[0][0] for rot, mask in seen)
    assert torch.equal(built["positions"][0], torch.tensor([[0, 1, 2, 0, 1]]))


def test_rope_frequencies_stay_fp32_after_dtype_casts_and_meta_init():
    import torch as _t

    from model import ModelArgs as _A
    from model import Transformer as _T
    from model import rope_frequencies

    args = _A(dim=64, n_layers=1, n_heads=4, vocab_size=50, rope_theta=500000.0)
    ref = rope_frequencies(args)
    m = _T(args).to(_t.bfloat16)
    assert m.inv_freq.dtype == _t.float32 and _t.equal(m.inv_freq, ref)
    with _t.device("meta"):
        lazy = _T(args)
    lazy.to_empty(device="cpu")  # FSDP-style deferred init: buffers come back as garbage unless recomputed
    assert _t.equal(lazy.inv_freq, ref)


@pytest.mark.parametrize("kw", [
    dict(), dict(tie_embeddings=True), dict(moe_num_experts=4, moe_top_k=2),
    dict(moe_num_experts=4, moe_top_k=1, moe_shared_expert=True), dict(moe_num_experts=4, moe_top_k=2, moe_impl="dense"),
    dict(moe_num_experts=4, moe_top_k=2, tie_embeddings=True), dict(n_kv_heads=1, ffn_hidden_dim=40)],
    ids=["dense", "tied", "moe", "moe-shared", "moe-dense-impl", "moe-tied", "gqa-ffn"])
def test_a_model_is_usable_as_built_in_every_configuration(kw):
    """Transformer(args) without init_weights(): every parameter holds a seeded, finite, non-zero init of the
    size nn.Linear / nn.Embedding give (|w| < 10, not empty memory), and the logits are finite."""
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=16, **{"n_kv_heads": 2, **kw})
    builds = []
    for _ in range(2):
        torch.manual_seed(3)
        builds.append(Transformer(args))
    m = builds[0]
    for (name, p), q in zip(m.named_parameters(), builds[1].parameters(), strict=True):
        assert torch.isfinite(p).all() and p.abs().max() < 10 and p.abs().sum() > 0, name
        assert torch.equal(p, q), f"{name} is not drawn from the seeded generator"
    logits = m(torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(logits).all() and logits.std() > 0
    with torch.device("meta"):  # the sharded build path allocates nothing and draws nothing
        meta = Transformer(args)
    assert all(p.is_meta for p in meta.parameters())
