"""The Kubernetes provider against a real single-node cluster the tests start (tests/k8s_cluster.py: etcd,
kube-apiserver, kube-controller-manager, kube-scheduler and a kubelet over dockerd): machine types become pods of
their size, keep_alive keeps and then deletes the pod, the kubelet's limits kill a memory hog, a pod the scheduler
cannot place waits in the caller's logs, and a pod deleted mid-call or while idle, a restarted server's leftovers, a
GPU type and an image that cannot be pulled are each reported clearly."""

from __future__ import annotations

import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

import pytest
from conftest import (
    FAL_SERVERLESS,
    REFERENCE_CHECKS,
    OutputCheck,
    Server,
    check_reference_example,
    cloud_call,
    script_env,
    start_server,
)
from k8s_cluster import PAUSE_IMAGE, WORKER_IMAGE, KubeCluster, missing_tools, start_cluster

SERVER_LABEL = "fal-serverless/server"
# The cluster's first start here (the binaries unpacked, the worker image made by debootstrap) takes a few minutes.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def cluster() -> Iterator[KubeCluster]:
    missing = missing_tools()
    if missing:
        pytest.fail(f"the Kubernetes tests need {', '.join(missing)}: apt-get install {' '.join(missing)}")
    started = start_cluster()
    yield started
    started.stop()


def kubernetes_config(cluster: KubeCluster, image: str = WORKER_IMAGE, shared_dir: Optional[Path] = None) -> str:
    shared_dir = shared_dir or Path(tempfile.mkdtemp(prefix="shared-", dir=cluster.root))
    return f"""provider = "kubernetes"
[kubernetes]
kubeconfig = "{cluster.kubeconfig}"
image = "{image}"
image_pull_policy = "Never"
host_network = true
callback = "127.0.0.1:0"
shared_dir = "{shared_dir}"
[kubernetes.machine_types.M]
cpu = "500m"
memory = "1Gi"
[kubernetes.machine_types.L]
cpu = "1"
memory = "2Gi"
"""


@pytest.fixture(scope="module")
def server(cluster: KubeCluster) -> Iterator[Server]:
    started = start_server(config=kubernetes_config(cluster))
    yield started
    started.stop()


def pods(cluster: KubeCluster, selector: str = SERVER_LABEL) -> List[Dict]:
    return cluster.get(f"/api/v1/namespaces/default/pods?labelSelector={selector}")["items"]


def pod_names(cluster: KubeCluster, terminating: bool = False) -> Set[str]:
    """This server's pods; those being deleted too if `terminating`."""
    return {p["metadata"]["name"] for p in pods(cluster) if terminating or not p["metadata"].get("deletionTimestamp")}


def pod_of(server: Server, key: tuple, **options: object) -> Dict[str, str]:
    """Calls a function that returns its pod's name; returns it and the caller's stderr."""
    proc = cloud_call(server, 'import os\nreturn os.environ["FAL_WORKER_POD"]', key, **options)
    assert proc.returncode == 0, proc.stderr
    return {"name": eval(proc.stdout), "stderr": proc.stderr}


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout}s")


def new_pod(cluster: KubeCluster, before: Set[str], timeout: float = 60) -> str:
    found: List[str] = []
    wait_until(lambda: bool(found.extend(pod_names(cluster) - before) or found), timeout, "a new worker pod")
    return found[0]


def delete_pod(cluster: KubeCluster, name: str, grace: int = 0) -> None:
    with cluster.api() as api:
        api.delete(f"/api/v1/namespaces/default/pods/{name}", params={"gracePeriodSeconds": grace})


@pytest.mark.parametrize(("name", "check"), REFERENCE_CHECKS)
def test_reference_examples_run_through_kubernetes(server: Server, name: str, check: OutputCheck) -> None:
    check_reference_example(server, name, check)


def test_machine_types_become_pods_of_their_size(server: Server, cluster: KubeCluster) -> None:
    key = server.create_key("sizes")
    sizes = {}
    for machine_type in ("XS", "M"):
        name = pod_of(server, key, machine_type=machine_type, keep_alive=30)["name"]
        pod = cluster.get(f"/api/v1/namespaces/default/pods/{name}")
        resources = pod["spec"]["containers"][0]["resources"]
        assert resources["requests"] == resources["limits"], resources
        sizes[machine_type] = resources["limits"]
        assert pod["metadata"]["labels"][SERVER_LABEL].startswith("fal-serverless-")
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert pod["status"]["qosClass"] == "Guaranteed"
    assert sizes["XS"] == {"cpu": "250m", "memory": str(256 * 1024 * 1024)}, sizes
    assert sizes["M"] == {"cpu": "500m", "memory": "1Gi"}, sizes


def test_keep_alive_reuses_the_pod_then_deletes_it(server: Server, cluster: KubeCluster) -> None:
    key = server.create_key("keepalive")
    first = pod_of(server, key, keep_alive=10)["name"]
    assert pod_of(server, key, keep_alive=10)["name"] == first, "the second call within keep_alive got another pod"
    wait_until(lambda: first not in pod_names(cluster), 40, "the pod outliving its keep_alive deleted")


def test_a_memory_hog_is_oom_killed_and_reported(server: Server) -> None:
    key = server.create_key("hog")
    body = "x = bytearray(600 * 1024 * 1024)\nfor i in range(0, len(x), 4096):\n    x[i] = 1\nreturn len(x)"
    proc = cloud_call(server, body, key, machine_type="XS", keep_alive=0)
    assert proc.returncode != 0
    assert "MachineTypeExceededError" in proc.stderr and "exceeded the 256 MB of machine type XS" in proc.stderr, (
        proc.stderr
    )
    assert pod_of(server, key, machine_type="XS", keep_alive=0)["name"]


def blocker(cluster: KubeCluster, cpu: str) -> str:
    """A pod of no server's that holds `cpu` of the node."""
    name = f"blocker-{time.time_ns()}"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": "sleep",
                    "image": PAUSE_IMAGE,
                    "imagePullPolicy": "Never",
                    "resources": {"requests": {"cpu": cpu, "memory": "16Mi"}, "limits": {"cpu": cpu, "memory": "16Mi"}},
                }
            ],
        },
    }
    with cluster.api() as api:
        answer = api.post("/api/v1/namespaces/default/pods", json=pod)
        assert answer.status_code == 201, answer.text
    return name


def millicores(cpu: str) -> int:
    return int(cpu[:-1]) if cpu.endswith("m") else int(float(cpu) * 1000)


def free_cpu(cluster: KubeCluster) -> int:
    """The node's allocatable CPU less what its pods (warm workers of earlier tests) request, in millicores."""
    (node,) = cluster.get("/api/v1/nodes")["items"]
    requested = sum(
        millicores(c["resources"].get("requests", {}).get("cpu", "0"))
        for p in cluster.get("/api/v1/pods")["items"]
        if p["status"].get("phase") in ("Pending", "Running")
        for c in p["spec"]["containers"]
    )
    return millicores(node["status"]["allocatable"]["cpu"]) - requested


def test_a_pod_waiting_for_cpu_shows_in_the_callers_logs_then_runs(server: Server, cluster: KubeCluster) -> None:
    key = server.create_key("pending")
    # Warm workers of earlier tests go first: one whose keep_alive ended meanwhile would make room.
    for name in pod_names(cluster):
        delete_pod(cluster, name)
    wait_until(lambda: not pod_names(cluster, terminating=True), 60, "the warm pods gone")
    # Everything the node has free but 100m: an XS worker (250m) cannot be placed until the blocker is gone.
    held = blocker(cluster, f"{free_cpu(cluster) - 100}m")
    phase = lambda: cluster.get(f"/api/v1/namespaces/default/pods/{held}")["status"].get("phase")  # noqa: E731
    wait_until(lambda: phase() == "Running", 60, "the blocker running")
    result: Dict[str, Dict[str, str]] = {}
    call = threading.Thread(target=lambda: result.setdefault("pod", pod_of(server, key, machine_type="XS")))
    call.start()
    try:
        time.sleep(6)
        assert call.is_alive(), "the call ran though no node had room for it"
    finally:
        delete_pod(cluster, held)
    call.join(timeout=120)
    assert "pod" in result, "the call failed once the blocker was gone (its error is printed above)"
    stderr = result["pod"]["stderr"]
    assert "waiting for a Kubernetes node: 0/1 nodes are available: 1 Insufficient cpu" in stderr, stderr


def test_a_pod_deleted_mid_call_fails_that_call_naming_pod_and_node(server: Server, cluster: KubeCluster) -> None:
    key = server.create_key("deleted")
    result: Dict[str, object] = {}
    before = pod_names(cluster)
    call = threading.Thread(
        target=lambda: result.setdefault("proc", cloud_call(server, "import time\ntime.sleep(60)", key))
    )
    call.start()
    name = new_pod(cluster, before)
    phase = lambda: cluster.get(f"/api/v1/namespaces/default/pods/{name}")["status"].get("phase")  # noqa: E731
    wait_until(lambda: phase() == "Running", 60, "the worker pod running")
    time.sleep(3)  # the call is running on its worker by now
    delete_pod(cluster, name, grace=1)
    call.join(timeout=90)
    proc = result["proc"]
    assert proc.returncode != 0  # type: ignore[attr-defined]
    stderr = proc.stderr  # type: ignore[attr-defined]
    assert "WorkerDiedError" in stderr and f"pod {name}" in stderr and "node localhost" in stderr, stderr
    assert pod_of(server, key, keep_alive=0)["name"] != name


def test_a_warm_pod_deleted_while_idle_is_replaced_on_the_next_call(server: Server, cluster: KubeCluster) -> None:
    key = server.create_key("idle-deleted")
    warm = pod_of(server, key, keep_alive=120)["name"]
    assert pod_of(server, key, keep_alive=120)["name"] == warm
    delete_pod(cluster, warm)
    wait_until(lambda: warm not in pod_names(cluster, terminating=True), 30, "the warm pod gone")
    assert pod_of(server, key, keep_alive=0)["name"] != warm


def test_a_restarted_server_deletes_the_pods_it_left(cluster: KubeCluster) -> None:
    config = kubernetes_config(cluster)
    server = start_server(config=config)
    key = server.create_key("restart")
    left = pod_of(server, key, keep_alive=300)["name"]
    server.process.kill()
    server.process.wait(timeout=30)
    assert left in pod_names(cluster), "the warm pod should outlive the killed server until it restarts"
    restarted = start_server(config=config, data_dir=server.data_dir)
    try:
        wait_until(lambda: left not in pod_names(cluster), 30, "the restarted server deleting its old pod")
    finally:
        restarted.stop()


def test_a_gpu_type_is_refused_on_a_cluster_without_gpus(server: Server) -> None:
    key = server.create_key("gpu")
    proc = cloud_call(server, "return 1", key, machine_type="GPU-T4")
    assert proc.returncode != 0
    assert "MachineTypeUnavailableError" in proc.stderr, proc.stderr
    assert "no node of the cluster offers nvidia.com/gpu" in proc.stderr, proc.stderr
    assert pod_of(server, key, keep_alive=0)["name"]


def test_an_image_that_cannot_be_pulled_is_a_clear_error(cluster: KubeCluster) -> None:
    server = start_server(config=kubernetes_config(cluster, image="fal-test/no-such-image:1"))
    try:
        key = server.create_key("image")
        proc = cloud_call(server, "return 1", key)
        assert proc.returncode != 0
        assert "fal-test/no-such-image:1" in proc.stderr and "ErrImageNeverPull" in proc.stderr, proc.stderr
        missing = "fal-test/no-such-image:1"
        images = lambda: [p["spec"]["containers"][0]["image"] for p in pods(cluster)]  # noqa: E731
        wait_until(lambda: missing not in images(), 30, "the pod that could not start deleted")
    finally:
        server.stop()


def test_a_stopped_server_deletes_its_warm_pods(cluster: KubeCluster) -> None:
    server = start_server(config=kubernetes_config(cluster))
    key = server.create_key("stop")
    warm = pod_of(server, key, keep_alive=300)["name"]
    server.stop()
    assert warm not in pod_names(cluster), "the stopped server left its warm pod"


def test_a_schedule_runs_its_activations_in_pods(server: Server, tmp_path: Path) -> None:
    key = server.create_key("scheduled")
    jobs = tmp_path / "jobs.py"
    jobs.write_text(
        "import os\nfrom fal_serverless import isolated\n\n"
        "@isolated(keep_alive=0)\ndef tick():\n    print('tick in pod', os.environ['FAL_WORKER_POD'])\n"
    )
    cli = lambda *args: subprocess.run(  # noqa: E731
        [FAL_SERVERLESS, *args], env=script_env(server.env(*key)), capture_output=True, text=True, timeout=300
    )
    made = cli("function", "schedule", "*/2 * * * * *", str(jobs), "tick")
    assert made.returncode == 0, made.stdout + made.stderr
    cron_id = made.stdout.strip().splitlines()[-1]
    try:
        deadline, succeeded = time.time() + 120, []
        while len(succeeded) < 2 and time.time() < deadline:
            listed = cli("cron", "activations", cron_id).stdout.splitlines()[1:]
            succeeded = [line.split()[0] for line in listed if " success " in f" {line} "]
            time.sleep(1)
        assert len(succeeded) >= 2, listed
        logs = cli("cron", "logs", cron_id, succeeded[0])
        assert "tick in pod fal-worker-" in logs.stdout, logs.stdout + logs.stderr
    finally:
        assert cli("cron", "cancel", cron_id).returncode == 0
