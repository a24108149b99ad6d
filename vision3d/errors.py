"""The one error type for bad input files and values.

Every loader (PLY, COLMAP text/binary, transforms.json, RE10K chunks, checkpoints, image folders)
raises :class:`InputError` for anything wrong with what it was given: a malformed or truncated
file, a value that is not finite or not physical, a path that leaves its dataset folder, or a
size that would need more memory than the file can justify. The message names the file, the
field, what was expected and what was found, so a user can fix the input without a traceback.

``InputError`` subclasses :class:`ValueError`, so ``except ValueError`` keeps catching it.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from typing import Iterator

__all__ = ["InputError", "ResourceLimitError", "memory_budget", "short", "guard", "check_finite", "check_positive", "check_size", "check_count", "inside"]


def short(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a hostile file can hold a 15 MB string)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still reported
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class InputError(ValueError):
    """A file or value given to vision3d is not what the loader expects.

    Args:
        path: the file (or folder) the value came from; ``None`` for an in-memory value.
        field: where in it: a key, a header line, a column, ``"file"`` for the whole file.
        expected: what a valid value looks like, in words (``"a finite focal length > 0"``).
        got: what was found (any value; shown shortened), or a short explanation.
        message: the full text, when an older check already worded it (it must name the file).
    """

    def __init__(self, path, field: str, expected: str, got=None, *, message: str | None = None):
        self.path = None if path is None else os.fspath(path)
        self.field = field
        self.expected = expected
        self.got = got if isinstance(got, str) else short(got)
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(message if message is not None else f"{where}{field}: expected {expected}, got {self.got}")

    def __reduce__(self):  # picklable across DataLoader workers, subclasses included
        return (_restore, (type(self), self.args, dict(self.__dict__)))


class ResourceLimitError(InputError):
    """An input whose processing would need more memory than allowed (checked before allocating)."""


def memory_budget(device=None) -> int:
    """Bytes a single operation may plan to allocate: half the free memory of ``device`` (CUDA) or of the host."""
    try:
        import torch

        if device is not None and torch.device(device).type == "cuda":
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return int(free * 0.5)
    except Exception:  # noqa: BLE001 - no CUDA query possible: fall back to host memory
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.5)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def _restore(cls, args, state):
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


# what a parser can raise on hostile bytes besides our own error; MemoryError is not here on purpose:
# loaders check sizes before allocating, and an allocation failure that slips through is a bug to fix
_PARSE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # incl. UnicodeDecodeError, json.JSONDecodeError
    OverflowError,
    ZeroDivisionError,
    ArithmeticError,
    RecursionError,
    struct.error,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    EOFError,
)


def _extra_parse_errors() -> tuple[type[BaseException], ...]:
    extra: list[type[BaseException]] = []
    import pickle

    extra.append(pickle.UnpicklingError)
    try:
        import numpy as np

        extra.append(np.linalg.LinAlgError)
    except ImportError:  # pragma: no cover - numpy is a core dependency
        pass
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError

        extra.append(SafetensorError)
    return tuple(extra)


@contextlib.contextmanager
def guard(path, what: str) -> Iterator[None]:
    """Turn any parse failure inside the block into an :class:`InputError` naming ``path``.

    Our own ``InputError`` passes through unchanged; a ``ValueError`` raised by older checks
    (already naming the file) keeps its message; anything else (``UnicodeDecodeError``,
    ``OverflowError``, ``RecursionError``, ``struct.error``, ``UnpicklingError``, ``SafetensorError``,
    ``LinAlgError``...) becomes ``InputError(path, "file", what, "<Type>: <message>")``.
    ``FileNotFoundError`` and other ``OSError`` pass through (the file is missing, not malformed).
    """
    try:
        yield
    except InputError:
        raise
    except (_PARSE_ERRORS + _extra_parse_errors()) as e:
        p = None if path is None else os.fspath(path)
        text = str(e)
        if type(e) is ValueError and p is not None and text.startswith(p):  # keep the specific wording
            raise InputError(p, "file", what, text[len(p) :].lstrip(": "), message=text) from e
        raise InputError(p, "file", what, f"{type(e).__name__}: {short(text, 300)}") from e


def check_finite(path, field: str, values, expected: str = "finite numbers") -> None:
    """Refuse NaN/inf in ``values`` (numbers, numpy arrays or tensors)."""
    import numpy as np

    a = values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values, dtype=np.float64)
    if a.dtype.kind not in "fiu":
        raise InputError(path, field, expected, f"values of type {a.dtype}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = a[~np.isfinite(a)].ravel()
        raise InputError(path, field, expected, f"{int(bad.size)} non-finite value(s), e.g. {bad[0]!r}")


def check_positive(path, field: str, value, expected: str = "a finite number > 0") -> float:
    """``value`` as a float, refused unless finite and > 0 (focal lengths, sizes, scales)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise InputError(path, field, expected, value)
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(path, field, expected, value) from None
    if not math.isfinite(v) or v <= 0:
        raise InputError(path, field, expected, value)
    return v


MAX_IMAGE_PIXELS = 8192 * 8192  # 64 Mpx: 201 MB as uint8 RGB, 805 MB as float32; above it is refused


def check_size(path, field: str, width, height, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """An image size ``(width, height)`` of positive integers whose product stays under ``max_pixels``."""
    out = []
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v) or v < 1:
            raise InputError(path, f"{field} {name}", "a positive integer", v)
        out.append(int(v))
    w, h = out
    if w * h > max_pixels:
        raise InputError(
            path, field, f"at most {max_pixels} pixels ({max_pixels * 3 / 2**20:.0f} MiB as RGB bytes)", f"{w}x{h} = {w * h} pixels"
        )
    return w, h


def check_count(path, field: str, count: int, bytes_each: int, available: int) -> int:
    """A count read from a header, refused when ``count * bytes_each`` exceeds the ``available`` bytes."""
    if count < 0 or count * bytes_each > available:
        raise InputError(
            path, field, f"a count whose data fits in the file ({available} bytes at {bytes_each} bytes each)", count
        )
    return count


def inside(root, candidate, field: str, path=None):
    """``candidate`` resolved under ``root`` (relative to it if not absolute); refused if it leaves ``root``.

    Symbolic links are resolved first, so a link pointing out of the folder is refused too.
    """
    from pathlib import Path

    root_r = Path(root).resolve()
    cand = Path(candidate)
    full = (cand if cand.is_absolute() else root_r / cand).resolve()
    if full != root_r and root_r not in full.parents:
        raise InputError(path if path is not None else root, field, f"a path inside {root_r}", os.fspath(candidate))
    return full
