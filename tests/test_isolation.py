"""Isolation between users, checked from inside their functions and through their keys. (More isolation checks, on
keys, files and limits, are in test_cloud.py, marked the same way.)

Part of the reliability group (`pytest -m reliability`); the summary counts the isolation checks.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, Iterator, Tuple

import pytest
from conftest import (
    TEST_HOST_PORT,
    TEST_HOSTS,
    NetworkHosts,
    Server,
    cloud_call,
    script_env,
    start_server,
)

pytestmark = pytest.mark.reliability("isolation")


def test_a_function_cannot_see_or_signal_another_users_processes(server: Server) -> None:
    owner, other = server.create_key("iso-owner"), server.create_key("iso-other")
    assert cloud_call(server, "return 1", owner, keep_alive=60).stdout == "1\n"
    victim = int(server.wait_for_worker("iso-owner", busy=False)["pid"])
    body = f"""
import os, signal
visible = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
try:
    os.kill({victim}, signal.SIGKILL)
    outcome = "signalled"
except ProcessLookupError:
    outcome = "no such process"
except PermissionError:
    outcome = "not permitted"
return visible, outcome
"""
    proc = cloud_call(server, body, other, keep_alive=0)
    assert proc.returncode == 0, proc.stderr
    visible, outcome = eval(proc.stdout)
    assert outcome in ("no such process", "not permitted"), outcome
    assert len(visible) <= 4, f"a function sees processes beyond its own sandbox: {visible}"
    assert any(int(w["pid"]) == victim for w in server.workers()), "the other user's worker is gone"


def test_a_key_cannot_revoke_or_list_what_another_user_owns(server: Server) -> None:
    owner, other = server.create_key("iso-keys-a"), server.create_key("iso-keys-b")
    revoke = server.cli("keys", "revoke", owner[0], key=other)
    assert revoke.returncode != 0 and "is not yours to revoke" in revoke.stderr, revoke.stderr
    listed = server.cli("keys", "list", key=other)
    assert owner[0] not in listed.stdout and other[0] in listed.stdout
    assert cloud_call(server, "return 1", owner, keep_alive=30).stdout == "1\n"
    workers = server.cli("workers", key=other)
    assert workers.returncode == 0 and "iso-keys-a" not in workers.stdout


def test_a_user_has_at_most_the_servers_cap_of_keys() -> None:
    capped = start_server(config="[limits]\nmax_keys_per_user = 3\n")
    try:
        own = capped.create_key("iso-capped")  # by the admin: the user's first
        made = [capped.cli("keys", "create", key=own) for _ in range(2)]  # by the user's own key: the second, third
        assert all(proc.returncode == 0 for proc in made), [proc.stderr for proc in made]
        for by in (own, None):  # the user's own key, then the admin's for them
            refused = capped.cli("keys", "create", *([] if by else ["--user", "iso-capped"]), key=by)
            assert refused.returncode != 0, refused.stdout
            assert 'user "iso-capped" already has 3 keys, the most this server allows per user' in refused.stderr
            assert "fal-serverless keys revoke KEY_ID" in refused.stderr, refused.stderr
        assert capped.cli("keys", "list", key=own).stdout.count("iso-capped") == 3
        # Revoking one makes room for one.
        made_id = dict(line.split("=", 1) for line in made[0].stdout.splitlines())["FAL_KEY_ID"]
        assert capped.cli("keys", "revoke", made_id, key=own).returncode == 0
        assert capped.cli("keys", "create", key=own).returncode == 0
        assert capped.cli("keys", "create", key=own).returncode != 0
    finally:
        capped.stop()


# --- network: a namespace per worker, egress policy --------------------------------------------------------------

PROBE = """
import socket
def probe(host, port):
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            s.sendall(b"GET /nowhere HTTP/1.0\\r\\n\\r\\n")
            reply = b""
            while len(reply) < 1000:
                chunk = s.recv(1000)
                if not chunk:
                    break
                reply += chunk
            return reply.decode(errors="replace").split("\\r\\n\\r\\n")[-1] or "connected"
    except OSError as exc:
        return type(exc).__name__
"""


#: How a connection the policy refuses fails, at once: nothing listens on the namespace's own loopback
#: (ECONNREFUSED), or the host answers ICMP "administratively prohibited" (EHOSTUNREACH, an OSError).
REFUSED = ("ConnectionRefusedError", "OSError")


def probes(server: Server, key: Tuple[str, str], targets: Dict[str, Tuple[str, int]]) -> Dict[str, str]:
    """What a function of `key`'s user gets from each target (host, port): the reply's body, or the error's name."""
    body = PROBE + f"return {{name: probe(*target) for name, target in {targets!r}.items()}}"
    proc = cloud_call(server, body, key, keep_alive=0)
    assert proc.returncode == 0, proc.stderr
    result: Dict[str, str] = eval(proc.stdout)
    return result


@pytest.fixture(scope="module")
def host_listener() -> Iterator[int]:
    """A TCP service of the host itself on all its addresses (loopback included); answers "host service"."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", 0))
    listener.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"host service")

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


def reachable_from_here(host: str, port: int) -> bool:
    """Positive control: the listener is there for the host itself."""
    with socket.create_connection((host, port), timeout=3):
        return True


def test_a_function_reaches_public_addresses_but_not_the_host_or_private_ranges(
    server: Server, test_hosts: NetworkHosts, host_listener: int
) -> None:
    server_port = int(server.host.rsplit(":", 1)[1])
    targets = {
        "public": (TEST_HOSTS["public"], TEST_HOST_PORT),
        "server": ("127.0.0.1", server_port),
        "host loopback": ("127.0.0.1", host_listener),
        "host address": ("198.51.100.2", host_listener),
        "link-local": (TEST_HOSTS["link_local"], TEST_HOST_PORT),
        "private": (TEST_HOSTS["private"], TEST_HOST_PORT),
    }
    assert all(reachable_from_here(*target) for target in targets.values())
    seen = probes(server, server.create_key("net-alice"), targets)
    assert seen.pop("public") == f"test host {TEST_HOSTS['public']}"
    # 127.0.0.1 at the server's port is, inside a worker, the server's own listener in the worker's namespace (for
    # nested calls): the server answers (its JSON 404 for a path it does not serve); nothing else of the host does.
    assert "nothing is served at /nowhere" in seen.pop("server"), seen
    assert all(outcome in REFUSED for outcome in seen.values()), seen


MALLORY = """
import socket, threading, time
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", 9999))
tcp.listen(8)
unix = socket.socket(socket.AF_UNIX)
unix.bind("\\0mallory-socket")
unix.listen(8)
def serve(listener):
    while True:
        conn, _ = listener.accept()
        conn.sendall(b"mallory's secret")
        conn.close()
for listener in (tcp, unix):
    threading.Thread(target=serve, args=(listener,), daemon=True).start()
own = socket.create_connection(("127.0.0.1", 9999)).recv(100)
print("listening", own.decode(), flush=True)
time.sleep(60)
"""

ALICE = """
import socket
seen = {}
for host in ["127.0.0.1"] + ["10.250.0.%d" % (4 * i + 2) for i in range(16)]:
    try:
        seen[host] = socket.create_connection((host, 9999), timeout=1).recv(100).decode()
    except OSError as exc:
        seen[host] = type(exc).__name__
unix = socket.socket(socket.AF_UNIX)
try:
    unix.connect("\\0mallory-socket")
    seen["abstract"] = unix.recv(100).decode()
except OSError as exc:
    seen["abstract"] = type(exc).__name__
return seen
"""


def test_a_function_cannot_reach_another_users_worker_by_tcp_or_abstract_socket(server: Server) -> None:
    mallory, alice = server.create_key("net-mallory"), server.create_key("net-alice2")
    args = "keep_alive=0"
    source = f"from fal_serverless import isolated, cloud\n@isolated(host=cloud, {args})\ndef f():\n"
    source += "".join(f"    {line}\n" for line in MALLORY.strip().splitlines()) + "f()\n"
    listening = subprocess.Popen(
        [sys.executable, "-c", source], env=script_env(server.env(*mallory)), stdout=subprocess.PIPE, text=True
    )
    try:
        assert listening.stdout is not None
        line = listening.stdout.readline()
        assert line.strip() == "listening mallory's secret", line
        proc = cloud_call(server, ALICE, alice, keep_alive=0)
        assert proc.returncode == 0, proc.stderr
        seen = eval(proc.stdout)
        assert not any("mallory" in outcome for outcome in seen.values()), seen
        assert seen["abstract"] == "ConnectionRefusedError", seen
    finally:
        listening.kill()
        listening.wait()


@pytest.fixture(scope="module")
def server_without_egress() -> Iterator[Server]:
    started = start_server(config='[network]\negress = "none"\n')
    yield started
    started.stop()


def test_egress_none_leaves_loopback_only(server_without_egress: Server, test_hosts: NetworkHosts) -> None:
    body = PROBE + (
        "own = socket.socket()\n"
        "own.bind(('127.0.0.1', 0))\n"
        "own.listen(1)\n"
        "socket.create_connection(own.getsockname(), timeout=3).close()\n"
        f"return probe({TEST_HOSTS['public']!r}, {TEST_HOST_PORT}), 'own loopback works'"
    )
    proc = cloud_call(server_without_egress, body, server_without_egress.create_key("net-bob"), keep_alive=0)
    assert proc.returncode == 0, proc.stderr
    public, loopback = eval(proc.stdout)
    assert public == "OSError" and loopback == "own loopback works", proc.stdout


@pytest.fixture(scope="module")
def resolver() -> Iterator[int]:
    """A DNS server on the host's loopback: names under example.test resolve to the public test host's address;
    other queries (the builds' package index) go on to the host's own resolver."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    upstream = next(
        line.split()[1] for line in Path("/etc/resolv.conf").read_text().splitlines() if line.startswith("nameserver")
    )

    def serve() -> None:
        while True:
            try:
                query, peer = udp.recvfrom(512)
            except OSError:
                return
            end, labels = 12, []
            while query[end] != 0:
                labels.append(query[end + 1 : end + 1 + query[end]].decode())
                end += query[end] + 1
            if labels[-2:] != ["example", "test"]:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as forward:
                    forward.settimeout(5)
                    forward.sendto(query, (upstream, 53))
                    udp.sendto(forward.recv(4096), peer)
                continue
            question, qtype = query[12 : end + 5], query[end + 1 : end + 3]
            answers = b"\x00\x01" if qtype == b"\x00\x01" else b"\x00\x00"
            reply = query[:2] + b"\x81\x80\x00\x01" + answers + b"\x00\x00\x00\x00" + question
            if qtype == b"\x00\x01":
                reply += b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton(TEST_HOSTS["public"])
            udp.sendto(reply, peer)

    threading.Thread(target=serve, daemon=True).start()
    yield udp.getsockname()[1]
    udp.close()


@pytest.fixture(scope="module")
def server_allowing(resolver: int) -> Iterator[Server]:
    config = f'[network]\nallow = ["{TEST_HOSTS["private"]}/32"]\nresolver = "127.0.0.1:{resolver}"\n'
    started = start_server(config=config)
    yield started
    started.stop()


def test_allow_opens_exactly_what_it_lists_and_dns_reaches_the_resolver(
    server_allowing: Server, test_hosts: NetworkHosts
) -> None:
    targets = {
        "private": (TEST_HOSTS["private"], TEST_HOST_PORT),
        "link-local": (TEST_HOSTS["link_local"], TEST_HOST_PORT),
        "by name": ("files.example.test", TEST_HOST_PORT),
    }
    seen = probes(server_allowing, server_allowing.create_key("net-carol"), targets)
    assert seen.pop("private") == f"test host {TEST_HOSTS['private']}", seen
    assert seen.pop("by name") == f"test host {TEST_HOSTS['public']}", seen
    assert seen.pop("link-local") in REFUSED, seen


# --- identity: a hostname per worker, a uid per user -------------------------------------------------------------


def test_each_worker_has_its_own_hostname_and_each_user_its_own_uid(server: Server) -> None:
    body = "import os, socket\nreturn socket.gethostname(), os.getuid(), os.getgid(), os.getgroups()"
    first, second = server.create_key("id-erin"), server.create_key("id-frank")
    seen = [eval(cloud_call(server, body, key, keep_alive=0).stdout) for key in (first, first, second)]
    hostnames = [hostname for hostname, *_ in seen]
    assert all(re.fullmatch(r"worker-[0-9a-f]{8}", h) for h in hostnames) and len(set(hostnames)) == 3, hostnames
    assert socket.gethostname() not in hostnames
    (_, erin, erin_gid, groups), (_, erin_again, _, _), (_, frank, _, _) = seen
    assert erin == erin_again == erin_gid and groups == []
    assert erin != frank and min(erin, frank) >= 200_000 and os.getuid() not in (erin, frank)


SERVE_8080 = """
import socket, time
listener = socket.create_server(("0.0.0.0", 8080))
print("listening", flush=True)
while True:
    conn, _ = listener.accept()
    conn.sendall(socket.gethostname().encode())
    conn.close()
"""

CONNECT = """
import socket, sys
try:
    print(socket.create_connection((sys.argv[1], 8080), timeout=3).recv(100).decode())
except OSError as exc:
    print(type(exc).__name__)
"""


def test_every_worker_listens_on_8080_and_only_the_server_connects_to_it(server: Server) -> None:
    users = [server.create_key("port-gail"), server.create_key("port-hugo")]
    source = "from fal_serverless import isolated, cloud\n@isolated(host=cloud, keep_alive=0)\ndef f():\n"
    source += "".join(f"    {line}\n" for line in SERVE_8080.strip().splitlines()) + "f()\n"
    run = [sys.executable, "-c", source]
    env = [script_env(server.env(*key)) for key in users]
    clients = [subprocess.Popen(run, env=e, stdout=subprocess.PIPE, text=True) for e in env]
    try:
        for client in clients:
            assert client.stdout is not None and client.stdout.readline().strip() == "listening"
        workers = {w["user"]: w for w in server.workers() if w["user"] in ("port-gail", "port-hugo")}
        assert len(workers) == 2 and workers["port-gail"]["address"] != workers["port-hugo"]["address"], workers
        for worker in workers.values():
            # The server's uid (root) reaches the worker's port; another user of the host does not.
            as_root = subprocess.run([sys.executable, "-c", CONNECT, worker["address"]], capture_output=True, text=True)
            assert as_root.stdout.strip() == worker["hostname"], as_root.stdout + as_root.stderr
            other = ["setpriv", "--reuid=65533", "--regid=65533", "--clear-groups", sys.executable, "-c", CONNECT]
            as_other = subprocess.run([*other, worker["address"]], capture_output=True, text=True)
            # The host refuses new connections to workers from any uid but the server's, at once.
            assert as_other.stdout.strip() in REFUSED, as_other.stdout
    finally:
        for client in clients:
            client.kill()
            client.wait()
