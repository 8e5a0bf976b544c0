"""`@isolated` and the isolated functions it makes."""

from __future__ import annotations

import functools
from typing import Any, Callable, Generic, List, Optional, TypeVar, Union, overload

from ._credentials import Credentials
from ._hosts import Host
from ._options import DEFAULT_TIMEOUT, Options

R = TypeVar("R")


class IsolatedFunction(Generic[R]):
    """A function that runs on its host, in an environment of its own, each time it is called."""

    def __init__(self, func: Callable[..., R], options: Options) -> None:
        self.func = func
        self.options = options
        functools.update_wrapper(self, func)

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        result: R = self.options.host.run(self.func, self.options, args, kwargs)
        return result

    def on(self, host: Optional[Host] = None, **options: Any) -> IsolatedFunction[R]:
        """A new isolated function with the same code, on `host` and/or with `options` changed; the rest is kept.

        `options` are those of `isolated`: requirements, machine_type, keep_alive, credentials, python_version,
        timeout.
        """
        if host is not None:
            options["host"] = host
        return IsolatedFunction(self.func, self.options.changed(options))

    def __repr__(self) -> str:
        o = self.options
        return (
            f"<isolated function {getattr(self.func, '__qualname__', self.func)} on {o.host.name}, "
            f"machine_type={o.machine_type}, keep_alive={o.keep_alive}, requirements={list(o.requirements)}>"
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

    Options are validated here: a wrong one raises ValueError before anything is built.
    """
    changes = dict(
        requirements=requirements,
        machine_type=machine_type,
        keep_alive=keep_alive,
        credentials=credentials,
        python_version=python_version,
        timeout=timeout,
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
