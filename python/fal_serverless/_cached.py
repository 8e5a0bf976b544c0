"""`@cached`: memoize a function inside the warm worker that runs it.

This module is pickled by value (see `_serialization`), so a cached function works in an environment that does not
have fal_serverless installed. Its store is a module object registered in `sys.modules` of whatever process runs
it: in a worker, it lives exactly as long as that warm worker.
"""

from __future__ import annotations

import functools
import hashlib
import marshal
from typing import Any, Callable, TypeVar

R = TypeVar("R")

_STORE_MODULE = "__fal_serverless_cache__"


def cached(func: Callable[..., R]) -> Callable[..., R]:
    """Return `func` memoized per process, keyed by its code and its arguments."""
    code_key = (func.__module__, func.__qualname__, hashlib.sha256(marshal.dumps(func.__code__)).hexdigest())

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        import pickle
        import sys
        import types

        store = sys.modules.get(_STORE_MODULE)
        if store is None:
            store = types.ModuleType(_STORE_MODULE, "Values of @cached functions in this process.")
            store.values = {}  # type: ignore[attr-defined]
            sys.modules[_STORE_MODULE] = store
        values: dict[Any, Any] = store.values
        arguments: Any = (args, tuple(sorted(kwargs.items())))
        try:
            hash(arguments)
        except TypeError:
            arguments = pickle.dumps(arguments, protocol=5)
        key = (code_key, arguments)
        if key not in values:
            values[key] = func(*args, **kwargs)
        result: R = values[key]
        return result

    return wrapper
