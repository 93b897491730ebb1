"""Two ssh "nodes" on one machine, so `deepspeed --hostfile` launches can be tested for real.

`deepspeed --hostfile` always goes through ssh (pdsh's ssh module), localhost included, and
first checks the first host with a plain ``ssh HOST hostname``. A real cluster gives it
passwordless ssh between nodes; this module stands in for that without touching ~/.ssh:

- needs ``sshd``, ``ssh``, ``ssh-keygen`` and ``pdsh`` installed; it never installs them or
  changes system files (``tests/loopback/install_tools.sh`` does that, once, as root);
- starts a private sshd on 127.0.0.1 and 127.0.0.2 only (Linux routes all of 127/8 to lo),
  on a free port, key-only, with a throwaway host key and client key in a temporary folder;
- puts an ``ssh`` wrapper first on the launcher's PATH that adds ``-F <private ssh_config>``
  (port, key, no host-key prompts). Both DeepSpeed's ssh check and pdsh run ``ssh`` from
  PATH, and DeepSpeed passes its whole environment to pdsh. (PDSH_SSH_ARGS_APPEND alone
  would not do: DeepSpeed's ssh check does not read it.)
- writes ``.deepspeed_env`` (DS_ACCELERATOR=cpu, PYTHONPATH, OMP_NUM_THREADS=1) in the
  launch folder: DeepSpeed reads ``~/.deepspeed_env`` and ``./.deepspeed_env`` and
  exports their lines on every node. What was there before is put back afterwards.

In Python::

    with loopback_hosts(workdir) as (hostfile, env, workdir):
        subprocess.run(["deepspeed", "--hostfile", hostfile, "--launcher", "pdsh",
                        "--master_addr", "127.0.0.1", "--master_port", "29500",
                        "script.py"], cwd=workdir, env=env)

From a shell (state in /tmp/vrgd-loopback-ssh, or --dir)::

    python tests/loopback/loopback_ssh.py start [--workdir DIR]   # prints the PATH to export
    python tests/loopback/loopback_ssh.py status
    python tests/loopback/loopback_ssh.py stop
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
HOSTS = ("127.0.0.1", "127.0.0.2")
SSHD = Path("/usr/sbin/sshd")
PACKAGES = ("openssh-server", "pdsh")
PRIVSEP_DIR = Path("/run/sshd")
DS_ENV_FILE = ".deepspeed_env"
CLI_DIR = Path(tempfile.gettempdir()) / "vrgd-loopback-ssh"


def missing_tools() -> list[str]:
    """Programs the loopback launch needs that are not installed."""
    missing = [] if SSHD.exists() else [str(SSHD)]
    return missing + [t for t in ("pdsh", "ssh", "ssh-keygen") if shutil.which(t) is None]


def skip_reason() -> str | None:
    """Why a loopback sshd cannot be started here, or None if it can."""
    if not sys.platform.startswith("linux"):
        return f"needs Linux (127.0.0.2 on loopback, sshd), got {sys.platform}"
    missing = missing_tools()
    if missing:
        return f"{', '.join(missing)} not installed; tests/loopback/install_tools.sh installs {' '.join(PACKAGES)}"
    if os.geteuid() == 0 and not PRIVSEP_DIR.is_dir():
        return f"{PRIVSEP_DIR} (sshd's privilege-separation folder) is missing; tests/loopback/install_tools.sh makes it"
    return None


@dataclass
class LoopbackSSH:
    """A running private sshd; everything it needs lives in ``dir``."""

    dir: Path
    port: int
    pid: int

    @property
    def ssh_config(self) -> Path:
        return self.dir / "ssh_config"

    @property
    def bin_dir(self) -> Path:
        """Holds the ``ssh`` wrapper (``ssh -F ssh_config``) to put first on PATH."""
        return self.dir / "bin"

    def launcher_env(self, base: dict | None = None) -> dict:
        """Environment for the `deepspeed` launcher: the ssh wrapper and this venv first on PATH."""
        env = dict(os.environ if base is None else base)
        path = [str(self.bin_dir), str(Path(sys.executable).parent), env.get("PATH", os.defpath)]
        env["PATH"] = os.pathsep.join(path)
        return env

    def write_hostfile(self, path: Path, slots: int = 1) -> Path:
        path.write_text("".join(f"{host} slots={slots}\n" for host in HOSTS))
        return path

    def ssh(self, host: str, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", host, *command], env=self.launcher_env(), capture_output=True,
                              text=True, timeout=timeout)


def start(directory: Path | None = None) -> LoopbackSSH:
    """Start a loopback sshd (keys, configs, wrapper in ``directory`` or a new temp dir)."""
    reason = skip_reason()
    if reason:
        raise RuntimeError(f"cannot start a loopback sshd: {reason}")
    tmp = Path(directory).resolve() if directory else Path(tempfile.mkdtemp(prefix="loopback-sshd-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        port = _free_port()
        _write_keys_and_configs(tmp, port)
        subprocess.run([str(SSHD), "-f", str(tmp / "sshd_config"), "-E", str(tmp / "sshd.log")], check=True)
        server = LoopbackSSH(tmp, port, _wait_for_pid(tmp / "sshd.pid"))
        for host in HOSTS:  # a real login, so auth problems show up here and not inside deepspeed
            done = server.ssh(host, "true")
            if done.returncode != 0:
                raise RuntimeError(f"ssh {host} -p {port} failed ({done.stderr.strip()}); "
                                   f"sshd log: {_tail(tmp / 'sshd.log')}")
        return server
    except BaseException:
        _kill_sshd(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def stop(server: LoopbackSSH) -> None:
    """Stop the sshd and its sessions, then delete its folder."""
    _kill_sshd(server.dir)
    shutil.rmtree(server.dir, ignore_errors=True)


@contextlib.contextmanager
def loopback_sshd(directory: Path | None = None):
    """``start`` ... ``stop`` as a context manager; yields the LoopbackSSH."""
    server = start(directory)
    try:
        yield server
    finally:
        stop(server)


def remote_env(extra: dict | None = None) -> dict:
    """What ``.deepspeed_env`` carries to every node."""
    return {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(extra or {})}


@contextlib.contextmanager
def deepspeed_env_file(workdir: Path, values: dict):
    """Write ``workdir/.deepspeed_env`` (KEY=VALUE lines); put back what was there on exit."""
    for key, value in values.items():
        if "=" in key or "\n" in f"{key}{value}" or not key:
            raise ValueError(f".deepspeed_env entries must be KEY=VALUE on one line, got {key!r}={value!r}")
    path = Path(workdir) / DS_ENV_FILE
    saved = path.read_bytes() if path.exists() else None
    # no comments or blank lines: DeepSpeed splits every line on '='
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    try:
        yield path
    finally:
        if saved is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(saved)


class LoopbackHosts(NamedTuple):
    hostfile: Path
    env: dict
    workdir: Path


@contextlib.contextmanager
def loopback_hosts(workdir: Path | None = None, server: LoopbackSSH | None = None, slots: int = 1,
                   extra_env: dict | None = None):
    """Yield (hostfile, launcher env, workdir) for 2 loopback hosts x ``slots``.

    Launch `deepspeed --hostfile hostfile --launcher pdsh --master_addr 127.0.0.1 ...` with
    ``cwd=workdir, env=env``. ``server``: an already running LoopbackSSH (e.g. a module-scoped
    fixture's); without it one is started and stopped here. ``workdir`` defaults to a folder
    inside the server's; ``extra_env`` is added to ``.deepspeed_env``.
    """
    with contextlib.ExitStack() as stack:
        if server is None:
            server = stack.enter_context(loopback_sshd())
        own_workdir = workdir is None
        workdir = Path(tempfile.mkdtemp(dir=server.dir, prefix="work-") if own_workdir else workdir)
        fd, name = tempfile.mkstemp(dir=server.dir, prefix="hostfile-")
        os.close(fd)
        hostfile = server.write_hostfile(Path(name), slots)
        stack.callback(hostfile.unlink, missing_ok=True)
        if own_workdir:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        stack.enter_context(deepspeed_env_file(workdir, remote_env(extra_env)))
        yield LoopbackHosts(hostfile, server.launcher_env(), workdir)


def _free_port() -> int:
    """A port free on both loopback addresses."""
    for _ in range(20):
        with socket.socket() as s:
            s.bind((HOSTS[0], 0))
            port = s.getsockname()[1]
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind((HOSTS[1], port))
            return port
    raise RuntimeError(f"no port free on both {HOSTS}")


def _write(path: Path, text: str, mode: int = 0o600) -> None:
    path.write_text(text)
    path.chmod(mode)


def _write_keys_and_configs(tmp: Path, port: int) -> None:
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vrgd-loopback", "-f",
                        str(tmp / key)], check=True)
    shutil.copy(tmp / "client_key.pub", tmp / "authorized_keys")
    _write(tmp / "sshd_config", "\n".join([
        f"Port {port}", *(f"ListenAddress {h}" for h in HOSTS), f"HostKey {tmp / 'host_key'}",
        f"PidFile {tmp / 'sshd.pid'}", f"AuthorizedKeysFile {tmp / 'authorized_keys'}",
        "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", "UsePAM no", "StrictModes no", "PrintMotd no",
        "X11Forwarding no", "AllowTcpForwarding no", ""]))
    _write(tmp / "ssh_config", "\n".join([
        f"Host {' '.join(HOSTS)}", f"  Port {port}", f"  IdentityFile {tmp / 'client_key'}",
        "  IdentitiesOnly yes", "  BatchMode yes", "  StrictHostKeyChecking no",
        "  UserKnownHostsFile /dev/null", "  LogLevel ERROR", ""]))
    (tmp / "bin").mkdir(exist_ok=True)
    _write(tmp / "bin" / "ssh", f'#!/bin/sh\nexec {shutil.which("ssh", path=os.defpath) or "/usr/bin/ssh"} '
                                f'-F {tmp / "ssh_config"} "$@"\n', 0o755)


def _wait_for_pid(pid_file: Path, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            return int(pid_file.read_text().strip())
        time.sleep(0.05)
    raise RuntimeError(f"sshd wrote no pid file {pid_file} in {timeout:.0f} s; "
                       f"log: {_tail(pid_file.parent / 'sshd.log')}")


def _tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc), e.g. an sshd's live sessions."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
    return kids


def _kill_sshd(tmp: Path) -> None:
    """SIGTERM this folder's sshd and its session processes; wait for the sshd to go."""
    with contextlib.suppress(OSError, ValueError):
        pid = int((tmp / "sshd.pid").read_text().strip())
        if Path(f"/proc/{pid}/cmdline").read_bytes().find(str(tmp).encode()) < 0:
            return  # the pid was reused by something else
        for victim in [*_children(pid), pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGTERM)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.05)


# -- command line: one loopback sshd per --dir, kept across invocations --------------------


def _cli_start(directory: Path, workdir: Path | None) -> int:
    if (directory / "state.json").exists():
        print(f"already started ({directory}/state.json); stop it first", file=sys.stderr)
        return 1
    server = start(directory)
    hostfile = server.write_hostfile(directory / "hostfile")
    state = {**asdict(server), "dir": str(server.dir), "workdir": None, "saved_ds_env": None}
    if workdir is not None:
        ds_env = workdir.resolve() / DS_ENV_FILE
        if ds_env.exists():
            shutil.copy(ds_env, directory / "deepspeed_env.saved")
            state["saved_ds_env"] = str(directory / "deepspeed_env.saved")
        ds_env.write_text("".join(f"{k}={v}\n" for k, v in remote_env().items()))
        state["workdir"] = str(workdir.resolve())
    (directory / "state.json").write_text(json.dumps(state, indent=1))
    print(f"loopback sshd pid {server.pid} on {' '.join(HOSTS)} port {server.port}\n"
          f"export PATH={server.bin_dir}:{Path(sys.executable).parent}:$PATH\n"
          f"deepspeed --hostfile {hostfile} --launcher pdsh --master_addr 127.0.0.1 SCRIPT ..."
          + (f"   # from {workdir.resolve()}" if workdir else f"   # from a folder with {DS_ENV_FILE}"))
    return 0


def _cli_stop(directory: Path) -> int:
    state_file = directory / "state.json"
    if not state_file.exists():
        print(f"not started ({state_file} missing)")
        return 0
    state = json.loads(state_file.read_text())
    if state["workdir"]:
        ds_env = Path(state["workdir"]) / DS_ENV_FILE
        if state["saved_ds_env"]:
            shutil.copy(state["saved_ds_env"], ds_env)
        else:
            ds_env.unlink(missing_ok=True)
    stop(LoopbackSSH(Path(state["dir"]), state["port"], state["pid"]))
    print(f"stopped sshd pid {state['pid']}, removed {state['dir']}")
    return 0


def _cli_status(directory: Path) -> int:
    reason = skip_reason()
    print(f"prerequisites: {reason or 'ok'}; missing: {', '.join(missing_tools()) or 'nothing'}")
    state_file = directory / "state.json"
    if not state_file.exists():
        print("loopback sshd: not started")
        return 1
    state = json.loads(state_file.read_text())
    alive = Path(f"/proc/{state['pid']}").exists()
    print(f"loopback sshd: pid {state['pid']} {'running' if alive else 'NOT running'}, port {state['port']}, "
          f"hostfile {directory / 'hostfile'}, PATH prefix {directory / 'bin'}")
    return 0 if alive else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tests/loopback/loopback_ssh.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("start", "stop", "status"))
    ap.add_argument("--dir", type=Path, default=CLI_DIR, help=f"state folder (default {CLI_DIR})")
    ap.add_argument("--workdir", type=Path, default=None,
                    help=f"start: write {DS_ENV_FILE} here (put back on stop)")
    args = ap.parse_args(argv)
    if args.action == "start":
        return _cli_start(args.dir, args.workdir)
    return _cli_stop(args.dir) if args.action == "stop" else _cli_status(args.dir)


if __name__ == "__main__":
    sys.exit(main())
