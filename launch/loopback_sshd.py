"""Two "nodes" on one machine for real `deepspeed --hostfile` launches (tests, rehearsals).

`deepspeed --hostfile` always goes through ssh (pdsh), even for localhost, and needs
passwordless ssh to every host. This module gives it that without touching the user's
own ssh setup:

- installs Debian's ``openssh-server`` and ``pdsh`` with apt-get if they are missing;
- starts a private sshd listening on 127.0.0.1 and 127.0.0.2 only (a free port, key-only,
  a throwaway host key and client key, all in a temporary folder);
- puts an ``ssh`` wrapper first on PATH that adds ``-F <private ssh_config>`` (port, key,
  no host-key prompts), which both DeepSpeed's ssh check and pdsh's ssh module use;
- writes ``.deepspeed_env`` (DS_ACCELERATOR, OMP_NUM_THREADS, PYTHONPATH) in the launch
  folder, which DeepSpeed forwards to the remote side, and restores what was there;
- stops the sshd and deletes the folder at the end.

    with loopback_hosts(workdir) as (hostfile, env):
        subprocess.run(["deepspeed", "--hostfile", hostfile, "--launcher", "pdsh",
                        "--master_addr", "127.0.0.1", "script.py"], cwd=workdir, env=env)

``python -m launch.loopback_sshd check`` prints why it cannot run here, if it cannot.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOSTS = ("127.0.0.1", "127.0.0.2")
SSHD = "/usr/sbin/sshd"


def skip_reason() -> str | None:
    """Why a loopback sshd cannot be started here, or None."""
    if os.geteuid() != 0:
        return "needs root (starts an sshd and may apt-get install openssh-server pdsh)"
    if not (Path(SSHD).exists() and shutil.which("pdsh")) and not shutil.which("apt-get"):
        return "openssh-server/pdsh are not installed and there is no apt-get to install them"
    return None


def ensure_installed() -> None:
    if Path(SSHD).exists() and shutil.which("pdsh") and shutil.which("ssh-keygen"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "openssh-server", "openssh-client", "pdsh"]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(cmd, env=env, capture_output=True, check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def _start_sshd(tmp: Path, port: int) -> None:
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / key)], check=True)
    shutil.copy(tmp / "user_key.pub", tmp / "authorized_keys")
    cfg = _write(tmp / "sshd_config", "\n".join([
        f"Port {port}", *(f"ListenAddress {h}" for h in HOSTS), f"HostKey {tmp / 'host_key'}",
        f"PidFile {tmp / 'sshd.pid'}", f"AuthorizedKeysFile {tmp / 'authorized_keys'}",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no", "PrintMotd no", ""]))
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege-separation directory sshd expects
    subprocess.run([SSHD, "-f", str(cfg), "-E", str(tmp / "sshd.log")], check=True)
    for _ in range(100):
        with contextlib.suppress(OSError), socket.create_connection((HOSTS[1], port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the loopback sshd did not start; see {tmp / 'sshd.log'}")


def _stop_sshd(tmp: Path) -> None:
    pid_file = tmp / "sshd.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)


@contextlib.contextmanager
def loopback_hosts(workdir: str | os.PathLike, extra_env: dict | None = None):
    """Yield (hostfile path, environment for the launcher) for 2 hosts x 1 slot."""
    reason = skip_reason()
    if reason:
        raise RuntimeError(f"cannot start a loopback sshd: {reason}")
    ensure_installed()
    workdir = Path(workdir)
    tmp = Path(tempfile.mkdtemp(prefix="vrgd-loopback-ssh-"))
    ds_env = workdir / ".deepspeed_env"
    saved = ds_env.read_bytes() if ds_env.exists() else None
    try:
        port = _free_port()
        _start_sshd(tmp, port)
        _write(tmp / "ssh_config", "\n".join([
            f"Host {' '.join(HOSTS)}", f"  Port {port}", f"  IdentityFile {tmp / 'user_key'}",
            "  IdentitiesOnly yes", "  StrictHostKeyChecking no", "  UserKnownHostsFile /dev/null",
            "  LogLevel ERROR", "  BatchMode yes", ""]))
        (tmp / "bin").mkdir()
        _write(tmp / "bin" / "ssh", f"#!/bin/sh\nexec /usr/bin/ssh -F {tmp / 'ssh_config'} \"$@\"\n", 0o755)
        hostfile = _write(tmp / "hostfile", "".join(f"{h} slots=1\n" for h in HOSTS), 0o644)
        remote = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(extra_env or {})}
        ds_env.write_text("".join(f"{k}={v}\n" for k, v in remote.items()))
        env = dict(os.environ, PATH=f"{tmp / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
                                    f"{os.environ.get('PATH', '')}", **remote)
        yield hostfile, env
    finally:
        _stop_sshd(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if saved is None:
            ds_env.unlink(missing_ok=True)
        else:
            ds_env.write_bytes(saved)


def main(argv=None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if args[:1] != ["check"]:
        print(__doc__)
        return 2
    reason = skip_reason()
    print(reason or "a loopback sshd can be started here")
    return 1 if reason else 0


if __name__ == "__main__":
    sys.exit(main())
