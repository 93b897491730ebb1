"""Small helpers for scripts that start DeepSpeed launches (demo, benchmarks, tests)."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (for --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_shm_buffers(port: int | str | None = None) -> None:
    """Delete the /dev/shm files of the launch on ``port`` (default: $MASTER_PORT).

    DeepSpeed 0.19's CPU shared-memory all-reduce creates a 69 MB file per rank and
    launch (``deepspeed_allreduce_buffer_*_<port>_*``) and never removes it; repeated CPU
    launches fill /dev/shm (tmpfs, i.e. memory) until builds and runs are killed."""
    port = port if port is not None else os.environ.get("MASTER_PORT")
    if port:
        for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            f.unlink(missing_ok=True)


def main(argv=None) -> None:
    """Shell scripts' access: ``free-port`` prints a free port; ``clean-shm PORT`` removes that
    launch's /dev/shm buffers (launch/*.sh call it on exit)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vrgd_ds.deepspeed.launching", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("free-port")
    clean = sub.add_parser("clean-shm")
    clean.add_argument("port", type=int)
    args = ap.parse_args(argv)
    if args.cmd == "free-port":
        print(free_port())
    else:
        remove_shm_buffers(args.port)


if __name__ == "__main__":
    main()
