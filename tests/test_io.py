"""Atomic writes keep the old file on failure and produce ordinary permissions; unsafe checkpoints are refused."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import pytest

from nasfcos.errors import UserError
from nasfcos.io import atomic_write_text, read_json, safe_torch_load


def test_atomic_write_replaces_and_uses_umask_permissions(tmp_path: Path) -> None:
    target = tmp_path / "a" / "file.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    atomic_write_text(target, "old")

    class Boom(str):
        def encode(self, *args, **kwargs):  # type: ignore[override]
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_text(target, Boom("new"))
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_safe_load_refuses_pickled_code(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(UserError, match="evil.pt"):
        safe_torch_load(evil)


def test_read_json_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="missing.json"):
        read_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match=r"bad.json: malformed JSON at line 1"):
        read_json(bad)
