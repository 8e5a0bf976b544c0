"""The calling API beyond one call, one result: setup_function, submit, map and starmap, generator functions that
stream, async functions, and requirements that would break the call protocol. Each on both hosts: `local` (the
engine in the test's process) and `cloud` (a real server), as a user's script in a fresh Python process."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from typing import Dict, Iterator

import pytest
from conftest import ROOT, Server, run_script, script_env

HOSTS = ["local", "cloud"]


@pytest.fixture(scope="module")
def user_key(server: Server) -> Iterator[tuple]:
    yield server.create_key("calling-api")


def script(host: str, body: str) -> str:
    return f"import fal_serverless as fs\nHOST = fs.{host}\n" + textwrap.dedent(body)


def run_on(host: str, server: Server, key: tuple, body: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env: Dict[str, str] = {"UV_PYTHON_DOWNLOADS": "never"}
    if host == "cloud":
        env.update(server.env(*key))
    proc = run_script(script(host, body), env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.parametrize("host", HOSTS)
def test_setup_runs_once_per_warm_worker_and_its_result_is_the_first_argument(
    host: str, server: Server, user_key: tuple
) -> None:
    proc = run_on(
        host,
        server,
        user_key,
        """
        import uuid

        def load_model():
            print("setup ran")
            return uuid.uuid4().hex

        @fs.isolated(host=HOST, setup_function=load_model, keep_alive=30)
        def predict(model, x, scale=1):
            return model, x * scale

        results = [predict(i, scale=2) for i in range(3)]
        assert [x for _, x in results] == [0, 2, 4], results
        assert len({model for model, _ in results}) == 1, results
        print("models", len({model for model, _ in results}))
        # Another setup function is another setup: it runs on the same warm worker too.
        other = predict.on(setup_function=lambda: "other")
        assert other(5) == ("other", 5)
        print("other ok")
        """,
    )
    assert proc.stdout.count("setup ran") == 1, proc.stdout
    assert "models 1" in proc.stdout and "other ok" in proc.stdout


@pytest.mark.parametrize("host", HOSTS)
def test_a_failing_setup_fails_the_call_and_runs_again_next_time(host: str, server: Server, user_key: tuple) -> None:
    proc = run_on(
        host,
        server,
        user_key,
        """
        def setup():
            print("setup attempt")
            raise ConnectionError("model store unreachable")

        @fs.isolated(host=HOST, setup_function=setup, keep_alive=30)
        def predict(model, x):
            return x

        for _ in range(2):
            try:
                predict(1)
            except ConnectionError as exc:
                print("raised", type(exc).__name__, exc)
        """,
    )
    assert proc.stdout.count("raised ConnectionError model store unreachable") == 2, proc.stdout
    assert proc.stdout.count("setup attempt") == 2, proc.stdout
    assert "The setup function has thrown an error. Aborting the run." in proc.stderr


@pytest.mark.parametrize("host", HOSTS)
def test_an_unpicklable_setup_function_is_a_clear_error(host: str, server: Server, user_key: tuple) -> None:
    proc = run_on(
        host,
        server,
        user_key,
        """
        import threading
        lock = threading.Lock()

        def setup():
            return lock

        @fs.isolated(host=HOST, setup_function=setup)
        def predict(model, x):
            return x

        try:
            predict(1)
        except fs.exceptions.SerializationError as exc:
            print("error:", exc)
        """,
    )
    assert "error: could not pickle the setup function 'setup'" in proc.stdout, proc.stdout
    assert "create objects such as locks" in proc.stdout


@pytest.mark.parametrize("host", HOSTS)
def test_submit_returns_futures_and_a_future_cancelled_before_it_starts_never_runs(
    host: str, server: Server, user_key: tuple
) -> None:
    proc = run_on(
        host,
        server,
        user_key,
        """
        import concurrent.futures, time
        from fal_serverless._isolated import _executor

        @fs.isolated(host=HOST, keep_alive=30)
        def slow(i):
            print("ran", i)
            time.sleep(1)
            return i * 10

        threads = _executor()._max_workers
        futures = [slow.submit(i) for i in range(threads + 2)]
        assert all(isinstance(f, concurrent.futures.Future) for f in futures)
        last = futures[-1]
        print("cancelled", last.cancel())
        done = [f.result(timeout=200) for f in futures[:-1]]
        assert done == [i * 10 for i in range(threads + 1)], done
        assert last.cancelled()
        print("last", threads + 1)
        """,
    )
    assert "cancelled True" in proc.stdout, proc.stdout
    last = proc.stdout.split("last ")[1].split()[0]
    assert f"ran {last}\n" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("host", HOSTS)
def test_map_of_a_thousand_items_with_failures_in_both_modes_and_orders(
    host: str, server: Server, user_key: tuple
) -> None:
    proc = run_on(
        host,
        server,
        user_key,
        """
        @fs.isolated(host=HOST, keep_alive=30)
        def square(x):
            if x % 250 == 7:
                raise ValueError(f"bad input {x}")
            return x * x

        failing = {x for x in range(1000) if x % 250 == 7}
        results = list(square.map(range(1000), return_exceptions=True))
        assert len(results) == 1000
        for x, r in enumerate(results):
            if x in failing:
                assert isinstance(r, ValueError) and str(r) == f"bad input {x}", (x, r)
            else:
                assert r == x * x, (x, r)
        print("ordered ok")

        unordered = list(square.map(range(1000), return_exceptions=True, ordered=False))
        values = sorted(r for r in unordered if not isinstance(r, Exception))
        assert values == sorted(x * x for x in range(1000) if x not in failing)
        errors = sorted(str(r) for r in unordered if isinstance(r, Exception))
        assert errors == sorted(f"bad input {x}" for x in failing)
        print("unordered ok")

        seen = []
        try:
            for r in square.map(range(1000)):
                seen.append(r)
        except ValueError as exc:
            print("raised", exc, "after", len(seen))
        assert seen == [x * x for x in range(7)], seen

        # starmap, and map over several iterables (the shortest ends it).
        @fs.isolated(host=HOST, keep_alive=30)
        def add(a, b):
            return a + b

        assert list(add.starmap([(1, 2), (3, 4)])) == [3, 7]
        assert list(add.map([1, 2, 3], [10, 20])) == [11, 22]
        assert list(add.map([], [])) == []
        print("starmap ok")

        @fs.isolated(host=HOST)
        def items(x):
            yield x

        try:
            list(items.map([1]))
        except TypeError as exc:
            print("generator refused:", exc)
        """,
    )
    assert "ordered ok" in proc.stdout and "unordered ok" in proc.stdout and "starmap ok" in proc.stdout
    assert "raised bad input 7 after 7" in proc.stdout
    assert "is a generator function: map runs functions that return a value" in proc.stdout, proc.stdout


@pytest.mark.parametrize("host", HOSTS)
def test_a_generator_of_inputs_is_read_as_the_map_goes(host: str, server: Server, user_key: tuple) -> None:
    proc = run_on(
        host,
        server,
        user_key,
        """
        import resource

        produced = 0
        def inputs():
            global produced
            for i in range(100_000):
                produced += 1
                yield i

        @fs.isolated(host=HOST, keep_alive=30)
        def double(x):
            return 2 * x

        consumed = 0
        ahead = 0
        total = 0
        rss_at_1000 = None
        for r in double.map(inputs(), concurrency=4):
            assert r == 2 * consumed, (r, consumed)
            consumed += 1
            ahead = max(ahead, produced - consumed)
            if consumed == 1000:
                rss_at_1000 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_at_1000
        print("consumed", consumed, "ahead", ahead, "rss growth KiB", rss_growth)
        assert consumed == 100_000
        # The window (2 x concurrency, at least 64) bounds how far the inputs run ahead of the results.
        assert ahead <= 66, ahead
        assert rss_growth < 50_000, rss_growth
        """,
        timeout=500,
    )
    assert "consumed 100000" in proc.stdout, proc.stdout


def test_ctrl_c_mid_map_cancels_what_is_left_and_stops_its_workers(server: Server, user_key: tuple) -> None:
    source = script(
        "cloud",
        """
        import time

        @fs.isolated(host=HOST, keep_alive=0)
        def slow(i):
            time.sleep(0.5 if i < 2 else 60)
            return i

        for r in slow.map(range(8), concurrency=4):
            print("result", r, flush=True)
        """,
    )
    env = script_env({**server.env(*user_key), "UV_PYTHON_DOWNLOADS": "never"})
    proc = subprocess.Popen(
        [sys.executable, "-c", source], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "result 0\n"
    server.wait_for_worker("calling-api", busy=True)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "KeyboardInterrupt" in stderr, stderr
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 20
    while [w for w in server.workers() if w["user"] == "calling-api"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [w for w in server.workers() if w["user"] == "calling-api"] == [], server.workers()


@pytest.mark.parametrize("host", HOSTS)
def test_a_generator_function_streams_its_items_as_it_yields_them(host: str, server: Server, user_key: tuple) -> None:
    proc = run_on(
        host,
        server,
        user_key,
        """
        import time

        @fs.isolated(host=HOST, keep_alive=30)
        def ticks(n, gap):
            for i in range(n):
                time.sleep(gap)
                print("produced", i, flush=True)
                yield {"i": i}

        list(ticks(1, 0))  # warm
        started = time.monotonic()
        arrivals = []
        for item in ticks(3, 1.0):
            arrivals.append((item["i"], round(time.monotonic() - started, 1)))
        print("arrivals", arrivals)
        assert [i for i, _ in arrivals] == [0, 1, 2]
        # Each item arrives as it is produced, not all at the end.
        assert arrivals[0][1] < 1.9 and arrivals[1][1] < 2.9, arrivals

        @fs.isolated(host=HOST, keep_alive=30)
        def fails_mid_stream():
            yield 1
            yield 2
            raise KeyError("third")

        got = []
        try:
            for item in fails_mid_stream():
                got.append(item)
        except KeyError as exc:
            print("raised at", len(got), exc)

        # A consumer that stops early stops the generator on the worker.
        stream = ticks(100, 0.3)
        first = [next(stream), next(stream)]
        stream.close()
        stopped_at = time.monotonic()
        time.sleep(3)
        if HOST is fs.cloud:
            busy = [w for w in fs.cloud.client(None).workers() if w[4]]
        else:
            busy = [w for w in fs.local.engine.workers() if w[3]]
        print("stopped after", first, "busy workers", len(busy))
        """,
    )
    assert "raised at 2 'third'" in proc.stdout, proc.stdout
    assert "busy workers 0" in proc.stdout, proc.stdout
    produced = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("produced")]
    # The warm-up's item, three, then the stopped stream's: two taken, at most one more before it was stopped.
    stopped = produced[4:]
    assert stopped[:2] == [0, 1] and len(stopped) <= 3, produced


@pytest.mark.parametrize("host", HOSTS)
def test_async_functions_run_on_the_workers_loop_and_aio_keeps_the_callers_loop_running(
    host: str, server: Server, user_key: tuple
) -> None:
    proc = run_on(
        host,
        server,
        user_key,
        """
        import asyncio

        @fs.isolated(host=HOST, keep_alive=30)
        async def fetch(x):
            await asyncio.sleep(0.2)
            return x * 2

        @fs.isolated(host=HOST, keep_alive=30)
        async def agen(n):
            for i in range(n):
                await asyncio.sleep(0.05)
                yield i

        print("plain", fetch(21))
        print("async gen plain", list(agen(3)))

        async def main():
            ticks = 0
            async def ticker():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.02)
                    ticks += 1
            task = asyncio.ensure_future(ticker())
            results = await asyncio.gather(fetch.aio(1), fetch.aio(2))
            items = [i async for i in agen.aio(3)]
            task.cancel()
            print("aio", results, items, "loop ran", ticks > 5)

        asyncio.run(main())
        """,
    )
    assert "plain 42" in proc.stdout, proc.stdout + proc.stderr
    assert "async gen plain [0, 1, 2]" in proc.stdout
    assert "aio [2, 4] [0, 1, 2] loop ran True" in proc.stdout
    assert "never awaited" not in proc.stderr


@pytest.mark.parametrize("host", HOSTS)
def test_a_pin_of_the_callers_serializer_is_refused_naming_what_is_needed(
    host: str, server: Server, user_key: tuple
) -> None:
    proc = run_on(
        host,
        server,
        user_key,
        """
        @fs.isolated(host=HOST, requirements=["pyjokes", "cloudpickle==2.2.1"])
        def f():
            return 1

        try:
            f()
        except fs.exceptions.EnvironmentBuildError as exc:
            print("refused:", exc)
        """,
    )
    assert 'refused: requirement "cloudpickle==2.2.1" would replace the cloudpickle==' in proc.stdout, proc.stdout
    assert "remove it from requirements, or allow cloudpickle==" in proc.stdout
