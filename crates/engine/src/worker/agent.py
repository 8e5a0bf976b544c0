# The fal-serverless worker agent: runs inside an environment, one call at a time.
#
# Started by the engine as `python -I -u -c <this file> [dill <layer>]` with a socket on fd 3. It needs only the
# standard library and its serializer, never the fal_serverless package:
#   cloudpickle (no arguments): our SDK's calls. cloudpickle is installed in the environment at the client's version.
#   dill (`dill <layer>`): the original fal-serverless client's calls. dill comes from the layer's site-packages,
#     added after the environment's own.
# Before any frame, the engine sends the caller's variables (a user's secrets): `NAME=VALUE` each ended by a NUL, then
# an empty one. They are not in the environment we are exec'd with, which is also that of the jail's tools run as root
# (bubblewrap, setpriv); we set them before importing or running anything else (see receive_variables).
# Frames: a header of (payload length: u32 big-endian, kind: u8), then the payload.
#   CALL (1)      engine -> agent  cloudpickle of (function, args, kwargs), or of (args, kwargs) after a FUNCTION
#                                  frame; dill of a function of no arguments (of one: the setup's result, after SETUP)
#   SETUP (5)     engine -> agent  before a CALL: the call's setup function, pickled. It runs once per worker for the
#                                  same bytes (keyed by their sha256, as the original's agent does) and its result is
#                                  the function's first positional argument
#   FUNCTION (6)  engine -> agent  before a CALL: the function pickled alone (a map's items share it); the last one
#                                  loaded is kept, so a map's items load it once per worker
#   YIELDED (4)   agent -> engine  one item of a generator function (or async generator function), pickled, sent as
#                                  it is produced; the RETURNED (of None) or RAISED that follows ends the call
#   RETURNED (2)  agent -> engine  the return value, pickled the same way
#   RAISED (3)    agent -> engine  cloudpickle: a dict describing the exception (see describe_exception)
#                                  dill: a JSON line {stage, type, message, traceback}, then dill of the exception
#                                  to raise in the client (see describe_for_dill)
# An `async def` function runs to completion on an event loop of its own before its result is sent.
# The function's stdout and stderr are the process's own, which the engine reads as the call's logs.


def describe_for_cloudpickle(cloudpickle, exc, stage, tb):
    """Our SDK's description of an exception: a dict it re-raises from (see fal_serverless._serialization)."""
    import traceback

    try:
        exception = cloudpickle.dumps(exc, protocol=5)
    except BaseException:
        exception = None
    cls = type(exc)
    return cloudpickle.dumps(
        {
            "stage": stage,
            "type": cls.__module__ + "." + cls.__qualname__,
            "message": safe_str(exc),
            "traceback": "".join(traceback.format_exception(cls, exc, tb)),
            "chain": describe_chain(exc, tb),
            "exception": exception,
        },
        protocol=5,
    )


def describe_chain(exc, tb):
    """The exception and those it was raised from, oldest first, each with its frames as data: the client prints
    them, putting its own file names and source lines on the frames of its code (cloudpickle 3.1.3 and later ship
    code with the file name "<dynamic-code>", and the caller's source files are not here anyway).

    Each entry: {"frames": [[filename, lineno, name, firstlineno, line]], "exception": [lines], "link": the text
    printed between it and the next entry, None for the last}."""
    import linecache
    import traceback

    entries = []
    seen = set()
    link = None
    while exc is not None and id(exc) not in seen and len(entries) < 64:
        seen.add(id(exc))
        frames = []
        for frame, lineno in traceback.walk_tb(tb):
            code = frame.f_code
            line = linecache.getline(code.co_filename, lineno, frame.f_globals).strip()
            frames.append([code.co_filename, lineno, code.co_name, code.co_firstlineno, line])
        entries.append(
            {"frames": frames, "exception": traceback.format_exception_only(type(exc), exc), "link": link}
        )
        if exc.__cause__ is not None:
            link = "\nThe above exception was the direct cause of the following exception:\n\n"
            exc = exc.__cause__
        elif exc.__context__ is not None and not exc.__suppress_context__:
            link = "\nDuring handling of the above exception, another exception occurred:\n\n"
            exc = exc.__context__
        else:
            break
        tb = exc.__traceback__
    # Oldest first, as Python prints them; each entry's link was recorded on the way to it, from the exception
    # that follows it in print order.
    entries.reverse()
    return entries


def describe_for_dill(dill, exc, stage, tb):
    """The original client's: it raises the unpickled exception with the traceback attached. What cannot be
    pickled (the exception itself, or a result) is replaced by a built-in exception that says so."""
    import json
    import traceback

    cls = type(exc)
    name = cls.__module__ + "." + cls.__qualname__
    message = safe_str(exc)
    tb_text = "".join(traceback.format_exception(cls, exc, tb))
    if stage == "return":
        exc = TypeError(
            "the function's result could not be pickled with dill (%s: %s); return plain data (numbers, strings, "
            "lists, dicts) instead" % (name, message)
        )
    if stage == "load":
        pickled = b""  # the engine turns it into an error status the client understands
    else:
        try:
            pickled = dill.dumps(exc)
        except BaseException as why:
            fallback = RuntimeError(
                "%s: %s (the exception itself could not be pickled: %s)" % (name, message, safe_str(why))
            )
            pickled = dill.dumps(fallback)
    head = json.dumps({"stage": stage, "type": name, "message": message, "traceback": tb_text})
    return head.encode() + b"\n" + pickled


def safe_str(exc):
    try:
        return str(exc)
    except BaseException:
        return "<the exception's __str__ failed>"


def receive_variables(sock):
    """Sets the variables the engine sends before the first frame in os.environ, before the serializer or the
    function is imported: so the function, what it imports, and its subprocesses see them as if we had been started
    with them. Returns what came after them (the start of the first frame), or None if the engine closed the socket
    first. Names are never empty, so the first empty entry ends them: a NUL at the start, or after another."""
    import os

    data = bytearray()
    searched = 0
    while True:
        if data[:1] == b"\0":
            end = 0
            break
        # The pair may straddle two reads: look again from the byte before the last read's.
        end = data.find(b"\0\0", max(searched - 1, 0))
        if end >= 0:
            end += 1
            break
        searched = len(data)
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    for entry in bytes(data[:end]).split(b"\0")[:-1]:
        name, _, value = entry.partition(b"=")
        os.environb[name] = value
    return data[end + 1 :]


def serve():
    import os
    import socket
    import struct
    import sys

    os.set_inheritable(3, False)  # subprocesses of the function must not hold our end open
    sock = socket.socket(fileno=3)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # A Slurm job's stream to the server: a server host that vanished ends the job (a failed read) rather than
        # leaving it holding its allocation.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)

    # Modules the server offers after the environment's own (this project's SDK, for calls the function makes):
    # `-I` ignores PYTHONPATH, and the function's subprocesses should not inherit it.
    offered = os.environ.pop("FAL_AGENT_PYTHON_PATH", None)
    if offered:
        sys.path.append(offered)

    pending = receive_variables(sock)
    if pending is None:
        return  # the engine closed the socket: it wants us gone

    if sys.argv[1:2] == ["dill"]:
        import site

        site.addsitedir(sys.argv[2])
        import dill as serializer

        def load_call(payload):
            return serializer.loads(payload), (), {}

        def dump(value):
            return serializer.dumps(value)

        describe = describe_for_dill
        dill_mode = True
    else:
        import cloudpickle as serializer

        def load_call(payload):
            return serializer.loads(payload)

        def dump(value):
            return serializer.dumps(value, protocol=5)

        describe = describe_for_cloudpickle
        dill_mode = False

    header = struct.Struct(">IB")
    CALL, RETURNED, RAISED, YIELDED, SETUP, FUNCTION = 1, 2, 3, 4, 5, 6

    def recv_exactly(size):
        buf = bytearray(size)
        view = memoryview(buf)
        # First what came with the variables.
        filled = min(size, len(pending))
        view[:filled] = pending[:filled]
        del pending[:filled]
        while filled < size:
            n = sock.recv_into(view[filled:])
            if n == 0:
                return None
            filled += n
        return buf

    def send(kind, payload):
        head = header.pack(len(payload), kind)
        if len(payload) < 65536:
            sock.sendall(head + payload)
        else:
            sock.sendall(head)
            sock.sendall(payload)

    def output_sockets():
        # A cluster job's stdout and stderr are TCP streams of their own (a local worker's are pipes). Lines go out
        # as written (no Nagle delay): the reply waits for them.
        import stat

        found = []
        for fd in (1, 2):
            try:
                if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                    continue
                stream = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue
            try:
                if stream.family not in (socket.AF_INET, socket.AF_INET6):
                    raise OSError("not TCP")
                stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                found.append(stream)
            except OSError:
                stream.close()
        return found

    streamed_output = output_sockets()

    def flush_output():
        # Whatever the call printed must reach its pipes before its reply (or item) reaches the engine.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        if streamed_output:
            output_acknowledged()

    def output_acknowledged():
        # Over TCP, the last lines can still be in flight on their stream when the reply arrives on its own: wait
        # (5 s at most) until the server's host has acknowledged every byte written so far. What is written after
        # this point (a thread of the function's, printing on) is not waited for. The engine reads the output
        # streams before it takes a reply, so it then has every line.
        import array
        import fcntl
        import termios
        import time

        def acknowledged(stream):
            # tcp_info's tcpi_bytes_acked (Linux 4.1 on), at its fixed offset; None where the kernel has none.
            info = stream.getsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_INFO", 11), 136)
            return struct.unpack_from("=Q", info, 120)[0] if len(info) >= 128 else None

        unacknowledged = array.array("i", [0])
        targets = []
        for stream in streamed_output:
            try:
                fcntl.ioctl(stream.fileno(), termios.TIOCOUTQ, unacknowledged, True)
                acked = acknowledged(stream) if unacknowledged[0] else None
            except OSError:
                continue
            if acked is not None:
                targets.append((stream, acked + unacknowledged[0]))
        deadline = time.monotonic() + 5
        for stream, target in targets:
            while time.monotonic() < deadline:
                try:
                    if acknowledged(stream) >= target:
                        break
                except OSError:
                    break
                time.sleep(0.001)

    setups = {}  # sha256 of a setup function's bytes -> its result, for this worker's life
    loaded_function = [None, None]  # the last FUNCTION frame's bytes, and the function they load

    def run_setup(setup):
        import hashlib

        key = hashlib.sha256(setup).hexdigest()
        if key not in setups:
            function = serializer.loads(setup)
            try:
                setups[key] = function()
            except BaseException:
                sys.stderr.write("The setup function has thrown an error. Aborting the run.\n")
                raise
        return setups[key]

    def run(payload, setup, function_bytes):
        """Runs one call, sending what it yields as it goes; returns its final frame."""
        try:
            if function_bytes is None:
                function, args, kwargs = load_call(payload)
            else:
                if loaded_function[0] != function_bytes:
                    loaded_function[:] = [None, None]
                    loaded_function[:] = [function_bytes, serializer.loads(function_bytes)]
                function = loaded_function[1]
                args, kwargs = serializer.loads(payload)
        except BaseException as exc:
            return RAISED, describe(serializer, exc, "load", exc.__traceback__)
        del payload
        try:
            if setup is not None:
                args = (run_setup(setup),) + tuple(args)
            value = function(*args, **kwargs)
            if streams(function):
                for item in value if isinstance(value, types.GeneratorType) else async_items(value):
                    try:
                        item = dump(item)
                    except BaseException as exc:
                        return RAISED, describe(serializer, exc, "return", exc.__traceback__)
                    flush_output()
                    send(YIELDED, item)
                value = None
            elif isinstance(value, types.CoroutineType):
                import asyncio

                value = asyncio.run(value)
        except BaseException as exc:
            # Skip our own frame: the traceback starts in the user's function.
            return RAISED, describe(serializer, exc, "call", exc.__traceback__.tb_next)
        try:
            return RETURNED, dump(value)
        except BaseException as exc:
            return RAISED, describe(serializer, exc, "return", exc.__traceback__)

    def streams(function):
        # As the client decides that a call returns an iterator: by the function, not by what it returns.
        return dill_mode is False and (inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function))

    def async_items(value):
        import asyncio

        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    item = loop.run_until_complete(value.__anext__())
                except StopAsyncIteration:
                    return
                yield item
        finally:
            loop.run_until_complete(value.aclose())
            loop.close()

    import inspect
    import types

    setup = function_bytes = None
    while True:
        head = recv_exactly(header.size)
        if head is None:
            return  # the engine closed the socket: it wants us gone
        size, kind = header.unpack(head)
        payload = recv_exactly(size)
        if payload is None or kind not in (CALL, SETUP, FUNCTION):
            return
        if kind == SETUP:
            setup = bytes(payload)
            continue
        if kind == FUNCTION:
            function_bytes = bytes(payload)
            continue
        reply = run(payload, setup, function_bytes)
        del payload
        setup = function_bytes = None
        flush_output()
        send(*reply)
        del reply

serve()
