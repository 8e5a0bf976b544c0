"""The options of an isolated function, validated when the decorator is applied, before anything is built."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

from . import _native
from ._credentials import Credentials
from ._hosts import Host, cloud, local
from ._webapp import SERVE_PORT


class MachineTypeInfo(NamedTuple):
    """What a machine type grants a worker."""

    name: str
    cpus: float
    memory_bytes: int
    gpus: int


MACHINE_TYPES: Dict[str, MachineTypeInfo] = {
    name: MachineTypeInfo(name, cpus, memory, gpus) for name, cpus, memory, gpus in _native.machine_types()
}

#: Seconds a call may take, from its arrival to its result, when it names no timeout: long jobs are the norm here,
#: a call stuck forever is not.
DEFAULT_TIMEOUT = 3600.0

#: Names the host a function runs on when it names none: `local` or `cloud` (the default).
DEFAULT_HOST_VARIABLE = "FAL_SERVERLESS_HOST"


#: What `serve=True` adds to a function's requirements (as the original 0.6.41 does) unless the user names the
#: package already: FastAPI pinned as the original pins it, and uvicorn pinned too, so that an app's environment is the
#: same on every deploy. uvicorn 0.33.0 is the last release for Python 3.8 (0.34.0 needs 3.9) and lists 3.8 to 3.13;
#: it depends on neither FastAPI nor Starlette (only click and h11), so it installs beside fastapi 0.99.1 (Starlette
#: 0.27, pydantic 1) on every Python this package supports.
SERVE_REQUIREMENTS = ("fastapi==0.99.1", "uvicorn==0.33.0")

#: The most an int32 on the wire carries: the bound of max_concurrency, min_concurrency and max_multiplexing.
MAX_INT32 = 2**31 - 1


def running_python_version() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


@dataclass(frozen=True)
class Options:
    requirements: Tuple[str, ...]
    machine_type: str
    keep_alive: float
    host: Host
    credentials: Optional[Credentials]
    python_version: str
    timeout: float
    serve: bool = False
    exposed_port: Optional[int] = None
    max_concurrency: Optional[int] = None
    min_concurrency: Optional[int] = None
    max_multiplexing: Optional[int] = None
    setup_function: Optional[Callable[[], Any]] = None

    @property
    def environment_requirements(self) -> Tuple[str, ...]:
        """The requirements the function's environment is built with: its own, plus FastAPI and uvicorn with
        `serve=True` (for its plain calls too, so that both run in one environment and pydantic models its
        parameters use load there)."""
        if not self.serve:
            return self.requirements
        named = {_requirement_name(r) for r in self.requirements}
        return self.requirements + tuple(r for r in SERVE_REQUIREMENTS if _requirement_name(r) not in named)

    @classmethod
    def defaults(cls) -> Options:
        return cls(
            requirements=(),
            machine_type="XS",
            keep_alive=10,
            host=default_host(),
            credentials=None,
            python_version=running_python_version(),
            timeout=DEFAULT_TIMEOUT,
        )

    def changed(self, changes: Mapping[str, Any]) -> Options:
        """A copy with `changes` applied, each validated; raises ValueError naming what is wrong and what is valid."""
        unknown = sorted(set(changes) - set(OPTION_NAMES))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}; valid options are: {', '.join(OPTION_NAMES)}")
        validated = {name: _VALIDATORS[name](value) for name, value in changes.items()}
        changed = replace(self, **validated)
        low, high = changed.min_concurrency, changed.max_concurrency
        if low is not None and high is not None and low > high:
            raise ValueError(
                f"min_concurrency ({low}) is more than max_concurrency ({high}): the replicas kept warm must fit in "
                f"the most that may run"
            )
        return changed


def default_host() -> Host:
    chosen = os.environ.get(DEFAULT_HOST_VARIABLE, "cloud").strip().lower()
    hosts = {"local": local, "cloud": cloud}
    if chosen not in hosts:
        raise ValueError(f"{DEFAULT_HOST_VARIABLE}={chosen!r} is not a host; use 'local' or 'cloud'")
    return hosts[chosen]


def _requirements(value: Any) -> Tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not all(isinstance(r, str) for r in value):
        raise ValueError(f"requirements must be a list of strings such as ['pyjokes', 'numpy>=1.26'], got {value!r}")
    # Malformed requirements are refused here, by the same parser the engine uses.
    _native.normalize_requirements(list(value))
    return tuple(value)


def _machine_type(value: Any) -> str:
    if value not in MACHINE_TYPES:
        raise ValueError(f"unknown machine type {value!r}; valid machine types are: {', '.join(MACHINE_TYPES)}")
    return str(value)


#: The most seconds keep_alive and timeout may be: what the wire carries (keep_alive is an int32 there), about 68
#: years. A server may keep workers warm for less; it says so in the call's logs.
MAX_SECONDS: int = _native.MAX_SECONDS


def _seconds(option: str, value: Any, zero_allowed: bool) -> Any:
    """`value`, if it is a number of seconds in the option's range; else a ValueError naming the range."""
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    # NaN fails every comparison: refused with the infinities and the negatives.
    if not (number and (0 <= value if zero_allowed else 0 < value) and value <= MAX_SECONDS):
        valid = f"from 0 to {MAX_SECONDS}" if zero_allowed else f"above 0 and at most {MAX_SECONDS}"
        raise ValueError(f"{option} must be a number of seconds {valid}, got {value!r}")
    return value


def _keep_alive(value: Any) -> float:
    seconds: float = _seconds("keep_alive", value, zero_allowed=True)
    return seconds


def _timeout(value: Any) -> float:
    return float(_seconds("timeout", value, zero_allowed=False))


def _host(value: Any) -> Host:
    if not isinstance(value, Host):
        raise ValueError(f"host must be fal_serverless.local or fal_serverless.cloud, got {value!r}")
    return value


def _credentials(value: Any) -> Optional[Credentials]:
    if value is not None and not isinstance(value, Credentials):
        raise ValueError(f"credentials must be CloudKeyCredentials(key_id=..., key_secret=...), got {value!r}")
    return value


def _python_version(value: Any) -> str:
    running = running_python_version()
    if value is None:
        return running
    text = str(value)
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)?", text)
    if match is None:
        raise ValueError(f"python_version must look like '3.11', got {value!r}")
    requested = f"{match.group(1)}.{match.group(2)}"
    if requested != running:
        raise ValueError(
            f"python_version {requested} differs from the Python running this script ({running}): functions travel "
            f"as pickled code, which only loads under the same minor version. Run this script with Python "
            f"{requested}, or leave python_version unset"
        )
    return requested


def _requirement_name(requirement: str) -> str:
    """A requirement's package name, normalized as PEP 503 compares names."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    name = match.group(1) if match else requirement
    return re.sub(r"[-_.]+", "-", name).lower()


def _serve(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"serve must be True or False, got {value!r}")
    return value


def _exposed_port(value: Any) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or value != SERVE_PORT:
        raise ValueError(
            f"exposed_port must be {SERVE_PORT}, the port an app's server listens on in its worker (other ports are "
            f"not supported), or None; got {value!r}"
        )
    return SERVE_PORT


def _count(option: str, minimum: int, meaning: str) -> Callable[[Any], Optional[int]]:
    """A validator of an optional whole number from `minimum` to MAX_INT32."""

    def validate(value: Any) -> Optional[int]:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_INT32:
            raise ValueError(
                f"{option} ({meaning}) must be a whole number from {minimum} to {MAX_INT32}, got {value!r}"
            )
        return value

    return validate


def _setup_function(value: Any) -> Optional[Callable[[], Any]]:
    if value is None:
        return None
    if not callable(value):
        raise ValueError(
            f"setup_function must be a function of no arguments (run once per warm worker, its result passed to the "
            f"function as its first argument), or None; got {value!r}"
        )
    setup: Callable[[], Any] = value
    return setup


# Each option and what checks it; `isolated` and `.on` accept exactly these.
_VALIDATORS: Dict[str, Callable[[Any], Any]] = {
    "requirements": _requirements,
    "machine_type": _machine_type,
    "keep_alive": _keep_alive,
    "host": _host,
    "credentials": _credentials,
    "python_version": _python_version,
    "timeout": _timeout,
    "serve": _serve,
    "exposed_port": _exposed_port,
    "max_concurrency": _count("max_concurrency", 1, "the most replicas the app runs at once"),
    "min_concurrency": _count("min_concurrency", 0, "replicas kept running when idle"),
    "max_multiplexing": _count("max_multiplexing", 1, "requests one replica takes at once"),
    "setup_function": _setup_function,
}
OPTION_NAMES = tuple(_VALIDATORS)
