"""Web endpoints end to end, from the SDK and CLI side: deploying with `fn.serve` and `fal-serverless function serve`
against the real server, calling the URL they print with a real HTTP client (httpx), `apps list|delete` and `logs`.
The gateway's and the queue's own behaviour (auth modes, scaling, streaming, failures) is tested in test_gateway*.py
and test_queue*.py."""

from __future__ import annotations

import re
import signal
import ssl
import subprocess
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import httpx
import pytest
from conftest import FAL_SERVERLESS, Server, run_script, script_env, start_server

#: A first request starts a replica (a worker of the app's environment, then uvicorn's own start).
REQUEST_TIMEOUT = 120.0


def key_header(key: Tuple[str, str]) -> Dict[str, str]:
    return {"Authorization": f"Key {key[0]}:{key[1]}"}


def cli(server: Server, key: Tuple[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`fal-serverless ARGS` against `server` with `key` (with room for an environment build)."""
    env = script_env(server.env(*key))
    return subprocess.run([FAL_SERVERLESS, *args], env=env, capture_output=True, text=True, timeout=timeout)


def url_in(output: str) -> str:
    match = re.search(r"^URL: (\S+)$", output, re.MULTILINE)
    assert match, output
    return match.group(1)


def apps_list(server: Server, key: Tuple[str, str]) -> List[Dict[str, str]]:
    proc = cli(server, key, "apps", "list", timeout=60)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    names = [name.lower() for name in header.split()]
    return [dict(zip(names, row.split())) for row in rows]


SERVED = """
from fal_serverless import isolated, _native

@isolated(serve=True, keep_alive=30, max_concurrency=2)
def add(x: int) -> dict:
    print("handled", x, flush=True)
    return {"sum": x + 1}

print("direct", add(1)["sum"])
print("url", add.serve(alias="adder"))
deployment = add.deploy(alias="adder")
print("second", deployment.revision, deployment.url)
print("aliases", [(a[0], a[2], a[3]) for a in _native.CloudClient().list_aliases()])
"""


@pytest.fixture(scope="module")
def served(server: Server) -> Tuple[Tuple[str, str], Dict[str, str]]:
    """`SERVED` run as a user's script: a serve=True function called directly, then deployed twice under one alias.
    Returns the user's key and what the script printed, by first word."""
    key = server.create_key("apps-sdk")
    proc = run_script(SERVED, server.env(*key), timeout=600)
    assert proc.returncode == 0, proc.stderr
    printed = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    return key, printed


def test_a_served_function_is_a_plain_call_when_called_directly(served: Tuple[Tuple[str, str], Dict[str, str]]) -> None:
    assert served[1]["direct"] == "2"


def test_fn_serve_returns_a_url_that_answers_with_the_function(
    server: Server, served: Tuple[Tuple[str, str], Dict[str, str]]
) -> None:
    key, printed = served
    url = printed["url"]
    assert url == f"{server.host if '://' in server.host else 'http://' + server.host}/apps/apps-sdk/adder", url
    # FastAPI binds the simple parameter from the query string, as in the original.
    reply = httpx.post(url, params={"x": 41}, headers=key_header(key), timeout=REQUEST_TIMEOUT)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"sum": 42}
    # The FastAPI app the wrapper builds has permissive CORS.
    preflight = httpx.options(
        url,
        headers={**key_header(key), "Origin": "https://example.com", "Access-Control-Request-Method": "POST"},
        timeout=REQUEST_TIMEOUT,
    )
    assert preflight.headers.get("access-control-allow-origin") == "https://example.com", preflight.headers


def test_deploying_again_makes_a_new_revision_and_both_answer(
    server: Server, served: Tuple[Tuple[str, str], Dict[str, str]]
) -> None:
    key, printed = served
    revision, url = printed["second"].split()
    assert url == printed["url"]
    by_revision = url.rsplit("/", 1)[0] + "/" + revision
    reply = httpx.post(by_revision, params={"x": 1}, headers=key_header(key), timeout=REQUEST_TIMEOUT)
    assert reply.status_code == 200 and reply.json() == {"sum": 2}, reply.text
    assert printed["aliases"] == "[('adder', 'private', 2)]"
    rows = [row for row in apps_list(server, key) if row["alias"] == "adder"]
    assert len(rows) == 1 and rows[0]["revision"] == revision and rows[0]["url"] == url, rows
    assert (rows[0]["auth"], rows[0]["max"], rows[0]["machine"]) == ("private", "2", "XS"), rows


def test_logs_show_what_the_app_printed_and_follow_new_lines(
    server: Server, served: Tuple[Tuple[str, str], Dict[str, str]]
) -> None:
    key, printed = served
    url = printed["url"]
    reply = httpx.post(url, params={"x": 100}, headers=key_header(key), timeout=REQUEST_TIMEOUT)
    assert reply.status_code == 200, reply.text
    deadline = time.time() + 30
    while True:
        proc = cli(server, key, "logs", "adder", "--lines", "1000", timeout=60)
        assert proc.returncode == 0, proc.stderr
        if "handled 100" in proc.stdout or time.time() > deadline:
            break
        time.sleep(0.5)
    line = next((line for line in proc.stdout.splitlines() if line.endswith("handled 100")), None)
    assert line is not None, proc.stdout
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \[adder [0-9a-f-]+\] handled 100$", line), line
    # The same lines from Python: (timestamp, source, app, request_id, line).
    source = (
        "from fal_serverless import _native\n"
        "rows = []\n"
        "_native.CloudClient().logs(alias='adder', lines=1000, follow=False, on_line=lambda *r: rows.append(r))\n"
        "print([r[:3] + (bool(r[3]),) for r in rows if r[4] == 'handled 100'])\n"
    )
    proc = run_script(source, server.env(*key))
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"\[\(\d+\.\d+, 'stdout', 'adder', True\)\]\n", proc.stdout), proc.stdout

    follower = subprocess.Popen(
        [FAL_SERVERLESS, "logs", "adder", "--follow", "--lines", "0"],
        env=script_env(server.env(*key)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen: List[str] = []
        found = threading.Event()

        def read() -> None:
            assert follower.stdout is not None
            for line in follower.stdout:
                seen.append(line)
                if "handled 7" in line:
                    found.set()
                    return

        threading.Thread(target=read, daemon=True).start()
        time.sleep(1)  # the follower's stream is open before the request prints
        reply = httpx.post(url, params={"x": 7}, headers=key_header(key), timeout=REQUEST_TIMEOUT)
        assert reply.status_code == 200, reply.text
        assert found.wait(30), seen
        assert all("handled 100" not in line for line in seen), seen
        # Ctrl-C ends --follow (the console script's Python would otherwise keep it for its own handler).
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=10) in (0, 130)
        assert follower.stderr is not None and "Traceback" not in follower.stderr.read()
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(timeout=10)


OWN_SERVER = """
from fal_serverless import isolated

@isolated(exposed_port=8080, keep_alive=30)
def web():
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"hello from my own server"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()

if __name__ == "__main__":
    raise SystemExit("the deploy must not run the file's main part")
"""


def test_function_serve_deploys_a_file_and_prints_the_url_and_a_call(server: Server, tmp_path: Path) -> None:
    key = server.create_key("apps-cli")
    path = tmp_path / "own.py"
    path.write_text(textwrap.dedent(OWN_SERVER))
    proc = cli(server, key, "function", "serve", str(path), "web", "--alias", "own", "--auth", "public")
    assert proc.returncode == 0, proc.stderr
    assert re.search(
        r"^Registered a new revision for function 'own' \(revision='[0-9a-f-]{36}'\)\.$", proc.stdout, re.M
    )
    url = url_in(proc.stdout)
    assert url.endswith("/apps/apps-cli/own"), url
    # A public app's call needs no key, and the example says none.
    assert f"curl -X POST {url} -H 'Content-Type: application/json'" in proc.stdout, proc.stdout
    reply = httpx.get(url, timeout=REQUEST_TIMEOUT)
    assert reply.status_code == 200 and reply.text == "hello from my own server", reply.text

    # An anonymous deploy (`fn` is the verb's alias) is reachable by its revision id.
    proc = cli(server, key, "fn", "serve", str(path), "web", "--auth", "shared")
    assert proc.returncode == 0, proc.stderr
    revision = re.search(r"^Registered anonymous function '([0-9a-f-]{36})'\.$", proc.stdout, re.M)
    assert revision, proc.stdout
    assert url_in(proc.stdout).endswith(f"/apps/apps-cli/{revision.group(1)}")
    assert '-H "Authorization: Key $FAL_KEY_ID:$FAL_KEY_SECRET"' in proc.stdout
    reply = httpx.get(url_in(proc.stdout), headers=key_header(key), timeout=REQUEST_TIMEOUT)
    assert reply.status_code == 200 and reply.text == "hello from my own server", reply.text

    rows = apps_list(server, key)
    assert [(r["alias"], r["auth"], r["url"]) for r in rows] == [("own", "public", url)], rows

    proc = cli(server, key, "apps", "delete", "own", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("deleted alias own"), proc.stdout
    assert apps_list(server, key) == []
    assert httpx.get(url, timeout=REQUEST_TIMEOUT).status_code == 404
    proc = cli(server, key, "apps", "delete", "own", timeout=60)
    assert proc.returncode != 0 and "own" in proc.stderr, proc.stderr


def test_function_serve_reports_a_function_that_is_no_web_endpoint(server: Server, tmp_path: Path) -> None:
    key = server.create_key("apps-cli-errors")
    path = tmp_path / "plain.py"
    path.write_text("from fal_serverless import isolated\n\n@isolated()\ndef f():\n    return 1\n")
    proc = cli(server, key, "function", "serve", str(path), "f", timeout=60)
    assert proc.returncode == 1 and "set serve=True" in proc.stderr and "exposed_port=8080" in proc.stderr, proc
    proc = cli(server, key, "function", "serve", str(path), "missing", timeout=60)
    assert proc.returncode == 1 and "'missing' is not defined" in proc.stderr, proc
    proc = cli(server, key, "logs", "nothing-here", timeout=60)
    assert proc.returncode != 0 and "nothing-here" in proc.stderr, proc


def test_the_url_is_https_when_the_client_speaks_tls_to_the_server(tmp_path: Path) -> None:
    """A bare loopback FAL_HOST starts plaintext and switches to TLS when the server speaks only that: the URL the
    deploy prints is then https://, and answers with the server's certificate."""
    data_dir = Path(tempfile.mkdtemp(prefix="fal-serverless-test-apps-tls-"))
    init = subprocess.run(
        [FAL_SERVERLESS, "server", "init", "--data-dir", str(data_dir), "--tls-self-signed", "127.0.0.1"],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert init.returncode == 0, init.stderr
    admin = dict(line.split("=", 1) for line in init.stdout.splitlines() if line.startswith("FAL_KEY_"))
    server = start_server(data_dir=data_dir)
    try:
        assert server.host.startswith("https://127.0.0.1:"), server.host
        port = server.host.rsplit(":", 1)[1]
        path = tmp_path / "own.py"
        path.write_text(textwrap.dedent(OWN_SERVER))
        ca = str(data_dir / "tls" / "ca.pem")
        env = script_env(
            {
                "FAL_HOST": f"127.0.0.1:{port}",
                "FAL_KEY_ID": admin["FAL_KEY_ID"],
                "FAL_KEY_SECRET": admin["FAL_KEY_SECRET"],
                "FAL_SERVERLESS_CA_FILE": ca,
            }
        )
        proc = subprocess.run(
            [FAL_SERVERLESS, "function", "serve", str(path), "web", "--alias", "secure", "--auth", "public"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        url = url_in(proc.stdout)
        assert url == f"https://127.0.0.1:{port}/apps/admin/secure", url
        reply = httpx.get(url, verify=ssl.create_default_context(cafile=ca), timeout=REQUEST_TIMEOUT)
        assert reply.status_code == 200 and reply.text == "hello from my own server", reply.text
    finally:
        server.stop()


PYDANTIC_APP = """
from fal_serverless import isolated
from pydantic import BaseModel


class Order(BaseModel):
    item: str
    count: int = 1


@isolated(serve=True, keep_alive=10)
def shop(order: Order, discount: float = 0.0) -> dict:
    return {"item": order.item, "total": order.count * 10 * (1 - discount)}


print(shop(Order(item="pen", count=2))["total"])
print(shop.serve(alias="shop"))
"""


def test_a_pydantic_body_and_a_query_parameter_bind_through_our_sdk(server: Server) -> None:
    """The model is defined in the user's script: it travels by value, as its definition, and FastAPI in the worker
    binds the JSON body to it."""
    import pydantic  # pydantic 1, from the test extras: what FastAPI 0.99.1 (serve=True) takes

    assert pydantic.VERSION.startswith("1."), f"the test extras pin pydantic 1, found {pydantic.VERSION}"
    key = server.create_key("apps-pydantic")
    proc = run_script(PYDANTIC_APP, server.env(*key), timeout=600)
    assert proc.returncode == 0, proc.stderr
    direct, url = proc.stdout.split()
    assert direct == "20.0"
    reply = httpx.post(
        url,
        params={"discount": 0.5},
        json={"item": "pen", "count": 3},
        headers=key_header(key),
        timeout=REQUEST_TIMEOUT,
    )
    assert reply.status_code == 200 and reply.json() == {"item": "pen", "total": 15.0}, reply.text
    reply = httpx.post(url, json={"count": 3}, headers=key_header(key), timeout=REQUEST_TIMEOUT)
    assert reply.status_code == 422 and reply.json()["detail"][0]["loc"] == ["body", "item"], reply.text


SCALING = """
import time
from fal_serverless import isolated

@isolated(serve=True, keep_alive=2, max_concurrency=1, max_multiplexing=4)
def together(n: int = 4) -> dict:
    # Returns once n requests are in this replica at the same time (FastAPI runs a sync function in its thread
    # pool); a replica that takes fewer at once breaks the barrier: 500.
    import os, sys, threading, types
    holder = sys.modules.setdefault("together_barrier", types.ModuleType("together_barrier"))
    barrier = holder.__dict__.setdefault("barrier", threading.Barrier(n))
    barrier.wait(timeout=30)
    return {"pid": os.getpid()}

@isolated(serve=True, keep_alive=1, min_concurrency=1, max_concurrency=2)
def ready() -> dict:
    import os
    return {"pid": os.getpid()}

@isolated(serve=True, keep_alive=5)
def fails(fail: bool = True) -> dict:
    if fail:
        raise KeyError("no such order")
    return {"ok": True}

print("together", together.serve(alias="together", auth="public"))
print("ready", ready.serve(alias="ready", auth="public"))
print("fails", fails.serve(alias="fails", auth="public"))
"""


@pytest.fixture(scope="module")
def scaling(server: Server) -> Dict[str, str]:
    """`SCALING`'s apps, deployed by user apps-scaling; their URLs by name."""
    key = server.create_key("apps-scaling")
    proc = run_script(SCALING, server.env(*key), timeout=600)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines())


def test_max_multiplexing_lets_one_replica_take_several_requests_at_once(scaling: Dict[str, str]) -> None:
    results: List[httpx.Response] = []

    def call() -> None:
        results.append(httpx.post(scaling["together"], timeout=REQUEST_TIMEOUT))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    # One replica (max_concurrency=1) held the four at once.
    assert len({r.json()["pid"] for r in results}) == 1


def test_min_concurrency_keeps_a_replica_up_past_keep_alive(server: Server, scaling: Dict[str, str]) -> None:
    first = httpx.post(scaling["ready"], timeout=REQUEST_TIMEOUT).json()["pid"]
    time.sleep(4)  # keep_alive=1: without min_concurrency=1 the app would be back to zero replicas by now
    assert [w for w in server.workers() if w["user"] == "apps-scaling"], "no replica is up"
    assert httpx.post(scaling["ready"], timeout=REQUEST_TIMEOUT).json()["pid"] == first, "the replica was replaced"


def test_an_app_that_raises_answers_500_with_its_error_and_keeps_serving(scaling: Dict[str, str]) -> None:
    url = scaling["fails"]
    reply = httpx.post(url, timeout=REQUEST_TIMEOUT)
    assert reply.status_code == 500
    assert reply.json() == {"detail": "KeyError: 'no such order'", "error": "app_raised"}
    reply = httpx.post(url, params={"fail": False}, timeout=REQUEST_TIMEOUT)
    assert reply.status_code == 200 and reply.json() == {"ok": True}


def test_a_server_stopped_with_replicas_running_leaves_nothing_behind() -> None:
    from conftest import descendants, pid_alive, slot_links, slot_namespaces

    # A subnet of its own, so the namespaces counted are this server's.
    server = start_server(config='[network]\nsubnet = "10.252.0.0/24"\n')
    try:
        key = server.create_key("apps-stop")
        source = textwrap.dedent(
            """
            from fal_serverless import isolated

            @isolated(serve=True, keep_alive=600, min_concurrency=1)
            def up() -> dict:
                return {"up": True}

            print(up.serve(alias="up", auth="public"))
            """
        )
        proc = run_script(source, server.env(*key), timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert httpx.post(proc.stdout.strip(), timeout=REQUEST_TIMEOUT).json() == {"up": True}
        replicas = [int(w["pid"]) for w in server.workers() if w["user"] == "apps-stop"]
        assert replicas, "the replica runs"
        assert slot_namespaces("0afc00"), "in a network namespace of its own"
        tree = [*replicas, *(p for r in replicas for p in descendants(r))]
    finally:
        server.stop()
    assert not any(map(pid_alive, tree)), "a replica outlived its server"
    assert not server.cgroups() and not descendants(server.process.pid)
    assert not slot_namespaces("0afc00") and not slot_links("0afc00"), "a stopped server left namespaces or veths"
