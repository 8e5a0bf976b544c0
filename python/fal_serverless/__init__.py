"""fal-serverless: run a Python function in an isolated environment with its own requirements and machine type.

from fal_serverless import isolated, local

@isolated(requirements=["pyjokes"], machine_type="S", host=local)
def get_joke():
    import pyjokes
    return pyjokes.get_joke()

print(get_joke())

A function with `serve=True` is deployed as a web endpoint with `fn.serve(alias=..., auth=...)`, which returns its URL.
"""

from __future__ import annotations

from ._cached import cached
from ._credentials import CloudKeyCredentials, Credentials, FalServerlessKeyCredentials
from ._hosts import AUTH_MODES, CloudHost, Deployment, Host, LocalHost, cloud, local
from ._isolated import IsolatedFunction, isolated
from ._options import MACHINE_TYPES, SERVE_REQUIREMENTS, MachineTypeInfo
from ._storage import FileSpec, download_file, download_weights, sync_dir
from .exceptions import (
    AuthenticationError,
    CallTimeoutError,
    EnvironmentBuildError,
    FalServerlessError,
    MachineTypeExceededError,
    MachineTypeUnavailableError,
    NoServerConfiguredError,
    PayloadTooLargeError,
    RemoteError,
    SerializationError,
    ServerUnavailableError,
    WorkerDiedError,
)

__all__ = [
    "AUTH_MODES",
    "MACHINE_TYPES",
    "SERVE_REQUIREMENTS",
    "AuthenticationError",
    "CallTimeoutError",
    "CloudHost",
    "CloudKeyCredentials",
    "Credentials",
    "Deployment",
    "EnvironmentBuildError",
    "FalServerlessError",
    "FalServerlessKeyCredentials",
    "FileSpec",
    "Host",
    "IsolatedFunction",
    "LocalHost",
    "MachineTypeExceededError",
    "MachineTypeInfo",
    "MachineTypeUnavailableError",
    "NoServerConfiguredError",
    "PayloadTooLargeError",
    "RemoteError",
    "SerializationError",
    "ServerUnavailableError",
    "WorkerDiedError",
    "cached",
    "cloud",
    "download_file",
    "download_weights",
    "isolated",
    "local",
    "sync_dir",
]
