"""evaluation.run, the pass every task shares: each example counted exactly once over the ranks, padding copies
never counted, the same number of batches on every rank, 2 gloo ranks = 1 process, eval mode without autograd
inside and the model's mode restored, the stop check before every batch."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import free_port

import evaluation
from errors import UserError
from tokenizer import Tokenizer


class Recorder(torch.nn.Module):
    """No forward is run: the task's score reads the examples; the module records what `run` set up."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.batches: list[list[int]] = []


def counting_task(model: Recorder) -> evaluation.Task[int, int]:
    """Example k (an int) counts [1, k] ("seen", "value"); encode doubles it so the encoding is seen too."""

    def score(batch: list[int]) -> list[list[float]]:
        assert not model.training and not torch.is_grad_enabled()
        model.batches.append(batch)
        return [[1.0, float(enc // 2)] for enc in batch]

    return evaluation.Task("count", ("seen", "value"), lambda k: 2 * k, score)


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_gives_every_example_once_and_equal_shares(n, world):
    examples = [f"ex{i}" for i in range(n)]
    shares = [evaluation.shard(examples, r, world) for r in range(world)]
    assert all(len(s) == math.ceil(n / world) for s in shares)
    counted = sorted(ex for s in shares for ex, w in s if w == 1)
    assert counted == sorted(examples)
    assert all(ex == examples[0] for s in shares for ex, w in s if w == 0)
    assert all(w in (0, 1) for s in shares for _, w in s)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_run_alone_sum_to_one_process(world):
    examples = list(range(1, 8))  # 7 examples: every world size here pads some rank
    one = Recorder()
    single = evaluation.run(one, counting_task(one), examples, batch_size=2, rank=0, world_size=1,
                            device=torch.device("cpu"))
    assert single == ({"seen": 7.0, "value": float(sum(examples))}, 7)
    per_rank, n_batches = [], []
    for r in range(world):  # no process group: each rank returns its own share's totals
        m = Recorder()
        per_rank.append(evaluation.run(m, counting_task(m), examples, batch_size=2, rank=r, world_size=world,
                                       device=torch.device("cpu")))
        n_batches.append(len(m.batches))
        assert [e for b in m.batches for e in b] == [2 * k for k, _ in evaluation.shard(examples, r, world)]
    assert len(set(n_batches)) == 1  # the same number of batches everywhere (collective forwards)
    assert sum(n for _, n in per_rank) == 7  # the padding copies of example 1 are scored, never counted
    assert {k: sum(s[k] for s, _ in per_rank) for k in ("seen", "value")} == single[0]


def test_order_sorts_the_share_before_batching():
    m = Recorder()
    task = counting_task(m)
    longest_first = evaluation.Task(task.name, task.counts, task.encode, task.score, order=lambda enc: -enc)
    evaluation.run(m, longest_first, [3, 1, 4, 1, 5], batch_size=2, rank=0, world_size=1,
                   device=torch.device("cpu"))
    assert m.batches == [[10, 8], [6, 2], [2]]


def test_mode_restored_and_stop_check_before_every_batch():
    class Stop(Exception):
        pass

    calls = []

    def stop_after(k):
        def check():
            calls.append(len(calls))
            if len(calls) > k:
                raise Stop

        return check

    m = Recorder().train()
    totals = evaluation.run(m, counting_task(m), list(range(5)), batch_size=2, rank=0, world_size=1,
                            device=torch.device("cpu"), stop_check=stop_after(10))
    assert totals[1] == 5 and len(calls) == 3 and m.training and torch.is_grad_enabled()
    m.eval()
    calls.clear()
    m.batches.clear()
    with pytest.raises(Stop):
        evaluation.run(m, counting_task(m), list(range(5)), batch_size=2, rank=0, world_size=1,
                       device=torch.device("cpu"), stop_check=stop_after(1))
    assert len(calls) == 2 and len(m.batches) == 1 and not m.training  # abandoned before batch 2, mode kept


def test_load_once_reads_a_file_once_per_task_path_and_limit(tmp_path):
    reads = []

    def load(path, limit):
        reads.append((str(path), limit))
        return [path, limit]

    a = evaluation.load_once("t_test", load, tmp_path / "a", 3)
    assert evaluation.load_once("t_test", load, tmp_path / "a", 3) is a
    evaluation.load_once("t_test", load, tmp_path / "a", None)
    evaluation.load_once("t_other", load, tmp_path / "a", 3)
    assert reads == [(str(tmp_path / "a"), 3), (str(tmp_path / "a"), None), (str(tmp_path / "a"), 3)]


def test_bos_asked_of_a_tokenizer_without_one_is_a_user_error():
    class Bytes(Tokenizer):
        bos_id = None

        def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
            return list(text.encode())

    assert evaluation.encode_pair(Bytes(), "ab ", "c", add_bos=False) == ([97, 98], [32, 99])
    with pytest.raises(UserError, match="no BOS token; pass add_bos=False"):
        evaluation.encode_pair(Bytes(), "ab", " c", add_bos=True)


def _gloo_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        m = Recorder()
        sums, n = evaluation.run(m, counting_task(m), list(range(1, 8)), batch_size=2, rank=rank,
                                 world_size=world, device=torch.device("cpu"))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"sums": sums, "n": n, "batches": len(m.batches)}))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_return_the_single_process_totals(tmp_path):
    import torch.multiprocessing as mp

    m = Recorder()
    sums, n = evaluation.run(m, counting_task(m), list(range(1, 8)), batch_size=2, rank=0, world_size=1,
                             device=torch.device("cpu"))
    mp.spawn(_gloo_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):  # every rank holds the global totals; rank 1's padding copy is not among them
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got == {"sums": sums, "n": n, "batches": 2}
