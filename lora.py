"""LoRA as a module swap (Hu et al. 2021, arXiv:2106.09685), in the style of torchtune's LoRALinear.

`apply_lora` replaces chosen nn.Linear layers by `LoRALinear`, which keeps the base weight under the
same state-dict key (`layers.0.attention.wq.weight` stays the base weight) and adds two adapter
matrices next to it (`...wq.lora_a`, `...wq.lora_b`):

    y = x W^T + scaling * dropout(x) A^T B^T        A: (rank, in), B: (out, rank), scaling = alpha / rank

Dropout sits only on the adapter's input, never on the base path.
Every LoRALinear has a `disabled` switch: with adapters off the model IS the base model, so the DPO
reference needs no second copy (`with disable_lora(model): ...`). `merge_lora` folds B A into W for
inference and export; `save_peft_adapter` writes the adapter in Hugging Face PEFT's on-disk format so
`peft.PeftModel.from_pretrained` loads it on top of `model_utils.export_hf`'s base model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distributed import unwrap
from errors import UserError
from gpt2 import GPT2Args
from model_formats import GPT2_PREFIX, permute_rotate_half, unpermute_rotate_half

# Our (Meta) attribute name -> (HF parent module, HF projection name). Used for PEFT export/import.
HF_NAMES: dict[str, tuple[str, str]] = {
    "wq": ("self_attn", "q_proj"),
    "wk": ("self_attn", "k_proj"),
    "wv": ("self_attn", "v_proj"),
    "wo": ("self_attn", "o_proj"),
    "w1": ("mlp", "gate_proj"),
    "w2": ("mlp", "down_proj"),
    "w3": ("mlp", "up_proj"),
}
DEFAULT_TARGETS: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# GPT-2 (gpt2.py): the fused q/k/v projection, both residual projections (attn.c_proj, mlp.c_proj) and the MLP's
# first layer, named as in HF's GPT2LMHeadModel; its Conv1D layers store (in, out) weights, so PEFT marks the
# adapter fan_in_fan_out (the adapter tensors themselves have the nn.Linear layout either way).
GPT2_TARGETS: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank adapter. `weight` (and `bias`) are the base layer's own Parameters,
    reused, not copied: tied weights stay tied and the state-dict keys of the base are unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        # Build on the meta device so no throwaway (out, in) weight is allocated, then adopt base's.
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.empty(base.out_features, rank, device=w.device, dtype=w.dtype))
        self.disabled = False  # True: behave exactly like the base layer
        self.merged = False  # True: weight already holds W + scaling * B A
        self.reset_lora_parameters()

    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        init_adapter("lora_a", self.lora_a, generator)
        init_adapter("lora_b", self.lora_b, generator)

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, (out, in), computed in fp32 for an accurate merge into low-precision weights."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scaling

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., rank) -> (..., out); two thin matmuls, never the (out, in) product.
        return F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged and self.disabled:
            # Base output of a merged layer without touching the weight (disable_lora must not mutate).
            return out - self._adapter(x)
        if not self.merged and not self.disabled:
            return out + self._adapter(self.dropout(x))
        return out

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout_p:g}"


@torch.no_grad()
def init_adapter(name: str, t: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """The initial value of the adapter parameter `name` (`...lora_a` / `...lora_b`), in place on `t` (the
    parameter, or a full-size tensor standing in for a sharded one). PEFT's default (init_lora_weights=True):
    A like nn.Linear's default init, B = 0, so the adapted model starts exactly equal to the base model."""
    if name.endswith("lora_a"):
        nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    else:
        nn.init.zeros_(t)


def is_adapter(name: str) -> bool:
    """Whether the parameter name is a LoRA adapter matrix."""
    return name.endswith((".lora_a", ".lora_b"))


# ---- applying and inspecting ---------------------------------------------------------------------


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(qualified name, module) for every LoRALinear in the model."""
    for name, m in unwrap(model).named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def apply_lora(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
) -> nn.Module:
    """Swap every nn.Linear whose attribute name is in `targets` (e.g. wq wk wv wo w1 w2 w3, output)
    for a LoRALinear and freeze everything except the adapters. Modifies `model` in place; returns it."""
    if isinstance(targets, str):
        targets = [t for t in targets.replace(",", " ").split() if t]
    targets = list(dict.fromkeys(targets))
    if not targets:
        raise UserError("LoRA: no target modules given; pass e.g. LORA_TARGETS=wq,wk,wv,wo,w1,w2,w3")
    if not isinstance(rank, int) or rank < 1:
        raise UserError(f"LoRA: rank={rank!r} is invalid; use a positive integer such as 8 or 16")
    if not alpha > 0:
        raise UserError(f"LoRA: alpha={alpha!r} is invalid; use a positive number (commonly 2 * rank)")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"LoRA: dropout={dropout!r} is invalid; use a value in [0, 1)")
    root = unwrap(model)
    if any(True for _ in lora_modules(root)):
        raise UserError("LoRA: the model already has LoRA adapters; apply_lora must be called once")

    swaps: list[tuple[nn.Module, str, nn.Linear]] = []
    for parent in root.modules():
        for child_name, child in parent.named_children():
            if child_name in targets and type(child) is nn.Linear:
                swaps.append((parent, child_name, child))
    found = {child_name for _, child_name, _ in swaps}
    missing = [t for t in targets if t not in found]
    if missing:
        raise UserError(
            f"LoRA: target(s) {missing} match no nn.Linear in the model; valid names are "
            f"{sorted(GPT2_TARGETS) if _is_gpt2(root) else sorted(set(DEFAULT_TARGETS) | {'output'})}"
        )
    for parent, child_name, child in swaps:
        setattr(parent, child_name, LoRALinear(child, rank, alpha, dropout))
    for name, p in root.named_parameters():
        p.requires_grad_(name.endswith((".lora_a", ".lora_b")))
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (A and B of every LoRALinear), in module order."""
    return [p for _, m in lora_modules(model) for p in (m.lora_a, m.lora_b)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors only, keyed like the full state dict (`layers.0.attention.wq.lora_a`)."""
    sd: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model):
        sd[f"{name}.lora_a"] = m.lora_a.detach()
        sd[f"{name}.lora_b"] = m.lora_b.detach()
    return sd


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into the model; keys and shapes must match `lora_state_dict(model)` exactly."""
    own = {f"{n}.{k}": getattr(m, k) for n, m in lora_modules(model) for k in ("lora_a", "lora_b")}
    if not own:
        raise UserError("LoRA: the model has no adapters to load into; call apply_lora first")
    missing, unexpected = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own.keys())
    if missing or unexpected:
        raise UserError(
            f"LoRA: adapter state dict does not match the model (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}); load it into a model built with the same LoRA targets"
        )
    for k, p in own.items():
        if tuple(state_dict[k].shape) != tuple(p.shape):
            raise UserError(
                f"LoRA: {k} has shape {tuple(state_dict[k].shape)}, the model expects {tuple(p.shape)}; "
                "use the same LoRA rank and model size as the run that saved it"
            )
    merged = [m for _, m in lora_modules(model) if m.merged]
    for m in merged:  # keep merged weights consistent with the new adapters
        m.unmerge()
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state_dict[k])
    for m in merged:
        m.merge()


def lora_config(model: nn.Module) -> dict:
    """{"targets", "rank", "alpha", "dropout"} read back from the modules (one uniform setting)."""
    mods = list(lora_modules(model))
    if not mods:
        raise UserError("LoRA: the model has no adapters; call apply_lora first")
    settings = {(m.rank, m.alpha, m.dropout_p) for _, m in mods}
    if len(settings) != 1:
        raise UserError(
            f"LoRA: adapters use mixed settings {sorted(settings)}; only a uniform setting is supported"
        )
    rank, alpha, dropout = settings.pop()
    targets = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, _ in mods))
    return {"targets": targets, "rank": rank, "alpha": alpha, "dropout": dropout}


# ---- merge and disable ---------------------------------------------------------------------------


def _check_mergeable(model: nn.Module) -> None:
    counts: dict[int, int] = {}
    for _, p in unwrap(model).named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    for name, m in lora_modules(model):
        if counts[id(m.weight)] > 1:
            raise UserError(
                f"LoRA: cannot merge into {name}: its weight is shared (tied embeddings), merging would also "
                "change the other user; keep the adapter unmerged or train without 'output' in the targets"
            )


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold scaling * B A into every base weight in place (idempotent). The forward is unchanged;
    adapters get no gradient while merged. Returns the model."""
    _check_mergeable(model)
    for _, m in lora_modules(model):
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora (idempotent). Exact up to floating-point rounding of W + D - D."""
    for _, m in lora_modules(model):
        m.unmerge()
    return model


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding the same base Parameter, merged with the
    adapter first when `merge` (PEFT's merge_and_unload), else dropping it. The result has exactly the
    base model's state-dict keys, so model_utils.export_hf / export_meta take it. Returns the model."""
    if merge:
        _check_mergeable(model)
    for name, m in list(lora_modules(model)):
        if merge:
            m.merge()
        else:
            m.unmerge()
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent = unwrap(model).get_submodule(name.rpartition(".")[0]) if "." in name else unwrap(model)
        setattr(parent, name.rpartition(".")[2], plain)
    return model


@contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: adapters off inside the block, previous switches restored on exit, even on
    an exception. Never mutates weights, so it is safe on merged models too."""
    mods = [m for _, m in lora_modules(model)]
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(mods, before, strict=True):
            m.disabled = d


# ---- PEFT format -----------------------------------------------------------------------------------


def _rope_heads(model: nn.Module, attr: str) -> int | None:
    """How many heads the rows of wq / wk hold (they need the RoPE permutation); None for others."""
    args: Any = getattr(unwrap(model), "args", None)
    if attr == "wq":
        return args.n_heads
    if attr == "wk":
        return args.n_kv_heads
    return None


def _is_gpt2(model: nn.Module) -> bool:
    return isinstance(getattr(unwrap(model), "args", None), GPT2Args)


def _peft_module_name(model: nn.Module, name: str) -> str:
    """A LoRA module's name in PEFT's files: HF's name of the layer (GPT-2: ours under `transformer.`)."""
    return _PEFT_PREFIX + (GPT2_PREFIX + name if _is_gpt2(model) else _hf_module_name(name))


def _hf_module_name(name: str) -> str:
    """`layers.3.attention.wq` -> `model.layers.3.self_attn.q_proj`; `output` -> `lm_head`."""
    if name == "output":
        return "lm_head"
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "layers" or parts[3] not in HF_NAMES:
        raise UserError(
            f"LoRA: no PEFT/HF name for module {name!r}; PEFT export supports {list(HF_NAMES)} and output"
        )
    parent, proj = HF_NAMES[parts[3]]
    return f"model.layers.{parts[1]}.{parent}.{proj}"


def _hf_target_name(attr: str) -> str:
    return "lm_head" if attr == "output" else HF_NAMES[attr][1]


def save_peft_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model: str | None = None,
                      state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` in PEFT's LoRA format (the layout
    peft 0.21's save_pretrained produces for a LlamaForCausalLM), loadable with
    `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<export_hf dir>), out_dir)`.
    `base_model` goes to the config's `base_model_name_or_path` (what AutoPeftModelForCausalLM loads).
    `state_dict`: the adapter tensors keyed like `lora_state_dict(model)` (e.g. gathered from a sharded
    model); default: the model's own.

    HF stores q/k rows permuted for rotate-half RoPE; B's rows are output rows, so they get the same
    permutation as the base weight's (A acts on the input side and is unchanged)."""
    from safetensors.torch import save_file

    cfg = lora_config(model)
    sd = lora_state_dict(model) if state_dict is None else state_dict
    tensors: dict[str, torch.Tensor] = {}
    for name, _ in lora_modules(model):
        hf = _peft_module_name(model, name)
        a, b = sd[f"{name}.lora_a"].detach(), sd[f"{name}.lora_b"].detach()
        heads = _rope_heads(model, name.rsplit(".", 1)[-1])
        if heads is not None:
            b = permute_rotate_half(b, heads)
        tensors[f"{hf}.lora_A.weight"] = a.cpu().contiguous().clone()
        tensors[f"{hf}.lora_B.weight"] = b.cpu().contiguous().clone()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg["rank"],
        "lora_alpha": cfg["alpha"],
        "lora_dropout": cfg["dropout"],
        "target_modules": sorted(t if _is_gpt2(model) else _hf_target_name(t) for t in cfg["targets"]),
        "bias": "none",
        "fan_in_fan_out": _is_gpt2(model),  # GPT-2's Conv1D layers
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Each file is written under a temporary name then renamed: never a half-written adapter on disk.
    tmp_w, tmp_c = out / (PEFT_WEIGHTS + ".tmp"), out / (PEFT_CONFIG + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp_w, out / PEFT_WEIGHTS)
    os.replace(tmp_c, out / PEFT_CONFIG)
    return out


def load_peft_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA adapter (Llama module names) into our model: applies LoRA with the adapter's
    settings if the model has none yet, else checks they agree; then copies A and B (q/k B rows
    un-permuted back to Meta's RoPE layout). Returns the model."""
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    if not (d / PEFT_CONFIG).is_file():
        raise UserError(
            f"LoRA: {d / PEFT_CONFIG} not found; point to a directory written by PEFT save_pretrained"
        )
    cfg = json.loads((d / PEFT_CONFIG).read_text())
    where = d / PEFT_CONFIG
    if cfg.get("peft_type") != "LORA":
        raise UserError(
            f"LoRA: {where} has peft_type={cfg.get('peft_type')!r}; only LORA adapters are supported"
        )
    for key in ("use_rslora", "use_dora"):
        if cfg.get(key):
            raise UserError(
                f"LoRA: {where} sets {key}=true, which this project does not implement; retrain without it"
            )
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"):
        if cfg.get(key):
            raise UserError(f"LoRA: {where} sets {key}; only a uniform adapter on whole layers is supported")
    if cfg.get("bias", "none") != "none":
        raise UserError(f"LoRA: {where} has bias={cfg['bias']!r}; only bias='none' is supported")
    hf_to_attr = {proj: attr for attr, (_, proj) in HF_NAMES.items()} | {"lm_head": "output"}
    if _is_gpt2(model):
        hf_to_attr = {t: t for t in GPT2_TARGETS}
    tm = cfg.get("target_modules")
    if not isinstance(tm, list) or any(t not in hf_to_attr for t in tm):
        raise UserError(f"LoRA: {where} has target_modules={tm!r}; expected a list of {sorted(hf_to_attr)}")
    targets = [hf_to_attr[t] for t in tm]
    rank, alpha, dropout = int(cfg["r"]), float(cfg["lora_alpha"]), float(cfg.get("lora_dropout", 0.0))
    if not any(True for _ in lora_modules(model)):
        apply_lora(model, targets, rank, alpha, dropout)
    else:
        have = lora_config(model)
        if (sorted(have["targets"]), have["rank"], have["alpha"]) != (sorted(targets), rank, alpha):
            raise UserError(
                f"LoRA: adapter in {d} (targets {targets}, r={rank}, alpha={alpha:g}) does not match the model's "
                f"adapters (targets {have['targets']}, r={have['rank']}, alpha={have['alpha']:g})"
            )
    if not (d / PEFT_WEIGHTS).is_file():
        raise UserError(f"LoRA: {d / PEFT_WEIGHTS} not found; only safetensors adapters are supported")
    peft_sd = load_file(str(d / PEFT_WEIGHTS))
    sd: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model):
        hf = _peft_module_name(model, name)
        heads = _rope_heads(model, name.rsplit(".", 1)[-1])
        for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            key = f"{hf}.{theirs}.weight"
            if key not in peft_sd:
                raise UserError(
                    f"LoRA: {d / PEFT_WEIGHTS} has no tensor {key}; the adapter does not fit this model"
                )
            t = peft_sd[key]
            if ours == "lora_b" and heads is not None and t.shape == m.lora_b.shape:
                t = unpermute_rotate_half(t, heads)
            sd[f"{name}.{ours}"] = t
    load_lora_state_dict(model, sd)
    return model
