"""The gateway's rows of the benchmark (bench/run.py calls `measure` and `rows`).

A web endpoint deployed with `fn.serve()` on a jailed server on loopback, called with httpx (one keep-alive
connection per client thread):

* a warm request through the gateway, against the same request straight to the replica's uvicorn (the floor: the
  worker's address in its own network namespace, port 8080, from `fal-serverless workers`), p50 and p99;
* requests per second at 1, 16 and 64 clients, through the gateway and straight to the replica, the same way;
* the first request to an app scaled to zero (its environment built, no replica running), against a cold call of the
  same environment plus uvicorn's own start (`import fastapi, uvicorn` and `uvicorn.run` to its first answer, timed
  in the environment): the floor of a request from zero.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

import httpx

CLIENTS = (1, 16, 64)


def uvicorn_start() -> float:
    """In a fresh worker: from the call's start to uvicorn's first readiness with a FastAPI app, imports included
    (what a replica does after its worker starts)."""
    import threading
    import time

    start = time.perf_counter()
    import fastapi
    import uvicorn

    app = fastapi.FastAPI()
    app.add_api_route("/", lambda: {}, methods=["POST"])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.001)
    return time.perf_counter() - start


def _workers(env: Dict[str, str]) -> List[Dict[str, str]]:
    fal = str(Path(sys.executable).with_name("fal-serverless"))
    out = subprocess.run([fal, "workers"], env={**os.environ, **env}, capture_output=True, text=True, check=True)
    header, *lines = out.stdout.splitlines()
    names = [n.lower() for n in header.split()]
    return [dict(zip(names, line.split())) for line in lines]


def _latencies(send: Callable[[httpx.Client], None], runs: int, warmup: int = 50) -> List[float]:
    with httpx.Client(timeout=300) as client:
        for _ in range(warmup):
            send(client)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            send(client)
            times.append(time.perf_counter() - t)
    return times


def _per_second(url: str, clients: int, requests: int) -> float:
    per_client = max(1, requests // clients)
    failures: List[str] = []

    def run() -> None:
        with httpx.Client(timeout=300) as client:
            for i in range(per_client):
                response = client.post(url, params={"x": i})
                if response.status_code != 200 or response.json() != {"x": i}:
                    failures.append(response.text)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    t = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return per_client * clients / elapsed


def measure(env: Dict[str, str], warm_runs: int, requests: int, cold_runs: int) -> Dict[str, object]:
    """Runs the gateway rows against the server `env` points at (FAL_HOST and an admin key)."""
    os.environ.update(env)
    from fal_serverless import isolated

    def echo(x: int = 0) -> dict:
        return {"x": x}

    results: Dict[str, object] = {}
    # One replica that takes many requests at once, on machine type M (2 CPUs: XS's quarter of a CPU would throttle
    # the floor itself): the throughput rows measure the gateway, not replica count.
    warm = isolated(serve=True, keep_alive=600, max_concurrency=1, max_multiplexing=64, machine_type="M")(echo)
    url = warm.serve(alias="bench-warm", auth="public")
    results["gateway"] = _latencies(lambda c: c.post(url, params={"x": 1}).raise_for_status(), warm_runs)
    replica = next(w for w in _workers(env) if w["busy"] == "true")
    direct = f"http://{replica['address']}:8080/"
    results["direct"] = _latencies(lambda c: c.post(direct, params={"x": 1}).raise_for_status(), warm_runs)
    results["throughput"] = {
        str(n): {"gateway": _per_second(url, n, requests), "direct": _per_second(direct, n, requests)} for n in CLIENTS
    }

    # From zero: keep_alive=1, so the replica is gone before each measured request.
    cold = isolated(serve=True, keep_alive=1, max_concurrency=1)(echo)
    cold_url = cold.serve(alias="bench-cold", auth="public")
    httpx.post(cold_url, params={"x": 1}, timeout=600).raise_for_status()  # builds its environment
    from_zero = []
    for _ in range(cold_runs):
        deadline = time.time() + 60
        # Only the warm app's replica left.
        while len(_workers(env)) > 1:
            if time.time() > deadline:
                raise RuntimeError("the cold app's replica did not stop after its keep_alive")
            time.sleep(0.2)
        t = time.perf_counter()
        httpx.post(cold_url, params={"x": 1}, timeout=600).raise_for_status()
        from_zero.append(time.perf_counter() - t)
    results["from_zero"] = from_zero
    # A cold call (a new worker, nothing else) of the same environment, and uvicorn's start in one.
    requirements = ["fastapi==0.99.1", "uvicorn==0.33.0"]
    plain = isolated(requirements=requirements, keep_alive=0)(echo)
    starting = isolated(requirements=requirements, keep_alive=0)(uvicorn_start)
    plain(1)
    cold_calls, starts = [], []
    for _ in range(cold_runs):
        t = time.perf_counter()
        plain(1)
        cold_calls.append(time.perf_counter() - t)
        starts.append(starting())
    results["cold_call"] = cold_calls
    results["uvicorn_start"] = starts
    return results


def rows(results: Dict[str, object], row: Callable[..., str], median: Callable[[List[float]], float]) -> List[str]:
    gateway, direct = results["gateway"], results["direct"]
    assert isinstance(gateway, list) and isinstance(direct, list)
    added_ms = (median(gateway) - median(direct)) * 1e3
    lines = [
        row(
            f"web endpoint, warm request through the gateway (adds {added_ms:.2f} ms); floor: straight to the "
            f"replica's uvicorn",
            gateway,
            None,
            direct,
            "adds < 0.3 ms p50",
            added_ms < 0.3,
        )
    ]
    throughput = results["throughput"]
    assert isinstance(throughput, dict)
    for clients, measured in throughput.items():
        ratio = measured["gateway"] / measured["direct"]
        lines.append(
            f"| web endpoint, requests/s, {clients} clients (one replica, multiplexing 64) | "
            f"{measured['gateway']:.0f} req/s | - | {measured['direct']:.0f} req/s straight to the replica | "
            f"{ratio:.2f}x the floor | -: met |"
        )
    from_zero, cold, start = results["from_zero"], results["cold_call"], results["uvicorn_start"]
    assert isinstance(from_zero, list) and isinstance(cold, list) and isinstance(start, list)
    floor = [c + s for c, s in zip(sorted(cold), sorted(start))]
    lines.append(
        row(
            "web endpoint, first request from zero replicas (env built); floor: a cold call plus uvicorn's start",
            from_zero,
            None,
            floor,
            "< 1.5x floor",
            median(from_zero) < 1.5 * median(floor),
        )
    )
    return lines
