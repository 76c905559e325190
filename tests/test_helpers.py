"""The shared test helpers that other tests rely on to be able to fail: the DTensor gather guard the torchrun
launchers (tests/*_without_gathers.py, tests/train_gathering_adapters_only.py) run saves and builds under."""

from __future__ import annotations

import pytest
import torch
from helpers import dtensor_gathers_refused


def test_the_gather_guard_refuses_inside_lets_allowed_through_and_restores():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)  # no peers: collectives are no-ops
    try:
        mesh = init_device_mesh("cpu", (2,))
        t = distribute_tensor(torch.zeros(4, 3), mesh, [Shard(0)])
        with dtensor_gathers_refused("in this test"):
            with pytest.raises(AssertionError, match=r"shape \(4, 3\) was gathered in this test"):
                t.full_tensor()
            with pytest.raises(AssertionError, match="was gathered in this test"):
                t.redistribute(mesh, [Replicate()])
        seen = []
        with dtensor_gathers_refused("in this test", allowed=lambda d: seen.append(tuple(d.shape)) or True):
            assert t.full_tensor().shape == (4, 3)
        assert set(seen) == {(4, 3)}  # full_tensor goes through redistribute: asked once or twice
        assert t.full_tensor().shape == (4, 3)  # restored on exit
    finally:
        dist.destroy_process_group()
