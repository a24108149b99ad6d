"""Atomic writes: no half-written file under the final name, usual permissions, clear folder errors."""

from __future__ import annotations

import os

import pytest

from vision3d.utils.io import atomic_path, check_writable_dir, write_text_atomic


def test_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "scene.ply"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_permissions_follow_umask(tmp_path):
    write_text_atomic(tmp_path / "a.json", "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_file_where_folder_expected(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="found a file"):
        check_writable_dir(f)
