"""Hosts: where an isolated function runs. `local` is this machine; `cloud` is a fal-serverless server, the only one
a function can be deployed to as a web endpoint."""

from __future__ import annotations

import atexit
import math
import os
import sys
import threading
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Dict, NamedTuple, Optional, Tuple

from . import _local_server, _native, _serialization
from ._credentials import CloudKeyCredentials, Credentials
from ._webapp import SERVE_PORT
from .exceptions import FalServerlessError

if TYPE_CHECKING:
    from ._map import MapTransport
    from ._options import Options


class Deployment(NamedTuple):
    """A web endpoint's new revision: its id, its owner, and the URL that reaches it (by alias where it has one)."""

    revision: str
    user_id: str
    alias: Optional[str]
    url: str


#: Who may call an app: its owner's keys (or an admin's), anyone without a key, or any valid key.
AUTH_MODES = ("private", "public", "shared")


class Host(ABC):
    """Somewhere an isolated function can run."""

    name: str

    @abstractmethod
    def run(
        self,
        func: Callable[..., Any],
        options: Options,
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        on_item: Optional[Callable[[bytes], None]] = None,
        cancel: Optional[threading.Event] = None,
    ) -> Any:
        """Run `func(*args, **kwargs)` under `options` and return its result (or raise its exception). Each item a
        generator function yields goes to `on_item`, still pickled, as it is produced; a set `cancel` stops the call
        (raising `CallCancelledError`)."""

    @abstractmethod
    def start_map(
        self, func: Callable[..., Any], options: Options, function: bytes, concurrency: Optional[int]
    ) -> MapTransport:
        """Starts a map of `function` (`func` pickled alone) under `options`; its inputs and results go through the
        transport returned."""

    def deploy(
        self, app: Callable[[], Any], options: Options, alias: Optional[str], auth: str, function_name: str
    ) -> Deployment:
        """Register `app` (a call that serves HTTP on port 8080 and does not return) as a new revision of a web
        endpoint, under `alias` when given."""
        raise FalServerlessError(
            f"deploying {function_name} as a web endpoint needs a server, and the {self.name} host is none: deploy "
            f"it with fn.on(cloud).serve(...) (the server FAL_HOST names, or one on this machine)"
        )

    def schedule(self, func: Callable[[], Any], options: Options, cron: str, function_name: str) -> str:
        """Register `func` (a call of no arguments) and run it at the times of `cron` (UTC); returns the
        schedule's id."""
        raise FalServerlessError(
            f"scheduling {function_name} needs a server, and the {self.name} host is none: schedule it on the cloud "
            f"host (the server FAL_HOST names, or one on this machine)"
        )

    def __repr__(self) -> str:
        return f"<host {self.name}>"

    def __reduce__(self) -> str:
        return self.name  # a module-level singleton: pickles by reference


class LocalHost(Host):
    """This machine: a dedicated environment in the local cache, a worker process under the machine type's limits."""

    name = "local"

    def __init__(self) -> None:
        self._engine: Optional[_native.Engine] = None
        self._lock = threading.Lock()

    @property
    def engine(self) -> _native.Engine:
        """The engine embedded in this process, started on first use."""
        with self._lock:
            if self._engine is None:
                self._engine = _native.Engine(uv=find_uv())
                atexit.register(self._engine.shutdown)
            return self._engine

    def run(
        self,
        func: Callable[..., Any],
        options: Options,
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        on_item: Optional[Callable[[bytes], None]] = None,
        cancel: Optional[threading.Event] = None,
    ) -> Any:
        call = _serialization.dump_call(func, args, kwargs)
        raised, reply = self._call(options, call.payload, on_item=on_item, cancel=cancel)
        return _serialization.load_reply(raised, reply, func, call)

    def _call(
        self,
        options: Options,
        payload: bytes,
        function: Optional[bytes] = None,
        on_item: Optional[Callable[[bytes], None]] = None,
        cancel: Optional[threading.Event] = None,
    ) -> Tuple[bool, bytes]:
        return self.engine.call(
            python_version=options.python_version,
            interpreter=_base_interpreter(),
            requirements=list(options.environment_requirements),
            serializer=_serialization.SERIALIZER,
            machine_type=options.machine_type,
            keep_alive=float(options.keep_alive),
            payload=payload,
            on_log=show_log,
            timeout=options.timeout,
            setup=_setup(options),
            function=function,
            on_item=on_item,
            cancel=cancel,
        )

    def start_map(
        self, func: Callable[..., Any], options: Options, function: bytes, concurrency: Optional[int]
    ) -> MapTransport:
        from ._map import LocalMap, local_concurrency

        def call(payload: bytes, cancel: threading.Event) -> Tuple[bool, bytes]:
            return self._call(options, payload, function=function, cancel=cancel)

        return LocalMap(call, concurrency or local_concurrency(options.machine_type))


class CloudHost(Host):
    """A fal-serverless server: the one `FAL_HOST` names, else one on this machine, started on first use."""

    name = "cloud"

    def __init__(self) -> None:
        self._clients: Dict[Tuple[Any, ...], _native.CloudClient] = {}
        self._local_pid: Optional[int] = None
        self._lock = threading.Lock()

    def client(self, credentials: Optional[Credentials]) -> _native.CloudClient:
        """A connection to the server, with `credentials` or else the environment's key."""
        key: Tuple[Optional[str], Optional[str]] = (None, None)
        # Inside a worker the server gave a key of its own (FAL_KEY_ID/FAL_KEY_SECRET, valid while the worker
        # lives): a function's calls use it, as the original client's do, whatever credentials were pickled with it.
        if isinstance(credentials, CloudKeyCredentials) and not in_worker():
            key = (credentials.key_id, credentials.key_secret)
        host = os.environ.get("FAL_HOST", "").strip()
        with self._lock:
            if not host:
                self._local_pid = _local_server.ensure_running(self._local_pid)
            cache_key = (
                host,
                None if host else self._local_pid,
                key,
                os.environ.get("FAL_KEY_ID"),
                os.environ.get("FAL_KEY_SECRET"),
            )
            client = self._clients.get(cache_key)
            if client is None:
                client = self._clients[cache_key] = _native.CloudClient(*key)
            return client

    def run(
        self,
        func: Callable[..., Any],
        options: Options,
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        on_item: Optional[Callable[[bytes], None]] = None,
        cancel: Optional[threading.Event] = None,
    ) -> Any:
        client = self.client(options.credentials)
        call = _serialization.dump_call(func, args, kwargs)
        raised, reply = client.run(
            python_version=options.python_version,
            requirements=list(options.environment_requirements),
            serializer=_serialization.SERIALIZER,
            machine_type=options.machine_type,
            keep_alive=math.ceil(options.keep_alive),
            payload=call.payload,
            function_name=function_name(func),
            on_log=show_log,
            timeout=options.timeout,
            setup=_setup(options),
            on_item=on_item,
            cancel=cancel,
        )
        return _serialization.load_reply(raised, reply, func, call)

    def start_map(
        self, func: Callable[..., Any], options: Options, function: bytes, concurrency: Optional[int]
    ) -> MapTransport:
        return self.client(options.credentials).map_start(
            python_version=options.python_version,
            requirements=list(options.environment_requirements),
            serializer=_serialization.SERIALIZER,
            machine_type=options.machine_type,
            keep_alive=math.ceil(options.keep_alive),
            function=function,
            function_name=function_name(func),
            timeout=options.timeout,
            setup=_setup(options),
            concurrency=concurrency,
        )

    def deploy(
        self, app: Callable[[], Any], options: Options, alias: Optional[str], auth: str, function_name: str
    ) -> Deployment:
        client = self.client(options.credentials)
        revision, user_id = self._register(
            client,
            app,
            options,
            function_name,
            alias=alias,
            auth_mode=auth,
            max_concurrency=options.max_concurrency,
            min_concurrency=options.min_concurrency,
            max_multiplexing=options.max_multiplexing,
            exposed_port=SERVE_PORT,
        )
        return Deployment(revision, user_id, alias, app_url(client.uri, user_id, alias or revision))

    def schedule(self, func: Callable[[], Any], options: Options, cron: str, function_name: str) -> str:
        client = self.client(options.credentials)
        # A scheduled function is an application no one reaches over HTTP: private, no replicas kept, no port.
        revision, _ = self._register(
            client,
            func,
            options,
            function_name,
            alias=None,
            auth_mode="private",
            max_concurrency=None,
            min_concurrency=None,
            max_multiplexing=None,
            exposed_port=None,
        )
        return client.register_cron(revision, cron)

    @staticmethod
    def _register(
        client: _native.CloudClient,
        func: Callable[[], Any],
        options: Options,
        function_name: str,
        **application: Any,
    ) -> Tuple[str, str]:
        """Registers `func` as an application revision with `options`' environment and machine; returns the
        revision and its owner's user id."""
        call = _serialization.dump_call(func, (), {})
        revision, user_id = client.register_application(
            python_version=options.python_version,
            requirements=list(options.environment_requirements),
            serializer=_serialization.SERIALIZER,
            machine_type=options.machine_type,
            keep_alive=math.ceil(options.keep_alive),
            payload=call.payload,
            function_name=function_name,
            on_log=show_log,
            **application,
        )
        return revision, user_id


def function_name(func: Callable[..., Any]) -> str:
    """`module.qualname`: how the server's logs and run history name a function."""
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', func)}"


def _setup(options: Options) -> Optional[bytes]:
    setup = options.setup_function
    return None if setup is None else _serialization.dump_setup(setup)


def in_worker() -> bool:
    """Whether this process is a server's worker that gave it a way back (`IS_ISOLATE_AGENT`, as the original's)."""
    return os.environ.get("IS_ISOLATE_AGENT") == "1" and "FAL_KEY_ID" in os.environ


def app_url(server_uri: str, user_id: str, app: str) -> str:
    """The URL of an app on the server at `server_uri` (`http(s)://host:port`): its gateway answers on the same
    port, at `/apps/<user>/<alias or revision id>`."""
    return f"{server_uri.rstrip('/')}/apps/{user_id}/{app}"


local = LocalHost()
cloud = CloudHost()


def show_log(source: str, line: str) -> None:
    """Shows a line a call logged, as it arrives: the function's output on the matching stream, the rest on stderr."""
    if source == "stdout":
        stream, text = sys.stdout, line
    elif source == "stderr":
        stream, text = sys.stderr, line
    elif source == "build":
        stream, text = sys.stderr, f"[fal-serverless build] {line}"
    else:
        stream, text = sys.stderr, f"fal-serverless: {line}"
    stream.write(text + "\n")
    stream.flush()


def find_uv() -> str:
    configured = os.environ.get("FAL_SERVERLESS_UV")
    if configured:
        return configured
    try:
        from uv import find_uv_bin

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        return "uv"


def _base_interpreter() -> str:
    # Inside a virtualenv, build from the interpreter it was made from: environments must not depend on the
    # client's virtualenv staying where it is.
    return str(getattr(sys, "_base_executable", None) or sys.executable)
