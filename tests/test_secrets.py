"""Secrets end to end: `fal-serverless secrets set|list|delete` (ours and the original 0.6.41 client's) against a
real server, seen as environment variables by the owner's jailed workers (plain calls and an app's replicas) and by
no one else's, replaced on warm workers when they change, and never on disk in plain text nor in the server's log.

One server of this module's own, with its log (at debug level) in a file, so that the log and its database's bytes
can be searched for the values."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, List, Tuple

import httpx
import pytest
from conftest import (
    FAL_SERVERLESS,
    Server,
    cloud_call,
    descendants,
    run_script,
    script_env,
    start_client,
    start_server,
    venv_with,
)
from test_original_client import HOSTNAME, VERSION, OriginalClient

#: Values the tests set; none may appear in the database's bytes or the server's log.
VALUES: List[str] = []


def value(tag: str) -> str:
    """A value no other part of the test run could print by chance, remembered for the leak checks."""
    made = f"{tag}-{os.urandom(12).hex()}"
    VALUES.append(made)
    return made


@pytest.fixture(scope="module")
def log_file() -> Path:
    return Path(tempfile.mkdtemp(prefix="fal-serverless-test-secrets-log-")) / "server.log"


@pytest.fixture(scope="module")
def secrets_server(log_file: Path) -> Iterator[Server]:
    started = start_server(log=log_file, env={"FAL_SERVERLESS_LOG": "debug"})
    yield started
    if started.process.poll() is None:
        started.process.send_signal(signal.SIGTERM)
        started.process.wait(timeout=60)


@pytest.fixture(scope="module")
def alice(secrets_server: Server) -> Tuple[str, str]:
    return secrets_server.create_key("alice")


@pytest.fixture(scope="module")
def bob(secrets_server: Server) -> Tuple[str, str]:
    return secrets_server.create_key("bob")


def secrets(
    server: Server, key: Tuple[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`fal-serverless secrets ARGS` against `server` with `key`."""
    env = script_env(server.env(*key))
    return subprocess.run(
        [FAL_SERVERLESS, "secrets", *args], env=env, input=stdin, capture_output=True, text=True, timeout=60
    )


def listed(server: Server, key: Tuple[str, str], *args: str) -> List[Tuple[str, str]]:
    """(name, user) of each secret `secrets list` shows."""
    proc = secrets(server, key, "list", *args)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split()[:2] == ["NAME", "USER"], proc.stdout
    return [(row.split()[0], row.split()[1]) for row in rows]


def env_of(server: Server, key: Tuple[str, str], *names: str, keep_alive: int = 0) -> List[str | None]:
    """What a jailed call of `key`'s user sees of `names` in its environment."""
    body = f"import os\nreturn [os.environ.get(n) for n in {list(names)!r}]"
    proc = cloud_call(server, body, key, keep_alive=keep_alive)
    assert proc.returncode == 0, proc.stderr
    result: List[str | None] = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    return result


def test_a_secret_set_with_our_cli_is_an_environment_variable_of_the_owners_calls_only(
    secrets_server: Server, alice: Tuple[str, str], bob: Tuple[str, str]
) -> None:
    token = value("token")
    proc = secrets(secrets_server, alice, "set", "API_TOKEN", token)
    assert proc.returncode == 0, proc.stderr
    assert token not in proc.stdout + proc.stderr
    assert listed(secrets_server, alice) == [("API_TOKEN", "alice")]
    assert token not in secrets(secrets_server, alice, "list").stdout
    assert env_of(secrets_server, alice, "API_TOKEN") == [token]
    # Another user's function does not see it, nor does their list show it.
    assert env_of(secrets_server, bob, "API_TOKEN") == [None]
    assert listed(secrets_server, bob) == []
    # The admin's list is every user's, as with keys.
    assert ("API_TOKEN", "alice") in listed(secrets_server, (secrets_server.admin_id, secrets_server.admin_secret))


def uid_of(pid: int) -> int:
    """The real uid `pid` runs as."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def test_a_secret_is_not_in_the_environment_of_the_root_run_jailer_but_the_function_and_its_children_see_it(
    secrets_server: Server, alice: Tuple[str, str]
) -> None:
    # bubblewrap and setpriv run as root, and glibc does not clean the environment of a root process that is not
    # setuid: a secret there would reach them (a GCONV_PATH, a GLIBC_TUNABLES) and sit in root's processes.
    secret = value("jailer")
    assert secrets(secrets_server, alice, "set", "JAILER_TOKEN", secret).returncode == 0
    body = (
        "import os, subprocess, time\n"
        # The processes are read while it sleeps; its child runs after, so that they are the worker's own only (the
        # child, which is the user's, has the secret in its environment, as it should).
        "time.sleep(10)\n"
        'child = subprocess.run(["sh", "-c", \'printf %s "$JAILER_TOKEN"\'], capture_output=True, text=True)\n'
        'return [os.environ.get("JAILER_TOKEN"), child.stdout]'
    )
    client = start_client(secrets_server, alice, body, keep_alive=0)
    try:
        pid = int(secrets_server.wait_for_worker("alice")["pid"])
        # The worker's process is bubblewrap's; below it bubblewrap's PID 1, then the agent, which setpriv became
        # (so the agent's environment as it was exec'd is the one setpriv ran as root with).
        tree = [pid, *descendants(pid)]
        environs = {p: Path(f"/proc/{p}/environ").read_bytes() for p in tree}
        uids = {p: uid_of(p) for p in tree}
        assert 0 in uids.values() and any(uid != 0 for uid in uids.values()), uids
        assert all(environs.values()), "every process of the worker shows its environment"
        for p, environ in environs.items():
            assert secret.encode() not in environ, f"process {p} (uid {uids[p]}) was started with the secret"
            assert b"JAILER_TOKEN=" not in environ, f"process {p} (uid {uids[p]}) was started with the secret"
    finally:
        stdout, stderr = client.communicate(timeout=120)
    assert client.returncode == 0, stderr
    assert ast.literal_eval(stdout.strip().splitlines()[-1]) == [secret, secret]
    assert secrets(secrets_server, alice, "delete", "JAILER_TOKEN").returncode == 0


def test_values_come_from_standard_input_or_a_file_byte_for_byte(
    secrets_server: Server, alice: Tuple[str, str], tmp_path: Path
) -> None:
    from_stdin, from_file = value("stdin"), value("file") + "\nsecond line"
    assert secrets(secrets_server, alice, "set", "FROM_STDIN", stdin=from_stdin + "\n").returncode == 0
    path = tmp_path / "value.txt"
    path.write_text(from_file)
    proc = secrets(secrets_server, alice, "set", "FROM_FILE", "--from-file", str(path))
    assert proc.returncode == 0, proc.stderr
    dash = value("dash")
    assert secrets(secrets_server, alice, "set", "FROM_DASH", "-", stdin=dash).returncode == 0
    assert env_of(secrets_server, alice, "FROM_STDIN", "FROM_FILE", "FROM_DASH") == [from_stdin, from_file, dash]
    for name in ("FROM_STDIN", "FROM_FILE", "FROM_DASH"):
        assert secrets(secrets_server, alice, "delete", name).returncode == 0


def test_a_changed_secret_reaches_the_next_call_and_the_stale_warm_worker_is_stopped_at_once(
    secrets_server: Server, bob: Tuple[str, str]
) -> None:
    first, second = value("first"), value("second")
    assert secrets(secrets_server, bob, "set", "ROTATED", first).returncode == 0
    assert env_of(secrets_server, bob, "ROTATED", keep_alive=120) == [first]
    warm = [w for w in secrets_server.workers() if w["user"] == "bob"]
    assert len(warm) == 1 and warm[0]["busy"] == "false", warm
    assert secrets(secrets_server, bob, "set", "ROTATED", second).returncode == 0
    # Stopped before `set` returned: not left to its keep_alive of 120 s.
    assert [w for w in secrets_server.workers() if w["user"] == "bob"] == []
    assert env_of(secrets_server, bob, "ROTATED", keep_alive=120) == [second]
    # Unchanged, the next call reuses the warm worker.
    (worker,) = [w for w in secrets_server.workers() if w["user"] == "bob"]
    assert env_of(secrets_server, bob, "ROTATED", keep_alive=120) == [second]
    (again,) = [w for w in secrets_server.workers() if w["user"] == "bob"]
    assert (again["pid"], again["calls"]) == (worker["pid"], "2"), (worker, again)
    # Deleted: gone from the next call, and its warm worker with it.
    assert secrets(secrets_server, bob, "delete", "ROTATED").returncode == 0
    assert [w for w in secrets_server.workers() if w["user"] == "bob"] == []
    assert env_of(secrets_server, bob, "ROTATED") == [None]
    missing = secrets(secrets_server, bob, "delete", "ROTATED")
    assert missing.returncode != 0
    assert 'user "bob" has no secret "ROTATED"' in missing.stderr, missing.stderr
    # Nor is the worker list a way to see a value.
    assert all(v not in str(secrets_server.workers()) for v in VALUES)


@pytest.mark.parametrize(
    "name, says",
    [
        ("1ABC", "not an environment variable name"),
        ("WITH-DASH", "not an environment variable name"),
        ("PATH", "PATH cannot be a secret's name: the worker's system environment uses it"),
        ("PYTHONPATH", "Python reads PYTHON* variables"),
        ("LD_PRELOAD", "the dynamic loader reads LD_*"),
        ("FAL_KEY_SECRET", "the platform sets FAL_* and ISOLATE_* variables"),
        ("IS_ISOLATE_AGENT", "the platform sets it in every worker"),
        ("GCONV_PATH", "GCONV_PATH cannot be a secret's name: the C library reads it in every program"),
        ("MALLOC_ARENA_MAX", "drops it for privileged ones as unsafe"),
        ("A" * 129, "at most 128 characters"),
    ],
)
def test_bad_names_are_refused_saying_why(secrets_server: Server, alice: Tuple[str, str], name: str, says: str) -> None:
    secret = value("refused")
    proc = secrets(secrets_server, alice, "set", name, secret)
    assert proc.returncode != 0
    assert says in proc.stderr, proc.stderr
    assert secret not in proc.stderr
    assert name not in [n for n, _ in listed(secrets_server, alice)]


def test_bad_values_are_refused_without_echoing_them_and_the_server_keeps_serving(
    secrets_server: Server, alice: Tuple[str, str], tmp_path: Path
) -> None:
    big = value("big") + "x" * (16 * 1024)
    path = tmp_path / "big.txt"
    path.write_text(big)
    proc = secrets(secrets_server, alice, "set", "BIG", "--from-file", str(path))
    assert proc.returncode != 0
    assert "this server takes at most 16384 bytes ([secrets] max_value_kb)" in proc.stderr, proc.stderr
    assert big[:40] not in proc.stderr
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00")
    proc = secrets(secrets_server, alice, "set", "BINARY", "--from-file", str(binary))
    assert proc.returncode != 0 and "not UTF-8 text" in proc.stderr, proc.stderr
    # Still serving: a list, and a call.
    assert ("API_TOKEN", "alice") in listed(secrets_server, alice)
    assert env_of(secrets_server, alice, "BIG") == [None]


def test_another_users_secrets_are_an_admins_alone(
    secrets_server: Server, alice: Tuple[str, str], bob: Tuple[str, str]
) -> None:
    proc = secrets(secrets_server, bob, "set", "API_TOKEN", value("intruder"), "--user", "alice")
    assert proc.returncode != 0 and "only an admin key" in proc.stderr, proc.stderr
    assert secrets(secrets_server, bob, "list", "--user", "alice").returncode != 0
    assert secrets(secrets_server, bob, "delete", "API_TOKEN", "--user", "alice").returncode != 0
    admin = (secrets_server.admin_id, secrets_server.admin_secret)
    by_admin = value("by-admin")
    proc = secrets(secrets_server, admin, "set", "SET_BY_ADMIN", by_admin, "--user", "alice")
    assert proc.returncode == 0, proc.stderr
    assert env_of(secrets_server, alice, "SET_BY_ADMIN") == [by_admin]
    assert secrets(secrets_server, admin, "delete", "SET_BY_ADMIN", "--user", "alice").returncode == 0
    assert listed(secrets_server, admin, "--user", "alice") == [("API_TOKEN", "alice")]


APP = """
import os
from fal_serverless import isolated

@isolated(serve=True, keep_alive=60)
def token() -> dict:
    return {"token": os.environ.get("APP_TOKEN")}

print("url", token.serve(alias="token-app"))
"""


def test_an_app_replica_sees_its_owners_secret_and_a_change_replaces_it(
    secrets_server: Server, alice: Tuple[str, str]
) -> None:
    first, second = value("app-first"), value("app-second")
    assert secrets(secrets_server, alice, "set", "APP_TOKEN", first).returncode == 0
    proc = run_script(APP, secrets_server.env(*alice), timeout=600)
    assert proc.returncode == 0, proc.stderr
    url = dict(line.split(" ", 1) for line in proc.stdout.splitlines())["url"]
    headers = {"Authorization": f"Key {alice[0]}:{alice[1]}"}
    reply = httpx.post(url, headers=headers, timeout=300)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"token": first}
    # The replica (warm for 60 s) is replaced: the next request sees the new value.
    assert secrets(secrets_server, alice, "set", "APP_TOKEN", second).returncode == 0
    reply = httpx.post(url, headers=headers, timeout=300)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"token": second}
    assert secrets(secrets_server, alice, "delete", "APP_TOKEN").returncode == 0


@pytest.fixture(scope="module")
def original(secrets_server: Server, tmp_path_factory: pytest.TempPathFactory) -> OriginalClient:
    python = venv_with(tmp_path_factory, "fal-serverless-0.6.41", VERSION)
    hosts = tmp_path_factory.mktemp("hosts") / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {HOSTNAME}\n")
    return OriginalClient(python, hosts, secrets_server, secrets_server.create_key("carol"))


ORIGINAL_CALL = """
import os
from fal_serverless import isolated

@isolated()
def token():
    return os.environ.get("ORIGINAL_TOKEN")

print("token", token())
"""


def test_the_original_clients_secrets_commands_work_unchanged(secrets_server: Server, original: OriginalClient) -> None:
    secret = value("original")
    proc = original.cli("secrets", "set", "ORIGINAL_TOKEN", secret)
    assert proc.returncode == 0 and "Secret 'ORIGINAL_TOKEN' has set" in proc.stdout, proc.stdout + proc.stderr
    proc = original.cli("secrets", "list")
    assert proc.returncode == 0 and "ORIGINAL_TOKEN" in proc.stdout, proc.stdout + proc.stderr
    assert secret not in proc.stdout
    # Its own (dill) call sees it.
    printed = original.script(ORIGINAL_CALL).stdout.splitlines()
    assert f"token {secret}" in printed, printed
    proc = original.cli("secrets", "delete", "ORIGINAL_TOKEN")
    assert proc.returncode == 0 and "Secret 'ORIGINAL_TOKEN' has deleted" in proc.stdout, proc.stdout + proc.stderr
    assert "ORIGINAL_TOKEN" not in original.cli("secrets", "list").stdout
    assert "token None" in original.script(ORIGINAL_CALL).stdout.splitlines()


def test_no_value_is_in_the_database_files_or_the_servers_log(secrets_server: Server, log_file: Path) -> None:
    assert VALUES, "the tests above set values"
    data = secrets_server.data_dir
    files = [data / "state.sqlite3", data / "state.sqlite3-wal"]
    assert files[0].exists()
    for path in files:
        raw = path.read_bytes() if path.exists() else b""
        for secret in VALUES:
            assert secret.encode() not in raw, f"{path.name} holds a value"
    key_file = data / "secrets.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    log = log_file.read_text(errors="replace")
    assert "secret set" in log, "the log says what was done (by name)"
    for secret in VALUES:
        assert secret not in log, "the server's log holds a value"


def test_a_restart_with_another_key_file_stops_with_a_clear_error_and_the_right_one_keeps_the_secrets(
    secrets_server: Server, alice: Tuple[str, str]
) -> None:
    secrets_server.stop()
    data = secrets_server.data_dir
    key_file = data / "secrets.key"
    original_key = key_file.read_bytes()
    key_file.write_text(os.urandom(32).hex() + "\n")
    argv = [FAL_SERVERLESS, "server", "--data-dir", str(data), "--listen", "127.0.0.1:0"]
    proc = subprocess.run(argv, env=script_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "is not the key the database's" in proc.stderr and "secrets.key" in proc.stderr, proc.stderr
    key_file.unlink()
    proc = subprocess.run(argv, env=script_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "is missing" in proc.stderr, proc.stderr
    assert not key_file.exists(), "no new key was made over secrets that need the old one"
    key_file.write_bytes(original_key)
    key_file.chmod(0o600)
    restarted = start_server(data_dir=data)
    try:
        restarted_server = Server(
            restarted.process, restarted.host, data, secrets_server.admin_id, secrets_server.admin_secret
        )
        assert ("API_TOKEN", "alice") in listed(restarted_server, alice)
        token = env_of(restarted_server, alice, "API_TOKEN")[0]
        assert token is not None and token in VALUES
    finally:
        restarted.process.send_signal(signal.SIGTERM)
        restarted.process.wait(timeout=60)
