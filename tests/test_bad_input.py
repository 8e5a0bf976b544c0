"""Bad input, sent the way users (and broken or hostile clients) send it: each gets a clear error naming the problem,
and the server goes on serving. Raw requests go through the SDK's own gRPC client (`_native.CloudClient`) with
fields no decorator would let through; garbage on the wire goes through a plain socket and through grpcio.

Part of the reliability group (`pytest -m reliability`); the summary counts the bad inputs tried and the clear errors.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Tuple

import cloudpickle
import pytest
from conftest import Server, cloud_call, run_script, start_server
from fal_serverless import _native
from fal_serverless._options import running_python_version
from fal_serverless._serialization import SERIALIZER

pytestmark = pytest.mark.reliability("bad_input")

#: The server's payload limit here: small, so that "too large" is cheap to reach.
LIMIT = 4 << 20


@pytest.fixture(scope="module")
def strict() -> Iterator[Server]:
    server = start_server(env={"FAL_SERVERLESS_MAX_PAYLOAD_BYTES": str(LIMIT)})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key(strict: Server) -> Tuple[str, str]:
    return strict.create_key("bad-input")


@pytest.fixture(autouse=True)
def still_serving(strict: Server, key: Tuple[str, str]) -> Iterator[None]:
    """After every bad input: the server is up and the next good call works."""
    yield
    assert strict.process.poll() is None, "the server died"
    assert cloud_call(strict, "return 'fine'", key).stdout == "'fine'\n"


def raw_run(strict: Server, key: Tuple[str, str], **fields: Any) -> Tuple[bool, bytes]:
    """One Run with the given fields over the SDK's gRPC client: the fields a raw client may send, unchecked."""
    request: Dict[str, Any] = dict(
        python_version=running_python_version(),
        requirements=[],
        serializer=SERIALIZER,
        machine_type="XS",
        keep_alive=5,
        payload=cloudpickle.dumps((lambda: "ran", (), {})),
        function_name="raw",
        on_log=lambda source, line: None,
    )
    request.update(fields)
    saved = {name: os.environ.get(name) for name in ("FAL_HOST", "FAL_KEY_ID", "FAL_KEY_SECRET")}
    os.environ.update(strict.env(*key))
    try:
        return _native.CloudClient().run(**request)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def refused(call: Callable[[], object], error: type, *phrases: str) -> None:
    with pytest.raises(error) as caught:
        call()
    for phrase in phrases:
        assert phrase in str(caught.value), str(caught.value)


def test_a_requirement_that_does_not_parse_in_the_decorator() -> None:
    proc = run_script("from fal_serverless import isolated\nisolated(requirements=['numpy>=>1'])(print)")
    assert "ValueError" in proc.stderr and "numpy>=>1" in proc.stderr, proc.stderr


def test_a_requirement_that_does_not_parse_from_a_raw_client(strict: Server, key: Tuple[str, str]) -> None:
    refused(lambda: raw_run(strict, key, requirements=["numpy>=>1"]), ValueError, "invalid requirement", "numpy>=>1")


def test_a_package_that_does_not_exist(strict: Server, key: Tuple[str, str]) -> None:
    proc = cloud_call(strict, "return 1", key, requirements=["fal-serverless-no-such-package-x9"])
    assert "EnvironmentBuildError" in proc.stderr and "fal-serverless-no-such-package-x9" in proc.stderr


def test_a_version_that_does_not_exist(strict: Server, key: Tuple[str, str]) -> None:
    proc = cloud_call(strict, "return 1", key, requirements=["pyjokes==99.0.0"])
    assert "EnvironmentBuildError" in proc.stderr and "pyjokes==99.0.0" in proc.stderr, proc.stderr


def test_a_python_version_the_server_lacks(strict: Server, key: Tuple[str, str]) -> None:
    refused(
        lambda: raw_run(strict, key, python_version="3.99"),
        _native.EnvironmentBuildError,
        "Python 3.99 is not available on this machine; it has",
    )


def test_a_python_version_that_is_not_one(strict: Server, key: Tuple[str, str]) -> None:
    refused(lambda: raw_run(strict, key, python_version="three"), ValueError, "invalid python version")


def test_an_unknown_machine_type_from_a_raw_client(strict: Server, key: Tuple[str, str]) -> None:
    refused(lambda: raw_run(strict, key, machine_type="XXL"), ValueError, "unknown machine type", "XXL", "XS")


def test_a_message_over_the_size_limit(strict: Server, key: Tuple[str, str]) -> None:
    refused(
        lambda: raw_run(strict, key, payload=b"x" * (LIMIT + 1)),
        _native.PayloadTooLargeError,
        "over the limit of",
    )


def test_a_result_that_is_too_large(strict: Server, key: Tuple[str, str]) -> None:
    proc = cloud_call(strict, f"return b'x' * {LIMIT + 1}", key)
    assert "PayloadTooLargeError" in proc.stderr and "result is" in proc.stderr, proc.stderr


def test_an_unpicklable_result(strict: Server, key: Tuple[str, str]) -> None:
    proc = cloud_call(strict, "import threading\nreturn threading.Lock()", key)
    assert "SerializationError" in proc.stderr and "cannot be pickled" in proc.stderr, proc.stderr


def test_an_unpicklable_argument() -> None:
    proc = run_script(
        "import threading\nfrom fal_serverless import isolated, local\n"
        "@isolated(host=local)\ndef f(x):\n    return 1\nf(threading.Lock())"
    )
    assert "SerializationError" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "payload",
    [b"garbage", cloudpickle.dumps((len, ("abc",), {}))[:-3], pickle.dumps("not a call")],
    ids=["garbage", "truncated", "not-a-call"],
)
def test_a_pickle_that_is_garbage_truncated_or_not_a_call(strict: Server, key: Tuple[str, str], payload: bytes) -> None:
    raised, reply = raw_run(strict, key, payload=payload)
    assert raised
    described = cloudpickle.loads(reply)
    assert described["stage"] == "load" and described["type"], described


def test_bytes_that_are_not_http2(strict: Server) -> None:
    host, port = strict.host.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(os.urandom(4096))
        try:
            while conn.recv(4096):
                pass  # the server answers with an error frame, or nothing, and closes
        except ConnectionResetError:
            pass


GRPC_GARBAGE = """
import sys, grpc
channel = grpc.insecure_channel(sys.argv[1])
run = channel.unary_stream("/controller.IsolateController/Run", request_serializer=None, response_deserializer=None)
auth = [("auth-key-id", sys.argv[2]), ("auth-key", sys.argv[3])]
try:
    for _ in run(b"\\x0a\\xff\\xff\\xff\\xff\\x0f garbage", metadata=auth):
        pass
    print("accepted")
except grpc.RpcError as error:
    print(error.code().name, error.details())
"""


def test_a_garbage_grpc_message(strict: Server, key: Tuple[str, str], original_stubs: Path) -> None:
    proc = subprocess.run([str(original_stubs), "-c", GRPC_GARBAGE, strict.host, *key], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("INTERNAL") and "decode" in proc.stdout, proc.stdout


SECONDS_OUT_OF_RANGE = """
import struct, sys, cloudpickle, grpc
from google.protobuf import struct_pb2
import isolate_proto as pb

host, key_id, key_secret, python = sys.argv[1:5]
run = grpc.insecure_channel(host).unary_stream(
    "/controller.IsolateController/Run", request_serializer=None, response_deserializer=None
)
auth = [("auth-key-id", key_id), ("auth-key", key_secret)]
configuration = struct_pb2.Struct()
configuration.update({"requirements": [], "python_version": python,
                      "serializer": "cloudpickle==" + cloudpickle.__version__})

def request(keep_alive, timeout):
    message = pb.HostedRun(
        environments=[pb.EnvironmentDefinition(kind="virtualenv", configuration=configuration)],
        machine_requirements=pb.MachineRequirements(machine_type="XS", keep_alive=keep_alive),
        function=pb.SerializedObject(method="cloudpickle", definition=cloudpickle.dumps((int, (), {}))),
    ).SerializeToString()
    # timeout_seconds is our extension (field 101, a double), unknown to these stubs: appended as raw bytes.
    return message if timeout is None else message + bytes([0xA9, 0x06]) + struct.pack("<d", timeout)

for keep_alive, timeout in [(-1, None), (5, float("nan")), (5, float("inf")), (5, 1e300), (5, -1.0), (5, 0.0)]:
    try:
        for _ in run(request(keep_alive, timeout), metadata=auth):
            pass
        print("accepted")
    except grpc.RpcError as error:
        print(error.code().name, error.details())
"""


def test_seconds_out_of_range_from_a_raw_client(strict: Server, key: Tuple[str, str], original_stubs: Path) -> None:
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    proc = subprocess.run(
        [str(original_stubs), "-c", SECONDS_OUT_OF_RANGE, strict.host, *key, python],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    timeout = "INVALID_ARGUMENT timeout must be a number of seconds above 0 and at most 2147483647, got"
    assert proc.stdout.splitlines() == [
        "INVALID_ARGUMENT keep_alive must be a number of seconds from 0 to 2147483647, got -1",
        f"{timeout} NaN",
        f"{timeout} inf",
        f"{timeout} 1e300",
        f"{timeout} -1.0",
        f"{timeout} 0.0",
    ], proc.stdout


def test_a_keep_alive_over_the_servers_ceiling_is_cut_and_the_call_says_so() -> None:
    server = start_server(config="[limits]\nmax_keep_alive_seconds = 1\n")
    try:
        key = server.create_key("long-keep-alive")
        proc = cloud_call(server, "return 1", key, keep_alive=600)
        assert proc.stdout == "1\n", proc.stderr
        assert "keep_alive 600 s is more than this server keeps a worker warm; it stays warm 1 s" in proc.stderr
        # And it does: the worker goes within seconds, not ten minutes.
        deadline = time.time() + 30
        while server.workers() and time.time() < deadline:
            time.sleep(0.2)
        assert not server.workers(), "the worker outlived the server's keep_alive ceiling"
    finally:
        server.stop()


MAP_HOSTILE = """
import sys, cloudpickle, grpc
from google.protobuf import struct_pb2
import isolate_proto as pb

host, key_id, key_secret, revoked_id, revoked_secret, python = sys.argv[1:7]
channel = grpc.insecure_channel(host)
map_stream = channel.stream_stream("/controller.IsolateController/MapStream", request_serializer=None,
                                   response_deserializer=None)
unary_map = channel.unary_stream("/controller.IsolateController/Map", request_serializer=None,
                                 response_deserializer=None)
configuration = struct_pb2.Struct()
configuration.update({"requirements": [], "python_version": python,
                      "serializer": "cloudpickle==" + cloudpickle.__version__})

def varint(n):
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out

def field(number, payload):
    return varint(number << 3 | 2) + varint(len(payload)) + payload

def item(value):
    return pb.SerializedObject(method="cloudpickle", definition=cloudpickle.dumps(value)).SerializeToString()

def hosted_map(method="cloudpickle", inputs=()):
    return pb.HostedMap(
        environments=[pb.EnvironmentDefinition(kind="virtualenv", configuration=configuration)],
        machine_requirements=pb.MachineRequirements(machine_type="XS", keep_alive=5),
        function=pb.SerializedObject(method=method, definition=cloudpickle.dumps(abs)),
        inputs=[pb.SerializedObject(method="cloudpickle", definition=cloudpickle.dumps(i)) for i in inputs],
    ).SerializeToString()

def first(method="cloudpickle"):
    return field(1, hosted_map(method))

def attempt(name, messages, key=(key_id, key_secret)):
    metadata = [("auth-key-id", key[0]), ("auth-key", key[1])] if key else []
    try:
        replies = list(map_stream(iter(messages), metadata=metadata))
        print(name, "accepted", len(replies))
    except grpc.RpcError as error:
        print(name, error.code().name, error.details())

attempt("no-key", [first()], key=None)
attempt("wrong-key", [first()], key=(key_id, "not-the-secret"))
attempt("revoked-key", [first()], key=(revoked_id, revoked_secret))
attempt("empty", [])
attempt("no-map-first", [field(2, item(((1,), {})))])
attempt("map-again", [first(), field(1, hosted_map())])
attempt("dill", [first("dill")])
attempt("garbage", [b"\\xff\\xff\\xff"])
try:
    list(unary_map(hosted_map(inputs=[((1,), {})]), metadata=[]))
    print("unary-no-key accepted")
except grpc.RpcError as error:
    print("unary-no-key", error.code().name, error.details())
"""


def test_hostile_map_streams_are_refused_clearly(strict: Server, key: Tuple[str, str], original_stubs: Path) -> None:
    revoked = strict.create_key("bad-input")
    assert strict.cli("keys", "revoke", revoked[0]).returncode == 0
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    proc = subprocess.run(
        [str(original_stubs), "-c", MAP_HOSTILE, strict.host, *key, *revoked, python],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    said = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert said["no-key"].startswith("UNAUTHENTICATED"), said
    assert said["wrong-key"].startswith("UNAUTHENTICATED"), said
    assert said["revoked-key"].startswith("UNAUTHENTICATED") and "revoked" in said["revoked-key"], said
    assert said["empty"] == "INVALID_ARGUMENT the map's stream ended before its first message", said
    assert said["no-map-first"].startswith("INVALID_ARGUMENT a map's first message must hold the map"), said
    assert said["map-again"].startswith("INVALID_ARGUMENT only a map's first message names the map"), said
    assert said["dill"].startswith('INVALID_ARGUMENT a map\'s function must be pickled with "cloudpickle"'), said
    assert said["garbage"].startswith("INTERNAL") and "decode" in said["garbage"], said
    assert said["unary-no-key"].startswith("UNAUTHENTICATED"), said
