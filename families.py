"""The model families and what generic code needs to know of each: the MODEL_FAMILY setting, the `family` of a
checkpoint's model_args and an HF config's model_type name one of them. Code that builds or loads a model of
any family (model_utils, the training loop) goes through here and never names a family module.

- llama: model.py's Transformer (Llama 3, and Mixtral's MoE shape) with model.ModelArgs;
- gpt2: gpt2.py's GPT2 with gpt2.GPT2Args.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from gpt2 import GPT2, GPT2Args
from model import ModelArgs, Transformer


@dataclass(frozen=True)
class Family:
    name: str
    args_class: Any  # a dataclass with from_dict / to_dict
    module_class: Any  # nn.Module built from its args
    hf_model_types: tuple[str, ...]  # the config.json model_type values this family loads
    embedding: str  # the token embedding's module (the tied head's tensor lives there)
    head: str  # the output head's module
    learned_positions: bool = False  # a position table of max_seq_len rows: the context cannot grow

    def tie(self, model: nn.Module) -> None:
        """Point the head's weight at the embedding's (after to_empty(), which gives each module its own)."""
        model.get_submodule(self.head).weight = model.get_submodule(self.embedding).weight

    @property
    def head_weight(self) -> str:
        return f"{self.head}.weight"

    @property
    def embedding_weight(self) -> str:
        return f"{self.embedding}.weight"


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", ModelArgs, Transformer, ("llama", "mixtral"), "tok_embeddings", "output"),
    "gpt2": Family("gpt2", GPT2Args, GPT2, ("gpt2",), "wte", "lm_head", learned_positions=True),
}


def of_args(args: Any) -> Family:
    """The family of a model's args (its class)."""
    for family in FAMILIES.values():
        if type(args) is family.args_class:
            return family
    raise TypeError(f"{type(args).__name__} is not the arguments of a model family")


def of_model(model: nn.Module) -> Family:
    return of_args(model.args)


def args_from_dict(d: dict) -> Any:
    """A checkpoint's model_args (to_dict()) -> the family's args; no `family` key = llama."""
    return FAMILIES[d.get("family", "llama")].args_class.from_dict(d)


def build(args: Any) -> nn.Module:
    """The model of `args`' family (on the current default device, uninitialised)."""
    return of_args(args).module_class(args)


def for_hf_model_type(model_type: str) -> Family | None:
    return next((f for f in FAMILIES.values() if model_type in f.hf_model_types), None)
