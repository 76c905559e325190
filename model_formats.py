"""Foreign weight formats, in and out: Hugging Face, Meta and GGUF (llama.cpp).

model_utils.py calls these readers from `load_model` (which also detects the source and loads our own
checkpoints) and offers `export_hf` / `export_meta` on its CLI. Every loader returns (ModelArgs, state dict with Meta's parameter names
and the interleaved-pair RoPE layout Meta uses for wq/wk). Conversions:
- HF stores wq/wk permuted for its "rotate half" RoPE; `hf_to_ours` / `ours_to_hf` hold the one
  rename table and undo / redo that permutation (the inverse of HF's convert_llama_weights_to_hf).
- llama.cpp's converter applies exactly the inverse of HF's permutation to q/k, so GGUF files hold
  Meta's layout already and load by rename only (tests/test_model_utils.py proves it against
  transformers' own GGUF loader).
- Meta model-parallel shards are concatenated along the dimension each layer was split on.
- An HF GPT-2 directory (model_type gpt2) loads as (gpt2.GPT2Args, gpt2.py's names): the `transformer.` prefix
  and the attention-mask buffers dropped, HF's Conv1D weights transposed to nn.Linear's (out, in); its export is
  the reverse, a GPT2LMHeadModel directory.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from errors import UserError
from fileio import atomic_dir, read_json
from gpt2 import GPT2, GPT2Args
from model import ModelArgs, Transformer, rope_frequencies
from tokenizer import Tokenizer, save_hf_tokenizer

# ---- name tables ---------------------------------------------------------------------------------
# (ours, HF) per-layer suffixes; "{i}" is the layer index.
_HF_LAYER = [
    ("attention.wq.weight", "self_attn.q_proj.weight"),
    ("attention.wk.weight", "self_attn.k_proj.weight"),
    ("attention.wv.weight", "self_attn.v_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
]
# Mixtral's MoE FFN (the on-disk layout of Mixtral checkpoints; transformers >= 5 fuses the experts on load
# and its own saves hold mlp.experts.gate_up_proj / down_proj, which hf_to_ours reads too).
_HF_MOE_GATE = ("feed_forward.gate.weight", "block_sparse_moe.gate.weight")
_HF_MOE_EXPERT = "block_sparse_moe.experts.{e}.{w}.weight"
_HF_TOP = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
]
_GGUF_LAYER = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
    "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}
_GGUF_TOP = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
# Meta model parallelism: column-parallel layers are split on dim 0 (output features), row-parallel
# layers (wo, w2) on dim 1 (input features); norms are replicated. tok_embeddings is special-cased.
_META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def _hf_name_map(args: ModelArgs) -> dict[str, str]:
    """Our name -> HF name of every tensor renamed one to one (MoE experts are stacked: see _moe_to_hf)."""
    m = dict(_HF_TOP)
    for i in range(args.n_layers):
        for ours, hf in _HF_LAYER:
            if args.moe_num_experts and ours.startswith("feed_forward."):
                continue
            m[f"layers.{i}.{ours}"] = f"model.layers.{i}.{hf}"
        if args.moe_num_experts:
            m[f"layers.{i}.{_HF_MOE_GATE[0]}"] = f"model.layers.{i}.{_HF_MOE_GATE[1]}"
    return m


def _ours_state_names(args: ModelArgs) -> set[str]:
    names = set(_hf_name_map(args))
    if args.moe_num_experts:
        names |= {f"layers.{i}.feed_forward.experts.{w}" for i in range(args.n_layers) for w in ("w1", "w2", "w3")}
    return names


def _moe_from_hf(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Pop Mixtral's expert tensors out of an HF state dict (either layout) -> our stacked experts."""
    out = {}
    for i in range(args.n_layers):
        pre = f"model.layers.{i}."
        if pre + "mlp.gate.weight" in sd:  # transformers >= 5 names
            sd[pre + _HF_MOE_GATE[1]] = sd.pop(pre + "mlp.gate.weight")
        if pre + "mlp.experts.gate_up_proj" in sd:  # (E, 2 * hidden, dim): gate rows, then up rows
            w1, w3 = sd.pop(pre + "mlp.experts.gate_up_proj").chunk(2, dim=1)
            out.update({f"layers.{i}.feed_forward.experts.w1": w1, f"layers.{i}.feed_forward.experts.w3": w3,
                        f"layers.{i}.feed_forward.experts.w2": sd.pop(pre + "mlp.experts.down_proj")})
            continue
        for w in ("w1", "w2", "w3"):
            names = [pre + _HF_MOE_EXPERT.format(e=e, w=w) for e in range(args.moe_num_experts)]
            missing = [n for n in names if n not in sd]
            if missing:
                raise UserError(f"the Mixtral checkpoint has no tensor {missing[0]!r}; config.json says "
                                f"num_local_experts={args.moe_num_experts}: the files do not match the config")
            out[f"layers.{i}.feed_forward.experts.{w}"] = torch.stack([sd.pop(n) for n in names])
    return out


def _moe_to_hf(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """layers.i.feed_forward.experts.wN (E, ...) -> Mixtral's one tensor per expert."""
    i, w = name.split(".")[1], name.split(".")[-1]
    return {f"model.layers.{i}." + _HF_MOE_EXPERT.format(e=e, w=w): t[e] for e in range(t.shape[0])}


def permute_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta (interleaved pairs) -> HF (rotate-half) row order of a q/k projection (n_heads*hd, dim)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF (rotate-half) -> Meta (interleaved pairs); the exact inverse of permute_rotate_half."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_ours(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM / MixtralForCausalLM names + rotate-half q/k -> our names + Meta q/k layout."""
    to_ours = {hf: ours for ours, hf in _hf_name_map(args).items()}
    state_dict = dict(state_dict)
    out = _moe_from_hf(state_dict, args) if args.moe_num_experts else {}
    for name, t in state_dict.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved; recomputed
            continue
        if name not in to_ours:
            raise UserError(f"unexpected tensor {name!r} in the HF checkpoint; only the plain Llama and Mixtral "
                            "architectures (no biases, no extra modules) are supported")
        ours = to_ours[name]
        if ours.endswith("attention.wq.weight"):
            t = unpermute_rotate_half(t, args.n_heads)
        elif ours.endswith("attention.wk.weight"):
            t = unpermute_rotate_half(t, args.n_kv_heads)  # type: ignore[arg-type]  # ModelArgs.__post_init__ sets n_kv_heads
        out[ours] = t
    if args.tie_embeddings:
        out.pop("output.weight", None)
    return out


def ours_to_hf(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our names + Meta q/k layout -> HF names + rotate-half q/k. A tied output is stored once
    (as embed_tokens), which is what HF expects with tie_word_embeddings=True."""
    to_hf = _hf_name_map(args)
    return {hf: t for name, v in state_dict.items() for hf, t in _to_hf(name, v, args, to_hf)}


def _to_hf(name: str, t: torch.Tensor, args: ModelArgs, to_hf: dict[str, str]) -> list[tuple[str, torch.Tensor]]:
    """One tensor of ours -> its HF tensors (HF names, HF layout): one, one per expert for an MoE expert
    stack, none for a tied output (HF stores it once)."""
    if args.tie_embeddings and name == "output.weight":
        return []
    if ".feed_forward.experts." in name:
        return list(_moe_to_hf(name, t).items())
    if name.endswith("attention.wq.weight"):
        t = permute_rotate_half(t, args.n_heads)
    elif name.endswith("attention.wk.weight"):
        t = permute_rotate_half(t, args.n_kv_heads)  # type: ignore[arg-type]  # ModelArgs.__post_init__ sets n_kv_heads
    return [(to_hf[name], t)]


# ---- reading files -------------------------------------------------------------------------------
def load_safetensors(path: Path) -> dict:
    """safetensors -> state dict; a damaged or non-safetensors file is a UserError naming it (never unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); re-export or re-download it") from None


def _torch_load(f: Path) -> dict[str, torch.Tensor]:
    """Tensors only: weights_only refuses arbitrary pickled objects (code execution on load)."""
    try:
        try:
            return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{f} contains pickled objects other than tensors; refusing to load it "
                        "(weights_only=True). Only load checkpoints from sources you trust, converted to "
                        "plain tensors or safetensors") from e


# ---- loaders -------------------------------------------------------------------------------------
def _args_from_hf_config(cfg: dict, where: Path) -> ModelArgs:
    model_type = cfg.get("model_type", "llama")
    if model_type not in ("llama", "mixtral"):
        raise UserError(f"{where}/config.json has model_type={model_type!r}; only llama and mixtral are supported")
    window = cfg.get("sliding_window")
    if model_type == "mixtral" and window and window < cfg.get("max_position_embeddings", 0):
        raise UserError(f"{where}/config.json sets sliding_window={window}; model.py has full causal attention "
                        "only (Mixtral 8x7B's config has sliding_window null)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise UserError(f"{where}/config.json sets {key}=true; biases are not part of Llama 3")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}/config.json has hidden_act={cfg['hidden_act']!r}; Llama uses silu")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, dim // n_heads):
        raise UserError(f"{where}/config.json has head_dim={cfg['head_dim']} but hidden_size/num_heads="
                        f"{dim // n_heads}; model.py requires head_dim == dim / n_heads")
    rope: dict[str, Any] = dict(cfg.get("rope_parameters") or {})  # transformers >= 5 keeps theta and scaling here
    scaling = cfg.get("rope_scaling") or rope
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in ("default", "llama3"):
        raise UserError(f"{where}/config.json uses rope_type={rope_type!r}; only default and llama3 are supported")
    rope_scaling = None
    if rope_type == "llama3":
        rope_scaling = {k: scaling[k] for k in
                        ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    return ModelArgs(
        dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=cfg["vocab_size"],
        ffn_hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)), rope_scaling=rope_scaling,
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        moe_num_experts=cfg["num_local_experts"] if model_type == "mixtral" else 0,
        moe_top_k=cfg.get("num_experts_per_tok", 2) if model_type == "mixtral" else 2,
    )


class LazyStateDict(Mapping):
    """A state dict whose tensors are read when looked up, one at a time (`read(name)`), in our names and
    layout: a loader that must never hold the whole model (FSDP2's rank-local loading) walks it name by name."""

    def __init__(self, names: list[str], read: Callable[[str], torch.Tensor],
                 read_rows: Callable[[str, int, int], tuple[tuple[int, ...], torch.Tensor | None]] | None = None,
                 where: str = ""):
        self._names, self._read, self._read_rows, self._where = list(names), read, read_rows, where

    def rows(self, name: str, start: int, stop: int, full_shape: tuple[int, ...]) -> torch.Tensor | None:
        """Rows start:stop (dim 0) of the tensor `name`, whose full shape must be `full_shape`, read alone (a
        safetensors slice: an FSDP2 rank reads only its shard), or None when this source reads only whole
        tensors."""
        if name not in self._names:
            raise KeyError(name)
        if self._read_rows is None:
            return None
        stored, part = self._read_rows(name, start, stop)
        if tuple(stored) != tuple(full_shape):
            raise UserError(f"tensor {name} has shape {tuple(stored)} in {self._where}, the model "
                            f"{tuple(full_shape)}; the config and weights disagree")
        return part

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _hf_weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            files = sorted({path / f for f in read_json(path / index)["weight_map"].values()})
            break
    if not files:
        raise UserError(f"{path} has config.json but no *.safetensors or pytorch_model*.bin weights")
    return files


def load_hf(path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    if _is_gpt2(path):
        return load_hf_gpt2(path)
    args = _args_from_hf_config(read_json(path / "config.json"), path)
    sd: dict[str, torch.Tensor] = {}
    for f in _hf_weight_files(path):
        if f.suffix == ".safetensors":
            sd.update(load_safetensors(f))
        else:
            sd.update(_torch_load(f))
    return args, hf_to_ours(sd, args)


def open_hf(path: Path) -> tuple[Any, Mapping[str, torch.Tensor]]:
    """load_hf without reading the weights up front: safetensors shards are opened (memory-mapped) and each
    tensor is read, renamed and un-permuted when looked up. pytorch_model*.bin weights, MoE and GPT-2 models
    are read eagerly."""
    from safetensors import SafetensorError, safe_open

    if _is_gpt2(path):
        return load_hf_gpt2(path)
    args = _args_from_hf_config(read_json(path / "config.json"), path)
    files = _hf_weight_files(path)
    if args.moe_num_experts or any(f.suffix != ".safetensors" for f in files):
        return load_hf(path)  # Mixtral's experts are stacked from many tensors: read eagerly
    where: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as h:
                where.update({k: f for k in h.keys()})
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{f} is not a readable safetensors file ({e}); re-export or re-download it") from None
    to_hf = _hf_name_map(args)
    names = [n for n in to_hf if to_hf[n] in where and not (args.tie_embeddings and n == "output.weight")]
    unknown = sorted(set(where) - set(to_hf.values()) - {k for k in where if k.endswith("rotary_emb.inv_freq")})
    if unknown:
        raise UserError(f"unexpected tensor {unknown[0]!r} in the HF checkpoint; only the plain Llama "
                        "architecture (no biases, no extra modules) is supported")

    def read(name: str) -> torch.Tensor:
        with safe_open(where[to_hf[name]], framework="pt") as h:
            t = h.get_tensor(to_hf[name])
        return hf_to_ours({to_hf[name]: t}, replace(args, tie_embeddings=False))[name]

    def read_rows(name: str, start: int, stop: int) -> tuple[tuple[int, ...], torch.Tensor]:
        heads = (args.n_heads if name.endswith("attention.wq.weight") else
                 args.n_kv_heads if name.endswith("attention.wk.weight") else None)
        with safe_open(where[to_hf[name]], framework="pt") as h:
            sl = h.get_slice(to_hf[name])
            shape = tuple(sl.get_shape())
            if heads is None:
                return shape, sl[start:stop]
            # q/k rows are permuted within each head: read the whole heads the rows fall in, un-permute them
            hd = shape[0] // heads
            first, last = start // hd, -(-stop // hd)
            block = unpermute_rotate_half(sl[first * hd:last * hd], last - first)
        return shape, block[start - first * hd:stop - first * hd]

    return args, LazyStateDict(names, read, read_rows, str(path))


def _meta_merge(shards: list[dict[str, torch.Tensor]], dim: int) -> dict[str, torch.Tensor]:
    if len(shards) == 1:
        return dict(shards[0])
    out = {}
    for name, t in shards[0].items():
        if t.ndim < 2:  # norms are replicated on every rank
            out[name] = t
            continue
        short = name.split(".")[-2]
        if short == "tok_embeddings":
            # Llama 3 splits the vocabulary (dim 0); Llama 2 split the embedding (dim 1).
            split = 0 if t.shape[1] == dim else 1
        elif short in _META_SPLIT_DIM:
            split = _META_SPLIT_DIM[short]
        else:
            raise UserError(f"unknown tensor {name!r} in the Meta shards; cannot tell how it was split")
        out[name] = torch.cat([s[name] for s in shards], dim=split)
    return out


# Llama 3 RoPE scaling of a Meta params.json that says `use_scaled_rope: true` without a factor. Meta's
# reference apply_scaling has factor 8 built in, but the published HF configs of Llama 3.2 1B and 3B say 32
# (Llama 3.1 and 3.3: 8); the HF configs are taken as the authority, recognised by (dim, n_layers).
META_ROPE_FACTOR_BY_SHAPE: dict[tuple[int, int], tuple[float, str]] = {
    (2048, 16): (32.0, "Llama 3.2 1B"),
    (3072, 28): (32.0, "Llama 3.2 3B"),
}
META_ROPE_FACTOR_DEFAULT = 8.0  # Llama 3.1 / 3.3 and Meta's apply_scaling


def meta_rope_scaling(params: dict, factor: float | None = None) -> tuple[dict | None, str]:
    """params.json -> (Llama 3 rope_scaling dict or None, where its factor came from). The factor is, first
    to last: `factor` (the ROPE_SCALING_FACTOR setting), params.json's rope_scaling_factor, the published
    HF config of a recognised Llama 3.2 shape, Meta's built-in 8."""
    if not params.get("use_scaled_rope"):
        return None, ""
    shape = (params.get("dim"), params.get("n_layers"))
    if factor:
        source = "ROPE_SCALING_FACTOR"
    elif params.get("rope_scaling_factor"):
        factor, source = float(params["rope_scaling_factor"]), "params.json rope_scaling_factor"
    elif shape in META_ROPE_FACTOR_BY_SHAPE:
        factor, name = META_ROPE_FACTOR_BY_SHAPE[shape]
        source = f"the {name} shape (dim {shape[0]}, {shape[1]} layers), as in its published HF config.json"
    else:
        factor, source = META_ROPE_FACTOR_DEFAULT, (f"no factor in params.json and dim {shape[0]} / {shape[1]} "
                                                    "layers is no Llama 3.2 1B/3B shape: Llama 3.1's and Meta's "
                                                    "apply_scaling default")
    return {"factor": float(factor), "low_freq_factor": 1.0,
            "high_freq_factor": float(params.get("rope_high_freq_factor", 4.0)),
            "original_max_position_embeddings": 8192}, source


def load_meta(path: Path, rope_scaling_factor: float | None = None) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    args, lazy = open_meta(path, rope_scaling_factor)
    return args, dict(lazy.items())


def open_meta(path: Path, rope_scaling_factor: float | None = None) -> tuple[ModelArgs, Mapping[str, torch.Tensor]]:
    """The Meta shards memory-mapped; a tensor is merged across the model-parallel shards when looked up."""
    params = read_json(path / "params.json")
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise UserError(f"{path} has params.json but no consolidated.*.pth shards")
    shards = [_torch_load(f) for f in files]
    names = [n for n in shards[0] if n != "rope.freqs"]  # Llama 2 saved its RoPE table; we recompute it

    def read(name: str) -> torch.Tensor:
        return _meta_merge([{name: s[name]} for s in shards], params["dim"])[name]

    sd = LazyStateDict(names, read)
    args = _meta_args(path, params, sd, rope_scaling_factor)
    if args.tie_embeddings:  # a tied head is the embedding: read once, under its name
        sd = LazyStateDict([n for n in names if n != "output.weight"], read)
    return args, sd


def _meta_args(path: Path, params: dict, sd: Mapping[str, torch.Tensor],
               rope_scaling_factor: float | None) -> ModelArgs:
    sidecar = path / "model_args.json"  # written by export_meta: restores fields Meta does not store
    if sidecar.is_file():
        return ModelArgs.from_dict(read_json(sidecar))
    rope_scaling, factor_source = meta_rope_scaling(params, rope_scaling_factor)
    if rope_scaling is not None:
        print(f"{path}: Llama 3 RoPE scaling factor {rope_scaling['factor']:g} (from {factor_source}; "
              "ROPE_SCALING_FACTOR overrides it)", file=sys.stderr)
    w1, emb = sd["layers.0.feed_forward.w1.weight"], sd["tok_embeddings.weight"]
    args = ModelArgs(
        dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"), vocab_size=emb.shape[0],  # Llama 2 params say -1
        multiple_of=params.get("multiple_of", 256), ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
        rope_scaling=rope_scaling, max_seq_len=8192 if rope_scaling is None else 131072,
        tie_embeddings="output.weight" not in sd or torch.equal(sd["output.weight"], emb),
    )
    if args.hidden_dim != w1.shape[0]:  # trust the weights over the multiple_of rule
        args.ffn_hidden_dim = w1.shape[0]
    return args


def load_gguf(path: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    import gguf
    import numpy as np
    from tqdm import tqdm

    reader = gguf.GGUFReader(str(path))

    def meta(key: str, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    arch = meta("general.architecture")
    if arch != "llama":
        raise UserError(f"{path} has architecture {arch!r}; only 'llama' GGUF files are supported")
    sd, rope_freqs = {}, None
    for t in tqdm(reader.tensors, desc=f"dequantizing {path.name}", unit="tensor", leave=False):
        # np.array copies: F32 tensors come back as read-only views of the memory-mapped file
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        if t.name == "rope_freqs.weight":
            rope_freqs = w
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
        if m and m.group(2) in _GGUF_LAYER:
            sd[f"layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.weight"] = w
        elif t.name.removesuffix(".weight") in _GGUF_TOP:
            sd[_GGUF_TOP[t.name.removesuffix(".weight")] + ".weight"] = w
        else:
            raise UserError(f"unexpected tensor {t.name!r} in {path}; not a plain Llama GGUF")
    dim, n_heads = meta("llama.embedding_length"), meta("llama.attention.head_count")
    if meta("llama.rope.dimension_count", dim // n_heads) != dim // n_heads:
        raise UserError(f"{path}: rope dimension {meta('llama.rope.dimension_count')} != head_dim "
                        f"{dim // n_heads}; partial RoPE is not supported")
    args = ModelArgs(
        dim=dim, n_layers=meta("llama.block_count"), n_heads=n_heads,
        n_kv_heads=meta("llama.attention.head_count_kv", n_heads), vocab_size=sd["tok_embeddings.weight"].shape[0],
        ffn_hidden_dim=meta("llama.feed_forward_length"),
        norm_eps=float(meta("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta("llama.rope.freq_base", 10000.0)),
        max_seq_len=meta("llama.context_length", 2048), tie_embeddings="output.weight" not in sd,
    )
    if rope_freqs is not None:
        args.rope_scaling = _rope_scaling_from_factors(args, rope_freqs, path)
    return args, sd


def _rope_scaling_from_factors(args: ModelArgs, factors: torch.Tensor, path: Path) -> dict:
    """llama.cpp stores Llama 3.1 scaling as per-frequency divisors, not the four numbers; recover them
    assuming Meta's low/high factors and original context, and check the result reproduces the divisors."""
    scaling = {"factor": float(factors.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    base = ModelArgs(**{**args.to_dict(), "rope_scaling": None})
    got = rope_frequencies(base) / rope_frequencies(ModelArgs(**{**args.to_dict(), "rope_scaling": scaling}))
    if not torch.allclose(got, factors, rtol=1e-3):
        raise UserError(f"{path}: its rope_freqs are not Llama 3.1 scaling with Meta's defaults; unsupported")
    return scaling


# ---- export --------------------------------------------------------------------------------------
def _cpu_state(model: nn.Module, args: ModelArgs) -> dict[str, torch.Tensor]:
    """The plain Llama weights on CPU; anything else (LoRA adapters, wrappers) is a clear error."""
    sd = model.state_dict()
    extra = sorted(set(sd) - _ours_state_names(args))
    if extra:
        raise UserError(f"cannot export: the model has non-Llama tensors {extra[:3]}; merge LoRA adapters "
                        "first (lora.unload_lora(model)) and export the unwrapped model")
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def export_hf(model: nn.Module, args: Any, out_dir: str | os.PathLike,
              tokenizer: Tokenizer | None = None) -> Path:
    """Write an HF LlamaForCausalLM (MixtralForCausalLM with MoE) directory that transformers loads with the
    same logits (a GPT2LMHeadModel directory for a GPT-2 model): config.json,
    model.safetensors, generation_config.json (greedy; stops at the tokenizer's end-of-text and end-of-turn
    ids) and, with a tokenizer, its HF files (tokenizer.save_hf_tokenizer: tokenizer.json,
    tokenizer_config.json with the chat template, special_tokens_map.json)."""
    if isinstance(args, GPT2Args):
        sd = _gpt2_cpu_state(model, args)
        return export_hf_tensors(args, {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}, iter(sd.items()),
                                 out_dir, tokenizer)
    _check_hf_exportable(args)
    sd = _cpu_state(model, args)
    return export_hf_tensors(args, {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}, iter(sd.items()), out_dir,
                             tokenizer)


def _check_hf_exportable(args: ModelArgs) -> None:
    if args.moe_shared_expert:
        raise UserError("cannot export to HF: Mixtral has no shared expert (MOE_SHARED_EXPERT=true); keep the model "
                        "in our checkpoint format")


def export_hf_tensors(args: Any, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                      tensors: Iterator[tuple[str, torch.Tensor]], out_dir: str | os.PathLike,
                      tokenizer: Tokenizer | None = None, dtype: torch.dtype | None = None) -> Path:
    """export_hf from a stream of our tensors: `specs` {name: (shape, dtype)} in the order `tensors` yields
    (name, tensor). Each tensor is renamed, q/k-permuted, cast to `dtype` (None: kept) and written before the
    next is asked for, so memory holds one tensor, not the model (a sharded checkpoint exports this way)."""
    if isinstance(args, GPT2Args):
        return _export_gpt2_tensors(args, specs, tensors, out_dir, tokenizer, dtype)
    _check_hf_exportable(args)
    to_hf = _hf_name_map(args)
    extra = sorted(set(specs) - _ours_state_names(args))
    if extra:
        raise UserError(f"cannot export: the model has non-Llama tensors {extra[:3]}; merge LoRA adapters "
                        "first (lora.unload_lora(model)) and export the unwrapped model")
    # names and shapes of the HF tensors, from the conversion applied to shape-only (meta) tensors
    header = [(hf, tuple(m.shape), dtype or dt) for k, (shape, dt) in specs.items()
              for hf, m in _to_hf(k, torch.empty(shape, dtype=dt, device="meta"), args, to_hf)]
    out_dtype = header[0][2]
    config, gen = _hf_config(args, out_dtype, tokenizer)

    def converted() -> Iterator[torch.Tensor]:
        for name, t in tensors:
            for _, x in _to_hf(name, t, args, to_hf):
                yield x.to(dtype or x.dtype)

    return _write_hf_dir(out_dir, header, converted(), config, gen, tokenizer, args.max_seq_len)


def _write_hf_dir(out_dir: str | os.PathLike, header: list[tuple[str, tuple[int, ...], torch.dtype]], tensors: Iterator[torch.Tensor], config: dict,
                  gen: dict, tokenizer: Tokenizer | None, max_seq_len: int) -> Path:
    """An HF model directory, complete or absent: model.safetensors streamed from `tensors` (in `header`'s
    order), config.json, generation_config.json and, with a tokenizer, its HF files."""
    with atomic_dir(out_dir) as tmp:
        write_safetensors(tmp / "model.safetensors", header, tensors, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            save_hf_tokenizer(tokenizer, tmp, model_max_length=max_seq_len)
    return Path(out_dir)


def _hf_config(args: ModelArgs, dtype: torch.dtype, tokenizer: Tokenizer | None) -> tuple[dict, dict]:
    """-> (config.json, generation_config.json) of an HF LlamaForCausalLM (MixtralForCausalLM) export."""
    bos = tokenizer.bos_id if tokenizer is not None else None
    stops = tokenizer.stop_ids if tokenizer is not None else []
    eos = stops[0] if len(stops) == 1 else (stops or None)
    rope_parameters = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling:
        rope_parameters.update(rope_type="llama3", **args.rope_scaling)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "vocab_size": args.vocab_size,
        "intermediate_size": args.hidden_dim, "rms_norm_eps": args.norm_eps, "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": False, "mlp_bias": False,
        # both spellings: transformers < 5 reads rope_theta/rope_scaling, >= 5 reads rope_parameters
        "rope_theta": args.rope_theta,
        "rope_scaling": {"rope_type": "llama3", **args.rope_scaling} if args.rope_scaling else None,
        "rope_parameters": rope_parameters,
        "bos_token_id": bos, "eos_token_id": eos,
        "torch_dtype": str(dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch."),
    }
    if args.moe_num_experts:
        config.update(architectures=["MixtralForCausalLM"], model_type="mixtral",
                      num_local_experts=args.moe_num_experts, num_experts_per_tok=args.moe_top_k,
                      sliding_window=None, router_jitter_noise=0.0, output_router_logits=False)
    gen = {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}
    if tokenizer is not None and tokenizer.pad_id is not None:
        gen["pad_token_id"] = tokenizer.pad_id
    if tokenizer is not None and tokenizer.vocab_size > args.vocab_size:
        raise UserError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the model only "
                        f"{args.vocab_size} embeddings; export with the tokenizer the model was trained with")
    return config, gen


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: Path, header: list[tuple[str, tuple[int, ...], torch.dtype]],
                      tensors: Iterator[torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written as a stream: the header (names, shapes, dtypes, offsets) first, then each
    tensor's bytes as `tensors` yields them, in header order (safetensors' own save needs them all at once).
    Each yielded tensor must have the shape and dtype its header entry announced."""
    entries: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dt in header:
        n = torch.Size(shape).numel() * dt.itemsize
        entries[name] = {"dtype": _SAFETENSORS_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for (name, shape, dt), t in zip(header, tensors, strict=True):
            if tuple(t.shape) != tuple(shape) or t.dtype != dt:
                raise ValueError(f"tensor {name}: got {tuple(t.shape)} {t.dtype}, the header says {shape} {dt}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


def export_meta(model: Transformer, args: ModelArgs, out_dir: str | os.PathLike, n_shards: int = 1) -> Path:
    """Write Meta's layout: params.json + consolidated.NN.pth, split into n_shards model-parallel
    shards the way Meta's fairscale layers split them (Llama 3: tok_embeddings on the vocab dim).
    model_args.json keeps fields params.json has no key for (max_seq_len, explicit ffn size, tying)."""
    if isinstance(args, GPT2Args):
        raise UserError("cannot export a GPT-2 model in Meta's Llama format: use --format hf (a GPT2LMHeadModel "
                        "directory)")
    if args.moe_num_experts:
        raise UserError("cannot export a Mixture-of-Experts model in Meta's Llama format (it has no experts): "
                        "use --format hf (a MixtralForCausalLM directory)")
    if n_shards < 1 or args.n_kv_heads % n_shards or args.vocab_size % n_shards or args.hidden_dim % n_shards:  # type: ignore[operator]  # ModelArgs.__post_init__ sets n_kv_heads
        raise UserError(f"n_shards={n_shards} must divide n_kv_heads={args.n_kv_heads}, "
                        f"vocab_size={args.vocab_size} and the FFN size {args.hidden_dim}")
    sd = _cpu_state(model, args)  # Meta's checkpoints always hold output.weight, tied or not
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "vocab_size": args.vocab_size, "multiple_of": args.multiple_of,
              "ffn_dim_multiplier": args.ffn_dim_multiplier, "norm_eps": args.norm_eps, "rope_theta": args.rope_theta}
    if args.rope_scaling:
        params.update(use_scaled_rope=True, rope_scaling_factor=args.rope_scaling["factor"])
    with atomic_dir(out_dir) as tmp:
        for r in range(n_shards):
            shard = {}
            for name, t in sd.items():
                short = name.split(".")[-2]
                split = 0 if short == "tok_embeddings" else _META_SPLIT_DIM.get(short)
                shard[name] = t if t.ndim < 2 or split is None else t.chunk(n_shards, dim=split)[r].clone()
            torch.save(shard, tmp / f"consolidated.{r:02d}.pth")
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        extra = {k: v for k, v in args.to_dict().items() if k != "extra"}
        (tmp / "model_args.json").write_text(json.dumps(extra, indent=2) + "\n")
    return Path(out_dir)


# ---- GPT-2 (gpt2.py) -------------------------------------------------------------------------------
# HF's GPT2LMHeadModel: our names under `transformer.`, the projections as Conv1D modules whose weights are
# stored (in, out), the transpose of nn.Linear's. Hub files may lack the prefix (OpenAI's own upload) and may
# carry the causal-mask buffers attn.bias / attn.masked_bias, which hold no weights.
GPT2_PREFIX = "transformer."
_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")  # not c_attn.bias, a weight
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # the same tanh approximation


def _is_gpt2(path: Path) -> bool:
    return read_json(path / "config.json").get("model_type") == "gpt2"


def _gpt2_args_from_hf_config(cfg: dict, where: Path) -> GPT2Args:
    act = cfg.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise UserError(f"{where}/config.json has activation_function={act!r}; gpt2.py implements gelu_new "
                        "(GPT-2's tanh-approximated GELU) only")
    for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                           ("add_cross_attention", False), ("tie_word_embeddings", True)):
        if bool(cfg.get(key, supported)) != supported:
            raise UserError(f"{where}/config.json sets {key}={cfg[key]}; gpt2.py implements GPT-2 as released "
                            f"({key}={str(supported).lower()})")
    return GPT2Args(dim=cfg["n_embd"], n_layers=cfg["n_layer"], n_heads=cfg["n_head"], vocab_size=cfg["vocab_size"],
                    max_seq_len=cfg["n_positions"], ffn_hidden_dim=cfg.get("n_inner") or None,
                    norm_eps=cfg.get("layer_norm_epsilon", 1e-5), dropout=float(cfg.get("resid_pdrop", 0.1)))


def gpt2_from_hf(state_dict: Mapping[str, torch.Tensor], where: str = "") -> dict[str, torch.Tensor]:
    """An HF GPT-2 state dict (with or without the `transformer.` prefix, with or without the mask buffers and
    a tied lm_head.weight) -> gpt2.py's names and nn.Linear layout. The head is stored once, as wte."""
    out = {}
    for name, t in state_dict.items():
        ours = name.removeprefix(GPT2_PREFIX)
        if ours.endswith(_GPT2_BUFFERS) or ours == "lm_head.weight":
            continue
        out[ours] = t.t().contiguous() if ours.endswith(_GPT2_CONV1D) else t
    head = state_dict.get("lm_head.weight")
    if head is not None and "wte.weight" in out and not torch.equal(head, out["wte.weight"]):
        raise UserError(f"{where}: lm_head.weight differs from the token embedding; GPT-2's head is tied to it")
    return out


def gpt2_to_hf(name: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One tensor of gpt2.py -> its name and layout in HF's GPT2LMHeadModel."""
    return GPT2_PREFIX + name, (t.t() if name.endswith(_GPT2_CONV1D) else t)


def load_hf_gpt2(path: Path) -> tuple[GPT2Args, dict[str, torch.Tensor]]:
    args = _gpt2_args_from_hf_config(read_json(path / "config.json"), path)
    sd: dict[str, torch.Tensor] = {}
    for f in _hf_weight_files(path):
        sd.update(load_safetensors(f) if f.suffix == ".safetensors" else _torch_load(f))
    return args, gpt2_from_hf(sd, str(path))


def _gpt2_names(args: GPT2Args) -> set[str]:
    with torch.device("meta"):
        return set(GPT2(args).state_dict()) - {"lm_head.weight"}


def _gpt2_cpu_state(model: nn.Module, args: GPT2Args) -> dict[str, torch.Tensor]:
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    extra = sorted(set(sd) - _gpt2_names(args))
    if extra:
        raise UserError(f"cannot export: the model has tensors GPT-2 does not have {extra[:3]}; merge LoRA adapters "
                        "first (lora.unload_lora(model)) and export the unwrapped model")
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def _export_gpt2_tensors(args: GPT2Args, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                         tensors: Iterator[tuple[str, torch.Tensor]], out_dir: str | os.PathLike,
                         tokenizer: Tokenizer | None, dtype: torch.dtype | None) -> Path:
    """export_hf_tensors for GPT-2: a GPT2LMHeadModel directory (the tied head stored once, as wte)."""
    specs = {k: v for k, v in specs.items() if k != "lm_head.weight"}
    extra = sorted(set(specs) - _gpt2_names(args))
    if extra:
        raise UserError(f"cannot export: the model has tensors GPT-2 does not have {extra[:3]}; merge LoRA adapters "
                        "first (lora.unload_lora(model)) and export the unwrapped model")
    header = []
    for k, (shape, dt) in specs.items():
        hf, m = gpt2_to_hf(k, torch.empty(shape, dtype=dt, device="meta"))
        header.append((hf, tuple(m.shape), dtype or dt))
    config, gen = _gpt2_hf_config(args, header[0][2], tokenizer)

    def converted() -> Iterator[torch.Tensor]:
        for name, t in tensors:
            if name != "lm_head.weight":
                yield gpt2_to_hf(name, t)[1].to(dtype or t.dtype)

    return _write_hf_dir(out_dir, header, converted(), config, gen, tokenizer, args.max_seq_len)


def _gpt2_hf_config(args: GPT2Args, dtype: torch.dtype, tokenizer: Tokenizer | None) -> tuple[dict, dict]:
    """-> (config.json, generation_config.json) of an HF GPT2LMHeadModel export."""
    if tokenizer is not None and tokenizer.vocab_size > args.vocab_size:
        raise UserError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the model only "
                        f"{args.vocab_size} embeddings; export with the tokenizer the model was trained with")
    bos = tokenizer.bos_id if tokenizer is not None else None
    stops = tokenizer.stop_ids if tokenizer is not None else []
    eos = stops[0] if len(stops) == 1 else (stops or None)
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_embd": args.dim, "n_layer": args.n_layers, "n_head": args.n_heads, "n_positions": args.max_seq_len,
        "n_ctx": args.max_seq_len, "n_inner": args.ffn_hidden_dim, "vocab_size": args.vocab_size,
        "layer_norm_epsilon": args.norm_eps, "activation_function": "gelu_new",
        "resid_pdrop": args.dropout, "embd_pdrop": args.dropout, "attn_pdrop": args.dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "bos_token_id": bos, "eos_token_id": eos,
        "torch_dtype": str(dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch."),
    }
    gen = {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}
    if tokenizer is not None and tokenizer.pad_id is not None:
        gen["pad_token_id"] = tokenizer.pad_id
    return config, gen
