"""Remote tracebacks show the caller's own files, lines and source text, whatever cloudpickle the caller has.

cloudpickle 3.1.3 ships every pickled function's code with the file name "<dynamic-code>"; earlier 3.x keep the
caller's file name, but the worker never has the caller's source. Each case runs a user's script file in a fresh
process whose `cloudpickle` is the version under test (installed from PyPI into a directory of its own, put first
on the path), on the local host and on a server.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest
from conftest import ROOT, Server, script_env
from fal_serverless._hosts import find_uv

SCRIPT = """\
import cloudpickle
from fal_serverless import cloud, isolated, local


def check(x):
    if x > 2:
        raise ValueError(f"bad value {x}")


@isolated(host={host})
def fails(x):
    try:
        check(x)
    except ValueError as exc:
        raise RuntimeError("wrapped") from exc


print("cloudpickle", cloudpickle.__version__)
try:
    fails(3)
except RuntimeError as exc:
    print(exc.__cause__)
"""


@pytest.fixture(scope="module", params=["3.1.3", "3.0.0"])
def cloudpickle_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tuple[str, Path]:
    """The version under test, and a directory holding only cloudpickle at that version."""
    target = tmp_path_factory.mktemp(f"cloudpickle-{request.param}")
    subprocess.run(
        [find_uv(), "pip", "install", "--quiet", "--python", sys.executable, "--target", str(target),
         f"cloudpickle=={request.param}"],
        check=True,
        env=script_env(),
    )  # fmt: skip
    return request.param, target


@pytest.mark.parametrize("host", ["local", "cloud"])
def test_a_remote_traceback_names_the_callers_file_line_and_source(
    host: str, cloudpickle_path: Tuple[str, Path], server: Server, tmp_path: Path
) -> None:
    version, path = cloudpickle_path
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT.replace("{host}", host))
    env = script_env({**server.env(), "PYTHONPATH": str(path)})
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith(f"cloudpickle {version}\n"), text
    # Both frames of the caller's code, each with its real file, line and source text.
    assert f'File "{script}", line 13, in fails\n    check(x)' in text, text
    assert f'File "{script}", line 7, in check\n    raise ValueError(f"bad value {{x}}")' in text, text
    assert "ValueError: bad value 3" in text and "<dynamic-code>" not in text, text
    assert "agent" not in text, "the worker's own frames leak into the traceback"
