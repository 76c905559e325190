import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import config
from errors import UserError
from settings_table import BY_KEY, PRESETS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_env(monkeypatch, tmp_path):
    # settings must not leak in from the machine's environment or a stray ./.env
    for k in BY_KEY:
        monkeypatch.delenv(k, raising=False)
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


def test_typo_warns_with_closest_key(capsys):
    config.load_config(None, {"MAX_LRR": "1"})
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


def test_config_show_takes_overrides_after_env_file(tmp_path):
    env = tmp_path / "x.env"
    env.write_text("MAX_STEPS=5\n")
    r = subprocess.run([sys.executable, str(ROOT / "config.py"), "show", "--env-file", str(env), "MAX_STEPS=7",
                        "SEED=3"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert re.search(r"MAX_STEPS\s+= 7\s+\(command line\)", r.stdout) and re.search(r"SEED\s+= 3", r.stdout)
