"""FSDP2's meta-device build on CPU (gloo, torchrun): random init and pretrained weights (ours, HF safetensors,
Meta shards) land on each rank as exactly the single-process model's slices, each rank reading only its rows of
a safetensors source (a Meta .pth source one full matrix at a time), and half the parameters per rank on two ranks; per-rank parameter + optimizer bytes
fall 1/N; and a run started from pretrained weights trains with the single-process losses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import (
    ROOT,
    make_parent,
    make_pretrain_data,
    read_metrics,
    run_inprocess,
    subprocess_env,
    torchrun,
)

import checkpoint as ckpt
import config
import model_utils
from errors import UserError
from model import Transformer

WORKER = ROOT / "tests" / "sharded_worker.py"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    ours = make_parent(root / "ck")
    model, args = model_utils.load_model(ours)
    model_utils.export_hf(model, args, root / "hf")
    model_utils.export_meta(model, args, root / "meta", n_shards=2)  # merged per tensor when read
    return {"ours": str(ours), "hf": str(root / "hf"), "meta": str(root / "meta")}


@pytest.fixture(scope="module")
def tied_sources(tmp_path_factory):
    """The same three formats for a model whose head is its embedding (stored once)."""
    root = tmp_path_factory.mktemp("tied")
    cfg = config.load_config(str(ROOT / "configs" / "debug.env"), {"TIE_EMBEDDINGS": "true"}, use_environ=False)
    model = Transformer(cfg.model_args(8448))
    model.init_weights(generator=torch.Generator().manual_seed(3))
    ckpt.save(root / "ck", 0, model, None, trainer_state={"step": 0},
              config={"model_args": model.args.to_dict(), "settings": cfg.to_dict()})
    model_utils.export_hf(model, model.args, root / "hf")
    model_utils.export_meta(model, model.args, root / "meta")
    return {"ours": str(root / "ck" / "step_0000000"), "hf": str(root / "hf"), "meta": str(root / "meta")}


def test_rank_local_readers_equal_load_model(sources, tied_sources):
    """open_weights + load_sharded (one process, no sharding) give load_model's weights and its fingerprint."""
    for src in [*sources.values(), *tied_sources.values()]:
        ref, ref_args = model_utils.load_model(src)
        args, weights = model_utils.open_weights(src)
        assert (args.dim, args.n_layers, args.vocab_size, args.tie_embeddings) == \
            (ref_args.dim, ref_args.n_layers, ref_args.vocab_size, ref_args.tie_embeddings), src
        with torch.device("meta"):
            model = Transformer(args)
        model_utils.load_sharded(model, weights, torch.device("cpu"), src)
        got = model.state_dict()
        for k, v in ref.state_dict().items():
            assert torch.equal(got[k], v), (src, k)
        assert model.output.weight is model.tok_embeddings.weight or not args.tie_embeddings
        # the lineage fingerprint of the lazily read weights is the loaded model's
        assert ckpt.weights_fingerprint(model_utils.module_state_view(weights, args)) == \
            ckpt.weights_fingerprint(ref.state_dict()), src


def test_row_reads_of_safetensors_sources_equal_the_whole_tensors_rows(sources, tied_sources):
    """weights.rows(name, start, stop, shape) of our checkpoints and HF safetensors == the whole tensor's rows,
    also for q/k row ranges that cut through a head (HF stores q/k permuted within each head); a shape other
    than the stored one is refused; Meta .pth shards read whole (rows -> None)."""
    for src in [sources["ours"], sources["hf"], tied_sources["ours"], tied_sources["hf"]]:
        _, weights = model_utils.open_weights(src)
        for name in weights:
            full = weights[name]
            n = full.shape[0]
            for start, stop in ((0, n), (0, n // 2), (n // 2, n), (3, n - 5), (n - 1, n)):
                assert torch.equal(weights.rows(name, start, stop, tuple(full.shape)), full[start:stop]), \
                    (src, name, start, stop)
        with pytest.raises(UserError, match="shape"):
            weights.rows("tok_embeddings.weight", 0, 2, (1, 1))
    _, meta = model_utils.open_weights(sources["meta"])
    assert meta.rows("tok_embeddings.weight", 0, 2, tuple(meta["tok_embeddings.weight"].shape)) is None


def test_rank_local_reader_of_a_tied_lora_checkpoint_equals_load_model(tied_sources, tmp_path, pretrain_data):
    run_inprocess(tmp_path, pretrain_data, INIT_FROM=tied_sources["ours"], LORA_ENABLED="true", MAX_STEPS=1,
                  VALIDATE_EVERY_X_STEPS=0, SAVE_EVERY_X_STEPS=1)
    src = str(tmp_path / "ck" / "pretrain" / ckpt.step_name(1))
    ref, _ = model_utils.load_model(src)  # the adapters merged into the tied base
    args, weights = model_utils.open_weights(src)
    with torch.device("meta"):
        model = Transformer(args)
    model_utils.load_sharded(model, weights, torch.device("cpu"), src)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_rank_local_loading_refuses_other_weights(sources):
    args, weights = model_utils.open_weights(sources["hf"])
    other = config.load_config(str(ROOT / "configs" / "debug.env"), {"DIM": "128"}, use_environ=False)
    with torch.device("meta"):
        model = Transformer(other.model_args(args.vocab_size))
    with pytest.raises(UserError, match="shape"):
        model_utils.load_sharded(model, weights, torch.device("cpu"), sources["hf"])
    with torch.device("meta"):
        deeper = Transformer(config.load_config(str(ROOT / "configs" / "debug.env"), {"N_LAYERS": "3"},
                                                use_environ=False).model_args(args.vocab_size))
    with pytest.raises(UserError, match="missing"):
        model_utils.load_sharded(deeper, weights, torch.device("cpu"), sources["hf"])


def _launch(tmp, nproc: int, *sources: str) -> list[dict]:
    out = tmp / f"out{nproc}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
           str(out), *sources]
    p = subprocess.run(cmd, cwd=tmp, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.slow
def test_meta_build_shards_equal_single_process_and_memory_halves(tmp_path, sources):
    two = _launch(tmp_path, 2, *sources.values())
    one = _launch(tmp_path, 1)
    for r in two:
        for name, got in [("random", r["random"]), ("random_tied", r["random_tied"]), *r["sources"].items()]:
            assert got["equal"], (r["rank"], name)  # every local shard == the single-process tensor's slice
            # no rank holds the model: half of the parameters each (dim-0 chunks of even sizes)
            assert got["local_numel"] * 2 == got["total_numel"], (r["rank"], name, got)
        assert r["random_tied"]["tied_kept"]  # the tied head is still the embedding after to_empty
        assert r["from_rank0"] == "computed on rank 0"  # D.on_rank0: rank 0's text on every rank
        for name, got in r["sources"].items():
            if name == sources["meta"]:  # Meta's .pth shards are read whole: one full matrix at a time
                assert got["reads"] > 0 and got["max_alive"] == 1, (name, got)
            else:  # safetensors (ours, HF): each rank reads exactly its rows, no whole matrix
                assert got["whole_matrices_read"] == 0 and got["reads"] == 0, (name, got)
                assert got["read_elements"] == got["local_numel"], (name, got)
    # parameters + AdamW moments per rank after a step: 1/2 of the single process's
    for r in two:
        for key in ("param_bytes", "optimizer_bytes"):
            assert r["memory"][key] * 2 == one[0]["memory"][key], (key, r["memory"], one[0]["memory"])
    assert one[0]["memory"]["optimizer_bytes"] == 2 * one[0]["memory"]["param_bytes"]  # two fp32 moments


@pytest.mark.slow
def test_fsdp2_from_pretrained_weights_matches_one_process(tmp_path, sources):
    """INIT_FROM an HF export (read rank-locally, q/k un-permuted per tensor) under FSDP2 on 2 ranks gives the
    losses and gradient norms of the whole-model single-process run."""
    data = make_pretrain_data(tmp_path / "data")
    common = dict(MAX_STEPS=3, GRAD_CLIP=0.5, VALIDATE_EVERY_X_STEPS=0, SAVE_CHECKPOINTS="false",
                  INIT_FROM=sources["hf"])
    ref = {e["step"]: e for e in run_inprocess(tmp_path / "one", data, **common) if "loss" in e}
    (tmp_path / "two").mkdir()
    torchrun(tmp_path / "two", data, 2, USE_FSDP="true", **common)
    got = {e["step"]: e for e in read_metrics(tmp_path / "two" / "run") if "loss" in e}
    for s in (1, 2, 3):
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-4), (s, got[s], ref[s])
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4), (s, got[s], ref[s])


