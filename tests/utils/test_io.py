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


def test_output_path_stays_inside_root(tmp_path):
    from vision3d.errors import InputError
    from vision3d.utils.io import output_path

    assert output_path(tmp_path, "renders", "scene", "0.png") == (tmp_path / "renders" / "scene" / "0.png").resolve()
    for bad in (("..", "x"), ("/etc/passwd",), ("a/../../b",), ("",)):
        with pytest.raises(InputError, match="expected a relative name inside"):
            output_path(tmp_path, *bad)
    (tmp_path / "link").symlink_to("/tmp")
    with pytest.raises(InputError):
        output_path(tmp_path, "link", "x.png")


def test_stale_temp_files_are_removed_and_fresh_ones_kept(tmp_path):
    import time

    from vision3d.utils.io import STALE_SECONDS

    stale = tmp_path / ".scene.ply.abcd1234.tmp.ply"
    fresh = tmp_path / ".scene.ply.wxyz9876.tmp.ply"  # a concurrent writer's
    other = tmp_path / ".hidden_but_not_ours"
    for p in (stale, fresh, other):
        p.write_bytes(b"x" * 10)
    old = time.time() - STALE_SECONDS - 10
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    write_text_atomic(tmp_path / "a.json", "{}")
    assert not stale.exists() and fresh.exists() and other.exists()


def test_atomic_write_fsyncs_before_rename(tmp_path, monkeypatch):
    import vision3d.utils.io as io_mod

    calls = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(io_mod.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(io_mod.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    write_text_atomic(tmp_path / "b.json", "{}")
    assert calls[:2] == ["fsync", "replace"] and (tmp_path / "b.json").read_text() == "{}"


def test_read_checkpoint_refuses_pickled_code_and_garbage(tmp_path):
    import pickle

    import torch

    from vision3d.errors import InputError
    from vision3d.utils.io import read_checkpoint

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.pth"
    with bad.open("wb") as f:
        pickle.dump({"state_dict": Boom()}, f)
    torch.save({"w": Boom()}, tmp_path / "evil2.pth")
    for p in (bad, tmp_path / "evil2.pth"):
        with pytest.raises(InputError, match=r"evil2?\.pth: file: expected a tensors-only checkpoint"):
            read_checkpoint(p)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "x.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(InputError, match=r"x\.safetensors: file: expected a safetensors file"):
        read_checkpoint(tmp_path / "x.safetensors")
