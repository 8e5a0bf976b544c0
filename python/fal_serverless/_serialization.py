"""How a call travels: cloudpickle (protocol 5) of `(function, args, kwargs)` out, the return value or a description
of the exception back. Exceptions are re-raised here as their own type, with the remote traceback as their cause."""

from __future__ import annotations

import sys
import sysconfig
from types import ModuleType
from typing import Any, Callable, Dict, NoReturn, Set, Tuple

import cloudpickle

from . import _cached
from .exceptions import RemoteError, RemoteTraceback, SerializationError

#: What every environment installs so its worker can load what we send: the client's own cloudpickle.
SERIALIZER = f"cloudpickle=={cloudpickle.__version__}"
PROTOCOL = 5

# `@cached` must work where fal_serverless is not installed: its code travels with the function.
cloudpickle.register_pickle_by_value(_cached)

_INSTALLED_PATHS = tuple(
    p for p in {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")} if p
)
_by_value: Set[str] = set()


def dump_call(func: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bytes:
    _pickle_project_module_by_value(func)
    try:
        return cloudpickle.dumps((func, args, kwargs), protocol=PROTOCOL)  # type: ignore[no-any-return]
    except Exception as exc:
        raise SerializationError(
            f"could not pickle the call to {_name(func)}: {type(exc).__name__}: {exc}. The function, its arguments "
            f"and the globals it uses must be picklable by cloudpickle; create objects such as locks, connections "
            f"and open files inside the function instead."
        ) from exc


def load_reply(raised: bool, reply: bytes, func: Callable[..., Any]) -> Any:
    if not raised:
        try:
            return cloudpickle.loads(reply)
        except Exception as exc:
            raise SerializationError(
                f"the result of {_name(func)} could not be unpickled here: {type(exc).__name__}: {exc}. It may be of "
                f"a type from a package installed only in the function's environment; install that package here "
                f"too, or return plain Python objects."
            ) from exc
    raise_remote(cloudpickle.loads(reply), func)


def raise_remote(info: Dict[str, Any], func: Callable[..., Any]) -> NoReturn:
    """Re-raises what the worker described: the original exception where it can be recreated here."""
    remote = RemoteTraceback(info["traceback"])
    where = f"{info['type']}: {info['message']}"
    if info["stage"] == "load":
        raise SerializationError(
            f"the worker could not unpickle {_name(func)}: {where}. If a module is missing, add its package to "
            f"requirements=[...]; if it is a module of your project, import it inside the function."
        ) from remote
    if info["stage"] == "return":
        raise SerializationError(
            f"{_name(func)} returned a value that cannot be pickled: {where}. Return plain data (numbers, strings, "
            f"lists, dicts, arrays) instead."
        ) from remote
    exception: Any = None
    if info["exception"] is not None:
        try:
            exception = cloudpickle.loads(info["exception"])
        except Exception:
            exception = None
    if not isinstance(exception, BaseException):
        exception = RemoteError(info["type"], info["message"])
    raise exception from remote


def _name(func: Callable[..., Any]) -> str:
    return repr(getattr(func, "__qualname__", func))


def _pickle_project_module_by_value(func: Callable[..., Any]) -> None:
    """The function's module, if it belongs to the user's project rather than to an installed package, travels by
    value: the environment has its requirements, not the user's source tree."""
    name = getattr(func, "__module__", None)
    if not name or name == "__main__" or name in _by_value:
        return
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if not isinstance(module, ModuleType) or not path or path.startswith(_INSTALLED_PATHS):
        return
    cloudpickle.register_pickle_by_value(module)
    _by_value.add(name)
