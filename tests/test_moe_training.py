"""Training a Mixture-of-Experts model through the loop (MODEL_PRESET=moe-debug): the router losses and the
expert load are logged; the load-balancing loss is per micro-batch, so gradient accumulation equals one
big micro-batch for the language-model term only (equal with the router losses off, different with them
on); DDP and FSDP2 over 2 processes equal 1 process when the micro-batches are the same; resume equals not
stopping; a loaded MoE model must match the MoE settings; DPO's LoRA reference leaves the router losses alone."""

from __future__ import annotations

import pytest
import torch
from helpers import read_metrics, run_inprocess, torchrun

import checkpoint as ckpt
import model_utils
import moe

MOE = dict(MODEL_PRESET="moe-debug", VALIDATE_EVERY_X_STEPS=0)


def _steps(metrics: list[dict]) -> dict[int, dict]:
    return {e["step"]: e for e in metrics if "loss" in e}


def _final_weights(tmp) -> dict[str, torch.Tensor]:
    latest = (tmp / "ck" / "pretrain" / "latest").read_text().strip()
    return ckpt.read_model_tensors(tmp / "ck" / "pretrain" / latest)


def _accumulation_pair(tmp_path, data, **kw) -> tuple[dict[int, dict], dict[int, dict]]:
    """4 micro-steps of 1 sequence vs 1 micro-step of 4, same global batch of 4 x 64 tokens."""
    common = dict(TOTAL_BATCH_SIZE=256, MAX_STEPS=3, SAVE_EVERY_X_STEPS=0, **MOE, **kw)
    a = run_inprocess(tmp_path / "a", data, MAX_BATCH_SIZE=1, **common)
    b = run_inprocess(tmp_path / "b", data, MAX_BATCH_SIZE=4, **common)
    return _steps(a), _steps(b)


@pytest.mark.slow
def test_grad_accumulation_equals_for_the_language_model_term_only(tmp_path, pretrain_data):
    # router losses off: the objective is the LM term alone and accumulation is exact (losses and weights)
    a, b = _accumulation_pair(tmp_path / "off", pretrain_data, MOE_LOAD_BALANCE_WEIGHT=0, MOE_Z_LOSS_WEIGHT=0)
    for s in (1, 2, 3):
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], abs=1e-5)
    wa, wb = _final_weights(tmp_path / "off" / "a"), _final_weights(tmp_path / "off" / "b")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)
    # router losses on: step 1 (same weights) has the same LM term and z-loss (a mean over tokens, linear in
    # the batch) but another load-balancing loss (computed per micro-batch of 1 vs of 4), so another total
    a, b = _accumulation_pair(tmp_path / "on", pretrain_data, MOE_LOAD_BALANCE_WEIGHT=0.5, MOE_Z_LOSS_WEIGHT=0.1)
    assert a[1]["ce"] == pytest.approx(b[1]["ce"], abs=1e-5)
    assert a[1]["moe_z"] == pytest.approx(b[1]["moe_z"], abs=1e-5)
    assert abs(a[1]["moe_lb"] - b[1]["moe_lb"]) > 1e-3
    assert abs(a[1]["loss"] - b[1]["loss"]) > 5e-4
    for r in (a, b):  # logged: loss = ce + weights * router losses, expert load in range
        assert r[1]["loss"] == pytest.approx(r[1]["ce"] + 0.5 * r[1]["moe_lb"] + 0.1 * r[1]["moe_z"], abs=1e-5)
        assert 1.0 <= r[1]["moe_max_load"] <= 4.0 and 0.0 <= r[1]["moe_min_load"] <= 1.0
        assert r[1]["moe_dropped"] == 0.0


@pytest.mark.slow
def test_resume_equals_not_stopping_and_the_checkpoint_loads(tmp_path, pretrain_data):
    common = dict(MAX_STEPS=6, SAVE_EVERY_X_STEPS=3, MOE_CAPACITY_FACTOR=1.0, **MOE)
    straight = _steps(run_inprocess(tmp_path / "a", pretrain_data, **common))
    ck = tmp_path / "a" / "ck" / "pretrain" / "step_0000003"
    resumed = _steps(run_inprocess(tmp_path / "b", pretrain_data, "--pretrain_checkpoint", str(ck), **common))
    assert sorted(resumed) == [4, 5, 6]
    for s in resumed:
        for key in ("loss", "ce", "moe_lb", "moe_z", "moe_dropped"):
            assert resumed[s][key] == pytest.approx(straight[s][key], abs=1e-6), (s, key)
    assert straight[1]["moe_dropped"] > 0  # capacity 1.0 drops assignments of the busiest experts
    wa, wb = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    model, args = model_utils.load_model(str(tmp_path / "a" / "ck" / "pretrain" / "step_0000006"))
    assert args.moe_num_experts == 4 and args.moe_capacity_factor == 1.0
    assert len(moe.moe_layers(model)) == 2


DIST = dict(MAX_STEPS=3, SAVE_EVERY_X_STEPS=0, GRAD_CLIP=0.5, **MOE)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, pretrain_data):
    return _steps(run_inprocess(tmp_path_factory.mktemp("moe_one"), pretrain_data, **DIST))


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_equal_one_with_the_same_micro_batches(tmp_path, pretrain_data, one_process, fsdp):
    """TOTAL_BATCH_SIZE=512, MAX_BATCH_SIZE=4: one process runs micro-batches [0, 4) and [4, 8) of each step,
    two ranks run one each: the same micro-batches, so even the load-balancing term is equal."""
    torchrun(tmp_path, pretrain_data, 2, USE_FSDP=str(fsdp).lower(), **DIST)
    two = _steps(read_metrics(tmp_path / "run"))
    for s in (1, 2, 3):
        for key in ("loss", "ce", "moe_lb", "moe_z", "moe_max_load"):
            assert two[s][key] == pytest.approx(one_process[s][key], abs=1e-4), (s, key)
        assert two[s]["grad_norm"] == pytest.approx(one_process[s]["grad_norm"], rel=1e-4)


def test_router_losses_are_in_the_objective_table():
    import config
    import objectives

    cfg = config.load_config(None, {"MODEL_PRESET": "moe-debug", "TRAINING_STAGE": "dpo"})
    obj = objectives.build_objective(cfg)
    assert isinstance(obj, objectives.RouterLosses) and obj.name == "dpo+moe" and obj.batch_format == "dpo"
    dense = objectives.build_objective(config.load_config(None, {"MODEL_PRESET": "debug"}))
    assert not isinstance(dense, objectives.RouterLosses)


def test_dpo_with_lora_reference_keeps_the_policy_router_losses():
    """The LoRA DPO reference is the same model with adapters off, run without gradients: the router losses
    and load the objective adds are the policy forward's, not the reference's."""
    import config
    import lora
    import objectives
    from model import Transformer

    cfg = config.load_config(None, {"MODEL_PRESET": "moe-debug", "TRAINING_STAGE": "dpo", "LORA_ENABLED": "true",
                                    "LORA_TARGET_MODULES": "wq,wv", "MOE_LOAD_BALANCE_WEIGHT": "0.5"})
    torch.manual_seed(0)
    model = Transformer(cfg.model_args(64))
    model.init_weights(std=0.2)
    obj = objectives.build_objective(cfg)
    obj.setup(model, None, torch.device("cpu"))
    lora.apply_lora(model, ["wq", "wv"], 4, 8.0, 0.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora" in n:
                p.normal_(0, 0.5)  # adapters that change the routing: policy != reference
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"chosen_input_ids": ids, "chosen_labels": labels, "rejected_input_ids": ids.flip(1),
             "rejected_labels": labels, "sample_index": torch.arange(2)}
    _, metrics = obj.loss(model, batch)
    model(torch.cat([ids, ids.flip(1)]))  # the policy forward alone, with gradients
    policy_lb = moe.router_losses(model, 2)["lb"]
    assert metrics["moe_lb"].item() / 2 == pytest.approx(policy_lb.item(), abs=1e-6)  # summed per pair: 2 pairs
    with lora.disable_lora(model):
        model(torch.cat([ids, ids.flip(1)]))
        reference_lb = moe.router_losses(model, 2)["lb"]
    assert abs(reference_lb.item() - policy_lb.item()) > 1e-4  # the check above can tell them apart


def test_init_from_an_moe_model_takes_the_routing_settings_and_refuses_other_shapes(tmp_path):
    import types

    import config
    import train
    from errors import UserError
    from model import Transformer

    cfg = config.load_config(None, {"MODEL_PRESET": "moe-debug"})
    args = cfg.model_args(64)
    model_utils.export_hf(Transformer(args), args, tmp_path / "hf")
    tok = types.SimpleNamespace(vocab_size=64)
    run_cfg = config.load_config(None, {"MODEL_PRESET": "moe-debug", "MOE_CAPACITY_FACTOR": "1.5", "MOE_IMPL": "dense"})
    model, margs = train.build_model(run_cfg, tok, str(tmp_path / "hf"), torch.device("cpu"))
    layer = moe.moe_layers(model)[0]
    assert (layer.capacity_factor, layer.impl, margs.moe_capacity_factor) == (1.5, "dense", 1.5)
    with pytest.raises(UserError, match=r"has 4 experts per block, top-2 .*MOE_NUM_EXPERTS=0.*set MOE_NUM_EXPERTS=4"):
        train.build_model(config.load_config(None, {"MODEL_PRESET": "debug"}), tok, str(tmp_path / "hf"), "cpu")
    # FSDP2's meta-device build takes the same settings and makes the same refusal
    meta, margs, _ = train.build_meta_model(run_cfg, tok, str(tmp_path / "hf"))
    layer = moe.moe_layers(meta)[0]
    assert (layer.capacity_factor, layer.impl, margs.moe_capacity_factor) == (1.5, "dense", 1.5)
    with pytest.raises(UserError, match=r"has 4 experts per block, top-2 .*set MOE_NUM_EXPERTS=4"):
        train.build_meta_model(config.load_config(None, {"MODEL_PRESET": "debug"}), tok, str(tmp_path / "hf"))


def test_activation_checkpointing_keeps_moe_gradients_including_the_router_losses():
    """The router logits leave the checkpointed block as a side output: their losses still backpropagate, and
    every gradient equals the run without recomputation (capacity dropping on)."""
    import types

    import config
    import distributed as D
    from model import Transformer

    cfg = config.load_config(None, {"MODEL_PRESET": "moe-debug", "MOE_CAPACITY_FACTOR": "1.0"}, use_environ=False)
    args = cfg.model_args(64)
    grads = []
    for ac in (False, True):
        model = Transformer(args)
        model.init_weights(generator=torch.Generator().manual_seed(0))
        sysc = types.SimpleNamespace(activation_checkpointing=ac, use_torch_compile=False, use_fsdp=False)
        model = D.parallelize(model, types.SimpleNamespace(system=sysc), torch.device("cpu"))
        tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        logits = model(tokens)
        aux = moe.router_losses(model, args.moe_top_k)
        (logits.float().logsumexp(-1).mean() + aux["lb"] + aux["z"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert moe.expert_load(model)["dropped"] > 0  # capacity 1.0 drops something on these tokens
    assert grads[0].keys() == grads[1].keys()
    assert any("router" in n or "gate" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)
