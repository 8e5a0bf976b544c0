"""Benchmarks this project side by side with the original engine, isolate 0.12.2, in the same run.

    python bench/run.py [--quick] [--write]

Installs the anchor into a virtualenv of its own (bench/.anchor-venv, with uv), starts a fal-serverless server on
loopback for the cloud figures, measures, and prints a markdown table: metric, this project, anchor, floor, ratio
(anchor / this project, or this project / floor), goal met or not. --write also records it in bench/RESULTS.md.

Measured so far (issue 4 lists more): warm call (local, cloud), cold call with the environment built, first call
with new requirements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ANCHOR_VENV = HERE / ".anchor-venv"
ANCHOR = "isolate[grpc,build]==0.12.2"


def median(xs: List[float]) -> float:
    return statistics.median(xs)


def p99(xs: List[float]) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def uv() -> str:
    from uv import find_uv_bin

    return str(find_uv_bin())


def anchor_python() -> Path:
    python = ANCHOR_VENV / "bin" / "python"
    if not python.exists():
        print(f"installing the anchor ({ANCHOR}) into {ANCHOR_VENV}", file=sys.stderr)
        subprocess.run([uv(), "venv", "--quiet", "--python", sys.executable, str(ANCHOR_VENV)], check=True)
        subprocess.run([uv(), "pip", "install", "--quiet", "--python", str(python), ANCHOR, "cloudpickle"], check=True)
    return python


def time_calls(fn: Callable[[], object], runs: int, warmup: int = 20) -> List[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def start_server(data_dir: Path) -> tuple[subprocess.Popen[str], Dict[str, str]]:
    fal = str(Path(sys.executable).with_name("fal-serverless"))
    server = subprocess.Popen(
        [fal, "server", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert server.stdout is not None
    lines = []
    for line in server.stdout:
        lines.append(line.strip())
        if "listening on" in line:
            break
    keys = dict(line.split("=", 1) for line in lines if line.startswith("FAL_KEY_"))
    return server, {"FAL_HOST": lines[-1].rsplit(" ", 1)[-1], **keys}


def ours(warm_runs: int, cold_runs: int, build_runs: int) -> Dict[str, List[float]]:
    os.environ["FAL_SERVERLESS_CACHE_DIR"] = tempfile.mkdtemp(prefix="fal-bench-cache-")
    from fal_serverless import LocalHost, cloud, isolated, local

    def trivial() -> int:
        return 1

    results: Dict[str, List[float]] = {}
    warm_local = isolated(host=local, keep_alive=600)(trivial)
    results["warm_local"] = time_calls(warm_local, warm_runs)
    cold_local = warm_local.on(keep_alive=0)
    results["cold_local"] = time_calls(cold_local, cold_runs, warmup=2)

    server, env = start_server(Path(tempfile.mkdtemp(prefix="fal-bench-server-")))
    try:
        os.environ.update(env)
        warm_cloud = warm_local.on(cloud)
        results["warm_cloud"] = time_calls(warm_cloud, warm_runs)
        results["cold_cloud"] = time_calls(warm_cloud.on(keep_alive=0), cold_runs, warmup=2)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        for name in env:
            os.environ.pop(name, None)

    results["build_local"] = []
    for _ in range(build_runs):
        # A new host has an engine of its own, which takes the (empty) cache dir set here.
        os.environ["FAL_SERVERLESS_CACHE_DIR"] = tempfile.mkdtemp(prefix="fal-bench-cache-")
        fresh = LocalHost()

        def joke() -> str:
            import pyjokes  # type: ignore[import-not-found]

            return str(pyjokes.get_joke())

        fn = isolated(host=fresh, requirements=["pyjokes"], keep_alive=0)(joke)
        t = time.perf_counter()
        fn()
        results["build_local"].append(time.perf_counter() - t)

    results["floor_build"] = []
    for _ in range(build_runs):
        venv = Path(tempfile.mkdtemp(prefix="fal-bench-floor-")) / "venv"
        t = time.perf_counter()
        subprocess.run([uv(), "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
        subprocess.run(
            [uv(), "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), "pyjokes"], check=True
        )
        results["floor_build"].append(time.perf_counter() - t)
        shutil.rmtree(venv.parent, ignore_errors=True)
    return results


def row(
    metric: str, mine: List[float], anchor: Optional[List[float]], floor: Optional[List[float]], goal: str, met: bool
) -> str:
    def ms(xs: Optional[List[float]]) -> str:
        return "-" if not xs else f"{median(xs) * 1e3:.2f} ms (p99 {p99(xs) * 1e3:.2f})"

    ratios = []
    if anchor:
        ratios.append(f"{median(anchor) / median(mine):.1f}x faster than anchor")
    if floor:
        ratios.append(f"{median(mine) / median(floor):.2f}x the floor")
    verdict = "met" if met else "NOT met"
    return f"| {metric} | {ms(mine)} | {ms(anchor)} | {ms(floor)} | {'; '.join(ratios)} | {goal}: {verdict} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke test of the benchmark itself)")
    parser.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    args = parser.parse_args()
    warm_runs, cold_runs, build_runs = (200, 5, 2) if args.quick else (3000, 30, 5)
    os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")

    anchor_run = subprocess.run(
        [str(anchor_python()), str(HERE / "anchor.py"), str(warm_runs // 3), str(cold_runs), str(build_runs)],
        capture_output=True,
        text=True,
        check=True,
    )
    anchor = json.loads(anchor_run.stdout.strip().splitlines()[-1])
    mine = ours(warm_runs, cold_runs, build_runs)

    warm_local, warm_cloud = median(mine["warm_local"]), median(mine["warm_cloud"])
    floor_import = anchor["floor_import"]
    lines = [
        "| metric | this project | anchor (isolate 0.12.2) | floor | ratio | goal |",
        "|---|---|---|---|---|---|",
        row(
            "warm call, local",
            mine["warm_local"],
            anchor["warm"],
            None,
            "p50 < 0.3 ms and >= 10x anchor",
            warm_local < 0.3e-3 and median(anchor["warm"]) / warm_local >= 10,
        ),
        row(
            "warm call, cloud (loopback)",
            mine["warm_cloud"],
            anchor["warm"],
            None,
            "p50 < 1 ms and >= 10x anchor",
            warm_cloud < 1e-3 and median(anchor["warm"]) / warm_cloud >= 10,
        ),
        row(
            "cold call, local (env built)",
            mine["cold_local"],
            anchor["cold"],
            floor_import,
            "< 1.5x floor",
            median(mine["cold_local"]) < 1.5 * median(floor_import),
        ),
        row(
            "cold call, cloud, jailed (env built)",
            mine["cold_cloud"],
            anchor["cold"],
            floor_import,
            "< 1.5x floor",
            median(mine["cold_cloud"]) < 1.5 * median(floor_import),
        ),
        row(
            "first call, new requirements (pyjokes)",
            mine["build_local"],
            anchor["build"],
            mine["floor_build"],
            "< 1.2x floor",
            median(mine["build_local"]) < 1.2 * median(mine["floor_build"]),
        ),
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        machine = f"{os.cpu_count()} cores, {memory:.0f} GiB, Linux {platform.release()}"
        (HERE / "RESULTS.md").write_text(
            f"# Benchmark results\n\nCommand: `make bench` (`python bench/run.py --write`)  \nDate: {date.today()}  \n"
            f"Machine: {machine}  \nRuns: {warm_runs} warm calls (anchor: {warm_runs // 3}), {cold_runs} cold calls, "
            f'{build_runs} builds.\n\n{table}\n\nFloors: cold call, `python -c "import cloudpickle"` in the built '
            f"environment; first call, `uv venv` + `uv pip install pyjokes` timed here. Not measured yet: throughput, "
            f"payloads, scale (issue 4).\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
