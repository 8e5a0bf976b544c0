"""`fn.map`, `fn.starmap`, streamed results and `.aio`: the calling patterns beyond one call, one result.

A map pickles its function once and each input's `(args, kwargs)` as the input is reached, sending inputs only while
fewer than a window of them are unfinished (so a generator of a million inputs never sits in memory, here or on the
server). On the cloud host the inputs go over one `MapStream` RPC and the server runs them on up to `concurrency`
workers; on the local host, threads of this process each run one input at a time on the embedded engine.
"""

from __future__ import annotations

import asyncio
import functools
import os
import queue
import sys
import threading
import time
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Protocol,
    Tuple,
    TypeVar,
)

from . import _native, _serialization
from ._hosts import show_log

if TYPE_CHECKING:
    from ._isolated import IsolatedFunction

T = TypeVar("T")

#: How long the consumer waits for a message before it looks at the feeder, the progress bar and Ctrl-C again.
_POLL = 0.1
#: Inputs sent and not yet yielded, at most, when the map's concurrency is unknown here (the server chooses it).
_DEFAULT_WINDOW = 256
#: A map shows its progress bar (on a terminal) once it has run this long.
_PROGRESS_AFTER = 1.0


class MapTransport(Protocol):
    """Where a map's inputs go and its results come from: the server's `MapStream`, or threads of this process."""

    def send(self, inputs: List[bytes]) -> None: ...
    def close(self) -> None: ...
    def next(self, timeout: float) -> Optional[Tuple[Any, ...]]: ...
    def cancel(self) -> None: ...


def local_concurrency(machine_type: str) -> int:
    """The local host's default: as many workers of `machine_type` as this machine's cores hold (at most 32)."""
    from ._options import MACHINE_TYPES

    cpus = MACHINE_TYPES[machine_type].cpus
    return max(1, min(32, int((os.cpu_count() or 1) / max(cpus, 0.01))))


class LocalMap:
    """A map on the local host: `concurrency` threads, each running one input at a time through `call`."""

    #: Failures every input would meet: they end the map rather than each input.
    _ENDS_THE_MAP = (_native.EnvironmentBuildError, _native.MachineTypeUnavailableError, ValueError)

    def __init__(self, call: Callable[[bytes, threading.Event], Tuple[bool, bytes]], concurrency: int) -> None:
        self._call = call
        self._inputs: queue.Queue[Optional[Tuple[int, bytes]]] = queue.Queue()
        self._events: queue.Queue[Tuple[Any, ...]] = queue.Queue()
        self._cancelled = threading.Event()
        self._sent = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"fal-serverless-map-{n}", daemon=True) for n in range(concurrency)
        ]
        self._running = len(self._threads)
        for thread in self._threads:
            thread.start()

    def send(self, inputs: List[bytes]) -> None:
        for payload in inputs:
            self._inputs.put((self._sent, payload))
            self._sent += 1

    def close(self) -> None:
        for _ in self._threads:
            self._inputs.put(None)

    def next(self, timeout: float) -> Optional[Tuple[Any, ...]]:
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                return None
            if event[0] != "stopped":
                return event
            self._running -= 1
            if self._running == 0:
                return ("end",)

    def cancel(self) -> None:
        self._cancelled.set()
        self.close()

    def _work(self) -> None:
        try:
            while not self._cancelled.is_set():
                taken = self._inputs.get()
                if taken is None:
                    return
                index, payload = taken
                try:
                    raised, reply = self._call(payload, self._cancelled)
                except _native.CallCancelledError:
                    return
                except self._ENDS_THE_MAP as exc:
                    self._events.put(("fatal", exc))
                    return
                except BaseException as exc:  # this input's failure, whatever it is, is its result
                    self._events.put(("error", index, exc))
                else:
                    self._events.put(("result", index, raised, reply))
        finally:
            self._events.put(("stopped",))


class _Progress:
    """`name: 120/1000 done, 45.2/s, 3 errors` on stderr, redrawn in place; only on a terminal, only for maps that
    run longer than a second."""

    def __init__(self, name: str, total: Optional[int]) -> None:
        self.name, self.total = name, total
        self.done = self.errors = 0
        self.started = time.monotonic()
        self.drawn = 0.0
        self.shown = False
        try:
            self.enabled = sys.stderr.isatty()
        except (AttributeError, ValueError):
            self.enabled = False

    def update(self, failed: bool = False, count: bool = True) -> None:
        if count:
            self.done += 1
            self.errors += failed
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.started < _PROGRESS_AFTER or now - self.drawn < 0.1:
            return
        self.drawn, self.shown = now, True
        rate = self.done / max(now - self.started, 1e-9)
        total = "?" if self.total is None else str(self.total)
        sys.stderr.write(f"\r{self.name}: {self.done}/{total} done, {rate:.1f}/s, {self.errors} errors ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            self.drawn = 0.0
            self.started -= _PROGRESS_AFTER
            self.update(count=False)
            sys.stderr.write("\n")
            sys.stderr.flush()


class _Failed:
    """An input's exception, as kept until its turn to be yielded (or raised)."""

    __slots__ = ("exception",)

    def __init__(self, exception: BaseException) -> None:
        self.exception = exception


def run_map(
    fn: IsolatedFunction[Any],
    arguments: Iterable[Tuple[Tuple[Any, ...], Dict[str, Any]]],
    total: Optional[int],
    concurrency: Optional[int],
    return_exceptions: bool,
    ordered: bool,
) -> Iterator[Any]:
    """The results of `fn` over `arguments` (each input's `(args, kwargs)`), as `fn.map` documents them."""
    func, options = fn.func, fn.options
    if streams(func):
        raise TypeError(
            f"{getattr(func, '__qualname__', func)} is a generator function: map runs functions that return a value. "
            f"Collect its items in a plain function (return list(...)) to map it, or call it for a stream"
        )
    if concurrency is not None and (
        isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
    ):
        raise ValueError(
            f"concurrency must be a whole number of 1 or more (or None: as capacity allows), got {concurrency!r}"
        )
    concurrency = concurrency or options.max_concurrency
    function = _serialization.dump_function(func)
    transport = options.host.start_map(func, options, function.payload, concurrency)
    window = threading.Semaphore(max(2 * concurrency, 64) if concurrency else _DEFAULT_WINDOW)
    feeder = _Feeder(func, arguments, transport, window)
    progress = _Progress(getattr(func, "__qualname__", "map"), total)
    pending: Dict[int, Any] = {}
    next_index = 0
    finished = 0
    try:
        feeder.start()
        while feeder.sent is None or finished < feeder.sent:
            event = transport.next(_POLL)
            if event is None:
                feeder.raise_failure()
                progress.update(count=False)
                continue
            kind = event[0]
            if kind == "log":
                show_log(event[2], event[3])
                continue
            if kind == "end":
                feeder.raise_failure()
                break
            if kind == "fatal":
                raise event[1]
            if kind not in ("result", "error"):
                continue
            index = event[1]
            outcome: Any
            if kind == "error":
                outcome = _Failed(event[2])
            else:
                try:
                    outcome = _serialization.load_reply(event[2], event[3], func, function)
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # the input's own exception (SystemExit included), kept for its turn
                    outcome = _Failed(exc)
            finished += 1
            progress.update(failed=isinstance(outcome, _Failed))
            if not ordered:
                window.release()
                yield _result(outcome, return_exceptions)
                continue
            pending[index] = outcome
            while next_index in pending:
                outcome = pending.pop(next_index)
                next_index += 1
                window.release()
                yield _result(outcome, return_exceptions)
    finally:
        # Done, failed, abandoned by the consumer or Ctrl-C: what is left is cancelled and its workers stopped.
        feeder.stop()
        transport.cancel()
        progress.close()


def _result(outcome: Any, return_exceptions: bool) -> Any:
    if not isinstance(outcome, _Failed):
        return outcome
    if return_exceptions:
        return outcome.exception
    raise outcome.exception


class _Feeder(threading.Thread):
    """Pickles and sends a map's inputs as the window lets it; `sent` is their count once all are sent."""

    def __init__(
        self,
        func: Callable[..., Any],
        arguments: Iterable[Tuple[Tuple[Any, ...], Dict[str, Any]]],
        transport: MapTransport,
        window: threading.Semaphore,
    ) -> None:
        super().__init__(name="fal-serverless-map-feeder", daemon=True)
        self._func, self._arguments, self._transport, self._window = func, arguments, transport, window
        self._stopped = threading.Event()
        self._failure: Optional[BaseException] = None
        self.sent: Optional[int] = None

    def run(self) -> None:
        count = 0
        try:
            for args, kwargs in self._arguments:
                while not self._window.acquire(timeout=_POLL):
                    if self._stopped.is_set():
                        return
                if self._stopped.is_set():
                    return
                self._transport.send([_serialization.dump_arguments(self._func, args, kwargs)])
                count += 1
            self._transport.close()
            self.sent = count
        except BaseException as exc:  # the user's iterable raised, or an input would not pickle
            self._failure = exc

    def raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def stop(self) -> None:
        self._stopped.set()


def stream(fn: IsolatedFunction[Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Iterator[Any]:
    """A generator function's call: its items as the worker yields them. Closing the iterator early (a `break`)
    stops the call and its worker; an exception raised mid-stream is raised where it happened."""
    items: queue.Queue[Tuple[str, Any]] = queue.Queue(maxsize=16)
    stopped = threading.Event()

    def on_item(item: bytes) -> None:
        while not stopped.is_set():
            try:
                items.put(("item", item), timeout=_POLL)
                return
            except queue.Full:
                continue
        raise _native.CallCancelledError("the consumer stopped reading the stream")

    def finish(event: Tuple[str, Any]) -> None:
        # The consumer may have gone with the queue full: then no one waits for the end.
        while not stopped.is_set():
            try:
                items.put(event, timeout=_POLL)
                return
            except queue.Full:
                continue

    def call() -> None:
        try:
            fn.options.host.run(fn.func, fn.options, args, kwargs, on_item=on_item, cancel=stopped)
        except _native.CallCancelledError as exc:
            if not stopped.is_set():
                finish(("raised", exc))
        except BaseException as exc:
            finish(("raised", exc))
        else:
            finish(("done", None))

    worker = threading.Thread(target=call, name="fal-serverless-stream", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = items.get()
            if kind == "item":
                yield _serialization.load_item(value, fn.func)
            elif kind == "done":
                return
            else:
                raise value
    finally:
        stopped.set()


def call_async(fn: IsolatedFunction[Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """`fn.aio(...)`: an awaitable of the call (run on a thread, so the caller's event loop keeps running), or for a
    generator function an async iterator of its items."""
    if streams(fn.func):
        return _async_items(fn(*args, **kwargs))
    loop = asyncio.get_running_loop()
    return loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))


async def _async_items(items: Iterator[Any]) -> AsyncIterator[Any]:
    loop = asyncio.get_running_loop()
    end = object()
    try:
        while True:
            item = await loop.run_in_executor(None, next, items, end)
            if item is end:
                return
            yield item
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


def streams(func: Callable[..., Any]) -> bool:
    """Whether calling `func` gives an iterator of its items: a generator function or an async generator function
    (the worker decides the same way)."""
    import inspect

    return inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func)
