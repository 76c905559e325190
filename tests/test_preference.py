"""The reference-free preference objectives (ORPO, SimPO): their losses against the published formulas written
out here per element (float64 Python math) and against TRL's implementations (trl.experimental ORPO and CPO
trainers, called on the same log-probs and logits); no reference model is built; each trains on the DPO data."""

from __future__ import annotations

import copy
import math
import os
from types import SimpleNamespace

import pytest
import torch
from helpers import TOKENIZER, make_parent, objective_steps, read_metrics, run_inprocess
from test_objectives import dpo_batch, tiny_model

import config
import data_preparation_utils as dpu
import dataloaders
import objectives as obj
import tokenizer as tk
from losses import orpo_loss, simpo_loss
from model import Transformer
from objective_caches import concat_pairs

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def ref_orpo(chosen: float, rejected: float, lam: float) -> float:
    """Hong et al. 2024, eqs. 2-7, with P(y|x) = exp(mean log-prob per token): NLL(y_w) - lam log s(log OR)."""
    p_w, p_l = math.exp(chosen), math.exp(rejected)
    log_or = math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l))
    return -chosen - lam * _log_sigmoid(log_or)


def ref_simpo(chosen: float, rejected: float, beta: float, gamma: float) -> float:
    """Meng et al. 2024, eq. 6 on mean log-probs per token."""
    return -_log_sigmoid(beta * chosen - beta * rejected - gamma)


def cfg_for(name: str, **kv) -> config.Config:
    return config.load_config(None, {"TRAINING_STAGE": "dpo", "PREFERENCE_OBJECTIVE": name,
                                     **{k: str(v) for k, v in kv.items()}})


# ---- the loss functions, hand-computed -------------------------------------------------------------------


def test_orpo_loss_hand_computed_case():
    # P_w = e^-0.5 = 0.606531, P_l = e^-1.2 = 0.301194: odds 1.541494 and 0.431013, log OR = 1.274370,
    # -log s(1.274370) = log(1 + e^-1.274370) = 0.246553, so loss = 0.5 + 0.1 * 0.246553
    losses, nll, log_or = orpo_loss(torch.tensor([-0.5], dtype=torch.float64),
                                    torch.tensor([-1.2], dtype=torch.float64), lam=0.1)
    assert log_or.item() == pytest.approx(1.274370, abs=1e-6)
    assert nll.item() == 0.5
    assert losses.item() == pytest.approx(0.5 + 0.1 * 0.246553, abs=1e-6)


def test_simpo_loss_hand_computed_case():
    # beta 2, gamma 1: rewards -1.0 and -2.4, margin 1.4 - 1 = 0.4, -log s(0.4) = log(1 + e^-0.4) = 0.51302
    losses, cr, rr = simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.2]), beta=2.0, gamma=1.0)
    assert (cr.item(), rr.item()) == (pytest.approx(-1.0), pytest.approx(-2.4))
    assert losses.item() == pytest.approx(0.513015, abs=1e-6)


@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_orpo_loss_matches_formula_per_element_and_stays_finite_near_zero(lam):
    g = torch.Generator().manual_seed(0)
    chosen = -torch.rand(64, generator=g, dtype=torch.float64) * 6
    rejected = -torch.rand(64, generator=g, dtype=torch.float64) * 6
    chosen[:4] = torch.tensor([-2e-6, -1e-5, -0.69, -0.7], dtype=torch.float64)  # both sides of the -ln 2 branch
    losses, nll, log_or = orpo_loss(chosen, rejected, lam)
    want = [ref_orpo(c, r, lam) for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True)]
    torch.testing.assert_close(losses, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(nll, -chosen)
    assert not nll.requires_grad and not log_or.requires_grad


def test_orpo_gradient_stays_finite_for_a_response_predicted_with_certainty():
    chosen = torch.tensor([0.0, -0.3], requires_grad=True)  # mean log-prob 0: P = 1 in fp32
    rejected = torch.tensor([-2.0, 0.0], requires_grad=True)
    losses, _, log_or = orpo_loss(chosen, rejected, lam=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert log_or[0] > 10 and log_or[1] < -10  # near-certainty still dominates the odds ratio
    assert chosen.grad[0] == pytest.approx(-1.0, abs=1e-3)  # the NLL term's gradient remains


@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (2.5, 0.3), (0.5, 0.0)])
def test_simpo_loss_matches_formula_per_element(beta, gamma):
    g = torch.Generator().manual_seed(1)
    chosen, rejected = (-torch.rand(64, generator=g, dtype=torch.float64) * 4 for _ in range(2))
    losses, cr, rr = simpo_loss(chosen, rejected, beta, gamma)
    want = [ref_simpo(c, r, beta, gamma) for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True)]
    torch.testing.assert_close(losses, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cr, beta * chosen)
    torch.testing.assert_close(rr, beta * rejected)


# ---- against TRL --------------------------------------------------------------------------------------


def _trl_layout(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our shifted (logits[:, t] predicts labels[:, t]) -> TRL's unshifted layout (it drops logits[:, -1]
    and labels[:, 0])."""
    pad_label = torch.full_like(labels[:, :1], -100)
    return torch.cat([logits, logits[:, -1:]], dim=1), torch.cat([pad_label, labels], dim=1)


def _trl_trainer(kind: str, **attrs):
    """TRL's loss methods read only these attributes of the trainer: a namespace stands in for it."""
    if kind == "orpo":
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer as cls
    else:
        from trl.experimental.cpo.cpo_trainer import CPOTrainer as cls
    return cls, SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), **attrs)


def test_orpo_objective_equals_trl():
    """TRL's ORPO: mean log-probs from its get_batch_logps, the odds-ratio term from its odds_ratio_loss; its
    NLL term averages over every chosen token of the batch (prompt included), ours per pair over the response,
    as the paper's SFT loss: the NLL term is checked against the formula, the rest against TRL."""
    cls, trainer = _trl_trainer("orpo", beta=0.25)
    model, batch = tiny_model(), dpo_batch(B=4)
    o = obj.build_objective(cfg_for("orpo", ORPO_LAMBDA=0.25))
    assert isinstance(o, obj.OddsRatioPreference) and o.batch_format == "dpo"
    o.setup(model, None, torch.device("cpu"))
    loss, m = o.loss(model, batch)
    ids, labels = concat_pairs(batch)
    with torch.no_grad():
        trl_logits, trl_labels = _trl_layout(model(ids), labels)
        logps = cls.get_batch_logps(trl_logits, trl_labels, average_log_prob=True)  # (2B,)
    trl_losses, _, _, _, trl_log_odds = cls.odds_ratio_loss(trainer, logps[:4], logps[4:])
    torch.testing.assert_close(m["avg_logps_chosen"], logps[:4].sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m["log_odds_ratio"] / 4, trl_log_odds, rtol=1e-5, atol=1e-6)
    # TRL's `losses` are +lambda * log s(log OR) (it subtracts their mean): ours minus the NLL term is their negative
    torch.testing.assert_close(loss.detach() - m["nll"], -trl_losses.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["nll"], -logps[:4].sum(), rtol=1e-5, atol=1e-5)


def test_simpo_objective_equals_trl_cpo_simpo():
    """TRL's CPO trainer with loss_type=simpo (cpo_alpha=0: no NLL term): same losses and rewards."""
    cls, trainer = _trl_trainer("cpo", beta=2.5, simpo_gamma=0.7, loss_type="simpo", label_smoothing=0.0, alpha=0.0)
    model, batch = tiny_model(), dpo_batch(B=4)
    o = obj.build_objective(cfg_for("simpo", SIMPO_BETA=2.5, SIMPO_GAMMA=0.7))
    assert isinstance(o, obj.SimplePreference)
    loss, m = o.loss(model, batch)
    ids, labels = concat_pairs(batch)
    with torch.no_grad():
        trl_logits, trl_labels = _trl_layout(model(ids), labels)
        logps = cls.get_batch_logps(trl_logits, trl_labels, average_log_prob=True)
    trl_losses, trl_cr, trl_rr = cls.cpo_loss(trainer, logps[:4], logps[4:])
    torch.testing.assert_close(loss.detach(), trl_losses.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["rewards_chosen"], trl_cr.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m["rewards_rejected"], trl_rr.sum(), rtol=1e-5, atol=1e-5)
    assert m["reward_accuracy"].item() == (trl_cr > trl_rr).sum().item()


# ---- reference-free --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_reference_free_objectives_build_no_reference(name, monkeypatch):
    def no_copies(*_a, **_k):
        raise AssertionError("a reference-free objective copied the model")

    monkeypatch.setattr(copy, "deepcopy", no_copies)
    model, batch = tiny_model(), dpo_batch()
    o = obj.build_objective(cfg_for(name))
    info = o.setup(model, None, torch.device("cpu"))
    assert info["reference_memory_mb"] == 0.0 and o.units(batch) == 3
    assert not any(isinstance(v, torch.nn.Module) for v in vars(o).values())  # no frozen helper held
    loss, _ = o.loss(model, batch)
    loss.backward()
    ev, n = o.eval_loss(model, batch)
    assert n == 3 and ev.item() == pytest.approx(loss.item(), rel=1e-6) and not ev.requires_grad


def test_reference_logps_path_with_a_reference_free_objective_is_refused():
    with pytest.raises(Exception, match="PREFERENCE_OBJECTIVE=orpo uses no reference model"):
        cfg_for("orpo", DPO_REFERENCE_LOGPS_PATH="/tmp/ref")


# ---- training -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    import demo_data
    from load_dpo_dataset import DPOEncoder

    tok = tk.load_tokenizer(TOKENIZER)
    root = tmp_path_factory.mktemp("pref") / "dpo"
    dpu.prepare("dpo", demo_data.demo_preference_set(max_chars=100)[:16], root, DPOEncoder(tok, "", 64),
                tokenizer_identity=tok.identity(), source="16 pairs", seed=0, val_fraction=0.0, shard_size=1 << 20,
                workers=1, progress=False)
    return tok, root


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_fifteen_steps_on_the_debug_preset_learn_the_pairs(name, pairs):
    """The real shards -> loader -> objective path, debug-sized model from random init: the loss falls and the
    chosen-minus-rejected margin of mean log-probs rises on the trained pairs."""
    tok, root = pairs
    loader = dataloaders.build_loader("dpo", root, "train", seq_len=64, micro_batch=8, global_batch=8, rank=0,
                                      world_size=1, seed=0, pad_id=tok.pad_id)
    n = loader.samples_per_epoch
    cfg = cfg_for(name, MODEL_PRESET="debug")
    torch.manual_seed(0)
    model = Transformer(cfg.model_args(tok.vocab_size))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    objective = obj.build_objective(cfg)
    objective.setup(model, tok, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    every = dataloaders.build_loader("dpo", root, "train", seq_len=64, micro_batch=n, global_batch=n, rank=0,
                                     world_size=1, seed=0, pad_id=tok.pad_id).next_batch()

    def loss_and_margin() -> tuple[float, float]:
        with torch.no_grad():
            loss, m = objective.loss(model, every)
        return loss.item() / n, (m["avg_logps_chosen"] - m["avg_logps_rejected"]).item() / n

    loss0, margin0 = loss_and_margin()
    objective_steps(objective, model, loader, opt, 15)
    loss, margin = loss_and_margin()
    print(f"{name} 15 steps on {n} pairs: loss {loss0:.4f} -> {loss:.4f}, margin {margin0:.4f} -> {margin:.4f}")
    assert loss < 0.8 * loss0 and margin > margin0 + 0.5


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_train_py_runs_the_reference_free_objectives(name, pairs, tmp_path, capsys):
    """Through train.py (TRAINING_STAGE=dpo, PREFERENCE_OBJECTIVE=name): the banner names the objective and no
    reference, and the objective's metrics reach metrics.jsonl per pair."""
    _, root = pairs
    run_inprocess(tmp_path, root, INIT_FROM=make_parent(tmp_path / "parent"), TRAINING_STAGE="dpo",
                  PREFERENCE_OBJECTIVE=name, DPO_DATALOADER_ROOT_PATH=root,
                  DPO_SAVE_CHECKPOINTS_PATH=tmp_path / "ck", MAX_STEPS=4, VALIDATE_EVERY_X_STEPS=0,
                  SAVE_CHECKPOINTS="false", MAX_LR=1e-2)
    out = capsys.readouterr().out
    cls = {"orpo": "OddsRatioPreference", "simpo": "SimplePreference"}[name]
    assert f"objective {cls}" in out and "none (reference-free)" in out
    steps = [e for e in read_metrics(tmp_path / "run") if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    key = "nll" if name == "orpo" else "reward_margin"
    assert all(math.isfinite(e[key]) and 0.0 <= e["reward_accuracy"] <= 1.0 for e in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
