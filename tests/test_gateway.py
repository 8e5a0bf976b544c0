"""Web endpoints: apps deployed by the original fal-serverless 0.6.41 client (`fal-serverless function serve`, from
PyPI), called over HTTP through the server's gateway with a real HTTP client (httpx).

The original CLI asks `GET https://rest.<host>/billing/user_details` (plain http under ISOLATE_TEST_MODE) on port 80
before it deploys: its processes run in a mount namespace where `/etc/hosts` names `api.fal-serverless.test` (gRPC,
the server's port through FAL_PORT) and `rest.fal-serverless.test` (127.0.0.3, where this module relays port 80 to
the server's port, which serves HTTP too).
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import httpx
import pytest
from conftest import Server, cloud_call, relay, script_env, start_server, venv_with

HOSTNAME = "api.fal-serverless.test"
REST_ADDRESS = "127.0.0.3"
WITH_HOSTS = 'mount --bind "$0" /etc/hosts && exec "$@"'

APPS = """
import time

from fal_serverless import isolated
from pydantic import BaseModel


class Order(BaseModel):
    item: str
    count: int = 1


@isolated(serve=True, keep_alive=5)
def hello(name: str = "world"):
    print("serving", name)
    return {"hello": name}


@isolated(serve=True, keep_alive=5)
def shop(order: Order, discount: float = 0.0):
    return {"item": order.item, "total": order.count * 10 * (1 - discount)}


@isolated(serve=True, keep_alive=3, max_concurrency=4)
def slow(seconds: float = 0.5):
    import socket
    import time

    time.sleep(seconds)
    return {"host": socket.gethostname()}


@isolated(serve=True, keep_alive=5, max_concurrency=1)
def single(seconds: float = 0.0):
    import time

    time.sleep(seconds)
    return {"slept": seconds}


@isolated(serve=True, keep_alive=5)
def boom(fail: bool = True):
    if fail:
        raise ValueError("the app raised this")
    return {"ok": True}


@isolated(serve=True, keep_alive=5, machine_type="XS")
def hog(mb: int = 1):
    data = bytearray(mb * 1024 * 1024)
    for i in range(0, len(data), 4096):
        data[i] = 1
    return {"bytes": len(data)}


@isolated(serve=True, keep_alive=5)
def version_one():
    return {"version": 1}


@isolated(serve=True, keep_alive=5)
def version_two():
    return {"version": 2}


@isolated(exposed_port=8080, keep_alive=5, requirements=["websockets==13.1"])
def echo_socket():
    # A websocket server of its own.
    from websockets.sync.server import serve

    def echo(websocket):
        for message in websocket:
            websocket.send("echo: " + message)

    with serve(echo, "0.0.0.0", 8080) as server:
        server.serve_forever()


@isolated(exposed_port=8080, keep_alive=5)
def events():
    # Its own server (exposed_port): server-sent events, one every 0.4 s, each flushed as it is written.
    import http.server
    import time

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(5):
                chunk = f"data: {i} {time.time()}\\n\\n".encode()
                self.wfile.write(b"%x\\r\\n%s\\r\\n" % (len(chunk), chunk))
                self.wfile.flush()
                time.sleep(0.4)
            self.wfile.write(b"0\\r\\n\\r\\n")

        do_POST = do_GET

    http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
"""


class Relay:
    """Port 80 of `address`, relayed to `target`: the REST host the original CLI asks."""

    def __init__(self, address: str, target: Tuple[str, int]) -> None:
        self.process = relay(target, (address, 80))

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@dataclass
class Gateway:
    server: Server
    python: Path
    hosts: Path
    apps: Path
    users: Dict[str, Tuple[str, str]]

    @property
    def base(self) -> str:
        return f"http://{self.server.host}"

    def url(self, user: str, app: str, path: str = "") -> str:
        return f"{self.base}/apps/{user}/{app}{path}"

    def headers(self, user: str) -> Dict[str, str]:
        key_id, secret = self.users[user]
        return {"Authorization": f"Key {key_id}:{secret}"}

    def original(self, user: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Runs the original `fal-serverless` command as `user`."""
        key_id, secret = self.users[user]
        env = script_env(
            {
                "ISOLATE_TEST_MODE": "1",
                "FAL_HOST": HOSTNAME,
                "FAL_PORT": self.server.host.rsplit(":", 1)[1],
                "FAL_KEY_ID": key_id,
                "FAL_KEY_SECRET": secret,
            }
        )
        command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", WITH_HOSTS, str(self.hosts)]
        command += [str(self.python.with_name("fal-serverless")), *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=self.apps.parent)

    def deploy(self, user: str, function: str, alias: str, auth: str = "private") -> str:
        """Deploys `function` of APPS as `alias` with the original CLI; returns the revision id."""
        proc = self.original(user, "function", "serve", str(self.apps), function, "--alias", alias, "--auth", auth)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        found = re.search(r"revision='([0-9a-f-]{36})'", proc.stdout.replace("\n", ""))
        assert found, proc.stdout
        return found.group(1)

    def workers(self, user: str) -> List[Dict[str, str]]:
        return [w for w in self.server.workers() if w["user"] == user]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    python = venv_with(tmp_path_factory, "fal-serverless-0.6.41-gateway", "fal-serverless==0.6.41")
    files = tmp_path_factory.mktemp("gateway")
    hosts = files / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {HOSTNAME}\n{REST_ADDRESS} rest.fal-serverless.test\n")
    apps = files / "apps.py"
    apps.write_text(APPS)
    server = start_server()
    host, port = server.host.rsplit(":", 1)
    relay = Relay(REST_ADDRESS, (host, int(port)))
    users = {name: server.create_key(name) for name in ("alice", "bob", "carol", "dave", "erin", "frank")}
    users["admin"] = (server.admin_id, server.admin_secret)
    yield Gateway(server, python, hosts, apps, users)
    relay.close()
    server.stop()


def test_the_original_cli_deploys_an_app_lists_it_and_shows_its_logs(gateway: Gateway) -> None:
    revision = gateway.deploy("alice", "hello", "hello", auth="public")
    response = httpx.post(gateway.url("alice", "hello"), params={"name": "bob"}, timeout=300)
    assert response.status_code == 200, response.text
    assert response.json() == {"hello": "bob"}
    assert response.headers["x-fal-request-id"]
    # The URL the original CLI prints, `https://<user>-<alias>.gateway.<host>`, reaches it too (for a wildcard DNS
    # name pointing at the server): here, by its Host header.
    by_host = {"Host": "alice-hello.gateway.fal-serverless.test"}
    response = httpx.post(f"{gateway.base}/", params={"name": "host"}, headers=by_host, timeout=60)
    assert response.status_code == 200 and response.json() == {"hello": "host"}, response.text

    listed = gateway.original("alice", "alias", "list")
    assert listed.returncode == 0, listed.stderr
    assert "hello" in listed.stdout and revision in listed.stdout and "public" in listed.stdout, listed.stdout

    # The original drops everything after a colon of the URL (its port, and the path with it): the app's path on a
    # host without a port, or its own URL shape.
    logs = gateway.original("alice", "function", "logs", "--url", "https://gateway.example/apps/alice/hello")
    assert logs.returncode == 0, logs.stderr
    assert "serving bob" in logs.stdout, logs.stdout
    # The original's own URL shape for the same app.
    logs = gateway.original("alice", "function", "logs", "--url", "https://alice-hello.gateway.fal-serverless.test")
    assert "serving bob" in logs.stdout, logs.stdout
    # Another user sees none of it.
    assert "hello" not in gateway.original("bob", "alias", "list").stdout


def test_query_parameters_and_a_pydantic_body_bind_as_fastapi_binds_them(gateway: Gateway) -> None:
    gateway.deploy("alice", "shop", "shop")
    url, headers = gateway.url("alice", "shop"), gateway.headers("alice")
    response = httpx.post(url, params={"discount": 0.5}, json={"item": "pen", "count": 3}, headers=headers, timeout=300)
    assert response.status_code == 200, response.text
    assert response.json() == {"item": "pen", "total": 15.0}
    # FastAPI's own validation error passes through as it is.
    response = httpx.post(url, json={"count": "many"}, headers=headers, timeout=60)
    assert response.status_code == 422, response.text
    assert "item" in response.text


@pytest.mark.parametrize(
    "auth, allowed",
    [
        ("private", {"owner", "admin"}),
        ("shared", {"owner", "admin", "other"}),
        ("public", {"owner", "admin", "other", "none", "wrong"}),
    ],
)
def test_each_auth_mode_takes_the_keys_it_should(gateway: Gateway, auth: str, allowed: set) -> None:
    alias = f"hello-{auth}"
    gateway.deploy("carol", "hello", alias, auth=auth)
    key_id = gateway.users["carol"][0]
    callers: Dict[str, Optional[Dict[str, str]]] = {
        "owner": gateway.headers("carol"),
        "admin": gateway.headers("admin"),
        "other": gateway.headers("dave"),
        "none": None,
        "wrong": {"Authorization": f"Key {key_id}:not-the-secret"},
    }
    for name, headers in callers.items():
        response = httpx.post(gateway.url("carol", alias), params={"name": name}, headers=headers, timeout=300)
        if name in allowed:
            assert response.status_code == 200, (name, response.text)
            assert response.json() == {"hello": name}
        else:
            assert response.status_code == 401, (name, response.text)
            body = response.json()
            assert body["error"] in {"missing_key", "wrong_key"}, body
            assert "key" in body["detail"].lower(), body


def test_unknown_apps_and_paths_are_json_404s(gateway: Gateway) -> None:
    response = httpx.post(gateway.url("carol", "no-such-app"), headers=gateway.headers("carol"))
    assert response.status_code == 404
    assert "no app" in response.json()["detail"]
    response = httpx.get(f"{gateway.base}/elsewhere")
    assert response.status_code == 404
    assert "/apps/<user>/<alias>" in response.json()["detail"]
    response = httpx.get(f"{gateway.base}/billing/user_details")
    assert response.status_code == 401


def test_forty_concurrent_requests_run_on_exactly_max_concurrency_replicas_that_go_back_to_zero(
    gateway: Gateway,
) -> None:
    gateway.deploy("erin", "slow", "slow")
    url, headers = gateway.url("erin", "slow"), gateway.headers("erin")

    def call(_: int) -> str:
        response = httpx.post(url, params={"seconds": 0.5}, headers=headers, timeout=300)
        assert response.status_code == 200, response.text
        return str(response.json()["host"])

    with ThreadPoolExecutor(40) as pool:
        hosts = list(pool.map(call, range(40)))
    assert len(hosts) == 40
    assert len(set(hosts)) == 4, f"the requests ran on {len(set(hosts))} replicas: {sorted(set(hosts))}"
    assert len(gateway.workers("erin")) == 4
    # keep_alive=3: idle replicas stop, and the app is back to zero.
    deadline = time.time() + 30
    while gateway.workers("erin") and time.time() < deadline:
        time.sleep(0.5)
    assert gateway.workers("erin") == []


def test_a_streamed_response_arrives_as_it_is_written(gateway: Gateway) -> None:
    gateway.deploy("alice", "events", "events")
    arrivals: List[float] = []
    with httpx.stream("GET", gateway.url("alice", "events"), headers=gateway.headers("alice"), timeout=300) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"] == "text/event-stream"
        for line in stream.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.time())
    assert len(arrivals) == 5
    # Written 0.4 s apart: had the gateway buffered the body, they would arrive together.
    assert arrivals[-1] - arrivals[0] > 1.0, arrivals


def test_an_app_that_raises_answers_500_and_the_server_keeps_serving(gateway: Gateway) -> None:
    gateway.deploy("alice", "boom", "boom")
    url, headers = gateway.url("alice", "boom"), gateway.headers("alice")
    response = httpx.post(url, headers=headers, timeout=300)
    assert response.status_code == 500
    response = httpx.post(url, params={"fail": False}, headers=headers, timeout=60)
    assert response.status_code == 200 and response.json() == {"ok": True}
    logs = gateway.original("alice", "function", "logs", "--url", "https://alice-boom.gateway.example")
    assert "ValueError: the app raised this" in logs.stdout, logs.stdout


def test_a_replica_out_of_memory_is_a_502_naming_its_machine_type(gateway: Gateway) -> None:
    gateway.deploy("frank", "hog", "hog")
    url, headers = gateway.url("frank", "hog"), gateway.headers("frank")
    assert httpx.post(url, params={"mb": 1}, headers=headers, timeout=300).status_code == 200
    response = httpx.post(url, params={"mb": 1024}, headers=headers, timeout=300)
    assert response.status_code == 502, response.text
    detail = response.json()["detail"]
    assert "XS" in detail and "256 MB" in detail, detail
    # A new replica serves the next request.
    response = httpx.post(url, params={"mb": 1}, headers=headers, timeout=300)
    assert response.status_code == 200, response.text


def test_a_new_revision_takes_the_alias_while_the_old_revision_id_still_answers(gateway: Gateway) -> None:
    first = gateway.deploy("dave", "version_one", "versioned")
    headers = gateway.headers("dave")
    assert httpx.post(gateway.url("dave", "versioned"), headers=headers, timeout=300).json() == {"version": 1}
    second = gateway.deploy("dave", "version_two", "versioned")
    assert second != first
    assert httpx.post(gateway.url("dave", "versioned"), headers=headers, timeout=300).json() == {"version": 2}
    assert httpx.post(gateway.url("dave", first), headers=headers, timeout=300).json() == {"version": 1}
    assert httpx.post(gateway.url("dave", second), headers=headers, timeout=300).json() == {"version": 2}
    listed = gateway.original("dave", "alias", "list").stdout
    assert second in listed and first not in listed, listed


def test_a_bad_alias_is_refused_with_what_to_use(gateway: Gateway) -> None:
    proc = gateway.original("alice", "function", "serve", str(gateway.apps), "hello", "--alias", "no/slash")
    # (The original prints the server's error and exits 0.)
    assert "Registered" not in proc.stdout
    assert "letters, digits" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def websocket_echo(host: str, path: str, headers: Dict[str, str], messages: List[str]) -> List[str]:
    """Opens a websocket at `path` (RFC 6455, by hand: the handshake, masked text frames out, frames in) and returns
    what the server answers to each of `messages`."""
    import base64
    import os
    import struct

    address, port = host.rsplit(":", 1)
    with socket.create_connection((address, int(port)), timeout=300) as connection:
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade"]
        lines += [f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        reader = connection.makefile("rb")
        status = reader.readline()
        assert b" 101 " in status, status + reader.read(2000)
        while reader.readline() not in (b"\r\n", b""):
            pass
        answers = []
        for message in messages:
            payload, mask = message.encode(), os.urandom(4)
            masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            connection.sendall(struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + masked)
            first, length = reader.read(2)
            assert first & 0x0F == 1, first
            answers.append(reader.read(length & 0x7F).decode())
        return answers


def test_a_websocket_passes_through_the_gateway(gateway: Gateway) -> None:
    gateway.deploy("alice", "echo_socket", "sockets")
    answers = websocket_echo(gateway.server.host, "/apps/alice/sockets/", gateway.headers("alice"), ["one", "two"])
    assert answers == ["echo: one", "echo: two"]


def test_apps_survive_a_server_restart(gateway: Gateway, tmp_path: Path) -> None:
    server = start_server()
    host, port = server.host.rsplit(":", 1)
    relay = Relay("127.0.0.4", (host, int(port)))
    try:
        hosts = tmp_path / "hosts"
        hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {HOSTNAME}\n127.0.0.4 rest.fal-serverless.test\n")
        key = server.create_key("grace")
        revision = Gateway(server, gateway.python, hosts, gateway.apps, {"grace": key}).deploy(
            "grace", "hello", "kept", auth="shared"
        )
        server.stop()
        server = start_server(data_dir=server.data_dir)
        headers = {"Authorization": f"Key {key[0]}:{key[1]}"}
        for app in ("kept", revision):
            response = httpx.post(
                f"http://{server.host}/apps/grace/{app}", params={"name": app}, headers=headers, timeout=300
            )
            assert response.status_code == 200, response.text
            assert response.json() == {"hello": app}
    finally:
        relay.close()
        server.stop()


def test_another_users_worker_cannot_reach_a_replica_except_through_the_gateway(gateway: Gateway) -> None:
    gateway.deploy("alice", "hello", "private-hello")
    response = httpx.post(gateway.url("alice", "private-hello"), headers=gateway.headers("alice"), timeout=300)
    assert response.status_code == 200, response.text
    replica = next(w for w in gateway.workers("alice") if w["busy"] == "true")
    # The server's side (the host) reaches it: it listens.
    socket.create_connection((replica["address"], 8080), timeout=3).close()
    body = f"""
import socket
try:
    socket.create_connection(({replica["address"]!r}, 8080), timeout=3).close()
    return "reached"
except OSError as error:
    return "refused: " + type(error).__name__
"""
    proc = cloud_call(gateway.server, body, gateway.users["bob"])
    assert proc.returncode == 0, proc.stderr
    assert "refused" in proc.stdout, proc.stdout


def test_no_replica_within_the_requests_timeout_is_a_503_with_retry_after(gateway: Gateway) -> None:
    gateway.deploy("bob", "single", "single")
    url, headers = gateway.url("bob", "single"), gateway.headers("bob")
    assert httpx.post(url, headers=headers, timeout=300).status_code == 200
    with ThreadPoolExecutor(1) as pool:
        # Its one replica (max_concurrency=1) is held for 5 s...
        held = pool.submit(httpx.post, url, params={"seconds": 5}, headers=headers, timeout=300)
        time.sleep(1)
        # ...so a request that waits at most 1 s for one is told to come back.
        response = httpx.post(url, headers={**headers, "X-Fal-Request-Timeout": "1"}, timeout=60)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "5"
        assert response.json()["error"] == "no_replica"
        assert held.result().status_code == 200


def test_hostile_paths_get_json_errors_and_reach_no_app(gateway: Gateway) -> None:
    headers = gateway.headers("carol")
    cases = [
        "/apps/carol/%2e%2e/%2e%2e/billing/user_details",
        "/apps/carol/<script>alert(1)</script>",
        "/apps/" + "x" * 5000 + "/app",
        "/apps/../billing/user_details",
    ]
    with httpx.Client(base_url=gateway.base, timeout=60) as client:
        for path in cases:
            # Sent as written: httpx would resolve `..` itself.
            request = client.build_request("POST", path, headers=headers)
            request.url = request.url.copy_with(raw_path=path.encode())
            response = client.send(request)
            assert response.status_code in (400, 404, 405), (path, response.status_code, response.text)
            assert response.headers["content-type"].startswith("application/json"), (path, response.headers)
        # The server still serves.
        assert client.get("/billing/user_details", headers=headers).status_code == 200
