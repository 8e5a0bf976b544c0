"""`@isolated` and the isolated functions it makes."""

from __future__ import annotations

import functools
from typing import Any, Callable, Generic, List, Optional, TypeVar, Union, overload

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
        # A web endpoint's function called directly is a plain call too: its server runs only when deployed.
        result: R = self.options.host.run(self.func, self.options, args, kwargs)
        return result

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
        timeout, serve, exposed_port, max_concurrency, min_concurrency, max_multiplexing.
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
