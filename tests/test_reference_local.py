"""Every example of the reference that runs on `local`, run as the user would run it, asserting on its output."""

from __future__ import annotations

import runpy
import time

from conftest import EXAMPLES, ROOT, script_env, workers_of
from fal_serverless import cloud, local


def run_example(name: str, host: str = "local") -> str:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        env=script_env({"FAL_SERVERLESS_HOST": host}),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{name} failed:\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def is_joke(line: str) -> bool:
    return len(line) > 10 and line not in ("Hello World", "hello world")


def test_isolated_returns_hello_world() -> None:
    assert run_example("01_isolated.py").splitlines() == ["Hello World"]


def test_requirements_pyjokes_installed_only_in_the_environment() -> None:
    lines = run_example("02_requirements.py").splitlines()
    assert len(lines) == 1 and is_joke(lines[0]), lines
    # The joke came from an environment: pyjokes is not installed where the tests run.
    import importlib.util

    assert importlib.util.find_spec("pyjokes") is None


def test_machine_type_and_on_machine_type() -> None:
    lines = run_example("03_machine_type.py").splitlines()
    assert len(lines) == 2 and all(is_joke(line) for line in lines), lines


def test_on_local_on_cloud_and_host_local() -> None:
    # The `.on(cloud, ...)` function runs on the zero-config local server, started for it.
    lines = run_example("04_local.py").splitlines()
    assert len(lines) == 3 and all(is_joke(line) for line in lines), lines


def test_on_forms_keep_and_change_options() -> None:
    namespace = runpy.run_path(str(EXAMPLES / "04_local.py"), run_name="example")
    my_function = namespace["my_function"]
    assert my_function.options.machine_type == "M" and my_function.options.requirements == ("pyjokes",)
    my_local = namespace["my_function_local"]
    assert my_local.options.host is local and my_local.options.machine_type == "M"
    my_cloud = namespace["my_function_cloud"]
    assert my_cloud.options.host is cloud and my_cloud.options.requirements == ("pyjokes",)
    assert namespace["my_function_local2"].options.host is local
    assert my_function.on(machine_type="L").options.machine_type == "L"


def test_credentials_example_runs_on_local() -> None:
    assert run_example("05_credentials.py").splitlines() == ["hello world"]


def test_keep_alive_reuses_the_worker_within_the_window_and_not_after() -> None:
    get_joke = runpy.run_path(str(EXAMPLES / "06_keep_alive.py"), run_name="example")["get_joke"].on(local)
    assert get_joke.options.keep_alive == 20

    assert is_joke(get_joke())
    first = workers_of(get_joke)  # (an earlier test's call may have warmed this worker already)
    assert len(first) == 1, first
    time.sleep(5)
    assert is_joke(get_joke())
    second = workers_of(get_joke)
    assert [(w[0], w[4]) for w in second] == [(first[0][0], first[0][4] + 1)], (
        "the call within 20 s used another worker"
    )

    # The second call restarted the 20 s timer: 17 s after it (22 s after the first call) the worker is still warm.
    time.sleep(17)
    assert [w[0] for w in workers_of(get_joke)] == [first[0][0]]
    time.sleep(5)  # 22 s after the last call: gone
    assert workers_of(get_joke) == []
    assert is_joke(get_joke())
    third = workers_of(get_joke)
    assert len(third) == 1 and third[0][0] != first[0][0] and third[0][4] == 1


def test_cached_example_output() -> None:
    assert run_example("07_cached.py").splitlines() == [
        "The result is: Hello, World!",
        "The result is: Hello, World!",
    ]


def test_examples_runner_runs_them_all() -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "run.py"), "01", "05"],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all examples ran" in proc.stdout
