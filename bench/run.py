"""Benchmarks this project side by side with the original engine, isolate 0.12.2, in the same run.

    python bench/run.py [--quick] [--write]

Installs the anchor into a virtualenv of its own (bench/.anchor-venv, with uv), starts a fal-serverless server on
loopback for the cloud figures, measures, and prints a markdown table: metric, this project, anchor, floor, ratio
(anchor / this project, or this project / floor), goal met or not. --write also records it in bench/RESULTS.md.

Measures: warm calls (local, cloud), cold calls (environment built), the first call with new requirements,
throughput at 1/4/16/64 callers, a map of 10,000 items (beside Ray's, bench/maps.py), payload round trips (1 KB,
1 MB, 100 MB; bytes and numpy), warm latency across 1/10/100 environments and the server's memory; and the floors
that explain them (the smallest RPC, joining a cgroup, one 100 MB copy); and web endpoints (bench/gateway.py: a
request through the gateway against the replica's own uvicorn, requests/s, the first request from zero replicas).
What the figures mean is written by hand in bench/RESULTS.md, below a marker --write keeps.
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

import maps as bench_map  # bench/maps.py

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


ANCHOR_PACKAGES = [ANCHOR, "cloudpickle", "numpy"]


def anchor_python() -> Path:
    """The anchor's own virtualenv, (re)made whenever the packages it should hold change."""
    python = ANCHOR_VENV / "bin" / "python"
    marker = ANCHOR_VENV / "installed.json"
    if not marker.exists() or json.loads(marker.read_text()) != ANCHOR_PACKAGES:
        print(f"installing the anchor ({ANCHOR}) into {ANCHOR_VENV}", file=sys.stderr)
        shutil.rmtree(ANCHOR_VENV, ignore_errors=True)
        subprocess.run([uv(), "venv", "--quiet", "--python", sys.executable, str(ANCHOR_VENV)], check=True)
        subprocess.run([uv(), "pip", "install", "--quiet", "--python", str(python), *ANCHOR_PACKAGES], check=True)
        marker.write_text(json.dumps(ANCHOR_PACKAGES))
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


def start_server(data_dir: Path, config: str = "") -> tuple[subprocess.Popen[str], Dict[str, str]]:
    fal = str(Path(sys.executable).with_name("fal-serverless"))
    if config:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (data_dir / "config.toml").write_text(config)
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


ANALYSIS_MARKER = "<!-- analysis: written by hand, kept by --write -->"
CALLERS = (1, 4, 16, 64)
PAYLOADS = {"1 KB": 1 << 10, "1 MB": 1 << 20, "100 MB": 100 << 20}
SCALES = (1, 10, 100)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def throughput(fn: Callable[[int], int], callers: int, calls: int) -> Dict[str, float]:
    """Calls per second with `callers` threads; every result checked, none lost."""
    import threading

    per_caller = max(1, calls // callers)
    results: List[bool] = []

    def caller(offset: int) -> None:
        for i in range(per_caller):
            results.append(fn(offset + i) == 2 * (offset + i))

    threads = [threading.Thread(target=caller, args=(c * per_caller,)) for c in range(callers)]
    t = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t
    return {"per_second": len(results) / elapsed, "ok": float(all(results) and len(results) == callers * per_caller)}


def ours(warm_runs: int, cold_runs: int, build_runs: int, calls: int, map_items: int, scale: bool) -> Dict[str, object]:
    os.environ["FAL_SERVERLESS_CACHE_DIR"] = tempfile.mkdtemp(prefix="fal-bench-cache-")
    from fal_serverless import LocalHost, cloud, isolated, local

    def trivial() -> int:
        return 1

    results: Dict[str, object] = {}
    warm_local = isolated(host=local, keep_alive=600)(trivial)
    results["warm_local"] = time_calls(warm_local, warm_runs)
    cold_local = warm_local.on(keep_alive=0)
    results["cold_local"] = time_calls(cold_local, cold_runs, warmup=2)

    # The scale rows keep 100 warm XS workers of one user: above the defaults' caps (64 workers, 50 environments per
    # user, 3/4 of the host's memory, 256 MB held per XS worker), so this server raises them. Those rows measure the
    # cost of many warm environments, not the sharing policy; each such worker uses about 20 MB in fact.
    many_warm = (
        "[capacity]\nmemory_gb = 64\nuser_share = 1.0\n[limits]\nmax_workers_per_user = 200\n"
        "[environments]\nmax_per_user = 200\n"
    )
    server, env = start_server(Path(tempfile.mkdtemp(prefix="fal-bench-server-")), many_warm)
    try:
        os.environ.update(env)
        warm_cloud = warm_local.on(cloud)
        results["warm_cloud"] = time_calls(warm_cloud, warm_runs)
        # The network part alone: the smallest authenticated RPC to the same server (it lists the caller's workers).
        results["floor_rpc"] = time_calls(cloud.client(None).workers, warm_runs)
        results["cold_cloud"] = time_calls(warm_cloud.on(keep_alive=0), cold_runs, warmup=2)

        def double(x: int) -> int:
            return 2 * x

        doubler = isolated(host=cloud, keep_alive=600)(double)
        results["throughput"] = {str(c): throughput(doubler, c, calls) for c in CALLERS}
        results["map"] = bench_map.measure_ours(isolated, cloud, map_items)

        import numpy

        def echo(data: object) -> object:
            return data

        echo_bytes = isolated(host=cloud, keep_alive=600, machine_type="M")(echo)
        echo_numpy = echo_bytes.on(requirements=["numpy"])
        payloads: Dict[str, List[float]] = {}
        for name, size in PAYLOADS.items():
            for kind, fn, data in (("bytes", echo_bytes, b"x" * size), ("numpy", echo_numpy, numpy.ones(size // 8))):
                fn(data[:1])
                times = []
                for _ in range(3 if size >= 100 << 20 else 10):
                    t = time.perf_counter()
                    back = fn(data)
                    times.append(time.perf_counter() - t)
                    assert len(back) == len(data)  # type: ignore[arg-type]
                payloads[f"{kind} {name}"] = times
        results["payload"] = payloads

        if scale:
            # Distinct environments (each requirement set hashes to its own key), each with a warm worker.
            envs = [doubler.on(requirements=[f"pyjokes!=0.0.{i}"]) for i in range(max(SCALES))]
            results["rss_idle"] = rss_bytes(server.pid)
            latency: Dict[str, List[float]] = {}
            for count in SCALES:
                for fn in envs[:count]:
                    fn(1)
                picks = [envs[i % count] for i in range(warm_runs)]
                times = []
                for i, fn in enumerate(picks):
                    t = time.perf_counter()
                    fn(i)
                    times.append(time.perf_counter() - t)
                latency[str(count)] = times
            results["scale"] = latency
            results["rss_100_workers"] = rss_bytes(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        for name in env:
            os.environ.pop(name, None)

    # The network namespace's part of a cold call: the same cold call where the jail makes a loopback-only namespace
    # itself (no veth, no nftables).
    server, env = start_server(Path(tempfile.mkdtemp(prefix="fal-bench-server-")), '[network]\negress = "none"\n')
    try:
        os.environ.update(env)
        results["cold_cloud_loopback"] = time_calls(warm_local.on(cloud, keep_alive=0), cold_runs, warmup=2)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        for name in env:
            os.environ.pop(name, None)

    # Jailed builds on a server: a user's first call with new requirements (nothing cached on the server), then a
    # second user's with the same requirements (the wheels the first one's build left in the shared cache).
    results["build_cloud"], results["build_cloud_second_user"] = [], []
    for _ in range(build_runs):
        server, env = start_server(Path(tempfile.mkdtemp(prefix="fal-bench-server-")))
        try:
            for user, times in (("first", results["build_cloud"]), ("second", results["build_cloud_second_user"])):
                made = subprocess.run(
                    [str(Path(sys.executable).with_name("fal-serverless")), "keys", "create", "--user", user],
                    env={**os.environ, **env},
                    capture_output=True,
                    text=True,
                    check=True,
                )
                own = dict(line.split("=", 1) for line in made.stdout.splitlines() if line.startswith("FAL_KEY_"))
                os.environ.update({**env, **own})

                def joke_cloud() -> str:
                    import pyjokes

                    return str(pyjokes.get_joke())

                fn = isolated(host=cloud, requirements=["pyjokes"], keep_alive=0)(joke_cloud)
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
            for name in ("FAL_HOST", "FAL_KEY_ID", "FAL_KEY_SECRET"):
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


def cgroup_join_floor(runs: int) -> List[float]:
    """Seconds a new process takes to join a fresh cgroup (the first controller's `cgroup.procs` write), as every
    new worker does before it starts; empty where this process may not make cgroups (not root, or no cgroup v1)."""
    own = {
        parts[1]: parts[2] for parts in (line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().split())
    }
    if os.geteuid() != 0 or "memory" not in own:
        return []
    times = []
    for i in range(runs):
        group = Path(f"/sys/fs/cgroup/memory{own['memory'].rstrip('/')}/fal-bench-join-{os.getpid()}-{i}")
        group.mkdir()
        procs = os.open(group / "cgroup.procs", os.O_WRONLY)
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:
            t = time.perf_counter()
            os.write(procs, str(os.getpid()).encode())
            os.write(write_end, repr(time.perf_counter() - t).encode())
            os._exit(0)
        os.waitpid(child, 0)
        times.append(float(os.read(read_end, 64)))
        for fd in (procs, read_end, write_end):
            os.close(fd)
        for _ in range(200):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.005)
        time.sleep(0.05)  # as between cold calls: not a burst, which the kernel would make cheaper
    return times


def fresh_copy_floor(size: int, runs: int) -> List[float]:
    """Seconds to copy `size` bytes into newly allocated memory: each copy of a payload the round trip makes."""
    source = bytearray(size)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        copy = bytes(source)
        times.append(time.perf_counter() - t)
        del copy
    return times


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


def gateway_rows(warm_runs: int, calls: int, cold_runs: int) -> List[str]:
    """The web endpoint rows (bench/gateway.py), on a server of their own."""
    import gateway

    # The warm app's replica is an M (2 CPUs), held for the whole run: the server counts 8 CPUs, so the cold rows'
    # XS workers get room beside it (each worker's own quota is still enforced by its cgroup).
    config = "[capacity]\ncpus = 8\nuser_share = 1.0\n"
    server, env = start_server(Path(tempfile.mkdtemp(prefix="fal-bench-gateway-")), config)
    try:
        results = gateway.measure(env, warm_runs // 3, calls, max(3, cold_runs // 5))
    finally:
        server.terminate()
        server.wait(timeout=60)
    return gateway.rows(results, row, median)


def dashboard_rows(requests: int) -> List[str]:
    """The dashboard rows (bench/dashboard.py): its pages with 100,000 runs in the history."""
    import dashboard

    return dashboard.rows(dashboard.measure(start_server, requests), row, median)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke test of the benchmark itself)")
    parser.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    parser.add_argument("--gateway", action="store_true", help="only the web endpoint rows, printed (not written)")
    parser.add_argument("--dashboard", action="store_true", help="only the dashboard rows, printed (not written)")
    args = parser.parse_args()
    warm_runs, cold_runs, build_runs, calls = (200, 5, 2, 400) if args.quick else (3000, 30, 5, 4000)
    os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")
    map_items = 1000 if args.quick else bench_map.ITEMS
    if args.gateway:
        print("\n".join(gateway_rows(warm_runs, calls, cold_runs)))
        return 0
    if args.dashboard:
        print("\n".join(dashboard_rows(20 if args.quick else 100)))
        return 0

    anchor_run = subprocess.run(
        [
            str(anchor_python()),
            str(HERE / "anchor.py"),
            *map(str, (warm_runs // 3, cold_runs, build_runs, calls // 4, map_items)),
        ],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    anchor = json.loads(anchor_run.stdout.strip().splitlines()[-1])
    mine = ours(warm_runs, cold_runs, build_runs, calls, map_items, scale=not args.quick)
    ray_map = bench_map.measure_ray(uv(), map_items)

    times: Dict[str, List[float]] = {k: v for k, v in mine.items() if isinstance(v, list)}
    warm_local, warm_cloud = median(times["warm_local"]), median(times["warm_cloud"])
    floor_import = anchor["floor_import"]
    lines = [
        "| metric | this project | anchor (isolate 0.12.2) | floor | ratio | goal |",
        "|---|---|---|---|---|---|",
        row(
            "warm call, local",
            times["warm_local"],
            anchor["warm"],
            None,
            "p50 < 0.3 ms and >= 10x anchor",
            warm_local < 0.3e-3 and median(anchor["warm"]) / warm_local >= 10,
        ),
        row(
            "warm call, cloud (loopback); floor: the smallest authenticated RPC",
            times["warm_cloud"],
            anchor["warm"],
            times["floor_rpc"],
            "p50 < 1 ms and >= 10x anchor",
            warm_cloud < 1e-3 and median(anchor["warm"]) / warm_cloud >= 10,
        ),
        row(
            "cold call, local (env built)",
            times["cold_local"],
            anchor["cold"],
            floor_import,
            "< 1.5x floor",
            median(times["cold_local"]) < 1.5 * median(floor_import),
        ),
        row(
            "cold call, cloud, jailed (env built)",
            times["cold_cloud"],
            anchor["cold"],
            floor_import,
            "< 1.5x floor",
            median(times["cold_cloud"]) < 1.5 * median(floor_import),
        ),
        row(
            "cold call, cloud, jailed, loopback-only network (egress none; the veth costs the difference)",
            times["cold_cloud_loopback"],
            None,
            floor_import,
            "-",
            True,
        ),
        row(
            "first call, new requirements (pyjokes), cloud: jailed build, nothing cached on the server",
            times["build_cloud"],
            anchor["build"],
            times["floor_build"],
            "-",
            True,
        ),
        row(
            "first call, same requirements, cloud, another user (wheels from the shared cache)",
            times["build_cloud_second_user"],
            anchor["build"],
            times["floor_build"],
            "< 1 s",
            median(times["build_cloud_second_user"]) < 1,
        ),
        row(
            "first call, new requirements (pyjokes)",
            times["build_local"],
            anchor["build"],
            times["floor_build"],
            "< 1.2x floor",
            median(times["build_local"]) < 1.2 * median(times["floor_build"]),
        ),
    ]
    join = cgroup_join_floor(cold_runs)
    if join:
        lines.append(row("kernel: a new process joining a new cgroup (v1 memory)", join, None, None, "-", True))
    ours_throughput: Dict[str, Dict[str, float]] = mine["throughput"]  # type: ignore[assignment]
    for callers, measured in ours_throughput.items():
        theirs = anchor["throughput"].get(callers)
        versus = f"{measured['per_second'] / theirs['per_second']:.1f}x the anchor" if theirs else "-"
        anchor_text = f"{theirs['per_second']:.0f} calls/s" if theirs else "- (an agent per caller: not run at 64)"
        goal = ">= 2000 calls/s, none lost" if callers == "16" else "none lost or wrong"
        met = bool(measured["ok"]) and (measured["per_second"] >= 2000 if callers == "16" else True)
        lines.append(
            f"| throughput, cloud, {callers} callers | {measured['per_second']:.0f} calls/s | {anchor_text} | - "
            f"| {versus} | {goal}: {'met' if met else 'NOT met'} |"
        )
    lines += bench_map.rows(mine["map"], ray_map, anchor["map"], median)  # type: ignore[arg-type]
    ours_payload: Dict[str, List[float]] = mine["payload"]  # type: ignore[assignment]
    for name, measured in ours_payload.items():
        big = name.endswith("100 MB")
        failed = anchor.get("payload_errors", {}).get(name)
        lines.append(
            row(
                f"round trip, cloud, {name}" + (f" (anchor refuses it: {failed})" if failed else ""),
                measured,
                anchor["payload"].get(name),
                None,
                "< 0.5 s" if big else "-",
                median(measured) < 0.5 if big else True,
            )
        )
    copy_100mb = fresh_copy_floor(100 << 20, 5)
    lines.append(row("floor: one copy of 100 MB into new memory", copy_100mb, None, None, "-", True))
    if "scale" in mine:
        scale: Dict[str, List[float]] = mine["scale"]  # type: ignore[assignment]
        base = median(scale["1"])
        for count, measured in scale.items():
            lines.append(
                row(
                    f"warm call, cloud, {count} warm environments",
                    measured,
                    None,
                    None,
                    "flat (p50 within 1.5x of 1 env)",
                    median(measured) <= 1.5 * base,
                )
            )
        idle, full = int(mine["rss_idle"]), int(mine["rss_100_workers"])  # type: ignore[call-overload]
        lines.append(
            f"| server RSS, idle / 100 warm workers | {idle / 2**20:.1f} MB / {full / 2**20:.1f} MB | - | - | - "
            f"| < 50 MB with 100 workers: {'met' if full < 50 * 2**20 else 'NOT met'} |"
        )
    lines += gateway_rows(warm_runs, calls, cold_runs)
    lines += dashboard_rows(20 if args.quick else 100)
    table = "\n".join(lines)
    print(table)
    if args.write:
        # What follows the marker is written by hand (what the figures mean) and kept across runs.
        previous = (HERE / "RESULTS.md").read_text() if (HERE / "RESULTS.md").exists() else ""
        analysis = previous.split(ANALYSIS_MARKER, 1)[1] if ANALYSIS_MARKER in previous else "\n"
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        machine = f"{os.cpu_count()} cores, {memory:.0f} GiB, Linux {platform.release()}"
        (HERE / "RESULTS.md").write_text(
            f"# Benchmark results\n\nCommand: `make bench` (`python bench/run.py --write`)  \nDate: {date.today()}  \n"
            f"Machine: {machine}  \nRuns: {warm_runs} warm calls (anchor: {warm_runs // 3}), {cold_runs} cold calls, "
            f"{build_runs} builds, {calls} calls per throughput level (anchor: {calls // 4}).\n\n{table}\n\n"
            f'Floors: cold call, `python -c "import cloudpickle"` in the built environment; first call, `uv venv` + '
            f"`uv pip install pyjokes` timed here. Ratios against the anchor: anchor time / our time (throughput: ours "
            f"/ the anchor's).\n\n{ANALYSIS_MARKER}{analysis}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
