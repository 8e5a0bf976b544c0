"""End-to-end tests: the real engine, real uv and PyPI, real worker processes under real cgroup limits.

Every test session gets an empty environment cache of its own, so the first call of each kind of environment really
builds it (uv's own package cache stays warm, as on any user's machine).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

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


@pytest.fixture(scope="session", autouse=True)
def unmount_killed_servers_storage() -> Iterator[None]:
    """Unmounts, at the end of the session, the storage of this session's test servers that were killed (the fault
    tests kill some on purpose) and so could not unmount it themselves."""
    yield
    for data_dir in _DATA_DIRS:
        unmount_storage(data_dir)


# The data dirs of the servers this session started (another session's live servers are not its to unmount).
_DATA_DIRS: List[Path] = []


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

    def workers(self) -> List[Dict[str, str]]:
        """The server's live workers, as `fal-serverless workers` lists them to its admin."""
        proc = self.cli("workers")
        assert proc.returncode == 0, proc.stderr
        header, *rows = proc.stdout.splitlines()
        names = [name.lower() for name in header.split()]
        return [dict(zip(names, row.split())) for row in rows]

    def wait_for_worker(self, user: str, busy: bool = True, timeout: float = 60) -> Dict[str, str]:
        """The first worker of `user` (busy, or idle), once the server lists one."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for worker in self.workers():
                if worker["user"] == user and worker["busy"] == str(busy).lower():
                    return worker
            time.sleep(0.1)
        raise AssertionError(f"no {'busy' if busy else 'idle'} worker of {user} within {timeout}s: {self.workers()}")

    def cgroups(self) -> List[Path]:
        """The worker cgroups this server process made (named `<server pid>-<n>`), in any hierarchy."""
        return worker_cgroups(self.process.pid)

    def stop(self, timeout: float = 60) -> None:
        """Stops the server as its admin would (SIGTERM); one that has not stopped within `timeout` is killed, and
        its users' storage unmounted, so that no test leaves a mount behind (and the test still fails)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the server did not stop within {timeout}s of SIGTERM; it was killed") from None
        finally:
            unmount_storage(self.data_dir)


def unmount_storage(data_dir: Path) -> None:
    """Unmounts the btrfs image a server mounted at `<data_dir>/storage` if it is still mounted (its server was
    killed); the kernel detaches the loop device with the last unmount."""
    root = data_dir / "storage"
    if root.is_dir() and os.path.ismount(root):
        subprocess.run(["umount", "-l", str(root)], check=False)


FAL_SERVERLESS = str(Path(sys.executable).with_name("fal-serverless"))


def start_server(
    *extra: str,
    config: Optional[str] = None,
    data_dir: Optional[Path] = None,
    env: Optional[Dict[str, str]] = None,
    log: Optional[Path] = None,
) -> Server:
    """Starts `fal-serverless server` on a free loopback port with a fresh data dir (or `data_dir`, to restart one),
    `config` as its config.toml and `env` added to its environment; its log (stderr) goes to `log` (default:
    `<data dir>.log`)."""
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="fal-serverless-test-server-"))
    _DATA_DIRS.append(data_dir)
    if config is not None:
        data_dir.chmod(0o700)
        (data_dir / "config.toml").write_text(config)
    # Its log goes beside its data dir unless asked for elsewhere: a server that does not start is reported with it.
    log = log or data_dir.parent / f"{data_dir.name}.log"
    with open(log, "ab") as stderr:
        process = subprocess.Popen(
            [FAL_SERVERLESS, "server", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", *extra],
            env=script_env(env),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line.strip())
        if "listening on" in line:
            break
    if not lines or "listening on" not in lines[-1]:
        process.kill()
        tail = log.read_text(errors="replace")[-3000:]
        raise AssertionError(f"the server did not start (exit {process.wait()}); its log ({log}):\n{tail}")
    values = dict(line.split("=", 1) for line in lines if line.startswith("FAL_KEY_"))
    host = lines[-1].rsplit(" ", 1)[-1]
    # A restarted server prints no key (its data dir has one): the admin key is then the caller's to reuse.
    return Server(process, host, data_dir, values.get("FAL_KEY_ID", ""), values.get("FAL_KEY_SECRET", ""))


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    started = start_server()
    yield started
    started.stop()


@pytest.fixture(scope="session")
def original_stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Python of a virtualenv with the original isolate-proto 0.0.37 stubs (and grpcio) from PyPI."""
    return venv_with(tmp_path_factory, "isolate-proto", "isolate-proto==0.0.37", "cloudpickle")


def venv_with(tmp_path_factory: pytest.TempPathFactory, name: str, *packages: str) -> Path:
    """The Python of a new virtualenv of this Python's version with `packages` installed from PyPI by uv."""
    from fal_serverless._hosts import find_uv

    venv = tmp_path_factory.mktemp(name) / "venv"
    uv = find_uv()
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, env=script_env())
    python = venv / "bin" / "python"
    subprocess.run([uv, "pip", "install", "--quiet", "--python", str(python), *packages], check=True, env=script_env())
    return python


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


def run_example(server: Server, name: str, key: Optional[Tuple[str, str]] = None) -> subprocess.CompletedProcess[str]:
    """Runs the reference's example `name` (examples/reference/) against `server`."""
    env = script_env({**server.env(*(key or (None, None))), "FAL_SERVERLESS_HOST": "cloud"})
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)], env=env, capture_output=True, text=True, timeout=180, cwd=ROOT
    )


def is_joke(line: str) -> bool:
    return len(line) > 10


#: What an example must print: a test of its stdout's lines.
OutputCheck = Callable[[List[str]], bool]

#: The reference's examples that run on a server, and what each must print.
REFERENCE_CHECKS: List[Tuple[str, OutputCheck]] = [
    ("01_isolated.py", lambda lines: lines == ["Hello World"]),
    ("02_requirements.py", lambda lines: len(lines) == 1 and is_joke(lines[0])),
    ("03_machine_type.py", lambda lines: len(lines) == 2 and all(map(is_joke, lines))),
    ("04_local.py", lambda lines: len(lines) == 3 and all(map(is_joke, lines))),
    ("06_keep_alive.py", lambda lines: len(lines) == 2 and all(map(is_joke, lines))),
    ("07_cached.py", lambda lines: lines == ["The result is: Hello, World!"] * 2),
]


def check_reference_example(server: Server, name: str, check: OutputCheck) -> None:
    """Runs the reference's example `name` against `server` and asserts it succeeded and printed what `check` wants."""
    proc = run_example(server, name)
    assert proc.returncode == 0, proc.stderr
    assert check(proc.stdout.splitlines()), proc.stdout


def env_key(fn: IsolatedFunction[Any]) -> str:
    """The content key of the environment `fn` runs in."""
    o = fn.options
    return _native.environment_key(o.python_version, list(o.requirements), SERIALIZER)


def workers_of(fn: IsolatedFunction[Any]) -> List[Tuple[int, str, str, bool, int]]:
    """Live local workers of `fn`'s environment and machine type: (pid, env key, machine type, busy, calls)."""
    key = env_key(fn)
    return [w for w in local.engine.workers() if w[1] == key and w[2] == fn.options.machine_type]


def cloud_source(body: str, **options: object) -> str:
    """A user's script that calls `def f(): <body>` on the `cloud` host with `options`, printing repr(f())."""
    args = ", ".join(f"{k}={v!r}" for k, v in options.items())
    source = f"from fal_serverless import isolated, cloud\n@isolated(host=cloud, {args})\ndef f():\n"
    source += "".join(f"    {line}\n" for line in body.strip().splitlines())
    return source + "print(repr(f()))\n"


def cloud_call(server: Server, body: str, key: Tuple[str, str], **options: object) -> subprocess.CompletedProcess[str]:
    """Runs `cloud_source(body, **options)` against `server` with `key`."""
    return run_script(cloud_source(body, **options), server.env(*key))


def start_client(server: Server, key: Tuple[str, str], body: str, **options: object) -> subprocess.Popen[str]:
    """`cloud_source(body, **options)` calling `server`, running in the background."""
    return subprocess.Popen(
        [sys.executable, "-c", cloud_source(body, **options)],
        env=script_env(server.env(*key)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def worker_cgroups(owner: int) -> List[Path]:
    """Cgroups named `<owner>-<n>` below fal-serverless's base in every hierarchy `owner` lives in (v1 or v2)."""
    found: List[Path] = []
    try:
        lines = Path(f"/proc/{owner}/cgroup").read_text().splitlines()
    except OSError:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        mount = Path("/sys/fs/cgroup") / (controllers.split(",")[0] if controllers else "")
        for base in {mount / path.lstrip("/") / "fal-serverless", mount / "fal-serverless"}:
            if base.is_dir():
                found += [d for d in base.iterdir() if d.is_dir() and d.name.startswith(f"{owner}-")]
    return sorted(set(found))


def slot_namespaces(subnet_prefix: str) -> Dict[str, int]:
    """The network namespaces (and their kernel ids) of worker slots in a subnet, named `fal-<hex of the slot's
    /30>`: `subnet_prefix` is the hex of the subnet's first bytes ("0afb00" for 10.251.0.0/24)."""
    run = Path("/run/netns")
    names = [p for p in run.iterdir() if p.name.startswith(f"fal-{subnet_prefix}")] if run.is_dir() else []
    found = {}
    for path in names:
        try:
            found[path.name] = path.stat().st_ino
        except OSError:
            continue
    return found


def slot_links(subnet_prefix: str) -> List[str]:
    """The host-side veths of those slots."""
    return [p.name for p in Path("/sys/class/net").iterdir() if p.name.startswith(f"fal-{subnet_prefix}")]


def live_children() -> Dict[int, List[int]]:
    """Each process's live (not zombie) children, read from /proc at once. Unlike a thread's own children list, this
    shows workers started from the engine's threads."""
    children: Dict[int, List[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def descendants(pid: int) -> List[int]:
    """Every live process below `pid`."""
    children = live_children()
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


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


# --- the reliability group (`pytest -m reliability`): each test names its area; the summary counts them ---------

_AREA_LINES = {
    "faults": "faults survived {passed}/{total}",
    "load": "calls held {calls} with {lost} lost ({passed}/{total} load checks passed)",
    "bad_input": "bad inputs tried {total} with {passed} clear errors",
    "isolation": "isolation checks {passed}/{total}",
    "resources": "resource bounds held {passed}/{total}",
}
_area_outcomes: Dict[str, List[int]] = {}
#: What the load tests made and lost; they add to it.
HELD_CALLS = {"calls": 0, "lost": 0}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"reliability(area): a reliability check, one of {', '.join(_AREA_LINES)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    marker = item.get_closest_marker("reliability")
    # One count per test: its call, or its setup where that failed (the test then never ran).
    if marker is not None and (report.when == "call" or (report.when == "setup" and not report.passed)):
        counts = _area_outcomes.setdefault(marker.args[0], [0, 0])
        counts[0] += int(report.passed)
        counts[1] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _area_outcomes:
        return
    terminalreporter.section("reliability")
    for area, line in _AREA_LINES.items():
        if area in _area_outcomes:
            passed, total = _area_outcomes[area]
            terminalreporter.write_line(line.format(passed=passed, total=total, **HELD_CALLS))


# --- test hosts: listeners in a network namespace of the test's own, on addresses of the ranges under test --------

#: The test hosts' addresses (in their namespace) and the host's end of the link to them.
TEST_HOSTS = {"public": "198.51.100.1", "link_local": "169.254.77.1", "private": "10.77.0.1"}
_HOST_ENDS = ["198.51.100.2/24", "169.254.77.2/24", "10.77.0.2/24"]
#: The port every test host serves HTTP on: GET / answers "test host <address>"; GET /files/NAME serves a file.
TEST_HOST_PORT = 8000


@dataclass
class NetworkHosts:
    """A network namespace with an HTTP server on each of TEST_HOSTS' addresses, reached from the host over a veth;
    `files` is the directory its /files/ serves (a package index, for the build tests)."""

    namespace: str
    files: Path
    relays: List[subprocess.Popen[str]]

    def url(self, kind: str, path: str = "") -> str:
        return f"http://{TEST_HOSTS[kind]}:{TEST_HOST_PORT}/{path}"

    def relay(self, port: int) -> Tuple[str, int]:
        """A public test host's port that relays each connection to `port` of the host's end of the link (where a
        test listens: workers cannot reach the host itself). Returns that address; the relay lives as long as this."""
        host_end = _HOST_ENDS[0].split("/")[0]
        relay = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace, sys.executable, "-c", _RELAY, host_end, str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert relay.stdout is not None
        self.relays.append(relay)
        return TEST_HOSTS["public"], int(relay.stdout.readline())


_TEST_HOST_SERVER = """
import http.server, os, sys
files = sys.argv[1]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.do_GET(head=True)
    def do_GET(self, head=False):
        if self.path.startswith("/files/"):
            path = os.path.join(files, os.path.basename(self.path))
            if not os.path.isfile(path):
                self.send_error(404)
                return
            body = open(path, "rb").read()
        else:
            body = ("test host " + self.connection.getsockname()[0]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[2])), Handler)
print("listening", flush=True)
server.serve_forever()
"""


# Relays connections to argv[1]:argv[2], listening on argv[3]:argv[4] (default: any address, a free port); prints the
# port it listens on.
_RELAY = """
import socket, sys, threading
target = (sys.argv[1], int(sys.argv[2]))
listen = (sys.argv[3], int(sys.argv[4])) if len(sys.argv) > 4 else ("0.0.0.0", 0)
listener = socket.create_server(listen)
print(listener.getsockname()[1], flush=True)
def pipe(source, sink):
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    for end in (source, sink):
        try:
            end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
while True:
    inbound, _ = listener.accept()
    outbound = socket.create_connection(target)
    threading.Thread(target=pipe, args=(inbound, outbound), daemon=True).start()
    threading.Thread(target=pipe, args=(outbound, inbound), daemon=True).start()
"""


def relay(target: Tuple[str, int], listen: Tuple[str, int]) -> subprocess.Popen[str]:
    """A process relaying TCP connections to `target`, listening on `listen` (once this returns)."""
    process = subprocess.Popen(
        [sys.executable, "-c", _RELAY, target[0], str(target[1]), listen[0], str(listen[1])],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    process.stdout.readline()
    return process


def _remove_stale_test_hosts() -> None:
    """Removes the test hosts' namespaces of test runs that were killed (their pid gone): their links hold the same
    addresses, and a route over a stale one would take this run's traffic to a namespace with nothing listening."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for name in listed:
        owner = name[len("faltest-") :]
        if name.startswith("faltest-") and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            # Its servers and relays outlived the run and keep the namespace (and its link) alive.
            for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture(scope="session")
def test_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkHosts]:
    """Test hosts for the network checks: all traffic to them stays in namespaces this fixture makes."""
    if os.geteuid() != 0:
        pytest.fail("the network isolation tests need root (network namespaces, veth pairs)")
    namespace, link = f"faltest-{os.getpid()}", f"faltest{os.getpid() % 100000}"
    files = tmp_path_factory.mktemp("test-host-files")

    def ip(*args: str) -> str:
        return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout

    _remove_stale_test_hosts()
    ip("netns", "add", namespace)
    try:
        ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        for host_end, address in zip(_HOST_ENDS, TEST_HOSTS.values()):
            ip("addr", "add", host_end, "dev", link)
            ip("-n", namespace, "addr", "add", address + "/24", "dev", "eth0")
        ip("link", "set", link, "up")
        ip("-n", namespace, "link", "set", "eth0", "up")
        ip("-n", namespace, "link", "set", "lo", "up")
        for address in TEST_HOSTS.values():
            route = ip("route", "get", address)
            if f"dev {link} " not in route + " ":
                pytest.fail(f"the route to test host {address} does not go over {link} but: {route.strip()}")
        server_errors = files.parent / "test-host-server.stderr"
        with open(server_errors, "w") as errors:
            command = [sys.executable, "-c", _TEST_HOST_SERVER, str(files), str(TEST_HOST_PORT)]
            server = subprocess.Popen(
                ["ip", "netns", "exec", namespace, *command],
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
            )
        assert server.stdout is not None
        # It prints a line once it listens, so there is no race to poll: an empty line means it exited.
        if not server.stdout.readline():
            pytest.fail(
                f"the test hosts' HTTP server (in namespace {namespace}) exited with {server.wait()} before listening: "
                + server_errors.read_text()
            )
        socket.create_connection((TEST_HOSTS["public"], TEST_HOST_PORT), timeout=10).close()
        hosts = NetworkHosts(namespace, files, [])
        yield hosts
        for process in [server, *hosts.relays]:
            process.kill()
            process.wait()
    finally:
        subprocess.run(["ip", "link", "del", link], capture_output=True)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
