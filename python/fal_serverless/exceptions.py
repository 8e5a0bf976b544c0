"""The errors fal-serverless raises. An exception raised by an isolated function is re-raised as its own type."""

from __future__ import annotations

from ._native import (
    AuthenticationError,
    CallTimeoutError,
    EnvironmentBuildError,
    FalServerlessError,
    MachineTypeExceededError,
    MachineTypeUnavailableError,
    NoServerConfiguredError,
    PayloadTooLargeError,
    ServerBusyError,
    ServerUnavailableError,
    WorkerDiedError,
)


class SerializationError(FalServerlessError):
    """A function, its arguments or its result could not be pickled or unpickled on one side."""


class RemoteError(FalServerlessError):
    """An exception raised remotely whose type could not be recreated here (its class is not importable locally).

    `remote_type` is the qualified name of the original type.
    """

    def __init__(self, remote_type: str, message: str) -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type


class RemoteTraceback(Exception):
    """Carries the traceback of the remote side; set as `__cause__` of a re-raised exception so both are shown."""

    def __init__(self, traceback: str) -> None:
        super().__init__(traceback)
        self.traceback = traceback

    def __str__(self) -> str:
        return f'\n"""\n{self.traceback.rstrip()}\n"""'


__all__ = [
    "AuthenticationError",
    "CallTimeoutError",
    "EnvironmentBuildError",
    "FalServerlessError",
    "MachineTypeExceededError",
    "MachineTypeUnavailableError",
    "NoServerConfiguredError",
    "PayloadTooLargeError",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "ServerBusyError",
    "ServerUnavailableError",
    "WorkerDiedError",
]
