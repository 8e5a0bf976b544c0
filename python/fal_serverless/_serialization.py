"""How a call travels: cloudpickle (protocol 5) of `(function, args, kwargs)` out, the return value or a description
of the exception back. Exceptions are re-raised here as their own type, with the remote traceback as their cause."""

from __future__ import annotations

import io
import linecache
import sys
import sysconfig
from types import CodeType, ModuleType
from typing import Any, Callable, Dict, List, NoReturn, Set, Tuple

import cloudpickle

from . import _cached, _pydantic_v1, _webapp
from .exceptions import RemoteError, RemoteTraceback, SerializationError

#: What every environment installs so its worker can load what we send: the client's own cloudpickle.
SERIALIZER = f"cloudpickle=={cloudpickle.__version__}"
PROTOCOL = 5

# `@cached` and a web endpoint's FastAPI wrapper must work where fal_serverless is not installed: their code travels
# with the function.
cloudpickle.register_pickle_by_value(_cached)
cloudpickle.register_pickle_by_value(_webapp)
cloudpickle.register_pickle_by_value(_pydantic_v1)

_INSTALLED_PATHS = tuple(
    p for p in {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")} if p
)
_by_value: Set[str] = set()


class Call:
    """A pickled call, with the code objects it carries: a remote traceback names its frames by the code they ran,
    and the client puts its own file names and source lines back on them (cloudpickle 3.1.3 and later ship code
    with the file name "<dynamic-code>"; the worker never has the caller's source files)."""

    __slots__ = ("codes", "payload")

    def __init__(self, payload: bytes, codes: Dict[Tuple[str, int], CodeType]) -> None:
        self.payload = payload
        self.codes = codes


class _RecordingPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle's pickler, noting every code object it pickles by (name, first line)."""

    def __init__(self, file: io.BytesIO, codes: Dict[Tuple[str, int], CodeType]) -> None:
        super().__init__(file, protocol=PROTOCOL)
        self._codes = codes

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is CodeType:
            self._codes.setdefault((obj.co_name, obj.co_firstlineno), obj)
        elif isinstance(obj, type):
            model = _pydantic_v1.reduce_model(obj)
            if model is not None:
                return model
        return super().reducer_override(obj)


def dump_call(func: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Call:
    return _dump(
        (func, args, kwargs), func, f"the call to {_name(func)}", "The function, its arguments and the globals it uses"
    )


def _dump(obj: Any, func: Callable[..., Any], what: str, parts: str) -> Call:
    """`obj` (`func` or a call of it) pickled, with the code objects it carries; SerializationError naming `what`."""
    _pickle_project_module_by_value(func)
    codes: Dict[Tuple[str, int], CodeType] = {}
    try:
        buffer = io.BytesIO()
        _RecordingPickler(buffer, codes).dump(obj)
        return Call(buffer.getvalue(), codes)
    except Exception as exc:
        raise SerializationError(
            f"could not pickle {what}: {type(exc).__name__}: {exc}. {parts} must be picklable by cloudpickle; create "
            f"objects such as locks, connections and open files inside the function instead."
        ) from exc


def dump_setup(setup: Callable[[], Any]) -> bytes:
    """A setup function, pickled alone: the worker runs it once for the same bytes."""
    return _dump(setup, setup, f"the setup function {_name(setup)}", "It and the globals it uses").payload


def dump_function(func: Callable[..., Any]) -> Call:
    """The function pickled alone (a map's items carry only their arguments), with the code it carries."""
    return _dump(func, func, _name(func), "The function and the globals it uses")


def dump_arguments(func: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bytes:
    """One map item: `(args, kwargs)` pickled."""
    try:
        return bytes(cloudpickle.dumps((args, kwargs), protocol=PROTOCOL))
    except Exception as exc:
        raise SerializationError(
            f"could not pickle the arguments {args!r} of a call to {_name(func)}: {type(exc).__name__}: {exc}"
        ) from exc


def load_item(item: bytes, func: Callable[..., Any]) -> Any:
    """One item a generator function yielded."""
    return load_reply(False, item, func, Call(b"", {}))


def load_reply(raised: bool, reply: bytes, func: Callable[..., Any], call: Call) -> Any:
    if not raised:
        try:
            return cloudpickle.loads(reply)
        except Exception as exc:
            raise SerializationError(
                f"the result of {_name(func)} could not be unpickled here: {type(exc).__name__}: {exc}. It may be of "
                f"a type from a package installed only in the function's environment; install that package here "
                f"too, or return plain Python objects."
            ) from exc
    raise_remote(cloudpickle.loads(reply), func, call.codes)


def raise_remote(info: Dict[str, Any], func: Callable[..., Any], codes: Dict[Tuple[str, int], CodeType]) -> NoReturn:
    """Re-raises what the worker described: the original exception where it can be recreated here. A worker of an
    older server sends only the traceback's text; that is shown as it came."""
    chain = info.get("chain")
    text = info["traceback"] if chain is None else format_remote_traceback(chain, codes)
    remote = RemoteTraceback(text)
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


def format_remote_traceback(chain: List[Dict[str, Any]], codes: Dict[Tuple[str, int], CodeType]) -> str:
    """The remote exception chain as Python prints it, with the caller's file names and source lines on frames of
    code the call carried; other frames (installed packages) keep what the worker saw."""
    parts: List[str] = []
    for entry in chain:
        if entry["frames"]:
            parts.append("Traceback (most recent call last):\n")
        for filename, lineno, name, firstlineno, line in entry["frames"]:
            code = codes.get((name, firstlineno))
            # The worker names the call's code "<dynamic-code>" (cloudpickle >= 3.1.3) or by the caller's file.
            if code is not None and filename in ("<dynamic-code>", code.co_filename):
                filename = code.co_filename
                line = linecache.getline(filename, lineno).strip() or line
            parts.append(f'  File "{filename}", line {lineno}, in {name}\n')
            if line:
                parts.append(f"    {line}\n")
        parts.extend(entry["exception"])
        if entry["link"]:
            parts.append(entry["link"])
    return "".join(parts)


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
