"""The one error type for bad input files and values.

Every loader (PLY, COLMAP text/binary, transforms.json, RE10K chunks, checkpoints, image folders)
raises :class:`InputError` for anything wrong with what it was given: a malformed or truncated
file, a value that is not finite or not physical, a path that leaves its dataset folder, or a
size that would need more memory than the file can justify. The message names the file, the
field, what was expected and what was found, so a user can fix the input without a traceback.

``InputError`` subclasses :class:`ValueError`, so ``except ValueError`` keeps catching it.
"""

from __future__ import annotations

import os

__all__ = ["InputError", "short"]


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
    """

    def __init__(self, path, field: str, expected: str, got=None):
        self.path = None if path is None else os.fspath(path)
        self.field = field
        self.expected = expected
        self.got = got if isinstance(got, str) else short(got)
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{field}: expected {expected}, got {self.got}")

    def __reduce__(self):  # picklable across DataLoader workers
        return (type(self), (self.path, self.field, self.expected, self.got))
