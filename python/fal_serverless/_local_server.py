"""Zero-config: with no FAL_HOST, the `cloud` host is a server on this machine, started on first use (the way
`ray.init()` starts a local instance). It keeps its address and a local admin key in the user's config dir (the
file 0600, the dir 0700; both refused when someone else could read or replace them) and stops by itself after 15
minutes unused."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

from . import _native
from .exceptions import NoServerConfiguredError

START_TIMEOUT = 60.0


#: The local server's (host, pid), as its credentials file says.
Info = Tuple[str, int]


def _read() -> Optional[Info]:
    """The credentials file's host and pid (checked to be this user's alone by the native side)."""
    return _native.read_local_server()


def _alive(info: Info) -> bool:
    address, pid = info
    try:
        os.kill(pid, 0)
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
            return True
    except (OSError, ValueError):
        return False


def ensure_running(known_pid: Optional[int] = None) -> int:
    """Returns the pid of the local server, starting one first if none is running. `known_pid`, a server this
    process already reached, only needs to still exist (a cheap check on every call)."""
    if known_pid is not None:
        try:
            os.kill(known_pid, 0)
            return known_pid
        except OSError:
            pass
    info = _read()
    if info is not None and _alive(info):
        return info[1]
    # Made 0700 if missing, and refused if someone else could replace what it holds.
    path = Path(_native.prepare_local_server_dir())
    lock_fd = os.open(path.parent / ".local-server.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(lock_fd, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time; the others find it running
        info = _read()
        if info is not None and _alive(info):
            return info[1]
        return _start(path)


def _start(path: Path) -> int:
    from ._hosts import find_uv

    log_path = path.parent / "local-server.log"
    sys.stderr.write(f"fal-serverless: starting a local server (logs in {log_path})\n")
    env = dict(os.environ)
    env.setdefault("FAL_SERVERLESS_UV", find_uv())
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(log_fd, "ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "fal_serverless", "server", "--local"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # outlives this process, by design; it stops itself when idle
            close_fds=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        info = _read()
        if info is not None and info[1] == server.pid and _alive(info):
            return server.pid
        if server.poll() is not None:
            break
        time.sleep(0.05)
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    raise NoServerConfiguredError(
        f"could not start a local fal-serverless server (set FAL_HOST to use another one). Its log says:\n{tail}"
    )
