"""The Slurm provider against real Slurm daemons (munged, slurmctld, slurmd from Debian's slurm-wlm and munge) that
the tests start: machine types become allocations of their size, keep_alive keeps and then releases the job, Slurm's
limits kill a memory hog, and a job cancelled, a node lost or a node gone silent (TCP keepalive) mid-call fails only
that call."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

import pytest
from conftest import (
    REFERENCE_CHECKS,
    OutputCheck,
    Server,
    check_reference_example,
    cloud_call,
    run_script,
    start_client,
    start_server,
)
from slurm_cluster import SlurmCluster, missing_tools, start_cluster

MEMORY_MB = 6000


def slurm_commands(cluster: SlurmCluster) -> Path:
    """Slurm's commands as the servers run them: the real ones, except that `squeue` fails while the file
    `squeue-fails` exists here (as when slurmctld does not answer in time), and notes each run in `squeue.calls`."""
    commands = cluster.root / "commands"
    if not commands.exists():
        commands.mkdir()
        for name in ("sbatch", "scontrol", "scancel"):
            (commands / name).symlink_to(shutil.which(name) or name)
        (commands / "squeue").write_text(
            "#!/bin/sh\n"
            f"if [ -e '{commands}/squeue-fails' ]; then\n"
            "  echo 'slurm_load_jobs error: Socket timed out on send/recv operation' >&2; exit 1\n"
            "fi\n"
            f"echo \"$@\" >> '{commands}/squeue.calls'\n"
            f"exec '{shutil.which('squeue')}' \"$@\"\n"
        )
        (commands / "squeue").chmod(0o755)
    return commands


def slurm_config(cluster: SlurmCluster, shared_dir: Optional[Path] = None) -> str:
    """The server's config: M and L are cut down to what the test machine has; environments go to `shared_dir` (a
    new directory if not given), the directory the nodes share, apart from the data dir."""
    cpus = cluster.cpus
    shared_dir = shared_dir or Path(tempfile.mkdtemp(prefix="shared-", dir=cluster.root))
    return f"""provider = "slurm"
[slurm]
partition = "debug"
callback = "{cluster.host_address}:0"
bin_dir = "{slurm_commands(cluster)}"
shared_dir = "{shared_dir}"
[slurm.machine_types.M]
cpus_per_task = {min(2, cpus)}
memory_mb = 2048
[slurm.machine_types.L]
cpus_per_task = {cpus}
memory_mb = 3072
"""


def require_slurm() -> None:
    missing = missing_tools()
    if missing:
        pytest.fail(f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")


def running_cluster(nodes: int) -> Iterator[SlurmCluster]:
    require_slurm()
    started = start_cluster(nodes, MEMORY_MB)
    yield started
    started.stop()


# In the server's own environment only: sbatch passes its environment on to the job (Slurm's --export=ALL).
SERVER_ONLY = "SERVER_ONLY_CREDENTIAL"


def server_on(cluster: SlurmCluster) -> Iterator[Server]:
    server = start_server(config=slurm_config(cluster), env={**cluster.env, SERVER_ONLY: "the-servers-own"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    yield from running_cluster(1)


@pytest.fixture(scope="module")
def slurm_server(cluster: SlurmCluster) -> Iterator[Server]:
    yield from server_on(cluster)


def new_worker_job(cluster: SlurmCluster, before: Set[str], timeout: float = 60) -> str:
    """The id of the first worker job not in `before` (warm jobs of earlier tests may still be there)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        new = set(cluster.worker_jobs()) - before
        if new:
            return new.pop()
        time.sleep(0.2)
    raise AssertionError(f"no new worker job within {timeout}s")


def job_of(server: Server, key: tuple[str, str], **options: object) -> Dict[str, str]:
    """Calls a function that returns its Slurm job id, with `options`; returns that id and the printed output."""
    proc = cloud_call(server, 'import os\nreturn os.environ["SLURM_JOB_ID"]', key, **options)
    assert proc.returncode == 0, proc.stderr
    return {"id": eval(proc.stdout), "stderr": proc.stderr}


@pytest.mark.parametrize(("name", "check"), REFERENCE_CHECKS)
def test_reference_examples_run_through_slurm(slurm_server: Server, name: str, check: OutputCheck) -> None:
    check_reference_example(slurm_server, name, check)


def test_machine_types_become_allocations_of_their_size(slurm_server: Server, cluster: SlurmCluster) -> None:
    key = slurm_server.create_key("sizes")
    xs = cluster.job(job_of(slurm_server, key, machine_type="XS", keep_alive=0)["id"])
    assert "cpu=1,mem=256M" in xs["TRES"], xs["TRES"]
    m = cluster.job(job_of(slurm_server, key, machine_type="M", keep_alive=0)["id"])
    assert f"cpu={min(2, cluster.cpus)},mem=2G" in m["TRES"], m["TRES"]


def test_keep_alive_reuses_the_job_then_releases_it(slurm_server: Server, cluster: SlurmCluster) -> None:
    key = slurm_server.create_key("keepalive")
    source = (
        "from fal_serverless import isolated\n"
        "import os\n"
        "@isolated(keep_alive=2)\n"
        "def f():\n"
        "    return os.environ['SLURM_JOB_ID']\n"
        "print(f(), f())\n"
    )
    proc = run_script(source, slurm_server.env(*key))
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.split()
    assert first == second, "the second call within keep_alive got another job"
    assert first in cluster.worker_jobs()
    deadline = time.time() + 15
    while first in cluster.worker_jobs() and time.time() < deadline:
        time.sleep(0.2)
    assert first not in cluster.worker_jobs(), "the job outlived its keep_alive"


def test_a_secret_reaches_the_job_but_not_its_script_or_its_environment_in_slurm(
    slurm_server: Server, cluster: SlurmCluster
) -> None:
    key = slurm_server.create_key("secrets")
    secret = "slurm-secret-" + os.urandom(8).hex()
    proc = slurm_server.cli("secrets", "set", "JOB_TOKEN", secret, key=key)
    assert proc.returncode == 0, proc.stderr
    body = 'import os\nreturn os.environ["SLURM_JOB_ID"], os.environ.get("JOB_TOKEN")'
    proc = cloud_call(slurm_server, body, key, keep_alive=30)
    assert proc.returncode == 0, proc.stderr
    job_id, seen = eval(proc.stdout)
    assert seen == secret
    # What Slurm keeps of the job and shows: its script, and its record with the environment it was submitted with.
    script = cluster.command("scontrol", "write", "batch_script", job_id, "-")
    assert "exec" in script and secret not in script
    assert secret not in cluster.command("scontrol", "show", "job", "--details", job_id)
    assert slurm_server.cli("secrets", "delete", "JOB_TOKEN", key=key).returncode == 0
    # The warm job, started with the old value, is cancelled rather than kept for its keep_alive.
    deadline = time.time() + 15
    while job_id in cluster.worker_jobs() and time.time() < deadline:
        time.sleep(0.2)
    assert job_id not in cluster.worker_jobs()


def test_a_job_gets_slurms_variables_but_nothing_of_the_servers_environment(slurm_server: Server) -> None:
    key = slurm_server.create_key("server-env")
    body = f'import os\nreturn os.environ.get("{SERVER_ONLY}"), "SLURM_JOB_ID" in os.environ, os.environ["PATH"]'
    proc = cloud_call(slurm_server, body, key, keep_alive=0)
    assert proc.returncode == 0, proc.stderr
    seen, has_job_id, path = eval(proc.stdout)
    assert seen is None, "a variable of the server's environment reached the user's function on the node"
    assert has_job_id and path.endswith(":/usr/local/bin:/usr/bin:/bin"), (has_job_id, path)


def test_a_memory_hog_is_killed_by_slurms_limit_and_reported(slurm_server: Server, cluster: SlurmCluster) -> None:
    key = slurm_server.create_key("hog")
    body = "x = bytearray(600 * 1024 * 1024)\nfor i in range(0, len(x), 4096):\n    x[i] = 1\nreturn len(x)"
    proc = cloud_call(slurm_server, body, key, machine_type="XS", keep_alive=0)
    assert proc.returncode != 0
    assert "MachineTypeExceededError" in proc.stderr
    assert "exceeded the 256 MB of machine type XS" in proc.stderr, proc.stderr
    assert job_of(slurm_server, key, machine_type="XS", keep_alive=0)["id"]


def test_a_queued_job_shows_as_queued_in_the_callers_logs(slurm_server: Server, cluster: SlurmCluster) -> None:
    key = slurm_server.create_key("queued")
    blocker = cluster.command(
        "sbatch", "--parsable", f"--cpus-per-task={cluster.cpus}", "--mem=100M", "-o", "/dev/null", "--wrap", "sleep 6"
    ).strip()
    try:
        called = job_of(slurm_server, key, machine_type="XS", keep_alive=0)
    finally:
        subprocess.run(["scancel", blocker], env=dict(os.environ, **cluster.env), check=False)
    # "PENDING (Resources)", or "(Priority)" when the blocker itself waited behind an earlier test's warm job.
    assert "waiting for a Slurm allocation: PENDING (" in called["stderr"], called["stderr"]


def test_a_job_cancelled_by_an_admin_fails_its_call_clearly(slurm_server: Server, cluster: SlurmCluster) -> None:
    key = slurm_server.create_key("cancelled")
    result: Dict[str, subprocess.CompletedProcess[str]] = {}
    before = set(cluster.worker_jobs())
    call = threading.Thread(
        target=lambda: result.setdefault("proc", cloud_call(slurm_server, "import time\ntime.sleep(60)", key))
    )
    call.start()
    job = new_worker_job(cluster, before)
    time.sleep(3)  # the call is running on its worker by now
    cluster.command("scancel", job)
    call.join(timeout=60)
    proc = result["proc"]
    assert proc.returncode != 0
    assert "WorkerDiedError" in proc.stderr and "was cancelled in Slurm" in proc.stderr, proc.stderr
    assert job_of(slurm_server, key, keep_alive=0)["id"] != job


def test_a_warm_job_cancelled_while_idle_is_replaced_on_the_next_call(
    slurm_server: Server, cluster: SlurmCluster
) -> None:
    key = slurm_server.create_key("idle-cancelled")
    warm = job_of(slurm_server, key, keep_alive=120)["id"]
    assert job_of(slurm_server, key, keep_alive=120)["id"] == warm, "the second call did not reuse the warm job"
    cluster.command("scancel", warm)
    deadline = time.time() + 30
    while warm in cluster.worker_jobs() and time.time() < deadline:
        time.sleep(0.2)
    assert warm not in cluster.worker_jobs()
    replaced = job_of(slurm_server, key, keep_alive=0)
    assert replaced["id"] != warm


def test_a_restarted_server_cancels_the_jobs_it_left(cluster: SlurmCluster) -> None:
    config = slurm_config(cluster)
    server = start_server(config=config, env=cluster.env)
    key = server.create_key("restart")
    # A job queued behind a blocker when the server dies: nothing would ever connect to it.
    blocker = cluster.command(
        "sbatch", "--parsable", f"--cpus-per-task={cluster.cpus}", "--mem=100M", "-o", "/dev/null", "--wrap", "sleep 30"
    ).strip()
    try:
        before = set(cluster.worker_jobs())
        call = threading.Thread(target=lambda: cloud_call(server, "return 1", key, machine_type="XS"))
        call.start()
        left = new_worker_job(cluster, before)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=30)
        call.join(timeout=60)
        assert left in cluster.worker_jobs(), "the queued job should outlive the killed server until it restarts"
        restarted = start_server(config=config, data_dir=server.data_dir, env=cluster.env)
        try:
            deadline = time.time() + 10
            while left in cluster.worker_jobs() and time.time() < deadline:
                time.sleep(0.2)
            assert left not in cluster.worker_jobs(), "the restarted server did not cancel its old job"
        finally:
            restarted.stop()
    finally:
        subprocess.run(["scancel", blocker], env=dict(os.environ, **cluster.env), check=False)


def test_an_allocation_slurm_refuses_is_a_clear_error(slurm_server: Server) -> None:
    # The test cluster has no GPUs (no gres), so Slurm refuses the GPU type at submission.
    key = slurm_server.create_key("refused")
    proc = cloud_call(slurm_server, "return 1", key, machine_type="GPU-T4")
    assert proc.returncode != 0
    assert "MachineTypeUnavailableError" in proc.stderr
    assert "the cluster refused an allocation for machine type GPU-T4 (--cpus-per-task=4" in proc.stderr, proc.stderr
    assert job_of(slurm_server, key, keep_alive=0)["id"]


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[SlurmCluster]:
    yield from running_cluster(2)


@pytest.fixture(scope="module")
def two_node_server(two_nodes: SlurmCluster) -> Iterator[Server]:
    yield from server_on(two_nodes)


@pytest.mark.parametrize(("name", "check"), REFERENCE_CHECKS)
def test_reference_examples_run_on_two_nodes(two_node_server: Server, name: str, check: OutputCheck) -> None:
    check_reference_example(two_node_server, name, check)


def callback_port(server: Server) -> int:
    """The port the server's worker jobs connect back to: its listening port that is not the gRPC one."""
    grpc = int(server.host.rsplit(":", 1)[1])
    listening = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True, check=True).stdout.splitlines()
    ports = {int(line.split()[3].rsplit(":", 1)[1]) for line in listening if f"pid={server.process.pid}," in line}
    assert len(ports - {grpc}) == 1, listening
    return (ports - {grpc}).pop()


def test_a_node_gone_silent_mid_call_fails_that_call_within_a_minute(
    two_nodes: SlurmCluster, two_node_server: Server
) -> None:
    cluster, server = two_nodes, two_node_server
    first, second = cluster.nodes
    key = server.create_key("silent")
    # On the node in a namespace of its own, so its traffic can be dropped alone.
    cluster.command("scontrol", "update", f"NodeName={first.name}", "State=DRAIN", "Reason=test")
    table = "faltest_silent"
    job = ""
    try:
        result: Dict[str, subprocess.CompletedProcess[str]] = {}
        before = set(cluster.worker_jobs())
        call = threading.Thread(
            target=lambda: result.setdefault(
                "proc", cloud_call(server, "import time\ntime.sleep(600)", key, keep_alive=0)
            )
        )
        call.start()
        job = new_worker_job(cluster, before)
        deadline = time.time() + 60
        while cluster.job(job)["JobState"] != "RUNNING" and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # running on its worker by now
        assert cluster.job(job)["NodeList"] == second.name
        # Silent, as a node that lost power or its network: every packet between it and the server's callback
        # port is dropped (no reset, no FIN). Slurm's own traffic goes on. Only keepalive can tell.
        port = callback_port(server)
        rules = (
            f"table inet {table} {{\n"
            f"  chain in {{ type filter hook input priority 0; tcp sport {port} drop; }}\n"
            f"  chain out {{ type filter hook output priority 0; tcp dport {port} drop; }}\n"
            "}\n"
        )
        subprocess.run(second.run("nft", "-f", "-"), input=rules, text=True, check=True)
        call.join(timeout=110)
        assert not call.is_alive(), "a call on a node gone silent still waits after 110 s"
        proc = result["proc"]
        assert proc.returncode != 0
        assert "WorkerDiedError" in proc.stderr and second.name in proc.stderr, proc.stderr
    finally:
        subprocess.run(second.run("nft", "delete", "table", "inet", table), capture_output=True)
        if job:
            cluster.command("scancel", job)
        cluster.command("scontrol", "update", f"NodeName={first.name}", "State=RESUME")


def test_a_node_lost_mid_call_fails_that_call_and_the_next_lands_on_the_other(
    two_nodes: SlurmCluster, two_node_server: Server
) -> None:
    cluster, server = two_nodes, two_node_server
    first, second = cluster.nodes
    key = server.create_key("nodes")
    # The call must land on the node that can be lost alone (the one in a namespace of its own).
    cluster.command("scontrol", "update", f"NodeName={first.name}", "State=DRAIN", "Reason=test")
    result: Dict[str, subprocess.CompletedProcess[str]] = {}
    before = set(cluster.worker_jobs())
    call = threading.Thread(
        target=lambda: result.setdefault("proc", cloud_call(server, "import time\ntime.sleep(120)", key))
    )
    call.start()
    job = new_worker_job(cluster, before)
    deadline = time.time() + 60
    while cluster.job(job)["JobState"] != "RUNNING" and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # running on its worker by now
    assert cluster.job(job)["NodeList"] == second.name
    cluster.command("scontrol", "update", f"NodeName={first.name}", "State=RESUME")

    cluster.kill_node(second)
    call.join(timeout=90)
    proc = result["proc"]
    assert proc.returncode != 0
    assert "WorkerDiedError" in proc.stderr and second.name in proc.stderr, proc.stderr

    after = job_of(server, key, keep_alive=0)["id"]
    assert cluster.job(after)["NodeList"] == first.name


def test_setup_map_and_a_stream_on_slurm_workers(slurm_server: Server) -> None:
    key = slurm_server.create_key("calling-api")
    source = """
import fal_serverless as fs

def setup():
    print("setup ran")
    return 100

@fs.isolated(host=fs.cloud, setup_function=setup, keep_alive=30)
def add(base, x):
    return base + x

print("calls", [add(i) for i in range(3)])
print("map", list(add.map(range(5), concurrency=1)))

@fs.isolated(host=fs.cloud, keep_alive=30)
def count(n):
    yield from range(n)

print("stream", list(count(3)))
"""
    proc = run_script(source, slurm_server.env(*key), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "calls [100, 101, 102]" in proc.stdout and "map [100, 101, 102, 103, 104]" in proc.stdout, proc.stdout
    assert "stream [0, 1, 2]" in proc.stdout
    # One warm job ran every call and map input: its setup ran once.
    assert proc.stdout.count("setup ran") == 1, proc.stdout


def shared_dir_of(server: Server) -> Path:
    for line in (server.data_dir / "config.toml").read_text().splitlines():
        if line.startswith("shared_dir = "):
            return Path(line.split("=", 1)[1].strip().strip('"'))
    raise AssertionError("the server's config names no shared_dir")


def test_environments_are_built_in_the_shared_dir_and_the_state_stays_in_the_data_dir(slurm_server: Server) -> None:
    key = slurm_server.create_key("shared-dir")
    assert job_of(slurm_server, key, keep_alive=0)["id"]
    shared = shared_dir_of(slurm_server)
    assert any((shared / "envs").iterdir()), "no environment was built in the shared dir"
    assert not (slurm_server.data_dir / "envs").exists(), "an environment was built in the data dir"
    assert (slurm_server.data_dir / "state.sqlite3").exists() and not (shared / "state.sqlite3").exists()


def blocking_job(cluster: SlurmCluster, seconds: int) -> str:
    """A job holding every CPU of the (one-node) cluster for `seconds`: worker jobs queue behind it."""
    return cluster.command(
        "sbatch",
        "--parsable",
        f"--cpus-per-task={cluster.cpus}",
        "--mem=100M",
        "-o",
        "/dev/null",
        "--wrap",
        f"sleep {seconds}",
    ).strip()


def scancel(cluster: SlurmCluster, job: str) -> None:
    subprocess.run(["scancel", job], env=dict(os.environ, **cluster.env), check=False)


def test_slurm_not_answering_leaves_a_queued_call_waiting_not_failed(
    slurm_server: Server, cluster: SlurmCluster
) -> None:
    key = slurm_server.create_key("squeue-fails")
    failing = slurm_commands(cluster) / "squeue-fails"
    blocker = blocking_job(cluster, 8)
    try:
        failing.touch()
        before = set(cluster.worker_jobs())
        client = start_client(slurm_server, key, "return 42", machine_type="XS", keep_alive=0)
        new_worker_job(cluster, before)
        time.sleep(3)  # several looks at the queue fail meanwhile
        failing.unlink()
        stdout, stderr = client.communicate(timeout=120)
    finally:
        failing.unlink(missing_ok=True)
        scancel(cluster, blocker)
    # Before: squeue's failure read as the job's end ("its Slurm job N is ."), and the call failed.
    assert client.returncode == 0, stderr
    assert stdout.strip().endswith("42"), stdout
    assert "the cluster does not answer (slurm_load_jobs error: Socket timed out" in stderr, stderr


def test_calls_waiting_in_the_queue_share_one_look_at_it(slurm_server: Server, cluster: SlurmCluster) -> None:
    key = slurm_server.create_key("one-look")
    calls = slurm_commands(cluster) / "squeue.calls"
    blocker = blocking_job(cluster, 10)
    clients: List[subprocess.Popen[str]] = []
    try:
        before = set(cluster.worker_jobs())
        clients = [start_client(slurm_server, key, f"return {n}", machine_type="XS", keep_alive=0) for n in range(3)]
        deadline = time.time() + 60
        while len(set(cluster.worker_jobs()) - before) < 3 and time.time() < deadline:
            time.sleep(0.2)
        assert len(set(cluster.worker_jobs()) - before) == 3, "the three calls did not all queue"
        looks_before, started = len(calls.read_text().splitlines()), time.time()
        time.sleep(4)
        looks = len(calls.read_text().splitlines()) - looks_before
        window = time.time() - started
        # All three still waited the whole window (else fewer looks would prove nothing).
        pending = cluster.command(
            "squeue", "--noheader", "--name", "fal-worker", "--states", "PENDING", "--format", "%i"
        )
        assert len(set(pending.split()) - before) == 3, "the calls stopped waiting within the window"
    finally:
        scancel(cluster, blocker)
    for client in clients:
        _, stderr = client.communicate(timeout=120)
        assert client.returncode == 0, stderr
    # One look each 500 ms for all three (before: one each 500 ms for each of them).
    assert looks <= window / 0.5 + 2, f"{looks} squeue runs in {window:.1f}s for three waiting calls"


def zombies_of(pid: int) -> List[str]:
    """The children of `pid` that have ended but were never waited for."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue  # the thread ended meanwhile
        for child in children:
            try:
                stat = Path(f"/proc/{child}/stat").read_text()
            except OSError:
                continue  # reaped meanwhile
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                found.append(stat)
    return found


def test_an_abandoned_queued_call_cancels_its_job_and_leaves_no_zombie(
    slurm_server: Server, cluster: SlurmCluster
) -> None:
    key = slurm_server.create_key("abandoned")
    blocker = blocking_job(cluster, 30)
    try:
        before = set(cluster.worker_jobs())
        client = start_client(slurm_server, key, "return 1", machine_type="XS", keep_alive=0)
        job = new_worker_job(cluster, before)
        client.kill()
        client.wait(timeout=30)
        deadline = time.time() + 20
        while job in cluster.worker_jobs() and time.time() < deadline:
            time.sleep(0.2)
        assert job not in cluster.worker_jobs(), "the abandoned call's job is still queued"
        # Before: scancel was spawned and never waited for, a zombie of the server's until it exited.
        time.sleep(1)
        assert zombies_of(slurm_server.process.pid) == []
    finally:
        scancel(cluster, blocker)


def test_the_last_lines_a_function_prints_arrive_before_its_result(slurm_server: Server) -> None:
    key = slurm_server.create_key("last-lines")
    # Much more than a socket's buffers hold, written at once: the last lines are still in flight (or not yet read
    # by the server) when the function returns.
    body = (
        "import sys\n"
        "sys.stdout.write(''.join(f'line {n} ' + 'x' * 190 + '\\n' for n in range(25000)))\n"
        "print('the very last line', flush=True)\n"
        "return 'done'"
    )
    for attempt in range(3):
        proc = cloud_call(slurm_server, body, key, keep_alive=30)
        assert proc.returncode == 0, proc.stderr
        output = proc.stdout + proc.stderr
        assert "line 24999 " in output and "the very last line" in output, (attempt, output[-2000:])
