"""Environment eviction on a real server with real uv builds: by age, by disk budget, by per-user caps; never one a
live worker uses; `fal-serverless envs list|rm|prune` on a server's data dir and on the local host's cache; and a
call after its environment was removed builds it again and works."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from conftest import FAL_SERVERLESS, Server, cloud_call, run_script, script_env, start_server

GIB = 1 << 30


def envs(data_dir: Path, *args: str, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
    """Runs `fal-serverless envs ARGS --data-dir DATA_DIR` (no --data-dir when `data_dir` is the local host's)."""
    where = [] if "--local-host" in args else ["--data-dir", str(data_dir)]
    return subprocess.run(
        [FAL_SERVERLESS, "envs", *args, *where], env=script_env(env), capture_output=True, text=True, timeout=60
    )


def listed(data_dir: Path, env: Optional[Dict[str, str]] = None, *flags: str) -> List[Dict[str, Any]]:
    proc = envs(data_dir, "list", "--json", *flags, env=env)
    assert proc.returncode == 0, proc.stderr
    found: List[Dict[str, Any]] = json.loads(proc.stdout)
    return found


def keys_of(data_dir: Path, user: str) -> List[str]:
    return [e["key"] for e in listed(data_dir) if e["user"] == user]


def call(server: Server, key: Tuple[str, str], module: str, keep_alive: int = 0) -> subprocess.CompletedProcess[str]:
    """A call of `key`'s user in an environment with `module` installed, which it imports."""
    body = f"import {module}\nreturn {module}.__name__"
    return cloud_call(server, body, key, requirements=[module], keep_alive=keep_alive)


def called(server: Server, key: Tuple[str, str], module: str, keep_alive: int = 0) -> str:
    """The output of a call that must succeed."""
    proc = call(server, key, module, keep_alive)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == repr(module), proc.stdout
    return proc.stderr


def new_key(data_dir: Path, user: str, before: List[str]) -> str:
    """The one environment key of `user` that was not in `before`."""
    added = [k for k in keys_of(data_dir, user) if k not in before]
    assert len(added) == 1, (before, listed(data_dir))
    return added[0]


def wait_unused(data_dir: Path, user: str, key: str) -> None:
    """Waits until no worker holds `user`'s environment `key` (a worker of keep_alive=0 stops just after its call)."""

    def unused() -> bool:
        return not any(e["in_use"] for e in listed(data_dir) if (e["user"], e["key"]) == (user, key))

    wait_until(unused, 30, f"{user}/{key} unused")


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.5)


def test_environments_unused_too_long_are_removed_but_not_one_a_live_worker_uses() -> None:
    server = start_server(config="[environments]\nmax_unused_seconds = 6\nprune_interval_seconds = 1\n")
    try:
        alice = server.create_key("alice")
        called(server, alice, "six")
        unused = new_key(server.data_dir, "alice", [])
        called(server, alice, "pyjokes", keep_alive=300)
        warm = new_key(server.data_dir, "alice", [unused])
        shared = [e["key"] for e in listed(server.data_dir) if e["shared"]]
        assert unused in shared, "a wheels-only build links the environment users share"

        wait_until(lambda: unused not in keys_of(server.data_dir, "alice"), 60, f"{unused} removed")
        everything = {(e["user"], e["key"]): e for e in listed(server.data_dir)}
        assert ("alice", warm) in everything and everything["alice", warm]["in_use"], everything
        assert (".shared", unused) not in everything, "the shared environment goes with the last one linking it"
        # Well past the limit, the environment with a warm worker is still there.
        time.sleep(8)
        assert warm in keys_of(server.data_dir, "alice")

        # The next call needs it again: built anew, and it works.
        rebuilt = called(server, alice, "six")
        assert "building environment" in rebuilt, rebuilt
        assert unused in keys_of(server.data_dir, "alice")
    finally:
        server.stop()


def test_over_the_budget_the_least_recently_used_go_first_and_come_back_when_called() -> None:
    server = start_server()
    alice = server.create_key("alice")
    try:
        order: List[str] = []
        for module in ["six", "pyjokes", "idna"]:
            called(server, alice, module)
            order.append(new_key(server.data_dir, "alice", order))
            time.sleep(1.1)  # mtimes a second apart at least: the order of last use is unambiguous
        everything = listed(server.data_dir)
    finally:
        server.stop()
    oldest = order[0]
    total = sum(e["bytes"] for e in everything)
    oldest_bytes = sum(e["bytes"] for e in everything if e["key"] == oldest)
    # Room for all but the oldest (its own environment and the shared one it linked).
    budget = (total - oldest_bytes + 4096) / GIB
    # The per-user cap (a quarter of the budget by default) as large: alice's environments are all there are.
    config = f"[environments]\ndisk_budget_gb = {budget!r}\ndisk_per_user_gb = {budget!r}\n"
    server = start_server(config=config, data_dir=server.data_dir)
    try:
        wait_until(lambda: oldest not in keys_of(server.data_dir, "alice"), 30, f"{oldest} removed")
        assert keys_of(server.data_dir, "alice") == sorted(order[1:]), listed(server.data_dir)
        assert oldest not in [e["key"] for e in listed(server.data_dir)]

        # Called again, it is built anew, which takes the environments over the budget again: the least recently
        # used of the others goes.
        rebuilt = called(server, alice, "six")
        assert "building environment" in rebuilt, rebuilt
        wait_until(lambda: order[1] not in keys_of(server.data_dir, "alice"), 30, f"{order[1]} removed")
        assert oldest in keys_of(server.data_dir, "alice")
    finally:
        server.stop()


def test_envs_list_rm_and_prune_never_remove_one_in_use() -> None:
    server = start_server()
    try:
        alice, bob = server.create_key("alice"), server.create_key("bob")
        called(server, alice, "six")
        idle = new_key(server.data_dir, "alice", [])
        called(server, bob, "pyjokes", keep_alive=300)
        busy = new_key(server.data_dir, "bob", [])

        wait_unused(server.data_dir, "alice", idle)
        table = envs(server.data_dir, "list")
        assert table.returncode == 0, table.stderr
        header, *rows = table.stdout.splitlines()
        assert header.split() == ["USER", "KEY", "SIZE", "LAST", "USED", "IN", "USE"], header
        in_use = {(row.split()[0], row.split()[1]): row.split()[-1] for row in rows[:-1]}
        assert in_use["alice", idle] == "no" and in_use["bob", busy] == "yes", table.stdout
        assert in_use[".shared", idle] == "no", "the shared environment alice's links is listed too"
        assert "environments" in rows[-1] and "in all" in rows[-1], rows[-1]

        refused = envs(server.data_dir, "rm", busy[:8])
        assert refused.returncode == 1
        assert f"environment bob/{busy} is in use" in refused.stderr, refused.stderr
        assert busy in keys_of(server.data_dir, "bob")

        dry = envs(server.data_dir, "prune", "--older-than", "0", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert f"would remove alice/{idle}" in dry.stdout and busy not in dry.stdout, dry.stdout
        assert idle in keys_of(server.data_dir, "alice"), "a dry run removes nothing"

        pruned = envs(server.data_dir, "prune", "--older-than", "0")
        assert pruned.returncode == 0, pruned.stderr
        assert f"removed alice/{idle}" in pruned.stdout, pruned.stdout
        assert keys_of(server.data_dir, "alice") == [] and keys_of(server.data_dir, "bob") == [busy]

        # bob's warm worker still answers, in the environment that was never removed under it.
        assert "building" not in called(server, bob, "pyjokes", keep_alive=300)

        # Removed by hand, an environment comes back with the next call that needs it.
        called(server, alice, "six")
        wait_unused(server.data_dir, "alice", idle)
        removed = envs(server.data_dir, "rm", idle)
        assert removed.returncode == 0 and f"removed alice/{idle}" in removed.stdout, removed.stderr
        assert "shared environment" in removed.stdout, "the shared one it linked goes with it"
        missing = envs(server.data_dir, "rm", idle)
        assert missing.returncode == 1 and "no environment" in missing.stderr, missing.stderr
        assert "building environment" in called(server, alice, "six")
    finally:
        server.stop()


def test_a_user_over_the_per_user_cap_loses_their_own_least_recently_used_or_is_told_the_cap() -> None:
    server = start_server(config="[environments]\nmax_per_user = 1\n")
    try:
        alice, bob = server.create_key("alice"), server.create_key("bob")
        called(server, bob, "idna")
        called(server, alice, "six")
        first = new_key(server.data_dir, "alice", [])
        wait_unused(server.data_dir, "alice", first)
        output = called(server, alice, "pyjokes", keep_alive=300)
        assert f"removed your least recently used environment {first}" in output, output
        assert first not in keys_of(server.data_dir, "alice") and len(keys_of(server.data_dir, "alice")) == 1
        assert len(keys_of(server.data_dir, "bob")) == 1, "another user's environments are not touched"

        # Alice's one environment has a live worker: a new one cannot be made, and she is told why and what to do.
        refused = call(server, alice, "idna")
        assert refused.returncode != 0
        assert "max_per_user = 1" in refused.stderr and "fal-serverless envs rm" in refused.stderr, refused.stderr
        assert "building environment" not in refused.stderr
    finally:
        server.stop()


def test_envs_works_on_the_local_hosts_cache_too() -> None:
    cache = tempfile.mkdtemp(prefix="fal-serverless-test-local-envs-")
    env = {"FAL_SERVERLESS_CACHE_DIR": cache}
    source = (
        "from fal_serverless import isolated, local\n"
        "@isolated(host=local, requirements=['six'], keep_alive=0)\n"
        "def f():\n    import six\n    return six.__name__\n"
        "print(f())\n"
    )
    proc = run_script(source, env)
    assert proc.returncode == 0 and proc.stdout.strip() == "six", proc.stderr
    found = listed(Path(cache), env, "--local-host")
    assert [(e["user"], e["in_use"]) for e in found] == [("local", False)], found
    assert listed(Path(cache)) == found, "--data-dir takes the local host's cache dir too"
    pruned = envs(Path(cache), "prune", "--older-than", "0", "--local-host", env=env)
    assert pruned.returncode == 0 and f"removed local/{found[0]['key']}" in pruned.stdout, pruned.stderr
    assert listed(Path(cache), env, "--local-host") == []
    # And the local host builds it again when called.
    again = run_script(source, env)
    assert again.returncode == 0 and again.stdout.strip() == "six", again.stderr
