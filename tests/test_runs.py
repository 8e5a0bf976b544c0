"""The run history against the real server: calls (returned and raised), a web request through the gateway, a
queued request and (in test_schedules.py) schedule activations are listed by `fal-serverless runs list` with their
fields, their logs are kept (cut at `[runs] log_limit_kb`, and said so), another user sees none of them, and runs
past `[runs] retention_days` are deleted."""

from __future__ import annotations

import re
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import httpx
import pytest
from conftest import FAL_SERVERLESS, Server, cloud_call, script_env, start_server

Key = Tuple[str, str]


def cli(server: Server, key: Key, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = script_env(server.env(*key))
    return subprocess.run([FAL_SERVERLESS, *args], env=env, capture_output=True, text=True, timeout=timeout)


def table(output: str) -> List[Dict[str, str]]:
    header, *rows = output.splitlines()
    names = [name.lower() for name in re.split(r"\s{2,}", header.strip())]
    return [dict(zip(names, re.split(r"\s{2,}", row.strip()))) for row in rows if row.strip() and " " in row]


def runs(server: Server, key: Key, *args: str) -> List[Dict[str, str]]:
    proc = cli(server, key, "runs", "list", "--limit", "100", *args, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [row for row in table(proc.stdout) if "run id" in row and not row["run id"].startswith("more:")]


def wait_for_run(
    server: Server, key: Key, found: Callable[[Dict[str, str]], bool], timeout: float = 30
) -> Dict[str, str]:
    """The first run listed for `key` that `found` accepts and that has ended (the history is written a moment
    after the run ends)."""
    deadline = time.time() + timeout
    while True:
        rows = [row for row in runs(server, key) if found(row) and row["outcome"] != "running"]
        if rows:
            return rows[0]
        assert time.time() < deadline, runs(server, key)
        time.sleep(0.2)


def utc(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=timezone.utc).timestamp()


@pytest.fixture(scope="module")
def history() -> Iterator[Server]:
    server = start_server(config="[runs]\nlog_limit_kb = 1\n")
    yield server
    server.stop()


def test_calls_are_listed_with_their_outcome_logs_and_worker(history: Server) -> None:
    key = history.create_key("rita")
    before = time.time()
    proc = cloud_call(history, 'print("hello from the run")\nreturn 41 + 1', key)
    assert proc.returncode == 0 and "42" in proc.stdout, proc.stderr
    ok = wait_for_run(history, key, lambda row: row["kind"] == "call")
    assert ok["outcome"] == "success" and ok["machine"] == "XS" and ok["user"] == "rita", ok
    assert ok["function / app"].endswith("f"), ok
    assert re.fullmatch(r"\d+", ok["worker"]), ok  # the worker's pid
    assert before - 1 <= utc(ok["queued (utc)"]) <= time.time(), ok
    assert float(ok["seconds"]) >= 0, ok
    logs = cli(history, key, "runs", "logs", ok["run id"])
    assert logs.returncode == 0 and "hello from the run" in logs.stdout, logs

    proc = cloud_call(history, 'print("about to fail")\nraise ValueError("the run failed")', key)
    assert proc.returncode != 0, proc.stdout
    failed = wait_for_run(history, key, lambda row: row["run id"] != ok["run id"])
    assert failed["outcome"] == "error (raised)", failed
    assert [row["run id"] for row in runs(history, key, "--failed")] == [failed["run id"]]
    logs = cli(history, key, "runs", "logs", failed["run id"])
    assert "about to fail" in logs.stdout and "error" in logs.stderr, logs

    # More than the 1 KiB a run keeps here: the first lines, and a line saying how many were left out.
    proc = cloud_call(history, 'for i in range(100):\n    print(f"line {i:03d} " + "x" * 40)\nreturn 0', key)
    assert proc.returncode == 0, proc.stderr
    big = wait_for_run(history, key, lambda row: row["run id"] not in (ok["run id"], failed["run id"]))
    logs = cli(history, key, "runs", "logs", big["run id"])
    assert "line 000" in logs.stdout and "line 099" not in logs.stdout, logs.stdout
    assert "more lines left out" in logs.stdout and "cut" in logs.stderr, logs
    assert len(logs.stdout) < 4096, len(logs.stdout)

    # Another user sees none of it; an admin sees it all.
    other = history.create_key("otto")
    assert runs(history, other) == []
    proc = cli(history, other, "runs", "logs", ok["run id"])
    assert proc.returncode != 0 and "no run" in proc.stderr, proc
    proc = cli(history, other, "runs", "list", "--user", "rita")
    assert proc.returncode != 0 and "only an admin" in proc.stderr, proc
    admin = (history.admin_id, history.admin_secret)
    assert {ok["run id"], failed["run id"], big["run id"]} <= {row["run id"] for row in runs(history, admin)}
    assert len(runs(history, admin, "--user", "rita")) == 3

    # Pages: two at a time, newest first, then the rest from the cursor.
    page = cli(history, key, "runs", "list", "--limit", "2")
    cursor = re.search(r"more: --before (\S+)", page.stdout)
    assert cursor, page.stdout
    rest = runs(history, key, "--before", cursor.group(1))
    assert [row["run id"] for row in rest] == [ok["run id"]]
    proc = cli(history, key, "runs", "list", "--before", "garbage")
    assert proc.returncode != 0 and "not a cursor" in proc.stderr, proc


WEB = """
from fal_serverless import isolated


@isolated(serve=True, keep_alive=30)
def greet(name: str = "world") -> dict:
    import time

    print("greeting", name, flush=True)
    # A request's lines are those the server has read from the replica's output when it ends: the line is given
    # time to arrive before the answer does.
    time.sleep(0.3)
    return {"hello": name}
"""


def test_a_web_request_and_a_queued_request_are_runs_of_the_apps_owner(history: Server, tmp_path: Path) -> None:
    key = history.create_key("wendy")
    path = tmp_path / "web.py"
    path.write_text(WEB)
    proc = cli(history, key, "function", "serve", str(path), "greet", "--alias", "greeter")
    assert proc.returncode == 0, proc.stderr
    url = re.search(r"^URL: (\S+)$", proc.stdout, re.MULTILINE)
    assert url, proc.stdout
    headers = {"Authorization": f"Key {key[0]}:{key[1]}"}
    response = httpx.post(url.group(1), params={"name": "web"}, headers=headers, timeout=300)
    assert response.status_code == 200, response.text
    request_id = response.headers["x-fal-request-id"]
    web = wait_for_run(history, key, lambda row: row["kind"] == "web")
    assert web["run id"] == request_id and web["function / app"] == "greeter", web
    assert web["outcome"] == "success" and web["worker"].startswith("replica "), web
    assert [row["run id"] for row in runs(history, key, "--app", "greeter")] == [request_id]
    logs = cli(history, key, "runs", "logs", request_id)
    assert "greeting web" in logs.stdout, logs

    base = url.group(1).split("/apps/")[0]
    submitted = httpx.post(f"{base}/queue/wendy/greeter", params={"name": "queued"}, headers=headers, timeout=60)
    assert submitted.status_code in (200, 202), submitted.text
    queued_id = submitted.json()["request_id"]
    queued = wait_for_run(history, key, lambda row: row["kind"] == "queue", timeout=120)
    assert queued["run id"] == queued_id and queued["outcome"] == "success", queued
    logs = cli(history, key, "runs", "logs", queued_id)
    assert "greeting queued" in logs.stdout and f"run {queued_id} (queue" in logs.stderr, logs


def test_runs_past_the_retention_are_deleted() -> None:
    # 0.0001 days: about 8.6 seconds; pruned every second.
    server = start_server(config="[runs]\nretention_days = 0.0001\nprune_interval_seconds = 1\n")
    try:
        key = server.create_key("rory")
        # The first call builds the environment (longer than the retention); the second is warm.
        for _ in range(2):
            proc = cloud_call(server, "return 1", key, keep_alive=60)
            assert proc.returncode == 0, proc.stderr
        run = wait_for_run(server, key, lambda row: row["kind"] == "call", timeout=8)
        deadline = time.time() + 15
        while any(row["run id"] == run["run id"] for row in runs(server, key)):
            assert time.time() < deadline, "a run past the retention was not deleted"
            time.sleep(0.5)
    finally:
        server.stop()


def test_a_bad_runs_config_is_refused_with_the_key_named(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    (data_dir / "config.toml").write_text("[runs]\nretention_days = -1\n")
    proc = subprocess.run(
        [FAL_SERVERLESS, "server", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0"],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "[runs] retention_days" in proc.stderr, proc.stderr
