"""End-to-end tests: the real engine, real uv and PyPI, real worker processes under real cgroup limits.

Every test session gets an empty environment cache of its own, so the first call of each kind of environment really
builds it (uv's own package cache stays warm, as on any user's machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from fal_serverless import IsolatedFunction, _native, local
from fal_serverless._serialization import SERIALIZER

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "reference"

# Set before fal_serverless starts its engine, so in-process tests use the session's cache too; the zero-config
# server's credentials and data go to the session's own dirs, never the user's.
_CACHE = tempfile.mkdtemp(prefix="fal-serverless-test-cache-")
_CONFIG = tempfile.mkdtemp(prefix="fal-serverless-test-config-")
_DATA = tempfile.mkdtemp(prefix="fal-serverless-test-data-")
os.environ["FAL_SERVERLESS_CACHE_DIR"] = _CACHE
os.environ["FAL_SERVERLESS_CONFIG_DIR"] = _CONFIG
os.environ["FAL_SERVERLESS_DATA_DIR"] = _DATA
os.environ["UV_PYTHON_DOWNLOADS"] = "never"
for variable in ("FAL_SERVERLESS_HOST", "FAL_HOST", "FAL_KEY_ID", "FAL_KEY_SECRET", "ISOLATE_TEST_MODE"):
    os.environ.pop(variable, None)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(_CACHE)


@pytest.fixture(scope="session", autouse=True)
def stop_local_server() -> Iterator[None]:
    """Stops the zero-config server that tests may have started, at the end of the session."""
    yield
    credentials = Path(_CONFIG) / "local-server.json"
    if credentials.exists():
        pid = json.loads(credentials.read_text())["pid"]
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


@dataclass
class Server:
    """A `fal-serverless server` process the tests started, with its data dir and first admin key."""

    process: subprocess.Popen[str]
    host: str
    data_dir: Path
    admin_id: str
    admin_secret: str

    def env(self, key_id: Optional[str] = None, key_secret: Optional[str] = None) -> Dict[str, str]:
        """Variables that point a client at this server with a key (the admin's by default)."""
        return {
            "FAL_HOST": self.host,
            "FAL_KEY_ID": key_id or self.admin_id,
            "FAL_KEY_SECRET": key_secret or self.admin_secret,
        }

    def cli(self, *args: str, key: Optional[Tuple[str, str]] = None) -> subprocess.CompletedProcess[str]:
        """Runs the `fal-serverless` command (the console script of the installed package) against this server."""
        env = script_env(self.env(*(key or (None, None))))
        return subprocess.run([FAL_SERVERLESS, *args], env=env, capture_output=True, text=True, timeout=60)

    def create_key(self, user: str) -> Tuple[str, str]:
        proc = self.cli("keys", "create", "--user", user)
        assert proc.returncode == 0, proc.stderr
        values = dict(line.split("=", 1) for line in proc.stdout.splitlines())
        return values["FAL_KEY_ID"], values["FAL_KEY_SECRET"]


FAL_SERVERLESS = str(Path(sys.executable).with_name("fal-serverless"))


def start_server(*extra: str, config: Optional[str] = None) -> Server:
    """Starts `fal-serverless server` on a free loopback port with a fresh data dir (and `config`, if given)."""
    data_dir = Path(tempfile.mkdtemp(prefix="fal-serverless-test-server-"))
    if config is not None:
        data_dir.chmod(0o700)
        (data_dir / "config.toml").write_text(config)
    process = subprocess.Popen(
        [FAL_SERVERLESS, "server", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", *extra],
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line.strip())
        if "listening on" in line:
            break
    values = dict(line.split("=", 1) for line in lines if line.startswith("FAL_KEY_"))
    host = lines[-1].rsplit(" ", 1)[-1]
    return Server(process, host, data_dir, values["FAL_KEY_ID"], values["FAL_KEY_SECRET"])


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    started = start_server()
    yield started
    started.process.send_signal(signal.SIGTERM)
    started.process.wait(timeout=30)


def script_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def run_script(
    source: str, extra_env: Optional[Dict[str, str]] = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Runs `source` as a user's script in a fresh Python process."""
    return subprocess.run(
        [sys.executable, "-c", source],
        env=script_env(extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def env_key(fn: IsolatedFunction[Any]) -> str:
    """The content key of the environment `fn` runs in."""
    o = fn.options
    return _native.environment_key(o.python_version, list(o.requirements), SERIALIZER)


def workers_of(fn: IsolatedFunction[Any]) -> List[Tuple[int, str, str, bool, int]]:
    """Live local workers of `fn`'s environment and machine type: (pid, env key, machine type, busy, calls)."""
    key = env_key(fn)
    return [w for w in local.engine.workers() if w[1] == key and w[2] == fn.options.machine_type]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].split()[0] != "Z"
    except OSError:
        return False
