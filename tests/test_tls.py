"""TLS: a server with a CA and certificate made by `fal-serverless server init --tls-self-signed`, called by our SDK
and CLI and by the original fal-serverless 0.6.41 client (grpcio), with the right CA, a wrong one, and the wrong
protocol either way (plaintext to the TLS port, TLS to a plaintext port). Every error must say what to change.

The original client insists its FAL_HOST starts with `api`: as in test_original_client.py, its processes (and ours,
where a non-loopback name is needed) run in a mount namespace of their own whose /etc/hosts names
`api.fal-serverless.test` as 127.0.0.1. No traffic leaves the machine.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
from conftest import FAL_SERVERLESS, ROOT, Server, run_script, script_env, start_server, venv_with
from test_original_client import HOSTNAME, VERSION, WITH_HOSTS

CALL = """
from fal_serverless import isolated, cloud
@isolated(host=cloud, keep_alive=0)
def f():
    return "over tls"
print(f())
"""

ORIGINAL_CALL = """
from fal_serverless import isolated

@isolated(keep_alive=0)
def f():
    return "original over tls"

print(f())
"""


@dataclasses.dataclass
class TlsServer:
    server: Server
    ca: Path
    log: Path

    @property
    def port(self) -> str:
        return self.server.host.rsplit(":", 1)[1]

    def env(self, host: str, ca: Optional[Path] = None) -> Dict[str, str]:
        """Our client's variables: `host` (with `{port}` filled in), the admin key, and the CA to trust."""
        env = self.server.env()
        env["FAL_HOST"] = host.format(port=self.port)
        if ca is not None:
            env["FAL_SERVERLESS_CA_FILE"] = str(ca)
        return env


def self_signed(*names: str) -> Tuple[Path, Dict[str, str], Path]:
    """A data dir set up by `server init --tls-self-signed names`: the dir, its first key, and a copy of its CA (as
    a user copies it to the clients' machines)."""
    data_dir = Path(tempfile.mkdtemp(prefix="fal-serverless-test-tls-"))
    init = subprocess.run(
        [FAL_SERVERLESS, "server", "init", "--data-dir", str(data_dir), "--tls-self-signed", *names],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert init.returncode == 0, init.stderr
    assert f"{data_dir}/tls/ca.pem" in init.stdout and "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH" in init.stdout, init.stdout
    key = dict(line.split("=", 1) for line in init.stdout.splitlines() if line.startswith("FAL_KEY_"))
    ca = Path(tempfile.mkdtemp(prefix="fal-serverless-test-ca-")) / "ca.pem"
    ca.write_bytes((data_dir / "tls" / "ca.pem").read_bytes())
    return data_dir, key, ca


@pytest.fixture(scope="module")
def tls() -> Iterator[TlsServer]:
    data_dir, key, ca = self_signed("localhost", "127.0.0.1", HOSTNAME)
    log = data_dir.parent / f"{data_dir.name}.log"
    # Started with the data dir alone: the pair `init` made there is used by default.
    server = start_server(data_dir=data_dir, log=log)
    assert server.host.startswith("https://127.0.0.1:"), server.host
    server = dataclasses.replace(server, admin_id=key["FAL_KEY_ID"], admin_secret=key["FAL_KEY_SECRET"])
    yield TlsServer(server, ca, log)
    server.stop()


@pytest.fixture(scope="module")
def wrong_ca() -> Path:
    """The CA of another server's `init --tls-self-signed`."""
    return self_signed("localhost")[2]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hosts = tmp_path_factory.mktemp("tls-hosts") / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {HOSTNAME}\n")
    return hosts


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Python of a virtualenv with fal-serverless 0.6.41 from PyPI."""
    return venv_with(tmp_path_factory, "fal-serverless-0.6.41-tls", VERSION)


def with_hosts(
    hosts: Path, argv: List[str], env: Dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Runs `argv` where /etc/hosts is `hosts` (user and mount namespaces of its own; no root needed)."""
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", WITH_HOSTS, str(hosts), *argv]
    return subprocess.run(command, env=script_env(env), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def run_original(python: Path, hosts: Path, server: Server, port: str, extra: Dict[str, str]) -> str:
    """Runs ORIGINAL_CALL with the original client against `port`; returns its output (stdout and stderr)."""
    script = hosts.with_name(f"original-{time.monotonic_ns()}.py")
    script.write_text(ORIGINAL_CALL)
    env = {"FAL_HOST": f"{HOSTNAME}:{port}", "FAL_KEY_ID": server.admin_id, "FAL_KEY_SECRET": server.admin_secret}
    proc = with_hosts(hosts, [str(python), str(script)], {**env, **extra})
    return proc.stdout + proc.stderr


def logged(log: Path, text: str, timeout: float = 10) -> bool:
    """Whether the server's log says `text` (it writes from its own threads: waits a little)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in log.read_text(errors="replace"):
            return True
        time.sleep(0.1)
    return False


def test_our_sdk_and_cli_call_over_tls_trusting_the_ca(tls: TlsServer) -> None:
    for host in ("https://127.0.0.1:{port}", "https://localhost:{port}"):
        proc = run_script(CALL, tls.env(host, tls.ca))
        assert proc.returncode == 0 and proc.stdout == "over tls\n", proc.stderr
    # A bare loopback host: plaintext first, which this port answers with "TLS only"; the client switches to TLS.
    proc = run_script(CALL, tls.env("127.0.0.1:{port}", tls.ca))
    assert proc.returncode == 0 and proc.stdout == "over tls\n", proc.stderr
    cli = subprocess.run(
        [FAL_SERVERLESS, "keys", "list"],
        env=script_env(tls.env("https://localhost:{port}", tls.ca)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0 and "first admin key" in cli.stdout, cli.stderr
    # The probe of a client that then switched is not reported as a plaintext client.
    assert "a plaintext gRPC client called this TLS port" not in tls.log.read_text()


def test_our_client_refuses_a_certificate_its_ca_did_not_sign_saying_which_variable_to_set(
    tls: TlsServer, wrong_ca: Path
) -> None:
    for ca in (wrong_ca, None):
        proc = run_script(CALL, tls.env("https://127.0.0.1:{port}", ca))
        assert proc.returncode != 0
        assert "ServerUnavailableError" in proc.stderr, proc.stderr
        assert "presented a certificate this client does not trust (UnknownIssuer)" in proc.stderr, proc.stderr
        assert "set FAL_SERVERLESS_CA_FILE to the CA file that signed it" in proc.stderr, proc.stderr
    not_pem = tls.ca.with_name("not-a-ca.txt")
    not_pem.write_text("hello")
    proc = run_script(CALL, tls.env("https://127.0.0.1:{port}", not_pem))
    assert "NoServerConfiguredError" in proc.stderr and "holds no PEM certificate" in proc.stderr, proc.stderr


def test_a_certificate_for_other_names_is_a_clear_error(tmp_path: Path) -> None:
    # A certificate for a name alone, passed with --tls-cert/--tls-key to a server of another data dir.
    made, _, ca = self_signed(HOSTNAME)
    tls_dir = made / "tls"
    server = start_server("--tls-cert", str(tls_dir / "server.pem"), "--tls-key", str(tls_dir / "server.key"))
    try:
        assert server.host.startswith("https://")
        port = server.host.rsplit(":", 1)[1]
        env = {**server.env(), "FAL_HOST": f"https://127.0.0.1:{port}", "FAL_SERVERLESS_CA_FILE": str(ca)}
        proc = run_script(CALL, env)
        assert "presented a certificate for other names" in proc.stderr, proc.stderr
        assert "connect with a name the certificate holds" in proc.stderr, proc.stderr
    finally:
        server.stop()


def test_the_original_client_calls_over_tls_with_grpcs_roots_variable(
    tls: TlsServer, original: Path, hosts: Path
) -> None:
    # No ISOLATE_TEST_MODE: the original client's own TLS (grpcio), trusting the CA through gRPC's variable.
    output = run_original(original, hosts, tls.server, tls.port, {"GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(tls.ca)})
    assert "original over tls" in output.splitlines(), output


def test_the_original_client_with_a_wrong_ca_fails_and_the_server_says_why(
    tls: TlsServer, original: Path, hosts: Path, wrong_ca: Path
) -> None:
    output = run_original(original, hosts, tls.server, tls.port, {"GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(wrong_ca)})
    # grpcio's own words ("Could not reach"): it hangs up without saying why; the server's log does.
    assert "original over tls" not in output and "FalServerlessError" in output, output
    assert logged(tls.log, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH to the CA that signed it"), tls.log.read_text()


def test_plaintext_clients_at_the_tls_port_are_told_to_use_tls(tls: TlsServer, original: Path, hosts: Path) -> None:
    proc = run_script(CALL, tls.env("http://127.0.0.1:{port}"))
    assert "ServerUnavailableError" in proc.stderr, proc.stderr
    assert f"speaks TLS only: connect with https://127.0.0.1:{tls.port}" in proc.stderr, proc.stderr
    # The original client in its plaintext mode shows the server's message as its error.
    output = run_original(original, hosts, tls.server, tls.port, {"ISOLATE_TEST_MODE": "1"})
    assert f"speaks TLS only: connect with https://{HOSTNAME}:{tls.port}" in output, output
    assert "unset ISOLATE_TEST_MODE and set GRPC_DEFAULT_SSL_ROOTS_FILE_PATH" in output, output
    assert logged(tls.log, "a plaintext gRPC client called this TLS port"), tls.log.read_text()


def test_tls_clients_at_a_plaintext_port_are_told_it_is_plaintext(original: Path, hosts: Path) -> None:
    log = Path(tempfile.mkdtemp(prefix="fal-serverless-test-plain-")) / "server.log"
    plain = start_server(log=log)
    try:
        port = plain.host.rsplit(":", 1)[1]
        proc = run_script(CALL, {**plain.env(), "FAL_HOST": f"https://127.0.0.1:{port}"})
        assert "ServerUnavailableError" in proc.stderr, proc.stderr
        assert f"speaks plaintext gRPC, not TLS: write FAL_HOST as http://127.0.0.1:{port}" in proc.stderr, proc.stderr
        # A bare name that is not loopback is reached with TLS (plaintext only where safe or asked for).
        bare = {**plain.env(), "FAL_HOST": f"{HOSTNAME}:{port}"}
        proc = with_hosts(hosts, [sys.executable, "-c", CALL], bare)
        assert f"the server at https://{HOSTNAME}:{port} speaks plaintext gRPC" in proc.stderr, proc.stderr
        # ...unless ISOLATE_TEST_MODE says plaintext, as for the original client.
        proc = with_hosts(hosts, [sys.executable, "-c", CALL], {**bare, "ISOLATE_TEST_MODE": "1"})
        assert proc.returncode == 0 and proc.stdout == "over tls\n", proc.stderr
        # The original client without ISOLATE_TEST_MODE speaks TLS: it fails, and the server's log says why.
        output = run_original(original, hosts, plain, port, {})
        assert "original over tls" not in output, output
        assert logged(log, "a TLS client connected to this plaintext port"), log.read_text()
    finally:
        plain.stop()
