"""Training-state checkpoints: the directory format, atomic save, retention, resume. Never unpickles on load.

Layout (format version 2): `<root>/<stage>/step_NNNNNNN/` holding
  model/                  the weights as torch.distributed.checkpoint (DCP) wrote them with its safetensors
                          storage: one `shard-RRRRR-model-00001-of-00001.safetensors` per writing rank, each
                          holding that rank's pieces of tensors under model.py's names, with the piece's offsets
                          in the file's header (tied output stored once; a LoRA run stores the adapters only,
                          + the base model's identity in config.json)
  optimizer/              optimizer tensors keyed `state/<param name>/<slot>`, sharded the same way
  optimizer.json          param groups, non-tensor and 0-dim slots, GradScaler, schedule
  trainer_state.json      step, tokens, dataloader state, every rank's RNG states, best val, early stopping, parent, precision
  config.json             {"format_version", "model_args", "settings", "cwd", "weights_fingerprint" (full-weight
                          checkpoints: checkpoint.weights_fingerprint of the saved weights), "lora"?, "base_model"?}
  peft_adapter/           optional, LoRA runs: the adapters in Hugging Face PEFT's format (lora.save_peft_adapter;
                          base_model_name_or_path = the base model's source)
and `<root>/<stage>/latest` (and `best`) — one-line text files naming a step dir, replaced atomically
after the directory is complete. A checkpoint is written into `.tmp-step_*`, fsynced, then renamed:
a crash leaves `latest` on the previous complete checkpoint.

Every rank writes its own shards (no gather; DDP's replicated tensors are spread over the ranks by DCP's
deduplication) into a directory all ranks see (a shared file system on many nodes); rank 0 writes the JSON
files, renames and moves the pointers. Only tensors go to DCP, so its safetensors storage never pickles a
value (the save plan is checked for byte items), and loading reads the safetensors headers for the layout,
never DCP's pickled `.metadata`. DCP reshards on load: a checkpoint written by N ranks (DDP or FSDP2) loads
on M ranks or into one unwrapped model. `iter_model_tensors` gives whole tensors one at a time (the export).
A run saves through a `Checkpointer`, which owns the pointers, retention and, with async saves, the one
save in flight: the shards are staged in memory and written in the background (dcp.async_save over a CPU
group of its own); `latest` moves when that write is complete, which `Checkpointer.poll` / `wait` check (the
next save and the end of the run wait for it). `save` writes one checkpoint outside a run.

Format version 1 (no `format_version` in config.json): full tensors in `model.safetensors` and
`optimizer.safetensors`; such checkpoints still load.

`TrainerState` is the loop's state as trainer_state.json stores it; `config_json` builds config.json;
`parent_source` names the weights a checkpointed run started from.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

import distributed as D
import families
from errors import UserError
from fileio import fsync_dir, fsync_file, read_json, write_text_atomic
from lora import save_peft_adapter

STEP_RE = re.compile(r"^step_(\d{7,})$")
FORMAT_VERSION = 2
MODEL_DIR, OPTIM_DIR, OPTIM_JSON = "model", "optimizer", "optimizer.json"
MODEL_FILE, OPTIM_FILE = "model.safetensors", "optimizer.safetensors"  # format version 1
STATE_FILE, CONFIG_FILE = "trainer_state.json", "config.json"
PEFT_ADAPTER_DIR = "peft_adapter"
POINTERS = ("latest", "best")  # one-line files naming a step dir
_DCP_FULL = dict(full_state_dict=True, cpu_offload=True)


def step_name(step: int) -> str:
    return f"step_{step:07d}"


_CORRUPT = "the checkpoint is incomplete or corrupt: pick another"


@dataclass
class TrainerState:
    """The loop's counters, as trainer_state.json stores them (field order = key order in the file).
    Every field has a default, so a file written before a field existed still loads."""

    step: int = 0
    tokens_seen: int = 0  # positions fed to the trained model (B x T after trimming), all ranks
    loss_tokens_seen: int = 0  # targets that carried loss, all ranks
    stage: str = ""
    parent: str | None = None  # the weights the run started from, resolved to a directory or file (None = random init)
    parent_fingerprint: str | None = None  # weights_fingerprint of those weights when the run started
    parent_requested: str | None = None  # the source as the user named it (e.g. a `latest` pointer)
    best_val: float | None = None
    best_step: int | None = None
    bad_validations: int = 0  # validations in a row without improvement (early stopping)
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0  # non-finite or spike steps in a row
    spike_steps: int = 0
    dataloader: dict | None = None  # the train loader's state_dict()
    rng: dict | None = None  # rank 0's rng_state() in checkpoints written before rng_ranks existed
    world_size: int = 1
    rng_ranks: list[dict] | None = None  # rank_rng_states(): rng_state() of every rank, by rank
    precision: str | None = None  # what the run computed in (precision.resolve's name); a resume keeps it

    @classmethod
    def from_dict(cls, d: dict) -> TrainerState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        # a checkpoint holds one of the two RNG layouts: the absent one is left out rather than written as null
        return {k: v for k, v in asdict(self).items() if not (k in ("rng", "rng_ranks") and v is None)}


def config_json(model_args: dict, settings: dict, lora_config: dict | None = None, base_source: str = "",
                base_fingerprint: str | None = None) -> dict:
    """config.json: the model args and resolved settings (a local tokenizer path made absolute), the directory
    the run ran in (`cwd`); a LoRA run adds its adapter settings and the
    identity of the base model its adapters belong to (source, sha of the base's model args, fingerprint of
    the base's weights)."""
    settings = dict(settings)
    tok = settings.get("TOKENIZER_CHECKPOINT_PATH")
    if tok and tok != "model" and Path(tok).expanduser().exists():  # readable from any directory once absolute
        settings["TOKENIZER_CHECKPOINT_PATH"] = os.path.abspath(Path(tok).expanduser())
    # the directory the run's other relative paths (e.g. INIT_FROM) are relative to
    conf: dict[str, Any] = {"model_args": model_args, "settings": settings, "cwd": os.getcwd()}
    if lora_config is not None:
        conf["lora"] = lora_config
        conf["base_model"] = {"source": base_source, "config_sha": config_sha(model_args),
                              "fingerprint": base_fingerprint}
    return conf


FINGERPRINT_PREFIX = "rows:"  # full-content fingerprints; an older sampled one is bare hex (sampled_fingerprint)


def weights_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A hash of every value of the model weights, independent of the dtype they were loaded in and of how
    they are sharded. Each row (a slice along dim 0, the dim FSDP2 shards) is hashed with its index as fp32
    bytes; a tensor's digest is the sum of its rows' digests (eight 32-bit words, each mod 2**32), so a rank
    holding some rows of a DTensor adds up its own and one all-reduce of the sums completes the tensor: no
    rank gathers anything, and N ranks give one process's value. The result hashes name, shape and digest of
    each tensor in name order. Collective when a value is a DTensor (every rank calls it with the same names)."""
    names = sorted(state_dict)
    sums = np.zeros((len(names), 8), dtype=np.int64)
    mesh_device = None
    for i, name in enumerate(names):
        t = state_dict[name].detach()
        first_row, rows = 0, t
        if hasattr(t, "device_mesh"):  # a DTensor: this rank's rows, at their offset in the whole tensor
            from torch.distributed.tensor import Replicate, Shard

            if any(not isinstance(pl, Replicate) and pl != Shard(0) for pl in t.placements):
                raise ValueError(f"{name}: weights_fingerprint reads tensors sharded along dim 0 only")
            mesh_device = t.device_mesh.device_type
            coordinate = t.device_mesh.get_coordinate()
            replica = coordinate is not None and any(
                c and isinstance(pl, Replicate) for c, pl in zip(coordinate, t.placements, strict=True))
            _, offset = D.local_block(t)
            first_row, rows = (offset[0] if t.ndim else 0), t.to_local()
            if replica or coordinate is None:
                continue  # another rank adds these rows
        sums[i] = _row_digest_sum(rows, first_row)
    if mesh_device is not None:
        sums = D.all_reduce_sum(torch.from_numpy(sums).to(mesh_device)).cpu().numpy()
    h = hashlib.sha256()
    for name, digest in zip(names, sums % (1 << 32), strict=True):
        h.update(f"{name}:{tuple(state_dict[name].shape)}:".encode())
        h.update(digest.astype("<u4").tobytes())
    return FINGERPRINT_PREFIX + h.hexdigest()


def _row_digest_sum(t: torch.Tensor, first_row: int) -> np.ndarray:
    """Sum over the rows of t (a 0-dim tensor is one row) of sha256(global row index, fp32 bytes of the row),
    read as eight little-endian 32-bit words, mod 2**32. Blocks of rows are hashed in threads (hashlib releases
    the GIL on large buffers); the sum does not depend on the order."""
    n_rows = t.shape[0] if t.ndim else 1
    if n_rows == 0:  # a rank whose shard of a short tensor is empty
        return np.zeros(8, dtype=np.int64)
    rows = t.to(device="cpu", dtype=torch.float32).reshape(n_rows, math.prod(t.shape[1:])).contiguous().numpy()
    rows = rows.astype("<f4", copy=False)  # the bytes hashed are little-endian whatever the host

    def block(start: int) -> np.ndarray:
        digests = bytearray()
        for i in range(start, min(start + _HASH_BLOCK, n_rows)):
            h = hashlib.sha256((first_row + i).to_bytes(8, "little"))
            h.update(rows[i].data)
            digests += h.digest()
        return np.frombuffer(bytes(digests), dtype="<u4").reshape(-1, 8).astype(np.int64).sum(0)

    starts = range(0, n_rows, _HASH_BLOCK)
    if rows.nbytes < (1 << 24) or len(starts) == 1:
        parts = [block(s) for s in starts]
    else:
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            parts = list(pool.map(block, starts))
    return np.sum(parts, axis=0) % (1 << 32)


_HASH_BLOCK = 4096  # rows per hashing task


def sampled_fingerprint(state_dict: Mapping[str, torch.Tensor], samples: int = 1 << 16) -> str:
    """The fingerprint checkpoints recorded before weights_fingerprint: sha256 over each tensor's name, shape and
    fp32 values, of a large tensor an evenly strided sample of `samples` values (blind to a change between the
    samples). Kept to check the parents such checkpoints name."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach()
        flat = t.reshape(-1)
        if flat.numel() > samples:
            flat = flat[:: flat.numel() // samples]
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(flat.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """weights_fingerprint of a model (FSDP2-sharded or not) under the names Transformer.state_dict() has (a tied
    head under both of its names), from the rows each rank holds. Collective under FSDP2."""
    sd = dict(model_state(model))
    tied = tied_names(model)
    if tied is not None and tied[0] in sd:
        sd[tied[1]] = sd[tied[0]]
    return weights_fingerprint(sd)


def tied_names(model: nn.Module) -> tuple[str, str] | None:
    """(embedding, head) weight names of a model whose head is its token embedding (families.py), else None."""
    args = getattr(model, "args", None)
    if not getattr(args, "tie_embeddings", False):
        return None
    family = families.of_args(args)
    return family.embedding_weight, family.head_weight


def source_fingerprint(source: str, weights: Callable[[], Mapping[str, torch.Tensor]]) -> str:
    """The fingerprint of the weights at `source`: the one a checkpoint of ours stored when it was saved (its
    weights are not hashed again), else weights_fingerprint(weights()) of the weights as read."""
    conf = Path(source) / CONFIG_FILE
    stored = read_json(conf, _CORRUPT).get("weights_fingerprint") if conf.is_file() else None
    return stored or weights_fingerprint(weights())


def parent_fingerprint(path: Path) -> str | None:
    """The fingerprint of the weights the run checkpointed at `path` started from (None: not recorded)."""
    conf = read_json(path / CONFIG_FILE, _CORRUPT) if (path / CONFIG_FILE).is_file() else {}
    recorded = (conf.get("base_model") or {}).get("fingerprint")
    if recorded:
        return recorded
    return read_trainer_state(path).parent_fingerprint if (path / STATE_FILE).is_file() else None


def parent_requested(path: Path) -> str | None:
    """How the user named the weights the run checkpointed at `path` started from (None: not recorded)."""
    return read_trainer_state(path).parent_requested if (path / STATE_FILE).is_file() else None


def check_parent(path: Path, source: str, got: str,
                 weights: Callable[[], Mapping[str, torch.Tensor]] | None = None) -> None:
    """Refuse weights (their weights_fingerprint `got`) that are not the ones the checkpoint at `path` was
    started from, e.g. a base directory re-saved since: adapters or a frozen reference on other weights
    would silently give other numbers. A checkpoint that recorded the older sampled fingerprint is checked
    in that form, from `weights()` (the same weights as `got`; without them there is nothing to compare)."""
    want = parent_fingerprint(path)
    if want is not None and not want.startswith(FINGERPRINT_PREFIX):
        if weights is None:
            return
        got = sampled_fingerprint(weights())
    if want is not None and got != want:
        shown = lambda fp: fp.removeprefix(FINGERPRINT_PREFIX)[:12]  # noqa: E731
        raise UserError(f"checkpoint {path} was started from {source} (weights fingerprint {shown(want)}), but "
                        f"{source} now holds other weights ({shown(got)}): it changed since; point INIT_FROM at "
                        "the original weights (or at these, to continue on them knowingly)")


def stage_root(cfg: Any, stage: str, for_loading: bool = False) -> Path:
    """`<STAGE>_SAVE_CHECKPOINTS_PATH/<stage>` (loading: `<STAGE>_LOAD_CHECKPOINTS_PATH` when set)."""
    key = stage.upper()
    base = (cfg.get(f"{key}_LOAD_CHECKPOINTS_PATH") if for_loading else "") or cfg[f"{key}_SAVE_CHECKPOINTS_PATH"]
    return Path(base) / stage


def resolve(spec: str, root: Path) -> Path:
    """A checkpoint dir, a step name inside `root`, or `latest` / `best` -> the directory."""
    if spec in POINTERS:
        ptr = root / spec
        if not ptr.is_file():
            raise UserError(f"no {spec!r} checkpoint in {root}: train with SAVE_CHECKPOINTS=true first or "
                            "pass a checkpoint directory")
        path = root / ptr.read_text().strip()
    else:
        path = Path(spec) if Path(spec).is_dir() else root / spec
    if not (path / STATE_FILE).is_file() and not (path / CONFIG_FILE).is_file():
        raise UserError(f"checkpoint {spec!r} not found (looked at {path}): pass a step_NNNNNNN dir, a name "
                        f"in {root}, or latest")
    return path


# ---- the state to save (collective under FSDP2, never a gather) -------------------------------------------


def model_state(model: nn.Module, trainable_only: bool = False, full: bool = False) -> dict[str, torch.Tensor]:
    """The model's tensors with model.py's names as this rank holds them: DTensor shards under FSDP2, plain
    tensors otherwise (the parameters themselves, detached: no copy, no gather). The tied output is left out
    (it is tok_embeddings.weight); trainable_only keeps the trainable ones (a LoRA run's adapters).
    full: unsharded CPU copies instead (a gather under FSDP2, every rank must call it; only for the small PEFT
    adapter copy of a LoRA run). With trainable_only the frozen parameters are dropped before that gather
    (ignore_frozen_params), so only the adapters travel, never the frozen base."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(**_DCP_FULL, ignore_frozen_params=trainable_only) if full else None
    sd = get_model_state_dict(model, options=options)
    tied = tied_names(model)
    if tied is not None:
        sd.pop(tied[1], None)
    if trainable_only:
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        sd = {k: v for k, v in sd.items() if k in keep}
    return {k: v.detach().contiguous() for k, v in sd.items()} if full else sd


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (tensors keyed `state/<param name>/<slot>`, sharded like their parameters; the JSON rest: param groups
    and the slots that are numbers or 0-dim tensors (Adam's step), with the 0-dim tensors' dtypes)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer)
    tensors, scalars, scalar_dtypes = {}, {}, {}
    for fqn, slots in osd["state"].items():
        for slot, v in slots.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                tensors[f"state/{fqn}/{slot}"] = v.detach()
            elif isinstance(v, torch.Tensor):
                scalars.setdefault(fqn, {})[slot] = v.item()
                scalar_dtypes.setdefault(fqn, {})[slot] = str(v.dtype).removeprefix("torch.")
            else:
                scalars.setdefault(fqn, {})[slot] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, {"scalars": scalars, "scalar_dtypes": scalar_dtypes, "param_groups": groups}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {fqn: dict(s) for fqn, s in meta["scalars"].items()}
    for fqn, slots in (meta.get("scalar_dtypes") or {}).items():
        for slot, dtype in slots.items():
            state[fqn][slot] = torch.tensor(state[fqn][slot], dtype=getattr(torch, dtype))
    for key, t in tensors.items():
        _, rest = key.split("/", 1)
        fqn, slot = rest.rsplit("/", 1)
        state.setdefault(fqn, {})[slot] = t
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---- DCP with its safetensors storage ---------------------------------------------------------------------


def _tensors_only_planner():
    """DCP's default save planner, refusing any byte item: the safetensors storage would pickle it."""
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    class TensorsOnlyPlanner(DefaultSavePlanner):
        def create_local_plan(self):
            plan = super().create_local_plan()
            pickled = [item.index.fqn for item in plan.items if item.type == WriteItemType.BYTE_IO]
            if pickled:
                raise AssertionError(f"checkpoint save plan has non-tensor items {pickled[:3]}: they would be "
                                     "pickled; keep them in the JSON files")
            return plan

    return TensorsOnlyPlanner()


def _single_process_is_meant() -> None:
    """DCP warns on every call without a process group; one process is a supported way to run here."""
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _dcp_write(state: dict[str, torch.Tensor], out: Path, async_save: bool) -> Future | None:
    """Every rank writes its pieces of `state` into `out` (a directory all ranks see). async_save: staged in
    memory, written in the background; -> the future of that write. Writes into directories of different
    names coordinate over different process groups (two may be in flight at once)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise AssertionError(f"non-tensor values {bad[:3]} passed to the sharded checkpoint writer")
    _single_process_is_meant()
    writer = HuggingFaceStorageWriter(str(out), save_distributed=True)
    kw = dict(storage_writer=writer, planner=_tensors_only_planner(), process_group=D.checkpoint_group(out.name),
              no_dist=not D.is_dist())
    if async_save:
        return dcp.async_save(state, **kw)
    dcp.save(state, **kw)
    return None


def _read_layout(d: Path) -> Any:
    """DCP's Metadata of a sharded directory, from the safetensors headers (never the pickled `.metadata`)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    if not d.is_dir() or not any(d.glob("*.safetensors")):
        raise UserError(f"{d} is missing or holds no .safetensors shards; the checkpoint is incomplete: pick another")
    try:
        return HuggingFaceStorageReader(str(d)).read_metadata()
    except Exception as e:  # SafetensorError (bad header, truncated), OSError, JSON in the header
        raise UserError(f"a shard in {d} is not a valid safetensors file ({str(e)[:100]}); the checkpoint is "
                        "corrupt or not ours: pick another (pickled files are never loaded from checkpoints)") from None


def _dcp_read(state: dict[str, torch.Tensor], d: Path) -> None:
    """Fill `state` (plain tensors or DTensor shards, any world size) in place from the shards in `d`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    _single_process_is_meant()
    try:
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(d)), no_dist=not D.is_dist())
    except Exception as e:
        raise UserError(f"reading the shards in {d} failed ({str(e)[:160]}); the checkpoint is corrupt or does not "
                        "fit this model: pick another") from e


def format_version(path: Path) -> int:
    conf = read_json(path / CONFIG_FILE, _CORRUPT) if (path / CONFIG_FILE).is_file() else {}
    version = int(conf.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format version {version}; this code reads up to {FORMAT_VERSION}: "
                        "update the code")
    return version


# ---- RNG -----------------------------------------------------------------------------------------------


def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNG streams: torch's CPU generator, Python's, NumPy's and, on CUDA, the generator of its
    own GPU `device` ("cuda_device"; the other GPUs of the node belong to the other ranks)."""
    np_state = np.random.get_state()
    st = {"torch": torch.get_rng_state().tolist(), "python": _listify(random.getstate()),
          "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if device is not None and device.type == "cuda":
        st["cuda_device"] = torch.cuda.get_rng_state(device).tolist()
    return st


def rank_rng_states(device: torch.device) -> list[dict]:
    """rng_state(device) of every rank, by rank (collective over a CPU group; one process: its own)."""
    own = rng_state(device)
    if not D.is_dist() or D.world_size() == 1:
        return [own]
    states: list[Any] = [None] * D.world_size()
    torch.distributed.all_gather_object(states, own, group=D.checkpoint_group("rng"))
    return states


def own_rng_state(state: TrainerState, rank: int) -> dict | None:
    """The RNG streams rank `rank` saved in `state`, or None when it saved none (a resume on more ranks than
    saved; the state of a checkpoint written before rng_ranks existed is rank 0's): that rank keeps its seeding."""
    if state.rng_ranks is not None:
        return state.rng_ranks[rank] if rank < len(state.rng_ranks) else None
    return state.rng if rank == 0 else None


def set_rng_state(st: dict | None, device: torch.device | None = None) -> None:
    """Restore rng_state(device)'s streams (None: nothing). A state of the older format holds the generators of
    every GPU the writing process saw under "cuda": `device` takes the one of its own index."""
    if st is None:
        return
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    v, internal, gauss = st["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if device is None or device.type != "cuda":
        return
    own = st.get("cuda_device")
    if own is None and (device.index or 0) < len(st.get("cuda") or []):
        own = st["cuda"][device.index or 0]
    if own is not None:
        torch.cuda.set_rng_state(torch.tensor(own, dtype=torch.uint8), device)


def _listify(x: Any) -> Any:
    return [_listify(v) for v in x] if isinstance(x, (tuple, list)) else x


# ---- writing -------------------------------------------------------------------------------------------


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serializable: {type(o).__name__}")


def config_sha(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class _PendingSave:
    """An async save in flight on this process: its DCP futures and, on rank 0, what publishes it."""

    futures: list[Future]
    publish: Callable[[], None] | None
    tmp: Path


def save_phase(step: int, phase: str) -> None:
    """The save of `step` has reached `phase`: `tmp` (this rank's model shards are in the temp dir, the rest is
    not) or `renamed` (rank 0: the step dir is complete, `latest` not moved yet). Does nothing; it names the
    two moments a kill must never leave `latest` on a partial checkpoint, and tests/train_with_faults.py
    replaces it to kill the process there."""


class Checkpointer:
    """A run's checkpoints in its stage directory `root`. Each save is written atomically (into a hidden temp
    dir, then renamed) and published by rank 0: `latest` (and `best`) moved to it, then retention applied
    (the newest `keep` step dirs and the one `best` names stay). With async_save the shards are staged in
    memory and written in the background; this object holds that one save in flight until its write is
    complete (`poll`, `wait`), and only then publishes it. Every method that writes is collective."""

    def __init__(self, root: Path, keep: int = 2, async_save: bool = False) -> None:
        self.root, self.keep, self.async_save = root, keep, async_save
        self.saved_step: int | None = None  # the step this process last saved (published or in flight)
        self._pending: _PendingSave | None = None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
             trainer_state: dict, config: dict, lora: bool = False, best: bool = False,
             extra_optimizer_json: dict | None = None, peft_adapter: bool = False) -> Path | None:
        """Write `<root>/step_NNNNNNN`, move `latest` (and `best` when best) to it, apply retention.
        peft_adapter (a LoRA run): also write the adapters in PEFT's format into `<step dir>/peft_adapter/`.
        Collective: every rank calls it and writes its shards; rank 0 writes the JSON files and publishes.
        -> the path on rank 0 once published (None elsewhere, and for an async save, which a later
        poll / wait / save publishes)."""
        self.wait()  # one save in flight at a time; its temp dir must not be taken for a leftover
        name = step_name(step)
        tmp = self.root / f".tmp-{name}"  # the same name on every rank: all write into it
        futures = _write(tmp, step, model, optimizer, trainer_state=trainer_state, config=config, lora=lora,
                         extra_optimizer_json=extra_optimizer_json, peft_adapter=peft_adapter,
                         async_save=self.async_save)

        def publish() -> None:
            self._publish(tmp, step, best)

        if self.async_save:
            self._pending = _PendingSave(futures, publish if D.is_main() else None, tmp)
            self.saved_step = step
            return None
        # DCP returns on every rank once all ranks' shards are written (the coordinator collects their results)
        if D.is_main():
            publish()
        D.barrier()
        self.saved_step = step
        return self.root / name if D.is_main() else None

    def wait(self) -> None:
        """Block until this process's async save is written; rank 0 then publishes it. Every rank calls it
        before a new save and before the run ends."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            for f in pending.futures:
                f.result()
        except BaseException:
            if pending.publish is not None:
                shutil.rmtree(pending.tmp, ignore_errors=True)
            raise
        if pending.publish is not None:
            pending.publish()

    def poll(self) -> bool:
        """Publish this process's async save if its write has finished (no waiting). -> True while one is in
        flight."""
        if self._pending is None:
            return False
        if all(f.done() for f in self._pending.futures):
            self.wait()
            return False
        return True

    def latest(self) -> Path | None:
        """The step dir `latest` names (None: no complete checkpoint yet). Read it on rank 0 (the writer) or
        after a barrier."""
        name = latest_name(self.root)
        return self.root / name if name else None

    def apply_retention(self) -> list[Path]:
        """Keep the newest `keep` step dirs plus the ones the pointers name; delete the rest. -> deleted."""
        ckpts = list_checkpoints(self.root)
        protected = {p.name for _, p in ckpts[-self.keep:]}
        for ptr in POINTERS:
            if (self.root / ptr).is_file():
                protected.add((self.root / ptr).read_text().strip())
        deleted = [p for _, p in ckpts if p.name not in protected]
        for p in deleted:  # rename first: a kill during the delete leaves a hidden .tmp-* dir, never a partial step_*
            doomed = p.with_name(f".tmp-del-{p.name}")
            os.replace(p, doomed)
            shutil.rmtree(doomed)
        return deleted

    def _publish(self, tmp: Path, step: int, best: bool) -> None:
        """Rank 0, all shards written: fsync, rename the temp dir to its step name, then move the pointers."""
        name = step_name(step)
        try:
            for f in tmp.rglob("*"):
                if f.is_dir():
                    fsync_dir(f)
                else:
                    fsync_file(f)
            fsync_dir(tmp)
            out = self.root / name
            if out.exists():  # re-saving a step (e.g. after --start-step): replace the old copy
                old = self.root / f".tmp-old-{name}-{os.getpid()}"
                os.replace(out, old)
                shutil.rmtree(old)
            os.replace(tmp, out)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        save_phase(step, "renamed")
        write_text_atomic(self.root / "latest", name + "\n")  # last: only complete checkpoints are pointed at
        if best:
            write_text_atomic(self.root / "best", name + "\n")
        self.apply_retention()


def save(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
         trainer_state: dict, config: dict, lora: bool = False, best: bool = False, keep: int = 2,
         extra_optimizer_json: dict | None = None, peft_adapter: bool = False) -> Path | None:
    """One checkpoint written and published now (Checkpointer.save of a checkpointer with nothing in flight):
    a model saved once, outside a training run. Collective."""
    return Checkpointer(root, keep).save(step, model, optimizer, trainer_state=trainer_state, config=config,
                                         lora=lora, best=best, extra_optimizer_json=extra_optimizer_json,
                                         peft_adapter=peft_adapter)


def _write(tmp: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
           trainer_state: dict, config: dict, lora: bool, extra_optimizer_json: dict | None, peft_adapter: bool,
           async_save: bool) -> list[Future]:
    """Write a checkpoint's files into the temp dir `tmp` (made anew; rank 0 first removes what killed saves
    left in its parent): every rank its shards, rank 0 the JSON files and the PEFT adapters. -> the futures
    of the shards' background writes (async_save; none otherwise). A failure removes the temp dir."""
    root = tmp.parent
    if D.is_main():
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(".tmp-*"), *root.glob(".*.tmp-*")]:  # leftovers of a killed save
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        tmp.mkdir()
    D.barrier()
    adapters = model_state(model, trainable_only=True, full=True) if peft_adapter else None
    futures = []
    try:
        f = _dcp_write(model_state(model, trainable_only=lora), tmp / MODEL_DIR, async_save)
        futures += [f] if f is not None else []
        save_phase(step, "tmp")
        # FSDP2: collective, each rank hashes its own rows; whole tensors (DDP, one process): rank 0, which
        # writes config.json, hashes them alone
        fingerprint = None if lora or not (D.is_fsdp(model) or D.is_main()) else model_fingerprint(model)
        meta = None
        if optimizer is not None:
            tensors, meta = optimizer_state(model, optimizer)
            f = _dcp_write(tensors, tmp / OPTIM_DIR, async_save)
            futures += [f] if f is not None else []
        if D.is_main():
            if meta is not None:
                write_json(tmp / OPTIM_JSON, {**meta, **(extra_optimizer_json or {})})
            write_json(tmp / CONFIG_FILE, {**config, "format_version": FORMAT_VERSION,
                                           **({"weights_fingerprint": fingerprint} if fingerprint else {})})
            write_json(tmp / STATE_FILE, trainer_state)
            if adapters is not None:
                save_peft_adapter(model, tmp / PEFT_ADAPTER_DIR, state_dict=adapters,
                                  base_model=(config.get("base_model") or {}).get("source") or None)
    except BaseException:
        if D.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return futures


def latest_name(root: Path) -> str | None:
    """The step dir `latest` names, or None (no complete checkpoint yet)."""
    ptr = root / "latest"
    return ptr.read_text().strip() if ptr.is_file() else None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))] \
        if root.is_dir() else []
    return sorted(found)


# ---- loading -------------------------------------------------------------------------------------------


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """safetensors only (a format that cannot carry code); a file that is not one -> UserError, never unpickled."""
    try:
        return load_file(str(file))
    except FileNotFoundError:
        raise UserError(f"{file} is missing; the checkpoint is incomplete: pick another") from None
    except Exception as e:  # SafetensorError (bad header, truncated), OSError
        raise UserError(f"{file} is not a valid safetensors file ({str(e)[:100]}); the checkpoint is corrupt or "
                        "not ours: pick another (pickled .pt/.bin files are never loaded from checkpoints)") from None


def model_tensor_specs(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (full shape, dtype)} of a checkpoint's model tensors, from file headers only."""
    if format_version(path) == 1:
        from safetensors import safe_open

        if not (path / MODEL_FILE).is_file():
            raise UserError(f"{path / MODEL_FILE} is missing; the checkpoint is incomplete: pick another")
        try:
            with safe_open(str(path / MODEL_FILE), framework="pt") as f:
                return {k: (tuple(f.get_slice(k).get_shape()), _safetensors_dtype(f.get_slice(k).get_dtype()))
                        for k in f.keys()}
        except Exception as e:  # SafetensorError (bad header, truncated), OSError
            raise UserError(f"{path / MODEL_FILE} is not a valid safetensors file ({str(e)[:100]}); the checkpoint "
                            "is corrupt or not ours: pick another (pickled files are never loaded from checkpoints)"
                            ) from None
    meta = _read_layout(path / MODEL_DIR)
    return {k: (tuple(m.size), m.properties.dtype) for k, m in meta.state_dict_metadata.items()}


def _safetensors_dtype(name: str) -> torch.dtype:
    from safetensors.torch import _getdtype

    return _getdtype(name)


def model_tensor_reader(path: Path) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """(a checkpoint's model tensor names, read(name) -> that tensor whole on CPU, assembled from the pieces the
    ranks wrote). Each read opens (memory-maps) only the files holding the tensor's pieces: memory holds the
    tensor asked for, not the model (the export path and FSDP2's rank-local loading)."""
    from safetensors import safe_open

    names = list(model_tensor_specs(path))  # also checks the files are there and readable
    if format_version(path) == 1:
        def read_whole(name: str) -> torch.Tensor:
            with safe_open(str(path / MODEL_FILE), framework="pt") as f:
                return f.get_tensor(name)

        return names, read_whole
    meta = _read_layout(path / MODEL_DIR)
    pieces: dict[str, list[tuple[Any, Any]]] = {}
    for index, info in meta.storage_data.items():
        pieces.setdefault(index.fqn, []).append((index.offset, info))

    def piece(name: str, info: Any) -> torch.Tensor:
        with safe_open(info.relative_path, framework="pt") as f:
            return f.get_tensor(name)

    def read(name: str) -> torch.Tensor:
        m = meta.state_dict_metadata[name]
        if len(pieces[name]) == 1 and tuple(pieces[name][0][1].shape) == tuple(m.size):
            return piece(name, pieces[name][0][1])  # written whole (one process, DDP): no assembly
        full = torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for offset, info in pieces[name]:
            full[tuple(slice(o, o + n) for o, n in zip(offset, info.shape, strict=True))] = piece(name, info)
        return full

    return names, read


def model_tensor_row_reader(path: Path) -> Callable[[str, int, int], tuple[tuple[int, ...], torch.Tensor]]:
    """read_rows(name, start, stop) -> (the full shape, rows start:stop (dim 0)) of a checkpoint's model
    tensor, read as safetensors slices of only the files and rows that hold them (an FSDP2 rank reading its
    shard)."""
    from safetensors import safe_open

    if format_version(path) == 1:
        def rows_of_one_file(name: str, start: int, stop: int) -> tuple[tuple[int, ...], torch.Tensor]:
            with safe_open(str(path / MODEL_FILE), framework="pt") as f:
                sl = f.get_slice(name)
                return tuple(sl.get_shape()), sl[start:stop]

        return rows_of_one_file
    meta = _read_layout(path / MODEL_DIR)
    pieces: dict[str, list[tuple[Any, Any]]] = {}
    for index, info in meta.storage_data.items():
        pieces.setdefault(index.fqn, []).append((index.offset, info))

    def read_rows(name: str, start: int, stop: int) -> tuple[tuple[int, ...], torch.Tensor]:
        m = meta.state_dict_metadata[name]
        out = torch.empty((stop - start, *m.size[1:]), dtype=m.properties.dtype)
        for offset, info in pieces[name]:
            lo, hi = max(start, offset[0]), min(stop, offset[0] + info.shape[0])
            if lo >= hi:
                continue
            with safe_open(info.relative_path, framework="pt") as f:
                part = f.get_slice(name)[lo - offset[0]:hi - offset[0]]
            out[(slice(lo - start, hi - start), *(slice(o, o + n) for o, n in zip(offset[1:], info.shape[1:],
                                                                                  strict=True)))] = part
        return tuple(m.size), out

    return read_rows


def iter_model_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """A checkpoint's model tensors as whole CPU tensors, one at a time (see model_tensor_reader)."""
    names, read = model_tensor_reader(path)
    for name in names:
        yield name, read(name)


def read_model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model tensors, whole, in one dict (loading a model in one process)."""
    return dict(iter_model_tensors(path))


def load_model_weights(path: Path, model: nn.Module, base_config_sha: str | None = None) -> None:
    """Copy a checkpoint's weights into the model: unwrapped, or already sharded by FSDP2 (then every rank
    reads only the pieces it holds). A LoRA checkpoint fills only the adapters; its base (from INIT_FROM) must
    be the one it was trained on (`base_config_sha`, the sha of the base's model args). Any shape or name
    mismatch -> UserError naming it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    conf = read_json(path / CONFIG_FILE, _CORRUPT) if (path / CONFIG_FILE).is_file() else {}
    lora_only = bool(conf.get("lora"))
    saved_base = conf.get("base_model") or {}
    if lora_only and base_config_sha and saved_base.get("config_sha") not in (None, base_config_sha):
        raise UserError(f"LoRA checkpoint {path} was trained on base {saved_base.get('source')!r} with other model "
                        "settings than the current INIT_FROM: set INIT_FROM to that base model")
    own = model_state(model, trainable_only=lora_only)
    saved = model_tensor_specs(path)
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    if missing or unexpected:
        raise UserError(f"checkpoint {path} does not match the model: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}; use the model settings (and LoRA settings) it was trained with")
    for k, (shape, _) in saved.items():
        if shape != tuple(own[k].shape):
            raise UserError(f"checkpoint {path}: tensor {k} has shape {shape} but the model has "
                            f"{tuple(own[k].shape)}; use the model settings the checkpoint was trained with")
    if format_version(path) == 1:
        full = load_tensors(path / MODEL_FILE)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    _dcp_read(own, path / MODEL_DIR)
    set_model_state_dict(model, own, options=StateDictOptions(strict=False))


def load_optimizer(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load optimizer tensors + groups into the (possibly sharded) optimizer; returns optimizer.json extras
    (GradScaler state, schedule). Tensors are FQN-keyed and DCP reshards them, so any world size loads them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    version = format_version(path)
    if not (path / (OPTIM_FILE if version == 1 else OPTIM_DIR)).exists():
        raise UserError(f"checkpoint {path} has no optimizer state: resume with --reset-optimizer")
    meta = read_json(path / OPTIM_JSON, _CORRUPT)
    if version == 1:
        osd = _unflatten_optimizer(load_tensors(path / OPTIM_FILE), meta)
        options = StateDictOptions(full_state_dict=True)
    else:
        osd = _unflatten_optimizer(_optimizer_targets(path, model), meta)
        options = StateDictOptions()
    try:
        set_optimizer_state_dict(model, optimizer, osd, options=options)
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"optimizer state in {path} does not fit this run ({str(e)[:120]}); a different "
                        "OPTIMIZER or LoRA setting? resume with --reset-optimizer") from e
    return {k: v for k, v in meta.items() if k not in ("scalars", "scalar_dtypes", "param_groups")}


def _optimizer_targets(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The saved optimizer tensors, read into tensors laid out like their parameters on this rank (a slot
    shaped like its parameter is sharded like it; any other is read whole)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    params = get_model_state_dict(model)
    targets = {}
    for key, m in _read_layout(path / OPTIM_DIR).state_dict_metadata.items():
        fqn = key.split("/", 1)[1].rsplit("/", 1)[0]
        if fqn not in params:
            raise UserError(f"optimizer state in {path} names parameter {fqn!r}, which this model does not have; "
                            "a different model or LoRA setting? resume with --reset-optimizer")
        p = params[fqn]
        same = tuple(m.size) == tuple(p.shape)
        targets[key] = torch.empty_like(p, dtype=m.properties.dtype) if same else \
            torch.empty(tuple(m.size), dtype=m.properties.dtype, device=p.device)
    _dcp_read(targets, path / OPTIM_DIR)
    return targets


def read_trainer_state(path: Path) -> TrainerState:
    return TrainerState.from_dict(read_json(path / STATE_FILE, _CORRUPT))


def parent_source(path: Path) -> str:
    """The weights the run checkpointed at `path` was started from: a LoRA run's base model, else the recorded
    parent; '' = random init. A resumed run rebuilds its model from them before the objective's setup (a frozen
    reference copy or a LoRA base must be the starting model, not random init)."""
    state = read_trainer_state(path) if (path / STATE_FILE).is_file() else TrainerState()
    conf = read_json(path / CONFIG_FILE, _CORRUPT) if (path / CONFIG_FILE).is_file() else {}
    parent = (conf.get("base_model") or {}).get("source") or state.parent or ""
    if parent and not Path(parent).exists() and Path(parent).is_absolute():
        raise UserError(f"checkpoint {path} was started from {parent}, which no longer exists; the resumed run "
                        "needs those weights (frozen reference / LoRA base): set INIT_FROM to a copy of them")
    return str(parent)
