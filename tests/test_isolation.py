"""Isolation between users, checked from inside their functions and through their keys. (More isolation checks, on
keys, files and limits, are in test_cloud.py, marked the same way.)

Part of the reliability group (`pytest -m reliability`); the summary counts the isolation checks.
"""

from __future__ import annotations

import pytest
from conftest import Server, cloud_call

pytestmark = pytest.mark.reliability("isolation")


def test_a_function_cannot_see_or_signal_another_users_processes(server: Server) -> None:
    owner, other = server.create_key("iso-owner"), server.create_key("iso-other")
    assert cloud_call(server, "return 1", owner, keep_alive=60).stdout == "1\n"
    victim = int(server.wait_for_worker("iso-owner", busy=False)["pid"])
    body = f"""
import os, signal
visible = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
try:
    os.kill({victim}, signal.SIGKILL)
    outcome = "signalled"
except ProcessLookupError:
    outcome = "no such process"
except PermissionError:
    outcome = "not permitted"
return visible, outcome
"""
    proc = cloud_call(server, body, other, keep_alive=0)
    assert proc.returncode == 0, proc.stderr
    visible, outcome = eval(proc.stdout)
    assert outcome in ("no such process", "not permitted"), outcome
    assert len(visible) <= 4, f"a function sees processes beyond its own sandbox: {visible}"
    assert any(int(w["pid"]) == victim for w in server.workers()), "the other user's worker is gone"


def test_a_key_cannot_revoke_or_list_what_another_user_owns(server: Server) -> None:
    owner, other = server.create_key("iso-keys-a"), server.create_key("iso-keys-b")
    revoke = server.cli("keys", "revoke", owner[0], key=other)
    assert revoke.returncode != 0 and "is not yours to revoke" in revoke.stderr, revoke.stderr
    listed = server.cli("keys", "list", key=other)
    assert owner[0] not in listed.stdout and other[0] in listed.stdout
    assert cloud_call(server, "return 1", owner, keep_alive=30).stdout == "1\n"
    workers = server.cli("workers", key=other)
    assert workers.returncode == 0 and "iso-keys-a" not in workers.stdout
