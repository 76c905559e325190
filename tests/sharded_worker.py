"""torchrun worker for tests/test_sharded_build.py (CPU, gloo): the meta-device build under FSDP2 against the
single-process build, and per-rank memory after one training step.

    torchrun --nproc_per_node N tests/sharded_worker.py OUT_DIR [SOURCE ...]

For random init (debug preset, untied and tied) and for every SOURCE (any model_utils.load_model source) it
builds the model as a single process does (train.build_model: the whole model) and as an FSDP2 rank does
(train.build_meta_model -> distributed.parallelize -> train.materialize_model), then records whether this
rank's shard of every parameter equals the same slice of the single-process tensor, how many full matrices of
the source were alive at once while loading, how many elements it read from safetensors files (and how many
whole matrices), and how many parameter elements this rank holds. Last, one AdamW
step on the sharded model: the bytes of this rank's parameters and optimizer state. Writes
OUT_DIR/rank<R>.json.

    torchrun --nproc_per_node N tests/sharded_worker.py --grad-bytes OUT_DIR [SHARD_GROUP_SIZE]

Gradient accumulation under FSDP2 instead: for both accumulation modes (distributed.gradient_sync), fp32 and
bf16, 1 and 4 micro-batches, the most gradient bytes this rank held after any micro-batch's backward (its
.grad shards plus FSDP2's own accumulation buffers, read from FSDP2's internals: held_gradient_bytes), and
the summed gradient shards after the last one.
"""

from __future__ import annotations

import json
import sys
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import safetensors
import torch

import config
import distributed as D
import optim
import tokenizer
import train
from losses import cross_entropy_sum

ROOT = Path(__file__).resolve().parent.parent


class CountingWeights(Mapping):
    """Wraps open_weights' mapping: counts the full matrices it handed out that are still alive (1-D gains of
    Meta shards are views of the memory-mapped file the mapping keeps open, not copies)."""

    def __init__(self, inner: Mapping):
        self.inner, self.alive, self.max_alive, self.reads = inner, 0, 0, 0

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.inner[name]
        if t.ndim < 2:
            return t
        self.alive += 1
        self.reads += 1
        self.max_alive = max(self.max_alive, self.alive)
        weakref.finalize(t, self._freed)
        return t

    def _freed(self) -> None:
        self.alive -= 1

    def rows(self, name: str, start: int, stop: int, full_shape: tuple[int, ...]) -> torch.Tensor | None:
        return self.inner.rows(name, start, stop, full_shape) if hasattr(self.inner, "rows") else None

    def __iter__(self) -> Iterator[str]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class RecordingSafeOpen:
    """safetensors.safe_open that counts what is read: elements fetched (whole tensors and slices) and how many
    whole matrices (get_tensor of a 2-D tensor)."""

    elements = 0
    whole_matrices = 0

    def __init__(self, *args, **kwargs):
        self.handle = _safe_open(*args, **kwargs)

    def __enter__(self):
        self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def __getattr__(self, name: str):  # keys(), metadata(), ...
        return getattr(self.handle, name)

    def get_tensor(self, name: str) -> torch.Tensor:
        t = self.handle.get_tensor(name)
        RecordingSafeOpen.elements += t.numel()
        RecordingSafeOpen.whole_matrices += t.ndim >= 2
        return t

    def get_slice(self, name: str):
        return RecordingSlice(self.handle.get_slice(name))


class RecordingSlice:
    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name: str):  # get_shape(), get_dtype()
        return getattr(self.inner, name)

    def __getitem__(self, index):
        t = self.inner[index]
        RecordingSafeOpen.elements += t.numel()
        return t


_safe_open = safetensors.safe_open
safetensors.safe_open = RecordingSafeOpen  # the readers import it when they run


def compare(cfg: config.Config, tok, source: str) -> dict:
    from torch.distributed.tensor import DTensor, distribute_tensor

    reference, _ = train.build_model(cfg, tok, source, torch.device("cpu"))
    ref = dict(reference.named_parameters())
    model, margs, weights = train.build_meta_model(cfg, tok, source)
    counting = CountingWeights(weights) if weights is not None else None
    D.parallelize(model, cfg, torch.device("cpu"))
    RecordingSafeOpen.elements = RecordingSafeOpen.whole_matrices = 0
    train.materialize_model(model, counting, cfg.training.seed, torch.device("cpu"), source)
    read = {"read_elements": RecordingSafeOpen.elements, "whole_matrices_read": RecordingSafeOpen.whole_matrices}
    equal, local, total = True, 0, 0
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor), name
        want = distribute_tensor(ref[name].detach(), p.device_mesh, p.placements, src_data_rank=None).to_local()
        equal &= torch.equal(p.to_local(), want)
        local += p.to_local().numel()
        total += p.numel()
    tied = margs.tie_embeddings and model.output.weight is model.tok_embeddings.weight
    return {"equal": bool(equal), "local_numel": local, "total_numel": total, "tied_kept": tied,
            "max_alive": counting.max_alive if counting else None, "reads": counting.reads if counting else None,
            **read}


def step_memory(cfg: config.Config, tok) -> dict:
    model, margs, _ = train.build_meta_model(cfg, tok, "")
    D.parallelize(model, cfg, torch.device("cpu"))
    train.materialize_model(model, None, cfg.training.seed, torch.device("cpu"), "")
    opt = optim.build_optimizer(model, cfg, torch.device("cpu"))
    x = torch.randint(0, margs.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    model(x).float().logsumexp(-1).mean().backward()
    opt.step()
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    params = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    state = sum(local(v).numel() * local(v).element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.ndim > 0)
    return {"param_bytes": params, "optimizer_bytes": state}


def held_gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes of gradients this rank holds: the .grad of its parameter shards, and what FSDP2 keeps outside
    them while accumulating: an unsharded parameter's .grad and its reduce-dtype copy
    (FSDPParam.unsharded_accumulated_grad) when gradient sync is off, HSDP's partial reduce-scatter output
    when only the all-reduce is off."""
    from torch.distributed.fsdp import FSDPModule

    def nbytes(t: torch.Tensor | None) -> int:
        if t is None:
            return 0
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    total = sum(nbytes(p.grad) for p in model.parameters())
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        for group in m._get_fsdp_state()._fsdp_param_groups:
            total += nbytes(group._partial_reduce_output)
            for fp in group.fsdp_params:
                total += nbytes(fp.unsharded_accumulated_grad)
                if hasattr(fp, "_unsharded_param"):
                    total += nbytes(fp._unsharded_param.grad)
    return total


def accumulation_bytes(cfg: config.Config, tok, accum: int, unsharded: bool, compute_dtype: torch.dtype) -> dict:
    """`accum` micro-batches of one step through the sharded model as train.forward_backward runs them ->
    the most gradient bytes held after any micro-batch, and a digest of the summed gradient shards."""
    import precision

    model, margs, _ = train.build_meta_model(cfg, tok, "")
    D.parallelize(model, cfg, torch.device("cpu"), compute_dtype=compute_dtype)
    train.materialize_model(model, None, cfg.training.seed, torch.device("cpu"), "")
    g = torch.Generator().manual_seed(D.rank())
    x = torch.randint(0, margs.vocab_size, (4, 32), generator=g)
    gathered = []  # the dtype the first block's matmuls see: FSDP2's gathered parameters
    model.layers[0].register_forward_pre_hook(lambda mod, _: gathered.append(str(mod.attention.wq.weight.dtype)))
    held = []
    for m, rows in enumerate(x.chunk(accum)):  # the same 4 rows per rank, in `accum` micro-batches
        with D.gradient_sync(model, sync=m == accum - 1, unsharded_accumulation=unsharded):
            with precision.autocast("cpu", compute_dtype):
                loss = cross_entropy_sum(model(rows[:, :-1]), rows[:, 1:])
            (loss / x[:, 1:].numel()).backward()
        held.append(held_gradient_bytes(model))
    grads = torch.cat([p.grad.to_local().flatten() for p in model.parameters()])
    return {"held": held, "gathered_dtype": gathered[0], "grad_dtype": str(grads.dtype), "grad_sum": grads.double().sum().item(), "grad_abs": grads.double().abs().sum().item(),
            "numel": sum(p.numel() for p in model.parameters()),
            "local_numel": sum(p.to_local().numel() for p in model.parameters())}


def grad_bytes_main(out: Path, shard_group_size: int) -> None:
    D.init_distributed("cpu")
    base = {"USE_FSDP": "true", "DEVICE": "cpu", "FSDP_SHARD_GROUP_SIZE": str(shard_group_size)}
    cfg = config.load_config(str(ROOT / "configs" / "debug.env"), base, use_environ=False)
    tok = tokenizer.load_tokenizer(str(ROOT / "tokenizer.model"))
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        for unsharded in (False, True):
            for accum in (1, 4):
                key = f"{str(dtype).removeprefix('torch.')} {'unsharded' if unsharded else 'sharded'} {accum}"
                result[key] = accumulation_bytes(cfg, tok, accum, unsharded, dtype)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{D.rank()}.json").write_text(json.dumps(result))
    D.destroy()


def main() -> None:
    if sys.argv[1] == "--grad-bytes":
        return grad_bytes_main(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    out, sources = Path(sys.argv[1]), sys.argv[2:]
    info = D.init_distributed("cpu")
    if not D.is_dist():  # one process: FSDP2 still shards, over a world of one
        torch.distributed.init_process_group("gloo")
    base = {"USE_FSDP": "true", "DEVICE": "cpu", "ADAMW_USE_FUSED": "false"}
    cfg = config.load_config(str(ROOT / "configs" / "debug.env"), base, use_environ=False)
    tok = tokenizer.load_tokenizer(str(ROOT / "tokenizer.model"))
    result = {"rank": info.rank, "world": info.world_size, "memory": step_memory(cfg, tok),
              "from_rank0": D.on_rank0(lambda: f"computed on rank {info.rank}")}
    if sources or info.world_size > 1:
        tied = config.load_config(str(ROOT / "configs" / "debug.env"), {**base, "TIE_EMBEDDINGS": "true"},
                                  use_environ=False)
        result["random"] = compare(cfg, tok, "")
        result["random_tied"] = compare(tied, tok, "")
        result["sources"] = {s: compare(cfg, tok, s) for s in sources}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{info.rank}.json").write_text(json.dumps(result))
    D.destroy()


if __name__ == "__main__":
    main()
