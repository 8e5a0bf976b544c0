"""Pydantic 1 models defined in the user's script, pickled by value (FastAPI 0.99.1, which `serve=True` installs,
takes pydantic 1; a model is how a web endpoint's JSON body is declared).

cloudpickle cannot copy such a class as it is: what pydantic generates in it (its fields' validators, compiled by
Cython) does not pickle. So the class travels as its definition, the class body pydantic was given (annotations,
defaults as `FieldInfo`, private attributes, `Config`, methods and validators), and is rebuilt in the worker by
pydantic's own metaclass. This module travels by value with it: `rebuild` runs where fal_serverless is not installed.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Tuple

#: Attributes pydantic's decorators set on the classmethods they return (`@validator`, `@root_validator`), which
#: cloudpickle's copy of a classmethod would drop.
_DECORATOR_ATTRIBUTES = ("__validator_config__", "__root_validator_config__")


def reduce_model(cls: Any) -> Optional[Tuple[Any, Tuple[Any, ...]]]:
    """The reduction of `cls` if it is a pydantic 1 model that must travel by value; else None."""
    pydantic_main = sys.modules.get("pydantic.main")
    metaclass = getattr(pydantic_main, "ModelMetaclass", None)
    version = str(getattr(sys.modules.get("pydantic.version"), "VERSION", ""))
    if metaclass is None or not version.startswith("1.") or not isinstance(cls, metaclass):
        return None
    if cls is getattr(pydantic_main, "BaseModel", None) or _importable(cls):
        return None
    own = cls.__dict__
    annotations: Dict[str, Any] = dict(own.get("__annotations__", {}))
    namespace: Dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    if own.get("__doc__") is not None:
        namespace["__doc__"] = own["__doc__"]
    namespace["__annotations__"] = annotations
    decorated: Dict[str, Tuple[Any, Dict[str, Any]]] = {}
    private = own.get("__private_attributes__", {})
    for key, value in own.items():
        if key.startswith("__") or key == "_abc_impl" or key in private:
            continue
        attributes = {a: getattr(value, a) for a in _DECORATOR_ATTRIBUTES if hasattr(value, a)}
        if attributes:
            decorated[key] = (value, attributes)
        else:
            namespace[key] = value
    fields = own.get("__fields__", {})
    for key in annotations:
        if key in fields:
            namespace[key] = fields[key].field_info
        elif key in private:
            namespace[key] = private[key]
    return rebuild, (type(cls), cls.__name__, cls.__bases__, namespace, decorated)


def rebuild(
    metaclass: Any, name: str, bases: Tuple[type, ...], namespace: Dict[str, Any], decorated: Dict[str, Any]
) -> Any:
    """The model class again, made by pydantic from its definition (in the worker)."""
    for key, (method, attributes) in decorated.items():
        for attribute, value in attributes.items():
            setattr(method, attribute, value)
        namespace[key] = method
    return metaclass(name, bases, namespace)


def _importable(cls: Any) -> bool:
    """Whether pickle would find `cls` by reference (an installed package's model, say)."""
    import cloudpickle

    module = sys.modules.get(cls.__module__)
    if module is None or cls.__module__ == "__main__" or cls.__module__ in cloudpickle.list_registry_pickle_by_value():
        return False
    found: Any = module
    for part in cls.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is cls
