import json
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

import config
import config_sections
from errors import UserError
from settings_table import BY_KEY, GROUPS, PRESETS, SETTINGS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_env(monkeypatch, tmp_path):
    # settings must not leak in from the machine's environment or a stray ./.env
    for k in BY_KEY:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(config, "_EXPORTED", {})  # what one test's load_config exported stays in that test
    monkeypatch.chdir(tmp_path)


def test_precedence_default_preset_file_override(tmp_path):
    env = tmp_path / "x.env"
    env.write_text("MODEL_PRESET=debug\nN_LAYERS=3\nexport MAX_LR=1e-3  # peak\nSYSTEM_PROMPT='Be brief # ok'\n")
    cfg = config.load_config(str(env), {"MAX_LR": "2e-3"})
    assert cfg.model.dim == PRESETS["debug"]["DIM"]  # from the preset
    assert cfg.model.n_layers == 3  # file beats preset
    assert cfg.training.max_lr == 2e-3 and cfg["MAX_LR"] == 2e-3  # command line beats file
    assert cfg.tokenizer.system_prompt == "Be brief # ok"  # quoted value keeps its '#'
    assert cfg.training.weight_decay == BY_KEY["WEIGHT_DECAY"].default
    assert cfg.source("N_LAYERS").endswith("x.env:2")


def test_dotenv_in_cwd_is_read_when_no_file_given(tmp_path):
    (tmp_path / ".env").write_text("SEED=7\n")
    assert config.load_config().training.seed == 7


def test_types_lists_and_json():
    cfg = config.load_config(None, {"LORA_TARGET_MODULES": "['wq','wv']", "ADAMW_BETAS": "[0.8, 0.99]",
                                    "ROPE_SCALING": '{"factor": 8}', "USE_FSDP": "yes", "SHARD_SIZE": "1_000_000"})
    assert cfg.lora.lora_target_modules == ["wq", "wv"]
    assert cfg.training.adamw_betas == [0.8, 0.99]
    assert cfg.model.rope_scaling == {"factor": 8}
    assert cfg.system.use_fsdp is True
    assert cfg.data.shard_size == 1_000_000
    assert config.load_config(None, {"LORA_TARGET_MODULES": "wq, w2"}).lora.lora_target_modules == ["wq", "w2"]


def test_typo_in_a_file_warns_with_closest_key(tmp_path, capsys):
    (tmp_path / "x.env").write_text("MAX_LRR=1\n")
    config.load_config(str(tmp_path / "x.env"))
    err = capsys.readouterr().err
    assert "MAX_LRR" in err and "did you mean MAX_LR" in err


@pytest.mark.parametrize("key,value,expect", [
    ("MAX_LR", "fast", "expected a number"),
    ("MAX_STEPS", "1.5", "expected an integer"),
    ("USE_FSDP", "maybe", "true or false"),
    ("TRAINING_STAGE", "rlhf", "one of pretrain, instruct, dpo"),
    ("DISTILLATION_ALPHA", "1.5", "<= 1"),
    ("N_LAYERS", "0", ">= 1"),
    ("ROPE_SCALING", "[1]", "JSON object"),
    ("MODEL_PRESET", "huge", "expected one of"),
])
def test_bad_values_name_key_value_and_expectation(key, value, expect):
    with pytest.raises(UserError) as e:
        config.load_config(None, {key: value})
    msg = str(e.value)
    assert key in msg and value in msg and expect in msg and "\n" not in msg


def test_cross_checks():
    with pytest.raises(UserError, match="N_KV_HEADS"):
        config.load_config(None, {"MODEL_PRESET": "debug", "N_KV_HEADS": "3"})
    with pytest.raises(UserError, match="MIN_LR"):
        config.load_config(None, {"MIN_LR": "1", "MAX_LR": "0.1"})


def test_malformed_env_file_line(tmp_path):
    env = tmp_path / "bad.env"
    env.write_text("SEED=1\nthis is not a setting\n")
    with pytest.raises(UserError, match=r"bad.env:2"):
        config.load_config(str(env))


def test_presets_build_models_of_expected_size():
    import torch

    from model import Transformer

    args = config.load_config(None, {"MODEL_PRESET": "debug"}).model_args(vocab_size=8448)
    n = sum(p.numel() for p in Transformer(args).parameters())
    assert 0.5e6 < n < 2e6, n
    # the Llama 3.1 8B shape gives Meta's published sizes (hidden 14336, ~8.03B parameters)
    big = config.load_config(None, {"MODEL_PRESET": "llama3.1-8b"}).model_args()
    assert big.hidden_dim == 14336 and big.vocab_size == 128256
    with torch.device("meta"):
        n8 = sum(p.numel() for p in Transformer(big).parameters())
    assert abs(n8 - 8.03e9) / 8.03e9 < 0.01, n8
    small = config.load_config(None, {"MODEL_PRESET": "llama3.2-1b"}).model_args()
    assert small.hidden_dim == 8192 and small.tie_embeddings


def test_cli_bad_value_exits_2_one_line_no_traceback():
    r = subprocess.run([sys.executable, "config.py", "show", "MAX_LR=abc"], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr and "MAX_LR" in r.stderr


def test_env_example_lists_every_key_and_is_current():
    text = (ROOT / ".env.example").read_text()
    assert text.strip() == config.env_example().strip(), "regenerate: python config.py example > .env.example"
    for key in BY_KEY:
        assert f"\n{key}=" in text


def test_config_sections_module_is_current():
    text = (ROOT / "config_sections.py").read_text()
    assert text == config.sections_module(), "regenerate: python config.py sections > config_sections.py"


def test_config_sections_cli_prints_the_module():
    r = subprocess.run([sys.executable, "config.py", "sections"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout == config.sections_module()


def _conforms(value, hint) -> bool:
    """`value` is of the annotated type: exactly int / float / bool / str (a bool is no int here), a list of
    such items, a dict, or None where the annotation allows it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is list:
        return type(value) is list and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return type(value) is dict
    if hint is type(None):
        return value is None
    return type(value) is hint


@pytest.mark.parametrize("overrides", [{}, {"ROPE_SCALING": '{"factor": 8}', "FFN_DIM_MULTIPLIER": "2"},
                                       *({"MODEL_PRESET": name} for name in PRESETS)])
def test_each_group_is_its_typed_section_and_every_value_has_the_declared_type(overrides):
    cfg = config.load_config(None, overrides)
    for group in GROUPS:
        section = getattr(cfg, group)
        cls = config_sections.SECTIONS[group]
        assert type(section) is cls and cls.__name__ == config.section_class(group)
        hints = typing.get_type_hints(cls)
        assert set(hints) == {s.key.lower() for s in SETTINGS if s.group == group}
        for name, hint in hints.items():
            value = getattr(section, name)
            assert value == cfg[name.upper()]
            assert _conforms(value, hint), f"{group}.{name} = {value!r} is not a {hint}"
    assert typing.get_type_hints(config_sections.Sections) == {
        g: config_sections.SECTIONS[g] for g in GROUPS}


def test_section_types_follow_the_kinds():
    hints = typing.get_type_hints(config_sections.TrainingSettings)
    assert hints["max_lr"] is float and hints["max_steps"] is int and hints["adamw_use_fused"] is bool
    assert hints["adamw_betas"] == list[float] and hints["optimizer"] is str
    assert typing.get_type_hints(config_sections.LoraSettings)["lora_target_modules"] == list[str]
    assert typing.get_type_hints(config_sections.ModelSettings)["rope_scaling"] == dict[str, typing.Any] | None
    assert "hf_x" not in repr(config_sections.SecretsSettings(wandb_api_key="k", hf_token="hf_x"))


def test_importing_reads_no_env(tmp_path):
    (tmp_path / ".env").write_text("this line would fail to parse\n")
    r = subprocess.run([sys.executable, "-c", "import config, model"], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr


def test_retired_seed_keys_load_with_a_note_and_are_not_settings(tmp_path, capsys):
    env = tmp_path / "seed.env"
    env.write_text("HUGGINGFACE_TOKENIZER=true\nIGNORE_INDEX=-1\nMAX_STEPS=3\n")
    cfg = config.load_config(str(env), use_environ=False)
    err = capsys.readouterr().err
    assert cfg["MAX_STEPS"] == 3 and "HUGGINGFACE_TOKENIZER" not in BY_KEY and "IGNORE_INDEX" not in BY_KEY
    for key, why in (("HUGGINGFACE_TOKENIZER", "detected from TOKENIZER_CHECKPOINT_PATH"), ("IGNORE_INDEX", "-100")):
        line = next(ln for ln in err.splitlines() if key in ln)
        assert f"{env}:" in line and "not read" in line and why in line and "unknown" not in line


def test_library_environment_settings_are_exported_when_set(tmp_path, monkeypatch):
    for k in ("HF_HOME", "HF_TOKEN", "WANDB_API_KEY"):  # set then deleted: monkeypatch restores them after
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    config.load_config(None, {"HF_TOKEN": "hf_x", "WANDB_API_KEY": "wk"}, use_environ=False)
    assert os.environ["HF_TOKEN"] == "hf_x" and os.environ["WANDB_API_KEY"] == "wk"
    assert "HF_HOME" not in os.environ  # unset: the library keeps its own default
    config.load_config(None, {"HF_HOME": str(tmp_path / "hf")}, use_environ=False)
    assert os.environ["HF_HOME"] == str(tmp_path / "hf")


@pytest.mark.parametrize("stage", ["PRETRAIN", "INSTRUCT", "DPO"])
def test_one_data_dir_key_names_it_for_preparation_and_training(tmp_path, stage):
    prep, load = f"HF_{stage}_DATASET_TARGET_PATH", f"{stage}_DATALOADER_ROOT_PATH"
    cfg = config.load_config(None, {prep: "d/prepared"}, use_environ=False)
    assert cfg[load] == "d/prepared" and cfg.source(load) == f"follows {prep}"
    cfg = config.load_config(None, {load: "d/read"}, use_environ=False)
    assert cfg[prep] == "d/read"
    cfg = config.load_config(None, {prep: "a", load: "b"}, use_environ=False)  # both set: each its own
    assert (cfg[prep], cfg[load]) == ("a", "b")


def test_debug_env_prepares_where_it_trains():
    cfg = config.load_config(str(ROOT / "configs" / "debug.env"), use_environ=False)
    assert cfg["HF_PRETRAIN_DATASET_TARGET_PATH"] == cfg["PRETRAIN_DATALOADER_ROOT_PATH"] == "data/debug/pretrain"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.env")))
def test_shipped_configs_load_and_fit_their_batch(name, capsys):
    cfg = config.load_config(str(ROOT / "configs" / name), use_environ=False)
    assert "unknown setting" not in capsys.readouterr().err  # every key in the file is a setting
    t = cfg.training
    per_step = cfg.model.max_seq_len * t.max_batch_size  # a micro-step of one rank
    assert t.total_batch_size % per_step == 0, (name, t.total_batch_size, per_step)


@pytest.mark.parametrize("name,preset,gpus,fits_gb,unsharded_fits", [
    ("gpu-1b-fsdp.env", "1b", 8, 40, True), ("gpu-8b-fsdp.env", "llama3.1-8b", 8, 40, False),
    ("gpu-70b-fsdp.env", "llama3.1-70b", 64, 80, False)])
def test_scale_out_configs_fit_their_gpus(name, preset, gpus, fits_gb, unsharded_fits):
    """The 1B / 8B / 70B configs shard with FSDP2 and, by the memory plan at their own batch geometry (micro-batch,
    sequence length and the gradient accumulation training derives on `gpus` GPUs), fit `fits_gb` GPUs with
    the default sharded accumulation; unsharded accumulation (a full fp32 gradient copy per GPU) would not for
    8B and 70B (the 1B copy, 5.6 GiB, still fits)."""
    import memory_plan

    cfg = config.load_config(str(ROOT / "configs" / name), use_environ=False)
    assert cfg["MODEL_PRESET"] == preset and cfg.system.use_fsdp and cfg.system.activation_checkpointing
    assert not cfg.system.fsdp_unsharded_accumulation
    accum = cfg.batch_geometry(gpus)[1]
    assert accum > 1  # the plan below covers accumulation, not one micro-batch
    job = (cfg.model_args(128256), gpus, "bf16", cfg.training.optimizer, True, cfg.training.max_batch_size,
           cfg.model.max_seq_len, accum)
    assert memory_plan.plan(*job).fits(fits_gb)
    assert memory_plan.plan(*job, unsharded_accumulation=True).fits(fits_gb) == unsharded_fits


def test_config_show_takes_overrides_after_env_file(tmp_path):
    env = tmp_path / "x.env"
    env.write_text("MAX_STEPS=5\n")
    r = subprocess.run([sys.executable, str(ROOT / "config.py"), "show", "--env-file", str(env), "MAX_STEPS=7",
                        "SEED=3"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert re.search(r"MAX_STEPS\s+= 7\s+\(command line\)", r.stdout) and re.search(r"SEED\s+= 3", r.stdout)


# ---- precedence, ${VAR} expansion, secrets -------------------------------------------------------------


def test_each_level_beats_the_one_below(tmp_path, monkeypatch):
    """default < MODEL_PRESET < env file < environment < KEY=VALUE, on one key (N_LAYERS)."""
    default, preset = BY_KEY["N_LAYERS"].default, PRESETS["debug"]["N_LAYERS"]
    assert len({default, preset, 5, 6, 7}) == 5  # five distinct values, so each step is visible
    env = tmp_path / "x.env"
    env.write_text("SEED=1\n")
    assert config.load_config(str(env))["N_LAYERS"] == default
    env.write_text("MODEL_PRESET=debug\n")
    cfg = config.load_config(str(env))
    assert (cfg["N_LAYERS"], cfg.source("N_LAYERS")) == (preset, "preset debug")
    env.write_text("MODEL_PRESET=debug\nN_LAYERS=5\n")
    cfg = config.load_config(str(env))
    assert (cfg["N_LAYERS"], cfg.source("N_LAYERS")) == (5, f"{env}:2")
    monkeypatch.setenv("N_LAYERS", "6")
    cfg = config.load_config(str(env))
    assert (cfg["N_LAYERS"], cfg.source("N_LAYERS")) == (6, "environment")
    assert cfg.environment_overrides() == {"N_LAYERS": f"{env}:2"}
    cfg = config.load_config(str(env), {"N_LAYERS": "7"})
    assert (cfg["N_LAYERS"], cfg.source("N_LAYERS")) == (7, "command line")
    assert cfg.environment_overrides() == {}  # the environment's value lost: nothing to report
    monkeypatch.setenv("N_LAYERS", " 5")  # the file's value (e.g. a shell that sourced the file): not reported
    assert config.load_config(str(env)).environment_overrides() == {}
    # the environment over the preset alone, and over the file's choice of preset
    env.write_text("MODEL_PRESET=debug\n")
    assert config.load_config(str(env)).environment_overrides() == {"N_LAYERS": "preset debug"}
    monkeypatch.setenv("MODEL_PRESET", "tiny")
    cfg = config.load_config(str(env))
    assert cfg["MODEL_PRESET"] == "tiny" and cfg["DIM"] == PRESETS["tiny"]["DIM"]
    assert cfg.environment_overrides() == {"MODEL_PRESET": f"{env}:1", "N_LAYERS": "preset tiny"}


def test_summary_and_show_name_what_the_environment_overrode(tmp_path, monkeypatch):
    env = tmp_path / "x.env"
    env.write_text("MAX_STEPS=5\nSEED=3\n")
    monkeypatch.setenv("MAX_STEPS", "9")
    summary = config.load_config(str(env)).summary()
    assert re.search(r"MAX_STEPS\s+= 9\s+\(environment, over .*x\.env:1\)$", summary, re.M)
    assert re.search(r"SEED\s+= 3\s+\(.*x\.env:2\)$", summary, re.M)
    assert summary.splitlines()[-1] == f"the environment overrode: MAX_STEPS (over {env}:1)"
    r = subprocess.run([sys.executable, str(ROOT / "config.py"), "show", "--env-file", str(env)], cwd=tmp_path,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert f"the environment overrode: MAX_STEPS (over {env}:1)" in r.stdout


def test_variables_expand_from_earlier_lines_and_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROJECT_USER", "alice")  # not a setting: any environment variable can be used
    for k in ("NOT_DEFINED_ANYWHERE", "RUN_ROOT"):
        monkeypatch.delenv(k, raising=False)
    env = tmp_path / "x.env"
    env.write_text("DATA=/data/${PROJECT_USER}\n"                       # helper variable, not a setting
                   "PRETRAIN_DATALOADER_ROOT_PATH=${DATA}/pretrain\n"    # a line above
                   'RUN_DIR="${RUN_ROOT:-/tmp/runs}/one"\n'              # default
                   "WANDB_RUN_NAME=${NOT_DEFINED_ANYWHERE}x\n"           # undefined: empty, as python-dotenv
                   "SYSTEM_PROMPT='costs $5, ${DATA}'\n")                # $VAR stays; single quotes expand too
    cfg = config.load_config(str(env))
    assert cfg["PRETRAIN_DATALOADER_ROOT_PATH"] == "/data/alice/pretrain"
    assert cfg["RUN_DIR"] == "/tmp/runs/one" and cfg["WANDB_RUN_NAME"] == "x"
    assert cfg["SYSTEM_PROMPT"] == "costs $5, /data/alice"
    assert "unknown setting" not in capsys.readouterr().err  # DATA, used as ${DATA}, is a helper variable
    # the environment wins over the file in lookups too, as it does as a source
    env.write_text("SEED=1\nWANDB_RUN_NAME=seed-${SEED}\n")
    monkeypatch.setenv("SEED", "5")
    cfg = config.load_config(str(env))
    assert (cfg["SEED"], cfg["WANDB_RUN_NAME"]) == (5, "seed-5")
    # environment values and KEY=VALUE are taken literally (the shell expands those)
    monkeypatch.setenv("WANDB_PROJECT_NAME", "${SEED}")
    assert config.load_config(str(env), {"RUN_DIR": "${SEED}"})["RUN_DIR"] == "${SEED}"
    assert config.load_config(str(env))["WANDB_PROJECT_NAME"] == "${SEED}"


def test_expansion_equals_python_dotenv_load_dotenv(tmp_path):
    lines = ["A=one", "B=${A}-two", 'C="${FROM_ENV}/x"', "D='${A} in single quotes'", "E=${UNDEFINED}",
             "F=${UNDEFINED:-fallback}", "G=$A", "H=${A}${B}", "SEED=1", "I=seed-${SEED}", "export J=${A} # note",
             "K=${FROM_ENV:-unused}"]
    env = tmp_path / "x.env"
    env.write_text("\n".join(lines) + "\n")
    environ = {"FROM_ENV": "env", "SEED": "5"}
    keys = [ln.removeprefix("export ").split("=")[0] for ln in lines]
    code = ("import dotenv, json, os, sys; dotenv.load_dotenv(sys.argv[1]); "
            "print(json.dumps({k: os.environ.get(k) for k in sys.argv[2:]}))")
    r = subprocess.run([sys.executable, "-c", code, str(env), *keys], capture_output=True, text=True,
                       env={"PATH": os.environ.get("PATH", ""), **environ})
    assert r.returncode == 0, r.stderr
    theirs = json.loads(r.stdout)
    expanded, referenced = config.expand_variables(config.parse_env_file(env), environ)
    ours = {k: v for k, v, _ in expanded}
    assert theirs.pop("SEED") == "5" and ours.pop("SEED") == "1"  # load_dotenv leaves a set variable alone
    assert ours == {k: theirs[k] for k in ours}
    assert ours["B"] == "one-two" and ours["E"] == "" and ours["G"] == "$A" and ours["I"] == "seed-5"
    assert referenced == {"A", "B", "FROM_ENV", "UNDEFINED", "SEED"}


def test_secret_names():
    from settings_table import is_secret

    for k in ("HF_TOKEN", "WANDB_API_KEY", "DB_PASSWORD", "MY_SECRET", "OPENAI_APIKEY", "GH_ACCESSTOKEN"):
        assert is_secret(k), k
    for k in ("TOKENIZER_CHECKPOINT_PATH", "MAX_STEPS", "SYSTEM_PROMPT", "MAX_TOKENS"):
        assert not is_secret(k), k
    assert {k for k in BY_KEY if is_secret(k)} == {"HF_TOKEN", "WANDB_API_KEY"}


def test_secrets_are_masked_in_show_and_in_errors(tmp_path, monkeypatch):
    env = tmp_path / "x.env"
    env.write_text("HF_TOKEN=hf_filesecret\nMAX_STEPS=5\n")
    cmd = [sys.executable, str(ROOT / "config.py"), "show", "--env-file", str(env)]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_API_KEY": "wk_envsecret"})
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "hf_filesecret" not in out and "wk_envsecret" not in out
    assert re.search(r"HF_TOKEN\s+= \*\*\*\s+\(.*x\.env:1\)", out)
    assert re.search(r"WANDB_API_KEY\s+= \*\*\*\s+\(environment\)", out)
    # the environment overriding a secret is named, its values are not
    monkeypatch.setenv("HF_TOKEN", "hf_envsecret")
    summary = config.load_config(str(env)).summary()
    assert "hf_envsecret" not in summary and "hf_filesecret" not in summary and re.search(r"HF_TOKEN\s+= \*\*\*\s+\(environment, over .*x\.env:1\)", summary)
    assert "HF_TOKEN" not in config.load_config(str(env)).to_dict()
    # a malformed or badly quoted line never echoes a secret
    for text in ("HF_TOKEN hf_linesecret\n", 'HF_TOKEN="hf_linesecret\n', 'HF_TOKEN="hf_a"hf_linesecret\n',
                 "MY_PASSWORD 'hf_linesecret'\n"):
        env.write_text(text)
        with pytest.raises(UserError) as e:
            config.parse_env_file(env)
        assert "linesecret" not in str(e.value) and f"{env}:1" in str(e.value), str(e.value)


def test_library_variables_take_the_file_unless_the_environment_has_them(tmp_path, monkeypatch):
    for k in ("HF_HOME", "HF_TOKEN", "WANDB_API_KEY"):
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    a, b = tmp_path / "a.env", tmp_path / "b.env"
    a.write_text("HF_TOKEN=hf_from_a\nHF_HOME=/cache/a\n")
    b.write_text("HF_TOKEN=hf_from_b\n")
    config.load_config(str(a))
    assert (os.environ["HF_TOKEN"], os.environ["HF_HOME"]) == ("hf_from_a", "/cache/a")
    # a later load in the same process: what the first one exported is not the user's environment
    cfg = config.load_config(str(b))
    assert cfg["HF_TOKEN"] == "hf_from_b" and cfg.source("HF_TOKEN") == f"{b}:1"
    assert os.environ["HF_TOKEN"] == "hf_from_b" and "HF_HOME" not in os.environ  # withdrawn: b sets no cache
    # the user's own environment wins over the file and is left as it is
    monkeypatch.setenv("HF_TOKEN", "hf_user")
    cfg = config.load_config(str(a))
    assert cfg["HF_TOKEN"] == "hf_user" and cfg.source("HF_TOKEN") == "environment"
    assert os.environ["HF_TOKEN"] == "hf_user" and os.environ["HF_HOME"] == "/cache/a"


def test_a_data_cli_hands_the_files_credentials_to_the_hub_call(tmp_path, monkeypatch):
    import datasets

    import load_pretrain_dataset

    for k in ("HF_HOME", "HF_TOKEN"):
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    env = tmp_path / "x.env"
    env.write_text(f"HF_TOKEN=hf_prep\nHF_HOME={tmp_path}/hf\nTOKENIZER_CHECKPOINT_PATH={ROOT / 'tokenizer.model'}\n")
    seen: dict[str, str | None] = {}

    def load_dataset(*args, **kw):
        seen.update({k: os.environ.get(k) for k in ("HF_TOKEN", "HF_HOME")})
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(UserError, match="could not stream"):
        load_pretrain_dataset.main(["--env-file", str(env), "--dataset", "some-org/some-data", "--out",
                                    str(tmp_path / "out"), "--no-progress"])
    assert seen == {"HF_TOKEN": "hf_prep", "HF_HOME": f"{tmp_path}/hf"}


def test_hub_and_wandb_libraries_are_imported_only_inside_functions():
    """huggingface_hub reads HF_HOME when it is imported: a module-level import in any project module would
    fix the cache before load_config exports the settings file's HF_HOME."""
    import ast

    libraries = {"huggingface_hub", "datasets", "transformers", "peft", "wandb", "accelerate"}
    found = []
    for path in sorted(ROOT.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                for child in ast.walk(node):
                    child._in_function = True  # type: ignore[attr-defined]
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "_in_function", False):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in libraries]
    assert not found, found


# ---- quoting as python-dotenv, unknown keys on the command line ------------------------------------------


def test_quoting_equals_python_dotenv(tmp_path):
    """Each line parsed alone by parse_env_file and by python-dotenv (the reference) gives the same value:
    unicode kept, \\n \\t \\" \\\\ decoded in double quotes only, single quotes literal but for \\' and \\\\,
    `export`, inline comments after whitespace, empty values."""
    from dotenv import dotenv_values

    lines = ['A="café\\nx"', 'B="a \\"b\\" c"', 'C="tab\\there"', 'D="back\\\\slash"', "E='single \\n literal'",
             "export F=plain value # comment", "G=", 'H=""', "I=''", 'J="quoted" # comment', "K=naïve ünïcode",
             'L="\\u00e9 stays"', "M=a\\tb", "N=value\t# after a tab", "O=#not a comment", 'P="a#b"',
             "Q='with \"double\" inside'", 'R="with \'single\' inside"', "S=  spaced  ", "T='it\\'s'",
             'U="x\\q"', 'V="日本語 ✓"', "W='a\\\\b'", 'X="end\\\\"']
    env = tmp_path / "q.env"
    env.write_text("\n".join(lines) + "\n", encoding="utf-8")
    theirs = dotenv_values(env, interpolate=False, encoding="utf-8")
    ours = {k: v for k, v, _ in config.parse_env_file(env)}
    assert ours == dict(theirs)
    assert ours["A"] == "café\nx" and ours["B"] == 'a "b" c' and ours["L"] == "\\u00e9 stays"


def test_unknown_key_on_the_command_line_stops_with_the_suggestion(tmp_path, capsys):
    """A typed KEY=VALUE is a request: an unknown one is an error naming the closest key. A file may keep
    helper keys (a warning), and a retired key on the command line keeps its note."""
    with pytest.raises(UserError) as e:
        config.load_config(None, {"MAX_STPES": "10"}, use_environ=False)
    msg = str(e.value)
    assert "MAX_STPES" in msg and "command line" in msg and "did you mean MAX_STEPS?" in msg and "\n" not in msg
    env = tmp_path / "x.env"
    env.write_text("MAX_STPES=10\n")
    assert config.load_config(str(env), use_environ=False)["MAX_STEPS"] == BY_KEY["MAX_STEPS"].default
    assert "did you mean MAX_STEPS?" in capsys.readouterr().err


@pytest.mark.parametrize("script,args", [("train.py", []), ("config.py", ["show"]),
                                         ("load_pretrain_dataset.py", []),
                                         ("objectives.py", ["cache-teacher", "--teacher", "t", "--data", "d",
                                                            "--out", "o"])])
def test_every_cli_refuses_an_unknown_command_line_key(tmp_path, script, args):
    (tmp_path / "demo.env").write_text("MODEL_PRESET=debug\n")
    r = subprocess.run([sys.executable, str(ROOT / script), *args, "--env-file", "demo.env", "MAX_STPES=10"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "MAX_STPES" in last and "did you mean MAX_STEPS?" in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.env"]  # nothing written
