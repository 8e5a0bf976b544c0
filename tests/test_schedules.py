"""Schedules: functions run on cron expressions (UTC) by the real server's scheduler on real jailed workers, with
our CLI (`function schedule`, `cron ...`, a six-field expression with seconds, so tests wait seconds) and with the
original fal-serverless 0.6.41 CLI from PyPI (five fields, as it documents: that test waits for the next minute).
A schedule survives a restart of its server, times missed while it was down run once, an activation still running
is not started twice, and cancelling stops it.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from conftest import FAL_SERVERLESS, Server, script_env, start_server, venv_with

JOBS = """
import time

from fal_serverless import isolated


@isolated(keep_alive=30)
def tick():
    print("tick at", time.time())
    return 1


@isolated(keep_alive=30)
def slow():
    print("slow started")
    time.sleep(3.5)
    print("slow finished")


@isolated(keep_alive=30)
def broken():
    raise RuntimeError("the scheduled function raised this")


@isolated(keep_alive=30)
def shows_secret():
    import os

    print("the secret is", os.environ.get("SCHEDULE_SECRET"))
    with open("/data/from-the-schedule.txt", "a") as file:
        file.write("ran\\n")
    print("/data holds", sorted(os.listdir("/data")))


@isolated(serve=True)
def web():
    return {"ok": True}
"""

HOSTNAME = "api.fal-serverless.test"
WITH_HOSTS = 'mount --bind "$0" /etc/hosts && exec "$@"'


@dataclass
class Scheduled:
    server: Server
    jobs: Path
    log: Path
    users: Dict[str, Tuple[str, str]]

    def cli(self, user: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = script_env(self.server.env(*self.users[user]))
        return subprocess.run([FAL_SERVERLESS, *args], env=env, capture_output=True, text=True, timeout=timeout)

    def schedule(self, user: str, cron: str, function: str) -> str:
        proc = self.cli(user, "function", "schedule", cron, str(self.jobs), function)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        cron_id = proc.stdout.strip().splitlines()[-1]
        assert re.fullmatch(r"[0-9a-f-]{36}", cron_id), proc.stdout
        return cron_id

    def activations(self, user: str, cron_id: str) -> List[Dict[str, str]]:
        proc = self.cli(user, "cron", "activations", cron_id, "--limit", "1000", timeout=60)
        assert proc.returncode == 0, proc.stderr
        return table(proc.stdout)

    def wait_for(
        self, user: str, cron_id: str, done: Callable[[List[Dict[str, str]]], bool], timeout: float = 240
    ) -> List[Dict[str, str]]:
        deadline = time.time() + timeout
        while True:
            found = self.activations(user, cron_id)
            if done(found):
                return found
            assert time.time() < deadline, f"activations of {cron_id} after {timeout}s: {found}"
            time.sleep(0.5)

    def logs(self, user: str, cron_id: str, activation_id: str) -> str:
        proc = self.cli(user, "cron", "logs", cron_id, activation_id, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def restart(self, down: float = 0.0) -> None:
        self.server.stop()
        time.sleep(down)
        admin = (self.server.admin_id, self.server.admin_secret)
        self.server = start_server(data_dir=self.server.data_dir, log=self.log)
        self.server.admin_id, self.server.admin_secret = admin


def table(output: str) -> List[Dict[str, str]]:
    """Rows of one of our CLI's tables (columns two or more spaces apart), by lowercased header."""
    header, *rows = output.splitlines()
    names = [name.lower() for name in re.split(r"\s{2,}", header.strip())]
    return [dict(zip(names, re.split(r"\s{2,}", row.strip()))) for row in rows if row.strip()]


def utc(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=timezone.utc).timestamp()


def successes(rows: List[Dict[str, str]]) -> List[Dict[str, str]]:
    return [row for row in rows if row["outcome"] == "success"]


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scheduled]:
    files = tmp_path_factory.mktemp("schedules")
    jobs = files / "jobs.py"
    jobs.write_text(JOBS)
    log = files / "server.log"
    server = start_server(log=log)
    users = {name: server.create_key(name) for name in ("sam", "sue", "sid", "sal")}
    users["admin"] = (server.admin_id, server.admin_secret)
    state = Scheduled(server, jobs, log, users)
    yield state
    state.server.stop()


def test_a_schedule_with_seconds_fires_keeps_logs_and_runs_and_stops_when_cancelled(scheduled: Scheduled) -> None:
    cron_id = scheduled.schedule("sam", "*/2 * * * * *", "tick")
    listed = table(scheduled.cli("sam", "cron", "list").stdout)
    assert [row["cron id"] for row in listed] == [cron_id], listed
    assert listed[0]["cron"] == "*/2 * * * * *" and listed[0]["state"] == "active", listed
    # Its next run is at most two seconds away, in UTC.
    assert utc(listed[0]["next run (utc)"]) - time.time() < 3, listed

    rows = scheduled.wait_for("sam", cron_id, lambda rows: len(successes(rows)) >= 3)
    done = successes(rows)
    for row in done:
        assert utc(row["started"]) <= utc(row["finished"]), row
        # Each was due on an even second, and started at (or after) its time.
        due = utc(row["due"])
        assert due % 2 == 0 and utc(row["started"]) >= due, row
    assert "tick at" in scheduled.logs("sam", cron_id, done[0]["activation id"])

    # Each activation is a run in the history, with the same id and its logs.
    runs = table(scheduled.cli("sam", "runs", "list", "--limit", "100").stdout)
    activation_runs = {row["run id"]: row for row in runs if row["kind"] == "activation"}
    assert done[0]["activation id"] in activation_runs, runs
    assert activation_runs[done[0]["activation id"]]["outcome"] == "success"
    logs = scheduled.cli("sam", "runs", "logs", done[0]["activation id"])
    assert logs.returncode == 0 and "tick at" in logs.stdout, logs

    # Another user sees neither the schedule nor its activations.
    assert cron_id not in scheduled.cli("sue", "cron", "list").stdout
    proc = scheduled.cli("sue", "cron", "activations", cron_id)
    assert proc.returncode != 0 and "no schedule" in proc.stderr, proc
    proc = scheduled.cli("sue", "cron", "cancel", cron_id)
    assert proc.returncode != 0 and "no schedule" in proc.stderr, proc
    # An admin sees it.
    assert cron_id in scheduled.cli("admin", "cron", "list").stdout

    proc = scheduled.cli("sam", "cron", "cancel", cron_id)
    assert proc.returncode == 0, proc.stderr
    time.sleep(1)  # one started just before the cancel may still be running: it is left to finish
    settled = len(scheduled.activations("sam", cron_id))
    time.sleep(5)
    assert len(scheduled.activations("sam", cron_id)) == settled, "a cancelled schedule fired again"
    assert table(scheduled.cli("sam", "cron", "list").stdout)[0]["state"] == "cancelled"


def test_an_activation_still_running_is_not_started_twice(scheduled: Scheduled) -> None:
    cron_id = scheduled.schedule("sid", "* * * * * *", "slow")
    rows = scheduled.wait_for(
        "sid", cron_id, lambda rows: len(successes(rows)) >= 2 and any(r["outcome"].startswith("skipped") for r in rows)
    )
    scheduled.cli("sid", "cron", "cancel", cron_id)
    ran = sorted(successes(rows), key=lambda row: utc(row["started"]))
    # Each ran about 3.5 s: none started before the one before it finished.
    for before, after in zip(ran, ran[1:]):
        assert utc(after["started"]) >= utc(before["finished"]), (before, after)
    skipped = [row for row in rows if row["outcome"].startswith("skipped")]
    assert skipped[0]["outcome"] == "skipped (still-running)" and "still running" in skipped[0]["error"], skipped[0]
    assert "still running" in scheduled.logs("sid", cron_id, skipped[0]["activation id"])


def test_a_schedule_survives_a_restart_and_what_it_missed_runs_once(scheduled: Scheduled) -> None:
    cron_id = scheduled.schedule("sue", "*/2 * * * * *", "tick")
    scheduled.wait_for("sue", cron_id, lambda rows: len(successes(rows)) >= 1)
    stopped = time.time()
    scheduled.restart(down=7)
    started = time.time()
    # Three or four due times passed while it was down: one activation for them, saying so.
    rows = scheduled.wait_for(
        "sue", cron_id, lambda rows: len([r for r in successes(rows) if utc(r["started"]) > started]) >= 2
    )
    during = [row for row in rows if stopped < utc(row["due"]) < started]
    assert len(during) == 1, during
    logs = scheduled.logs("sue", cron_id, during[0]["activation id"])
    assert "passed while the server was down" in logs and "running once now" in logs, logs
    assert "passed while the server was down" in scheduled.log.read_text()
    # After it, activations come every two seconds again.
    after = [row for row in successes(rows) if utc(row["due"]) > started]
    assert after and all(utc(row["due"]) % 2 == 0 for row in after), after
    listed = table(scheduled.cli("sue", "cron", "list").stdout)
    assert [row["state"] for row in listed if row["cron id"] == cron_id] == ["active"]
    scheduled.cli("sue", "cron", "cancel", cron_id)


def test_bad_cron_strings_and_web_endpoints_are_refused_with_the_reason(scheduled: Scheduled) -> None:
    for bad in ["* * *", "61 * * * *", "every minute", "* * * * * * *"]:
        proc = scheduled.cli("sam", "function", "schedule", bad, str(scheduled.jobs), "tick")
        assert proc.returncode != 0, proc
        assert f"cron expression {bad!r}".replace("'", '"') in proc.stderr and "five fields" in proc.stderr, proc
    proc = scheduled.cli("sam", "function", "schedule", "0 0 31 2 *", str(scheduled.jobs), "tick")
    assert proc.returncode != 0 and "would never run" in proc.stderr, proc
    proc = scheduled.cli("sam", "function", "schedule", "* * * * *", str(scheduled.jobs), "web")
    assert proc.returncode != 0 and "web endpoint" in proc.stderr, proc
    proc = scheduled.cli("sam", "function", "schedule", "* * * * *", str(scheduled.jobs), "nothing")
    assert proc.returncode != 0 and "'nothing' is not defined" in proc.stderr, proc
    proc = scheduled.cli("sam", "cron", "logs", "no-such-cron", "no-such-activation")
    assert proc.returncode != 0 and "no schedule" in proc.stderr, proc
    # The server keeps serving.
    assert scheduled.cli("sam", "cron", "list").returncode == 0


def test_a_failing_activation_keeps_its_traceback_and_outcome(scheduled: Scheduled) -> None:
    cron_id = scheduled.schedule("sam", "*/2 * * * * *", "broken")
    rows = scheduled.wait_for("sam", cron_id, lambda rows: any(r["outcome"].startswith("error") for r in rows))
    scheduled.cli("sam", "cron", "cancel", cron_id)
    failed = next(r for r in rows if r["outcome"].startswith("error"))
    assert failed["outcome"] == "error (raised)", failed
    logs = scheduled.logs("sam", cron_id, failed["activation id"])
    assert "the scheduled function raised this" in logs, logs
    runs = table(scheduled.cli("sam", "runs", "list", "--failed", "--limit", "100").stdout)
    assert failed["activation id"] in {row["run id"] for row in runs}, runs


def test_an_activation_gets_its_owners_secrets_and_data(scheduled: Scheduled) -> None:
    proc = scheduled.cli("sal", "secrets", "set", "SCHEDULE_SECRET", "for-the-schedule")
    assert proc.returncode == 0, proc.stderr
    cron_id = scheduled.schedule("sal", "*/2 * * * * *", "shows_secret")
    rows = scheduled.wait_for("sal", cron_id, lambda rows: len(successes(rows)) >= 1)
    scheduled.cli("sal", "cron", "cancel", cron_id)
    logs = scheduled.logs("sal", cron_id, successes(rows)[0]["activation id"])
    assert "the secret is for-the-schedule" in logs and "from-the-schedule.txt" in logs, logs


ORIGINAL_JOB = """
from fal_serverless import isolated


@isolated(keep_alive=10)
def every_minute():
    print("the original's scheduled function ran")
"""


def test_the_original_cli_schedules_lists_activations_logs_and_cancels(
    scheduled: Scheduled, tmp_path_factory: pytest.TempPathFactory
) -> None:
    python = venv_with(tmp_path_factory, "fal-serverless-0.6.41-schedules", "fal-serverless==0.6.41")
    files = tmp_path_factory.mktemp("original-schedules")
    hosts = files / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {HOSTNAME}\n")
    job = files / "job.py"
    job.write_text(ORIGINAL_JOB)
    key = scheduled.server.create_key("orig-scheduler")

    def original(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = script_env(
            {
                "ISOLATE_TEST_MODE": "1",
                "FAL_HOST": HOSTNAME,
                "FAL_PORT": scheduled.server.host.rsplit(":", 1)[1],
                "FAL_KEY_ID": key[0],
                "FAL_KEY_SECRET": key[1],
                # Its tables (rich) wrap ids at 80 columns otherwise.
                "COLUMNS": "250",
            }
        )
        command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", WITH_HOSTS, str(hosts)]
        command += [str(python.with_name("fal-serverless")), *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=files)

    proc = original("function", "schedule", "* * * * *", str(job), "every_minute")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Its last line: the schedule's id (the register's log before it names the function's revision).
    found = re.findall(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", proc.stdout)
    assert found, proc.stdout
    cron_id = found[-1]
    listed = original("cron", "list")
    assert listed.returncode == 0, listed.stderr
    assert cron_id[:8] in listed.stdout and "Active" in listed.stdout, listed.stdout

    # The next whole minute, UTC: wait for it (and the environment's build).
    activation: Optional[str] = None
    deadline = time.time() + 180
    while activation is None:
        assert time.time() < deadline, original("cron", "activations", cron_id).stdout
        time.sleep(2)
        proc = original("cron", "activations", cron_id)
        assert proc.returncode == 0, proc.stderr
        ids = re.findall(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", proc.stdout)
        for candidate in ids:
            logs = original("cron", "logs", cron_id, candidate)
            if "the original's scheduled function ran" in logs.stdout:
                activation = candidate
    cancelled = original("cron", "cancel", cron_id)
    assert cancelled.returncode == 0 and "Cancelled" in cancelled.stdout, cancelled.stdout + cancelled.stderr
    assert "Not Active" in original("cron", "list").stdout
    # A bad expression: the original prints the server's reason.
    proc = original("function", "schedule", "99 * * * *", str(job), "every_minute")
    assert "is not valid" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
