"""bench/jobs.py's shared measurements: one useful-token count for both label conventions, a held-out loss
equal to the training loop's validation, the GPU script is valid bash (it cannot run here), tables are
written whole, and `--isa` reaches the benches' children and their result files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import data_preparation_utils as dpu
import dataloaders as dl
import demo_data
import load_instruct_dataset as lid
import objectives
import tokenizer
from bench import isa, jobs_common
from model import Transformer

ROOT = Path(__file__).resolve().parent.parent

T = 256


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    tok = tokenizer.load_tokenizer(ROOT / "tokenizer.model")
    root = tmp_path_factory.mktemp("jobs") / "sft"
    dpu.prepare("sft", demo_data.demo_instruct_set(300, modules=False)[:40], root, lid.SFTEncoder(tok, "", 0, T),
                tokenizer_identity=tok.identity(), source="test", seed=1, val_fraction=0.0, shard_size=4000,
                progress=False)
    return tok, root


def test_useful_tokens_are_one_count_for_our_batches_and_the_peers_rows(sft):
    tok, root = sft
    examples = jobs_common.shard_examples(root, "train")
    # the peer's rows: unshifted labels built from the shard's mask
    peer = sum(jobs_common.loss_tokens([jobs_common.sft_labels(e["tokens"], e["mask"])], shifted=False)
               for e in examples)
    # our loader's batches over one epoch (shifted labels), padded and packed
    for packed in (False, True):
        ld = dl.build_loader("sft", root, "train", seq_len=T, micro_batch=1, global_batch=1, rank=0, world_size=1,
                             seed=0, pad_id=tok.pad_id, packed=packed)
        ours = sum(jobs_common.loss_tokens(ld.next_batch()["labels"], shifted=True)
                   for _ in range(ld.samples_per_epoch))
        assert ours == peer
    by_hand = sum(int(e["mask"][1:].sum()) for e in examples)  # targets: the trained tokens after the first
    assert peer == by_hand > 0


def test_heldout_loss_equals_the_loops_validation(sft):
    tok, root = sft
    cfg = config.load_config(None, {"MODEL_PRESET": "debug"}, use_environ=False)
    torch.manual_seed(0)
    model = Transformer(cfg.model_args(tok.vocab_size)).eval()
    examples = jobs_common.shard_examples(root, "train")
    rows = [(e["tokens"].tolist(), jobs_common.sft_labels(e["tokens"], e["mask"])) for e in examples]
    got = jobs_common.heldout_loss(lambda x: model(x), rows, torch.no_grad)
    # the loop's validation loss over the same examples: one padded batch holding the whole epoch
    n = len(examples)
    batch = dl.build_loader("sft", root, "train", seq_len=T, micro_batch=n, global_batch=n, rank=0, world_size=1,
                            seed=0, pad_id=tok.pad_id).next_batch()
    assert sorted(batch["sample_index"].tolist()) == list(range(n))
    loss_sum, units = objectives.SupervisedFineTuning(cfg).eval_loss(model, batch)
    assert got == pytest.approx(float(loss_sum) / units, rel=1e-5)


def test_gpu_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_bench_tables_are_written_whole_and_the_orchestrator_stays_torch_free(tmp_path):
    """fileio.write_text_atomic (the writer of the bench tables and the checkpoint pointers) replaces the file in
    one rename and leaves no temp file; bench/jobs.py imports it without importing torch (its children's peak RSS is measured)."""
    from fileio import write_text_atomic

    out = tmp_path / "table.md"
    write_text_atomic(out, "old\n")
    write_text_atomic(out, "| new |\n")
    assert out.read_text() == "| new |\n" and [p.name for p in tmp_path.iterdir()] == ["table.md"]
    code = "import sys; import bench.jobs; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


@pytest.mark.slow
def test_isa_profile_reaches_the_children_and_the_result_file(tmp_path):
    """`python -m bench.run_all --isa avx2` re-executes itself under the AVX2 limits; the child it starts (as it
    starts every bench) runs ATen's AVX2 kernels and oneDNN's AVX2 code, and the saved result file records that
    profile, checked in that child."""
    if "avx2" not in isa.cpu_flags():
        pytest.fail("this test needs an x86 CPU with AVX2 (every host the bench targets has it)")
    env = {k: v for k, v in os.environ.items() if k not in (*isa.LIMITS, isa.MARK)}
    r = subprocess.run([sys.executable, "-m", "bench.run_all", "--isa", "avx2", "--dry-run", "--only", "generate",
                        "--save", "probe", "--results-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       env=env, check=True)
    assert "would run: -m bench.generate_throughput" in r.stdout
    rec = json.loads((tmp_path / "probe.json").read_text())
    profile = rec["cpu_profile"]
    assert profile.startswith("ATen capability AVX2, avx2 profile (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 "
                              "MKL_ENABLE_INSTRUCTIONS=AVX2), oneDNN isa Intel AVX2,"), profile
    assert "python -m bench.run_all --isa avx2" in rec["command"]
    # each profile compiles into its own inductor cache; native drops limits a user left in the environment
    assert isa.environment("avx2", {})["TORCHINDUCTOR_CACHE_DIR"] != isa.environment("avx512_bf16", {}).get(
        "TORCHINDUCTOR_CACHE_DIR")
    assert not set(isa.LIMITS) & set(isa.environment("native", {"ATEN_CPU_CAPABILITY": "avx2"}))
    # a process marked with a profile whose limits it does not hold is refused where the profile is recorded
    bad = {**env, isa.MARK: "avx2"}
    r = subprocess.run([sys.executable, "-m", "bench.results_file"], cwd=ROOT, capture_output=True, text=True, env=bad)
    assert r.returncode != 0 and "the profile wants" in r.stderr
