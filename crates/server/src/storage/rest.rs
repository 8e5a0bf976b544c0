//! The REST files routes (what the original client's `sync_dir`, `download_file` and `download_weights` call, and
//! ours `fal-serverless files`), each on the caller's own storage, named by `Authorization: Key id:secret`:
//!
//! * `POST /files/dir/check_hash/{dir}` `{"hash": H}` -> whether `dir` holds files whose hash (the client's:
//!   sha256 over the files' bytes in `os.walk` order, `.fal_hash` left out) is `H`.
//! * `POST /files/file/local/{path}[?unzip=true]`, multipart field `file_upload`: the file stored at `path`, or
//!   the zip unpacked there (replacing the directory whole, once it has unpacked) -> `true`.
//! * `POST /files/file/exists/{path}[?calculate_checksum=true]` -> its `FileSpec`, or 404. The original sends the
//!   path as `/data/...` (so the URL has a double slash); a path is relative to `/data` otherwise.
//! * `GET /files/list[/{dir}]` -> the `FileSpec`s of a directory; `GET /files/file/{path}`: its bytes, streamed;
//!   `DELETE /files/file/{path}` -> `true`.
//! * Ours: `PUT /files/file/{path}` (the body, streamed, stored at `path`) and `GET /files/du` (the bytes kept, the
//!   quota and how it is enforced).
//!
//! Every path is confined to the caller's directory (`confine.rs`): `..`, an absolute path outside `/data` or an
//! overlong name is a 400; a symbolic link leading out is never followed; a FIFO, socket or device where a file is
//! read is a 400 (`not_a_file`), never opened. Errors are JSON, as the gateway's.
//!
//! The key is checked before any of a request's body is read: a client without one cannot make the server receive
//! anything. An upload is written beside its target under a temporary name and renamed over it once whole: one
//! refused midway (over the quota, broken off, the client gone) leaves what was there.

// Each handler's error is the response to send as it is, made once per refused request: boxing it gains nothing.
#![allow(clippy::result_large_err)]

use std::ffi::{OsStr, OsString};
use std::io::{Read, Seek};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, Request, State};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use http::{HeaderMap, Response, StatusCode};
use serde::Deserialize;
use sha2::Digest;

use super::confine::{
    commit_file_system_of, open_file_in, Entry, NotRegular, PathError, PendingFile, RelPath, TreeChanged, UserRoot,
    Visitor,
};
use super::unzip::{unzip, UnzipError};
use super::{usage, Enforcement, Storage};
use crate::gateway::{json_error, Gateway};

/// What an upload's request may carry beyond the quota left (the archive's own headers and directory).
const UPLOAD_SLACK: u64 = 16 << 20;
/// The largest body `check_hash` reads (`{"hash": "<64 hex digits>"}` and some).
const HASH_BODY_LIMIT: usize = 64 << 10;

#[derive(Debug, Clone)]
pub struct Files {
    pub storage: Arc<Storage>,
    pub gateway: Arc<Gateway>,
    /// The uids users' jailed processes run as: `.1` of them from `.0`.
    pub uids: (u32, u32),
}

type Reply = Response<Body>;

pub fn routes(files: Files) -> Router {
    Router::new()
        .route("/files/dir/check_hash/{*path}", post(check_hash).fallback(wrong_method))
        .route("/files/file/local/{*path}", post(upload).fallback(wrong_method).layer(DefaultBodyLimit::disable()))
        .route("/files/file/exists/{*path}", post(exists).fallback(wrong_method))
        .route("/files/list", get(list_root).fallback(wrong_method))
        .route("/files/list/{*path}", get(list).fallback(wrong_method))
        .route("/files/du", get(du).fallback(wrong_method))
        .route(
            "/files/file/{*path}",
            get(download).delete(remove).put(put).fallback(wrong_method).layer(DefaultBodyLimit::disable()),
        )
        .layer(axum::middleware::map_response(close_after_refused_body))
        .with_state(files)
}

/// An error answer of a files route tells the client the connection ends. Uploads are refused before their body is
/// read (a missing key, a full quota), and the server then drops what is left of the body with the connection: a
/// client that sent its next request on it would see it closed instead of an answer. (Every error, for simplicity:
/// errors are rare, and costing a new connection is all this does to the others.)
async fn close_after_refused_body(mut response: Reply) -> Reply {
    if response.status().is_client_error() || response.status().is_server_error() {
        response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    response
}

/// A method a files route does not take: said in JSON, as every answer of the server's HTTP side.
async fn wrong_method(request: Request) -> Reply {
    json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not take {}", request.uri().path(), request.method()),
    )
}

fn bad_path(error: PathError) -> Reply {
    json_error(StatusCode::BAD_REQUEST, "bad_path", error.to_string())
}

fn io_error(path: &RelPath, error: std::io::Error) -> Reply {
    let shown = path.display();
    if let Some(NotRegular { what }) = NotRegular::of_error(&error) {
        let hint = if *what == "a directory" { ": list it with GET /files/list/..." } else { "" };
        return json_error(
            StatusCode::BAD_REQUEST,
            "not_a_file",
            format!("{shown} is {what}, not a regular file{hint}"),
        );
    }
    if error.get_ref().is_some_and(|inner| inner.is::<TreeChanged>()) {
        return json_error(StatusCode::CONFLICT, "tree_changed", format!("{shown}: {error}"));
    }
    match error.raw_os_error() {
        Some(libc::ENOENT) => {
            json_error(StatusCode::NOT_FOUND, "not_found", format!("{shown}: no such file or directory"))
        }
        Some(libc::ENOTDIR) => {
            json_error(StatusCode::BAD_REQUEST, "not_a_directory", format!("{shown}: a part of it is not a directory"))
        }
        Some(libc::EISDIR) => json_error(StatusCode::BAD_REQUEST, "is_a_directory", format!("{shown} is a directory")),
        Some(libc::EXDEV) | Some(libc::ELOOP) => json_error(
            StatusCode::BAD_REQUEST,
            "bad_path",
            format!("{shown} goes through a symbolic link that leaves your /data; such links are not followed"),
        ),
        Some(libc::EDQUOT) | Some(libc::ENOSPC) => json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "over_quota",
            format!("{shown}: your storage is full (Disk quota exceeded); remove files with `fal-serverless files rm`"),
        ),
        _ => json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("{shown}: {error}")),
    }
}

fn task_failed(error: tokio::task::JoinError) -> Reply {
    json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("the storage task failed: {error}"))
}

impl Files {
    /// The caller's storage, made if it is new.
    async fn root(&self, headers: &HeaderMap) -> Result<Arc<UserRoot>, Reply> {
        let caller =
            match self.gateway.caller(headers)? {
                Some(caller) => caller,
                None => return Err(json_error(
                    StatusCode::UNAUTHORIZED,
                    "missing_key",
                    "send `Authorization: Key <key_id>:<key_secret>` (FAL_KEY_ID and FAL_KEY_SECRET for the original \
                     client)",
                )),
            };
        let ((first, count), user) = (self.uids, caller.user_id.clone());
        let uid = self
            .gateway
            .keys
            .blocking(move |keys| keys.uid(&user, first, count))
            .await
            .map_err(|e| json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
        let storage = self.storage.clone();
        let user = caller.user_id;
        tokio::task::spawn_blocking(move || {
            let dir = storage.user_dir(&user, uid).map_err(|e| e.to_string())?;
            UserRoot::open(&dir, uid).map_err(|e| format!("cannot open {}: {e}", dir.display()))
        })
        .await
        .map_err(task_failed)?
        .map(Arc::new)
        .map_err(|e| json_error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e))
    }

    /// What the caller's quota has left.
    fn left(&self, root: &UserRoot) -> std::io::Result<u64> {
        Ok(self.storage.quota_bytes().saturating_sub(usage(root, &RelPath::root())?))
    }
}

/// Runs `work` on the caller's storage on a blocking thread.
async fn on_root<T: Send + 'static>(
    files: &Files,
    headers: &HeaderMap,
    raw: &str,
    work: impl FnOnce(&Files, &UserRoot, &RelPath) -> Result<T, Reply> + Send + 'static,
) -> Result<T, Reply> {
    let (path, root) = target(files, headers, raw).await?;
    on(files, root, path, work).await
}

/// The path a request names and the caller's storage: the path checked first, then the key (before any of the
/// request's body is read).
async fn target(files: &Files, headers: &HeaderMap, raw: &str) -> Result<(RelPath, Arc<UserRoot>), Reply> {
    let path = RelPath::parse(raw).map_err(bad_path)?;
    Ok((path, files.root(headers).await?))
}

/// Runs `work` on `root` (the caller's storage, its key checked) on a blocking thread.
async fn on<T: Send + 'static>(
    files: &Files,
    root: Arc<UserRoot>,
    path: RelPath,
    work: impl FnOnce(&Files, &UserRoot, &RelPath) -> Result<T, Reply> + Send + 'static,
) -> Result<T, Reply> {
    let files = files.clone();
    tokio::task::spawn_blocking(move || work(&files, &root, &path)).await.map_err(task_failed)?
}

fn reply<T: serde::Serialize>(outcome: Result<T, Reply>) -> Reply {
    match outcome {
        Ok(value) => Json(value).into_response(),
        Err(response) => response,
    }
}

#[derive(Deserialize)]
struct HashCheck {
    hash: String,
}

/// The client's hash of a directory (`sync.py`'s `_compute_directory_hash`): sha256 over the bytes of its files,
/// `os.walk` order (a directory's files in the order it lists them, then its subdirectories, depth first), files
/// named `.fal_hash` left out. Symbolic links are not followed.
fn directory_hash(root: &UserRoot, dir: &RelPath) -> std::io::Result<String> {
    struct Hash {
        sha: sha2::Sha256,
        buffer: Vec<u8>,
    }
    impl Visitor for Hash {
        fn enter(&mut self, dir: &OwnedFd, entries: Vec<(OsString, Entry)>) -> std::io::Result<Vec<OsString>> {
            let mut subdirs = Vec::new();
            // Names that are not UTF-8 are none the client sends.
            for (name, entry) in entries.into_iter().filter(|(name, _)| name.to_str().is_some()) {
                if entry.is_dir {
                    subdirs.push(name);
                } else if entry.is_file && name != OsStr::new(".fal_hash") {
                    let mut file = open_file_in(dir, &name)?;
                    loop {
                        let read = file.read(&mut self.buffer)?;
                        if read == 0 {
                            break;
                        }
                        self.sha.update(&self.buffer[..read]);
                    }
                }
            }
            // Depth first, in listing order: the first subdirectory is walked next.
            Ok(subdirs)
        }
    }
    let mut hash = Hash { sha: sha2::Sha256::new(), buffer: vec![0u8; 64 << 10] };
    root.walk(dir, &mut hash)?;
    Ok(hex::encode(hash.sha.finalize()))
}

async fn check_hash(
    State(files): State<Files>,
    Path(path): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> Reply {
    // The key first: the body is read only for a caller who has one.
    let (rel, root) = match target(&files, &headers, &path).await {
        Ok(target) => target,
        Err(response) => return response,
    };
    let body = match axum::body::to_bytes(request.into_body(), HASH_BODY_LIMIT).await {
        Ok(body) => body,
        Err(error) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the body must be {{\"hash\": \"...\"}}, at most {HASH_BODY_LIMIT} bytes: {error}"),
            )
        }
    };
    let body: HashCheck = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(error) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the body must be {{\"hash\": \"...\"}}: {error}"),
            )
        }
    };
    reply(
        on(&files, root, rel, move |_, root, path| match root.stat(path) {
            Ok(Some(entry)) if entry.is_dir => {
                directory_hash(root, path).map(|hash| hash == body.hash.trim()).map_err(|e| io_error(path, e))
            }
            Ok(_) => Ok(false),
            Err(error) => Err(io_error(path, error)),
        })
        .await,
    )
}

/// A file's or directory's description, as the original's REST API gives it.
#[derive(serde::Serialize)]
struct FileSpec {
    path: String,
    name: String,
    created_time: String,
    updated_time: String,
    is_file: bool,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    checksum_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    checksum_md5: Option<String>,
}

fn iso_time(seconds: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(seconds).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}+00:00",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn spec(path: &RelPath, entry: &Entry) -> FileSpec {
    FileSpec {
        path: path.display(),
        name: path.components().last().cloned().unwrap_or_else(|| "data".into()),
        created_time: iso_time(entry.changed.min(entry.modified)),
        updated_time: iso_time(entry.modified),
        is_file: entry.is_file,
        size: entry.size,
        checksum_sha256: None,
        checksum_md5: None,
    }
}

#[derive(Deserialize)]
struct ExistsQuery {
    #[serde(default)]
    calculate_checksum: Option<String>,
}

async fn exists(
    State(files): State<Files>,
    Path(path): Path<String>,
    Query(query): Query<ExistsQuery>,
    headers: HeaderMap,
) -> Reply {
    let checksum = query.calculate_checksum.is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    reply(
        on_root(&files, &headers, &path, move |_, root, path| {
            let entry = match root.stat(path) {
                Ok(Some(entry)) => entry,
                Ok(None) => {
                    return Err(json_error(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        format!("{} does not exist", path.display()),
                    ))
                }
                Err(error) => return Err(io_error(path, error)),
            };
            let mut described = spec(path, &entry);
            if checksum && entry.is_file {
                let mut file = root.open_file(path).map_err(|e| io_error(path, e))?;
                let (mut sha, mut md5) = (sha2::Sha256::new(), md5::Md5::new());
                let mut buffer = vec![0u8; 64 << 10];
                loop {
                    let read = file.read(&mut buffer).map_err(|e| io_error(path, e))?;
                    if read == 0 {
                        break;
                    }
                    sha.update(&buffer[..read]);
                    md5.update(&buffer[..read]);
                }
                described.checksum_sha256 = Some(hex::encode(sha.finalize()));
                described.checksum_md5 = Some(hex::encode(md5.finalize()));
            }
            Ok(described)
        })
        .await,
    )
}

fn listing(root: &UserRoot, path: &RelPath) -> Result<Vec<FileSpec>, Reply> {
    let entries = root.list(path).map_err(|e| io_error(path, e))?;
    Ok(entries
        .iter()
        .filter(|(_, e)| e.is_file || e.is_dir)
        .map(|(name, entry)| spec(&path.join(name), entry))
        .collect())
}

async fn list_root(State(files): State<Files>, headers: HeaderMap) -> Reply {
    reply(on_root(&files, &headers, "", |_, root, path| listing(root, path)).await)
}

async fn list(State(files): State<Files>, Path(path): Path<String>, headers: HeaderMap) -> Reply {
    reply(on_root(&files, &headers, &path, |_, root, path| listing(root, path)).await)
}

async fn du(State(files): State<Files>, headers: HeaderMap) -> Reply {
    let enforcement = match files.storage.enforcement() {
        Enforcement::Kernel => "kernel",
        Enforcement::Soft => "soft",
    };
    reply(
        on_root(&files, &headers, "", move |files, root, path| {
            let used = usage(root, path).map_err(|e| io_error(path, e))?;
            Ok(serde_json::json!({
                "used_bytes": used,
                "quota_bytes": files.storage.quota_bytes(),
                "enforcement": enforcement,
            }))
        })
        .await,
    )
}

async fn download(State(files): State<Files>, Path(path): Path<String>, headers: HeaderMap) -> Reply {
    let opened = on_root(&files, &headers, &path, |_, root, path| {
        let file = root.open_file(path).map_err(|e| io_error(path, e))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok((file, size))
    })
    .await;
    match opened {
        Ok((file, size)) => {
            let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
            let mut response = Body::from_stream(stream).into_response();
            let headers = response.headers_mut();
            headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/octet-stream"));
            headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(size));
            response
        }
        Err(response) => response,
    }
}

async fn remove(State(files): State<Files>, Path(path): Path<String>, headers: HeaderMap) -> Reply {
    reply(
        on_root(&files, &headers, &path, |_, root, path| {
            if path.is_root() {
                return Err(json_error(StatusCode::BAD_REQUEST, "bad_path", "name a file or directory below /data"));
            }
            root.remove(path).map(|()| true).map_err(|e| io_error(path, e))
        })
        .await,
    )
}

fn over_quota(limit: u64) -> Reply {
    over_quota_replacing(limit, None)
}

/// `replaces`: the size of the file the upload was to replace, which counts until the upload is whole.
fn over_quota_replacing(limit: u64, replaces: Option<u64>) -> Reply {
    let replacing = match replaces {
        Some(size) if size > 0 => format!(
            " (the file it replaces, {size} bytes, counts until the upload is whole: remove it first to make room)"
        ),
        _ => String::new(),
    };
    json_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "over_quota",
        format!(
            "the upload is larger than what your storage quota has left ({limit} bytes){replacing}; remove files \
             with `fal-serverless files rm`, or ask the server's admin for a larger [storage] quota_mb"
        ),
    )
}

/// Writes a streamed body to `file`, stopping past `limit` bytes.
async fn receive(
    mut chunks: impl futures_util::Stream<Item = Result<bytes::Bytes, String>> + Unpin,
    file: std::fs::File,
    limit: u64,
    path: &RelPath,
    replaces: Option<u64>,
) -> Result<std::fs::File, Reply> {
    let mut file = file;
    let mut written: u64 = 0;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk
            .map_err(|e| json_error(StatusCode::BAD_REQUEST, "bad_upload", format!("the upload broke off: {e}")))?;
        let start = written;
        written += chunk.len() as u64;
        if written > limit {
            return Err(over_quota_replacing(limit, replaces));
        }
        // Each chunk written whole before the next is read (on a blocking thread): a write's error is this
        // chunk's, so one refused with EDQUOT can be written again from where it started.
        let (returned, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = write_chunk(&mut file, &chunk, start);
            (file, outcome)
        })
        .await
        .map_err(task_failed)?;
        file = returned;
        outcome.map_err(|e| io_error(path, e))?;
    }
    Ok(file)
}

/// A file to receive `path` in (its directories made; renamed over `path` once whole), and what the quota has left.
/// A replaced file counts against the quota until the new one is in place.
fn create(files: &Files, root: &UserRoot, path: &RelPath) -> Result<(PendingFile, std::fs::File, u64), Reply> {
    if path.is_root() {
        return Err(json_error(StatusCode::BAD_REQUEST, "bad_path", "name a file below /data"));
    }
    let left = files.left(root).map_err(|e| io_error(path, e))?;
    let (pending, file) =
        on_full_commit_and_retry(root, || root.create_pending(path)).map_err(|e| io_error(path, e))?;
    Ok((pending, file, left))
}

/// Writes `chunk` at `start`, the end of what `file` holds. Space freed just before (a function removed files) is
/// counted by btrfs's qgroup only once its transaction commits: refused with EDQUOT, the file system is committed
/// (syncfs) and the chunk written again from `start`, once.
fn write_chunk(file: &mut std::fs::File, chunk: &[u8], start: u64) -> std::io::Result<()> {
    use std::io::{Seek, Write};
    match file.write_all(chunk) {
        Err(e) if e.raw_os_error() == Some(libc::EDQUOT) => {
            file.set_len(start)?;
            file.seek(std::io::SeekFrom::Start(start))?;
            commit_file_system_of(file)?;
            file.write_all(chunk)
        }
        done => done,
    }
}

/// Runs `work`, and once more after committing the file system if it failed with EDQUOT (see
/// [`UserRoot::commit_file_system`]): space just freed is then counted.
fn on_full_commit_and_retry<T>(root: &UserRoot, mut work: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    match work() {
        Err(e) if e.raw_os_error() == Some(libc::EDQUOT) => {
            root.commit_file_system()?;
            work()
        }
        done => done,
    }
}

/// Receives a body into a new file, then puts it in place of `path`. The key was checked (`root`): only now is the
/// body read. Whatever stops it (over the quota, the body broken off, or this future dropped with the client gone)
/// drops the [`PendingFile`], which removes what was received, and `path` is as it was.
async fn store(
    files: &Files,
    root: Arc<UserRoot>,
    path: RelPath,
    body: impl futures_util::Stream<Item = Result<bytes::Bytes, String>> + Unpin,
) -> Reply {
    let (pending, file, left) = match on(files, root.clone(), path.clone(), create).await {
        Ok(created) => created,
        Err(response) => return response,
    };
    let file = match receive(body, file, left, &path, pending.replaces).await {
        Ok(file) => file,
        Err(response) => return response,
    };
    let committed = tokio::task::spawn_blocking(move || {
        let mut pending = pending;
        // Not fsynced first: on btrfs that writes it out at once, and space a function freed just before (which the
        // qgroup counts only at the next commit) would then refuse it with EDQUOT.
        drop(file);
        on_full_commit_and_retry(&root, || pending.commit())
    })
    .await;
    match committed {
        Ok(Ok(())) => Json(true).into_response(),
        Ok(Err(error)) => io_error(&path, error),
        Err(error) => task_failed(error),
    }
}

async fn put(State(files): State<Files>, Path(path): Path<String>, headers: HeaderMap, request: Request) -> Reply {
    let (rel, root) = match target(&files, &headers, &path).await {
        Ok(target) => target,
        Err(response) => return response,
    };
    let body = request.into_body().into_data_stream().map(|c| c.map_err(|e| e.to_string()));
    store(&files, root, rel, body).await
}

#[derive(Deserialize)]
struct UploadQuery {
    #[serde(default)]
    unzip: Option<String>,
}

/// An archive received into the server's own part of the storage: removed when dropped (the upload done, refused,
/// or its request dropped with the client gone).
struct Received(std::path::PathBuf);

impl Drop for Received {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn upload(
    State(files): State<Files>,
    Path(path): Path<String>,
    Query(query): Query<UploadQuery>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Reply {
    let unzipping = query.unzip.is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    // The key first: nothing of the body is read (not even the fields before `file_upload`) without one.
    let (rel, root) = match target(&files, &headers, &path).await {
        Ok((rel, _)) if rel.is_root() => {
            return json_error(StatusCode::BAD_REQUEST, "bad_path", "name a directory or file below /data")
        }
        Ok(target) => target,
        Err(response) => return response,
    };
    let mut multipart = match multipart {
        Ok(multipart) => multipart,
        Err(rejection) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "bad_upload",
                format!("send the file as multipart/form-data, field `file_upload`: {rejection}"),
            )
        }
    };
    let field = loop {
        match multipart.next_field().await {
            Ok(Some(field)) if field.name() == Some("file_upload") => break field,
            Ok(Some(_)) => continue,
            Ok(None) => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "bad_upload",
                    "the multipart body has no `file_upload` field",
                )
            }
            Err(error) => return json_error(StatusCode::BAD_REQUEST, "bad_upload", error.to_string()),
        }
    };
    let stream = field.map(|c| c.map_err(|e| e.to_string()));
    if !unzipping {
        return store(&files, root, rel, stream).await;
    }
    // The archive waits in the server's own part of the storage; what it unpacks to counts against the quota.
    let left = {
        let (files, root) = (files.clone(), root.clone());
        match tokio::task::spawn_blocking(move || files.left(&root)).await {
            Ok(Ok(left)) => left,
            Ok(Err(error)) => return io_error(&rel, error),
            Err(error) => return task_failed(error),
        }
    };
    let (upload_path, upload) = match files.storage.upload_file() {
        Ok(made) => made,
        Err(error) => {
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("cannot receive the upload: {error}"),
            )
        }
    };
    let received = Received(upload_path);
    let outcome = match receive(stream, upload, left.saturating_add(UPLOAD_SLACK), &rel, None).await {
        Ok(mut archive) => {
            let rel = rel.clone();
            tokio::task::spawn_blocking(move || {
                // Removed once unpacked, on this thread.
                let _received = received;
                archive.rewind().map_err(|e| io_error(&rel, e))?;
                unpack(&root, archive, &rel, left)
            })
            .await
            .map_err(task_failed)
            .and_then(|r| r)
        }
        Err(response) => Err(response),
    };
    match outcome {
        Ok(()) => Json(true).into_response(),
        Err(response) => response,
    }
}

/// Unpacks `archive` into a fresh directory beside `into`, then swaps it in whole: a failed upload leaves what was
/// there, and a finished one holds exactly the archive's files.
fn unpack(root: &UserRoot, archive: std::fs::File, into: &RelPath, left: u64) -> Result<(), Reply> {
    let staging = RelPath::parse(&format!(".fal/uploads/{:016x}", rand::random::<u64>())).map_err(bad_path)?;
    let unpacked = unzip(std::io::BufReader::new(archive), root, &staging, left);
    let result = unpacked.map_err(|error| match error {
        UnzipError::OverQuota { limit } => over_quota(limit),
        UnzipError::Write { .. } => json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", error.to_string()),
        other => json_error(StatusCode::BAD_REQUEST, "bad_archive", other.to_string()),
    });
    if let Err(response) = result {
        let _ = root.remove(&staging);
        return Err(response);
    }
    root.replace(&staging, into).map_err(|e| {
        let _ = root.remove(&staging);
        io_error(into, e)
    })?;
    Ok(())
}
