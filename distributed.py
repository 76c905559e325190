"""torchrun environment -> process group, rank helpers, and ONE function that turns a built model into
the training model (activation checkpointing -> torch.compile -> FSDP2 or DDP, in that order).

Single process (plain `python train.py`) needs no process group; every helper then answers for a world
of one. Multi-node needs nothing special: torchrun (--nnodes/--node_rank/--master_addr/--master_port or
--rdzv-backend c10d) exports RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT and env:// reads them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from errors import UserError


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def select_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """DEVICE: auto picks cuda -> mps -> cpu; an explicit device that is missing is a user error. On CUDA the
    process takes GPU `local_rank` of its node; more local ranks than GPUs is a user error (NCCL refuses two ranks
    on one GPU), unless CUDA_VISIBLE_DEVICES gives each process one GPU of its own (then device 0; not under a
    torchrun that starts several processes on the node, which all see the same CUDA_VISIBLE_DEVICES)."""
    if preference == "auto":
        if torch.cuda.is_available():
            preference = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            preference = "mps"
        else:
            preference = "cpu"
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise UserError("DEVICE=cuda but torch sees no CUDA device: install a CUDA build of torch or set DEVICE=cpu")
        n = torch.cuda.device_count()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        # a launcher (e.g. srun --gpus-per-task=1) gave this process a GPU of its own; torchrun passes one
        # CUDA_VISIBLE_DEVICES to all its local workers, so several of them under one GPU are sharing it
        bound = n == 1 and visible != "" and "," not in visible and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) == 1
        if local_rank >= n and not bound:
            raise UserError(f"LOCAL_RANK={local_rank} but this node has {n} CUDA device(s): two ranks would share a "
                            f"GPU; start at most {n} processes per node (torchrun --nproc_per_node {n})")
        index = 0 if bound else local_rank
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if preference == "mps" and not torch.backends.mps.is_available():
        raise UserError("DEVICE=mps but MPS is not available: set DEVICE=cpu")
    return torch.device(preference)


def init_distributed(device_preference: str = "auto", timeout_s: float = 1800.0,
                     group_of_one: bool = False) -> DistInfo:
    """Read torchrun's env; start the process group (nccl on CUDA, gloo otherwise) when WORLD_SIZE > 1, or
    when group_of_one asks for it (FSDP2 shards over a group even of one) and torchrun launched this process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_preference, local_rank)
    launched = "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ
    if (world > 1 or (group_of_one and launched)) and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            kwargs["device_id"] = device  # binds the communicator to this GPU eagerly
        restart = elastic_restart_count()
        if restart > 0:
            # torchelastic restarted the workers on the same store: the previous attempt's keys (e.g. gloo's
            # peer addresses) are still in it, and a new rank can read a dead peer's address and fail or hang.
            # A key prefix per attempt isolates them.
            kwargs["store"] = dist.PrefixStore(f"attempt_{restart}/", _tcp_store(rank, world, timeout_s))
            kwargs.update(rank=rank, world_size=world)
        else:
            kwargs["init_method"] = "env://"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank, local_rank, world, device)


def elastic_restart_count() -> int:
    """How often torchelastic (torchrun --max-restarts) restarted this worker group; 0 on the first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _tcp_store(rank: int, world: int, timeout_s: float) -> dist.Store:
    """A client of the rendezvous store torchrun exported (MASTER_ADDR/MASTER_PORT); rank 0 hosts it unless the
    elastic agent does (TORCHELASTIC_USE_AGENT_STORE=True, the torchrun default)."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=rank == 0 and not agent, timeout=timedelta(seconds=timeout_s))


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUPS.clear()  # they belonged to the destroyed default group


# ---- rank helpers -------------------------------------------------------------------------------------


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity in one process); returns t."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sum_floats(values: list[float]) -> list[float]:
    """Sum a few Python numbers over ranks in one collective (float64 so token counts stay exact). The
    numbers travel over the CPU (gloo) group: no device tensor, so no wait for the GPU's queued work."""
    if not is_dist() or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=_cpu_group())
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any (e.g. 'a signal arrived'): all ranks then act together.
    Collective. The flag travels over a CPU (gloo) group, so asking never waits for the GPU's queued work:
    the training step may ask between micro-batches without a device sync. One process: no collective."""
    if not is_dist() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group())
    return bool(t.item())


def on_rank0(compute: Callable[[], str]) -> str:
    """compute() run on rank 0 only, its text given to every rank (e.g. a digest of weights every rank would
    otherwise read in full from shared storage). Collective over the CPU group; one process: compute()."""
    if not is_dist() or dist.get_world_size() == 1:
        return compute()
    data = torch.tensor(list(compute().encode()), dtype=torch.uint8) if dist.get_rank() == 0 else None
    n = torch.tensor([len(data) if data is not None else 0])
    dist.broadcast(n, src=0, group=_cpu_group())
    if data is None:
        data = torch.empty(int(n.item()), dtype=torch.uint8)
    dist.broadcast(data, src=0, group=_cpu_group())
    return bytes(data.tolist()).decode()


# The CPU (gloo) groups made over the default group, by purpose ("flags", "checkpoint/<name>"), each made on
# first use. Process-wide because torch's process groups are: the default group belongs to the process
# (init_process_group / destroy_process_group), every group made from it lives until it is destroyed, and
# making one is a collective that every rank must call in the same order. Each group is therefore made once
# per process and shared by whoever asks for it (the flag all-reduces of run_control, train and the
# evaluation hooks; the checkpoint writes); destroy() forgets them with the default group.
_CPU_GROUPS: dict[str, Any] = {}


def _cpu_group() -> dist.ProcessGroup:
    """The default group when it is gloo, else a gloo group over the same ranks (made once)."""
    if "flags" not in _CPU_GROUPS:
        _CPU_GROUPS["flags"] = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _CPU_GROUPS["flags"]


def checkpoint_group(name: str) -> Any:
    """The process group the checkpoint writes called `name` coordinate over (None in one process). A gloo
    group per name, so writes running in the background (async save), each in its own thread, never interleave
    their collectives with each other's or the training step's. Collective on first use of a name."""
    if not is_dist() or dist.get_world_size() == 1:
        return None
    key = f"checkpoint/{name}"
    if key not in _CPU_GROUPS:
        _CPU_GROUPS[key] = dist.new_group(backend="gloo")
    return _CPU_GROUPS[key]


# ---- wrapping -----------------------------------------------------------------------------------------


def _checkpoint_block(block: nn.Module) -> None:
    """Recompute the block's activations in backward. Patches the instance's forward (instead of a wrapper
    module) so parameter names — and therefore checkpoints — are unchanged."""
    from torch.utils.checkpoint import checkpoint

    inner = block.forward

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward


def parallelize(model: nn.Module, cfg: Any, device: torch.device,
                compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Apply, in this order (torchtitan's): activation checkpointing per block -> torch.compile per block
    -> FSDP2 (fully_shard per block, then the root) or DDP (root) when world_size > 1.

    Returns the module to call in the loop. Parameter names of `model` are unchanged by every step
    (compile and fully_shard work in place; DDP's `.module` is the original model), so the caller keeps
    using `model` for state dicts. With USE_FSDP in a single process, FSDP2 still shards over a world of
    one — useful to test the code path. `compute_dtype` is the run's training precision: FSDP2 gathers the
    parameters in it when it is bf16 (fsdp_mixed_precision)."""
    s = cfg.system
    blocks = list(model.layers)
    if s.activation_checkpointing:
        for b in blocks:
            _checkpoint_block(b)
    if s.use_torch_compile:
        for b in blocks:
            b.compile()  # in place: keeps names; per block compiles once and reuses the graph
    if s.use_fsdp:
        from torch.distributed.fsdp import fully_shard

        if not is_dist():
            raise UserError("USE_FSDP=true needs a process group: launch with torchrun (even --nproc_per_node 1)")
        mesh = fsdp_mesh(s.fsdp_shard_group_size, device)
        mp = fsdp_mixed_precision(compute_dtype)
        for b in blocks:
            fully_shard(b, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    if world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    return model


def fsdp_mixed_precision(compute_dtype: torch.dtype | None) -> Any:
    """FSDP2's MixedPrecisionPolicy for a run computing in `compute_dtype`. bf16: the fp32 shards (the master
    weights the optimizer updates) are cast once per all-gather, so the gather moves half the bytes and every
    matmul gets bf16 weights without autocast's per-call cast; gradients are reduced and kept in fp32. fp32
    (and anything else): parameters gathered as stored. fp16 never reaches FSDP2 (train.training_precision
    refuses it: GradScaler would find overflow per shard and the ranks would skip different steps)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    param_dtype = torch.bfloat16 if compute_dtype == torch.bfloat16 else None
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def fsdp_mesh(shard_group_size: int, device: torch.device) -> Any:
    """The device mesh FSDP2 shards over: None (every rank, fully_shard's default) when shard_group_size is 0
    or the world size; else HSDP, a 2-D mesh ("replicate", "shard"): parameters sharded within groups of
    `shard_group_size` consecutive ranks (one node's GPUs under torchrun), each group a replica of the others,
    gradients reduce-scattered within a group and all-reduced across groups. Collective (creates groups)."""
    world = world_size()
    if shard_group_size in (0, world):
        return None
    if shard_group_size < 0 or world % shard_group_size:
        raise UserError(f"FSDP_SHARD_GROUP_SIZE={shard_group_size} does not divide the world size {world}: set it "
                        f"to the GPUs per node (a divisor of {world}), or 0 to shard over all ranks")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world // shard_group_size, shard_group_size),
                            mesh_dim_names=("replicate", "shard"))


def local_block(t: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, offset) of the block of the whole tensor this rank holds of DTensor `t` (torch's own
    computation of it, the one DTensor uses: uneven splits give the last ranks fewer rows, or none)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(shape), tuple(offset)


def materialize(model: nn.Module, device: torch.device,
                full_tensor: Callable[[str, nn.Parameter], torch.Tensor],
                rows: Callable[[str, int, int, tuple[int, ...]], torch.Tensor | None] | None = None) -> None:
    """Allocate a model built on the meta device (FSDP2-sharded or not) on `device` and fill every parameter,
    in named_parameters() order, from `full_tensor(name, param)`: the whole tensor, of which this rank keeps
    its own shard. One full tensor exists at a time, never the whole model. With `rows(name, start, stop,
    full_shape)` (a source that reads dim-0 slices and checks the tensor's full shape; None where it cannot) a
    rank whose shard is a block of rows reads only that block. Buffers are the model's own business (Transformer recomputes its RoPE table when moved)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    from tqdm import tqdm

    ties = _ties(model)
    model.to_empty(device=device)
    _restore_ties(model, ties)
    named = list(model.named_parameters())
    with torch.no_grad():
        for name, p in tqdm(named, desc="filling the shards", unit="tensor", disable=not is_main(), leave=False):
            if rows is not None and isinstance(p, DTensor):
                local_shape, offset = local_block(p)
                whole_rows = p.ndim > 0 and all(o == 0 and n == f for o, n, f in
                                                zip(offset[1:], local_shape[1:], p.shape[1:], strict=True))
                if whole_rows and local_shape[0] == 0:  # an uneven split left this rank no rows
                    continue
                part = rows(name, offset[0], offset[0] + local_shape[0], tuple(p.shape)) if whole_rows else None
                if part is not None:
                    if tuple(part.shape) != tuple(local_shape):
                        raise UserError(f"tensor {name}: rows {offset[0]}:{offset[0] + local_shape[0]} read as "
                                        f"{tuple(part.shape)}, the shard is {tuple(local_shape)}; the config and "
                                        "weights disagree")
                    p.to_local().copy_(part.to(device=device, dtype=p.dtype))
                    continue
            full = full_tensor(name, p)
            if tuple(full.shape) != tuple(p.shape):
                raise UserError(f"tensor {name} has shape {tuple(full.shape)}, the model {tuple(p.shape)}; the "
                                "config and weights disagree")
            full = full.to(device=device, dtype=p.dtype)
            if isinstance(p, DTensor):  # every rank holds `full`: slice its shard without communication
                p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local())
            else:
                p.copy_(full)
            del full


def shard_frozen_copy(frozen: nn.Module, model: nn.Module, device: torch.device,
                      compute_dtype: torch.dtype | None = None) -> None:
    """`frozen`: a meta-device copy of `model` taken before parallelize (a frozen reference). `model` is now
    FSDP2-sharded and filled: shard `frozen` on the same mesh with the same mixed precision as the model
    (`compute_dtype`, as given to parallelize: the copy's forward must compute exactly as the model's does)
    — fully_shard per block, then the root; no activation checkpointing, no compile, resharded after each
    forward — and copy `model`'s local shards into it. Every rank copies only what it holds: no read of the
    source, no gather."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    sharded = dict(model.named_parameters())
    meshes = {p.device_mesh for p in sharded.values() if isinstance(p, DTensor)}
    if len(meshes) != 1:
        raise RuntimeError(f"shard_frozen_copy: the model's parameters are on {len(meshes)} meshes, expected one "
                           "(an FSDP2-sharded model)")
    mesh, mp = meshes.pop(), fsdp_mixed_precision(compute_dtype)
    for block in frozen.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(frozen, mesh=mesh, mp_policy=mp)
    ties = _ties(frozen)
    frozen.to_empty(device=device)
    _restore_ties(frozen, ties)
    with torch.no_grad():
        for name, p in frozen.named_parameters():
            src = sharded[name]
            if tuple(p.shape) != tuple(src.shape) or getattr(p, "placements", None) != getattr(src, "placements", None):
                raise RuntimeError(f"shard_frozen_copy: {name} is {tuple(p.shape)} {getattr(p, 'placements', None)} "
                                   f"in the copy but {tuple(src.shape)} {getattr(src, 'placements', None)} in the "
                                   "model; the copy must be taken from the model before parallelize")
            local = p.to_local() if isinstance(p, DTensor) else p
            local.copy_(src.to_local() if isinstance(src, DTensor) else src)


def _restore_ties(model: nn.Module, ties: list[list[str]]) -> None:
    """to_empty gives each module its own tensor (FSDP2 keeps the ties it manages): share them again."""
    for names in ties:
        first = model.get_parameter(names[0])
        for other in names[1:]:
            owner, _, attr = other.rpartition(".")
            if model.get_parameter(other) is not first:
                setattr(model.get_submodule(owner), attr, first)


def _ties(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that share one tensor (e.g. a tied embedding and head), in module order."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model (names as in model.py): strips DDP (`.module`) and torch.compile (`._orig_mod`) in any
    nesting. FSDP2's fully_shard wraps nothing (it changes the module's class in place): returned as is."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or isinstance(unwrap(model), FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool, unsharded_accumulation: bool = False) -> Iterator[None]:
    """How one micro-batch's backward reduces its gradients; `sync` is True on the step's last micro-batch.

    DDP: no all-reduce before the last micro-batch (no_sync; its gradients are whole on every rank anyway).
    FSDP2, by default: a reduce-scatter after every micro-batch (as torchtitan does), so a rank only ever holds
    its gradient shards, summed over the micro-batches; under HSDP the all-reduce across replicas waits for
    the last micro-batch, the partial sums kept sharded meanwhile (set_requires_all_reduce).
    FSDP2 with unsharded_accumulation (FSDP_UNSHARDED_ACCUMULATION): no reduction until the last
    micro-batch (set_requires_gradient_sync), so one collective per step instead of one per micro-batch,
    but every rank holds a full fp32 gradient copy from the first micro-batch's backward to the last's."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
        return
    if is_fsdp(model):
        if unsharded_accumulation:
            model.set_requires_gradient_sync(sync)
        else:
            model.set_requires_gradient_sync(True)
            model.set_requires_all_reduce(sync)
    yield


def grad_norm_and_clip(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The global L2 norm of all gradients (before clipping), clipping to max_norm when > 0.

    FSDP2 gradients are DTensors sharded over ranks: get_total_norm returns a DTensor holding a partial
    norm per rank; full_tensor() reduces it to the true global norm before clipping. Nothing here reads a
    value on the host (the caller fetches the norm with the loss in one sync): a non-finite norm leaves
    non-finite or zero gradients, and the caller skips that step (under fp16, GradScaler's unscale_ has
    already recorded the overflow and skips it)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    from torch.distributed.tensor import DTensor

    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
