"""Faults, with a real server and real workers: each faulty call gets a clear error, the next call works, the server
stays up, and nothing leaks (no busy worker, no process or cgroup of a dead worker, no half-built environment).

Part of the reliability group (`pytest -m reliability`); the summary counts the faults survived.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest
from conftest import (
    ROOT,
    Server,
    cloud_call,
    descendants,
    pid_alive,
    run_script,
    script_env,
    slot_links,
    slot_namespaces,
    start_client,
    start_server,
    worker_cgroups,
)

pytestmark = pytest.mark.reliability("faults")

#: Every worker pid any test here saw; none may be alive once its server says it is gone.
SEEN_WORKERS: List[int] = []


@pytest.fixture(scope="module")
def faulty() -> Iterator[Server]:
    """A server of its own, so that what it leaves behind can be counted when it stops."""
    server = start_server()
    yield server
    if server.process.poll() is None:
        server.stop()


def healthy_after(server: Server, key: Tuple[str, str]) -> None:
    """The server is up, serves the next call, and holds nothing of the faulty call."""
    assert server.process.poll() is None, "the server died"
    assert cloud_call(server, "return 'next'", key, keep_alive=0).stdout == "'next'\n"
    deadline = time.time() + 15
    while True:
        workers = server.workers()
        live = {int(w["pid"]) for w in workers}
        dead_but_alive = [pid for pid in SEEN_WORKERS if pid not in live and pid_alive(pid)]
        leaked_cgroups = len(server.cgroups()) - len(workers)
        busy = [w for w in workers if w["busy"] == "true"]
        if not (dead_but_alive or leaked_cgroups or busy):
            return
        if time.time() > deadline:
            raise AssertionError(f"leaked: processes {dead_but_alive}, {leaked_cgroups} cgroup(s), busy {busy}")
        time.sleep(0.2)


def test_a_worker_killed_with_sigkill_mid_call(faulty: Server) -> None:
    key = faulty.create_key("fault-kill")
    client = start_client(faulty, key, "import time\ntime.sleep(120)", keep_alive=30)
    worker = int(faulty.wait_for_worker("fault-kill")["pid"])
    SEEN_WORKERS.append(worker)
    # The Python process at the bottom of the jail (bwrap, its pid-namespace init, then the agent): the one leaf.
    tree = [worker, *descendants(worker)]
    agent = next(pid for pid in reversed(tree) if not descendants(pid))
    os.kill(agent, signal.SIGKILL)
    _, stderr = client.communicate(timeout=60)
    assert "WorkerDiedError" in stderr and "SIGKILL" in stderr, stderr
    healthy_after(faulty, key)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("import ctypes\nctypes.string_at(0)", "killed by signal 11 (SIGSEGV, a segmentation fault)"),
        ("import os\nos._exit(3)", "exited with code 3"),
    ],
    ids=["segfault", "os._exit"],
)
def test_a_worker_that_dies_by_itself(faulty: Server, body: str, expected: str) -> None:
    key = faulty.create_key("fault-die")
    proc = cloud_call(faulty, body, key, keep_alive=30)
    assert "WorkerDiedError" in proc.stderr and expected in proc.stderr, proc.stderr
    assert "The next call gets a fresh worker" in proc.stderr
    healthy_after(faulty, key)


def test_out_of_memory_under_the_machine_types_limit(faulty: Server) -> None:
    key = faulty.create_key("fault-oom")
    hog = cloud_call(faulty, "x = bytearray(2 * 1024**3)\nreturn len(x)", key, machine_type="S", keep_alive=30)
    assert "MachineTypeExceededError" in hog.stderr
    assert "exceeded the 1 GB of machine type S and was killed; use a larger machine_type" in hog.stderr
    healthy_after(faulty, key)


def test_a_child_killed_for_memory_fails_the_call_instead_of_hanging_it(faulty: Server) -> None:
    key = faulty.create_key("fault-oom-child")
    # A pool whose process the kernel kills waits for that process's task forever (multiprocessing replaces the
    # process, not the task), as a DataLoader may.
    body = "import multiprocessing\nwith multiprocessing.get_context('fork').Pool(1) as pool:\n"
    body += "    return len(pool.map(bytearray, [2 * 1024**3]))"
    proc = cloud_call(faulty, body, key, machine_type="XS", keep_alive=30, timeout=60)
    assert "MachineTypeExceededError" in proc.stderr, proc.stderr
    assert "exceeded the 256 MB of machine type XS (the kernel killed a process the function started" in proc.stderr
    healthy_after(faulty, key)


def test_a_fork_bomb(faulty: Server) -> None:
    key = faulty.create_key("fault-fork")
    body = """
import os, time
children = 0
try:
    for _ in range(5000):
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        children += 1
except OSError as error:
    return ("stopped", children, error.errno)
return ("not stopped", children, 0)
"""
    # On M, so that memory (8 GB) outlasts the 1024 processes the pids limit allows.
    proc = cloud_call(faulty, body, key, keep_alive=0, machine_type="M")
    assert proc.returncode == 0, proc.stderr
    outcome, children, errno = eval(proc.stdout)
    assert outcome == "stopped" and children < 1100 and errno == 11, proc.stdout
    healthy_after(faulty, key)  # the bomb's sleeping children went with its worker


def test_a_function_that_never_returns_is_ended_by_its_timeout(faulty: Server) -> None:
    key = faulty.create_key("fault-hang")
    started = time.time()
    proc = cloud_call(faulty, "import time\nwhile True:\n    time.sleep(1)", key, timeout=2, keep_alive=30)
    assert "CallTimeoutError" in proc.stderr and "reached its timeout of 2 s" in proc.stderr, proc.stderr
    assert time.time() - started < 30
    healthy_after(faulty, key)


def test_the_client_killed_mid_call_frees_its_worker(faulty: Server) -> None:
    key = faulty.create_key("fault-client")
    client = start_client(faulty, key, "import time\ntime.sleep(120)", keep_alive=30)
    worker = int(faulty.wait_for_worker("fault-client")["pid"])
    SEEN_WORKERS.append(worker)
    client.kill()
    client.wait()
    # The call is cancelled with its client: its worker is stopped, not left busy for two minutes.
    deadline = time.time() + 15
    while pid_alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    assert not pid_alive(worker), "the worker of a call whose client is gone is still running"
    healthy_after(faulty, key)


def test_a_client_frozen_mid_call_loses_its_call_and_frees_worker_and_capacity() -> None:
    # Room for one XS call: a second user's call needs what the frozen client's call holds.
    server = start_server(config="[capacity]\ncpus = 0.25\nmemory_gb = 0.25\n")
    client: Optional[subprocess.Popen[str]] = None
    try:
        frozen_key, next_key = server.create_key("fault-frozen"), server.create_key("fault-next")
        client = start_client(server, frozen_key, "import time\ntime.sleep(600)", keep_alive=0)
        worker = int(server.wait_for_worker("fault-frozen")["pid"])
        # Stopped, not killed: its connection stays open and its kernel still acknowledges TCP, but it answers no
        # HTTP/2 ping; only keepalive tells the server it is gone (else it holds its worker the call's 600 s).
        os.kill(client.pid, signal.SIGSTOP)
        deadline = time.time() + 60
        while pid_alive(worker) and time.time() < deadline:
            time.sleep(0.2)
        assert not pid_alive(worker), "the worker of a call whose client froze is still running after 60 s"
        assert not [w for w in server.workers() if w["user"] == "fault-frozen"], server.workers()
        # Its capacity is free: another user's call runs rather than waiting behind it.
        after = cloud_call(server, "return 'next'", next_key, timeout=60, keep_alive=0)
        assert after.stdout == "'next'\n", after.stderr
    finally:
        if client is not None:
            client.kill()  # SIGKILL ends a stopped process too
            client.wait()
        server.stop()


def test_a_server_killed_and_restarted_with_warm_and_busy_workers() -> None:
    # A subnet of its own, so the namespaces counted are this server's.
    first = start_server(config='[network]\nsubnet = "10.251.0.0/24"\n')
    key = first.create_key("fault-restart")
    assert cloud_call(first, "return 1", key, keep_alive=600).stdout == "1\n"
    warm = int(first.wait_for_worker("fault-restart", busy=False)["pid"])
    client = start_client(first, key, "import time\ntime.sleep(120)", keep_alive=600)
    busy = int(first.wait_for_worker("fault-restart")["pid"])
    workers = [warm, busy, *descendants(warm), *descendants(busy)]
    assert first.cgroups(), "workers run in cgroups of their own"
    cgroups = first.cgroups()
    namespaces = slot_namespaces("0afb00")
    assert len(namespaces) >= 2, "workers run in network namespaces of their own"
    # Held open, the dead server's namespaces keep their kernel ids: a new one cannot reuse one and pass for it.
    held = [os.open(f"/run/netns/{name}", os.O_RDONLY) for name in namespaces]

    first.process.kill()
    first.process.wait()
    started = time.time()
    _, stderr = client.communicate(timeout=60)
    assert "ServerUnavailableError" in stderr and "connection to the server was lost during the call" in stderr
    assert time.time() - started < 10, "the client hung after its server died"
    deadline = time.time() + 10
    while any(map(pid_alive, workers)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(pid_alive, workers)), "workers outlived their server"

    again = start_server(data_dir=first.data_dir)
    try:
        assert not any(c.exists() for c in cgroups), "the restarted server left the dead one's cgroups in place"
        left = {name for name, inode in slot_namespaces("0afb00").items() if namespaces.get(name) == inode}
        assert not left, f"the restarted server left the dead one's network namespaces in place: {left}"
        # Keys survive: the same key, and the first admin key, work against the restarted server.
        again.admin_id, again.admin_secret = first.admin_id, first.admin_secret
        assert cloud_call(again, "return 2", key, keep_alive=0).stdout == "2\n"
        assert again.cli("keys", "list").returncode == 0
    finally:
        for fd in held:
            os.close(fd)
        again.stop()
    assert not again.cgroups() and not descendants(again.process.pid)
    assert not slot_namespaces("0afb00") and not slot_links("0afb00"), "a stopped server left namespaces or veths"


def test_a_server_told_to_stop_ends_running_calls_after_its_grace_and_leaves_nothing() -> None:
    server = start_server(config='[network]\nsubnet = "10.252.0.0/24"\n')
    key = server.create_key("fault-stop")
    assert cloud_call(server, "return 1", key, keep_alive=600).stdout == "1\n"
    client = start_client(server, key, "import time\ntime.sleep(120)", keep_alive=600)
    server.wait_for_worker("fault-stop")
    server.process.send_signal(signal.SIGTERM)
    _, stderr = client.communicate(timeout=60)
    # The call is ended by the server itself (as it would be in any process that embeds it), and says why.
    assert "ServerUnavailableError" in stderr and "the server stopped before the call finished" in stderr, stderr
    assert server.process.wait(timeout=60) == 0
    assert not server.cgroups() and not descendants(server.process.pid)
    assert not slot_namespaces("0afc00") and not slot_links("0afc00"), "a stopped server left namespaces or veths"
    tag = hashlib.sha256(str(server.data_dir.resolve()).encode()).hexdigest()[:16]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    assert f"fal_{tag}" not in tables, "a stopped server left its nftables table"


BUILD = """
from fal_serverless import isolated, local
@isolated(host=local, requirements=["pyjokes==0.6.0"], keep_alive=0)
def joke():
    import pyjokes
    return pyjokes.get_joke()
print(joke())
"""


def test_an_environment_build_interrupted_half_way() -> None:
    cache = Path(tempfile.mkdtemp(prefix="fal-serverless-test-interrupted-"))
    env = script_env({"FAL_SERVERLESS_CACHE_DIR": str(cache)})
    client = subprocess.Popen(
        [sys.executable, "-c", BUILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert client.stderr is not None
    for line in client.stderr:
        if "building environment" in line:
            break
    client.kill()  # in the middle of the build
    client.wait()
    staged = list(cache.glob("envs/*/.tmp-*"))
    again = subprocess.run([sys.executable, "-c", BUILD], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and len(again.stdout.strip()) > 10, again.stderr
    assert not any(s.exists() for s in staged), "the interrupted build's half environment is still there"
    assert not list(cache.glob("envs/*/.tmp-*")), "a half-built environment was left behind"


# A 4 MB filesystem as the environment cache, mounted in a user and mount namespace of the client's own (which any
# user may make): the host's mounts are never touched. After the client, count what its builds left in the cache.
FULL_DISK = """
mount -t tmpfs -o size=4m tmpfs "$1" || exit 90
"$2" -c "$3"
status=$?
echo "left behind: $(find "$1" -maxdepth 3 -name '.tmp-*' | wc -l)"
exit $status
"""


def test_the_disk_full_during_a_build() -> None:
    cache = Path(tempfile.mkdtemp(prefix="fal-serverless-test-full-"))
    source = BUILD.replace('"pyjokes==0.6.0"', '"numpy"')
    proc = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            FULL_DISK,
            "sh",
            str(cache),
            sys.executable,
            source,
        ],
        env=script_env({"FAL_SERVERLESS_CACHE_DIR": str(cache)}),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode not in (0, 90), proc.stderr
    assert "EnvironmentBuildError" in proc.stderr, proc.stderr
    assert "No space left on device" in proc.stderr, proc.stderr
    assert "left behind: 0" in proc.stdout, "the failed build's half environment is still there"
    # The machine is not worse for it: the same build on a disk with room works.
    assert run_script(BUILD, {"FAL_SERVERLESS_CACHE_DIR": str(cache)}, timeout=300).returncode == 0


def test_after_all_faults_the_server_leaves_nothing_it_does_not_own(faulty: Server) -> None:
    """Last of this module: the faulty server, stopped, leaves no worker process, cgroup or staging dir."""
    owned = {int(w["pid"]) for w in faulty.workers()}
    assert all(pid_alive(pid) for pid in owned)
    faulty.stop()
    assert not [pid for pid in SEEN_WORKERS + list(owned) if pid_alive(pid)]
    assert not worker_cgroups(faulty.process.pid)
    assert not list(faulty.data_dir.glob("envs/*/.tmp-*"))
