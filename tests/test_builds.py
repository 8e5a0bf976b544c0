"""Environment builds on a server run jailed as their user: hostile packages find no way out.

The packages are made here and served by a test host (an HTTP server in a network namespace of the test's own, at a
public-range test address), since a server refuses `file://` requirements. Each hostile sdist brings an in-tree build
backend whose code runs when uv builds it: it tries what it should not, reports what happened on stderr, and fails
the build, so the caller's error shows the report.

Part of the reliability group (`pytest -m reliability`): isolation.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Dict, Iterator, Tuple

import pytest
from conftest import NetworkHosts, Server, cloud_call, run_script, start_server

pytestmark = pytest.mark.reliability("isolation")

HOSTILE_BACKEND = """
import json, os, socket, sys
results = {"uid": os.getuid()}
def attempt(name, action):
    try:
        action()
        results[name] = "succeeded"
    except BaseException as exc:
        results[name] = type(exc).__name__
ACTION, DATA, MARK, SERVER_PORT = %r, %r, %r, %d
if ACTION == "escape":
    attempt("write outside staging", lambda: open(MARK, "w").write("escaped"))
    attempt("write the data dir", lambda: open(os.path.join(DATA, "evil"), "w").write("escaped"))
    results["the data dir shows"] = sorted(os.listdir(DATA))
    attempt("read the keys", lambda: open(os.path.join(DATA, "state.sqlite3"), "rb").read())
    attempt("connect to the server", lambda: socket.create_connection(("127.0.0.1", SERVER_PORT), timeout=3).close())
elif ACTION == "fork bomb":
    children = []
    def bomb():
        while True:
            pid = os.fork()
            if pid == 0:
                import time
                time.sleep(60)
                os._exit(0)
            children.append(pid)
    attempt("fork without end", bomb)
    results["children"] = len(children)
print("HOSTILE " + json.dumps(results), file=sys.stderr, flush=True)
raise SystemExit(1)
"""


def sdist(name: str, backend: str) -> bytes:
    """An sdist of `name` 1.0 whose build backend is `backend` (in-tree: it needs nothing from an index)."""
    files = {
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        "pyproject.toml": (
            '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
            f'[project]\nname = "{name}"\nversion = "1.0"\n'
        ),
        "backend.py": backend,
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{name}-1.0/{path}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def wheel(name: str, files: Dict[str, str]) -> bytes:
    """A pure-Python wheel of `name` 1.0 holding `files` (paths inside the wheel), with a valid RECORD."""
    dist_info = f"{name}-1.0.dist-info"
    files = {
        **files,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return out.getvalue()


@pytest.fixture(scope="module")
def build_server() -> Iterator[Server]:
    """A server of its own, with a small pids limit for builds so the fork bomb meets it soon."""
    started = start_server(config="[build]\npids = 256\ntimeout_seconds = 300\n")
    yield started
    started.stop()


def serve(hosts: NetworkHosts, filename: str, content: bytes) -> str:
    """Serves `content` from the test host; returns its URL."""
    (hosts.files / filename).write_bytes(content)
    return hosts.url("public", f"files/{filename}")


def hostile_report(stderr: str) -> Dict[str, object]:
    match = re.search(r"HOSTILE (\{.*\})", stderr)
    assert match, f"the hostile build's report is not in the caller's error:\n{stderr}"
    report: Dict[str, object] = json.loads(match.group(1))
    return report


def user(server: Server, name: str) -> Tuple[str, str]:
    return server.create_key(name)


def test_an_sdist_cannot_write_outside_its_staging_dir_read_the_data_dir_or_reach_the_server(
    build_server: Server, test_hosts: NetworkHosts, tmp_path: Path
) -> None:
    mark = tmp_path / "escaped"
    port = int(build_server.host.rsplit(":", 1)[1])
    backend = HOSTILE_BACKEND % ("escape", str(build_server.data_dir), str(mark), port)
    url = serve(test_hosts, "hostile_escape-1.0.tar.gz", sdist("hostile_escape", backend))
    key = user(build_server, "build-mallory")
    proc = cloud_call(build_server, "return 1", key, requirements=[f"hostile-escape @ {url}"])
    assert "EnvironmentBuildError" in proc.stderr, proc.stderr
    report = hostile_report(proc.stderr)
    assert report.pop("uid") not in (0, os.getuid()), "the build ran as root"
    # Only the directories leading to its staging dir and its cache: nothing of the server's own.
    assert report.pop("the data dir shows") == ["build-cache", "envs"], report
    assert all(outcome != "succeeded" for outcome in report.values()), report
    assert not mark.exists() and not (build_server.data_dir / "evil").exists()
    assert cloud_call(build_server, "return 2", key).stdout == "2\n", "the server stopped serving"


def test_a_fork_bomb_in_a_build_meets_the_build_limits_and_is_a_build_error(
    build_server: Server, test_hosts: NetworkHosts
) -> None:
    backend = HOSTILE_BACKEND % ("fork bomb", "", "", 0)
    url = serve(test_hosts, "hostile_bomb-1.0.tar.gz", sdist("hostile_bomb", backend))
    key = user(build_server, "build-bomber")
    proc = cloud_call(build_server, "return 1", key, requirements=[f"hostile-bomb @ {url}"])
    assert "EnvironmentBuildError" in proc.stderr, proc.stderr
    report = hostile_report(proc.stderr)
    assert report["fork without end"] == "BlockingIOError" and 0 < int(str(report["children"])) < 256, report
    assert cloud_call(build_server, "return 2", key).stdout == "2\n", "the server stopped serving"


PTH_HOOK = """
import os
for path in ("/tmp/pth-ran", %r, %r):
    try:
        with open(path, "a") as f:
            f.write("%%d\\n" %% os.getuid())
    except OSError:
        pass
"""


def test_a_wheels_pth_file_runs_only_inside_the_jail_as_its_user(
    build_server: Server, test_hosts: NetworkHosts, tmp_path: Path
) -> None:
    mark = tmp_path / "pth-escaped"
    hook = PTH_HOOK % (str(mark), str(build_server.data_dir / "pth-evil"))
    url = serve(
        test_hosts,
        "pthmark-1.0-py3-none-any.whl",
        wheel("pthmark", {"pthmark.pth": "import pthmark_hook\n", "pthmark_hook.py": hook}),
    )
    key = user(build_server, "build-pth")
    body = "import os\nreturn open('/tmp/pth-ran').read().split(), os.getuid()"
    proc = cloud_call(build_server, body, key, requirements=[f"pthmark @ {url}"], keep_alive=0)
    assert proc.returncode == 0, proc.stderr
    ran_as, uid = eval(proc.stdout)
    # It ran (at the worker's start, in the worker's jail), as the user: and nowhere else.
    assert ran_as == [str(uid)] and uid not in (0, os.getuid()), proc.stdout
    assert not mark.exists() and not (build_server.data_dir / "pth-evil").exists()


def test_a_wheel_that_rewrites_pyvenv_cfg_changes_nothing_the_jail_mounts(
    build_server: Server, test_hosts: NetworkHosts
) -> None:
    data = build_server.data_dir
    # The old server took the interpreter's installation from `home`: it would have mounted the data dir.
    cfg = f"home = {data}/bin\ninclude-system-site-packages = false\nversion = 3.11\n"
    url = serve(
        test_hosts,
        "pyvcfg-1.0-py3-none-any.whl",
        wheel("pyvcfg", {"pyvcfg/__init__.py": "", "pyvcfg-1.0.data/data/pyvenv.cfg": cfg}),
    )
    key = user(build_server, "build-pyvenv")
    body = (
        "import os, sys\n"
        "cfg = open(os.path.join(sys.prefix, 'pyvenv.cfg')).read()\n"
        f"return cfg, os.path.exists({str(data / 'state.sqlite3')!r}), os.listdir({str(data)!r})"
    )
    proc = cloud_call(build_server, body, key, requirements=[f"pyvcfg @ {url}"], keep_alive=0)
    assert proc.returncode == 0, proc.stderr
    cfg_seen, keys_visible, listed = eval(proc.stdout)
    assert f"home = {data}/bin" in cfg_seen, "the wheel did not rewrite pyvenv.cfg: the test tests nothing"
    # `layers` holds only `layers/sdk`, the SDK offered to workers for nested calls.
    assert keys_visible is False and sorted(listed) == ["envs", "layers"], listed


def test_file_requirements_are_refused_by_a_server_with_a_clear_error(build_server: Server) -> None:
    key = user(build_server, "build-files")
    proc = cloud_call(build_server, "return 1", key, requirements=["victim @ file:///etc"])
    assert "EnvironmentBuildError" in proc.stderr and "name files of the server's machine" in proc.stderr, proc.stderr
    assert ".on(local)" in proc.stderr
    assert cloud_call(build_server, "return 2", key).stdout == "2\n"


def test_two_users_building_the_same_requirements_get_environments_of_their_own(build_server: Server) -> None:
    body = "import pyjokes, sys\nreturn sys.prefix, len(pyjokes.get_joke()) > 0"
    first = cloud_call(build_server, body, user(build_server, "build-ann"), requirements=["pyjokes"])
    second = cloud_call(build_server, body, user(build_server, "build-ben"), requirements=["pyjokes"])
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    (prefix_a, ok_a), (prefix_b, ok_b) = eval(first.stdout), eval(second.stdout)
    assert ok_a and ok_b and "/envs/build-ann/" in prefix_a and "/envs/build-ben/" in prefix_b
    # Build logs still stream to the caller: uv's for the first; the second's environment is a copy of links.
    assert re.search(r"\+ pyjokes==", first.stderr), first.stderr
    assert "[fal-serverless build] building environment" in second.stderr, second.stderr
    # Both are links to the shared environment's files, which belong to root and are writable by nobody else: no
    # user's build or worker can change what the other's environment contains.
    python = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for path in ("pyvenv.cfg", f"lib/{python}/site-packages/pyjokes/__init__.py"):
        a, b = os.stat(Path(prefix_a) / path), os.stat(Path(prefix_b) / path)
        assert (a.st_ino, a.st_uid) == (b.st_ino, 0) and a.st_mode & 0o022 == 0, path


FILL_DISK = """
import os, time
with open(os.path.join(os.getcwd(), "filler"), "wb") as f:
    for _ in range(40):
        f.write(os.urandom(4 << 20))
        f.flush()
        os.fsync(f.fileno())
        time.sleep(0.05)
time.sleep(60)
"""


@pytest.fixture(scope="module")
def tight_build_server() -> Iterator[Server]:
    """A server whose builds get little: 256 MB of memory, 64 MB of disk and 10 s."""
    started = start_server(config="[build]\nmemory_gb = 0.25\ndisk_gb = 0.0625\ntimeout_seconds = 10\n")
    yield started
    started.stop()


@pytest.mark.parametrize(
    ("name", "backend", "expected"),
    [
        ("slow_build", "import time\ntime.sleep(60)\n", "longer than the server's build timeout of 10 s"),
        ("greedy_build", "hog = bytearray(1 << 30)\nhog[::4096] = b'x' * len(hog[::4096])\n", "memory limit of 256 MB"),
        # Where a build writes to disk: its source tree's directory (in its uv cache).
        ("filling_build", FILL_DISK, "disk limit of 0.0625 GB"),
    ],
)
def test_a_build_over_the_build_limits_is_stopped_with_an_error_naming_the_limit(
    tight_build_server: Server, test_hosts: NetworkHosts, name: str, backend: str, expected: str
) -> None:
    url = serve(test_hosts, f"{name}-1.0.tar.gz", sdist(name, backend))
    key = user(tight_build_server, f"build-{name.replace('_', '-')}")
    proc = cloud_call(tight_build_server, "return 1", key, requirements=[f"{name.replace('_', '-')} @ {url}"])
    assert "EnvironmentBuildError" in proc.stderr and expected in proc.stderr, proc.stderr
    assert cloud_call(tight_build_server, "return 2", key).stdout == "2\n", "the server stopped serving"


def test_the_local_host_keeps_file_requirements(tmp_path: Path) -> None:
    """The local host is the user's own machine: a requirement naming a file of it installs."""
    package = tmp_path / "localonly-1.0-py3-none-any.whl"
    package.write_bytes(wheel("localonly", {"localonly/__init__.py": "ANSWER = 42\n"}))
    source = (
        "from fal_serverless import isolated, local\n"
        f"@isolated(host=local, requirements=['localonly @ {package.as_uri()}'], keep_alive=0)\n"
        "def f():\n    import localonly\n    return localonly.ANSWER\n"
        "print(f())\n"
    )
    proc = run_script(source)
    assert proc.returncode == 0 and proc.stdout == "42\n", proc.stderr
