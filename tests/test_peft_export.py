"""PEFT adapters from the CLI and from training: `model_utils.py export --format peft` (the README's commands,
run as written) and LORA_SAVE_PEFT_ADAPTER's `<step dir>/peft_adapter/`, loaded by peft's PeftModel on
transformers' Llama from the exported base, give our logits; every mistake is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    ROOT,
    make_parent,
    run_inprocess,
    shift_model_weights,
    subprocess_env,
    tiny_model,
    torchrun,
)
from safetensors.torch import load_file, save_file

import checkpoint as ckpt
import config
import lora
import model_utils
from errors import UserError, run_cli
from model import ModelArgs, Transformer

TOKENS = torch.randint(0, 8448, (2, 16), generator=torch.Generator().manual_seed(5))
TARGETS = "wq,wk,wv,wo,w1,w2,w3,output"
HF_ID = "meta-llama/Llama-3.2-1B-Instruct"  # the README's --base-id example: named, never fetched


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, pretrain_data) -> dict:
    """A base checkpoint of ours and a 3-step LoRA run on it that writes the PEFT adapter at steps 2 and 3."""
    tmp = tmp_path_factory.mktemp("peft")
    parent = make_parent(tmp / "parent")
    run_inprocess(tmp / "lora", pretrain_data, INIT_FROM=str(parent), LORA_ENABLED="true",
                  LORA_SAVE_PEFT_ADAPTER="true", LORA_TARGET_MODULES=TARGETS, MAX_STEPS=3, MAX_LR=1e-2,
                  VALIDATE_EVERY_X_STEPS=0, SAVE_EVERY_X_STEPS=2, MAX_NUMBER_CHECKPOINTS=5)
    root = tmp / "lora" / "ck" / "pretrain"
    return {"parent": parent, "root": root, "step": root / ckpt.step_name(3)}


def our_logits(step: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(adapted, base) logits of a LoRA checkpoint, its adapters unmerged as in training."""
    model, _ = model_utils.load_model(step, merge_lora=False)
    assert len(list(lora.lora_modules(model))) == 2 * 7 + 1
    with torch.no_grad():
        adapted = model(TOKENS)
        with lora.disable_lora(model):
            base = model(TOKENS)
    assert (adapted - base).abs().max() > 1e-3  # the adapter matters: agreement below is informative
    return adapted, base


def peft_logits(base_dir: Path, adapter_dir: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(hf, adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def readme_peft_section() -> tuple[list[str], str]:
    """The shell commands and the Python block of the README's PEFT section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n### PEFT adapters\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    bash = re.findall(r"```bash\n(.*?)```", section, re.S)
    py = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(bash) == 1 and len(py) == 1, "the README's PEFT section has one bash and one python block"
    commands = [line for line in bash[0].splitlines() if line.strip() and not line.startswith("#")]
    return commands, py[0]


def test_readme_commands_export_an_adapter_that_peft_loads_with_our_logits(lora_run, tmp_path, monkeypatch):
    commands, snippet = readme_peft_section()
    assert len(commands) == 2 and all(c.startswith("python model_utils.py export --format peft") for c in commands)
    shutil.copytree(lora_run["root"], tmp_path / "checkpoints" / "instruct")  # the README's path to a LoRA run
    for command in commands:
        argv = command.split()
        argv = [sys.executable, str(ROOT / argv[1]), *argv[2:]]
        r = subprocess.run(argv, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "exported the LoRA adapter" in r.stdout

    adapted, _ = our_logits(lora_run["step"])
    out = tmp_path / "my-adapter"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "base"]
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str((out / "base").resolve())
    spec = ckpt.read_json(lora_run["step"] / ckpt.CONFIG_FILE)["lora"]
    assert (conf["r"], conf["lora_alpha"]) == (spec["rank"], spec["alpha"])
    # the README's Python block, run as written from the directory the commands ran in
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(snippet, namespace)
    with torch.no_grad():
        theirs = namespace["model"](input_ids=TOKENS).logits
    torch.testing.assert_close(theirs, adapted, rtol=0, atol=1e-4)
    # AutoPeftModel finds the base through base_model_name_or_path alone
    from peft import AutoPeftModelForCausalLM

    auto = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(auto(input_ids=TOKENS).logits, adapted, rtol=0, atol=1e-4)

    # --base-id: the same adapter, the base named (a hub id is not fetched), not exported
    named = tmp_path / "my-adapter-hub"
    assert sorted(p.name for p in named.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((named / "adapter_config.json").read_text())["base_model_name_or_path"] == HF_ID
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(named / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_writes_the_peft_adapter_at_each_save(lora_run, tmp_path):
    step2, step3 = lora_run["root"] / ckpt.step_name(2), lora_run["step"]
    for step in (step2, step3):
        files = sorted(p.name for p in (step / ckpt.PEFT_ADAPTER_DIR).iterdir())
        assert files == ["adapter_config.json", "adapter_model.safetensors"]
    assert (step2 / ckpt.PEFT_ADAPTER_DIR / "adapter_model.safetensors").read_bytes() != \
        (step3 / ckpt.PEFT_ADAPTER_DIR / "adapter_model.safetensors").read_bytes()  # each save its own adapter
    conf = json.loads((step3 / ckpt.PEFT_ADAPTER_DIR / "adapter_config.json").read_text())
    recorded = ckpt.read_json(step3 / ckpt.CONFIG_FILE)["base_model"]["source"]
    assert conf["base_model_name_or_path"] == recorded == str(lora_run["parent"])
    assert sorted(conf["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "down_proj", "up_proj", "lm_head"])

    base, base_args = model_utils.load_model(lora_run["parent"])
    model_utils.export_hf(base, base_args, tmp_path / "base")
    adapted, _ = our_logits(step3)
    torch.testing.assert_close(peft_logits(tmp_path / "base", step3 / ckpt.PEFT_ADAPTER_DIR), adapted,
                               rtol=0, atol=1e-4)
    # our loader reads the training-time adapter back to the same model
    fresh, _ = model_utils.load_model(lora_run["parent"])
    lora.load_peft_adapter(fresh, step3 / ckpt.PEFT_ADAPTER_DIR).eval()  # new LoRA modules start in train mode
    with torch.no_grad():
        torch.testing.assert_close(fresh(TOKENS), adapted, rtol=0, atol=1e-6)


def test_fsdp_run_writes_the_whole_adapter_from_rank_0(tmp_path, pretrain_data):
    """Under FSDP2 each rank holds a shard of every adapter; the PEFT file holds the gathered tensors, and the
    save gathers the adapters only (a gather of any frozen base weight fails the run)."""
    parent = make_parent(tmp_path / "parent")
    p = torchrun(tmp_path, pretrain_data, 2, INIT_FROM=str(parent), LORA_ENABLED="true",
                 LORA_SAVE_PEFT_ADAPTER="true", USE_FSDP="true", MAX_STEPS=2, MAX_LR=1e-2, VALIDATE_EVERY_X_STEPS=0,
                 SAVE_EVERY_X_STEPS=2, script=ROOT / "tests" / "train_gathering_adapters_only.py")
    saves = re.findall(r"saved step 2 gathering (\d+) of (\d+) adapter weights and nothing else", p.stdout)
    assert len(saves) == 2, p.stdout[-3000:]  # both ranks
    assert all(int(n) == int(saves[0][1]) > 0 for pair in saves for n in pair), saves
    step = tmp_path / "ck" / "pretrain" / ckpt.step_name(2)
    trained, _ = model_utils.load_model(step, merge_lora=False)
    fresh, _ = model_utils.load_model(parent)
    lora.load_peft_adapter(fresh, step / ckpt.PEFT_ADAPTER_DIR)  # shapes are checked: a shard would not load
    want, got = lora.lora_state_dict(trained), lora.lora_state_dict(fresh)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert max(v.abs().max().item() for k, v in want.items() if k.endswith("lora_b")) > 0  # B moved off zero


def test_save_peft_adapter_without_lora_is_refused_before_training():
    with pytest.raises(UserError, match="LORA_SAVE_PEFT_ADAPTER=true .* LORA_ENABLED=false"):
        config.load_config(str(ROOT / "configs" / "debug.env"), {"LORA_SAVE_PEFT_ADAPTER": "true"},
                           use_environ=False)
    cfg = config.load_config(str(ROOT / "configs" / "debug.env"),
                             {"LORA_SAVE_PEFT_ADAPTER": "true", "LORA_ENABLED": "true"}, use_environ=False)
    assert cfg.lora.lora_save_peft_adapter is True


# ---- errors: one line, exit 2, nothing on disk -------------------------------------------------------------
def _cli(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["model_utils.py", "export", *argv])
    with pytest.raises(SystemExit) as e:
        run_cli(model_utils.main)
    err = capsys.readouterr().err.strip().splitlines()
    return e.value.code, err[-1] if err else ""


def _nothing_left(tmp_path: Path, *paths: Path) -> bool:
    hidden = [p for p in tmp_path.rglob(".*") if ".tmp-" in p.name]
    return not hidden and not any(p.exists() for p in paths)


def test_export_peft_mistakes_are_one_line_exit_2_and_write_nothing(lora_run, tmp_path, monkeypatch, capsys):
    step, out, elsewhere = str(lora_run["step"]), tmp_path / "out", tmp_path / "elsewhere"
    cases = [
        ((str(lora_run["parent"]), "--format", "peft", "--out", str(out)), "is not a LoRA checkpoint of ours"),
        ((step, "--format", "peft", "--out", str(out), "--base-out", str(elsewhere), "--base-id", HF_ID),
         "--base-out and --base-id both given"),
        ((step, "--format", "peft", "--out", str(out), "--base-out", str(out / "b")), "is inside --out"),
        ((step, "--format", "hf", "--out", str(out), "--base-id", HF_ID), "apply to --format peft only"),
        ((step, "--format", "peft", "--out", str(out), "--base-id", str(tmp_path / "no-such-base")),
         "is neither an existing path nor a hub id"),
    ]
    for argv, message in cases:
        code, line = _cli(monkeypatch, capsys, "--model", *argv)
        assert code == 2 and line.startswith("error: ") and message in line, (argv, line)
        assert _nothing_left(tmp_path, out, elsewhere, out / "b"), argv

    # an occupied --out or --base-out is refused and left as it was
    for flag in ("--out", "--base-out"):
        occupied = tmp_path / f"occupied{flag}"
        occupied.mkdir()
        (occupied / "keep.txt").write_text("mine")
        argv = ("--out", str(occupied)) if flag == "--out" else ("--out", str(out), "--base-out", str(occupied))
        code, line = _cli(monkeypatch, capsys, "--model", step, "--format", "peft", *argv)
        assert code == 2 and f"already exists and is not empty; choose another {flag}" in line
        assert [p.name for p in occupied.iterdir()] == ["keep.txt"] and _nothing_left(tmp_path, out)

    # a failure while writing (here: the base export) leaves neither the adapter nor the base behind
    def failing_export(*args, **kwargs):
        raise UserError("no space left on device (simulated)")

    with monkeypatch.context() as m:
        m.setattr(model_utils, "export_hf", failing_export)
        code, line = _cli(monkeypatch, capsys, "--model", step, "--format", "peft", "--out", str(out),
                          "--base-out", str(elsewhere))
    assert code == 2 and "simulated" in line and _nothing_left(tmp_path, out, elsewhere)


def test_a_local_base_id_must_hold_the_base_weights(lora_run, tmp_path, monkeypatch, capsys):
    base, base_args = model_utils.load_model(lora_run["parent"])
    model_utils.export_hf(base, base_args, tmp_path / "the-base")
    other = Transformer(ModelArgs.from_dict(base_args.to_dict()))
    other.init_weights(generator=torch.Generator().manual_seed(99))
    model_utils.export_hf(other, base_args, tmp_path / "other-base")

    out = tmp_path / "out"
    code, line = _cli(monkeypatch, capsys, "--model", str(lora_run["step"]), "--format", "peft", "--out", str(out),
                      "--base-id", str(tmp_path / "other-base"))
    assert code == 2 and "holds other weights than the base" in line and _nothing_left(tmp_path, out)

    code, _ = _cli(monkeypatch, capsys, "--model", str(lora_run["step"]), "--format", "peft", "--out", str(out),
                   "--base-id", str(tmp_path / "the-base"))
    assert code == 0 and not (out / "base").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tmp_path / "the-base")
    adapted, _ = our_logits(lora_run["step"])
    torch.testing.assert_close(peft_logits(tmp_path / "the-base", out), adapted, rtol=0, atol=1e-4)


def test_export_refuses_a_base_changed_since_training(lora_run, tmp_path):
    """Loading the base goes through load_model's lineage check: adapters on other weights are refused."""
    parent = tmp_path / "parent"
    shutil.copytree(lora_run["parent"], parent)
    step = tmp_path / "lora"
    shutil.copytree(lora_run["step"], step)
    conf = ckpt.read_json(step / ckpt.CONFIG_FILE)
    conf["base_model"]["source"] = str(parent)
    (step / ckpt.CONFIG_FILE).write_text(json.dumps(conf))
    model_utils.export_peft(step, tmp_path / "ok")  # the copy holds the same weights: accepted
    shift_model_weights(parent, 0.01)
    with pytest.raises(UserError, match="now holds other weights"):
        model_utils.export_peft(step, tmp_path / "out")
    assert _nothing_left(tmp_path, tmp_path / "out")


def test_tied_embeddings_with_an_output_adapter_export_unmerged(tmp_path):
    """A tied output layer with an adapter cannot be merged (the embedding would change too); unmerged, as
    PEFT keeps it, the export gives our logits."""
    model = tiny_model(3, std=0.1, dim=32, multiple_of=16, max_seq_len=64, tie_embeddings=True)
    args = model.args
    model_utils.export_meta(model, args, tmp_path / "base")
    lora.apply_lora(model, TARGETS.split(","), rank=4, alpha=8.0)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(4))
    step = tmp_path / "ck" / "step_0000001"
    step.mkdir(parents=True)
    save_file(lora.lora_state_dict(model), str(step / ckpt.MODEL_FILE))
    conf = ckpt.config_json(args.to_dict(), {}, lora.lora_config(model), str(tmp_path / "base"))
    (step / ckpt.CONFIG_FILE).write_text(json.dumps(conf))
    with pytest.raises(UserError, match="tied embeddings"):
        model_utils.load_model(step)  # merged: refused
    model.eval()
    x = TOKENS % args.vocab_size
    with torch.no_grad():
        ours = model(x)
        with lora.disable_lora(model):
            assert (ours - model(x)).abs().max() > 1e-2
    out = model_utils.export_peft(step, tmp_path / "out")
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(hf, out).eval()(input_ids=x).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
