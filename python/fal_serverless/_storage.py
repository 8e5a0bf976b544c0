"""Your persistent storage on the server: `/data` in every worker of yours, kept across calls, workers and restarts.

`sync_dir(local, "/data/x")` uploads a directory there (skipped when the server already holds the same files),
`download_file(url, "/data/x/f", checksum_sha256=...)` has a worker of machine type S download a URL there unless it
is there already, and `download_weights(url)` does it at `/data/.fal/downloads/<sha256 of the url>`. They mean what
the original fal-serverless client's functions of the same names mean, over the same REST routes of the server (its
own port, `Authorization: Key id:secret`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from .exceptions import FalServerlessError

#: Where workers see your storage.
DATA = "/data"


@dataclass
class FileSpec:
    """A file (or directory) in your storage, as the server describes it."""

    path: Path
    size: int
    is_file: bool
    checksum_sha256: Optional[str] = None
    checksum_md5: Optional[str] = None


def _rest() -> Tuple[str, Dict[str, str], Optional[ssl.SSLContext]]:
    from ._hosts import cloud

    client = cloud.client(None)
    key_id, key_secret = client.key
    context = None
    if client.uri.startswith("https://"):
        context = ssl.create_default_context(cafile=os.environ.get("FAL_SERVERLESS_CA_FILE") or None)
    return client.uri.rstrip("/"), {"Authorization": f"Key {key_id}:{key_secret}"}, context


def _request(method: str, route: str, body: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None) -> Any:
    """One REST call; its JSON answer, or None for a 404. Other errors raise FalServerlessError with the server's
    message."""
    base, auth, context = _rest()
    request = urllib.request.Request(base + route, data=body, method=method, headers={**auth, **(headers or {})})
    try:
        with urllib.request.urlopen(request, context=context, timeout=600) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        try:
            detail = json.loads(error.read()).get("detail")
        except (ValueError, AttributeError):
            detail = None
        raise FalServerlessError(f"the server refused {method} {route.split('?')[0]}: {detail or error}") from None
    except urllib.error.URLError as error:
        raise FalServerlessError(f"cannot reach the server at {base}: {error.reason}") from None


def _quote(path: str) -> str:
    return urllib.parse.quote(path, safe="/")


def _directory_hash(path: str) -> str:
    """The hash the server compares (the original client's): sha256 over the files' bytes in `os.walk` order,
    `.fal_hash` left out."""
    digest = hashlib.sha256()
    for root, _, files in os.walk(path):
        for name in files:
            if name != ".fal_hash":
                with open(os.path.join(root, name), "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def _relative(remote_dir: str) -> str:
    if not remote_dir.startswith(DATA + "/") or remote_dir.rstrip("/") == DATA:
        raise ValueError("'remote_dir' must be an absolute path below /data, e.g. '/data/sync/my_dir'")
    return remote_dir[len(DATA) + 1 :]


def sync_dir(local_dir: Union[str, Path], remote_dir: str, force_upload: bool = False) -> str:
    """Uploads `local_dir` to `remote_dir` (below /data), replacing what was there, unless the server already holds
    the same files (or `force_upload`). Returns `remote_dir` relative to /data, as the original does."""
    local = os.path.expanduser(str(local_dir))
    if not os.path.isdir(local):
        raise ValueError(f"{local_dir} is not a directory")
    relative = _relative(remote_dir)
    local_hash = _directory_hash(local)
    body = json.dumps({"hash": local_hash}).encode()
    same = _request("POST", f"/files/dir/check_hash/{_quote(relative)}", body, {"Content-Type": "application/json"})
    if same is True and not force_upload:
        return relative
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for root, _, files in os.walk(local):
            for name in files:
                if name == ".fal_hash":
                    continue
                path = os.path.join(root, name)
                zipped.write(path, os.path.relpath(path, local))
        zipped.writestr(".fal_hash", local_hash)
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file_upload"; filename="upload.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()
    payload = head + archive.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    _request(
        "POST",
        f"/files/file/local/{_quote(relative)}?unzip=true",
        payload,
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    return relative


def file_exists(path: Union[str, Path], calculate_checksum: bool = False) -> Optional[FileSpec]:
    """What the server holds at `path` (below /data), or None."""
    query = "?calculate_checksum=true" if calculate_checksum else ""
    found = _request("POST", f"/files/file/exists/{_quote(str(path))}{query}")
    if found is None:
        return None
    return FileSpec(
        path=Path(found["path"]),
        size=found["size"],
        is_file=found["is_file"],
        checksum_sha256=found.get("checksum_sha256"),
        checksum_md5=found.get("checksum_md5"),
    )


def download_file(
    url: str,
    check_location: Union[str, Path],
    checksum_sha256: Optional[str] = None,
    checksum_md5: Optional[str] = None,
    force: bool = False,
) -> FileSpec:
    """Makes sure `check_location` (below /data) holds the file at `url`: unless it is there already (or `force`), a
    worker of machine type S downloads it there. With a checksum, the file must have it, or FalServerlessError."""
    from ._hosts import cloud
    from ._isolated import isolated

    location = Path(check_location)
    _relative(str(location))
    checksum = bool(checksum_sha256 or checksum_md5)
    found = file_exists(location, calculate_checksum=checksum)
    if found is None or force:

        def download() -> None:
            import shutil
            import urllib.request as request

            location.parent.mkdir(parents=True, exist_ok=True)
            try:
                with request.urlopen(request.Request(url)) as response, location.open("wb") as f:
                    shutil.copyfileobj(response, f)
            except Exception as e:
                raise FileNotFoundError(f"Failed to download {url} to {location}\n{e}") from None

        isolated(host=cloud, machine_type="S")(download)()
        found = file_exists(location, calculate_checksum=checksum)
    if found is None:
        raise FalServerlessError(f"the download did not create {location}")
    if checksum:
        if not found.is_file:
            raise FalServerlessError(f"{location} is a directory, not a file")
        if checksum_sha256 and found.checksum_sha256 != checksum_sha256:
            raise FalServerlessError(
                f"{location} has an unexpected SHA256 checksum.\nExpected {checksum_sha256} but got "
                f"{found.checksum_sha256}"
            )
        if checksum_md5 and found.checksum_md5 != checksum_md5:
            raise FalServerlessError(
                f"{location} has an unexpected MD5 checksum.\nExpected {checksum_md5} but got {found.checksum_md5}"
            )
    return found


def download_weights(
    url: str, checksum_sha256: Optional[str] = None, checksum_md5: Optional[str] = None, force: bool = False
) -> FileSpec:
    """`download_file` to `/data/.fal/downloads/<sha256 of the url>`."""
    url_id = hashlib.sha256(url.encode("utf-8")).hexdigest()
    return download_file(url, f"{DATA}/.fal/downloads/{url_id}", checksum_sha256, checksum_md5, force)
