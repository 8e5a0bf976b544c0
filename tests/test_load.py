"""Load: many client processes, users, environments and machine types at once against one real server; and a queue
deeper than the server's capacity. Every result is checked; the summary counts the calls held and lost.

Part of the reliability group (`pytest -m reliability`).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HELD_CALLS, ROOT, NetworkHosts, cloud_call, script_env, start_server

pytestmark = pytest.mark.reliability("load")

CLIENTS = 32
CALLS_PER_CLIENT = 313  # 32 x 313 = 10,016 calls
ENVIRONMENTS = [[], ["pyjokes"], ["pyjokes!=0.0.1"], ["pyjokes!=0.0.2"]]

# One client process: its calls in sequence, each checked; prints what it made, got right and got wrong.
CLIENT = """
import json, sys
from fal_serverless import isolated, cloud
index, calls, requirements, machine_type = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]

@isolated(host=cloud, requirements=requirements, machine_type=machine_type, keep_alive=600)
def square(x):
    return (x, x * x)

made = right = 0
wrong = []
for i in range(calls):
    x = index * 1_000_000 + i
    made += 1
    try:
        got = square(x)
    except Exception as error:
        wrong.append(f"{type(error).__name__}: {error}")
        continue
    if got == (x, x * x):
        right += 1
    else:
        wrong.append(repr(got))
print(json.dumps({"made": made, "right": right, "wrong": wrong[:5]}))
"""


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run_clients(server_env: list[dict[str, str]], calls: int) -> list[dict[str, object]]:
    processes = []
    for index in range(CLIENTS):
        args = [str(index), str(calls), json.dumps(ENVIRONMENTS[index % 4]), "XS" if index % 3 else "S"]
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", CLIENT, *args],
                env=script_env(server_env[index % 2]),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
        )
    outcomes = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr
        outcomes.append(json.loads(stdout.strip().splitlines()[-1]))
    return outcomes


def test_ten_thousand_calls_from_32_processes_two_users_four_environments() -> None:
    server = start_server()
    try:
        users = [server.env(*server.create_key("load-a")), server.env(*server.create_key("load-b"))]
        # A first round builds the environments and starts the workers; the server's memory is measured after it.
        warmup = run_clients(users, 3)
        assert all(o["right"] == o["made"] for o in warmup), warmup
        before = rss(server.process.pid)

        outcomes = run_clients(users, CALLS_PER_CLIENT)
        made = sum(int(str(o["made"])) for o in outcomes)
        right = sum(int(str(o["right"])) for o in outcomes)
        HELD_CALLS["calls"] += made
        HELD_CALLS["lost"] += made - right
        assert made == CLIENTS * CALLS_PER_CLIENT
        assert right == made, [o["wrong"] for o in outcomes if o["wrong"]]

        # None duplicated: the workers ran exactly the calls that were made, each once.
        workers = server.workers()
        assert sum(int(w["calls"]) for w in workers) == made + CLIENTS * 3
        assert {w["user"] for w in workers} == {"load-a", "load-b"}
        assert {w["machine"] for w in workers} == {"XS", "S"}
        after = rss(server.process.pid)
        assert after - before < 16 << 20, f"server RSS grew from {before >> 20} MB to {after >> 20} MB"
    finally:
        server.stop()


def test_a_queue_deeper_than_capacity_runs_in_order_of_arrival_and_times_out_clearly(test_hosts: NetworkHosts) -> None:
    """Capacity for one XS call at a time. A first call holds it (until we answer over a socket, relayed by a test
    host: workers cannot reach the host itself); four more arrive one after the other and must run in that order; one
    with a 2 s timeout gives up waiting, clearly."""
    small = start_server(config="[capacity]\ncpus = 0.25\n")
    listener = socket.create_server(("0.0.0.0", 0))
    relay = test_hosts.relay(listener.getsockname()[1])
    source = f"""
import socket, sys, time
from fal_serverless import isolated, cloud
@isolated(host=cloud, machine_type="XS", keep_alive=30, timeout=float(sys.argv[2]))
def take_turn(name):
    with socket.create_connection({relay!r}) as conn:
        conn.sendall(name.encode())
        conn.recv(1)
    return name
print(take_turn(sys.argv[1]))
"""
    try:
        key = small.create_key("queue")
        env = script_env(small.env(*key))

        def client(name: str, timeout: float = 300) -> subprocess.Popen[str]:
            return subprocess.Popen(
                [sys.executable, "-c", source, name, str(timeout)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )

        listener.settimeout(120)
        holder = client("holder")
        held, _ = listener.accept()
        assert held.recv(16) == b"holder"
        queued = []
        for name in ["one", "two", "three", "four"]:
            queued.append(client(name))
            assert queued[-1].stderr is not None
            # Arrived: the server has told it to wait.
            assert "waiting for capacity" in queued[-1].stderr.readline()
        impatient = client("impatient", timeout=2)
        started = time.time()
        _, impatient_err = impatient.communicate(timeout=60)
        assert "CallTimeoutError" in impatient_err and "reached its timeout of 2 s" in impatient_err, impatient_err
        assert time.time() - started < 30

        order = []
        conn = held
        for _ in queued:
            conn.sendall(b"x")
            conn.close()
            conn, _ = listener.accept()
            order.append(conn.recv(16).decode())
        conn.sendall(b"x")
        conn.close()
        assert order == ["one", "two", "three", "four"]
        for process, name in zip([holder, *queued], ["holder", "one", "two", "three", "four"]):
            assert process.communicate(timeout=60)[0] == f"{name}\n"
        HELD_CALLS["calls"] += 5
        assert cloud_call(small, "return 'after'", key).stdout == "'after'\n"
    finally:
        listener.close()
        small.stop()
