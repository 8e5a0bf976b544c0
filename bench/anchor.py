"""The anchor's side of the benchmark: isolate 0.12.2 (the engine under fal-serverless 0.6.41) doing the same work.
Runs inside the anchor's own virtualenv (made by run.py); prints one JSON object of timings in seconds."""

import json
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import cloudpickle
import grpc
import numpy
from isolate import prepare_environment
from isolate.backends.settings import IsolateSettings
from isolate.connections import LocalPythonGRPC
from isolate.connections.common import serialize_object
from isolate.connections.grpc import definitions

warm_runs, cold_runs, build_runs, throughput_calls, map_items = (int(a) for a in sys.argv[1:6])
CALLERS = (1, 4, 16)
PAYLOADS = {"1 KB": 1 << 10, "1 MB": 1 << 20, "100 MB": 100 << 20}


def trivial():
    return 1


def settings():
    return IsolateSettings(cache_dir=Path(tempfile.mkdtemp()), serialization_method="cloudpickle")


def connection(requirements, context):
    env = prepare_environment("virtualenv", requirements=requirements, context=context)
    path = env.create()
    # As isolate's own server does: the agent imports grpc and isolate from the controller's environment.
    return LocalPythonGRPC(env, path, extra_inheritance_paths=[Path(sys.prefix)]), path


call = definitions.FunctionCall(
    function=definitions.SerializedObject(
        method="cloudpickle", definition=serialize_object("cloudpickle", trivial), was_it_raised=False
    )
)


def run_on(bridge, function_call=None):
    # Drain the whole stream: the agent serves one RPC at a time, and a call is over only when its stream is.
    complete = None
    for result in bridge.Run(function_call or call):
        if result.is_complete:
            complete = result
    return complete


context = settings()
conn, env_path = connection(["cloudpickle"], context)
results = {"warm": [], "cold": [], "build": [], "floor_import": []}

with conn._establish_bridge() as bridge:  # one agent, reused: isolate's warm path
    for _ in range(20):
        run_on(bridge)
    for _ in range(warm_runs):
        t = time.perf_counter()
        run_on(bridge)
        results["warm"].append(time.perf_counter() - t)

for _ in range(cold_runs):  # a new agent per call, environment already built
    t = time.perf_counter()
    with conn._establish_bridge() as bridge:
        run_on(bridge)
    results["cold"].append(time.perf_counter() - t)

for _ in range(build_runs):  # a new environment with pyjokes, uv's and pip's caches warm
    context = settings()
    t = time.perf_counter()
    build_conn, _ = connection(["cloudpickle", "pyjokes"], context)
    with build_conn._establish_bridge() as bridge:
        run_on(bridge)
    results["build"].append(time.perf_counter() - t)

# Throughput: each caller thread has an agent of its own (an agent serves one call at a time, like our workers).
results["throughput"] = {}
for callers in CALLERS:
    with ExitStack() as stack:
        bridges = [stack.enter_context(conn._establish_bridge()) for _ in range(callers)]
        per_caller = max(1, throughput_calls // callers)
        done = []

        def caller(bridge, per_caller=per_caller, done=done):
            for _ in range(per_caller):
                done.append(cloudpickle.loads(run_on(bridge).result.definition) == 1)

        threads = [threading.Thread(target=caller, args=(b,)) for b in bridges]
        t = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - t
    results["throughput"][str(callers)] = {"per_second": len(done) / elapsed, "ok": all(done), "calls": len(done)}

# The original client's way to run many calls: `submit` on a ThreadPoolExecutor of the standard library's default
# size, each call a run of its own; here each thread has an agent of its own (bench/map.py).
import functools  # noqa: E402
import queue  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402


def identity(x):
    return x


results["map"] = []
with ThreadPoolExecutor() as pool, ExitStack() as stack:
    agents = queue.Queue()
    for _ in range(pool._max_workers):
        agents.put(stack.enter_context(conn._establish_bridge()))

    def submitted(i):
        bridge = agents.get()
        try:
            item_call = definitions.FunctionCall(
                function=definitions.SerializedObject(
                    method="cloudpickle",
                    definition=cloudpickle.dumps(functools.partial(identity, i)),
                    was_it_raised=False,
                )
            )
            return cloudpickle.loads(run_on(bridge, item_call).result.definition)
        finally:
            agents.put(bridge)

    items = map_items
    assert list(pool.map(submitted, range(200))) == list(range(200))
    for _ in range(3):
        t = time.perf_counter()
        assert list(pool.map(submitted, range(items))) == list(range(items))
        results["map"].append(items / (time.perf_counter() - t))

# Payloads: the data goes out as the function's closure and comes back as its result, through a reused agent.

results["payload"] = {}
np_context = settings()
np_conn, _ = connection(["cloudpickle", "numpy"], np_context)
with np_conn._establish_bridge() as bridge:
    for name, size in PAYLOADS.items():
        for kind, data in (("bytes", b"x" * size), ("numpy", numpy.ones(size // 8))):
            times = []
            try:
                for _ in range(3 if size >= 100 << 20 else 10):
                    t = time.perf_counter()
                    payload_call = definitions.FunctionCall(
                        function=definitions.SerializedObject(
                            method="cloudpickle",
                            definition=cloudpickle.dumps(lambda data=data: data),
                            was_it_raised=False,
                        )
                    )
                    back = cloudpickle.loads(run_on(bridge, payload_call).result.definition)
                    times.append(time.perf_counter() - t)
                    assert len(back) == len(data)
            except grpc.RpcError as error:  # isolate's agent caps messages at 4 MB
                results.setdefault("payload_errors", {})[f"{kind} {name}"] = error.details()
                continue
            results["payload"][f"{kind} {name}"] = times

python = str(env_path / "bin" / "python")
for _ in range(cold_runs):
    t = time.perf_counter()
    subprocess.run([python, "-c", "import cloudpickle"], check=True)
    results["floor_import"].append(time.perf_counter() - t)

print(json.dumps(results))
