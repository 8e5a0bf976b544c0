# The fal-serverless worker agent: runs inside an environment, one call at a time.
#
# Started by the engine as `python -I -u -c <this file>` with a socket on fd 3. It needs only the standard library
# and cloudpickle (installed in every environment at the client's version), never the fal_serverless package.
# Frames: a header of (payload length: u32 big-endian, kind: u8), then the payload.
#   CALL (1)      engine -> agent  cloudpickle of (function, args, kwargs)
#   RETURNED (2)  agent -> engine  cloudpickle of the return value
#   RAISED (3)    agent -> engine  cloudpickle of a dict describing an exception (see describe_exception)
# The function's stdout and stderr are the process's own, which the engine reads as the call's logs.


def serve():
    import os
    import socket
    import struct
    import sys
    import traceback

    import cloudpickle

    header = struct.Struct(">IB")
    CALL, RETURNED, RAISED = 1, 2, 3

    os.set_inheritable(3, False)  # subprocesses of the function must not hold our end open
    sock = socket.socket(fileno=3)

    def recv_exactly(size):
        buf = bytearray(size)
        view = memoryview(buf)
        filled = 0
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

    def describe_exception(exc, stage, tb):
        try:
            exception = cloudpickle.dumps(exc, protocol=5)
        except BaseException:
            exception = None
        try:
            message = str(exc)
        except BaseException:
            message = "<the exception's __str__ failed>"
        cls = type(exc)
        return cloudpickle.dumps(
            {
                "stage": stage,
                "type": cls.__module__ + "." + cls.__qualname__,
                "message": message,
                "traceback": "".join(traceback.format_exception(cls, exc, tb)),
                "exception": exception,
            },
            protocol=5,
        )

    while True:
        head = recv_exactly(header.size)
        if head is None:
            return  # the engine closed the socket: it wants us gone
        size, kind = header.unpack(head)
        payload = recv_exactly(size)
        if payload is None or kind != CALL:
            return
        try:
            function, args, kwargs = cloudpickle.loads(payload)
        except BaseException as exc:
            reply = RAISED, describe_exception(exc, "load", exc.__traceback__)
        else:
            del payload
            try:
                value = function(*args, **kwargs)
            except BaseException as exc:
                # Skip our own frame: the traceback starts in the user's function.
                reply = RAISED, describe_exception(exc, "call", exc.__traceback__.tb_next)
            else:
                try:
                    reply = RETURNED, cloudpickle.dumps(value, protocol=5)
                except BaseException as exc:
                    reply = RAISED, describe_exception(exc, "return", exc.__traceback__)
                del value
            del function, args, kwargs
        # Whatever the call printed must reach its pipes before its reply reaches the engine.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        send(*reply)
        del reply


serve()
