"""Users' persistent storage: `/data` in their jailed workers, its quota, and the REST files routes, with our SDK, the
original 0.6.41 client (`sync_dir`, `download_file`, `download_weights`) and `fal-serverless files`."""

from __future__ import annotations

import hashlib
import os
import resource
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator, Tuple

import httpx
import pytest
from conftest import (
    FAL_SERVERLESS,
    NetworkHosts,
    Server,
    cloud_call,
    cloud_source,
    run_script,
    start_server,
    venv_with,
)
from test_original_client import HOSTNAME, VERSION, OriginalClient

#: Small, so that filling it is quick.
QUOTA_MB = 24


def mounted(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines())


@pytest.fixture(scope="module")
def storage_server() -> Iterator[Server]:
    started = start_server(config=f"[storage]\nquota_mb = {QUOTA_MB}\nimage_gb = 1\n")
    yield started
    started.stop()
    # The server unmounts the image it mounted.
    assert not mounted(started.data_dir / "storage")


@pytest.fixture(scope="module")
def alice(storage_server: Server) -> Tuple[str, str]:
    return storage_server.create_key("store-alice")


@pytest.fixture(scope="module")
def bob(storage_server: Server) -> Tuple[str, str]:
    return storage_server.create_key("store-bob")


def rest(server: Server, key: Tuple[str, str]) -> httpx.Client:
    return httpx.Client(base_url=f"http://{server.host}", headers={"Authorization": f"Key {key[0]}:{key[1]}"})


def result(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().splitlines()[-1]


WRITE = """
import os
os.makedirs("/data/notes", exist_ok=True)
open("/data/notes/a.txt", "w").write("kept")
st = os.stat("/data")
return (st.st_uid == os.getuid(), oct(st.st_mode & 0o777), os.environ["FAL_DATA_DIR"])
"""

READ = """
import os
return open("/data/notes/a.txt").read() if os.path.exists("/data/notes/a.txt") else sorted(os.listdir("/data"))
"""


def test_data_is_kept_across_workers_and_private_to_its_user(
    storage_server: Server, alice: Tuple[str, str], bob: Tuple[str, str]
) -> None:
    assert mounted(storage_server.data_dir / "storage")
    assert result(cloud_call(storage_server, WRITE, alice, keep_alive=0)) == "(True, '0o700', '/data')"
    # Another environment: another worker, the same storage.
    assert result(cloud_call(storage_server, READ, alice, requirements=["six"])) == "'kept'"
    # Bob's /data is his own, empty; the storage root is nowhere in his jail.
    assert result(cloud_call(storage_server, READ, bob)) == "[]"
    root = storage_server.data_dir / "storage"
    seen = result(cloud_call(storage_server, f"import os\nreturn os.path.exists({str(root)!r})", bob))
    assert seen == "False"
    # Nor can he reach it by REST, by any path.
    with rest(storage_server, bob) as client:
        for path in [
            "notes/a.txt",
            "/data/notes/a.txt",
            "../store-alice/notes/a.txt",
            "%2e%2e/store-alice/notes/a.txt",
        ]:
            response = client.get(f"/files/file/{path}")
            assert response.status_code in (400, 404), (path, response.text)
            assert "kept" not in response.text
    with rest(storage_server, alice) as client:
        assert client.get("/files/file/notes/a.txt").text == "kept"
        listed = client.get("/files/list/notes").json()
        assert [(f["name"], f["path"], f["is_file"], f["size"]) for f in listed] == [
            ("a.txt", "/data/notes/a.txt", True, 4)
        ]
    # No key, a wrong key.
    assert httpx.get(f"http://{storage_server.host}/files/list").status_code == 401
    with rest(storage_server, (alice[0], "wrong")) as client:
        assert client.get("/files/list").status_code == 401


def test_data_survives_a_server_restart() -> None:
    first = start_server(config="[storage]\nquota_mb = 8\nimage_gb = 1\n")
    try:
        key = first.create_key("store-restart")
        assert result(cloud_call(first, WRITE, key)) == "(True, '0o700', '/data')"
    finally:
        first.stop()
    assert not mounted(first.data_dir / "storage")
    second = start_server(data_dir=first.data_dir)
    try:
        assert result(cloud_call(second, READ, key)) == "'kept'"
    finally:
        second.stop()
    assert not mounted(first.data_dir / "storage")


FILL = """
import errno
try:
    with open("/data/big", "wb") as f:
        for _ in range(64):
            f.write(b"x" * (1 << 20))
            f.flush()
    return "written"
except OSError as e:
    return f"{errno.errorcode[e.errno]}: {e.strerror}"
finally:
    import os
    if os.path.exists("/data/big"):
        os.remove("/data/big")
"""


def test_the_quota_is_enforced_on_the_users_own_writes_and_on_uploads(
    storage_server: Server, alice: Tuple[str, str]
) -> None:
    assert result(cloud_call(storage_server, FILL, alice)) == "'EDQUOT: Disk quota exceeded'"
    with rest(storage_server, alice) as client:
        du = client.get("/files/du").json()
        assert du["quota_bytes"] == QUOTA_MB << 20 and du["enforcement"] == "kernel", du
        refused = client.put("/files/file/too-big.bin", content=b"y" * ((QUOTA_MB + 4) << 20))
        assert refused.status_code == 413, refused.text
        assert "quota" in refused.json()["detail"]
        assert client.post("/files/file/exists/too-big.bin").status_code == 404
        assert client.put("/files/file/small.bin", content=b"z" * 1000).json() is True
        assert client.delete("/files/file/small.bin").json() is True


#: A new subvolume (or snapshot) gets a qgroup of its own, without the user's limit: what is written there would not
#: count. The jail's seccomp filter refuses the four ioctls that make one (numbers from linux/btrfs.h: _IOW(0x94, nr,
#: 4096-byte args)); every other ioctl, and plain writes, still work.
SUBVOLUMES = """
import errno, fcntl, os, struct
data = os.open("/data", os.O_RDONLY | os.O_DIRECTORY)
# bytearrays: ioctl copies immutable args through a 1024-byte buffer, these are 4096 bytes.
def v1(name, fd=0):
    return bytearray(struct.pack("=q4088s", fd, name.encode()))
def v2(name, fd=0):
    return bytearray(struct.pack("=q2Q4Q4040s", fd, 0, 0, 0, 0, 0, 0, name.encode()))
tried = []
for cmd, args in [
    (0x5000940E, v1("escape-subvol")),
    (0x50009418, v2("escape-subvol-v2")),
    (0x50009401, v1("escape-snap", data)),
    (0x50009417, v2("escape-snap-v2", data)),
]:
    try:
        fcntl.ioctl(data, cmd, args)
        tried.append("created")
    except OSError as e:
        tried.append(errno.errorcode[e.errno])
left = sorted(name for name in os.listdir("/data") if name.startswith("escape"))
with open("/data/plain.txt", "w") as f:
    f.write("still writable")
plain = os.open("/data/plain.txt", os.O_RDONLY)
flags = fcntl.ioctl(plain, 0x80086601, bytes(8))  # FS_IOC_GETFLAGS: another ioctl, allowed
written = os.read(plain, 100).decode()
os.remove("/data/plain.txt")
return tried, left, len(flags), written
"""


def test_a_function_cannot_make_a_subvolume_that_escapes_its_quota(storage_server: Server) -> None:
    key = storage_server.create_key("store-subvol")
    seen = result(cloud_call(storage_server, SUBVOLUMES, key))
    assert seen == "(['EPERM', 'EPERM', 'EPERM', 'EPERM'], [], 8, 'still writable')", seen
    # The file system holds the users' subvolumes and nothing a function made.
    listed = subprocess.run(
        ["btrfs", "subvolume", "list", str(storage_server.data_dir / "storage")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "store-subvol" in listed and "escape" not in listed, listed


def test_hostile_paths_are_refused(storage_server: Server, alice: Tuple[str, str]) -> None:
    # A link the user's own function leaves, to the host and to another user's storage.
    link = "import os\nos.symlink('/etc/shadow', '/data/shadow')\nos.symlink('/data/..', '/data/up')\nreturn 1"
    assert result(cloud_call(storage_server, link, alice)) == "1"
    with rest(storage_server, alice) as client:
        for path, status in [
            ("%2e%2e/x", 400),
            ("a/%2e%2e/%2e%2e/x", 400),
            ("/etc/passwd", 400),
            ("n" * 300, 400),
            ("shadow", 400),
            ("up/store-bob", 400),
        ]:
            response = client.post(f"/files/file/exists/{path}")
            assert response.status_code == status, (path, response.text)
            assert response.json()["detail"], response.text
            assert client.get(f"/files/file/{path}").status_code in (400, 404)
        assert client.get("/files/list/up").status_code == 400
        wrong = client.post("/files/list")
        assert wrong.status_code == 405 and "does not take POST" in wrong.json()["detail"]
        assert "hash" in client.post("/files/dir/check_hash/x", content=b"{").json()["detail"]
        for path in ["shadow", "up"]:
            assert client.delete(f"/files/file/{path}").json() is True
        assert os.path.exists("/etc/shadow")


SPECIAL = """
import os, socket
os.makedirs("/data/special/dir", exist_ok=True)
os.mkfifo("/data/special/fifo")
os.mkfifo("/data/special/dir/fifo")
open("/data/special/dir/f.txt", "w").write("x")
listener = socket.socket(socket.AF_UNIX)
listener.bind("/data/special/sock")
return sorted(os.listdir("/data/special"))
"""


def test_a_fifo_or_socket_in_data_is_refused_not_waited_on(storage_server: Server) -> None:
    key = storage_server.create_key("store-fifo")
    assert result(cloud_call(storage_server, SPECIAL, key)) == "['dir', 'fifo', 'sock']"
    # Opening a FIFO for reading or writing waits for the other end: the server must not.
    with httpx.Client(
        base_url=f"http://{storage_server.host}", headers={"Authorization": f"Key {key[0]}:{key[1]}"}, timeout=20
    ) as client:
        for name, what in [("fifo", "a FIFO (named pipe)"), ("sock", "a socket")]:
            got = client.get(f"/files/file/special/{name}")
            assert got.status_code == 400, got.text
            assert got.json()["detail"] == f"/data/special/{name} is {what}, not a regular file", got.text
            described = client.post(f"/files/file/exists/special/{name}", params={"calculate_checksum": "true"})
            assert described.status_code == 200 and described.json()["is_file"] is False, described.text
        assert client.post("/files/dir/check_hash/special", json={"hash": "0" * 64}).json() is False
        # A file put there replaces the FIFO (it is not opened).
        assert client.put("/files/file/special/fifo", content=b"new").json() is True
        assert client.get("/files/file/special/fifo").content == b"new"
        assert client.delete("/files/file/special").json() is True
        # The server keeps serving.
        assert client.get("/files/list").json() == []


DEEP = """
import os
os.makedirs("/data/deep", exist_ok=True)
os.chdir("/data/deep")
for _ in range({depth}):
    os.mkdir("d")
    os.chdir("d")
open("bottom.txt", "w").write("bottom")
os.makedirs("/data/wide", exist_ok=True)
for i in range({width}):
    os.mkdir(f"/data/wide/{{i}}")
open("/data/wide/0/f.txt", "w").write("wide")
return "made"
"""


def test_a_deep_or_wide_tree_in_data_is_walked_and_removed(storage_server: Server) -> None:
    key = storage_server.create_key("store-deep")
    # Deeper than a walk that recursed per level has stack for; wider than the server has descriptors (it has what
    # this process has) for a walk that held one per directory it has yet to walk.
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    width = soft + 100 if soft < 30000 else 2000
    made = run_script(cloud_source(DEEP.format(depth=12000, width=width)), storage_server.env(*key), timeout=600)
    assert result(made) == "'made'"
    with httpx.Client(
        base_url=f"http://{storage_server.host}", headers={"Authorization": f"Key {key[0]}:{key[1]}"}, timeout=120
    ) as client:
        du = client.get("/files/du")
        assert du.status_code == 200 and du.json()["used_bytes"] == len("bottom") + len("wide"), du.text
        for tree in ["deep", "wide"]:
            hashed = client.post(f"/files/dir/check_hash/{tree}", json={"hash": "0" * 64})
            assert hashed.status_code == 200 and hashed.json() is False, hashed.text
        # An upload counts what is kept first (the same walk).
        assert client.put("/files/file/after.txt", content=b"after").json() is True
        for tree in ["deep", "wide"]:
            removed = client.delete(f"/files/file/{tree}")
            assert removed.status_code == 200 and removed.json() is True, removed.text
        assert [f["name"] for f in client.get("/files/list").json()] == ["after.txt"]


def raw_request(server: Server, head: str, body_start: bytes, wait: float = 10) -> bytes:
    """Sends a request's head and the start of its body, never the rest; what the server answers within `wait`
    seconds (nothing: b"")."""
    host, port = server.host.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(head.encode() + body_start)
        try:
            return sock.recv(65536)
        except socket.timeout:
            return b""


def test_the_key_is_checked_before_an_upload_is_read(storage_server: Server, alice: Tuple[str, str]) -> None:
    boundary = "b0undary"
    junk_field = f'--{boundary}\r\nContent-Disposition: form-data; name="junk"\r\n\r\n'.encode() + b"x" * 1000
    for auth in ["", f"Authorization: Key {alice[0]}:wrong\r\n"]:
        for method, path, content_type, start in [
            ("POST", "/files/file/local/up.bin", f"multipart/form-data; boundary={boundary}", junk_field),
            ("POST", "/files/file/local/up?unzip=true", f"multipart/form-data; boundary={boundary}", junk_field),
            ("POST", "/files/dir/check_hash/somewhere", "application/json", b'{"hash": "'),
            ("PUT", "/files/file/up.bin", "application/octet-stream", b"y" * 1000),
        ]:
            head = (
                f"{method} {path} HTTP/1.1\r\nHost: {storage_server.host}\r\n{auth}"
                f"Content-Type: {content_type}\r\nContent-Length: 100000\r\n\r\n"
            )
            # The rest of the body never comes: only a server that did not wait for it answers.
            answer = raw_request(storage_server, head, start)
            assert answer.startswith(b"HTTP/1.1 401"), (method, path, auth, answer)
    with rest(storage_server, alice) as client:
        assert client.post("/files/file/exists/up.bin").status_code == 404


def test_a_refused_upload_leaves_the_file_that_was_there(storage_server: Server) -> None:
    key = storage_server.create_key("store-atomic")
    too_big = b"y" * ((QUOTA_MB + 4) << 20)
    with rest(storage_server, key) as client:

        def kept() -> Tuple[bytes, list]:
            names = [f["name"] for f in client.get("/files/list/kept").json()]
            return client.get("/files/file/kept/f.bin").content, names

        assert client.put("/files/file/kept/f.bin", content=b"old").json() is True
        # The server answers before it has read the body, and says the connection ends there (it drops the rest
        # of the body with it): the client's next request, on the same client, goes on a new one and is answered.
        refused = client.put("/files/file/kept/f.bin", content=too_big)
        assert refused.status_code == 413, refused.text
        assert refused.headers["connection"] == "close"
        assert "the file it replaces, 3 bytes, counts until the upload is whole" in refused.json()["detail"]
        assert kept() == (b"old", ["f.bin"])
        refused = client.post("/files/file/local/kept/f.bin", files={"file_upload": ("f.bin", too_big)})
        assert refused.status_code == 413, refused.text
        assert kept() == (b"old", ["f.bin"])
        # The client gone midway.
        head = (
            f"PUT /files/file/kept/f.bin HTTP/1.1\r\nHost: {storage_server.host}\r\n"
            f"Authorization: Key {key[0]}:{key[1]}\r\nContent-Length: 1000000\r\n\r\n"
        )
        host, port = storage_server.host.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head.encode() + b"z" * 10000)
            time.sleep(1)
        deadline = time.time() + 10
        while kept() != (b"old", ["f.bin"]) and time.time() < deadline:
            time.sleep(0.2)
        assert kept() == (b"old", ["f.bin"])
        # One received whole replaces it.
        assert client.put("/files/file/kept/f.bin", content=b"new").json() is True
        assert kept() == (b"new", ["f.bin"])


@pytest.fixture(scope="module")
def original(storage_server: Server, tmp_path_factory: pytest.TempPathFactory) -> OriginalClient:
    python = venv_with(tmp_path_factory, "fal-serverless-0.6.41-storage", VERSION)
    hosts = tmp_path_factory.mktemp("hosts") / "hosts"
    rest_host = HOSTNAME.replace("api", "rest", 1)
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {HOSTNAME}\n127.0.0.1 {rest_host}\n")
    return OriginalClient(python, hosts, storage_server, storage_server.create_key("store-original"))


SYNC = """
from fal_serverless import isolated, sync_dir
print("synced", sync_dir({local!r}, "/data/synced/project"))
print("again", sync_dir({local!r}, "/data/synced/project"))

@isolated()
def read():
    import os
    found = []
    for root, _, files in os.walk("/data/synced/project"):
        for name in sorted(files):
            path = os.path.join(root, name)
            found.append((os.path.relpath(path, "/data/synced/project"), open(path).read()))
    return sorted(found)

print("read", read())
"""


def test_the_original_clients_sync_dir_then_a_function_reads_the_files(
    original: OriginalClient, tmp_path: Path
) -> None:
    local = tmp_path / "project"
    (local / "sub").mkdir(parents=True)
    (local / "a.txt").write_text("alpha")
    (local / "sub" / "b.txt").write_text("beta")
    out = original.script(SYNC.format(local=str(local))).stdout
    assert "synced synced/project" in out, out
    # The second time the server holds the same files: nothing is uploaded.
    assert "synced/project already uploaded" in out, out
    hash_text = (local / ".fal_hash").read_text()
    assert f"read [('.fal_hash', '{hash_text}'), ('a.txt', 'alpha'), ('sub/b.txt', 'beta')]" in out, out


DOWNLOAD = """
import hashlib
from fal_serverless import download_file, download_weights
from fal_serverless.api import FalServerlessError
spec = download_file({url!r}, "/data/w/weights.bin", checksum_sha256={sha!r})
print("got", spec.size, spec.checksum_sha256)
try:
    download_file({url!r}, "/data/w/weights.bin", checksum_sha256="0" * 64)
except FalServerlessError as e:
    print("refused", str(e).splitlines()[0])
weights = download_weights({url!r})
print("weights", weights.path, weights.size)
"""


def test_download_file_of_the_original_client_and_ours(
    original: OriginalClient, storage_server: Server, test_hosts: NetworkHosts
) -> None:
    data = os.urandom(50_000)
    (test_hosts.files / "weights.bin").write_bytes(data)
    url = test_hosts.url("public", "files/weights.bin")
    sha = hashlib.sha256(data).hexdigest()
    out = original.script(DOWNLOAD.format(url=url, sha=sha)).stdout
    assert f"got {len(data)} {sha}" in out, out
    assert "refused Setup function download created file with unexpected SHA256 checksum." in out, out
    url_id = hashlib.sha256(url.encode()).hexdigest()
    assert f"weights /data/.fal/downloads/{url_id} {len(data)}" in out, out

    # Ours, with the same meaning.
    ours = f"""
import hashlib
from fal_serverless import download_file, FalServerlessError
spec = download_file({url!r}, "/data/ours/weights.bin", checksum_sha256={sha!r})
print("got", spec.size, spec.checksum_sha256, spec.path)
try:
    download_file({url!r}, "/data/ours/weights.bin", checksum_md5="0" * 32)
except FalServerlessError as e:
    print("refused", str(e).splitlines()[0])
"""
    key = storage_server.create_key("store-ours")
    proc = run_script(ours, storage_server.env(*key), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"got {len(data)} {sha} /data/ours/weights.bin" in proc.stdout
    assert "refused /data/ours/weights.bin has an unexpected MD5 checksum." in proc.stdout


def test_our_sync_dir(storage_server: Server, tmp_path: Path) -> None:
    key = storage_server.create_key("store-sync")
    local = tmp_path / "ours"
    local.mkdir()
    (local / "x.txt").write_text("ex")
    script = f"""
from fal_serverless import sync_dir, isolated, cloud
print(sync_dir({str(local)!r}, "/data/mine"))
@isolated(host=cloud)
def read():
    return open("/data/mine/x.txt").read()
print(read())
"""
    proc = run_script(script, storage_server.env(*key), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == ["mine", "ex"]
    with rest(storage_server, key) as client:
        bad = client.post("/files/file/local/mine?unzip=true", files={"file_upload": ("x.zip", b"not a zip")})
        assert bad.status_code == 400 and "not a zip" in bad.json()["detail"]
        # A refused upload leaves what was there.
        assert client.get("/files/file/mine/x.txt").text == "ex"


def test_our_cli_files_commands(storage_server: Server, tmp_path: Path) -> None:
    key = storage_server.create_key("store-cli")
    local = tmp_path / "model.bin"
    data = os.urandom(5 << 20)
    local.write_bytes(data)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [FAL_SERVERLESS, "files", *args],
            env={**os.environ, **storage_server.env(*key)},
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )

    put = cli("put", str(local), "/data/models/model.bin")
    assert put.returncode == 0, put.stderr
    assert "to /data/models/model.bin (5.0 MiB)" in put.stdout and "100% of 5.0 MiB" in put.stderr, put
    listed = cli("ls", "/data/models")
    assert listed.returncode == 0 and f"{len(data)}" in listed.stdout and "/data/models/model.bin" in listed.stdout
    assert "/data/models/" in cli("ls").stdout
    got = cli("get", "models/model.bin", str(tmp_path / "back.bin"))
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "back.bin").read_bytes() == data
    du = cli("du")
    assert du.returncode == 0 and "5.0 MiB of 24.0 MiB used" in du.stdout and "kernel" in du.stdout, du.stdout
    # A function sees what was put.
    seen = cloud_call(storage_server, "import os\nreturn os.path.getsize('/data/models/model.bin')", key)
    assert result(seen) == str(len(data))
    assert cli("rm", "models").returncode == 0
    missing = cli("get", "models/model.bin")
    assert missing.returncode == 1 and "no such file or directory" in missing.stderr, missing.stderr
    hostile = cli("get", "../../etc/passwd")
    assert hostile.returncode == 1 and "`..`" in hostile.stderr, hostile.stderr
    assert not (tmp_path / "passwd").exists()


def test_the_local_hosts_storage_is_named_by_fal_data_dir(cache_dir: Path) -> None:
    script = """
from fal_serverless import isolated, local
@isolated(host=local)
def keep():
    import os
    path = os.path.join(os.environ["FAL_DATA_DIR"], "kept.txt")
    previous = open(path).read() if os.path.exists(path) else ""
    open(path, "w").write(previous + "x")
    return os.environ["FAL_DATA_DIR"]
print(keep())
"""
    (cache_dir / "data" / "kept.txt").unlink(missing_ok=True)
    first = run_script(script, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == str(cache_dir / "data")
    # Another process, another worker: the same directory.
    assert run_script(script, timeout=300).returncode == 0
    assert (cache_dir / "data" / "kept.txt").read_text() == "xx"


SERVED = """
from fal_serverless import isolated

@isolated(serve=True, keep_alive=30)
def notes(name: str) -> dict:
    import os
    path = os.path.join("/data/app-notes", name)
    seen = open(path).read() if os.path.exists(path) else None
    os.makedirs("/data/app-notes", exist_ok=True)
    open(path, "a").write("+")
    return {"seen": seen}

print(notes.serve(alias="notes"))
"""


def test_web_endpoint_replicas_and_queue_requests_see_their_owners_data(storage_server: Server) -> None:
    key = storage_server.create_key("store-app")
    proc = run_script(SERVED, storage_server.env(*key), timeout=600)
    assert proc.returncode == 0, proc.stderr
    url = proc.stdout.strip().splitlines()[-1]
    headers = {"Authorization": f"Key {key[0]}:{key[1]}"}
    first = httpx.post(url, params={"name": "n"}, headers=headers, timeout=300)
    assert first.status_code == 200 and first.json() == {"seen": None}, first.text
    with rest(storage_server, key) as client:
        assert client.get("/files/file/app-notes/n").text == "+"
        submitted = client.post("/queue/store-app/notes", params={"name": "n"}, json={}).json()
        with client.stream("GET", submitted["status_url"] + "/stream", timeout=300) as stream:
            for _ in stream.iter_lines():
                pass
        assert client.get(submitted["response_url"]).json() == {"seen": "+"}
        assert client.get("/files/file/app-notes/n").text == "++"
