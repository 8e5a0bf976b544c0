"""The agent's side of the variables message (`receive_variables` in crates/engine/src/worker/agent.py): the engine
sends a worker's variables on its socket before the first frame, `NAME=VALUE` each ended by a NUL, then an empty
one. The end-to-end tests send small messages in one piece; here the reads are cut where a socket may cut them."""

import ast
import os
import socket
import threading
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import pytest

AGENT = Path(__file__).resolve().parent.parent / "crates" / "engine" / "src" / "worker" / "agent.py"


def load_receive_variables() -> Callable[[socket.socket], Optional[bytes]]:
    """The function alone: importing agent.py would start serving."""
    tree = ast.parse(AGENT.read_text())
    (function,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "receive_variables"]
    namespace: dict = {}
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(AGENT), "exec"), namespace)
    return namespace["receive_variables"]  # type: ignore[no-any-return]


receive_variables = load_receive_variables()


def message(variables: List[bytes]) -> bytes:
    return b"".join(v + b"\0" for v in variables) + b"\0"


@pytest.fixture
def names() -> Iterator[List[str]]:
    """Names the test sets in this process's environment; removed after it."""
    used: List[str] = []
    yield used
    for name in used:
        os.environ.pop(name, None)


def fed(data: bytes, chunk: int) -> socket.socket:
    """Our end of a socket pair whose other end writes `data` `chunk` bytes at a time, then closes."""
    ours, theirs = socket.socketpair()

    def feed() -> None:
        with theirs:
            for start in range(0, len(data), chunk):
                theirs.sendall(data[start : start + chunk])

    threading.Thread(target=feed, daemon=True).start()
    return ours


def rest_of(sock: socket.socket, leftover: bytes) -> bytes:
    """What came after the message: the leftover the function handed back, then the rest of the stream."""
    parts = [leftover]
    while chunk := sock.recv(65536):
        parts.append(chunk)
    return b"".join(parts)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 4096, 1 << 20])
def test_variables_are_set_and_the_first_frame_is_kept_however_the_reads_cut(names: List[str], chunk: int) -> None:
    names += ["FAL_TEST_A", "FAL_TEST_B", "FAL_TEST_EMPTY"]
    frame = b"\x00\x00\x00\x05hello\x00\x00"  # a frame may hold NULs, pairs of them too
    sock = fed(message([b"FAL_TEST_A=1", b"FAL_TEST_B=x=y", b"FAL_TEST_EMPTY="]) + frame, chunk)
    with sock:
        leftover = receive_variables(sock)
        assert leftover is not None
        assert rest_of(sock, bytes(leftover)) == frame
    assert (os.environ["FAL_TEST_A"], os.environ["FAL_TEST_B"], os.environ["FAL_TEST_EMPTY"]) == ("1", "x=y", "")


def test_no_variables_is_one_nul(names: List[str]) -> None:
    before = dict(os.environ)
    with fed(b"\0frame", 64) as sock:
        leftover = receive_variables(sock)
        assert leftover is not None
        assert rest_of(sock, bytes(leftover)) == b"frame"
    assert dict(os.environ) == before


def test_a_megabyte_of_variables_arrives_whole(names: List[str]) -> None:
    names += [f"FAL_TEST_BIG_{i}" for i in range(64)]
    values = [bytes([65 + i % 26]) * (16 << 10) for i in range(64)]
    variables = [f"FAL_TEST_BIG_{i}=".encode() + value for i, value in enumerate(values)]
    with fed(message(variables) + b"next", 1000) as sock:
        leftover = receive_variables(sock)
        assert leftover is not None
        assert rest_of(sock, bytes(leftover)) == b"next"
    assert [os.environb[f"FAL_TEST_BIG_{i}".encode()] for i in range(64)] == values


def test_an_engine_gone_before_the_end_of_the_message_is_none(names: List[str]) -> None:
    names += ["FAL_TEST_CUT"]
    with fed(b"FAL_TEST_CUT=1\0", 4) as sock:
        assert receive_variables(sock) is None
    assert "FAL_TEST_CUT" not in os.environ, "a message cut short sets nothing"
