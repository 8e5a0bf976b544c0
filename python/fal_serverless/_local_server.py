"""Zero-config: with no FAL_HOST, the `cloud` host is a server on this machine, started on first use (the way
`ray.init()` starts a local instance). It keeps its address and a local admin key in the user's config dir (mode
0600) and stops by itself after 15 minutes unused."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

from . import _native
from .exceptions import NoServerConfiguredError

START_TIMEOUT = 60.0


def _read(path: Path) -> Optional[Dict[str, Any]]:
    try:
        info: Dict[str, Any] = json.loads(path.read_text())
        return info
    except (OSError, ValueError):
        return None


def _alive(info: Dict[str, Any]) -> bool:
    try:
        os.kill(int(info["pid"]), 0)
        host, port = str(info["host"]).rsplit(":", 1)
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
            return True
    except (OSError, KeyError, ValueError):
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
    path = Path(_native.local_server_credentials_path())
    info = _read(path)
    if info is not None and _alive(info):
        return int(info["pid"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".local-server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time; the others find it running
        info = _read(path)
        if info is not None and _alive(info):
            return int(info["pid"])
        return _start(path)


def _start(path: Path) -> int:
    from ._hosts import find_uv

    log_path = path.parent / "local-server.log"
    sys.stderr.write(f"fal-serverless: starting a local server (logs in {log_path})\n")
    env = dict(os.environ)
    env.setdefault("FAL_SERVERLESS_UV", find_uv())
    with open(log_path, "ab") as log:
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
        info = _read(path)
        if info is not None and info.get("pid") == server.pid and _alive(info):
            return server.pid
        if server.poll() is not None:
            break
        time.sleep(0.05)
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    raise NoServerConfiguredError(
        f"could not start a local fal-serverless server (set FAL_HOST to use another one). Its log says:\n{tail}"
    )
