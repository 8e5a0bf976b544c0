"""Nested calls: a function on the server that calls another isolated function, through the server's listener in
its worker's own network namespace, with a key of its user that is valid only while that worker lives."""

from __future__ import annotations

import time
from typing import Tuple

import httpx
from conftest import Server, run_script, start_server

NESTED = """
import os
from fal_serverless import isolated, cloud

@isolated(host=cloud, requirements=["pyjokes"])
def inner(x):
    import os
    return x * 2, os.getuid(), os.environ["FAL_KEY_ID"].startswith("worker-")

@isolated(host=cloud, keep_alive=0)
def outer(x):
    import os
    return inner(x), os.getuid(), os.environ["FAL_HOST"]

print(repr(outer(21)))
"""


def test_a_function_calls_another_isolated_function_as_its_user(server: Server) -> None:
    key = server.create_key("nested-a")
    proc = run_script(NESTED, server.env(*key), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (doubled, inner_uid, inner_has_worker_key), outer_uid, fal_host = eval(proc.stdout.strip().splitlines()[-1])
    assert doubled == 42
    # Both ran as the caller's own user (a uid per user), each worker with a key of its own.
    assert inner_uid == outer_uid and inner_uid >= 200_000
    assert inner_has_worker_key
    assert fal_host.startswith("api.fal-serverless.internal:")


KEY_OF_WORKER = """
from fal_serverless import isolated, cloud

@isolated(host=cloud, keep_alive={keep_alive})
def key():
    import os
    return os.environ["FAL_KEY_ID"], os.environ["FAL_KEY_SECRET"]

print(repr(key()))
"""


def worker_key(server: Server, key: Tuple[str, str], keep_alive: int) -> Tuple[str, str]:
    proc = run_script(KEY_OF_WORKER.format(keep_alive=keep_alive), server.env(*key))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found: Tuple[str, str] = eval(proc.stdout.strip().splitlines()[-1])
    return found


def test_a_workers_key_is_its_users_while_it_lives_and_refused_after(server: Server) -> None:
    key = server.create_key("nested-b")
    warm = worker_key(server, key, keep_alive=120)
    # While its worker is warm the key is its user's: it sees that user's workers, and no one else's.
    listing = server.cli("workers", key=warm)
    assert listing.returncode == 0, listing.stderr
    header, *rows = listing.stdout.splitlines()
    names = [name.lower() for name in header.split()]
    users = {dict(zip(names, row.split()))["user"] for row in rows}
    assert users == {"nested-b"}, listing.stdout
    # It cannot make a lasting key.
    made = server.cli("keys", "create", key=warm)
    assert made.returncode != 0 and "worker's key" in made.stderr, made.stdout + made.stderr

    ended = worker_key(server, key, keep_alive=0)
    deadline = time.time() + 30
    while True:
        proc = server.cli("workers", key=ended)
        if proc.returncode != 0 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert proc.returncode != 0 and "valid only while that worker lived" in proc.stderr, proc.stdout + proc.stderr
    # A made-up secret for a live worker's key is refused too.
    assert server.cli("workers", key=(warm[0], "0" * 64)).returncode != 0


DIVE = """
from fal_serverless import isolated, cloud

@isolated(host=cloud)
def dive(n):
    if n == 0:
        return "bottom"
    return dive(n - 1)

print(dive({depth}))
"""


def test_a_call_chain_deeper_than_the_limit_is_refused_clearly() -> None:
    limited = start_server(config="[limits]\nmax_call_depth = 2\n")
    try:
        within = run_script(DIVE.format(depth=2), limited.env(), timeout=300)
        assert within.returncode == 0 and within.stdout.strip() == "bottom", within.stdout + within.stderr
        past = run_script(DIVE.format(depth=3), limited.env(), timeout=300)
        assert past.returncode != 0
        assert "3 nested calls deep" in past.stderr and "max_call_depth" in past.stderr, past.stderr
        # The server keeps serving.
        again = run_script(DIVE.format(depth=0), limited.env())
        assert again.returncode == 0 and again.stdout.strip() == "bottom", again.stderr
    finally:
        limited.stop()


SERVED_CALLER = """
from fal_serverless import isolated, cloud

@isolated(host=cloud)
def double(x):
    return x * 2

@isolated(host=cloud, serve=True, keep_alive=30)
def doubler(x: int) -> dict:
    return {"doubled": double(x)}

print(doubler.serve(alias="doubler"))
"""


def test_a_web_endpoints_replica_calls_another_function(server: Server) -> None:
    key = server.create_key("nested-app")
    proc = run_script(SERVED_CALLER, server.env(*key), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    url = proc.stdout.strip().splitlines()[-1]
    response = httpx.post(url, params={"x": 21}, headers={"Authorization": f"Key {key[0]}:{key[1]}"}, timeout=300)
    assert response.status_code == 200, response.text
    assert response.json() == {"doubled": 42}
