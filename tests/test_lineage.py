"""A run started from other weights records them resolved (a step directory, not a moving `latest`
pointer) with a fingerprint of their values; loading a LoRA checkpoint or resuming a run onto weights that
changed since is refused in one line, unless the base is passed explicitly."""

from __future__ import annotations

import pytest
import torch
from helpers import ROOT, run_inprocess, shift_model_weights

import checkpoint as ckpt
import model_utils
from errors import UserError

BASE = dict(VALIDATE_EVERY_X_STEPS=0, SAVE_EVERY_X_STEPS=2, MAX_NUMBER_CHECKPOINTS=5)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(1, 17)[None])


def test_lora_checkpoint_keeps_its_base_when_latest_moves_and_refuses_a_changed_base(tmp_path, pretrain_data):
    base_dir = tmp_path / "base"
    run_inprocess(base_dir, pretrain_data, MAX_STEPS=2, **BASE)
    base_step = base_dir / "ck" / "pretrain" / ckpt.step_name(2)
    lora_dir = tmp_path / "lora"
    lora_kw = dict(INIT_FROM=str(base_dir / "ck" / "pretrain" / "latest"), LORA_ENABLED="true", **BASE)
    run_inprocess(lora_dir, pretrain_data, MAX_STEPS=2, **lora_kw)
    adapters = lora_dir / "ck" / "pretrain" / ckpt.step_name(2)
    recorded = ckpt.read_json(adapters / ckpt.CONFIG_FILE)["base_model"]
    assert recorded["source"] == str(base_step) and recorded["fingerprint"].startswith(ckpt.FINGERPRINT_PREFIX)
    before = _logits(model_utils.load_model(adapters)[0])

    run_inprocess(base_dir, pretrain_data, MAX_STEPS=4, **BASE)  # the base run continues: `latest` moves on
    assert ckpt.latest_name(base_dir / "ck" / "pretrain") == ckpt.step_name(4)
    torch.testing.assert_close(_logits(model_utils.load_model(adapters)[0]), before, rtol=0, atol=0)

    shift_model_weights(base_step, 0.01)  # the recorded base itself is overwritten with other values
    with pytest.raises(UserError, match=r"was started from .*step_0000002 .* now holds other weights"):
        model_utils.load_model(adapters)
    for init_from in (lora_kw["INIT_FROM"], ""):  # the same command again (a `latest` now elsewhere), or none
        with pytest.raises(UserError, match="now holds other weights"):
            run_inprocess(lora_dir, pretrain_data, MAX_STEPS=4, **{**lora_kw, "INIT_FROM": init_from})
    changed = _logits(model_utils.load_model(adapters, lora_base=str(base_step))[0])  # explicit: accepted
    assert (changed - before).abs().max() > 1e-3
    m = run_inprocess(lora_dir, pretrain_data, MAX_STEPS=3, **{**lora_kw, "INIT_FROM": str(base_step)})
    assert max(e["step"] for e in m if "loss" in e) == 3


def test_a_relative_init_from_is_recorded_absolute(tmp_path, pretrain_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_inprocess(tmp_path / "base", pretrain_data, MAX_STEPS=2, **BASE)
    lora_dir = tmp_path / "lora"
    run_inprocess(lora_dir, pretrain_data, MAX_STEPS=2, INIT_FROM="base/ck/pretrain/latest", LORA_ENABLED="true",
                  **BASE)
    adapters = lora_dir / "ck" / "pretrain" / ckpt.step_name(2)
    recorded = ckpt.read_json(adapters / ckpt.CONFIG_FILE)["base_model"]["source"]
    assert recorded == str(tmp_path / "base" / "ck" / "pretrain" / ckpt.step_name(2))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert model_utils.load_model(adapters)[0] is not None  # the base is found from any directory


# ---- the fingerprint: full content, stored at save, the same whatever wrote the model -----------------------


def _debug_model(tied: bool = False):
    import config
    from model import Transformer

    cfg = config.load_config(str(ROOT / "configs" / "debug.env"), {"TIE_EMBEDDINGS": str(tied).lower()},
                             use_environ=False)
    model = Transformer(cfg.model_args(8448))
    model.init_weights(generator=torch.Generator().manual_seed(5))
    return cfg, model


def test_fingerprint_sees_a_change_of_one_row():
    """New token embeddings: one row of a (vocab, dim) table rewritten. Every value counts, so the row is seen
    wherever it is, whatever the table's size."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(70_000, 16, generator=g)  # 1.12M values: more than any sample of 65,536
    sd = {"tok_embeddings.weight": emb, "norm.weight": torch.ones(16)}
    fp = ckpt.weights_fingerprint(sd)
    stride = emb.numel() // (1 << 16)
    row = next(r for r in range(emb.shape[0]) if all((r * 16 + j) % stride for j in range(16)))
    for r in (row, 0, emb.shape[0] - 1):
        changed = emb.clone()
        changed[r] = torch.randn(16, generator=g)
        assert ckpt.weights_fingerprint({**sd, "tok_embeddings.weight": changed}) != fp, r
    one_value = emb.clone()
    one_value[row, 3] = torch.nextafter(one_value[row, 3], torch.tensor(1e9))  # one ulp of one value
    assert ckpt.weights_fingerprint({**sd, "tok_embeddings.weight": one_value}) != fp


@pytest.mark.parametrize("tied", [False, True])
def test_the_fingerprint_is_stored_at_save_and_read_not_recomputed(tmp_path, monkeypatch, tied):
    cfg, model = _debug_model(tied)
    want = ckpt.weights_fingerprint(model.state_dict())
    ckpt.save(tmp_path / "ck", 0, model, None, trainer_state={"step": 0},
              config={"model_args": model.args.to_dict(), "settings": cfg.to_dict()})
    step = tmp_path / "ck" / ckpt.step_name(0)
    assert ckpt.read_json(step / ckpt.CONFIG_FILE)["weights_fingerprint"] == want
    loaded, _ = model_utils.load_model(step)
    assert ckpt.weights_fingerprint(loaded.state_dict()) == want  # the loaded model hashes as stored

    def no_hashing(*a, **kw):
        raise AssertionError("a checkpoint with a stored fingerprint was hashed again")

    monkeypatch.setattr(ckpt, "weights_fingerprint", no_hashing)
    assert ckpt.source_fingerprint(str(step), loaded.state_dict) == want
    monkeypatch.undo()
    # a source without a stored fingerprint (an HF export of the same weights) is hashed as read: same value
    model_utils.export_hf(loaded, loaded.args, tmp_path / "hf")
    from_hf, _ = model_utils.load_model(tmp_path / "hf")
    assert ckpt.source_fingerprint(str(tmp_path / "hf"), from_hf.state_dict) == want


WORKER = '''
import json, sys
from pathlib import Path
import torch
import checkpoint as ckpt, config, distributed as D, train

out, root = Path(sys.argv[1]), Path(sys.argv[2])
D.init_distributed("cpu")
tok = type("Tok", (), {"vocab_size": 8448})()
found = {}
for tied in ("false", "true"):
    cfg = config.load_config(str(root / "configs" / "debug.env"), {"USE_FSDP": "true", "DEVICE": "cpu",
                             "TIE_EMBEDDINGS": tied, "SEED": "5"}, use_environ=False)
    model, margs, _ = train.build_meta_model(cfg, tok, "")
    D.parallelize(model, cfg, torch.device("cpu"))
    train.materialize_model(model, None, cfg.training.seed, torch.device("cpu"), "")
    ckpt.save(out / tied, 0, model, None, trainer_state={"step": 0},
              config={"model_args": margs.to_dict(), "settings": cfg.to_dict()})
    found[tied] = ckpt.model_fingerprint(model)
(out / f"rank{D.rank()}.json").write_text(json.dumps(found))
D.destroy()
'''


@pytest.mark.slow
def test_one_process_and_two_fsdp2_ranks_store_the_same_fingerprint(tmp_path):
    """The same weights saved by one process and by two FSDP2 ranks (each hashing only its own rows, no gather):
    the stored fingerprints are equal, untied and tied."""
    import json
    import subprocess
    import sys

    from helpers import subprocess_env

    import config
    import train

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(tmp_path / "fsdp"), str(ROOT)], cwd=tmp_path, env=subprocess_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for tied in ("false", "true"):
        cfg = config.load_config(str(ROOT / "configs" / "debug.env"), {"TIE_EMBEDDINGS": tied, "SEED": "5"},
                                 use_environ=False)
        tok = type("Tok", (), {"vocab_size": 8448})()
        model, margs = train.build_model(cfg, tok, "", torch.device("cpu"))
        ckpt.save(tmp_path / "one" / tied, 0, model, None, trainer_state={"step": 0},
                  config={"model_args": margs.to_dict(), "settings": cfg.to_dict()})
        one = ckpt.read_json(tmp_path / "one" / tied / ckpt.step_name(0) / ckpt.CONFIG_FILE)["weights_fingerprint"]
        two = ckpt.read_json(tmp_path / "fsdp" / tied / ckpt.step_name(0) / ckpt.CONFIG_FILE)["weights_fingerprint"]
        assert one == two == ckpt.weights_fingerprint(model.state_dict()), tied
        ranks = [json.loads((tmp_path / "fsdp" / f"rank{r}.json").read_text())[tied] for r in (0, 1)]
        assert ranks == [one, one]


def test_a_parent_recorded_with_the_sampled_fingerprint_of_older_checkpoints_still_checks(tmp_path):
    """Checkpoints written before the full-content fingerprint record a sampled one: the check computes that
    form for them (same weights: accepted; changed ones: refused)."""
    _, model = _debug_model()
    sd = model.state_dict()
    old = ckpt.sampled_fingerprint(sd)
    step = tmp_path / "old"
    step.mkdir()
    ckpt.write_json(step / ckpt.STATE_FILE, {"step": 3, "parent_fingerprint": old})
    ckpt.check_parent(step, "base", ckpt.weights_fingerprint(sd), weights=lambda: sd)
    moved = {k: v + 0.01 for k, v in sd.items()}
    with pytest.raises(UserError, match="now holds other weights"):
        ckpt.check_parent(step, "base", ckpt.weights_fingerprint(moved), weights=lambda: moved)


def test_fingerprint_equals_its_definition_computed_row_by_row():
    """The documented definition, written out: per row sha256(row index as 8 little-endian bytes + fp32 bytes),
    summed as eight 32-bit words mod 2**32 per tensor, then sha256 over name:shape: and the sums in name order.
    The large tensor is hashed in threads by the implementation, the small ones inline."""
    import hashlib

    import numpy as np

    g = torch.Generator().manual_seed(1)
    sd = {"b.weight": torch.randn(5000, 1024, generator=g), "a": torch.randn(7, generator=g).double()}
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].float().reshape(sd[name].shape[0], -1)
        words = np.zeros(8, dtype=np.int64)
        for i in range(t.shape[0]):
            d = hashlib.sha256(i.to_bytes(8, "little") + t[i].numpy().astype("<f4").tobytes()).digest()
            words += np.frombuffer(d, dtype="<u4")
        h.update(f"{name}:{tuple(sd[name].shape)}:".encode() + (words % 2**32).astype("<u4").tobytes())
    assert ckpt.weights_fingerprint(sd) == ckpt.FINGERPRINT_PREFIX + h.hexdigest()
