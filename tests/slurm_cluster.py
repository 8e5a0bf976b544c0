"""A real Slurm cluster for the tests: munged, slurmctld and one slurmd per node (Debian's slurm-wlm and munge), with
task/cgroup enforcing allocations. Node 1 shares this host's network; further nodes each get a network namespace of
their own (`ip netns`) on a bridge with this host, so a node can be lost without touching the others."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")


def missing_tools() -> List[str]:
    return [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class Node:
    name: str
    address: str
    namespace: Optional[str] = None

    def run(self, *argv: str) -> List[str]:
        """`argv` as run in this node's network namespace. nsenter, not `ip netns exec`: that remounts /sys, which
        would hide the cgroup hierarchy slurmd's task/cgroup needs."""
        if not self.namespace:
            return list(argv)
        return ["nsenter", f"--net=/run/netns/{self.namespace}", *argv]


@dataclass
class SlurmCluster:
    root: Path
    nodes: List[Node]
    conf: Path
    memory_mb: int
    cpus: int
    #: The address of this host that every node reaches (the bridge's, with more than one node).
    host_address: str = "127.0.0.1"
    bridge: Optional[str] = None

    @property
    def env(self) -> Dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def command(self, *argv: str) -> str:
        proc = subprocess.run(
            list(argv), env=dict(os.environ, **self.env), capture_output=True, text=True, timeout=30, check=True
        )
        return proc.stdout

    def job(self, job_id: str) -> Dict[str, str]:
        """`scontrol show job` as a dict (JobState, TRES, NodeList, ...)."""
        out = self.command("scontrol", "--oneliner", "show", "job", job_id)
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def worker_jobs(self) -> List[str]:
        """Ids of the server's worker jobs still in the queue (pending or running)."""
        out = self.command("squeue", "--noheader", "--name", "fal-worker", "--format", "%i")
        return out.split()

    def wait_for_nodes(self, state: str = "idle", timeout: float = 60) -> None:
        deadline = time.time() + timeout
        states = ""
        while time.time() < deadline:
            states = self.command("sinfo", "--noheader", "--Node", "--format", "%N %t")
            if states and all(line.split()[1].startswith(state) for line in states.splitlines()):
                return
            time.sleep(0.3)
        raise AssertionError(f"Slurm nodes are not {state} after {timeout}s:\n{states}")

    def kill_node(self, node: Node) -> None:
        """Loses `node` as a crash would: its slurmd and every process of its network namespace are killed."""
        assert node.namespace, "only a node in a namespace of its own can be lost alone"
        pids = subprocess.run(["ip", "netns", "pids", node.namespace], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Cancels every job, then ends the daemons (each is started with this cluster's dir on its command line)."""
        try:
            self.command("scancel", "--user", "root")
            deadline = time.time() + 15
            while self.command("squeue", "--noheader") and time.time() < deadline:
                time.sleep(0.2)
        except Exception:
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            subprocess.run(["pkill", f"-{int(sig)}", "-f", str(self.root)], capture_output=True)
            deadline = time.time() + 10
            while (
                time.time() < deadline
                and subprocess.run(["pgrep", "-f", str(self.root)], capture_output=True).returncode == 0
            ):
                time.sleep(0.1)
        for node in self.nodes:
            if node.namespace:
                subprocess.run(["ip", "netns", "del", node.namespace], capture_output=True)
        if self.bridge:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def start_cluster(node_count: int = 1, memory_mb: int = 6000) -> SlurmCluster:
    """Starts munged, slurmctld and `node_count` slurmd nodes under a fresh temp dir; returns once all are idle."""
    root = Path(tempfile.mkdtemp(prefix="fal-serverless-test-slurm-"))
    root.chmod(0o755)
    tag = root.name[-6:].replace("_", "x").lower()
    cpus = os.cpu_count() or 1
    subnet = f"10.231.{os.getpid() % 250}"
    host_address = "127.0.0.1" if node_count == 1 else f"{subnet}.1"
    nodes = [Node(f"fal{tag}n1", host_address)]
    for n in range(2, node_count + 1):
        nodes.append(Node(f"fal{tag}n{n}", f"{subnet}.{n}", namespace=f"fal{tag}n{n}"))

    munge = root / "munge"
    munge.mkdir()
    (munge / "munge.key").write_bytes(os.urandom(1024))
    (munge / "munge.key").chmod(0o400)
    subprocess.run(["chown", "-R", "munge:munge", str(munge)], check=True)
    socket_path = munge / "munge.socket"
    subprocess.run(
        [
            _sbin("munged"),
            "--force",
            f"--socket={socket_path}",
            f"--key-file={munge / 'munge.key'}",
            f"--log-file={root / 'munged.log'}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--seed-file={munge / 'seed'}",
        ],
        check=True,
    )
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()

    ctld_port, slurmd_port = _free_port(), _free_port()
    # The controller listens on every address: nodes in their own namespaces reach it over their veth pairs.
    lines = [
        f"ClusterName=fal{tag}",
        f"SlurmctldHost={socket.gethostname()}({host_address})",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "AuthType=auth/munge",
        f"AuthInfo=socket={socket_path}",
        "CredType=cred/munge",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}/%n",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd'}-%n.pid",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log'}/slurmd-%n.log",
        "ProctrackType=proctrack/cgroup",
        "TaskPlugin=task/cgroup",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "SchedulerType=sched/backfill",
        "ReturnToService=2",
        # A lost node is noticed within seconds, not the default five minutes.
        "SlurmdTimeout=5",
        "MessageTimeout=5",
        "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none",
    ]
    for node in nodes:
        lines.append(f"NodeName={node.name} NodeAddr={node.address} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={','.join(n.name for n in nodes)} Default=YES MaxTime=INFINITE State=UP")
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    (root / "cgroup.conf").write_text(
        "CgroupPlugin=autodetect\nConstrainCores=yes\nConstrainRAMSpace=yes\nConstrainSwapSpace=yes\nAllowedSwapSpace=0\n"
    )

    cluster = SlurmCluster(root, nodes, conf, memory_mb, cpus, host_address)
    try:
        if node_count > 1:
            cluster.bridge = f"br{tag}"
            _run(["ip", "link", "add", cluster.bridge, "type", "bridge"])
            _run(["ip", "addr", "add", f"{host_address}/24", "dev", cluster.bridge])
            _run(["ip", "link", "set", cluster.bridge, "up"])
        for node in nodes:
            if node.namespace and cluster.bridge:
                _make_namespace(node, cluster.bridge, host_address)
        subprocess.run([_sbin("slurmctld"), "-f", str(conf)], check=True, env=dict(os.environ, **cluster.env))
        for node in nodes:
            subprocess.run(
                node.run(_sbin("slurmd"), "-f", str(conf), "-N", node.name),
                check=True,
                env=dict(os.environ, **cluster.env),
            )
        cluster.wait_for_nodes("idle")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _run(argv: List[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr}"


def _make_namespace(node: Node, bridge: str, host_address: str) -> None:
    """A network namespace whose only link is a veth pair onto the cluster's bridge."""
    assert node.namespace
    host_end, node_end = f"vh{node.name}"[-15:], f"vn{node.name}"[-15:]
    in_ns = ["ip", "netns", "exec", node.namespace]
    for argv in (
        ["ip", "netns", "add", node.namespace],
        ["ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end],
        ["ip", "link", "set", host_end, "master", bridge],
        ["ip", "link", "set", host_end, "up"],
        ["ip", "link", "set", node_end, "netns", node.namespace],
        [*in_ns, "ip", "addr", "add", f"{node.address}/24", "dev", node_end],
        [*in_ns, "ip", "link", "set", node_end, "up"],
        [*in_ns, "ip", "link", "set", "lo", "up"],
        [*in_ns, "ip", "route", "add", "default", "via", host_address],
    ):
        _run(argv)
