"""Files on disk: fsync, a directory written atomically, JSON reading with a user-facing error, sha256 of a file,
and whether a source that does not exist here is a Hugging Face hub id or a mistyped local path."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from errors import UserError


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable. Filesystems that cannot fsync a directory are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old file or the whole new one, never a partial write
    (fsynced temp file in the same directory, renamed over; the temp name carries the pid, so concurrent
    writers never share one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    fsync_file(tmp)
    tmp.replace(path)
    fsync_dir(path.parent)


def check_new_dir(out: Path, flag: str = "--out") -> None:
    """An output directory must not exist yet or be empty: a UserError naming it otherwise."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} already exists and is not empty; choose another {flag} or remove it")


@contextmanager
def atomic_dir(out: str | os.PathLike, flag: str = "--out") -> Iterator[Path]:
    """Yield a temp dir next to `out` to write into; on success it is renamed to `out`, on an exception it is
    removed: `out` is either complete or absent. `out` must not exist or be empty (`flag` names the option
    that chose it, for the error)."""
    out = Path(out)
    check_new_dir(out, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; give the result the usual permissions
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: Path, remedy: str = "fix or re-create the file") -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file is a UserError ending with `remedy`."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}); {remedy}") from e


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


HUB_ID = re.compile(r"[\w.\-]+/[\w.\-]+")  # a Hugging Face hub repo id: org/name
# Names of files the loaders read: a hub repo id never ends in one
_FILE_SUFFIXES = (".gguf", ".safetensors", ".pt", ".pth", ".bin", ".json", ".model", ".npy", ".jsonl", ".parquet",
                  ".txt")


def check_hub_id(source: str, what: str) -> None:
    """`source` does not exist on disk: return when it can be a hub id (org/name), else raise a UserError naming
    it as a missing path, before any hub request. A local path is what is not org/name, what starts with . or ~,
    ends in a file suffix, or whose first component exists here (`checkpoints/x` where checkpoints/ exists)."""
    s = str(source)
    first = s.split("/", 1)[0]
    if not HUB_ID.fullmatch(s) or s.startswith((".", "~")):
        why = "(and it is not a hub id, org/name)"
    elif s.lower().endswith(_FILE_SUFFIXES):
        why = "(a file name, not a hub id)"
    elif Path(first).exists():
        why = f"({first}/ exists here, so this is read as a local path, not a hub id)"
    else:
        return
    raise UserError(f"{what} {s!r} not found: the path does not exist {why}; check it (relative to {Path.cwd()}), "
                    "or pass a hub id as org/name")
