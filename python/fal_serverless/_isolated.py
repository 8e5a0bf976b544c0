"""`@isolated` and the isolated functions it makes."""

from __future__ import annotations

import functools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Generic, Iterable, Iterator, List, Optional, TypeVar, Union, overload

from . import _map
from ._credentials import Credentials
from ._hosts import AUTH_MODES, Deployment, Host
from ._options import DEFAULT_TIMEOUT, Options
from ._webapp import SERVE_PORT, create_webapp
from .exceptions import FalServerlessError

R = TypeVar("R")


class IsolatedFunction(Generic[R]):
    """A function that runs on its host, in an environment of its own, each time it is called."""

    def __init__(self, func: Callable[..., R], options: Options) -> None:
        self.func = func
        self.options = options
        functools.update_wrapper(self, func)

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        # A generator function's call is an iterator of what it yields, as it yields it.
        if _map.streams(self.func):
            return _map.stream(self, args, kwargs)  # type: ignore[return-value]
        # A web endpoint's function called directly is a plain call too: its server runs only when deployed.
        result: R = self.options.host.run(self.func, self.options, args, kwargs)
        return result

    def submit(self, *args: Any, **kwargs: Any) -> Future[R]:
        """Starts the call on a thread of this process and returns its `concurrent.futures.Future` (as the original
        client does). `future.cancel()` before the call has started (while the threads are busy with earlier ones)
        removes it. A generator function's future holds the list of its items."""
        if _map.streams(self.func):
            items: Callable[[], Any] = lambda: list(_map.stream(self, args, kwargs))  # noqa: E731
            return _executor().submit(items)
        return _executor().submit(self, *args, **kwargs)

    def map(
        self,
        *iterables: Iterable[Any],
        concurrency: Optional[int] = None,
        return_exceptions: bool = False,
        ordered: bool = True,
    ) -> Iterator[R]:
        """Calls the function on each item of `iterables` (on several, with one argument from each, as `map`
        does), in parallel on up to `concurrency` workers; yields the results in input order (`ordered=False`: as
        they finish).

        concurrency: the most inputs running at once (default: `max_concurrency` where set, else as many workers as
            the host's capacity for you holds).
        return_exceptions: a failed input yields its exception; otherwise the first failure is raised and the rest
            is cancelled (as is everything left when the iteration stops early, or on Ctrl-C).
        Inputs are pickled and sent as workers free up: a generator of inputs is read as the map goes.
        """
        if not iterables:
            raise TypeError("map() needs at least one iterable of inputs")
        return _map.run_map(
            self, ((args, {}) for args in zip(*iterables)), _length(iterables), concurrency, return_exceptions, ordered
        )

    def starmap(
        self,
        iterable: Iterable[Iterable[Any]],
        concurrency: Optional[int] = None,
        return_exceptions: bool = False,
        ordered: bool = True,
    ) -> Iterator[R]:
        """`map` for inputs that are argument tuples: `fn.starmap([(1, 2), (3, 4)])` calls `fn(1, 2)`, `fn(3, 4)`."""
        return _map.run_map(
            self,
            ((tuple(args), {}) for args in iterable),
            _length((iterable,)),
            concurrency,
            return_exceptions,
            ordered,
        )

    def aio(self, *args: Any, **kwargs: Any) -> Any:
        """The call for async code: `await fn.aio(...)` runs it without blocking the caller's event loop (on a
        thread of the loop's executor); for a generator function, `async for item in fn.aio(...)`."""
        return _map.call_async(self, args, kwargs)

    def serve(self, alias: Optional[str] = None, auth: str = "private") -> str:
        """Deploy this function as a web endpoint on its host (a server: `cloud`); returns the URL that calls it.

        With `serve=True` the server runs a FastAPI app with `POST /` bound to the function; with
        `exposed_port=8080` the function itself runs and starts its own server on port 8080.
        alias: the name in the URL (`.../apps/<user>/<alias>`); deploying again under it makes a new revision and
            moves the alias there, the old revision staying reachable by its id. None: reachable by revision id only.
        auth: who may call it: "private" (your keys, or an admin's), "public" (anyone, no key) or "shared" (any valid
            key); calls with a key send `Authorization: Key <key_id>:<key_secret>`.
        """
        return self.deploy(alias=alias, auth=auth).url

    def deploy(self, alias: Optional[str] = None, auth: str = "private") -> Deployment:
        """`serve`, returning the new revision's id and owner with its URL."""
        if alias is not None and (not isinstance(alias, str) or not alias or any(c in alias for c in "/?# \t\n")):
            raise ValueError(f"alias must be a non-empty name without '/', '?', '#' or spaces (or None), got {alias!r}")
        if auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {', '.join(AUTH_MODES)}, got {auth!r}")
        return self.options.host.deploy(self.app(), self.options, alias, auth, self._qualified_name())

    def app(self) -> Callable[[], Any]:
        """The call a deployed replica runs: the FastAPI wrapper (`serve=True`) or the function itself
        (`exposed_port=8080`)."""
        if self.options.serve:
            return create_webapp(self.func)
        if self.options.exposed_port == SERVE_PORT:
            return self.func
        raise FalServerlessError(
            f"{self._qualified_name()} is not a web endpoint: set serve=True (a FastAPI app with POST / bound to it "
            f"is made for you) or exposed_port={SERVE_PORT} (it starts its own server on that port), in @isolated "
            f"or with .on(serve=True)"
        )

    def _qualified_name(self) -> str:
        return f"{getattr(self.func, '__module__', '?')}.{getattr(self.func, '__qualname__', self.func)}"

    def on(self, host: Optional[Host] = None, **options: Any) -> IsolatedFunction[R]:
        """A new isolated function with the same code, on `host` and/or with `options` changed; the rest is kept.

        `options` are those of `isolated`: requirements, machine_type, keep_alive, credentials, python_version,
        timeout, serve, exposed_port, max_concurrency, min_concurrency, max_multiplexing, setup_function.
        """
        if host is not None:
            options["host"] = host
        return IsolatedFunction(self.func, self.options.changed(options))

    def __repr__(self) -> str:
        o = self.options
        return (
            f"<isolated function {getattr(self.func, '__qualname__', self.func)} on {o.host.name}, "
            f"machine_type={o.machine_type}, keep_alive={o.keep_alive}, requirements={list(o.requirements)}"
            + (", serve=True" if o.serve else "")
            + (f", exposed_port={o.exposed_port}" if o.exposed_port is not None else "")
            + ">"
        )


_submitted: Optional[ThreadPoolExecutor] = None
_submitted_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """The threads `submit` runs calls on: one pool per process, sized as the standard library sizes it (as the
    original client's is)."""
    global _submitted
    with _submitted_lock:
        if _submitted is None:
            _submitted = ThreadPoolExecutor(thread_name_prefix="fal-serverless-submit")
        return _submitted


def _length(iterables: Any) -> Optional[int]:
    """The number of inputs, where every iterable knows its length (for the progress bar)."""
    try:
        return min(len(i) for i in iterables)
    except TypeError:
        return None


@overload
def isolated(func: Callable[..., R], /) -> IsolatedFunction[R]: ...


@overload
def isolated(
    *,
    requirements: Optional[List[str]] = None,
    machine_type: str = "XS",
    keep_alive: float = 10,
    host: Optional[Host] = None,
    credentials: Optional[Credentials] = None,
    python_version: Optional[str] = None,
    timeout: float = DEFAULT_TIMEOUT,
    serve: bool = False,
    exposed_port: Optional[int] = None,
    max_concurrency: Optional[int] = None,
    min_concurrency: Optional[int] = None,
    max_multiplexing: Optional[int] = None,
    setup_function: Optional[Callable[[], Any]] = None,
    **unknown: Any,
) -> Callable[[Callable[..., R]], IsolatedFunction[R]]: ...


def isolated(
    func: Optional[Callable[..., R]] = None,
    /,
    *,
    requirements: Optional[List[str]] = None,
    machine_type: str = "XS",
    keep_alive: float = 10,
    host: Optional[Host] = None,
    credentials: Optional[Credentials] = None,
    python_version: Optional[str] = None,
    timeout: float = DEFAULT_TIMEOUT,
    serve: bool = False,
    exposed_port: Optional[int] = None,
    max_concurrency: Optional[int] = None,
    min_concurrency: Optional[int] = None,
    max_multiplexing: Optional[int] = None,
    setup_function: Optional[Callable[[], Any]] = None,
    **unknown: Any,
) -> Union[IsolatedFunction[R], Callable[[Callable[..., R]], IsolatedFunction[R]]]:
    """Make a function run in an isolated environment each time it is called.

    requirements: pip requirements installed in the function's environment (not in yours).
    machine_type: the CPU and memory it runs under: XS (default), S, M, L, XL, GPU-T4, GPU.
    keep_alive: seconds the worker stays warm after a call, for the next call to reuse (default 10; 0: none).
    host: `cloud` (default; FAL_SERVERLESS_HOST=local changes it) or `local`.
    credentials: CloudKeyCredentials for the cloud host.
    python_version: defaults to (and must equal) the major.minor of the Python running the caller.
    timeout: seconds a call may take, waiting for capacity included (default 3600); past it the call raises
        CallTimeoutError and its worker is stopped. An environment build does not count.
    setup_function: a function of no arguments run once per worker (a warm worker skips it; load a model here),
        whose result is passed to the function as its first positional argument. If it raises, the call fails with
        its exception.

    An `async def` function runs to completion on an event loop in the worker; `await fn.aio(...)` calls it from
    async code. A generator function (or async generator function) streams: calling it returns an iterator of its
    items as the worker yields them. `fn.map(...)`, `fn.starmap(...)` and `fn.submit(...)` call it many times.

    Web endpoints (deployed with `fn.serve(alias=..., auth=...)` or `fal-serverless function serve FILE FUNC`):
    serve: True makes the deployed app a FastAPI app with `POST /` bound to the function, and adds fastapi and
        uvicorn to its requirements. Calling the function directly still runs it as a plain call.
    exposed_port: 8080 (the only port supported): the function starts its own server on that port when deployed.
    max_concurrency: the most replicas the app runs at once (default: the server's).
    min_concurrency: replicas kept running when idle (default 0).
    max_multiplexing: requests one replica takes at once (default 1).

    Options are validated here: a wrong one raises ValueError before anything is built.
    """
    changes = dict(
        requirements=requirements,
        machine_type=machine_type,
        keep_alive=keep_alive,
        credentials=credentials,
        python_version=python_version,
        timeout=timeout,
        serve=serve,
        exposed_port=exposed_port,
        max_concurrency=max_concurrency,
        min_concurrency=min_concurrency,
        max_multiplexing=max_multiplexing,
        setup_function=setup_function,
        **unknown,
    )
    if host is not None:
        changes["host"] = host
    options = Options.defaults().changed(changes)

    def decorate(function: Callable[..., R]) -> IsolatedFunction[R]:
        if not callable(function):
            raise ValueError(f"@isolated decorates a function, got {function!r}")
        return IsolatedFunction(function, options)

    if func is not None:
        return decorate(func)
    return decorate
