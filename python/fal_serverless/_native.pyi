"""The engine, compiled from Rust (crates/python)."""

from pathlib import Path
from threading import Event
from typing import Any, Callable, List, Optional, Tuple

class FalServerlessError(Exception): ...
class EnvironmentBuildError(FalServerlessError): ...
class WorkerDiedError(FalServerlessError): ...
class MachineTypeExceededError(WorkerDiedError): ...
class MachineTypeUnavailableError(FalServerlessError): ...
class PayloadTooLargeError(FalServerlessError): ...
class CallTimeoutError(FalServerlessError): ...
class AuthenticationError(FalServerlessError): ...
class NoServerConfiguredError(FalServerlessError): ...
class ServerBusyError(FalServerlessError): ...
class ServerUnavailableError(FalServerlessError): ...
class CallCancelledError(FalServerlessError): ...

class Engine:
    def __init__(self, uv: str, cache_dir: Optional[str] = None) -> None: ...
    @property
    def cache_dir(self) -> Path: ...
    def call(
        self,
        *,
        python_version: str,
        interpreter: Optional[str],
        requirements: List[str],
        serializer: str,
        machine_type: str,
        keep_alive: float,
        payload: bytes,
        on_log: Callable[[str, str], None],
        timeout: Optional[float] = None,
        tenant: str = "local",
        setup: Optional[bytes] = None,
        function: Optional[bytes] = None,
        on_item: Optional[Callable[[bytes], None]] = None,
        cancel: Optional[Event] = None,
    ) -> Tuple[bool, bytes]: ...
    def workers(self) -> List[Tuple[int, str, str, bool, int]]: ...
    def shutdown(self) -> None: ...

class MapRun:
    """A map running on the server: inputs go in with `send`, messages come out of `next`."""

    def send(self, inputs: List[bytes]) -> None: ...
    def close(self) -> None: ...
    def next(self, timeout: float) -> Optional[Tuple[Any, ...]]: ...
    def cancel(self) -> None: ...

class CloudClient:
    def __init__(self, key_id: Optional[str] = None, key_secret: Optional[str] = None) -> None: ...
    @property
    def uri(self) -> str: ...
    @property
    def key(self) -> Tuple[str, str]: ...
    def run(
        self,
        *,
        python_version: str,
        requirements: List[str],
        serializer: str,
        machine_type: str,
        keep_alive: int,
        payload: bytes,
        function_name: str,
        on_log: Callable[[str, str], None],
        timeout: Optional[float] = None,
        setup: Optional[bytes] = None,
        on_item: Optional[Callable[[bytes], None]] = None,
        cancel: Optional[Event] = None,
    ) -> Tuple[bool, bytes]: ...
    def map_start(
        self,
        *,
        python_version: str,
        requirements: List[str],
        serializer: str,
        machine_type: str,
        keep_alive: int,
        function: bytes,
        function_name: str,
        timeout: Optional[float] = None,
        setup: Optional[bytes] = None,
        concurrency: Optional[int] = None,
    ) -> MapRun:
        """Starts a map of `function` (pickled alone) on the server."""
    def register_application(
        self,
        *,
        python_version: str,
        requirements: List[str],
        serializer: str,
        machine_type: str,
        keep_alive: int,
        payload: bytes,
        function_name: str,
        alias: Optional[str],
        auth_mode: str,
        max_concurrency: Optional[int],
        min_concurrency: Optional[int],
        max_multiplexing: Optional[int],
        exposed_port: Optional[int],
        on_log: Callable[[str, str], None],
    ) -> Tuple[str, str]:
        """Deploys a web endpoint (or, with no `exposed_port` and no alias, a plain function for a schedule);
        returns `(revision_id, user_id)`."""
    def register_cron(self, revision: str, cron: str) -> str:
        """Schedules the registered function `revision` at the times of `cron` (UTC); returns the schedule's id."""
    def list_aliases(self) -> List[AliasRow]: ...
    def delete_alias(self, alias: str) -> str:
        """Removes an alias; returns the revision it pointed to."""
    def logs(
        self,
        *,
        alias: Optional[str],
        lines: Optional[int],
        follow: bool,
        on_line: Callable[[float, str, str, str, str], None],
    ) -> None:
        """`on_line(timestamp, source, app, request_id, line)` for each line."""
    def workers(self) -> List[Tuple[str, str, str, str, bool, int]]: ...

#: (alias, revision, auth_mode, max_concurrency, min_concurrency, max_multiplexing, machine_type, replicas, user_id,
#: created_at in seconds since the epoch)
AliasRow = Tuple[str, str, str, int, int, int, str, int, str, float]

def cli_main(argv: List[str]) -> int: ...
def local_server_credentials_path() -> Path: ...
def prepare_local_server_dir() -> Path: ...
def read_local_server() -> Optional[Tuple[str, int]]: ...
def normalize_requirements(requirements: List[str]) -> List[str]: ...
def machine_types() -> List[Tuple[str, float, int, int]]: ...
def environment_key(python_version: str, requirements: List[str], serializer: str) -> str: ...

#: The most seconds keep_alive and a call's timeout may be (what the wire's int32 keep_alive carries).
MAX_SECONDS: int
#: The variable naming the Python that `fal-serverless function serve` runs the user's file with.
PYTHON_VARIABLE: str
