"""USE_TORCH_COMPILE=true trains to the same losses as eager (debug preset, fp32, CPU inductor).

Compilation is per transformer block (distributed.parallelize); the LM head and the fused head+loss run
eagerly around it. Slow: the first compile of a block costs tens of seconds on 2 CPU cores.
"""

from __future__ import annotations

import pytest
from helpers import run_inprocess, train_losses


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, pretrain_data):
    from torch._dynamo.utils import counters

    kw = {"MAX_STEPS": 4, "VALIDATE_EVERY_X_STEPS": 0, "SAVE_CHECKPOINTS": "false"}
    eager = train_losses(run_inprocess(tmp_path / "eager", pretrain_data, USE_TORCH_COMPILE="false", **kw))
    counters.clear()
    compiled = train_losses(run_inprocess(tmp_path / "compiled", pretrain_data, USE_TORCH_COMPILE="true", **kw))
    assert counters["stats"]["unique_graphs"] >= 1, "USE_TORCH_COMPILE=true compiled nothing"
    assert compiled.keys() == eager.keys() == {1, 2, 3, 4}
    for step in eager:  # fp32; inductor reorders reductions, so not bit-equal
        assert compiled[step] == pytest.approx(eager[step], rel=2e-4, abs=1e-4), step
    assert compiled[4] < compiled[1]
