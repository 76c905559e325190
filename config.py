"""`.env` + `--env-file` + `KEY=VALUE` overrides -> typed, validated, grouped settings.

Precedence, lowest to highest: table default < MODEL_PRESET < env file < process environment (known keys
only) < command-line `KEY=VALUE`: the environment beats the file, as with python-dotenv's `load_dotenv`,
and every value the environment overrode is named in `Config.summary()` (the banner, `config.py show`).
Values in the env file expand `${VAR}` and `${VAR:-default}` as python-dotenv does (its own variable parser,
`dotenv.variables`): VAR is looked up in the environment, then in the lines above it in the same file; an
undefined VAR without a default becomes the empty string; `$VAR` without braces stays literal; single and
double quotes expand alike. The lines themselves are read by this module's parser, not python-dotenv's: python-dotenv
skips a malformed line with a log message, this parser stops on it naming `file:line`.
Unknown keys in the env file warn with the closest valid key (not a key that a later line uses as `${KEY}`: a
helper variable); an unknown `KEY=VALUE` on the command line is a request that cannot be met and fails with the
closest valid key. Quoting follows python-dotenv: double quotes decode \\n \\t \\" \\\\ (unicode is kept as
written), single quotes decode only \\' and \\\\. A bad value fails before any work starts, naming the key, the
value, where it came from and what was expected. Secret values (settings_table.is_secret) are never printed, saved or logged.
Retired keys of the predecessor repo (settings_table.RETIRED) are accepted with a note saying why they are not read. A data
directory named by only one of its two keys (settings_table.SAME_DIR: where preparation writes, where
training reads) is used for both. Settings flagged `env` (HF_HOME, HF_TOKEN, WANDB_API_KEY) are exported to
the process environment when set, before load_config returns and so before any hub or W&B call, for the
libraries that read them there. Importing this module reads nothing.
Each group is an instance of its class in config_sections.py (`cfg.training` is a `TrainingSettings`), a module
generated from the table by `python config.py sections > config_sections.py`, so a type checker sees
`cfg.training.max_lr` as a float; tests/test_config.py fails when the committed module is not current.

    cfg = load_config(".env", {"MAX_STEPS": "10"})
    cfg.training.max_lr, cfg["MAX_LR"], cfg.model_args(vocab_size=...)
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dotenv.variables import Variable, parse_variables

from config_sections import SECTIONS, Sections
from errors import UserError, run_cli
from settings_table import ALIASES, BY_KEY, GROUPS, PRESETS, RETIRED, SAME_DIR, SETTINGS, Setting, is_secret

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}
MASK = "***"
# What load_config itself put into os.environ: not the user's environment, so it never outranks a file
# read later in the same process. Process-wide because os.environ is: the values it records live as long as
# the process, outlasting the Config that exported them, and the next load_config or export_library_settings
# (whichever object calls it) must tell them from the user's and withdraw those its own sources no longer set.
_EXPORTED: dict[str, str] = {}


class Config(Sections):
    """Resolved settings. Access by group (`cfg.training.max_lr`, typed by config_sections.py) or by key
    (`cfg["MAX_LR"]`)."""

    def __init__(self, values: dict[str, Any], sources: dict[str, str], overridden: dict[str, str] | None = None):
        self._values = values
        self._sources = sources
        self._overridden = overridden or {}  # key -> where the value the environment beat came from
        for group in GROUPS:
            section = SECTIONS[group](**{s.key.lower(): values[s.key] for s in SETTINGS if s.group == group})
            setattr(self, group, section)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def source(self, key: str) -> str:
        return self._sources.get(key, "default")

    def environment_overrides(self) -> dict[str, str]:
        """Keys whose value came from the process environment although the env file or the preset set
        another -> where that other value came from."""
        return {k: w for k, w in self._overridden.items() if self._sources.get(k) == "environment"}

    def to_dict(self, include_secrets: bool = False) -> dict[str, Any]:
        """Every resolved setting; secrets are dropped unless asked for (never saved or logged)."""
        return {k: v for k, v in self._values.items() if include_secrets or not is_secret(k)}

    def replace(self, **updates: Any) -> Config:
        values = dict(self._values)
        for k, v in updates.items():
            if k not in BY_KEY:
                raise KeyError(k)
            values[k] = v
        return Config(values, {**self._sources, **{k: "code" for k in updates}}, self._overridden)

    def model_args(self, vocab_size: int | None = None):
        """The model arguments of MODEL_FAMILY from the model group (model.ModelArgs for llama, gpt2.GPT2Args for
        gpt2); VOCAB_SIZE=0 takes `vocab_size` (the tokenizer's)."""
        from model import ModelArgs

        m = self.model
        vocab = m.vocab_size or vocab_size
        if not vocab:
            raise UserError("VOCAB_SIZE is 0 and no tokenizer vocabulary was given: set VOCAB_SIZE or a tokenizer")
        if m.model_family == "gpt2":
            from gpt2 import GPT2Args

            return GPT2Args(dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads, vocab_size=vocab,
                            max_seq_len=m.max_seq_len, norm_eps=m.norm_eps, dropout=m.dropout,
                            attn_impl=self.system.attn_impl)
        try:
            return ModelArgs(
                dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, vocab_size=vocab,
                multiple_of=m.multiple_of, ffn_dim_multiplier=m.ffn_dim_multiplier,
                ffn_hidden_dim=m.ffn_hidden_dim or None, norm_eps=m.norm_eps, rope_theta=m.rope_theta,
                rope_scaling=m.rope_scaling, max_seq_len=m.max_seq_len, tie_embeddings=m.tie_embeddings,
                attn_impl=self.system.attn_impl, moe_num_experts=m.moe_num_experts, moe_top_k=m.moe_top_k,
                moe_capacity_factor=m.moe_capacity_factor, moe_shared_expert=m.moe_shared_expert,
                moe_impl=self.system.moe_impl,
            )
        except ValueError as e:
            raise UserError(f"model settings do not form a valid model: {e}; fix the model keys named") from None

    def batch_geometry(self, world: int) -> tuple[int, int]:
        """-> (global batch in sequences, grad accumulation steps per rank) on `world` ranks, asserted exact
        (llm.c style): TOTAL_BATCH_SIZE tokens = MAX_SEQ_LEN x MAX_BATCH_SIZE x world x accumulation."""
        t, T = self.training, self.model.max_seq_len
        if t.training_stage == "grpo":  # a step is a generation batch: prompts x completions, not tokens
            g = self.grpo
            if g.grpo_prompts_per_step % world or (g.grpo_prompts_per_step // world * g.grpo_num_generations
                                                   ) % t.max_batch_size:
                raise UserError(f"GRPO_PROMPTS_PER_STEP={g.grpo_prompts_per_step} must be a multiple of the world "
                                f"size {world}, and each rank's completions (its prompts x GRPO_NUM_GENERATIONS="
                                f"{g.grpo_num_generations}) a multiple of MAX_BATCH_SIZE={t.max_batch_size}; "
                                "adjust one of them")
            rows = g.grpo_prompts_per_step * g.grpo_num_generations
            return rows, rows // world // t.max_batch_size
        G = t.total_batch_size // T
        if G == 0 or t.total_batch_size % T or G % (t.max_batch_size * world):
            raise UserError(f"TOTAL_BATCH_SIZE={t.total_batch_size} tokens must be a multiple of MAX_SEQ_LEN={T} "
                            f"* MAX_BATCH_SIZE={t.max_batch_size} * world size {world} "
                            f"(= {T * t.max_batch_size * world}); adjust one of them")
        return G, G // (t.max_batch_size * world)

    def summary(self) -> str:
        """Grouped, aligned listing of every setting and where it came from (secrets masked), then one line
        naming every value the environment overrode. Lines with a source end with ")"."""
        lines = []
        over = self.environment_overrides()
        for group in GROUPS:
            lines.append(f"[{group}]")
            for s in (s for s in SETTINGS if s.group == group):
                v = self._values[s.key]
                shown = (MASK if v else "") if is_secret(s.key) else json.dumps(v) if not isinstance(v, str) else v
                src = self.source(s.key) + (f", over {over[s.key]}" if s.key in over else "")
                lines.append(f"  {s.key:<36} = {shown}" + ("" if src == "default" else f"   ({src})"))
        if over:
            lines.append("the environment overrode: " + ", ".join(f"{k} (over {w})" for k, w in over.items()))
        return "\n".join(lines)


# ---- parsing -----------------------------------------------------------------------------------


def parse_env_file(path: str | os.PathLike) -> list[tuple[str, str, int]]:
    """Lines of `KEY=VALUE` (optionally `export `, quotes, `# comments`) -> [(key, raw value, line no)]."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"env file {str(path)!r} does not exist: pass an existing file to --env-file "
                        f"(start from .env.example)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"env file {str(path)!r} is not UTF-8 text: save it as UTF-8") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("export "):
            s = s[len("export "):].lstrip()
        if "=" not in s:
            name = s.split()[0]
            shown = f"{name} {MASK}" if is_secret(name) and name != s else s[:60]
            raise UserError(f"{path}:{n}: expected KEY=VALUE, got {shown!r}: fix or comment out the line")
        key, raw = s.split("=", 1)
        key = key.strip()
        if not key.replace("_", "").isalnum() or not key.isascii():
            raise UserError(f"{path}:{n}: {key[:40]!r} is not a valid key name: use letters, digits and _")
        out.append((key, _unquote(raw.strip(), f"{path}:{n}", is_secret(key)), n))
    return out


def expand_variables(entries: list[tuple[str, str, int]], environ: dict[str, str]
                     ) -> tuple[list[tuple[str, str, int]], set[str]]:
    """`${VAR}` / `${VAR:-default}` in parsed env-file values, as python-dotenv's `load_dotenv` expands them
    (override=False): VAR from `environ` first, then from the lines above; undefined and no default -> "".
    Returns the expanded entries and the names referenced (helper variables are not unknown settings)."""
    defined: dict[str, str] = {}
    out, referenced = [], set()
    for key, value, n in entries:
        atoms = list(parse_variables(value))
        referenced |= {a.name for a in atoms if isinstance(a, Variable)}
        value = "".join(a.resolve({**defined, **environ}) for a in atoms)
        defined[key] = value
        out.append((key, value, n))
    return out, referenced


# A quoted value as python-dotenv reads it: `\"` does not close a double-quoted value nor `\'` a single-quoted
# one; double quotes decode the escapes below (any other backslash stays), single quotes only \' and \\.
_DOUBLE_QUOTED = re.compile(r'"((?:\\"|[^"])*)"')
_SINGLE_QUOTED = re.compile(r"'((?:\\'|[^'])*)'")
_DOUBLE_ESCAPE = re.compile(r"\\([\\'\"abfnrtv])")
_SINGLE_ESCAPE = re.compile(r"\\([\\'])")
_ESCAPED = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_INLINE_COMMENT = re.compile(r"\s+#.*")


def _unquote(raw: str, where: str, secret: bool = False) -> str:
    if raw[:1] in ("'", '"'):
        q = raw[0]
        m = (_DOUBLE_QUOTED if q == '"' else _SINGLE_QUOTED).match(raw)
        if m is None:
            raise UserError(f"{where}: unterminated {q} quote in value {MASK if secret else repr(raw[:60])}: "
                            "close the quote")
        rest = raw[m.end():].strip()
        if rest and not rest.startswith("#"):
            raise UserError(f"{where}: unexpected text {MASK if secret else repr(rest[:40])} after the quoted "
                            "value: remove it")
        if q == "'":
            return _SINGLE_ESCAPE.sub(r"\1", m.group(1))
        return _DOUBLE_ESCAPE.sub(lambda e: _ESCAPED.get(e.group(1), e.group(1)), m.group(1))
    # unquoted: an inline comment starts at whitespace followed by "#"
    return _INLINE_COMMENT.sub("", raw).strip()


def convert(setting: Setting, raw: Any, where: str) -> Any:
    """Raw string (or already-typed value) -> typed, range-checked value, or a UserError."""
    k, kind = setting.key, setting.kind

    def bad(expected: str) -> UserError:
        return UserError(f"{k}={MASK if is_secret(k) else repr(raw)} ({where}): expected {expected}")

    if not isinstance(raw, str):
        value = raw
    elif kind == "int":
        try:
            f = float(raw.replace("_", ""))
            if not f.is_integer():
                raise ValueError
            value = int(f)
        except (ValueError, OverflowError):
            raise bad("an integer, e.g. 1000") from None
    elif kind == "float":
        try:
            value = float(raw.replace("_", ""))
        except ValueError:
            raise bad("a number, e.g. 3e-4") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise bad("a finite number")
    elif kind == "bool":
        low = raw.strip().lower()
        if low not in _TRUE | _FALSE:
            raise bad("true or false")
        value = low in _TRUE
    elif kind == "str":
        value = raw
    elif kind in ("list", "floats"):
        value = _parse_list(raw, float if kind == "floats" else str)
        if value is None:
            raise bad('a JSON list, e.g. ["wq", "wv"], or comma-separated values' if kind == "list"
                      else "a JSON list of numbers, e.g. [0.9, 0.95]")
    elif kind == "json":
        if raw.strip() in ("", "none", "None", "null"):
            value = None
        else:
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                raise bad('a JSON object, e.g. {"factor": 8}, or empty') from None
            if not isinstance(value, dict):
                raise bad("a JSON object or empty")
    else:  # pragma: no cover - table error
        raise AssertionError(f"unknown kind {kind} for {k}")
    if setting.choices is not None and value not in setting.choices:
        raise bad("one of " + ", ".join(map(str, setting.choices)))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if setting.min is not None and value < setting.min:
            raise bad(f"a value >= {setting.min:g}")
        if setting.max is not None and value > setting.max:
            raise bad(f"a value <= {setting.max:g}")
    return value


def _parse_list(raw: str, item: type) -> list | None:
    s = raw.strip()
    if s.startswith("["):
        try:
            v = json.loads(s)
        except json.JSONDecodeError:
            try:  # older .env files hold Python-style lists with single quotes
                v = json.loads(s.replace("'", '"'))
            except json.JSONDecodeError:
                return None
        if not isinstance(v, list):
            return None
    else:
        v = [x for x in (p.strip() for p in s.replace(",", " ").split()) if x]
    try:
        out = [item(x) for x in v]
    except (TypeError, ValueError):
        return None
    if item is str and any(not x for x in out):
        return None
    return out


def closest_key(key: str) -> str | None:
    match = difflib.get_close_matches(key, list(BY_KEY) + list(ALIASES), n=1, cutoff=0.6)
    return match[0] if match else None


def _warn_unknown(key: str, where: str) -> None:
    hint = closest_key(key)
    msg = f"unknown setting {key} ({where}) is ignored" + (f"; did you mean {hint}?" if hint else "")
    print(f"warning: {msg}", file=sys.stderr)


def load_config(env_file: str | None = None, overrides: dict[str, str] | None = None,
                use_environ: bool = True) -> Config:
    """Resolve settings. env_file None reads ./.env when it exists; overrides are KEY -> raw string.
    use_environ False: the process environment is neither a source nor looked up by `${VAR}` (tests)."""
    environ = {k: v for k, v in os.environ.items() if _EXPORTED.get(k) != v} if use_environ else {}
    raw: dict[str, tuple[Any, str]] = {}  # key -> (raw value, where it came from)
    overridden: dict[str, str] = {}  # key -> where the (different) value the environment beat came from
    if env_file is None and Path(".env").is_file():
        env_file = ".env"
    if env_file is not None:
        entries, helpers = expand_variables(parse_env_file(env_file), environ)
        for key, value, n in entries:
            _put(raw, key, value, f"{env_file}:{n}", warn_unknown=key not in helpers)
    in_file = set(raw)
    for key in BY_KEY:
        if key in environ:
            if key in raw and str(raw[key][0]).strip() != environ[key].strip():
                overridden[key] = raw[key][1]
            raw[key] = (environ[key], "environment")
    for key, value in (overrides or {}).items():
        _put(raw, key, value, "command line", unknown_is_error=True)

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    preset_name = convert(BY_KEY["MODEL_PRESET"], raw["MODEL_PRESET"][0], raw["MODEL_PRESET"][1]) \
        if "MODEL_PRESET" in raw else ""
    if preset_name and preset_name not in PRESETS:
        raise UserError(f"MODEL_PRESET={preset_name!r} ({raw['MODEL_PRESET'][1]}): expected one of "
                        + ", ".join(PRESETS))
    preset = PRESETS.get(preset_name, {})
    for s in SETTINGS:
        if s.key in raw:
            value, where = raw[s.key]
            values[s.key], sources[s.key] = convert(s, value, where), where
            beat_preset = s.key in preset and s.key not in in_file and values[s.key] != preset[s.key]
            if where == "environment" and beat_preset:
                overridden[s.key] = f"preset {preset_name}"
        elif s.key in preset:
            values[s.key], sources[s.key] = preset[s.key], f"preset {preset_name}"
        else:
            values[s.key] = s.default
    if values["USE_MUON"] and "OPTIMIZER" not in raw:
        values["OPTIMIZER"], sources["OPTIMIZER"] = "muon", "USE_MUON"
    for a, b in SAME_DIR:  # one directory, two keys: the one that was set names it for both
        if (a in raw) != (b in raw):
            given, other = (a, b) if a in raw else (b, a)
            values[other], sources[other] = values[given], f"follows {given}"
    _cross_check(values, sources)
    _export(values, sources)
    return Config(values, sources, overridden)


def _export(values: dict[str, Any], sources: dict[str, str]) -> None:
    """huggingface_hub, datasets and wandb read these from the process environment (huggingface_hub reads
    HF_HOME when it is imported: the project imports these libraries only inside functions, after this)."""
    for s in SETTINGS:
        if not s.env or sources.get(s.key) == "environment":
            continue
        value = str(values[s.key]) if values[s.key] else ""
        if value:
            if "\x00" in value:
                raise UserError(f"{s.key} ({sources[s.key]}) contains a NUL character, which no environment "
                                "variable can hold: fix the value")
            os.environ[s.key] = _EXPORTED[s.key] = value
        elif s.key in _EXPORTED:  # unset now, exported by an earlier load_config of this process: withdraw it
            if os.environ.get(s.key) == _EXPORTED.pop(s.key):
                del os.environ[s.key]


def export_library_settings(env_file: str | None = None) -> None:
    """For a CLI that reads no other setting (generate.py): HF_HOME, HF_TOKEN and WANDB_API_KEY from the env
    file (./.env when present) into the process environment, with load_config's precedence (the user's
    environment wins) and `${VAR}` expansion. The file's other keys are neither checked nor warned about."""
    if env_file is None and Path(".env").is_file():
        env_file = ".env"
    if env_file is None:
        return
    environ = {k: v for k, v in os.environ.items() if _EXPORTED.get(k) != v}
    entries, _ = expand_variables(parse_env_file(env_file), environ)
    file_values = {ALIASES.get(k, k): (v, f"{env_file}:{n}") for k, v, n in entries}
    values, sources = {}, {}
    for s in SETTINGS:
        if not s.env:
            continue
        if s.key in environ:
            values[s.key], sources[s.key] = environ[s.key], "environment"
        else:
            values[s.key], sources[s.key] = file_values.get(s.key, (s.default, "default"))
    _export(values, sources)


def _put(raw: dict, key: str, value: str, where: str, warn_unknown: bool = True,
         unknown_is_error: bool = False) -> None:
    key = ALIASES.get(key, key)
    if key in RETIRED:
        print(f"note: {key} ({where}) is no longer a setting and is not read: {RETIRED[key]}; remove it",
              file=sys.stderr)
        return
    if key not in BY_KEY and unknown_is_error:
        hint = closest_key(key)
        raise UserError(f"unknown setting {key} ({where})" + (f"; did you mean {hint}?" if hint else "")
                        + " Fix the key (`python config.py show` lists every setting)")
    if key not in BY_KEY:
        if warn_unknown:
            _warn_unknown(key, where)
        return
    raw[key] = (value, where)


def _cross_check(v: dict[str, Any], src: dict[str, str]) -> None:
    def where(k: str) -> str:
        return src.get(k, "default")

    if v["DIM"] % v["N_HEADS"]:
        raise UserError(f"DIM={v['DIM']} ({where('DIM')}) is not divisible by N_HEADS={v['N_HEADS']} "
                        f"({where('N_HEADS')}): choose DIM a multiple of N_HEADS")
    llama = v["MODEL_FAMILY"] == "llama"
    if llama and v["N_HEADS"] % v["N_KV_HEADS"]:
        raise UserError(f"N_HEADS={v['N_HEADS']} is not divisible by N_KV_HEADS={v['N_KV_HEADS']} "
                        f"({where('N_KV_HEADS')}): N_KV_HEADS must divide N_HEADS")
    if llama and (v["DIM"] // v["N_HEADS"]) % 2:
        raise UserError(f"head size DIM/N_HEADS={v['DIM'] // v['N_HEADS']} is odd: RoPE needs an even head size")
    if llama and v["DROPOUT"]:
        raise UserError(f"DROPOUT={v['DROPOUT']} ({where('DROPOUT')}) with MODEL_FAMILY=llama: the Llama architecture "
                        "has no dropout; set DROPOUT=0 or MODEL_FAMILY=gpt2")
    if not llama and v["MOE_NUM_EXPERTS"]:
        raise UserError(f"MOE_NUM_EXPERTS={v['MOE_NUM_EXPERTS']} ({where('MOE_NUM_EXPERTS')}) with MODEL_FAMILY="
                        f"{v['MODEL_FAMILY']}: Mixture of Experts is part of the llama family only; set "
                        "MOE_NUM_EXPERTS=0")
    if v["MOE_NUM_EXPERTS"] and v["MOE_TOP_K"] > v["MOE_NUM_EXPERTS"]:
        raise UserError(f"MOE_TOP_K={v['MOE_TOP_K']} ({where('MOE_TOP_K')}) is above MOE_NUM_EXPERTS="
                        f"{v['MOE_NUM_EXPERTS']} ({where('MOE_NUM_EXPERTS')}): route to at most every expert")
    if v["MIN_LR"] > v["MAX_LR"]:
        raise UserError(f"MIN_LR={v['MIN_LR']} ({where('MIN_LR')}) is above MAX_LR={v['MAX_LR']}: "
                        "set MIN_LR <= MAX_LR")
    if len(v["ADAMW_BETAS"]) != 2 or not all(0 <= b < 1 for b in v["ADAMW_BETAS"]):
        raise UserError(f"ADAMW_BETAS={v['ADAMW_BETAS']} ({where('ADAMW_BETAS')}): expected two numbers in [0, 1)")
    if v["IS_MODEL_DISTILLATION"] and not (v["TEACHER_MODEL_CHECKPOINT"] or v["TEACHER_CACHE_PATH"]):
        raise UserError("IS_MODEL_DISTILLATION=true but TEACHER_MODEL_CHECKPOINT is empty: set the teacher "
                        "(any model source) or TEACHER_CACHE_PATH")
    if v["IS_MODEL_DISTILLATION"] and v["TRAINING_STAGE"] == "dpo":
        raise UserError("IS_MODEL_DISTILLATION=true with TRAINING_STAGE=dpo: distillation combines with "
                        "pretrain or instruct only")
    if v["TRAINING_STAGE"] == "dpo" and v["PREFERENCE_OBJECTIVE"] != "dpo" and v["DPO_REFERENCE_LOGPS_PATH"]:
        raise UserError(f"DPO_REFERENCE_LOGPS_PATH={v['DPO_REFERENCE_LOGPS_PATH']} ({where('DPO_REFERENCE_LOGPS_PATH')}) "
                        f"but PREFERENCE_OBJECTIVE={v['PREFERENCE_OBJECTIVE']} uses no reference model: unset "
                        "DPO_REFERENCE_LOGPS_PATH or set PREFERENCE_OBJECTIVE=dpo")
    if v["LORA_SAVE_PEFT_ADAPTER"] and not v["LORA_ENABLED"]:
        raise UserError(f"LORA_SAVE_PEFT_ADAPTER=true ({where('LORA_SAVE_PEFT_ADAPTER')}) but LORA_ENABLED=false: "
                        "there are no adapters to save; set LORA_ENABLED=true or drop LORA_SAVE_PEFT_ADAPTER")
    if v["FSDP_SHARD_GROUP_SIZE"] and not v["USE_FSDP"]:
        raise UserError(f"FSDP_SHARD_GROUP_SIZE={v['FSDP_SHARD_GROUP_SIZE']} ({where('FSDP_SHARD_GROUP_SIZE')}) but "
                        "USE_FSDP=false: HSDP is a way of sharding; set USE_FSDP=true or FSDP_SHARD_GROUP_SIZE=0")
    if v["FSDP_UNSHARDED_ACCUMULATION"] and not v["USE_FSDP"]:
        raise UserError(f"FSDP_UNSHARDED_ACCUMULATION=true ({where('FSDP_UNSHARDED_ACCUMULATION')}) but USE_FSDP=false: "
                        "it chooses how FSDP2 accumulates gradients (DDP always accumulates locally); set "
                        "USE_FSDP=true or remove it")
    if v["TRAINING_STAGE"] == "grpo":
        _check_grpo(v, where)
    allowed = {"wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"} if llama else {"c_attn", "c_proj", "c_fc"}
    bad = [t for t in v["LORA_TARGET_MODULES"] if t not in allowed]
    if bad and (llama or v["LORA_ENABLED"]):
        raise UserError(f"LORA_TARGET_MODULES has {bad} ({where('LORA_TARGET_MODULES')}): expected names from "
                        + " ".join(sorted(allowed)) + f" (MODEL_FAMILY={v['MODEL_FAMILY']})")


def _check_grpo(v: dict[str, Any], where: Callable[[str], str]) -> None:
    if v["GRPO_TEMPERATURE"] <= 0:
        raise UserError(f"GRPO_TEMPERATURE={v['GRPO_TEMPERATURE']} ({where('GRPO_TEMPERATURE')}) must be above 0: "
                        "GRPO samples its completions (1.0 samples the model's own distribution)")
    if v["GRPO_TOP_P"] <= 0:
        raise UserError(f"GRPO_TOP_P={v['GRPO_TOP_P']} ({where('GRPO_TOP_P')}) must be in (0, 1]; 1 = off")
    n_rewards = len([r for r in v["GRPO_REWARDS"].split(",") if r.strip()])
    if v["GRPO_REWARD_WEIGHTS"] and len(v["GRPO_REWARD_WEIGHTS"]) != n_rewards:
        raise UserError(f"GRPO_REWARD_WEIGHTS has {len(v['GRPO_REWARD_WEIGHTS'])} weights "
                        f"({where('GRPO_REWARD_WEIGHTS')}) for {n_rewards} GRPO_REWARDS: give one weight per reward "
                        "function, or none")
    mu, every = v["GRPO_NUM_ITERATIONS"], v["SAVE_EVERY_X_STEPS"]
    if mu > 1 and every % mu:
        raise UserError(f"SAVE_EVERY_X_STEPS={every} ({where('SAVE_EVERY_X_STEPS')}) is not a multiple of "
                        f"GRPO_NUM_ITERATIONS={mu}: checkpoints must fall between generation batches; make it one")
    if mu > 1 and v["MAX_STEPS"] > 0 and v["MAX_STEPS"] % mu:
        raise UserError(f"MAX_STEPS={v['MAX_STEPS']} ({where('MAX_STEPS')}) is not a multiple of GRPO_NUM_ITERATIONS="
                        f"{mu}: the last checkpoint must fall between generation batches; make it one")
    if v["IS_MODEL_DISTILLATION"]:
        raise UserError("IS_MODEL_DISTILLATION=true with TRAINING_STAGE=grpo: distillation combines with "
                        "pretrain or instruct only")
    if v["MOE_NUM_EXPERTS"]:
        raise UserError("TRAINING_STAGE=grpo does not train Mixture-of-Experts models yet (MOE_NUM_EXPERTS="
                        f"{v['MOE_NUM_EXPERTS']}): use a dense model")
    if v["USE_TORCH_COMPILE"]:
        raise UserError("TRAINING_STAGE=grpo does not run with USE_TORCH_COMPILE=true yet: set it to false")


# ---- command line ----------------------------------------------------------------------------------


def split_overrides(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Pull `KEY=VALUE` arguments (upper-case KEY) out of argv; return (overrides, the other args)."""
    overrides, rest = {}, []
    for a in argv:
        key, sep, value = a.partition("=")
        if sep and key and key.replace("_", "").isalnum() and key.isupper() and not a.startswith("-"):
            overrides[key] = value
        else:
            rest.append(a)
    return overrides, rest


def add_env_file_arg(parser) -> None:
    parser.add_argument("--env-file", default=None, help="settings file (default: ./.env when present)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override any setting")


def config_from_args(args) -> Config:
    """For argparse CLIs built with add_env_file_arg: args.env_file + args.overrides -> Config."""
    overrides, rest = split_overrides(list(getattr(args, "overrides", []) or []))
    if rest:
        raise UserError(f"unexpected argument {rest[0]!r}: settings are given as KEY=VALUE (e.g. MAX_STEPS=10)")
    return load_config(args.env_file, overrides)


def env_example() -> str:
    """The text of .env.example: every key, grouped, with its help and default."""
    out = ["# Every setting, grouped. Copy to .env and edit; KEY=VALUE on the command line overrides.",
           "# Generated by `python config.py example > .env.example` from settings_table.py.", ""]
    for group in GROUPS:
        out.append(f"# ---- {group} " + "-" * (60 - len(group)))
        for s in (s for s in SETTINGS if s.group == group):
            out.append(f"# {s.help}" + (f" [{' | '.join(map(str, s.choices))}]" if s.choices else ""))
            d = s.default
            text = "" if d is None else json.dumps(d) if isinstance(d, (list, dict)) else \
                str(d).lower() if isinstance(d, bool) else str(d)
            if isinstance(d, str) and (" " in d or not d):
                text = shlex.quote(d) if d else ""
            out.append(f"{s.key}={text}")
        out.append("")
    return "\n".join(out)


# The Python type of each kind's converted value (convert); `json` may also be None (an empty value).
_PY_TYPES = {"int": "int", "float": "float", "bool": "bool", "str": "str", "list": "list[str]",
             "floats": "list[float]", "json": "dict[str, Any]"}
_MAY_BE_NONE = {"json"}


def section_class(group: str) -> str:
    """`training` -> `TrainingSettings`: the class config_sections.py defines for a group."""
    return group.capitalize() + "Settings"


def sections_module() -> str:
    """The text of config_sections.py: a dataclass per settings group, an attribute per setting (its key in
    lower case, typed from its kind), and `Sections`, the groups as Config's typed attributes."""
    out = ['"""Typed settings groups: one dataclass per group of settings_table.py, one attribute per setting',
           "(its key in lower case). `config.Config` exposes each group as an instance (`cfg.training` is a",
           "`TrainingSettings`), so a type checker sees `cfg.training.max_lr` as a float.",
           "",
           "Generated by `python config.py sections > config_sections.py` from settings_table.py: edit the table",
           'and regenerate; tests/test_config.py fails when this file is not current."""',
           "", "from __future__ import annotations", "", "from dataclasses import dataclass, field",
           "from typing import Any", ""]
    for group in GROUPS:
        out += ["", "@dataclass", f"class {section_class(group)}:"]
        for s in (s for s in SETTINGS if s.group == group):
            kind = _PY_TYPES[s.kind] + (" | None" if s.kind in _MAY_BE_NONE or s.default is None else "")
            hidden = " = field(repr=False)" if is_secret(s.key) else ""
            out.append(f"    {s.key.lower()}: {kind}{hidden}")
        out.append("")
    out += ["", "class Sections:", '    """The groups of settings, as attributes of `config.Config`."""', ""]
    out += [f"    {group}: {section_class(group)}" for group in GROUPS]
    out += ["", "", "SECTIONS: dict[str, type] = {"]
    out += [f'    "{group}": {section_class(group)},' for group in GROUPS]
    out += ["}", ""]
    return "\n".join(out)


def _main() -> int:
    import argparse

    # KEY=VALUE may stand anywhere (e.g. after --env-file F), as in the other CLIs: pulled out before argparse
    overrides, rest = split_overrides(sys.argv[1:])
    p = argparse.ArgumentParser(description="Show resolved settings, write .env.example or config_sections.py",
                                usage="%(prog)s {show,example,sections} [--env-file F] [KEY=VALUE ...]")
    p.add_argument("command", choices=["show", "example", "sections"], help="show: print resolved settings; "
                   "example: print .env.example; sections: print config_sections.py")
    p.add_argument("--env-file", default=None, help="settings file (default: ./.env when present)")
    a = p.parse_args(rest)
    if a.command == "example":
        print(env_example())
        return 0
    if a.command == "sections":
        sys.stdout.write(sections_module())
        return 0
    print(load_config(a.env_file, overrides).summary())
    return 0


if __name__ == "__main__":
    run_cli(_main)
