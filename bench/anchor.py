"""The anchor's side of the benchmark: isolate 0.12.2 (the engine under fal-serverless 0.6.41) doing the same work.
Runs inside the anchor's own virtualenv (made by run.py); prints one JSON object of timings in seconds."""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from isolate import prepare_environment
from isolate.backends.settings import IsolateSettings
from isolate.connections import LocalPythonGRPC
from isolate.connections.common import serialize_object
from isolate.connections.grpc import definitions

warm_runs, cold_runs, build_runs = (int(a) for a in sys.argv[1:4])


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


def run_on(bridge):
    for result in bridge.Run(call):
        if result.is_complete:
            return result


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

python = str(env_path / "bin" / "python")
for _ in range(cold_runs):
    t = time.perf_counter()
    subprocess.run([python, "-c", "import cloudpickle"], check=True)
    results["floor_import"].append(time.perf_counter() - t)

print(json.dumps(results))
