"""model_utils: Meta round trips (incl. 2 model-parallel shards), our checkpoint layout, sharded HF dirs,
a real GGUF (SmolLM2-135M) against transformers' own GGUF loader, refusals, counts, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
import torch
from safetensors.torch import save_model
from transformers import LlamaConfig, LlamaForCausalLM

from errors import UserError
from model import ModelArgs, Transformer
from model_utils import count_parameters, export_meta, flops_per_token, load_model, smollm2_gguf

ROOT = Path(__file__).resolve().parent.parent


def tiny_model(tie: bool = False, scaling: bool = True, seed: int = 0) -> tuple[Transformer, ModelArgs]:
    model = helpers.tiny_model(seed, std=0.1, vocab_size=96, max_seq_len=64, tie_embeddings=tie, rope_theta=10000.0,
                               rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192} if scaling else None)
    return model.eval(), model.args


def same_weights(a: Transformer, b: Transformer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


TOKENS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(9))


# ---- Meta ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_shards", [1, 2])
@pytest.mark.parametrize("tie", [False, True])
def test_export_meta_round_trip_is_exact(tmp_path, n_shards, tie):
    model, args = tiny_model(tie=tie)
    export_meta(model, args, tmp_path / "meta", n_shards=n_shards)
    files = sorted(p.name for p in (tmp_path / "meta").iterdir())
    assert files == sorted(["params.json", "model_args.json"] + [f"consolidated.{r:02d}.pth" for r in range(n_shards)])
    loaded, largs = load_model(tmp_path / "meta")
    assert same_weights(model, loaded)
    assert {**largs.to_dict(), "extra": {}} == {**args.to_dict(), "extra": {}}
    with torch.no_grad():
        assert torch.equal(model(TOKENS), loaded(TOKENS))
    # without our sidecar, params.json + the weights alone must give the same model
    (tmp_path / "meta" / "model_args.json").unlink()
    loaded2, largs2 = load_model(tmp_path / "meta")
    assert same_weights(model, loaded2) and largs2.tie_embeddings == tie and largs2.rope_scaling == args.rope_scaling
    with torch.no_grad():
        assert torch.equal(model(TOKENS), loaded2(TOKENS))


def test_meta_shards_follow_metas_model_parallel_split(tmp_path):
    """Meta's fairscale layers: ColumnParallelLinear (wq wk wv w1 w3 output) holds rows [r*n/k, (r+1)*n/k);
    RowParallelLinear (wo w2) holds the same slice of columns; Llama 3's VocabParallelEmbedding slices rows
    (the vocabulary); RMSNorm weights are replicated."""
    model, args = tiny_model()
    export_meta(model, args, tmp_path / "m", n_shards=2)
    sd = model.state_dict()
    for r in range(2):
        shard = torch.load(tmp_path / "m" / f"consolidated.{r:02d}.pth", weights_only=True)
        assert torch.equal(shard["layers.1.attention.wk.weight"], sd["layers.1.attention.wk.weight"][r * 16:(r + 1) * 16])
        assert torch.equal(shard["layers.0.attention.wo.weight"], sd["layers.0.attention.wo.weight"][:, r * 32:(r + 1) * 32])
        assert torch.equal(shard["layers.0.feed_forward.w2.weight"],
                           sd["layers.0.feed_forward.w2.weight"][:, r * 96:(r + 1) * 96])
        assert torch.equal(shard["tok_embeddings.weight"], sd["tok_embeddings.weight"][r * 48:(r + 1) * 48])
        assert torch.equal(shard["output.weight"], sd["output.weight"][r * 48:(r + 1) * 48])
        assert torch.equal(shard["layers.0.ffn_norm.weight"], sd["layers.0.ffn_norm.weight"])
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["n_kv_heads"] == 2


def test_malicious_pickle_in_meta_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    model, args = tiny_model()
    export_meta(model, args, tmp_path / "meta")
    torch.save({"tok_embeddings.weight": Evil()}, tmp_path / "meta" / "consolidated.00.pth")
    with pytest.raises(UserError, match="weights_only"):
        load_model(tmp_path / "meta")
    assert not marker.exists()


# ---- our checkpoints and HF dirs -----------------------------------------------------------------------
def test_our_checkpoint_layout_and_latest_pointer(tmp_path):
    model, args = tiny_model(tie=True)
    step = tmp_path / "pretrain" / "step_0000100"
    step.mkdir(parents=True)
    save_model(model, str(step / "model.safetensors"))  # stores the tied matrix once
    (step / "config.json").write_text(json.dumps({"model_args": args.to_dict(), "settings": {}}))
    (tmp_path / "pretrain" / "latest").write_text("step_0000100\n")
    for src in (step, tmp_path / "pretrain", tmp_path / "pretrain" / "latest"):  # dir, stage root, pointer file
        loaded, largs = load_model(src)
        assert same_weights(model, loaded) and largs.tie_embeddings
        assert loaded.output.weight is loaded.tok_embeddings.weight


def test_lora_only_checkpoint_loads_merged_onto_its_base(tmp_path):
    import lora

    model, args = tiny_model()
    export_meta(model, args, tmp_path / "base")
    lora.apply_lora(model, targets=["wq", "wv", "w2"], rank=4, alpha=8.0)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
        ref = model(TOKENS)
    step = tmp_path / "sft" / "step_0000010"
    step.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file(lora.lora_state_dict(model), str(step / "model.safetensors"))
    conf = {"model_args": args.to_dict(), "lora": lora.lora_config(model),
            "base_model": {"source": str(tmp_path / "base")}}
    (step / "config.json").write_text(json.dumps(conf))
    loaded, _ = load_model(step)
    assert not list(lora.lora_modules(loaded))
    with torch.no_grad():
        assert (loaded(TOKENS) - ref).abs().max().item() < 1e-4  # merged vs unmerged rounding


def test_sharded_hf_checkpoint(tmp_path):
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours, _ = load_model(tmp_path)
    with torch.no_grad():
        assert (ours(TOKENS) - hf(TOKENS).logits).abs().max().item() < 1e-4


def test_pytorch_model_bin_checkpoint(tmp_path):
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(1)
    hf = LlamaForCausalLM(cfg).eval()
    cfg.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours, _ = load_model(tmp_path)
    with torch.no_grad():
        assert (ours(TOKENS) - hf(TOKENS).logits).abs().max().item() < 1e-4


def test_export_hf_with_tokenizer_loads_in_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    import tokenizer as tokenizer_mod
    from model_utils import export_hf

    tok = tokenizer_mod.load_tokenizer(smollm2_gguf())
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, multiple_of=32, tie_embeddings=True)
    model = Transformer(args)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    export_hf(model, args, tmp_path / "hf", tokenizer=tok)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "The capital of France is Paris. Ünïcode, 12345 and  spaces!"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    rendered = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids, _ = tokenizer_mod.ChatFormat(tok).encode_dialog(msgs, add_generation_prompt=True)
    assert rendered == tok.decode(ids)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_id and hf_tok.eos_token_id == tok.eos_id


def test_info_cli_in_process(tmp_path, capsys, monkeypatch):
    import model_utils

    model, args = tiny_model()
    export_meta(model, args, tmp_path / "meta")
    monkeypatch.setattr(sys, "argv", ["model_utils.py", "info", "--model", str(tmp_path / "meta")])
    assert model_utils.main() == 0
    out = capsys.readouterr().out
    assert f"parameters: {count_parameters(model):,}" in out and '"n_kv_heads": 2' in out


def test_hf_head_dim_mismatch_is_a_user_error(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "head_dim": 32, "num_hidden_layers": 1,
           "intermediate_size": 96, "vocab_size": 96}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="head_dim"):
        load_model(tmp_path)


def test_missing_source_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(UserError, match="local path"):  # looks like a hub id; the hub is offline in tests
        load_model("no-such-org/no-such-model")


# ---- GGUF ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    return load_model(smollm2_gguf())


@pytest.mark.slow
def test_gguf_logits_match_transformers_gguf_loader(smollm2):
    from transformers import AutoModelForCausalLM

    model, args = smollm2
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size) == (576, 30, 9, 3, 49152)
    assert args.tie_embeddings and args.rope_theta == 100000.0
    path = smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    # "<|im_start|>user\nWhat is the capital of France?" in SmolLM2's vocabulary
    tokens = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47]])
    with torch.no_grad():
        diff = (model(tokens) - ref(tokens).logits).abs().max().item()
    assert diff < 1e-3


def tiny_gguf(path: Path, arch: str) -> Path:
    """A one-tensor GGUF file of the given architecture (also used by test_reliability_inputs.py)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_gguf_architecture_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="mamba"):
        load_model(tiny_gguf(tmp_path / "tiny.gguf", "mamba"))


def test_gguf_rope_freqs_recover_llama31_scaling(tmp_path):
    """llama.cpp stores Llama 3.1 scaling as per-frequency divisors (convert_hf_to_gguf.py,
    LlamaModel.generate_extra_tensors); recompute them by that rule and recover the four numbers."""
    import math

    from model_formats import _rope_scaling_from_factors

    args = ModelArgs(dim=256, n_heads=2, n_layers=1, vocab_size=8, rope_theta=500000.0)
    factor, low, high, old = 8.0, 1.0, 4.0, 8192
    divisors = []
    for i in range(0, 128, 2):
        freq = 1.0 / (500000.0 ** (i / 128))
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            divisors.append(1.0)
        elif wavelen > old / low:
            divisors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    got = _rope_scaling_from_factors(args, torch.tensor(divisors), tmp_path / "x.gguf")
    assert got == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
    with pytest.raises(UserError):
        _rope_scaling_from_factors(args, torch.tensor(divisors) * 1.5, tmp_path / "x.gguf")


# ---- counts -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True])
def test_counts_against_transformers_and_hand_formula(tie):
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    hf = LlamaForCausalLM(cfg)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_hidden_dim=96, tie_embeddings=tie)
    model = Transformer(args)
    assert count_parameters(model) == hf.num_parameters()
    assert count_parameters(model, exclude_embeddings=True) == hf.num_parameters() - 96 * 64
    # PaLM appendix B: 6 N_matmul + 12 L d T; per layer q,o: 64x64, k,v: 64x32, three 64x96 FFN mats
    n_matmul = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96) + 96 * 64
    assert flops_per_token(args, 128) == 6 * n_matmul + 12 * 2 * 64 * 128



@pytest.mark.parametrize("rows,width", [(2, 32), (3, 80)])
def test_model_flops_is_what_torch_counts_at_the_batch_width(rows, width):
    """model_flops against torch's FlopCounterMode (SDPA's math kernel, so attention is counted): training,
    forward-only, and a frozen base (input gradients only); attention grows with the batch's own width."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from model_utils import model_flops

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_hidden_dim=96, max_seq_len=128)
    model = Transformer(args)
    ids = torch.randint(0, 96, (rows, width))

    def counted(no_grad: bool = False) -> int:
        with FlopCounterMode(display=False) as c, sdpa_kernel(SDPBackend.MATH), torch.set_grad_enabled(not no_grad):
            out = model(ids)
            if not no_grad:
                out.float().square().mean().backward()
        return c.get_total_flops()

    assert model_flops(args, rows, width) == counted()
    assert model_flops(args, rows, width, backward=False) == counted(no_grad=True)
    for name, p in model.named_parameters():  # a frozen base with one trained weight at the bottom
        p.requires_grad_(name == "layers.0.attention_norm.weight")
    assert model_flops(args, rows, width, weight_grads=False) == counted()
    # per position, a row of `width` costs what flops_per_token says at T = width
    assert model_flops(args, 1, width) == pytest.approx(width * flops_per_token(args, width))


# ---- CLI --------------------------------------------------------------------------------------------
def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, str(ROOT / "model_utils.py"), *argv], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_cli_export_and_errors(tmp_path):
    model, args = tiny_model()
    export_meta(model, args, tmp_path / "meta", n_shards=2)
    r = _cli("export", "--model", str(tmp_path / "meta"), "--format", "hf", "--out", str(tmp_path / "hf"),
             "--no-tokenizer")  # the Meta dir holds no tokenizer.model
    assert r.returncode == 0, r.stderr
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(TOKENS).logits - model(TOKENS)).abs().max().item() < 1e-4
    # exporting onto a non-empty dir is refused: one `error:` line, exit 2, the dir untouched
    r = _cli("export", "--model", str(tmp_path / "meta"), "--format", "meta", "--out", str(tmp_path / "hf"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "generation_config.json",
                                                                    "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no partial output left behind


def test_pickle_disguised_as_safetensors_is_a_user_error_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    step = tmp_path / "step_0000001"
    step.mkdir()
    _, args = tiny_model()
    (step / "config.json").write_text(json.dumps({"model_args": args.to_dict(), "settings": {}}))
    torch.save({"tok_embeddings.weight": Evil()}, step / "model.safetensors")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_model(step)
    assert not marker.exists()


def test_tokenizer_source_follows_our_checkpoints_to_their_tokenizer(tmp_path):
    from model_utils import tokenizer_source

    model, args = tiny_model()
    parent = tmp_path / "pretrain" / "step_0000005"
    parent.mkdir(parents=True)
    save_model(model, str(parent / "model.safetensors"))
    tok_file = tmp_path / "my" / "tok.model"  # checkpoints record a local tokenizer path absolute
    tok_file.parent.mkdir()
    tok_file.write_bytes((ROOT / "tokenizer.model").read_bytes())
    (parent / "config.json").write_text(json.dumps({"model_args": args.to_dict(),
                                                    "settings": {"TOKENIZER_CHECKPOINT_PATH": str(tok_file)}}))
    (tmp_path / "pretrain" / "latest").write_text("step_0000005\n")
    child = tmp_path / "instruct" / "step_0000003"
    child.mkdir(parents=True)
    save_model(model, str(child / "model.safetensors"))
    (child / "config.json").write_text(json.dumps({"model_args": args.to_dict(), "settings": {
        "TOKENIZER_CHECKPOINT_PATH": "model", "INIT_FROM": str(tmp_path / "pretrain" / "latest")}}))
    assert tokenizer_source(tmp_path / "pretrain" / "latest") == str(tok_file)
    assert tokenizer_source(child) == str(tok_file)  # 'model' = the tokenizer of the run it started from
    gguf = smollm2_gguf()
    assert tokenizer_source(gguf) == str(gguf)  # other sources carry their own tokenizer
