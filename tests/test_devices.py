"""Devices a jailed worker may use: its jail's minimal /dev, and on hosts with NVIDIA GPUs its own GPUs alone (the GPU
checks themselves need such a host: tests/gpu/, not part of this suite). Here: what every jailed worker gets.

Part of the reliability group (`pytest -m reliability`); the summary counts the isolation checks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import Server, cloud_call

pytestmark = pytest.mark.reliability("isolation")

#: What a jailed worker's device cgroup allows (cgroup v1): the jail's /dev (null, zero, full, random, urandom, tty,
#: ptmx and ptys), read and write, nothing else.
JAIL_DEVICES = {f"c {n} rw" for n in ("1:3", "1:5", "1:7", "1:8", "1:9", "5:0", "5:2")} | {
    f"c {major}:* rw" for major in range(136, 144)
}


def devices_controller() -> bool:
    return any(line.split(":")[1] == "devices" for line in Path("/proc/self/cgroup").read_text().splitlines())


@pytest.mark.skipif(os.geteuid() != 0, reason="workers are jailed only by a server running as root")
def test_a_jailed_worker_sees_no_gpu_and_its_devices_work(server: Server) -> None:
    key = server.create_key("dev-user")
    body = """
import os, pty
parent, child = os.openpty()
os.write(parent, b"x")
with open("/dev/null", "wb") as null, open("/dev/zero", "rb") as zero, open("/dev/urandom", "rb") as random:
    null.write(zero.read(8) + random.read(8))
return sorted(os.listdir("/dev")), os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("CUDA_DEVICE_ORDER")
"""
    proc = cloud_call(server, body, key, machine_type="XS", keep_alive=0)
    assert proc.returncode == 0, proc.stderr
    dev, visible, order = eval(proc.stdout)
    assert not [name for name in dev if name.startswith("nvidia")], dev
    # A CPU machine type sees no GPU, whatever the host has.
    assert (visible, order) == ("", None)


@pytest.mark.skipif(os.geteuid() != 0, reason="workers are jailed only by a server running as root")
@pytest.mark.skipif(not devices_controller(), reason="the cgroup v1 devices controller is not mounted here")
def test_a_jailed_workers_device_cgroup_allows_its_jails_devices_alone(server: Server) -> None:
    key = server.create_key("dev-cgroup")
    before = set(server.cgroups())
    assert cloud_call(server, "return 1", key, machine_type="XS", keep_alive=60).stdout == "1\n"
    worker = server.wait_for_worker("dev-cgroup", busy=False)
    lists = [c / "devices.list" for c in set(server.cgroups()) - before if (c / "devices.list").exists()]
    assert len(lists) == 1, lists
    allowed = set(lists[0].read_text().splitlines())
    assert allowed == JAIL_DEVICES, allowed
    assert worker["busy"] == "false"
