"""vrgd_ds.files: a file is replaced only by a complete one, on real files."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from vrgd_ds.files import save_atomic, tmp_prefix, torch_save_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.pt"
    torch_save_atomic({"x": torch.arange(3)}, path)
    before = path.read_bytes()

    def half_then_fail(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_atomic(half_then_fail, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))


def test_killed_writers_temporaries_are_removed_live_ones_kept(tmp_path):
    path = tmp_path / "state.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = tmp_path / f"{tmp_prefix(path)}{int(dead.stdout)}"
    live = tmp_path / f"{tmp_prefix(path)}{os.getppid()}"  # a running process: perhaps a writer
    other_host = tmp_path / f".state.pt.tmp.another-host.{int(dead.stdout)}"
    for p in (stale, live, other_host):
        p.write_bytes(b"partial")
    torch_save_atomic([1, 2], path)
    assert not stale.exists()
    assert live.exists() and other_host.exists()
    assert torch.load(path, weights_only=True) == [1, 2]


def test_creates_the_folder(tmp_path):
    torch_save_atomic({"a": 1}, tmp_path / "new" / "deeper" / "f.pt")
    assert torch.load(tmp_path / "new" / "deeper" / "f.pt", weights_only=True) == {"a": 1}
