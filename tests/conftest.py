"""End-to-end tests: the real engine, real uv and PyPI, real worker processes under real cgroup limits.

Every test session gets an empty environment cache of its own, so the first call of each kind of environment really
builds it (uv's own package cache stays warm, as on any user's machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
from fal_serverless import IsolatedFunction, _native, local
from fal_serverless._serialization import SERIALIZER

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "reference"

# Set before fal_serverless starts its engine, so in-process tests use the session's cache too.
_CACHE = tempfile.mkdtemp(prefix="fal-serverless-test-cache-")
os.environ["FAL_SERVERLESS_CACHE_DIR"] = _CACHE
os.environ["UV_PYTHON_DOWNLOADS"] = "never"
os.environ.pop("FAL_SERVERLESS_HOST", None)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(_CACHE)


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
