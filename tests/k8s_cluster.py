"""A real single-node Kubernetes 1.20 cluster for the tests, on this machine alone: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and a kubelet over Debian's dockerd (dockershim), all listening on loopback.

The four Kubernetes binaries come from `../shared/k8s/` (xz, checked against its SHA256SUMS) when it is there, else
they are built from Debian bookworm's `kubernetes` source package with the steps in `../shared/k8s/NOTES.md`; either
way they are kept in a cache dir for the next session. Images are made without a registry: `docker import` of a root
file system (busybox for the pod sandbox's pause, a Debian one with Python for workers).

Started by the tests themselves and stopped with nothing left: processes by pid, containers, mounts, and the iptables
rules docker and the kubelet change."""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import httpx

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "k8s"
VERSION = "v1.20.2"
DEBIAN_SOURCE = "kubernetes=1.20.5+really1.20.2-1.1+deb12u1"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet")
#: The system packages the cluster needs (the command that shows each is installed).
PACKAGES = {
    "dockerd": "docker.io",
    "containerd": "containerd",
    "runc": "runc",
    "etcd": "etcd-server",
    "iptables": "iptables",
    "openssl": "openssl",
    "busybox": "busybox-static",
    "debootstrap": "debootstrap",
}
#: Images the tests' pods use, made by `docker import` (no registry is reachable).
PAUSE_IMAGE = "fal-test/pause:1"
WORKER_IMAGE = "fal-test/worker:1"


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "fal-serverless-tests" / f"kubernetes-{VERSION}"


def tool(name: str) -> str:
    """A command's path: on PATH, or in the sbin directories root's PATH may lack (dockerd, iptables, debootstrap)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if not found:
        raise AssertionError(f"{name} is not installed: apt-get install {PACKAGES.get(name, name)}")
    return found


def missing_tools() -> List[str]:
    missing = []
    for command, package in PACKAGES.items():
        try:
            tool(command)
        except AssertionError:
            missing.append(package)
    return missing


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def binaries() -> Path:
    """The dir holding the four binaries, made once (from `../shared/k8s/`, or built from Debian's source)."""
    target = cache_dir() / "bin"
    if all((target / name).is_file() for name in BINARIES):
        return target
    target.mkdir(parents=True, exist_ok=True)
    if all((SHARED / f"{name}.xz").is_file() for name in BINARIES):
        sums = dict(line.split()[::-1] for line in (SHARED / "SHA256SUMS").read_text().splitlines() if line.strip())
        for name in BINARIES:
            partial = target / f".{name}.partial"
            with lzma.open(SHARED / f"{name}.xz") as packed, open(partial, "wb") as out:
                shutil.copyfileobj(packed, out, 1 << 20)
            if _sha256(partial) != sums[name]:
                partial.unlink()
                raise AssertionError(f"{SHARED / name}.xz does not match its SHA256SUMS")
            partial.chmod(0o755)
            partial.rename(target / name)
        return target
    _build_from_debian_source(target)
    return target


def _build_from_debian_source(target: Path) -> None:
    """The steps of `../shared/k8s/NOTES.md`: Debian bookworm's source package, built offline (about 10 minutes)."""
    work = Path(tempfile.mkdtemp(prefix="fal-serverless-k8s-build-"))
    sources = Path("/etc/apt/sources.list.d/fal-serverless-test-deb-src.list")
    if not sources.exists():
        sources.write_text("deb-src http://deb.debian.org/debian bookworm main\n")
    run = lambda *argv, **kw: subprocess.run(list(argv), check=True, **kw)  # noqa: E731
    run("apt-get", "update", "-q")
    run("apt-get", "install", "-y", "-q", "golang-go", "rsync", "jq", "golang-github-modern-go-reflect2-dev")
    run("apt-get", "source", "--download-only", DEBIAN_SOURCE, cwd=work)
    (orig,) = work.glob("kubernetes_*.orig.tar.gz")
    run("tar", "-xzf", str(orig), cwd=work)
    (tree,) = [p for p in work.iterdir() if p.is_dir() and p.name.startswith("kubernetes-")]
    reflect2 = tree / "vendor/github.com/modern-go/reflect2"
    shutil.rmtree(reflect2)
    reflect2.mkdir()
    for source in Path("/usr/share/gocode/src/github.com/modern-go/reflect2").iterdir():
        if source.suffix in (".go", ".s"):
            shutil.copy(source, reflect2 / source.name)
    for name in ("go.mod", "vendor/modules.txt"):
        path = tree / name
        path.write_text(path.read_text().replace("modern-go/reflect2 v1.0.1", "modern-go/reflect2 v1.0.2"))
    (tree / ".go/src/k8s.io").mkdir(parents=True)
    (tree / ".go/src/k8s.io/kubernetes").symlink_to("../../..")
    env = dict(os.environ, GOPATH=str(tree / ".go"), CGO_ENABLED="0", GOPROXY="off")
    what = "WHAT=" + " ".join(f"cmd/{name}" for name in BINARIES)
    run("make", what, cwd=tree / ".go/src/k8s.io/kubernetes", env=env)
    for name in BINARIES:
        shutil.copy(tree / "_output/bin" / name, target / name)
    shutil.rmtree(work, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*argv: str, cwd: Path) -> None:
    subprocess.run(["openssl", *argv], cwd=cwd, check=True, capture_output=True)


def _certificates(pki: Path) -> None:
    """A CA, the API server's serving certificate (for 127.0.0.1 and the service IP), a service-account key pair."""
    pki.mkdir()
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=fal-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=pki,
    )
    (pki / "san.cnf").write_text(
        "[req]\ndistinguished_name=dn\n[dn]\n[ext]\nsubjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,"
        "DNS:kubernetes,DNS:kubernetes.default\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=kube-apiserver",
        "-keyout",
        "apiserver.key",
        "-out",
        "apiserver.csr",
        cwd=pki,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "apiserver.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.cnf",
        "-extensions",
        "ext",
        "-out",
        "apiserver.crt",
        cwd=pki,
    )
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


#: clamps the OCI bundle's oomScoreAdj to 0 (this sandbox refuses negative values), then runs runc.
RUNC_WRAPPER = """#!/bin/sh
bundle=""
prev=""
for arg in "$@"; do
  if [ "$prev" = "--bundle" ] || [ "$prev" = "-b" ]; then bundle="$arg"; fi
  prev="$arg"
done
if [ -n "$bundle" ] && [ -f "$bundle/config.json" ]; then
  sed -i 's/"oomScoreAdj": *-[0-9]*/"oomScoreAdj":0/' "$bundle/config.json"
fi
exec {runc} "$@"
"""


@dataclass
class KubeCluster:
    root: Path
    server: str
    token: str
    ca: Path
    docker_host: str
    processes: Dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    iptables_before: str = ""

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.server,
            headers={"Authorization": f"Bearer {self.token}"},
            verify=ssl.create_default_context(cafile=str(self.ca)),
            timeout=30,
        )

    def get(self, path: str) -> Dict:
        with self.api() as api:
            answer = api.get(path)
            answer.raise_for_status()
            return answer.json()

    def docker(self, *argv: str, input: Optional[bytes] = None) -> str:
        proc = subprocess.run(
            [tool("docker"), "-H", self.docker_host, *argv], input=input, capture_output=True, check=False, timeout=600
        )
        if proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(argv)}: {proc.stderr.decode(errors='replace')}")
        return proc.stdout.decode()

    def stop(self) -> None:
        for name in ("kubelet", "kube-scheduler", "kube-controller-manager", "kube-apiserver"):
            _stop(self.processes.get(name))
        try:
            ids = self.docker("ps", "-aq").split()
            if ids:
                self.docker("rm", "-f", *ids)
        except Exception:
            pass
        for name in ("dockerd", "containerd", "etcd"):
            _stop(self.processes.get(name))
        _unmount_below(self.root)
        if self.iptables_before:
            subprocess.run([tool("iptables-restore")], input=self.iptables_before.encode(), check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def _stop(process: Optional[subprocess.Popen[bytes]]) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


def _unmount_below(root: Path) -> None:
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(str(root))), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _wait(check, timeout: float, what: str, logs: Optional[Path] = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.3)
    tail = logs.read_text(errors="replace")[-3000:] if logs and logs.exists() else ""
    raise AssertionError(f"{what} not within {timeout}s\n{tail}")


def start_cluster() -> KubeCluster:
    bin_dir = binaries()
    root = Path(tempfile.mkdtemp(prefix="fal-serverless-test-k8s-"))
    iptables_before = subprocess.run([tool("iptables-save")], capture_output=True, text=True, check=False).stdout
    pki = root / "pki"
    _certificates(pki)
    token = os.urandom(16).hex()
    (pki / "tokens.csv").write_text(f'{token},admin,admin,"system:masters"\n')
    etcd_port, etcd_peer, api_port = _free_port(), _free_port(), _free_port()
    server = f"https://127.0.0.1:{api_port}"
    cluster = KubeCluster(
        root, server, token, pki / "ca.crt", f"unix://{root}/docker.sock", iptables_before=iptables_before
    )
    (root / "kubeconfig").write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {{server: "{server}", certificate-authority: "{pki / "ca.crt"}"}}
users:
- name: admin
  user: {{token: "{token}"}}
contexts:
- name: test
  context: {{cluster: test, user: admin}}
current-context: test
"""
    )

    def spawn(name: str, argv: List[str], env: Optional[Dict[str, str]] = None) -> None:
        log = open(root / f"{name}.log", "ab")
        cluster.processes[name] = subprocess.Popen(
            argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=dict(os.environ, **(env or {}))
        )

    try:
        spawn(
            "etcd",
            [
                tool("etcd"),
                "--name",
                "fal-test",
                "--data-dir",
                str(root / "etcd"),
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-cluster",
                f"fal-test=http://127.0.0.1:{etcd_peer}",
            ],
        )
        runc = root / "runc-wrapper"
        runc.write_text(RUNC_WRAPPER.format(runc=tool("runc")))
        runc.chmod(0o755)
        spawn(
            "containerd",
            [
                tool("containerd"),
                "--root",
                str(root / "containerd"),
                "--state",
                str(root / "containerd-state"),
                "--address",
                str(root / "containerd.sock"),
            ],
        )
        _wait(lambda: (root / "containerd.sock").exists(), 30, "containerd", root / "containerd.log")
        spawn(
            "dockerd",
            [
                tool("dockerd"),
                "--data-root",
                str(root / "docker"),
                "--exec-root",
                str(root / "docker-exec"),
                "-H",
                cluster.docker_host,
                "--pidfile",
                str(root / "docker.pid"),
                "--containerd",
                str(root / "containerd.sock"),
                "--bridge=none",
                "--iptables=false",
                "--ip-masq=false",
                "--ip-forward=false",
                "--add-runtime",
                f"fal-test-runc={runc}",
                "--default-runtime=fal-test-runc",
                # The kubelet's driver: on a systemd host dockerd would pick systemd's, and the kubelet refuse it.
                "--exec-opt",
                "native.cgroupdriver=cgroupfs",
            ],
        )
        _wait(lambda: cluster.docker("info") != "", 60, "dockerd", root / "dockerd.log")
        _images(cluster)
        spawn(
            "kube-apiserver",
            [
                str(bin_dir / "kube-apiserver"),
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                "--insecure-port=0",
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--token-auth-file={pki / 'tokens.csv'}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--api-audiences=https://kubernetes.default.svc",
                "--authorization-mode=Node,RBAC",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--kubelet-preferred-address-types=Hostname",
                "--allow-privileged=true",
            ],
        )
        _wait(
            lambda: cluster.api().get("/readyz").status_code == 200, 60, "kube-apiserver", root / "kube-apiserver.log"
        )
        kubeconfig = str(root / "kubeconfig")
        spawn(
            "kube-controller-manager",
            [
                str(bin_dir / "kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                "--leader-elect=false",
                "--port=0",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=true",
                "--controllers=*,-nodeipam",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
            ],
        )
        spawn(
            "kube-scheduler",
            [
                str(bin_dir / "kube-scheduler"),
                f"--kubeconfig={kubeconfig}",
                "--leader-elect=false",
                "--port=0",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
            ],
        )
        spawn(
            "kubelet",
            [
                str(bin_dir / "kubelet"),
                f"--kubeconfig={kubeconfig}",
                "--container-runtime=docker",
                f"--docker-endpoint={cluster.docker_host}",
                f"--pod-infra-container-image={PAUSE_IMAGE}",
                "--fail-swap-on=false",
                "--cgroup-driver=cgroupfs",
                "--cgroups-per-qos=false",
                "--enforce-node-allocatable=",
                "--eviction-hard=",
                "--hostname-override=localhost",
                "--address=127.0.0.1",
                "--read-only-port=0",
                "--port",
                str(_free_port()),
                "--healthz-port=0",
                "--make-iptables-util-chains=false",
                "--network-plugin=",
                f"--root-dir={root / 'kubelet'}",
                f"--cert-dir={root / 'kubelet-pki'}",
            ],
            env={"AWS_EC2_METADATA_DISABLED": "true"},
        )
        _wait(lambda: _node_ready(cluster), 120, "the node", root / "kubelet.log")
        _wait(lambda: _default_service_account(cluster), 60, "the default service account")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _node_ready(cluster: KubeCluster) -> bool:
    nodes = cluster.get("/api/v1/nodes")["items"]
    return any(c["type"] == "Ready" and c["status"] == "True" for n in nodes for c in n["status"].get("conditions", []))


def _default_service_account(cluster: KubeCluster) -> bool:
    return bool(cluster.get("/api/v1/namespaces/default/serviceaccounts")["items"])


def _images(cluster: KubeCluster) -> None:
    """The pause image (busybox's static binary sleeping) and the worker image (Debian, and this host's Python at
    its own path), imported."""
    images = cache_dir() / "images"
    images.mkdir(parents=True, exist_ok=True)
    pause = images / "pause.tar"
    if not pause.exists():
        rootfs = Path(tempfile.mkdtemp(prefix="fal-pause-"))
        (rootfs / "bin").mkdir()
        shutil.copy(shutil.which("busybox") or "/bin/busybox", rootfs / "bin" / "busybox")
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(pause) + ".partial", "."], check=True)
        Path(str(pause) + ".partial").rename(pause)
        shutil.rmtree(rootfs)
    cluster.docker("import", "--change", 'ENTRYPOINT ["/bin/busybox", "sleep", "2147483647"]', str(pause), PAUSE_IMAGE)
    base = images / "debian-bookworm-python3.tar"
    if not base.exists():
        rootfs = Path(tempfile.mkdtemp(prefix="fal-worker-rootfs-"))
        subprocess.run(
            [
                tool("debootstrap"),
                "--variant=minbase",
                "--include=python3",
                "bookworm",
                str(rootfs),
                "http://deb.debian.org/debian",
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(base) + ".partial", "."], check=True)
        Path(str(base) + ".partial").rename(base)
        shutil.rmtree(rootfs, ignore_errors=True)
    cluster.docker("import", str(base), "fal-test/debian-python:1")
    # The environments' Python, at the same path as on this host (a venv's python links to it); the system's own
    # (/usr) is the image's already.
    prefix = Path(sys.base_prefix)
    if prefix == Path("/usr"):
        cluster.docker("tag", "fal-test/debian-python:1", WORKER_IMAGE)
        return
    container = cluster.docker("create", "fal-test/debian-python:1", "/bin/true").strip()
    cluster.docker("cp", "-", f"{container}:/", input=_installation_tar(prefix))
    cluster.docker("commit", container, WORKER_IMAGE)
    cluster.docker("rm", container)


def _installation_tar(prefix: Path) -> bytes:
    """A Python installation as a tar rooted at /, its parent directories readable by anyone (a worker runs as a
    user's uid), without its site-packages (environments do not use them), tests or caches."""
    skipped = {"site-packages", "test", "tests", "__pycache__", "idlelib", "tkinter", "turtledemo", "ensurepip"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for parent in reversed(prefix.parents[:-1]):
            info = tarfile.TarInfo(str(parent.relative_to("/")))
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)

        def keep(info: tarfile.TarInfo) -> Optional[tarfile.TarInfo]:
            return None if set(Path(info.name).parts) & skipped else info

        tar.add(prefix, arcname=str(prefix.relative_to("/")), filter=keep)
    return buffer.getvalue()
