"""Helpers shared by the test files: the tiny model most unit tests build, synthetic data through the real data
pipeline, the in-process and torchrun training runners, metrics readers and a parent checkpoint that differs from
random init."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = str(ROOT / "tokenizer.model")

# The unit tests' Llama: two layers, grouped-query attention (4 query heads sharing 2 KV heads, head_dim 16), a
# vocabulary of 97; milliseconds per forward on CPU. Tests override what they exercise (vocab, dim, tying...).
TINY_ARGS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 97, "multiple_of": 32}


def tiny_args(**overrides) -> ModelArgs:
    return ModelArgs(**{**TINY_ARGS, **overrides})


def tiny_model(seed: int = 0, std: float = 0.02, global_seed: bool = False, **overrides) -> Transformer:
    """Transformer(tiny_args(**overrides)), init_weights(std) drawn from a generator seeded with `seed` (values set
    by the seed and the parameter names alone); with global_seed, from torch's global stream after
    torch.manual_seed(seed), which the construction draws from first. Left in training mode."""
    if global_seed:
        torch.manual_seed(seed)
    model = Transformer(tiny_args(**overrides))
    model.init_weights(std=std, generator=None if global_seed else torch.Generator().manual_seed(seed))
    return model

# A fixed vocabulary and a near-deterministic successor rule: documents are predictable, so the loss
# falls visibly in a few steps, and the data does not depend on the Python version (unlike docstrings).
WORDS = ("the a of to in and is it that for on with as was by this be are from at or an have which not but "
         "you all can more one will if their has there what about when so out up into them than some could "
         "time only other new these two may then do first any like now over such our even most made after "
         "also did many before must through back years where much your way well down should because each "
         "just those people how too little state good very make world still own see men work long get here "
         "between both life being under never day same another know while last might great old year off "
         "come since against go came right used take three").split()


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    docs = []
    for _ in range(n):
        w = r.randrange(len(WORDS))
        words = []
        for _ in range(r.randint(30, 80)):
            words.append(WORDS[w])
            w = (w * 7 + r.choice((1, 1, 1, 2))) % len(WORDS)
        docs.append(" ".join(words).capitalize() + ".")
    return docs


def make_pretrain_data(out: Path, n_docs: int = 300) -> Path:
    """Shards + manifest written by data_preparation_utils (the real pipeline) with our tokenizer."""
    import data_preparation_utils as dpu
    import tokenizer

    tok = tokenizer.load_tokenizer(TOKENIZER)
    dpu.prepare("pretrain", synthetic_docs(n_docs), out, dpu.PretrainEncoder(tok), tokenizer_identity=tok.identity(),
                source="synthetic test corpus", seed=0, val_fraction=0.1, shard_size=1 << 20, workers=1,
                progress=False)
    return out


def settings(tmp: Path, data: Path, **kw) -> list[str]:
    base = {"TOKENIZER_CHECKPOINT_PATH": TOKENIZER, "PRETRAIN_DATALOADER_ROOT_PATH": str(data),
            "PRETRAIN_SAVE_CHECKPOINTS_PATH": str(tmp / "ck"), "RUN_DIR": str(tmp / "run"),
            "TEST_PROMPTS_FILE": str(ROOT / "test_prompts.json")}
    base.update({k: str(v) for k, v in kw.items()})
    return ["--env-file", str(ROOT / "configs" / "debug.env"), *[f"{k}={v}" for k, v in base.items()]]


def run_inprocess(tmp: Path, data: Path, *flags: str, **kw) -> list[dict]:
    import train

    assert train.main(settings(tmp, data, **kw) + list(flags)) == 0
    return read_metrics(tmp / "run")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(metrics: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in metrics if "loss" in e}


def objective_steps(objective, model, loader, opt, steps: int) -> None:
    """`steps` optimizer steps of an objective on the loader's batches, one micro-batch each (the training
    loop's normalization: the loss sum over the objective's units)."""
    for _ in range(steps):
        batch = loader.next_batch()
        loss_sum, _ = objective.loss(model, batch)
        (loss_sum / objective.units(batch)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def torchrun(tmp: Path, data: Path, nproc: int, *flags: str, torchrun_args: tuple[str, ...] | None = None,
             timeout: float = 300, script: Path = ROOT / "train.py", **kw) -> subprocess.CompletedProcess:
    launcher = list(torchrun_args) if torchrun_args is not None else ["--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(script),
           *settings(tmp, data, **kw), *flags]
    p = subprocess.run(cmd, cwd=tmp, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def make_parent(out: Path, seed: int = 7) -> Path:
    """A checkpoint dir of ours holding a debug-sized model that differs from the loop's random init (other
    seed, perturbed norms): a run started from it and one started from random init give different numbers."""
    import checkpoint as ckpt
    import config
    from model import Transformer

    cfg = config.load_config(str(ROOT / "configs" / "debug.env"))
    model = Transformer(cfg.model_args(8448))
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.mul_(1.5)
    ckpt.save(out, 0, model, None, trainer_state={"step": 0, "parent": None},
              config={"model_args": model.args.to_dict(), "settings": cfg.to_dict()})
    return out / "step_0000000"


def model_shards(step: Path) -> list[Path]:
    """The model's shard files in a checkpoint of ours (one per writing rank)."""
    return sorted((Path(step) / "model").glob("*.safetensors"))


def shift_model_weights(step: Path, delta: float) -> None:
    """Add `delta` to every model weight of a checkpoint of ours in place, shard by shard (headers kept), and
    store the new weights' fingerprint in its config.json, as a save of the shifted weights would."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    import checkpoint as ckpt
    import model_utils

    for f in model_shards(step):
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata()
        save_file({k: v + delta for k, v in load_file(str(f)).items()}, str(f), metadata=meta)
    conf = ckpt.read_json(Path(step) / ckpt.CONFIG_FILE)
    if "weights_fingerprint" in conf and not conf.get("lora"):
        conf["weights_fingerprint"] = ckpt.model_fingerprint(model_utils.load_model(step)[0])
        ckpt.write_json(Path(step) / ckpt.CONFIG_FILE, conf)


def wandb_records(path: Path) -> list[bytes]:
    """Records of a .wandb file: a 7-byte header (':W&B', magic, version), then the LevelDB log format
    (32 KiB blocks; chunks of crc32 (4) + length (2, LE) + type (1: full, 2: first, 3: middle, 4: last))."""
    data, out, pos, block, parts = path.read_bytes(), [], 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a header: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            out.append(parts)
    return out


@contextlib.contextmanager
def dtensor_gathers_refused(during: str, allowed: Callable | None = None) -> Iterator[None]:
    """DTensor.full_tensor and DTensor.redistribute (the gathers of a whole tensor onto a rank) raise inside the
    block, naming `during`, unless `allowed(dtensor)` says that one may be gathered; restored on exit."""
    from torch.distributed.tensor import DTensor

    real = DTensor.full_tensor, DTensor.redistribute

    def guard(fn):
        def checked(self, *args, **kw):
            if allowed is None or not allowed(self):
                raise AssertionError(f"a DTensor of shape {tuple(self.shape)} was gathered {during}")
            return fn(self, *args, **kw)
        return checked

    DTensor.full_tensor, DTensor.redistribute = guard(real[0]), guard(real[1])
    try:
        yield
    finally:
        DTensor.full_tensor, DTensor.redistribute = real


def flop_counter():
    """torch's FlopCounterMode, also counting the in-place addmm_ the fused LM head accumulates its weight
    gradient with (torch's table has the out-of-place matmuls only)."""
    from torch.utils.flop_counter import FlopCounterMode

    def addmm_inplace(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_inplace})
