"""The dashboard rows: its pages with 100,000 runs in the history, on a server of their own.

The server starts once (making its tables), stops, and 100,000 runs of 3 users (10 functions, 1 in 20 failed, one
every 30 s back from now) are written straight into its `state.sqlite3`; restarted, it serves each page to a
signed-in session (httpx): the first page of runs (an admin's: everyone's; a user's), filtered by function, by
outcome and by time, a page 1,000 runs deep (by its cursor), one run's logs, and the workers page. Each page's
time is the median of its requests, from the request to the last byte.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import httpx

RUNS = 100_000
USERS = ("alice", "bob", "carol")


def fill(state: Path, runs: int) -> str:
    """Writes `runs` runs into the history of the stopped server whose state is `state`; returns one run's id."""
    now_ms = int(time.time() * 1000)
    logs = json.dumps(
        [{"message": f"line {i}", "level": "STDOUT", "source": "stdout", "timestamp": ""} for i in range(20)]
    )
    rows = []
    for i in range(runs):
        queued = now_ms - i * 30_000
        failed = i % 20 == 0
        rows.append(
            (
                f"run{i:07d}",
                USERS[i % len(USERS)],
                "call",
                f"__main__.fn_{i % 10}",
                "XS",
                str(1000 + i % 50),
                queued,
                queued + 5,
                queued + 50,
                "error" if failed else "success",
                "raised" if failed else "",
                "ValueError: no" if failed else "",
                logs,
            )
        )
    with sqlite3.connect(state) as db:
        db.executemany(
            "INSERT INTO runs (id, user_id, kind, function, machine_type, worker, queued_ms, started_ms, finished_ms, "
            "outcome, error_kind, error, logs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    return rows[runs // 2][0]


def session(host: str, key: Tuple[str, str]) -> httpx.Client:
    client = httpx.Client(base_url=f"http://{host}", follow_redirects=False)
    signed_in = client.post("/login", data={"key": f"{key[0]}:{key[1]}"})
    assert signed_in.status_code == 303, signed_in.text
    return client


def timed(client: httpx.Client, path: str, runs: int) -> List[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        answer = client.get(path)
        times.append(time.perf_counter() - started)
        assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
    return times


def measure(
    start_server: Callable[[Path, str], Tuple[subprocess.Popen[str], Dict[str, str]]], requests: int
) -> Dict[str, List[float]]:
    data_dir = Path(tempfile.mkdtemp(prefix="fal-bench-dashboard-"))
    server, env = start_server(data_dir, "")
    admin = (env["FAL_KEY_ID"], env["FAL_KEY_SECRET"])
    key = subprocess.run(
        [str(Path(server.args[0])), "keys", "create", "--user", "alice"],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    values = dict(line.split("=", 1) for line in key.stdout.splitlines())
    alice = (values["FAL_KEY_ID"], values["FAL_KEY_SECRET"])
    server.terminate()
    server.wait(timeout=60)
    one_run = fill(data_dir / "state.sqlite3", RUNS)
    server, env = start_server(data_dir, "")
    try:
        as_admin, as_alice = session(env["FAL_HOST"], admin), session(env["FAL_HOST"], alice)
        deep = as_admin.get("/runs")
        for _ in range(20):  # 20 pages of 50: 1,000 runs back
            cursor = deep.text.split('id="older" href="/runs?', 1)[1].split('"', 1)[0].replace("&amp;", "&")
            deep = as_admin.get(f"/runs?{cursor}")
        pages = {
            "runs, first page (admin: everyone's)": (as_admin, "/runs"),
            "runs, first page (a user's own)": (as_alice, "/runs"),
            "runs by function": (as_alice, "/runs?function=__main__.fn_3"),
            "runs by outcome (1 in 20 failed)": (as_alice, "/runs?outcome=error"),
            "runs by an outcome no run has": (as_alice, "/runs?outcome=timeout"),
            "runs of the last hour": (as_admin, "/runs?since=1h"),
            "runs, 1,000 back (by cursor)": (as_admin, f"/runs?{cursor}"),
            "one run with its logs": (as_admin, f"/runs/{one_run}"),
            "workers": (as_admin, "/workers"),
        }
        return {name: timed(client, path, requests) for name, (client, path) in pages.items()}
    finally:
        server.terminate()
        server.wait(timeout=60)


def rows(results: Dict[str, List[float]], row: Callable[..., str], median: Callable[[List[float]], float]) -> List[str]:
    return [
        row(
            f"dashboard page with {RUNS:,} runs in the history: {name}",
            times,
            None,
            None,
            "p50 < 50 ms",
            median(times) < 0.05,
        )
        for name, times in results.items()
    ]
