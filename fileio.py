"""Files on disk: fsync, JSON reading with a user-facing error, sha256 of a file."""

from __future__ import annotations

import hashlib
import json
import os
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
