"""The queue end to end: `fal-client` 1.0.3 from PyPI (submit, status with logs, get, cancel, subscribe, and run
through the gateway) against a deployed app over TLS, a webhook receiver in the test, the queue's errors and auth
with a real HTTP client (httpx), and a server restart with requests queued and one running.

fal-client speaks only https: its server is started with the certificate `server init --tls-self-signed` makes, and
fal-client's httpx trusts that CA through SSL_CERT_FILE (httpx reads it when trust_env is on, its default)."""

from __future__ import annotations

import dataclasses
import http.server
import json
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import httpx
import pytest
from conftest import FAL_SERVERLESS, Server, run_script, script_env, start_server
from test_tls import self_signed

#: A first request starts a replica (the app's environment is built, then uvicorn starts).
START = 300.0
USER = "queue-user"

APP = """
import sys
from fal_serverless import isolated

@isolated(serve=True, keep_alive=120, max_concurrency=1)
def worker(payload: dict) -> dict:
    import time
    print("working", payload.get("n"), flush=True)
    time.sleep(payload.get("sleep", 0))
    if payload.get("fail"):
        raise ValueError("asked to fail")
    return {"n": payload.get("n"), "doubled": 2 * payload.get("n", 0)}

print("url", worker.serve(alias="worker", auth=sys.argv[1] if len(sys.argv) > 1 else "private"))
"""


@dataclasses.dataclass
class Deployed:
    server: Server
    key: Tuple[str, str]
    #: The CA the server's certificate is signed by (None: plaintext).
    ca: Optional[Path]

    @property
    def base(self) -> str:
        host = self.server.host
        return host if "://" in host else f"http://{host}"

    @property
    def address(self) -> str:
        return self.base.split("://", 1)[1]

    def client(self, key: Optional[Tuple[str, str]] = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Key {key[0]}:{key[1]}"} if key else {}
        verify: Any = ssl.create_default_context(cafile=str(self.ca)) if self.ca else True
        return httpx.Client(base_url=self.base, headers=headers, verify=verify, **{"timeout": 60, **kwargs})

    def env(self, key: Optional[Tuple[str, str]] = None) -> Dict[str, str]:
        env = self.server.env(*(key or self.key))
        if self.ca:
            env["FAL_SERVERLESS_CA_FILE"] = str(self.ca)
        return env

    def create_key(self, user: str) -> Tuple[str, str]:
        env = script_env(self.env((self.server.admin_id, self.server.admin_secret)))
        proc = subprocess.run(
            [FAL_SERVERLESS, "keys", "create", "--user", user], env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        values = dict(line.split("=", 1) for line in proc.stdout.splitlines())
        return values["FAL_KEY_ID"], values["FAL_KEY_SECRET"]


def deploy(server: Server, ca: Optional[Path]) -> Deployed:
    deployed = Deployed(server, ("", ""), ca)
    deployed.key = deployed.create_key(USER)
    proc = run_script(APP, deployed.env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"/apps/{USER}/worker" in proc.stdout, proc.stdout
    return deployed


@pytest.fixture(scope="module")
def tls_app() -> Iterator[Deployed]:
    data_dir, key, ca = self_signed("localhost", "127.0.0.1")
    server = start_server(data_dir=data_dir, log=data_dir.parent / f"{data_dir.name}.log")
    server = dataclasses.replace(server, admin_id=key["FAL_KEY_ID"], admin_secret=key["FAL_KEY_SECRET"])
    try:
        yield deploy(server, ca)
    finally:
        server.stop()


def wait_status(client: httpx.Client, url: str, wanted: str, timeout: float = START) -> Dict[str, Any]:
    deadline = time.time() + timeout
    while True:
        reply = client.get(url)
        assert reply.status_code in (200, 202), reply.text
        if reply.json()["status"] == wanted:
            return dict(reply.json())
        assert reply.json()["status"] != "COMPLETED", f"{url} completed before it was {wanted}: {reply.json()}"
        assert time.time() < deadline, f"{url} is still {reply.json()} after {timeout}s, not {wanted}"
        time.sleep(0.2)


FAL_CLIENT = """
import json, sys, time
import fal_client
from fal_client.client import FalClientHTTPError, Completed, InProgress, Queued

app = sys.argv[1]
out = {}
first = fal_client.submit(app, {"n": 1, "sleep": 3})
second = fal_client.submit(app, {"n": 2})
seen = []
for event in second.iter_events(with_logs=True, interval=0.1):
    label = type(event).__name__ + (f":{event.position}" if isinstance(event, Queued) else "")
    if not seen or seen[-1] != label:
        seen.append(label)
out["seen"] = seen
out["first"] = first.get()
out["second"] = second.get()
status = fal_client.status(app, first.request_id, with_logs=True)
out["first_status"] = [type(status).__name__, [line["message"] for line in status.logs], status.error]
out["no_logs"] = fal_client.status(app, first.request_id).logs
updates = []
out["subscribed"] = fal_client.subscribe(
    app, {"n": 5}, with_logs=True, on_queue_update=lambda u: updates.append(type(u).__name__)
)
out["updates"] = sorted(set(updates))
out["run"] = fal_client.run(app, {"n": 7})
failing = fal_client.submit(app, {"n": 9, "fail": True})
try:
    failing.get()
except FalClientHTTPError as e:
    out["failed"] = [e.status_code, str(e)]
out["failed_status"] = fal_client.status(app, failing.request_id).error
running = fal_client.submit(app, {"n": 10, "sleep": 30})
queued = fal_client.submit(app, {"n": 11})
while not isinstance(running.status(), InProgress):
    time.sleep(0.1)
fal_client.cancel(app, queued.request_id)
fal_client.cancel(app, running.request_id)
out["cancelled"] = [fal_client.status(app, h.request_id).error for h in (queued, running)]
try:
    fal_client.cancel(app, first.request_id)
except FalClientHTTPError as e:
    out["cancel_done"] = e.status_code
# The replica the cancelled request held serves the next one.
started = time.time()
out["after_cancel"] = fal_client.subscribe(app, {"n": 12})
out["after_cancel_s"] = time.time() - started
print(json.dumps(out))
"""


def test_fal_client_submits_polls_gets_cancels_subscribes_and_runs_over_tls(tls_app: Deployed) -> None:
    env = {
        "FAL_KEY": f"{tls_app.key[0]}:{tls_app.key[1]}",
        "FAL_QUEUE_RUN_HOST": f"{tls_app.address}/queue",
        "FAL_RUN_HOST": f"{tls_app.address}/apps",
        "SSL_CERT_FILE": str(tls_app.ca),
    }
    proc = subprocess.run(
        [sys.executable, "-c", FAL_CLIENT, f"{USER}/worker"],
        env=script_env(env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # The second request waited behind the first (one replica), then ran.
    seen = out["seen"]
    assert seen[0] in ("Queued:1", "Queued:0") and seen[-1] == "Completed", seen
    # (Its own run is too short for a poll to be sure to see it IN_PROGRESS.)
    assert "Queued:0" in seen, seen
    assert out["first"] == {"n": 1, "doubled": 2} and out["second"] == {"n": 2, "doubled": 4}, out
    kind, messages, error = out["first_status"]
    assert (kind, error) == ("Completed", None) and "working 1" in messages, out
    assert "working 2" not in messages, "a request's logs are its own"
    assert out["no_logs"] is None
    assert out["subscribed"] == {"n": 5, "doubled": 10} and "Completed" in out["updates"], out
    assert out["run"] == {"n": 7, "doubled": 14}
    assert out["failed"][0] == 500, out
    assert "500" in out["failed_status"], out
    assert out["cancelled"] == ["the request was cancelled"] * 2, out
    assert out["cancel_done"] == 400
    assert out["after_cancel"] == {"n": 12, "doubled": 24}
    assert out["after_cancel_s"] < 20, "a cancelled request gives its replica back at once"


class Receiver:
    """An HTTP server in the test that takes webhooks: it answers 500 to the first `fail` posts, then 200."""

    def __init__(self, fail: int) -> None:
        self.posts: List[Dict[str, Any]] = []
        self.times: List[float] = []
        self.fail = fail
        self.lock = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.posts.append(json.loads(body))
                    receiver.times.append(time.time())
                    failing = len(receiver.posts) <= receiver.fail
                    receiver.lock.notify_all()
                self.send_response(500 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=abc"

    def wait(self, count: int, timeout: float = 60) -> List[Dict[str, Any]]:
        with self.lock:
            assert self.lock.wait_for(lambda: len(self.posts) >= count, timeout), self.posts
            return list(self.posts)


def test_a_webhook_is_posted_retried_with_backoff_and_recorded(tls_app: Deployed) -> None:
    receiver = Receiver(fail=1)
    with tls_app.client(tls_app.key) as client:
        submitted = client.post(f"/queue/{USER}/worker", params={"fal_webhook": receiver.url}, json={"n": 21})
        assert submitted.status_code == 200, submitted.text
        request_id = submitted.json()["request_id"]
        posts = receiver.wait(2, timeout=START)
        assert (
            posts[0]
            == posts[1]
            == {
                "request_id": request_id,
                "gateway_request_id": request_id,
                "status": "OK",
                "payload": {"n": 21, "doubled": 42},
            }
        )
        webhook = f"/queue/{USER}/worker/requests/{request_id}/webhook"
        deadline = time.time() + 10
        while (record := client.get(webhook).json())["state"] != "delivered":
            assert time.time() < deadline, record
            time.sleep(0.1)
        assert [a["status_code"] for a in record["attempts"]] == [500, 200], record
        assert "500" in record["attempts"][0]["error"] and record["attempts"][1]["error"] is None
        # A failed request's webhook says ERROR, with the app's answer as its payload.
        failed = client.post(f"/queue/{USER}/worker", params={"fal_webhook": receiver.url}, json={"n": 1, "fail": 1})
        post = receiver.wait(3, timeout=START)[2]
        assert post["request_id"] == failed.json()["request_id"] and post["status"] == "ERROR", post
        assert "500" in post["error"], post


def test_the_queue_answers_errors_and_keeps_requests_to_their_submitter(tls_app: Deployed) -> None:
    other = tls_app.create_key("queue-other")
    admin = (tls_app.server.admin_id, tls_app.server.admin_secret)
    with tls_app.client() as anonymous, tls_app.client(tls_app.key) as owner, tls_app.client(other) as stranger:
        reply = anonymous.post(f"/queue/{USER}/worker", json={"n": 1})
        assert reply.status_code == 401 and reply.json()["error"] == "missing_key", reply.text
        reply = stranger.post(f"/queue/{USER}/worker", json={"n": 1})
        assert reply.status_code == 401 and reply.json()["error"] == "wrong_key", reply.text
        assert owner.post(f"/queue/{USER}/nothing", json={}).status_code == 404
        reply = owner.post(f"/queue/{USER}/worker", params={"fal_webhook": "ftp://x/"}, json={})
        assert reply.status_code == 400 and "http://" in reply.json()["detail"], reply.text
        with tls_app.client(tls_app.key, timeout=30) as fresh:
            reply = fresh.post(f"/queue/{USER}/worker", content=b"x" * (33 * 1024 * 1024))
        assert reply.status_code == 413 and "MiB" in reply.json()["detail"], reply.text

        submitted = owner.post(f"/queue/{USER}/worker", json={"n": 3}).json()
        assert set(submitted) == {"request_id", "status_url", "response_url", "cancel_url", "queue_position"}
        assert (
            submitted["status_url"] == f"{tls_app.base}/queue/{USER}/worker/requests/{submitted['request_id']}/status"
        )
        status = submitted["status_url"]
        with owner.stream("GET", f"{status}/stream", params={"logs": "1"}, timeout=START) as stream:
            assert stream.headers["content-type"] == "text/event-stream"
            events = [json.loads(line[len("data: ") :]) for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1]["status"] == "COMPLETED", events
        assert "working 3" in [line["message"] for line in events[-1]["logs"]], events
        assert all(e["status"] in ("IN_QUEUE", "IN_PROGRESS") for e in events[:-1]), events
        log = events[-1]["logs"][0]
        assert set(log) == {"message", "level", "source", "timestamp"} and log["source"] == "stdout", log

        result = owner.get(submitted["response_url"])
        assert result.status_code == 200 and result.json() == {"n": 3, "doubled": 6}
        assert result.headers["content-type"] == "application/json"
        assert result.headers["x-fal-request-id"] == submitted["request_id"]
        assert anonymous.get(status).status_code == 401
        reply = stranger.get(status)
        assert reply.status_code == 403 and USER in reply.json()["detail"], reply.text
        with tls_app.client(admin) as admin_client:
            assert admin_client.get(status).status_code == 200, "an admin reads any request"
        assert owner.get(status.replace("/worker/", "/other-app/")).status_code == 404
        assert owner.get(f"/queue/{USER}/worker/requests/no-such-id/status").status_code == 404
        assert owner.get(f"{status}/../../nothing/x/y").status_code == 404
        assert owner.post(submitted["cancel_url"]).status_code != 202, "cancel is a PUT"


def test_a_restart_loses_no_queued_request_and_runs_the_running_one_again(tmp_path: Path) -> None:
    receiver = Receiver(fail=1000)
    server = start_server(log=tmp_path / "server.log")
    data_dir = server.data_dir
    try:
        app = deploy(server, None)
        with app.client(app.key) as client:
            # A webhook whose receiver always fails: its first attempts are made before the stop, the rest after.
            hooked = client.post(f"/queue/{USER}/worker", params={"fal_webhook": receiver.url}, json={"n": 0})
            hook = urllib.parse.urlsplit(hooked.json()["status_url"]).path.replace("/status", "/webhook")
            urls = []
            for n, sleep in ((1, 30), (2, 0), (3, 0)):
                reply = client.post(f"/queue/{USER}/worker", json={"n": n, "sleep": sleep})
                assert reply.status_code == 200, reply.text
                urls.append(urllib.parse.urlsplit(reply.json()["status_url"]).path)
            wait_status(client, urls[0], "IN_PROGRESS")
            positions = [client.get(url).json().get("queue_position") for url in urls[1:]]
            assert positions == [0, 1], positions
            before_stop = len(receiver.wait(1))
    finally:
        server.stop()
    stopped_at = time.time()
    server = start_server(data_dir=data_dir, log=tmp_path / "server.log")
    try:
        admin = {"admin_id": app.server.admin_id, "admin_secret": app.server.admin_secret}
        app = dataclasses.replace(app, server=dataclasses.replace(server, **admin))
        with app.client(app.key) as client:
            # The running request is back in its place, first; the others wait behind it as before.
            first = client.get(urls[0]).json()
            if first["status"] == "IN_QUEUE":
                assert first["queue_position"] == 0, first
            later = [client.get(url).json() for url in urls[1:]]
            assert [s["status"] for s in later] == ["IN_QUEUE"] * 2, later
            assert [s["queue_position"] for s in later] == [1, 2] or first["status"] == "IN_PROGRESS", later
            for n, path in enumerate(urls, start=1):
                done = wait_status(client, path, "COMPLETED", timeout=START)
                assert "error" not in done, done
                result = client.get(path[: -len("/status")])
                assert result.json() == {"n": n, "doubled": 2 * n}, result.text
            # The webhook's delivery went on after the restart, to its last attempt, every one recorded.
            record = client.get(hook).json()
            assert record["state"] == "failed" and [a["attempt"] for a in record["attempts"]] == [1, 2, 3, 4, 5]
            assert all(a["status_code"] == 500 for a in record["attempts"]), record
            assert before_stop < 5 and len(receiver.posts) == 5, (before_stop, receiver.posts)
            assert max(receiver.times) > stopped_at, "attempts were made after the restart"
    finally:
        server.stop()


def test_requests_queued_for_an_app_that_is_deleted_fail_saying_so(tmp_path: Path) -> None:
    server = start_server(log=tmp_path / "server.log")
    try:
        app = deploy(server, None)
        with app.client(app.key) as client:
            running = client.post(f"/queue/{USER}/worker", json={"n": 1, "sleep": 20}).json()
            queued = client.post(f"/queue/{USER}/worker", json={"n": 2}).json()
            wait_status(client, urllib.parse.urlsplit(running["status_url"]).path, "IN_PROGRESS")
            env = script_env(app.env())
            proc = subprocess.run(
                [FAL_SERVERLESS, "apps", "delete", "worker"], env=env, capture_output=True, text=True, timeout=60
            )
            assert proc.returncode == 0, proc.stderr
            # The running request may finish (a deleted app's replicas end what they serve); the queued one is
            # never sent.
            for submitted in (running, queued):
                wait_status(client, urllib.parse.urlsplit(submitted["status_url"]).path, "COMPLETED", timeout=60)
            done = client.get(urllib.parse.urlsplit(queued["status_url"]).path).json()
            assert done.get("error_type") == "app_deleted" and "deleted" in done["error"], done
            result = client.get(urllib.parse.urlsplit(queued["response_url"]).path)
            assert result.status_code == 410 and "deleted" in result.json()["detail"], result.text
    finally:
        server.stop()
