"""`deepspeed --hostfile` for real on one machine: 2 "nodes" (127.0.0.1, 127.0.0.2) x 1 slot.

tests/loopback/loopback_ssh.py starts a private key-only sshd on the two loopback addresses and
gives the launcher an ``ssh`` wrapper on PATH, standing in for a cluster's passwordless
ssh; DS_ACCELERATOR=cpu reaches the remote ranks through ``.deepspeed_env``. The tiny
VRLAMB ZeRO-2 run launched through pdsh must end where the same run on 2 local ranks
(`deepspeed --num_gpus 2`) ends.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ds_helpers import ROOT, free_port, remove_shm_buffers, run_deepspeed, tail
from reference import max_rel_err
from test_deepspeed_zero import Case
from loopback.loopback_ssh import loopback_hosts, loopback_sshd, skip_reason

needs_sshd = pytest.mark.skipif(skip_reason() is not None, reason=f"loopback sshd: {skip_reason()}")
STEPS = 2


@pytest.fixture(scope="module")
def sshd():
    """One private loopback sshd for the module (the tools come from tests/loopback/install_tools.sh)."""
    with loopback_sshd() as server:
        yield server


def launch_through_hostfile(hostfile, env, workdir, cfg_path, out):
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(hostfile), "--launcher", "pdsh",
           "--master_addr", "127.0.0.1", "--master_port", str(port),
           str(ROOT / "tests" / "ds_scripts" / "train_tiny.py"), "--config", str(cfg_path),
           "--steps", str(STEPS), "--out", str(out)]
    try:
        return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    finally:
        remove_shm_buffers(port)


@needs_sshd
def test_two_nodes_through_hostfile_and_pdsh_match_local_ranks(sshd, tmp_path):
    cfg = Case("VRLAMB", 2, 1).config()
    (tmp_path / "local").mkdir()
    start = time.monotonic()
    local = run_deepspeed("train_tiny.py", cfg, tmp_path / "local", "--steps", STEPS, "--out",
                          tmp_path / "local" / "params.pt")
    assert local.returncode == 0, tail(local)
    local_s = time.monotonic() - start

    work = tmp_path / "nodes"
    work.mkdir()
    cfg_path = work / "ds_config.json"
    cfg_path.write_text(json.dumps(cfg))
    start = time.monotonic()
    with loopback_hosts(work, server=sshd) as (hostfile, env, workdir):
        assert hostfile.read_text().split() == ["127.0.0.1", "slots=1", "127.0.0.2", "slots=1"]
        assert (workdir / ".deepspeed_env").read_text().startswith("DS_ACCELERATOR=cpu\n")
        proc = launch_through_hostfile(hostfile, env, workdir, cfg_path, work / "params.pt")
    print(f"\n[hostfile launch] 2 local ranks {local_s:.1f} s, 2 nodes through pdsh {time.monotonic() - start:.1f} s")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert not (work / ".deepspeed_env").exists()  # removed again
    # pdsh ran the node launcher on both hosts (it prefixes their output with the host) ...
    assert "export DS_ACCELERATOR=cpu" in log and "pdsh" in log
    assert "127.0.0.1: " in log and "127.0.0.2: " in log, log[-4000:]
    # ... and each started 1 of the 2 ranks of one world
    assert log.count("dist_world_size=2") == 2, log[-4000:]
    params = torch.load(work / "params.pt", weights_only=True)
    expected = torch.load(tmp_path / "local" / "params.pt", weights_only=True)
    bitwise, err = all(torch.equal(p, e) for p, e in zip(params, expected)), max_rel_err(params, expected)
    print(f"[hostfile launch] parameters bitwise equal: {bitwise}, max_rel_err {err:.2e}")
    assert len(params) == len(expected) and (bitwise or err < 2e-5)


@needs_sshd
def test_stopping_leaves_no_sshd_or_files(tmp_path):
    with loopback_hosts(tmp_path) as (hostfile, env, workdir):
        server_dir = hostfile.parent
        pid = int((server_dir / "sshd.pid").read_text())
        port = int(next(line.split()[1] for line in (server_dir / "sshd_config").read_text().splitlines()
                        if line.startswith("Port ")))
        assert workdir == tmp_path and (tmp_path / ".deepspeed_env").exists()
    assert not (tmp_path / ".deepspeed_env").exists()
    assert not server_dir.exists() and not Path(f"/proc/{pid}").exists()
    for host in ("127.0.0.1", "127.0.0.2"):
        with pytest.raises(OSError), socket.create_connection((host, port), timeout=1):
            pass


def test_deepspeed_env_file_is_put_back(tmp_path):
    from loopback.loopback_ssh import deepspeed_env_file

    (tmp_path / ".deepspeed_env").write_text("NCCL_DEBUG=INFO\n")
    with deepspeed_env_file(tmp_path, {"DS_ACCELERATOR": "cpu"}) as path:
        assert path.read_text() == "DS_ACCELERATOR=cpu\n"
    assert (tmp_path / ".deepspeed_env").read_text() == "NCCL_DEBUG=INFO\n"
    with pytest.raises(ValueError, match="KEY=VALUE"):
        with deepspeed_env_file(tmp_path, {"A": "1\nB=2"}):
            pass
