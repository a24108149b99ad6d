"""Atomic file writes: write to a temporary name in the target folder, then rename.

An interrupted write therefore never leaves a half-written file under the final name. The data
is fsynced before the rename (and the folder after it), so a crash right after the rename does not
leave an empty file either. Temporary files are hidden (``.<name>.<random>.tmp<suffix>``); an error
removes them, and a process killed mid-write leaves one behind, which the next write into that
folder removes once it is older than :data:`STALE_SECONDS` (so a concurrent writer's file is kept).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Iterator

STALE_SECONDS = 6 * 3600.0  # a temp file of ours untouched this long belongs to a killed writer
_TEMP_NAME = re.compile(r"^\.(?P<final>.+)\.[A-Za-z0-9_]{8}\.tmp")  # mkstemp's 8 random characters


def clean_stale_temps(folder: str | os.PathLike, max_age_s: float = STALE_SECONDS) -> list[Path]:
    """Remove temp files left in ``folder`` by killed atomic writes (our prefix, older than ``max_age_s``)."""
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if not e.name.startswith(".") or ".tmp" not in e.name or not _TEMP_NAME.match(e.name):
            continue
        with contextlib.suppress(OSError):
            if e.is_file(follow_symlinks=False) and now - e.stat(follow_symlinks=False).st_mtime > max_age_s:
                os.unlink(e.path)
                removed.append(Path(e.path))
    return removed


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some filesystems do not open folders; the data itself was synced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    clean_stale_temps(final.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp" + final.suffix, dir=final.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync_path(tmp_path)
        os.replace(tmp_path, final)
        _fsync_path(final.parent, directory=True)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def output_path(root: str | os.PathLike, *parts: str, field: str = "output path") -> Path:
    """``root/parts...`` resolved and checked to stay inside ``root``.

    Names that come from data (a dataset's scene key, a frame name) must not pick where files go:
    ``../x``, an absolute name, or a link out of ``root`` raises :class:`~vision3d.errors.InputError`
    naming ``field`` and the offending value.
    """
    from vision3d.errors import InputError

    root_r = Path(root).resolve()
    for part in parts:
        text = os.fspath(part)
        if not text or "\x00" in text or Path(text).is_absolute():
            raise InputError(root_r, field, f"a relative name inside {root_r}", text)
    full = root_r.joinpath(*parts).resolve()
    if full != root_r and root_r not in full.parents:
        raise InputError(root_r, field, f"a relative name inside {root_r}", os.path.join(*map(os.fspath, parts)))
    return full


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
    """Load a .ckpt/.pth/.pt (tensors and plain containers only) or a .safetensors file.

    Never unpickles code (``weights_only=True``). A file that is not a readable checkpoint raises
    :class:`~vision3d.errors.InputError` naming it.
    """
    import torch

    from vision3d.errors import InputError, guard, short

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        with guard(path, "a safetensors file (8-byte header length, JSON header, tensor data)"):
            return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - unpickling and zip errors come in many types
        raise InputError(
            path,
            "file",
            "a tensors-only checkpoint (torch.load weights_only=True); vision3d never unpickles arbitrary objects -- "
            "re-save the state dict with torch.save(model.state_dict(), ...)",
            f"{type(e).__name__}: {short(str(e), 300)}",
        ) from e
    if not isinstance(state, dict):
        raise InputError(path, "file", "a dict (state dict or Lightning checkpoint)", type(state).__name__)
    return state
