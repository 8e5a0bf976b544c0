"""The `cloud` host: a real `fal-serverless server` process, real keys, jailed workers under real limits."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    EXAMPLES,
    REFERENCE_CHECKS,
    OutputCheck,
    Server,
    check_reference_example,
    cloud_call,
    pid_alive,
    run_example,
    run_script,
    script_env,
    start_server,
)

# --- the reference, against the server ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "check"), REFERENCE_CHECKS)
def test_reference_examples_run_against_the_server(server: Server, name: str, check: OutputCheck) -> None:
    check_reference_example(server, name, check)


def test_credentials_example_with_a_key_made_by_the_cli(server: Server, tmp_path: Path) -> None:
    key_id, key_secret = server.create_key("carol")
    source = (EXAMPLES / "05_credentials.py").read_text()
    source = source.replace("'your-key-id'", repr(key_id)).replace("'your-key-secret'", repr(key_secret))
    script = tmp_path / "credentials.py"
    script.write_text(source)
    # No key in the environment: only the credentials in the code can get the call in.
    env = script_env({"FAL_HOST": server.host})
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["hello world"]
    # And the reference's own placeholder key is refused, clearly.
    placeholder = run_example(server, "05_credentials.py")
    assert placeholder.stdout.startswith('refused: key id "your-key-id" is not known to this server')


# --- keys -----------------------------------------------------------------------------------------------------

CALL = """
from fal_serverless import isolated, cloud
@isolated(host=cloud)
def f():
    return "ran"
print(f())
"""


@pytest.mark.reliability("isolation")
def test_no_key_wrong_key_and_revoked_key_are_refused_saying_which(server: Server) -> None:
    no_key = run_script(CALL, {"FAL_HOST": server.host})
    assert "AuthenticationError" in no_key.stderr and "set FAL_KEY_ID and FAL_KEY_SECRET" in no_key.stderr

    key_id, key_secret = server.create_key("dave")
    wrong = run_script(CALL, server.env(key_id, "0" * 64))
    assert f'the secret given for key "{key_id}" is wrong' in wrong.stderr

    assert run_script(CALL, server.env(key_id, key_secret)).stdout == "ran\n"
    listed = server.cli("keys", "list", key=(key_id, key_secret))
    assert key_id in listed.stdout and "dave" in listed.stdout
    assert server.admin_id not in listed.stdout, "a user's key lists only that user's keys"
    revoked = server.cli("keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    after = run_script(CALL, server.env(key_id, key_secret))
    assert f'key "{key_id}" has been revoked' in after.stderr
    unknown = run_script(CALL, server.env("0123456789abcdef", key_secret))
    assert 'key id "0123456789abcdef" is not known to this server' in unknown.stderr


@pytest.mark.reliability("isolation")
def test_secrets_are_stored_only_hashed(server: Server) -> None:
    key_id, key_secret = server.create_key("erin")
    stored = b"".join(p.read_bytes() for p in server.data_dir.glob("state.sqlite3*"))
    assert key_id.encode() in stored and key_secret.encode() not in stored
    assert stat.S_IMODE(server.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((server.data_dir / "state.sqlite3").stat().st_mode) == 0o600


@pytest.mark.reliability("isolation")
def test_a_user_key_cannot_make_keys_for_others(server: Server) -> None:
    key = server.create_key("frank")
    proc = server.cli("keys", "create", "--user", "someone-else", key=key)
    assert proc.returncode != 0 and "only an admin key can create" in proc.stderr


# --- users ----------------------------------------------------------------------------------------------------

TOKEN = """
import os
from fal_serverless import isolated, cached, cloud

@cached
def token():
    return os.urandom(8).hex()

@isolated(host=cloud, keep_alive=30, requirements=["pyjokes"])
def worker_token():
    return token()

print(worker_token())
"""


@pytest.mark.reliability("isolation")
def test_one_users_warm_worker_is_never_used_for_anothers_call(server: Server) -> None:
    alice, bob = server.create_key("alice"), server.create_key("bob")
    first = run_script(TOKEN, server.env(*alice))
    again = run_script(TOKEN, server.env(*alice))
    other = run_script(TOKEN, server.env(*bob))
    assert first.returncode == again.returncode == other.returncode == 0, first.stderr + other.stderr
    assert first.stdout == again.stdout, "a second client process of the same user gets the same warm worker"
    assert other.stdout != first.stdout, "another user's call reached alice's worker"
    envs = server.data_dir / "envs"
    assert (envs / "alice").is_dir() and (envs / "bob").is_dir(), "environments are per user"
    listed = server.cli("workers", key=alice).stdout
    assert "alice" in listed and "bob" not in listed


def test_keep_alive_on_the_server_and_the_worker_gone_after(server: Server) -> None:
    script = TOKEN.replace("keep_alive=30", "keep_alive=3").replace('["pyjokes"]', '["pyjokes", "six"]')
    key = server.create_key("gina")
    first = run_script(script, server.env(*key))
    second = run_script(script, server.env(*key))
    assert first.stdout == second.stdout != ""
    listed = [line.split() for line in server.cli("workers", key=key).stdout.splitlines()[1:]]
    assert [row[1] for row in listed] == ["gina"], listed
    cgroups = _cgroup_dirs(int(listed[0][0]))
    assert cgroups, "the worker runs in no cgroup of its own"
    time.sleep(6)
    assert "gina" not in server.cli("workers", key=key).stdout
    assert not [d for d in cgroups if d.exists()], "the worker's cgroup outlived it"
    third = run_script(script, server.env(*key))
    assert third.stdout != first.stdout


def _cgroup_dirs(pid: int) -> list[Path]:
    """The worker cgroup directories of process `pid` (v1: one per controller; v2: one)."""
    dirs = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "fal-serverless" not in path:
            continue
        mount = "/sys/fs/cgroup" if controllers == "" else f"/sys/fs/cgroup/{controllers.split(',')[0]}"
        dirs.append(Path(mount + path))
    return dirs


# --- limits and the jail --------------------------------------------------------------------------------------


@pytest.mark.reliability("isolation")
def test_machine_type_xs_gets_about_a_quarter_of_a_cpu(server: Server) -> None:
    key = server.create_key("ivan")
    body = """
import resource, time
start = time.time()
while time.time() - start < 2:
    pass
usage = resource.getrusage(resource.RUSAGE_SELF)
return (usage.ru_utime + usage.ru_stime) / (time.time() - start)
"""
    proc = cloud_call(server, body, key, machine_type="XS")
    assert proc.returncode == 0, proc.stderr
    share = float(proc.stdout)
    assert 0.1 < share < 0.45, f"XS got {share:.2f} CPU over 2 s"


@pytest.mark.reliability("isolation")
def test_a_function_cannot_read_the_servers_data_or_other_environments(server: Server) -> None:
    key = server.create_key("kate")
    data = str(server.data_dir)
    body = f"""
import os
seen = {{}}
for path in ({data + "/state.sqlite3"!r}, {data + "/envs/admin"!r}, "/root", "/home"):
    try:
        seen[path] = sorted(os.listdir(path)) if os.path.isdir(path) else open(path, "rb").read(16)
    except OSError as error:
        seen[path] = type(error).__name__
seen["uid"] = os.getuid()
seen["envs"] = sorted(os.listdir({data + "/envs"!r}))
try:
    open(os.__file__ + ".x", "w")
    seen["env writable"] = True
except OSError:
    seen["env writable"] = False
import tempfile
with tempfile.NamedTemporaryFile() as scratch:  # the jail's private /tmp is the function's to write
    seen["tmp"] = os.path.dirname(scratch.name)
return seen
"""
    proc = cloud_call(server, body, key)
    assert proc.returncode == 0, proc.stderr
    seen = eval(proc.stdout)
    assert seen[data + "/state.sqlite3"] == "FileNotFoundError"
    assert seen[data + "/envs/admin"] == "FileNotFoundError"
    assert seen["envs"] == ["kate"], "other users' environments are visible"
    assert seen["uid"] != 0 and seen["env writable"] is False
    assert seen["tmp"] == "/tmp"
    assert seen["/home"] == "FileNotFoundError"


@pytest.mark.reliability("bad_input")
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server: Server) -> None:
    key = server.create_key("leo")
    gpu = cloud_call(server, "return 1", key, machine_type="GPU")
    if not Path("/proc/driver/nvidia/gpus").exists():
        assert "MachineTypeUnavailableError" in gpu.stderr and "this server has 0" in gpu.stderr
    raised = cloud_call(server, "raise KeyError('nope')", key)
    assert "KeyError: 'nope'" in raised.stderr and 'File "<string>", line 4, in f' in raised.stderr
    assert cloud_call(server, "return 3", key).stdout == "3\n"
    assert server.process.poll() is None


def test_output_streams_from_the_server(server: Server) -> None:
    key = server.create_key("mia")
    proc = cloud_call(server, "import sys\nprint('out line')\nprint('err line', file=sys.stderr)\nreturn 0", key)
    assert proc.stdout.splitlines() == ["out line", "0"]
    assert "err line" in proc.stderr.splitlines()


def test_an_unreachable_fal_host_is_a_clear_error() -> None:
    # (Plaintext and TLS to hosts that are not loopback, and the errors of each: test_tls.py.)
    unreachable = run_script(CALL, {"FAL_HOST": "127.0.0.1:9", "FAL_KEY_ID": "x", "FAL_KEY_SECRET": "y"})
    assert "ServerUnavailableError" in unreachable.stderr
    assert "cannot reach the fal-serverless server at http://127.0.0.1:9" in unreachable.stderr


# --- capacity and lifetime -----------------------------------------------------------------------------------


def test_an_idle_server_stops_by_itself() -> None:
    idle = start_server("--idle-shutdown", "1")
    assert idle.process.wait(timeout=30) == 0


# --- zero-config ----------------------------------------------------------------------------------------------


def test_without_fal_host_a_local_server_is_started_and_shared(tmp_path: Path) -> None:
    env = {"FAL_SERVERLESS_CONFIG_DIR": str(tmp_path / "config"), "FAL_SERVERLESS_DATA_DIR": str(tmp_path / "data")}
    first = run_script(CALL, env)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "ran\n" and "starting a local server" in first.stderr
    credentials = tmp_path / "config" / "local-server.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    pid = json.loads(credentials.read_text())["pid"]
    second = run_script(CALL, env)
    assert second.stdout == "ran\n" and "starting a local server" not in second.stderr
    assert json.loads(credentials.read_text())["pid"] == pid
    os.kill(pid, 15)
    deadline = time.monotonic() + 20
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid)
