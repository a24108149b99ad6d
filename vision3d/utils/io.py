"""Atomic file writes: write to a temporary name in the target folder, then rename.

An interrupted write therefore never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) if needed and check it is a writable folder."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(f"{p}: expected a folder for outputs, found a file")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"{p}: cannot create the output folder ({e.strerror})") from e
    if not p.is_dir():
        raise NotADirectoryError(f"{p}: expected a folder for outputs, found a file")
    if not os.access(p, os.W_OK):
        raise PermissionError(f"{p}: output folder is not writable")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    final = Path(path)
    check_writable_dir(final.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp" + final.suffix, dir=final.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def to_plain(value):
    """Nested config values -> YAML/JSON-safe data (paths to str, tuples to lists)."""
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [to_plain(x) for x in value]
    if isinstance(value, dict):
        return {k: to_plain(x) for k, x in value.items()}
    return value


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a .ckpt/.pth/.pt (tensors and plain containers only) or a .safetensors file."""
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"{path}: could not be read as tensors-only (weights_only=True) checkpoint ({e}); vision3d never "
            "unpickles arbitrary objects -- re-save the state dict with torch.save(model.state_dict(), ...)"
        ) from e
