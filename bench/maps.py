"""The map rows: one function over 10,000 trivial inputs, items per second, side by side in one run with
- this project: `fn.map(range(N))` on the cloud host (one `MapStream` RPC; the server runs the inputs on as many XS
  workers as the user's share of the capacity holds);
- Ray, from PyPI (its own virtualenv, bench/.ray-venv): `ray.get([f.remote(i) for i in range(N)])` on a local Ray
  started with this machine's cores;
- the original client's pattern on isolate 0.12.2 (bench/anchor.py): a `ThreadPoolExecutor` (the standard library's
  default size, as fal-serverless 0.6.41's `submit` uses) of calls, each thread with an agent of its own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

HERE = Path(__file__).resolve().parent
RAY_VENV = HERE / ".ray-venv"
RAY = "ray==2.60.0"
ITEMS = 10_000

RAY_SCRIPT = """
import json, sys, time
import ray
items = int(sys.argv[1])
ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)

@ray.remote
def identity(x):
    return x

assert ray.get([identity.remote(i) for i in range(200)]) == list(range(200))
runs = []
for _ in range(3):
    started = time.perf_counter()
    assert ray.get([identity.remote(i) for i in range(items)]) == list(range(items))
    runs.append(items / (time.perf_counter() - started))
print(json.dumps(runs))
"""


def ray_python(uv: str) -> Path:
    """Ray's own virtualenv, (re)made when its pin changes."""
    python = RAY_VENV / "bin" / "python"
    marker = RAY_VENV / "installed.txt"
    if not marker.exists() or marker.read_text() != RAY:
        print(f"installing {RAY} into {RAY_VENV}", file=sys.stderr)
        shutil.rmtree(RAY_VENV, ignore_errors=True)
        subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(RAY_VENV)], check=True)
        subprocess.run([uv, "pip", "install", "--quiet", "--python", str(python), RAY], check=True)
        marker.write_text(RAY)
    return python


def measure_ray(uv: str, items: int = ITEMS) -> List[float]:
    """Items per second of three runs on a local Ray."""
    run = subprocess.run(
        [str(ray_python(uv)), "-c", RAY_SCRIPT, str(items)], stdout=subprocess.PIPE, text=True, check=True
    )
    runs: List[float] = json.loads(run.stdout.strip().splitlines()[-1])
    return runs


def measure_ours(isolated: Callable[..., Any], host: Any, items: int = ITEMS) -> List[float]:
    """Items per second of three maps on `host` (the cloud host, pointed at the bench's server)."""

    def identity(x: int) -> int:
        return x

    fn = isolated(host=host, keep_alive=600)(identity)
    assert list(fn.map(range(200))) == list(range(200))  # the workers warm
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        assert list(fn.map(range(items))) == list(range(items))
        runs.append(items / (time.perf_counter() - started))
    return runs


def rows(ours: List[float], ray: List[float], anchor: List[float], median: Callable[[List[float]], float]) -> List[str]:
    mine, theirs, original = median(ours), median(ray), median(anchor)
    met = mine > theirs and mine > original
    return [
        f"| map of {ITEMS} trivial items, cloud (items/s, median of 3) | {mine:.0f} items/s | "
        f"{original:.0f} items/s (a thread pool of calls, as 0.6.41's `submit`) | Ray {RAY.split('==')[1]}: "
        f"{theirs:.0f} items/s (`ray.get([f.remote(i) ...])`) | {mine / original:.1f}x the anchor; "
        f"{mine / theirs:.1f}x Ray | ahead of both: {'met' if met else 'NOT met'} |"
    ]


def summary(ours: List[float], ray: List[float], anchor: List[float]) -> Dict[str, List[float]]:
    return {"ours": ours, "ray": ray, "anchor": anchor}
