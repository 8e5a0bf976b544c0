"""What one call can make the server hold: its output (through a client that reads slowly, a line that never ends,
progress bars), a frame that claims more than it sends. The server's memory is sampled while the call runs; its peak
must stay near where it started."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List

import pytest
from conftest import Server, cloud_call, run_script, script_env, start_client, start_server

pytestmark = pytest.mark.reliability("resources")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """The highest RSS of `pid` while the `with` block runs, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = rss(pid)
        self.peak = self.start
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, rss(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def grew(self) -> int:
        return self.peak - self.start


@pytest.fixture(scope="module")
def resources_server() -> Iterator[Server]:
    server = start_server()
    yield server
    server.stop()


#: A client whose stdout is slow: the first line it is given blocks it for STALL seconds (as a terminal that is not
#: read, or a laptop on a bad network), then it takes lines at full speed. It prints what it saw as JSON on stderr.
SLOW_CLIENT = """
import json, sys, time
from fal_serverless import isolated, cloud

STALL = {stall}

class Recorder:
    def __init__(self):
        self.lines, self.first, self.seen = 0, None, []
    def write(self, text):
        if self.first is None:
            self.first = time.time()
            time.sleep(STALL)
        self.lines += text.count("\\n")
        if len(self.seen) < 20:
            self.seen.append((time.time(), text[:200]))
    def flush(self):
        pass

out = Recorder()
sys.stdout = out

@isolated(host=cloud, machine_type="S")
def f():
{body}

result = f()
sys.__stderr__.write("RESULT " + json.dumps({{"result": result, "lines": out.lines, "seen": out.seen,
                                              "returned_at": time.time()}}) + "\\n")
"""


def slow_client(server: Server, body: str, stall: float = 0.0, timeout: float = 240) -> dict:  # type: ignore[type-arg]
    source = SLOW_CLIENT.format(stall=stall, body="".join(f"    {line}\n" for line in body.strip().splitlines()))
    proc = run_script(source, server.env(), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stderr.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])  # type: ignore[no-any-return]


def test_a_2_gb_print_through_a_slow_client_holds_the_server_flat_and_loses_nothing(
    resources_server: Server,
) -> None:
    """200,000 lines of 10 kB: while the client does not read (10 s), the worker waits on its pipe instead of the
    server queueing gigabytes; then every line arrives."""
    body = """
import sys
line = "x" * 9999 + "\\n"
for _ in range(200_000):
    sys.stdout.write(line)
sys.stdout.flush()
return "done"
"""
    slow_client(resources_server, 'return "warm"')  # the environment and a warm worker exist before measuring
    with PeakRss(resources_server.process.pid) as memory:
        outcome = slow_client(resources_server, body, stall=10)
    assert outcome["result"] == "done"
    assert outcome["lines"] == 200_000, "every line arrives, none dropped"
    assert memory.grew() < 32 << 20, f"server RSS grew by {memory.grew() >> 20} MB during a 2 GB print"


def test_a_1_gb_line_without_a_newline_is_cut_and_marked_and_holds_the_server_flat(resources_server: Server) -> None:
    body = """
import sys
chunk = "y" * (1 << 20)
for _ in range(1024):
    sys.stdout.write(chunk)
    sys.stdout.flush()
return "done"
"""
    slow_client(resources_server, 'return "warm"')
    with PeakRss(resources_server.process.pid) as memory:
        outcome = slow_client(resources_server, body)
    assert outcome["result"] == "done"
    assert outcome["lines"] == 1
    text = outcome["seen"][0][1]
    assert text.startswith("y" * 100)
    assert memory.grew() < 32 << 20, f"server RSS grew by {memory.grew() >> 20} MB for a 1 GB line"


def test_progress_bar_updates_stream_while_the_call_runs(resources_server: Server) -> None:
    """tqdm's way: each update starts with a carriage return and has no newline. They arrive as they are written,
    not when the call ends; the cut line of the previous test carries its mark."""
    body = """
import sys, time
for step in range(1, 4):
    sys.stdout.write(f"\\rstep {step}/3")
    sys.stdout.flush()
    time.sleep(0.2)
time.sleep(3)
sys.stdout.write("\\n")
chunk = "z" * (100 << 10)
sys.stdout.write(chunk + "\\n")
return "done"
"""
    outcome = slow_client(resources_server, body)
    seen: List[List[object]] = outcome["seen"]
    texts = [str(text).rstrip("\n") for _, text in seen]
    assert texts[:3] == ["step 1/3", "step 2/3", "step 3/3"], texts
    first_update = float(str(seen[0][0]))
    assert outcome["returned_at"] - first_update > 2, "the first update arrived only when the call ended"
    assert texts[3].startswith("z" * 100)
    full = outcome["lines"]
    assert full == 4


def test_a_frame_header_claiming_a_gib_then_nothing_holds_the_server_flat(resources_server: Server) -> None:
    """The function writes, on the worker's own socket to the server (fd 3), a reply header that announces 1 GiB,
    then stops. The server waits for the rest holding what came (nothing), and the call fails at its timeout."""
    source = """
from fal_serverless import isolated, cloud
@isolated(host=cloud, machine_type="XS", timeout=8)
def f():
    import os, struct, time
    os.write(3, struct.pack(">IB", 1 << 30, 2))
    time.sleep(60)
try:
    f()
except Exception as e:
    print(type(e).__name__, e)
"""
    run_script(
        'from fal_serverless import isolated, cloud\n@isolated(host=cloud, machine_type="XS")\ndef f():\n'
        "    return 1\nprint(f())\n",
        resources_server.env(),
    )
    with PeakRss(resources_server.process.pid) as memory:
        proc = run_script(source, resources_server.env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "CallTimeoutError" in proc.stdout, proc.stdout + proc.stderr
    assert memory.grew() < 16 << 20, f"server RSS grew by {memory.grew() >> 20} MB for a header claiming 1 GiB"
    # The server serves the next call.
    after = run_script(
        'from fal_serverless import isolated, cloud\n@isolated(host=cloud, machine_type="XS")\n'
        "def f():\n    return 41 + 1\nprint(f())\n",
        resources_server.env(),
    )
    assert after.stdout.strip() == "42", after.stderr


BIG_UNAUTHENTICATED = """
import sys, grpc
channel = grpc.insecure_channel(sys.argv[1])
run = channel.unary_stream("/controller.IsolateController/Run", request_serializer=None, response_deserializer=None)
size = 1000 << 20
# A HostedRun whose `function` field announces and carries 1000 MiB.
body = bytearray(b"\\x0a")
n = size
while n >= 0x80:
    body.append((n & 0x7F) | 0x80)
    n >>= 7
body.append(n)
body += bytes(size)
try:
    for _ in run(bytes(body), metadata=[("auth-key-id", "nobody"), ("auth-key", "guess")]):
        pass
    print("accepted")
except grpc.RpcError as error:
    print(error.code().name, error.details())
"""


def test_an_unauthenticated_1_gib_request_is_refused_before_the_server_holds_it(
    resources_server: Server, original_stubs: Path
) -> None:
    with PeakRss(resources_server.process.pid) as memory:
        proc = subprocess.run(
            [str(original_stubs), "-c", BIG_UNAUTHENTICATED, resources_server.host],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("UNAUTHENTICATED") and "nobody" in proc.stdout, proc.stdout
    assert memory.grew() < 64 << 20, f"server RSS grew by {memory.grew() >> 20} MB for a refused request"


def test_a_big_type_call_of_one_user_does_not_time_out_another_users_small_call() -> None:
    """mallory's L (4 CPUs, 32 GB) on this 2-core host holds her share (3/4 of it), not the whole server: alice's XS
    runs beside it instead of waiting out its minute."""
    server = start_server()
    try:
        mallory, alice = server.create_key("mallory"), server.create_key("alice")
        large = start_client(server, mallory, "import time\ntime.sleep(40)\nreturn 'large'", machine_type="L")
        server.wait_for_worker("mallory", busy=True, timeout=120)
        small = cloud_call(server, "return 'small'", alice, machine_type="XS", timeout=30)
        assert small.returncode == 0 and small.stdout.strip() == "'small'", small.stderr
        out, err = large.communicate(timeout=120)
        assert large.returncode == 0 and out.strip() == "'large'", err
    finally:
        server.stop()


def test_warm_workers_hold_capacity_and_a_waiting_call_stops_an_idle_one() -> None:
    """A server of 2.5 GB: bob's two warm S workers (1 GB each) hold 2 GB while idle. carol's S call does not start
    beside them (the host would run out of memory once bob's models fill them): it waits, and the server stops bob's
    longest idle worker to make room."""
    server = start_server(config="[capacity]\nmemory_gb = 2.5\nuser_share = 1.0\n")
    try:
        bob, carol = server.create_key("bob"), server.create_key("carol")
        for tag in ("one", "two"):
            # Two environments (requirements differ only in a comment-free pin), so two warm workers.
            proc = cloud_call(
                server,
                f"return {tag!r}",
                bob,
                machine_type="S",
                keep_alive=300,
                requirements=["six"] if tag == "one" else [],
            )
            assert proc.returncode == 0, proc.stderr
        assert len([w for w in server.workers() if w["user"] == "bob"]) == 2
        proc = cloud_call(server, "return 'carol'", carol, machine_type="S", keep_alive=300)
        assert proc.returncode == 0 and proc.stdout.strip() == "'carol'", proc.stderr
        assert "waiting for capacity to run machine type S" in proc.stderr, proc.stderr
        users = [w["user"] for w in server.workers()]
        assert sorted(users) == ["bob", "carol"], users
    finally:
        server.stop()


def test_queued_payloads_are_capped_per_user() -> None:
    """One XS at a time, and at most 0.5 GB of one user's payloads waiting: a first 300 MB call waits its turn, a
    second is refused at once with the limit named, and the first still runs."""
    server = start_server(config="[capacity]\ncpus = 0.25\n[limits]\nmax_queued_gb_per_user = 0.5\n")
    try:
        dave = server.create_key("dave")
        running = start_client(server, dave, "import time\ntime.sleep(40)\nreturn 'first'", machine_type="XS")
        server.wait_for_worker("dave", busy=True, timeout=120)
        big = "data = b'x' * (300 << 20)\n"
        source = (
            "import sys\nfrom fal_serverless import isolated, cloud\n"
            + big
            + "@isolated(host=cloud, machine_type='S', requirements=['six'])\ndef f():\n    return len(data)\n"
            "try:\n    print(f())\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
        )
        queued = subprocess.Popen(
            [sys.executable, "-c", source],
            env=script_env(server.env(*dave)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(10)  # the first is pickled, sent, and waiting behind the running call
        refused = run_script(source, server.env(*dave), timeout=120)
        assert "ServerBusyError" in refused.stdout, refused.stdout + refused.stderr
        assert "max_queued_gb_per_user" in refused.stdout, refused.stdout
        out, err = queued.communicate(timeout=180)
        assert out.strip() == str(300 << 20), out + err
        assert running.wait(timeout=60) == 0
    finally:
        server.stop()
