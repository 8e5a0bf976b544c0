"""GPU checks on a host with NVIDIA GPUs (not part of `make test`; run through tests/gpu/run.sh, see README.md there).

Starts a real `fal-serverless server` (jailed when it runs as root with bubblewrap), and checks through ctypes and
libcuda.so.1 (cuInit, cuDeviceGetCount, cuDeviceGetPCIBusId, cuDeviceGetUuid, cuMemAlloc; no pip packages) that:
  * CUDA works on the host itself (the baseline: every GPU the driver lists);
  * a CPU machine type's worker sees no GPU;
  * a `GPU` machine type's worker sees exactly one device, one of the host's, and allocates and reads back memory on
    it; jailed, its /dev holds that GPU's node alone (besides the control devices) and its /proc/driver/nvidia that
    GPU's entry alone;
  * two concurrent GPU calls see different devices, where the host has two;
  * while every GPU is held (by warm workers), another user's GPU call waits: with a short timeout it fails saying no
    GPU came free; with a longer one it runs once a GPU is given back; the warm workers' device cgroup (cgroup v1)
    allows their own GPU's node alone.
Prints a report; exits 0 when every check passed, 1 when one failed, 2 when skipped (no NVIDIA GPU on this host).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

#: The function every check runs: in a worker (shipped by value with cloudpickle) or on the host.
PROBE = r'''
def probe(hold=0.0, alloc_mib=256):
    """What this process sees of CUDA, through libcuda.so.1 alone: devices, and memory allocated and read back."""
    import ctypes, os, socket, time
    gpus_dir = "/proc/driver/nvidia/gpus"
    out = {
        "uid": os.getuid(),
        "hostname": socket.gethostname(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cuda_device_order": os.environ.get("CUDA_DEVICE_ORDER"),
        "ld_library_path": os.environ.get("LD_LIBRARY_PATH"),
        "dev": sorted(n for n in os.listdir("/dev") if n.startswith("nvidia")),
        "proc_gpus": sorted(os.listdir(gpus_dir)) if os.path.isdir(gpus_dir) else None,
    }
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        out["error"] = "cannot load libcuda.so.1: %s" % e
        return out

    def check(name, *args):
        rc = getattr(cuda, name)(*args)
        if rc != 0:
            text = ctypes.c_char_p()
            cuda.cuGetErrorName(rc, ctypes.byref(text))
            raise RuntimeError("%s returned %d (%s)" % (name, rc, (text.value or b"?").decode()))

    try:
        check("cuInit", 0)
        count = ctypes.c_int()
        check("cuDeviceGetCount", ctypes.byref(count))
        out["count"] = count.value
        out["devices"] = []
        for i in range(count.value):
            dev = ctypes.c_int()
            check("cuDeviceGet", ctypes.byref(dev), i)
            bus = ctypes.create_string_buffer(64)
            check("cuDeviceGetPCIBusId", bus, 64, dev)
            name = ctypes.create_string_buffer(256)
            check("cuDeviceGetName", name, 256, dev)
            uuid = (ctypes.c_ubyte * 16)()
            check("cuDeviceGetUuid", uuid, dev)
            h = bytes(uuid).hex()
            out["devices"].append({
                "bus_id": bus.value.decode().lower(),
                "name": name.value.decode(),
                "uuid": "GPU-%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:]),
            })
        if count.value:
            dev = ctypes.c_int()
            check("cuDeviceGet", ctypes.byref(dev), 0)
            ctx = ctypes.c_void_p()
            check("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
            check("cuCtxSetCurrent", ctx)
            size = alloc_mib << 20
            ptr = ctypes.c_uint64()
            check("cuMemAlloc_v2", ctypes.byref(ptr), ctypes.c_size_t(size))
            check("cuMemsetD8_v2", ptr, ctypes.c_ubyte(0x5A), ctypes.c_size_t(size))
            back = (ctypes.c_ubyte * 4)()
            check("cuMemcpyDtoH_v2", back, ctypes.c_uint64(ptr.value + size - 4), ctypes.c_size_t(4))
            out["allocated_mib"] = alloc_mib if list(back) == [0x5A] * 4 else 0
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            check("cuMemGetInfo_v2", ctypes.byref(free), ctypes.byref(total))
            out["memory_total_mib"] = total.value >> 20
            if hold:
                out["held_from"] = time.time()
                time.sleep(hold)
                out["held_to"] = time.time()
            check("cuMemFree_v2", ptr)
            check("cuDevicePrimaryCtxRelease_v2", dev)
    except Exception as e:
        out["error"] = str(e)
    return out
'''

#: A user's script: calls `probe` on the server with the given options and prints its result as JSON.
CALL = """
import json
from fal_serverless import cloud, isolated
{probe}
f = isolated(host=cloud, {options})(probe)
print(json.dumps(f({hold!r})))
"""

CONFIG = """
[capacity]             # these checks are about GPUs: the server's CPU and memory capacity never makes a call wait
cpus = 1000
memory_gb = 100000

[network]
egress = "none"        # this machine reaches no network; the workers need none
build_egress = "none"  # environments are built from the bundle's wheels (UV_FIND_LINKS)
"""


@dataclass
class Report:
    lines: List[str] = field(default_factory=list)
    checks: List[Tuple[str, Optional[bool], str]] = field(default_factory=list)

    def note(self, text: str) -> None:
        print(text, flush=True)
        self.lines.append(text)

    def check(self, name: str, ok: Optional[bool], detail: str = "") -> bool:
        """A check's outcome: True passed, False failed, None skipped (detail says why)."""
        self.checks.append((name, ok, detail))
        mark = {True: "PASS", False: "FAIL", None: "SKIP"}[ok]
        print(f"[{mark}] {name}{': ' + detail if detail else ''}", flush=True)
        return bool(ok)

    def summary(self) -> int:
        print("\n==== GPU report ====")
        for line in self.lines:
            print(line)
        for name, ok, detail in self.checks:
            mark = {True: "PASS", False: "FAIL", None: "SKIP"}[ok]
            print(f"  {mark}  {name}{' (' + detail + ')' if detail else ''}")
        failed = [name for name, ok, _ in self.checks if ok is False]
        print(
            f"==== {len(self.checks) - len(failed)} of {len(self.checks)} checks passed or skipped; failed: "
            f"{', '.join(failed) or 'none'} ===="
        )
        return 1 if failed else 0


def host_gpus() -> List[Dict[str, str]]:
    """The GPUs the driver lists, as the server reads them: /proc/driver/nvidia/gpus/<bus id>/information."""
    gpus = []
    root = Path("/proc/driver/nvidia/gpus")
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            text = (entry / "information").read_text()
        except OSError:
            continue
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}
        gpus.append(
            {
                "bus_id": entry.name.lower(),
                "minor": fields.get("Device Minor", "?"),
                "uuid": fields.get("GPU UUID", "?"),
                "model": fields.get("Model", "?"),
            }
        )
    return gpus


@dataclass
class Server:
    process: subprocess.Popen[str]
    host: str
    admin: Tuple[str, str]
    log: Path
    cli: Path

    def env(self, key: Tuple[str, str]) -> Dict[str, str]:
        return dict(os.environ, FAL_HOST=self.host, FAL_KEY_ID=key[0], FAL_KEY_SECRET=key[1], PYTHONUNBUFFERED="1")

    def create_key(self, user: str) -> Tuple[str, str]:
        proc = subprocess.run(
            [str(self.cli), "keys", "create", "--user", user],
            env=self.env(self.admin),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
        return values["FAL_KEY_ID"], values["FAL_KEY_SECRET"]

    def call(self, user: str, hold: float = 0.0, **options: Any) -> subprocess.Popen[str]:
        """Starts a user's script that runs `probe(hold)` on this server with `options`."""
        key = self.create_key(user)
        source = CALL.format(probe=PROBE, options=", ".join(f"{k}={v!r}" for k, v in options.items()), hold=hold)
        return subprocess.Popen(
            [sys.executable, "-c", source], env=self.env(key), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def workers(self) -> List[Dict[str, str]]:
        proc = subprocess.run(
            [str(self.cli), "workers"], env=self.env(self.admin), capture_output=True, text=True, timeout=60
        )
        header, *rows = proc.stdout.splitlines() or [""]
        names = [name.lower() for name in header.split()]
        return [dict(zip(names, row.split())) for row in rows]


def finish(proc: subprocess.Popen[str], timeout: float) -> Tuple[Optional[Dict[str, Any]], str]:
    """A call's result (None if it failed) and its stderr."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        stderr += f"\n(the call did not end within {timeout} s and was killed)"
    if proc.returncode != 0:
        return None, stderr
    try:
        return json.loads(stdout.strip().splitlines()[-1]), stderr
    except (ValueError, IndexError):
        return None, stderr + f"\n(unexpected output: {stdout!r})"


NOBODY = 65534


def bwrap_fails() -> Optional[str]:
    """Why bubblewrap cannot make a jail here, if it cannot (None: it can)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap is not installed"
    argv = [bwrap, "--die-with-parent", "--unshare-pid", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    proc = subprocess.run([*argv, "true"], capture_output=True, text=True, timeout=30)
    return None if proc.returncode == 0 else f"bubblewrap fails here: {proc.stderr.strip()}"


def start_server(work: Path, wheels: Path, as_nobody: bool) -> Server:
    """A server with a fresh data dir; `as_nobody`: run it as uid 65534, which makes it run its workers unjailed
    (for a root whose bubblewrap cannot make a jail)."""
    data = work / "data"
    data.mkdir(mode=0o700)
    (data / "config.toml").write_text(CONFIG)
    bin_dir = Path(sys.executable).parent
    prefix: List[str] = []
    extra: Dict[str, str] = {}
    if as_nobody:
        setpriv = shutil.which("setpriv") or "setpriv"
        prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        work.chmod(0o755)
        for owned in (data, work / "home"):
            owned.mkdir(exist_ok=True)
            os.chown(owned, NOBODY, NOBODY)
        os.chown(data / "config.toml", NOBODY, NOBODY)
        extra = {"HOME": str(work / "home"), "UV_CACHE_DIR": str(work / "home" / "uv-cache")}
    env = dict(
        os.environ,
        # Builds reach no index: cloudpickle (all an environment of these checks needs) comes from the bundle.
        UV_FIND_LINKS=str(wheels),
        UV_NO_INDEX="1",
        UV_OFFLINE="1",
        UV_PYTHON_DOWNLOADS="never",
        FAL_SERVERLESS_UV=str(bin_dir / "uv"),
        # The engine's debug lines name each worker's GPUs; the rest at info.
        FAL_SERVERLESS_LOG="info,fal_engine=debug",
        **extra,
    )
    log = work / "server.log"
    cli = bin_dir / "fal-serverless"
    process = subprocess.Popen(
        [*prefix, str(cli), "server", "--data-dir", str(data), "--listen", "127.0.0.1:0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line.strip())
        if "listening on" in line:
            break
    else:
        raise RuntimeError(f"the server did not start:\n{log.read_text()[-4000:]}")
    values = dict(line.split("=", 1) for line in lines if line.startswith("FAL_KEY_"))
    return Server(process, lines[-1].rsplit(" ", 1)[-1], (values["FAL_KEY_ID"], values["FAL_KEY_SECRET"]), log, cli)


def worker_device_lists(server_pid: int) -> Dict[str, str]:
    """devices.list of each worker cgroup of the server (`<pid>-<n>` below fal-serverless), cgroup v1 only."""
    found = {}
    for line in Path(f"/proc/{server_pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "devices" not in controllers.split(","):
            continue
        base = Path("/sys/fs/cgroup") / controllers / path.lstrip("/") / "fal-serverless"
        for cgroup in sorted(base.iterdir()) if base.is_dir() else []:
            if cgroup.name.startswith(f"{server_pid}-") and (cgroup / "devices.list").exists():
                found[cgroup.name] = (cgroup / "devices.list").read_text().strip()
    return found


def describe(result: Optional[Dict[str, Any]], stderr: str) -> str:
    if result is None:
        return "the call failed: " + " | ".join(stderr.strip().splitlines()[-6:])
    return json.dumps(result, sort_keys=True)


def run_checks(report: Report, server: Server, gpus: List[Dict[str, str]]) -> None:
    bus_ids = {g["bus_id"] for g in gpus}
    minors = {g["bus_id"]: g["minor"] for g in gpus}

    # A CPU machine type: no GPU at all. Also tells whether workers are jailed, and the offline build works.
    smoke, stderr = finish(server.call("cpu-user", machine_type="XS", keep_alive=0, timeout=300), 300)
    report.note(f"XS worker: {describe(smoke, stderr)}")
    if smoke is None:
        report.check("a CPU worker starts (offline environment build)", False, describe(smoke, stderr))
        return
    jailed = smoke["uid"] != 0 and smoke["hostname"].startswith("worker-")
    report.check(
        "a CPU worker starts (offline environment build)",
        True,
        f"{'jailed' if jailed else 'NOT jailed'}: uid {smoke['uid']}, hostname {smoke['hostname']}",
    )
    # Jailed, it has no GPU node at all; unjailed, CUDA_VISIBLE_DEVICES="" hides them from CUDA.
    no_gpu = not smoke.get("count") and (not smoke["dev"] or not jailed)
    report.check(
        "a CPU worker sees no GPU",
        no_gpu,
        f"/dev: {smoke['dev']}, CUDA_VISIBLE_DEVICES={smoke['cuda_visible_devices']!r}",
    )
    if not gpus:
        return

    # One GPU worker.
    one, stderr = finish(server.call("gpu-one", machine_type="GPU", keep_alive=0, timeout=300), 300)
    report.note(f"GPU worker: {describe(one, stderr)}")
    ok = one is not None and one.get("count") == 1 and not one.get("error")
    report.check(
        "a GPU worker sees exactly one device",
        ok,
        describe(one, stderr)
        if not ok
        else f"{one['devices'][0]['bus_id']} ({one['devices'][0]['name']}), CUDA_VISIBLE_DEVICES="
        f"{one['cuda_visible_devices']}",
    )
    if not ok or one is None:
        return
    seen = one["devices"][0]["bus_id"]
    report.check("it is one of the host's GPUs", seen in bus_ids, f"{seen} among {sorted(bus_ids)}")
    report.check(
        "it allocates and reads back memory on it",
        one.get("allocated_mib", 0) > 0,
        f"{one.get('allocated_mib')} MiB of {one.get('memory_total_mib')} MiB",
    )
    if jailed:
        own = f"nvidia{minors.get(seen, '?')}"
        others = [d for d in one["dev"] if d[len("nvidia") :].isdigit() and d != own]
        report.check(
            "its jail's /dev holds its own GPU's node alone", own in one["dev"] and not others, f"/dev: {one['dev']}"
        )
        report.check(
            "its jail's /proc/driver/nvidia lists its own GPU alone", one["proc_gpus"] == [seen], f"{one['proc_gpus']}"
        )

    # Two concurrent GPU calls.
    if len(gpus) >= 2:
        calls = [
            server.call(f"gpu-pair-{i}", hold=10.0, machine_type="GPU", keep_alive=0, timeout=300) for i in range(2)
        ]
        results = [finish(call, 300) for call in calls]
        seen_pair = [r["devices"][0]["bus_id"] if r and r.get("count") == 1 else None for r, _ in results]
        report.check(
            "two concurrent GPU calls see different devices",
            None not in seen_pair and seen_pair[0] != seen_pair[1],
            f"{seen_pair}"
            + ("" if None not in seen_pair else " " + describe(*results[0]) + " " + describe(*results[1])),
        )
    else:
        report.check(
            "two concurrent GPU calls see different devices",
            None,
            f"this host has {len(gpus)} GPU; the waiting checks below show the exclusivity instead",
        )

    # Every GPU held by a warm worker: another call waits for one.
    keep = 25
    holders = [server.call(f"gpu-hold-{i}", machine_type="GPU", keep_alive=keep, timeout=300) for i in range(len(gpus))]
    held = [finish(h, 300) for h in holders]
    held_at = time.monotonic()
    held_buses = sorted(r["devices"][0]["bus_id"] for r, _ in held if r and r.get("count") == 1)
    report.check(
        "each GPU is held by its own warm worker",
        held_buses == sorted(bus_ids),
        f"{held_buses}" + ("" if held_buses == sorted(bus_ids) else " " + "; ".join(describe(*r) for r in held)),
    )
    lists = worker_device_lists(server.process.pid)
    if lists:
        gpu_rules = {name: [r for r in text.splitlines() if r.startswith("c 195:")] for name, text in lists.items()}
        report.note(f"device cgroups of the live workers (their c 195:* rules): {gpu_rules}")
        single = all(
            len([r for r in rules if r not in ("c 195:255 rw", "c 195:254 rw")]) == 1
            for rules in gpu_rules.values()
            if rules
        )
        report.check(
            "a warm GPU worker's device cgroup allows its own GPU's node alone",
            single and any(gpu_rules.values()),
            f"{gpu_rules}",
        )
    else:
        report.check(
            "a warm GPU worker's device cgroup allows its own GPU's node alone",
            None,
            "no cgroup v1 devices controller (or workers not jailed): the jail's /dev alone bounds devices",
        )
    short, stderr = finish(server.call("gpu-late-short", machine_type="GPU", keep_alive=0, timeout=5), 120)
    report.check(
        "a GPU call with a short timeout fails, saying no GPU came free",
        short is None and "no GPU came free" in stderr,
        " | ".join(stderr.strip().splitlines()[-3:]),
    )
    waiting, stderr = finish(server.call("gpu-late-long", machine_type="GPU", keep_alive=0, timeout=300), 300)
    waited = time.monotonic() - held_at
    ok = waiting is not None and waiting.get("count") == 1 and "waiting for a free GPU" in stderr
    report.check(
        "a GPU call with a longer timeout waits for a GPU given back, then runs",
        ok,
        f"ran {waited:.0f} s after every GPU was held (keep_alive {keep} s)" if ok else describe(waiting, stderr),
    )


def diagnose_jail(report: Report, gpus: List[Dict[str, str]]) -> None:
    """After a jailed GPU worker failed: the probe under bubblewrap directly, in variants of the server's jail, to
    show which grant it lacks (a diagnosis; the checks above are the test)."""
    gpu = gpus[0]
    own = [f"/dev/nvidia{gpu['minor']}"] + [
        p
        for p in ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")
        if Path(p).exists()
    ]
    dev_binds = [arg for path in own for arg in ("--dev-bind", path, path)]
    base = ["bwrap", "--die-with-parent", "--unshare-pid", "--ro-bind", "/", "/", "--tmpfs", "/tmp", "--proc", "/proc"]
    narrowed_proc = ["--tmpfs", "/proc/driver/nvidia", "--dir", "/proc/driver/nvidia/gpus"]
    for name in (n for n in ("version", "registry", "params") if Path(f"/proc/driver/nvidia/{n}").exists()):
        narrowed_proc += ["--ro-bind", f"/proc/driver/nvidia/{name}", f"/proc/driver/nvidia/{name}"]
    bus = f"/proc/driver/nvidia/gpus/{gpu['bus_id']}"
    narrowed_proc += ["--ro-bind", bus, bus]
    unprivileged = [shutil.which("setpriv") or "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    variants = {
        "the host's whole /dev": [*base, "--dev-bind", "/dev", "/dev"],
        "a minimal /dev with its GPU's nodes (the host's /proc and /sys)": [*base, "--dev", "/dev", *dev_binds],
        "that, without /sys": [*base, "--dev", "/dev", *dev_binds, "--tmpfs", "/sys"],
        "that, with /proc/driver/nvidia narrowed": [*base, "--dev", "/dev", *dev_binds, *narrowed_proc],
        "that, as uid 65534": [*base, "--dev", "/dev", *dev_binds, "--", *unprivileged],
    }
    code = PROBE + "\nimport json\nprint(json.dumps(probe(alloc_mib=16)))\n"
    report.note("diagnosis: the probe under bubblewrap directly, in variants of the jail:")
    for name, argv in variants.items():
        command = [*argv, sys.executable, "-c", code] if "--" in argv else [*argv, "--", sys.executable, "-c", code]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
        result = json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else None
        outcome = "ok" if result and result.get("count") and not result.get("error") else describe(result, proc.stderr)
        report.note(f"  {name}: {outcome}")


def main() -> int:
    # run.sh's `timeout` ends this with SIGTERM: stop the server on the way out, as on any other end.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=None, help="a scratch dir (default: a new temporary one)")
    parser.add_argument("--wheels", type=Path, required=True, help="wheels for the server's environment builds")
    parser.add_argument("--unjailed", action="store_true", help="run the server as uid 65534: workers unjailed")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fal-gpu-"))
    report = Report()
    gpus = host_gpus()
    report.note(f"host: {os.uname().release}, uid {os.getuid()}, Python {sys.version.split()[0]}")
    if gpus:
        report.note(
            "GPUs the driver lists: "
            + "; ".join(f"{g['bus_id']} minor {g['minor']} {g['model']} {g['uuid']}" for g in gpus)
        )
    else:
        nodes = sorted(p.name for p in Path("/dev").glob("nvidia[0-9]*"))
        if nodes:
            # Device nodes but no driver listing (a sandboxed runtime's emulated driver, say): the server, which
            # reads that listing, finds no GPU to give workers.
            report.note(f"NVIDIA device nodes {nodes} but /proc/driver/nvidia/gpus lists no GPU")
            report.check("the server can discover this host's GPUs", False, "/proc/driver/nvidia/gpus lists none")
            return report.summary()
        report.note("no NVIDIA GPU on this host: /proc/driver/nvidia/gpus lists none (the CPU checks still run)")

    if gpus:
        # The baseline, unjailed; as root it also has the driver create /dev/nvidia-uvm if it is not there yet.
        code = PROBE + "\nimport json\nprint(json.dumps(probe()))\n"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        baseline = json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else None
        report.note(f"the host itself (unjailed): {describe(baseline, proc.stderr)}")
        ok = baseline is not None and baseline.get("count") == len(gpus) and not baseline.get("error")
        report.check("CUDA works on the host itself, every GPU", ok, "" if ok else describe(baseline, proc.stderr))
        if not ok:
            return report.summary()

    unjailed = f"the checks run as uid {os.getuid()}, not root" if os.getuid() != 0 else bwrap_fails()
    if args.unjailed and unjailed is None:
        unjailed = "asked for (--unjailed)"
    report.note(f"workers: {'NOT jailed: ' + unjailed if unjailed else 'jailed (root, bubblewrap runs)'}")
    # Root without a working bubblewrap: the server as another user runs its workers unjailed, and says so.
    server = start_server(work, args.wheels, as_nobody=os.getuid() == 0 and unjailed is not None)
    try:
        time.sleep(0.5)
        for line in server.log.read_text().splitlines():
            if "NOT jailed" in line or "GPUs found" in line or "serving" in line:
                report.note(f"server: {line.strip()}")
        run_checks(report, server, gpus)
        failed = {name for name, ok, _ in report.checks if ok is False}
        if (
            gpus
            and not unjailed
            and failed & {"a GPU worker sees exactly one device", "a CPU worker starts (offline environment build)"}
        ):
            diagnose_jail(report, gpus)
    finally:
        server.process.terminate()
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.process.kill()
        lines = server.log.read_text().splitlines()
        tail = [line for line in lines if " WARN " in line or " ERROR " in line or "GPUs" in line][-12:]
        if tail:
            report.note("server (its GPU assignments, warnings and errors):\n  " + "\n  ".join(tail))
        report.note(f"server log: {server.log}")
    rc = report.summary()
    if not gpus and rc == 0:
        print("no NVIDIA GPU on this host: the GPU checks were skipped (exit 2)")
        return 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
