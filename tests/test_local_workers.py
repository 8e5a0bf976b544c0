"""Warm workers on the local host: output, exceptions, crashes, limits, concurrency and lifetime."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
from conftest import ROOT, live_children, pid_alive, run_script, script_env, workers_of
from fal_serverless import (
    EnvironmentBuildError,
    MachineTypeExceededError,
    RemoteError,
    SerializationError,
    WorkerDiedError,
    isolated,
    local,
)
from fal_serverless._serialization import SERIALIZER


@isolated(host=local)
def worker_pid() -> int:
    return os.getpid()


def wait_for(path: Path, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.02)
    return False


def test_output_reaches_the_callers_terminal_as_it_is_printed(tmp_path: Path) -> None:
    """The function prints, then waits until the test has seen that line on the client's stdout. Were output only
    delivered at the end of the call, the line could not arrive first and the function would report so."""
    seen = tmp_path / "seen"
    script = f"""
import time
from pathlib import Path
from fal_serverless import isolated, local

@isolated(host=local)
def talk():
    import sys
    print("first line", flush=False)
    print("to stderr", file=sys.stderr)
    deadline = time.time() + 30
    while not Path({str(seen)!r}).exists():
        if time.time() > deadline:
            return "not streamed"
        time.sleep(0.02)
    print("second line")
    return "streamed"

print("result:", talk())
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == "first line\n"
    seen.touch()
    rest = proc.stdout.read()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 0, stderr
    assert rest == "second line\nresult: streamed\n"
    assert "to stderr" in stderr.splitlines()


def test_frames_never_mix_with_output_that_looks_like_frames() -> None:
    @isolated(host=local)
    def noisy() -> str:
        sys.stdout.buffer.write(b"\x00\x00\x00\x05\x02hello\n")
        sys.stdout.flush()
        return "reply"

    assert noisy() == "reply"


# --- exceptions -----------------------------------------------------------------------------------------------


class CustomError(Exception):
    pass


def test_exceptions_are_reraised_as_their_type_with_message_and_remote_traceback() -> None:
    @isolated(host=local)
    def fails(x: int) -> None:
        def inner() -> None:
            raise CustomError(f"bad value {x}")

        inner()

    with pytest.raises(CustomError, match="bad value 42") as info:
        fails(42)
    remote = info.value.__cause__
    assert remote is not None and type(remote).__name__ == "RemoteTraceback"
    text = str(remote)
    assert "in fails" in text and "in inner" in text and 'raise CustomError(f"bad value {x}")' in text
    assert "agent" not in text, "the worker's own frames leak into the traceback"
    shown = "".join(traceback.format_exception(type(info.value), info.value, info.value.__traceback__))
    assert "in inner" in shown, "the remote frames are not shown when the exception is printed"


def test_exception_of_a_type_unknown_here_becomes_remote_error() -> None:
    @isolated(host=local, requirements=["pyjokes"])
    def fails() -> None:
        import pyjokes

        pyjokes.get_joke(language="xx")  # raises pyjokes.exc.LanguageNotFoundError: importable there, not here

    with pytest.raises(RemoteError, match="pyjokes.exc.LanguageNotFoundError: No such language: xx") as info:
        fails()
    assert info.value.remote_type == "pyjokes.exc.LanguageNotFoundError"
    assert "in get_joke" in str(info.value.__cause__)


# --- crashes --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("segfault", "SIGSEGV"),
        ("os._exit", "exited with code 3"),
        ("sigkill", "SIGKILL"),
    ],
)
def test_a_worker_dying_mid_call_fails_that_call_and_the_next_gets_a_fresh_worker(how: str, expected: str) -> None:
    @isolated(host=local, keep_alive=30)
    def dies(how: str) -> int:
        if how == "segfault":
            import ctypes

            ctypes.string_at(0)
        elif how == "os._exit":
            os._exit(3)
        elif how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        return os.getpid()

    warm = dies("no")
    with pytest.raises(WorkerDiedError, match=expected) as info:
        dies(how)
    assert "next call gets a fresh worker" in str(info.value)
    assert not pid_alive(warm)
    fresh = dies("no")
    assert fresh != warm


def test_a_worker_that_died_while_idle_is_replaced_silently() -> None:
    fn = worker_pid.on(keep_alive=30)
    first = fn()
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(first) and time.monotonic() < deadline:
        time.sleep(0.01)
    second = fn()
    assert second != first


# --- serialization --------------------------------------------------------------------------------------------


def test_an_unpicklable_return_value_is_a_clear_error_and_the_worker_serves_on() -> None:
    @isolated(host=local, keep_alive=30)
    def returns_lock(give_lock: bool) -> object:
        return threading.Lock() if give_lock else os.getpid()

    before = returns_lock(False)
    with pytest.raises(SerializationError, match="returned a value that cannot be pickled.*_thread.lock"):
        returns_lock(True)
    assert returns_lock(False) == before


def test_an_unpicklable_argument_fails_before_anything_runs() -> None:
    @isolated(host=local)
    def takes(x: object) -> object:
        return x

    with pytest.raises(SerializationError, match="could not pickle the call to .*takes"):
        takes(threading.Lock())
    assert takes(5) == 5


def test_a_function_the_worker_cannot_load_names_the_missing_module() -> None:
    import fal_serverless

    @isolated(host=local)
    def uses_sdk() -> str:
        return repr(fal_serverless.local)

    with pytest.raises(SerializationError, match="could not unpickle.*No module named 'fal_serverless'"):
        uses_sdk()


def test_arguments_or_results_over_the_size_limit_are_clear_errors_and_the_next_call_works() -> None:
    proc = run_script(
        """
from fal_serverless import isolated, local, PayloadTooLargeError
@isolated(host=local, keep_alive=30)
def echo(data, size):
    return b"x" * size if size else len(data)
for data, size in ((b"x" * 2_000_000, 0), (b"", 2_000_000)):
    try:
        echo(data, size)
    except PayloadTooLargeError as exc:
        print("refused:", exc)
print("then:", echo(b"x" * 1000, 0))
""",
        {"FAL_SERVERLESS_MAX_PAYLOAD_BYTES": "1000000"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("refused: the call's arguments are 2000") and "limit of 1000000 bytes" in lines[0]
    assert (
        lines[1].startswith("refused: the function's result is 2000") and "return large data by reference" in lines[1]
    )
    assert lines[2] == "then: 1000"


# --- environments ---------------------------------------------------------------------------------------------


def test_a_requirement_that_does_not_exist_is_a_clear_error_naming_it() -> None:
    @isolated(host=local, requirements=["fal-serverless-no-such-package-x9"])
    def f() -> int:
        return 1

    with pytest.raises(EnvironmentBuildError) as info:
        f()
    message = " ".join(str(info.value).split())  # uv wraps its diagnostics
    assert "fal-serverless-no-such-package-x9 was not found in the package registry" in message, message
    assert worker_pid() > 0


def test_a_requirement_that_does_not_parse_is_refused_at_decoration() -> None:
    with pytest.raises(ValueError, match='invalid requirement "pyjokes==": Unexpected end of version specifier'):
        isolated(host=local, requirements=["pyjokes=="])


def test_a_second_process_reuses_the_built_environment(cache_dir: Path) -> None:
    script = """
from fal_serverless import isolated, local
@isolated(host=local, requirements=["pyjokes==0.8.3", "six"])
def f():
    import importlib.metadata, six
    return importlib.metadata.version("pyjokes")
print(f())
"""
    first = run_script(script)
    assert first.returncode == 0, first.stderr
    assert "build] building environment" in first.stderr
    second = run_script(script)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout == "0.8.3\n"
    assert "building environment" not in second.stderr and "waiting for another" not in second.stderr


def test_concurrent_processes_share_one_build(cache_dir: Path) -> None:
    script = """
from fal_serverless import isolated, local
@isolated(host=local, requirements=["pyjokes", "six==1.16.0"])
def f():
    import six
    return six.__version__
print(f())
"""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert all(out == "1.16.0\n" for out, _ in outputs)
    builds = sum("build] building environment" in err for _, err in outputs)
    waited = sum("waiting for another process to finish building" in err for _, err in outputs)
    assert (builds, waited) == (1, 2), [err for _, err in outputs]
    envs = [p for p in (cache_dir / "envs").iterdir() if not p.name.startswith(".")]
    assert not [p for p in (cache_dir / "envs").iterdir() if p.name.startswith(".tmp")]
    assert envs


def test_a_python_version_the_machine_lacks_names_the_versions_it_has() -> None:
    with pytest.raises(EnvironmentBuildError, match=r"Python 3\.99 is not available on this machine; it has .*3\.11"):
        local.engine.call(
            python_version="3.99",
            interpreter=None,
            requirements=[],
            serializer="cloudpickle==3.1.1",
            machine_type="XS",
            keep_alive=0,
            payload=b"",
            on_log=lambda source, line: None,
        )


# --- concurrency and lifetime ---------------------------------------------------------------------------------


def test_a_busy_worker_never_takes_a_second_call(tmp_path: Path) -> None:
    @isolated(host=local, keep_alive=5)
    def rendezvous(directory: str, me: str) -> int:
        Path(directory, me).touch()
        deadline = time.time() + 30
        while len(os.listdir(directory)) < 2:
            if time.time() > deadline:
                raise TimeoutError("the other call never ran at the same time")
            time.sleep(0.01)
        return os.getpid()

    results: dict[str, int] = {}

    def call(me: str) -> None:
        results[me] = rendezvous(str(tmp_path), me)

    threads = [threading.Thread(target=call, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(results) == {"a", "b"}
    assert results["a"] != results["b"]


def test_keep_alive_zero_tears_the_worker_down_after_the_call() -> None:
    fn = worker_pid.on(keep_alive=0, machine_type="S")
    pid = fn()
    assert workers_of(fn) == []
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pid_alive(pid)


def test_workers_never_outlive_the_client_process() -> None:
    script = """
import os, sys, time
from fal_serverless import isolated, local
@isolated(host=local, keep_alive=300)
def pid(sleep):
    time.sleep(sleep)
    return os.getpid()
print(pid(0), flush=True)      # an idle worker, kept warm for 300 s
fast = pid.on(machine_type="S")
import threading
threading.Thread(target=fast, args=(300,), daemon=True).start()  # a busy one
time.sleep(300)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], env=script_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    idle = int(proc.stdout.readline())
    deadline = time.monotonic() + 30
    busy: list[int] = []
    while not busy and time.monotonic() < deadline:
        busy = [p for p in live_children().get(proc.pid, []) if p != idle]
        time.sleep(0.05)
    assert busy and pid_alive(idle)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while (pid_alive(idle) or any(pid_alive(p) for p in busy)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(idle) and not any(pid_alive(p) for p in busy)


def test_ctrl_c_stops_the_call_and_its_worker(tmp_path: Path) -> None:
    started = tmp_path / "started"
    script = f"""
import os, time
from pathlib import Path
from fal_serverless import isolated, local
@isolated(host=local)
def slow():
    Path({str(started)!r}).write_text(str(os.getpid()))
    time.sleep(300)
try:
    slow()
except KeyboardInterrupt:
    print("interrupted", flush=True)
    time.sleep(0.5)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], env=script_env(), stdout=subprocess.PIPE, text=True)
    assert wait_for(started)
    worker = int(started.read_text())
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert out == "interrupted\n"
    assert not pid_alive(worker)


#: A client whose functions each leave a process tree behind (a child and its own child, neither ending by itself):
#: one returns, its worker stopped after the call (keep_alive=0); one kills its own worker. Prints each tree's pids.
PROCESS_TREES = """
import json, os, subprocess, sys
from fal_serverless import WorkerDiedError, isolated, local

def start_tree():
    child = subprocess.Popen(["sh", "-c", "sleep 1000 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    return [os.getpid(), child.pid, int(child.stdout.readline())]

@isolated(host=local, keep_alive=0)
def returns():
    return start_tree()

@isolated(host=local, keep_alive=30)
def dies(path):
    open(path, "w").write(json.dumps(start_tree()))
    os._exit(3)

print(json.dumps(returns()), flush=True)
try:
    dies(sys.argv[1])
except WorkerDiedError:
    print(open(sys.argv[1]).read(), flush=True)
"""

#: Runs "$@" on a host without cgroups, as far as it can tell: an empty /sys/fs/cgroup in user and mount namespaces
#: of its own (which any user may make; the host's mounts are never touched).
WITHOUT_CGROUPS = [
    "unshare",
    "--user",
    "--map-root-user",
    "--mount",
    "sh",
    "-c",
    'mount -t tmpfs none /sys/fs/cgroup && exec "$@"',
    "sh",
]


def wait_until_dead(pids: list[int], seconds: float = 10) -> list[int]:
    """Those of `pids` still alive after up to `seconds`."""
    deadline = time.monotonic() + seconds
    while any(map(pid_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if pid_alive(pid)]


@pytest.mark.parametrize("cgroups", [True, False], ids=["with-cgroup", "without-cgroup"])
def test_a_functions_process_tree_is_stopped_with_its_worker(cgroups: bool, tmp_path: Path) -> None:
    if cgroups and os.geteuid() != 0:
        pytest.fail("cgroups need root here; run the suite as root (CI does)")
    command = [*([] if cgroups else WITHOUT_CGROUPS), sys.executable, "-c", PROCESS_TREES, str(tmp_path / "pids")]
    proc = subprocess.run(command, env=script_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert ("limits cannot be applied" in proc.stderr) != cgroups, proc.stderr
    trees = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(trees) == 2 and all(len(tree) == 3 for tree in trees), proc.stdout
    left = wait_until_dead([pid for tree in trees for pid in tree])
    assert not left, f"processes of stopped workers still run: {left}"


def test_what_the_worker_of_a_killed_client_left_running_is_stopped_by_the_next_engine() -> None:
    if os.geteuid() != 0:
        pytest.fail("cgroups need root here; run the suite as root (CI does)")
    script = """
import subprocess, time
from fal_serverless import isolated, local
@isolated(host=local, keep_alive=300)
def start():
    return subprocess.Popen(["sleep", "1000"]).pid
print(start(), flush=True)
time.sleep(300)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], env=script_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    orphan = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    # Its worker dies with it (PR_SET_PDEATHSIG), but nothing is left to stop the worker's child, which is still in
    # the worker's cgroup: the next engine to start here removes that cgroup, and what runs in it.
    assert pid_alive(orphan)
    assert run_script("from fal_serverless import isolated, local\nprint(isolated(host=local)(int)())").stdout == "0\n"
    assert not wait_until_dead([orphan]), "the dead client's worker's child still runs"


# --- machine types --------------------------------------------------------------------------------------------


def _cgroup_limits() -> dict[str, str]:
    """Inside a worker: the memory and CPU limits of its own cgroup, on v1 or v2."""
    found: dict[str, str] = {}
    for line in open("/proc/self/cgroup").read().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base = "/sys/fs/cgroup" + path
            for name in ("memory.max", "cpu.max", "pids.max"):
                if os.path.exists(f"{base}/{name}"):
                    found[name] = open(f"{base}/{name}").read().strip()
        for controller, name in (
            ("memory", "memory.limit_in_bytes"),
            ("cpu", "cpu.cfs_quota_us"),
            ("pids", "pids.max"),
        ):
            if controller in controllers.split(","):
                mount = f"/sys/fs/cgroup/{controller}"
                if os.path.exists(f"{mount}{path}/{name}"):
                    found[name] = open(f"{mount}{path}/{name}").read().strip()
    return found


def test_machine_type_limits_are_applied_to_the_worker() -> None:
    if os.geteuid() != 0:
        # Without root the engine runs unlimited and must say so, once.
        proc = run_script(
            "from fal_serverless import isolated, local\n"
            "f = isolated(host=local)(lambda: 1)\nf(); f.on(machine_type='S')()\n"
        )
        assert proc.stderr.count("machine type limits cannot be applied") == 1, proc.stderr
        return
    limits = isolated(host=local, machine_type="XS")(_cgroup_limits)()
    memory = limits.get("memory.max") or limits.get("memory.limit_in_bytes")
    assert memory == str(256 * 1024 * 1024), limits
    if "cpu.max" in limits:
        assert limits["cpu.max"] == "25000 100000"
    else:
        assert limits["cpu.cfs_quota_us"] == "25000"
    assert limits["pids.max"] == "1024"
    s_limits = isolated(host=local, machine_type="S")(_cgroup_limits)()
    assert (s_limits.get("memory.max") or s_limits.get("memory.limit_in_bytes")) == str(1024**3)


def test_exceeding_the_memory_of_the_machine_type_is_reported_and_the_next_call_works() -> None:
    @isolated(host=local, machine_type="XS")
    def hog(megabytes: int) -> int:
        blocks = [bytearray(1024 * 1024) for _ in range(megabytes)]
        return len(blocks)

    if os.geteuid() != 0:
        pytest.fail("limits need root here; run the suite as root (CI does)")
    with pytest.raises(MachineTypeExceededError, match="exceeded the 256 MB of machine type XS.*larger machine_type"):
        hog(600)
    assert hog(10) == 10


def test_a_child_killed_for_memory_fails_the_call_and_the_next_call_works() -> None:
    @isolated(host=local, machine_type="XS", keep_alive=30)
    def child_hog() -> tuple[int, int]:
        # The kernel kills the child, not the function, which would carry on with what it got: -9.
        return subprocess.run([sys.executable, "-c", "x = bytearray(2 * 1024**3)"]).returncode, os.getpid()

    if os.geteuid() != 0:
        pytest.fail("limits need root here; run the suite as root (CI does)")
    with pytest.raises(
        MachineTypeExceededError,
        match=r"exceeded the 256 MB of machine type XS \(the kernel killed a process the function started, so the "
        r"call was stopped with its worker\); use a larger machine_type",
    ):
        child_hog()
    assert workers_of(child_hog) == [], "the worker whose child was killed is still kept"
    small = isolated(host=local, machine_type="XS")(lambda: sum(range(10)))
    assert small() == 45


def test_a_gpu_machine_type_on_a_host_without_gpus_fails_at_once() -> None:
    from fal_serverless import MachineTypeUnavailableError

    if Path("/proc/driver/nvidia/gpus").exists():
        assert worker_pid.on(machine_type="GPU-T4")() > 0
        return
    with pytest.raises(MachineTypeUnavailableError, match="GPU-T4 needs 1 GPU.*this machine has 0"):
        worker_pid.on(machine_type="GPU-T4")()


# --- @cached --------------------------------------------------------------------------------------------------


def test_cached_values_live_as_long_as_the_warm_worker() -> None:
    from fal_serverless import cached

    @cached
    def token(seed: int) -> str:
        return f"{seed}-{os.urandom(8).hex()}"

    @isolated(host=local, keep_alive=30, machine_type="S")
    def use(seed: int) -> tuple[str, int]:
        return token(seed), os.getpid()

    first, pid = use(1)
    again, pid2 = use(1)
    assert (again, pid2) == (first, pid), "same worker, same arguments: the cached value"
    other, _ = use(2)
    assert other != first and other.startswith("2-"), "other arguments: computed anew"
    # A new worker (here: another machine type) starts with an empty cache.
    fresh, fresh_pid = use.on(machine_type="M")(1)
    assert fresh_pid != pid and fresh != first


def test_the_worker_environment_does_not_have_the_sdk() -> None:
    @isolated(host=local)
    def probe() -> str:
        import importlib.util

        return repr(importlib.util.find_spec("fal_serverless"))

    assert probe() == "None"


# --- validation -----------------------------------------------------------------------------------------------


def test_wrong_options_are_value_errors_that_list_what_is_valid() -> None:
    with pytest.raises(ValueError, match="unknown machine type 'XXL'; valid machine types are: XS, S, M, L, XL"):
        isolated(machine_type="XXL")
    with pytest.raises(ValueError, match="keep_alive must be a number of seconds from 0 to 2147483647, got -1"):
        isolated(keep_alive=-1)
    with pytest.raises(ValueError, match="unknown option.*gpu_count.*valid options are: requirements, machine_type"):
        isolated(gpu_count=2)
    with pytest.raises(ValueError, match="unknown machine type 'xs'"):
        worker_pid.on(machine_type="xs")
    with pytest.raises(ValueError, match="unknown option.*machine"):
        worker_pid.on(local, machine="S")
    with pytest.raises(ValueError, match="requirements must be a list of strings"):
        isolated(requirements="pyjokes")
    other = "3.10" if sys.version_info[:2] != (3, 10) else "3.12"
    with pytest.raises(ValueError, match=f"python_version {other} differs from the Python running this script"):
        isolated(python_version=other)


@pytest.mark.parametrize("value", [1e20, -1, float("nan"), float("inf"), float("-inf"), 2**31, 10**30, "10"])
def test_seconds_out_of_range_are_value_errors_naming_the_range(value: object) -> None:
    keep_alive = r"keep_alive must be a number of seconds from 0 to 2147483647, got "
    timeout = r"timeout must be a number of seconds above 0 and at most 2147483647, got "
    with pytest.raises(ValueError, match=keep_alive):
        isolated(keep_alive=value)
    with pytest.raises(ValueError, match=timeout):
        worker_pid.on(timeout=value)
    if isinstance(value, str):
        return
    # The native module refuses them too, should anything reach it unchecked: a ValueError, never a panic.
    call: dict[str, object] = dict(
        python_version=f"{sys.version_info[0]}.{sys.version_info[1]}",
        interpreter=None,
        requirements=[],
        serializer=SERIALIZER,
        machine_type="XS",
        keep_alive=1.0,
        payload=b"",
        on_log=lambda source, line: None,
    )
    with pytest.raises(ValueError, match=keep_alive):
        local.engine.call(**{**call, "keep_alive": float(value)})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=timeout):
        local.engine.call(**{**call, "timeout": float(value)})  # type: ignore[arg-type]


def test_the_package_is_importable_from_a_fresh_interpreter_with_its_exports() -> None:
    proc = run_script(
        "import fal_serverless as f\n"
        "print(sorted(n for n in ('isolated','cached','local','cloud','CloudKeyCredentials',"
        "'FalServerlessKeyCredentials','MACHINE_TYPES') if hasattr(f, n)))\n"
        "print(list(f.MACHINE_TYPES))\n"
        "print(f.FalServerlessKeyCredentials is f.CloudKeyCredentials)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "['CloudKeyCredentials', 'FalServerlessKeyCredentials', 'MACHINE_TYPES', 'cached', 'cloud', 'isolated', "
        "'local']",
        "['XS', 'S', 'M', 'L', 'XL', 'GPU-T4', 'GPU']",
        "True",
    ]


_ = ROOT
