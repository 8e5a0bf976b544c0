//! The queue: fal's queue API in front of the gateway, so that `fal-client` (1.x, from PyPI) works against this
//! server unchanged (`FAL_QUEUE_RUN_HOST=<host:port>/queue`, `FAL_KEY=<key_id>:<key_secret>`).
//!
//! * `POST /queue/<user>/<alias or revision>[/path][?fal_webhook=URL]`: admitted as the gateway admits a request
//!   to the app (its auth mode and the caller's key), stored in SQLite (`store.rs`) and answered at once with
//!   `{"request_id", "status_url", "response_url", "cancel_url", "queue_position"}`, absolute URLs on the host the
//!   client called (`https` when the port serves TLS). What is kept of the request: its method, path, query (less
//!   `fal_webhook`), body (at most [`MAX_BODY`]) and the headers an app reads (content type and encoding, `accept*`
//!   but `accept-encoding`, `user-agent`, `x-*`), never `Authorization` or cookies.
//! * `GET .../requests/<id>/status[?logs=1]`: 202 `IN_QUEUE` (with `queue_position`, 0 for next) or `IN_PROGRESS`,
//!   200 `COMPLETED` (with `error` and `error_type` when it failed); `logs` is the request's log lines (what its
//!   replica printed while serving it) when asked for, else null. `.../status/stream` sends the same as
//!   server-sent events, one per change, until `COMPLETED`.
//! * `GET .../requests/<id>`: the app's answer as it came (status, content type, body); 400 while not done, 404 for
//!   an unknown (or expired) request. A request that got no answer (no replica, cancelled) answers its error.
//! * `GET .../requests/<id>/webhook` (ours, not fal's): the webhook's delivery: `pending`, `delivered` or
//!   `failed`, and each attempt (when, the receiver's status code or the error).
//! * `PUT .../requests/<id>/cancel`: 202 `CANCELLATION_REQUESTED` for a queued request (taken out of line) or a
//!   running one (its request to the replica is dropped: the replica sees its client go away); 400
//!   `ALREADY_COMPLETED` once done. A cancelled request is `COMPLETED` with `error_type` `cancelled`.
//!
//! Who may read a request: the path must name its app (its owner, and the alias or revision id it was submitted
//! under, or its revision's id); then, if it was submitted with a key, only a key of that key's user, of the app's
//! owner, or an admin's; a request submitted to a public app without a key is readable by whoever has its id (a
//! random UUID: the id is the capability, as fal's own public apps have it).
//!
//! Dispatching: each app revision has a line, in arrival order; its dispatcher hands the next request to the
//! revision's replica set (`apps::replicas`) as soon as one could be served (at most `max_concurrency` ×
//! `max_multiplexing` handed over at once), so the replica set's own first-come order and scaling apply, shared
//! with the gateway's direct requests. A request waits for a replica for as long as its `X-Fal-Request-Timeout`
//! says (counted from its submission), else [`QUEUE_WAIT`]. The answer's body is read (at most [`MAX_RESULT`]) and
//! stored with the request's logs; results are deleted `[apps] result_retention_hours` after they are done.
//!
//! Restarts: queued requests are in SQLite and are dispatched again, in their order. A request that was running
//! when the server stopped is put back in its place and run again, once: its client never got an answer and is
//! still polling, and a server's restart is not the app's failure (fal's own queue re-runs a request whose runner
//! went away). A request already run again that is caught running by a second stop is marked failed
//! (`server_restarted`) instead, so a request that takes the server down cannot do it forever. Apps whose requests
//! must not run twice should be idempotent, as behind any queue that retries.

pub mod store;
pub mod webhook;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::IntoResponse;
use axum::routing::any;
use axum::Router;
use bytes::Bytes;
use fal_engine::LogSource;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use tokio::sync::{Notify, Semaphore};
use tokio::task::AbortHandle;

use self::store::{now_ms, NewRequest, Outcome, QueueStore, State as RequestState, Stored};
use self::webhook::Webhooks;
use crate::apps::logs::{source_name, AppLogLine, RequestLogs};
use crate::apps::replicas::NoReplica;
use crate::gateway::{json_error, proxy, Gateway, REQUEST_TIMEOUT};
use crate::store::Scope;

pub use self::store::QueueStoreError;

/// The largest request body the queue stores.
pub const MAX_BODY: usize = 32 * 1024 * 1024;
/// The largest answer it keeps.
pub const MAX_RESULT: usize = 64 * 1024 * 1024;
/// How long a request with no `X-Fal-Request-Timeout` waits for a replica.
pub const QUEUE_WAIT: Duration = Duration::from_secs(24 * 3600);
/// How many times a request is sent to a replica at most (a restart while it runs sends it once more).
const MAX_RUNS: u32 = 2;
/// How often the status stream looks at its request.
const STREAM_POLL: Duration = Duration::from_millis(200);
/// How much of an error answer's body an `error` quotes.
const ERROR_QUOTE: usize = 500;

#[derive(Debug)]
pub struct Queue {
    gateway: Arc<Gateway>,
    store: Arc<QueueStore>,
    webhooks: Webhooks,
    /// Whether the port serves TLS: the scheme of the URLs the queue answers with.
    tls: bool,
    retention: Duration,
    lines: Mutex<Lines>,
    /// Set when the server stops: nothing more is handed over, and what ends now is not stored (see [`Queue::stop`]).
    stopping: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct Lines {
    /// Per revision: the requests not yet handed to its replicas, by arrival.
    by_revision: HashMap<String, Arc<Line>>,
    /// Requests handed to replicas (waiting for one, or running): their logs and their task.
    active: HashMap<String, Active>,
}

#[derive(Debug, Default)]
struct Line {
    waiting: Mutex<BTreeMap<i64, String>>,
    wake: Notify,
}

#[derive(Debug)]
struct Active {
    logs: Arc<RequestLogs>,
    task: Option<AbortHandle>,
}

impl Queue {
    /// The queue of `gateway`'s apps, with `store`; dispatches what a stopped server left (see the module's doc),
    /// resumes its webhooks and starts the sweep of old results.
    pub async fn start(gateway: Arc<Gateway>, store: Arc<QueueStore>, tls: bool) -> Arc<Self> {
        let config = gateway.apps.config;
        let queue = Arc::new(Self {
            webhooks: Webhooks::new(store.clone(), config.webhook_attempts, gateway.metrics.clone()),
            gateway,
            store,
            tls,
            retention: config.result_retention,
            lines: Mutex::default(),
            stopping: Default::default(),
        });
        match queue.store.blocking(|store| store.unfinished()).await {
            Ok(unfinished) => {
                for stored in unfinished {
                    queue.resume(stored).await;
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read the queued requests"),
        }
        queue.webhooks.resume().await;
        tokio::spawn(sweep(Arc::downgrade(&queue)));
        queue
    }

    /// The server stops: the requests handed to replicas are dropped where they are (still queued or running in
    /// SQLite, so the next start runs them), before the replicas stop, so that a replica killed by the stop is not
    /// taken for the request's failure.
    pub fn stop(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        let tasks: Vec<_> = self.lines().active.values_mut().filter_map(|active| active.task.take()).collect();
        for task in tasks {
            task.abort();
        }
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn lines(&self) -> MutexGuard<'_, Lines> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request a stopped server left: queued ones go back in line; running ones too, unless already run again.
    async fn resume(self: &Arc<Self>, stored: Stored) {
        let id = stored.request.id.clone();
        if stored.state == RequestState::Running {
            if stored.runs >= MAX_RUNS {
                let outcome = failure(
                    "server_restarted",
                    format!("the server stopped while this request ran, {MAX_RUNS} times; it is not run again"),
                );
                self.finish(&id, stored.request.webhook.as_deref(), outcome).await;
                return;
            }
            let requeued = id.clone();
            if let Err(error) = self.store.blocking(move |store| store.requeue(&requeued)).await {
                tracing::warn!(%error, request = %id, "cannot put a request back in line");
                return;
            }
            tracing::info!(request = %id, "the server stopped while this request ran: running it again");
        }
        self.enqueue(&stored.request.owner, &stored.request.revision, stored.seq, id);
    }

    /// Puts request `id` (number `seq`) in its revision's line, starting the line's dispatcher if it has none.
    fn enqueue(self: &Arc<Self>, owner: &str, revision: &str, seq: i64, id: String) {
        let line = {
            let mut lines = self.lines();
            match lines.by_revision.get(revision) {
                Some(line) => line.clone(),
                None => {
                    let line = Arc::new(Line::default());
                    lines.by_revision.insert(revision.to_string(), line.clone());
                    tokio::spawn(dispatch(self.clone(), owner.to_string(), revision.to_string(), line.clone()));
                    line
                }
            }
        };
        line.waiting.lock().unwrap_or_else(|e| e.into_inner()).insert(seq, id);
        line.wake.notify_one();
    }

    /// Stores `outcome` as how request `id` ended (unless it had already ended) and starts its webhook.
    /// Returns whether this was the outcome stored.
    async fn finish(&self, id: &str, webhook: Option<&str>, outcome: Outcome) -> bool {
        if self.is_stopping() {
            return false;
        }
        let payload = webhook.map(|url| (url.to_string(), webhook::payload(id, &outcome)));
        let (key, stored_payload) = (id.to_string(), payload.clone());
        let recorded = (outcome.error_type.clone(), outcome.error.clone(), outcome.logs.clone());
        let finished = self
            .store
            .blocking(move |store| {
                store.finish(&key, &outcome, stored_payload.as_ref().map(|(u, p)| (u.as_str(), p.as_slice())))
            })
            .await;
        self.lines().active.remove(id);
        match finished {
            Ok(true) => {
                self.record(id, recorded);
                if let Some((url, payload)) = payload {
                    self.webhooks.spawn(store::Delivery {
                        request_id: id.to_string(),
                        url,
                        payload,
                        attempts: 0,
                        next_ms: now_ms(),
                    });
                }
                true
            }
            Ok(false) => false,
            Err(error) => {
                tracing::warn!(%error, request = %id, "cannot store a request's outcome");
                false
            }
        }
    }

    /// Records request `id`, just ended with `(error kind, error, logs)`, in the run history (off this path).
    fn record(&self, id: &str, (kind, error, logs): (Option<String>, Option<String>, String)) {
        let (store, apps, runs, key) =
            (self.store.clone(), self.gateway.apps.clone(), self.gateway.runs.clone(), id.to_string());
        tokio::spawn(async move {
            let Ok(Some(stored)) = store.blocking(move |store| store.get(&key)).await else { return };
            let request = &stored.request;
            let revision = apps.resolve(&request.owner, &request.revision).await.ok();
            let outcome = match (kind, error) {
                (None, _) => crate::runs::Outcome::Success,
                (Some(kind), error) if kind == "cancelled" => {
                    crate::runs::Outcome::cancelled(kind, error.unwrap_or_default())
                }
                (Some(kind), error) => crate::runs::Outcome::error(kind, error.unwrap_or_default()),
            };
            let capture = crate::runs::LogCapture::new(runs.config.log_limit);
            capture.push_values(serde_json::from_str(&logs).unwrap_or_default());
            let (logs, logs_truncated) = capture.json();
            runs.ended(crate::runs::Ended {
                run: crate::runs::NewRun {
                    id: request.id.clone(),
                    user_id: request.owner.clone(),
                    kind: "queue",
                    function: revision.as_ref().map(|r| r.function_name.clone()).unwrap_or_default(),
                    app: request.app.clone(),
                    revision: request.revision.clone(),
                    machine_type: revision.map(|r| r.machine_type).unwrap_or_default(),
                    queued_ms: stored.submitted_ms,
                    ..Default::default()
                },
                started_ms: stored.started_ms,
                finished_ms: stored.finished_ms.unwrap_or_else(crate::runs::now_ms),
                worker: String::new(),
                outcome,
                logs,
                logs_truncated,
            });
        });
    }

    /// Runs one request handed to the replicas: waits for its replica, sends it, stores the answer.
    async fn run(
        self: Arc<Self>,
        id: String,
        acquiring: impl std::future::Future<Output = Result<crate::apps::replicas::Lease, NoReplica>>,
    ) {
        let key = id.clone();
        let stored = match self.store.blocking(move |store| store.get(&key)).await {
            Ok(Some(stored)) if stored.state == RequestState::Queued => stored,
            Ok(_) => return self.forget(&id),
            Err(error) => {
                tracing::warn!(%error, request = %id, "cannot read a queued request");
                return self.forget(&id);
            }
        };
        let webhook = stored.request.webhook.clone();
        let lease = match acquiring.await {
            Ok(lease) => lease,
            Err(error) => {
                let kind = match error {
                    NoReplica::Timeout { .. } => "no_replica",
                    NoReplica::StartFailed(_) => "replica_failed",
                    NoReplica::Closed => "app_deleted",
                };
                self.finish(&id, webhook.as_deref(), failure(kind, error.to_string())).await;
                return;
            }
        };
        let key = id.clone();
        match self.store.blocking(move |store| store.start(&key)).await {
            Ok(true) => {}
            Ok(false) => return self.forget(&id),
            Err(error) => {
                tracing::warn!(%error, request = %id, "cannot mark a request as running");
                return self.forget(&id);
            }
        }
        let request = stored.request;
        let mut builder = http::Request::builder().method(request.method.as_str()).uri("/");
        for (name, value) in &request.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let outbound = match builder.body(Body::from(request.body)) {
            Ok(outbound) => outbound,
            Err(e) => {
                let outcome = failure("bad_request", format!("the stored request cannot be sent: {e}"));
                self.finish(&id, webhook.as_deref(), outcome).await;
                return;
            }
        };
        let target =
            if request.query.is_empty() { request.path.clone() } else { format!("{}?{}", request.path, request.query) };
        let logs = lease.logs.clone();
        let response = proxy::forward(&self.gateway.client, lease, outbound, &target).await;
        let (parts, body) = response.into_parts();
        let mut outcome = match axum::body::to_bytes(body, MAX_RESULT).await {
            Ok(body) => answered(parts.status, parts.headers.get(header::CONTENT_TYPE), body),
            Err(error) if is_length_limit(&error) => failure(
                "response_too_large",
                format!("the app's answer is over {} MiB, more than the queue keeps", MAX_RESULT >> 20),
            ),
            Err(error) => failure("replica_failed", format!("the app's answer was cut off: {error}")),
        };
        outcome.logs = logs_json(&logs.lines());
        self.finish(&id, webhook.as_deref(), outcome).await;
    }

    fn forget(&self, id: &str) {
        self.lines().active.remove(id);
    }

    /// The request's logs while it is handed to replicas.
    fn live_logs(&self, id: &str) -> Option<Vec<AppLogLine>> {
        self.lines().active.get(id).map(|active| active.logs.lines())
    }

    /// The status of `stored` as fal's queue answers it, with its HTTP status (202 until done, then 200).
    async fn status(
        &self,
        stored: &Stored,
        with_logs: bool,
        base: &str,
    ) -> Result<(StatusCode, serde_json::Value), QueueStoreError> {
        let position = match stored.state {
            RequestState::Queued => {
                let (revision, seq) = (stored.request.revision.clone(), stored.seq);
                Some(self.store.blocking(move |store| store.position(&revision, seq)).await?)
            }
            _ => None,
        };
        let live = (with_logs && stored.state == RequestState::Running).then(|| self.live_logs(&stored.request.id));
        Ok(status_body(stored, position, live.flatten(), with_logs, base))
    }
}

/// A status as fal's queue answers it: `position` is a queued request's place, `live` a running one's logs so far.
fn status_body(
    stored: &Stored,
    position: Option<u64>,
    live: Option<Vec<AppLogLine>>,
    with_logs: bool,
    base: &str,
) -> (StatusCode, serde_json::Value) {
    let mut body = serde_json::json!({
        "request_id": stored.request.id,
        "response_url": base,
        "status_url": format!("{base}/status"),
        "cancel_url": format!("{base}/cancel"),
    });
    match stored.state {
        RequestState::Queued => {
            body["status"] = "IN_QUEUE".into();
            body["queue_position"] = position.unwrap_or(0).into();
            (StatusCode::ACCEPTED, body)
        }
        RequestState::Running => {
            body["status"] = "IN_PROGRESS".into();
            body["logs"] = if with_logs { logs_value(&live.unwrap_or_default()) } else { serde_json::Value::Null };
            (StatusCode::ACCEPTED, body)
        }
        RequestState::Done => {
            body["status"] = "COMPLETED".into();
            body["logs"] = if with_logs {
                serde_json::from_str(&stored.outcome.logs).unwrap_or_else(|_| serde_json::json!([]))
            } else {
                serde_json::Value::Null
            };
            body["metrics"] = match (stored.started_ms, stored.finished_ms) {
                (Some(start), Some(end)) => serde_json::json!({ "inference_time": (end - start) as f64 / 1000.0 }),
                _ => serde_json::json!({}),
            };
            if let Some(error) = &stored.outcome.error {
                body["error"] = error.clone().into();
                body["error_type"] = stored.outcome.error_type.clone().into();
            }
            (StatusCode::OK, body)
        }
    }
}

/// One revision's dispatcher: hands its line's requests to its replicas in order, as many at once as it can serve.
async fn dispatch(queue: Arc<Queue>, owner: String, revision_id: String, line: Arc<Line>) {
    let revision = match queue.gateway.apps.resolve(&owner, &revision_id).await {
        Ok(revision) => Some(revision),
        Err(crate::apps::AppError::NotFound { .. }) => None,
        Err(error) => {
            tracing::warn!(%error, revision = %revision_id, "cannot read an app's revision; its queue waits");
            None
        }
    };
    let Some(revision) = revision else {
        // The app was deleted: its queued requests fail, and its line goes (none can be added: submits resolve it).
        queue.lines().by_revision.remove(&revision_id);
        let waiting = std::mem::take(&mut *line.waiting.lock().unwrap_or_else(|e| e.into_inner()));
        for id in waiting.into_values() {
            let key = id.clone();
            let webhook =
                queue.store.blocking(move |s| s.get(&key)).await.ok().flatten().and_then(|s| s.request.webhook);
            let outcome = failure("app_deleted", "the app was deleted before this request ran".into());
            queue.finish(&id, webhook.as_deref(), outcome).await;
        }
        return;
    };
    let room = (revision.max_concurrency.max(1) as usize).saturating_mul(revision.max_multiplexing.max(1) as usize);
    let room = Arc::new(Semaphore::new(room));
    loop {
        let Ok(permit) = room.clone().acquire_owned().await else { return };
        if queue.is_stopping() {
            return;
        }
        let (_seq, id) = loop {
            let next = line.waiting.lock().unwrap_or_else(|e| e.into_inner()).pop_first();
            match next {
                Some(next) => break next,
                None => line.wake.notified().await,
            }
        };
        let key = id.clone();
        let stored = queue.store.blocking(move |s| s.get(&key)).await.ok().flatten();
        let deadline = stored.as_ref().and_then(|s| s.request.deadline_ms);
        // Looked up again for each request (the lookup is cached): an app deleted while requests wait must not get
        // replicas started for them.
        if let Err(crate::apps::AppError::NotFound { .. }) = queue.gateway.apps.resolve(&owner, &revision_id).await {
            let webhook = stored.and_then(|s| s.request.webhook);
            let outcome = failure("app_deleted", "the app was deleted before this request ran".into());
            queue.finish(&id, webhook.as_deref(), outcome).await;
            continue;
        }
        let wait = match deadline {
            Some(deadline) => Duration::from_millis((deadline - now_ms()).max(0) as u64),
            None => QUEUE_WAIT,
        };
        let logs = RequestLogs::new();
        // The request takes its place in the replica set's line now, before the next one is handed over.
        let acquiring = queue.gateway.apps.replicas(&revision).acquire(id.clone(), logs.clone(), wait);
        queue.lines().active.insert(id.clone(), Active { logs: logs.clone(), task: None });
        let running = queue.clone();
        let task_id = id.clone();
        let task = tokio::spawn(async move {
            let _permit = permit;
            running.run(task_id, acquiring).await;
        });
        if let Some(active) = queue.lines().active.get_mut(&id) {
            active.task = Some(task.abort_handle());
        }
    }
}

/// Deletes results past their retention, now and then.
async fn sweep(queue: std::sync::Weak<Queue>) {
    loop {
        let every = match queue.upgrade() {
            Some(queue) => {
                let before = now_ms() - queue.retention.as_millis() as i64;
                match queue.store.blocking(move |store| store.sweep(before)).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(requests = n, "expired queue results deleted"),
                    Err(error) => tracing::warn!(%error, "cannot delete expired queue results"),
                }
                (queue.retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
            }
            None => return,
        };
        tokio::time::sleep(every).await;
    }
}

/// The outcome of a request that got no answer from the app.
fn failure(kind: &str, error: String) -> Outcome {
    Outcome { error: Some(error), error_type: Some(kind.into()), logs: "[]".into(), ..Outcome::default() }
}

/// The outcome of an answer: failed when its status is an error, saying why in `error` (the answer's `detail`
/// when it is fal-style JSON, else the start of its body).
fn answered(status: StatusCode, content_type: Option<&HeaderValue>, body: Bytes) -> Outcome {
    let error = (status.is_client_error() || status.is_server_error()).then(|| {
        let detail = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("detail").map(|d| d.as_str().map(str::to_string).unwrap_or_else(|| d.to_string())))
            .unwrap_or_else(|| {
                let text = String::from_utf8_lossy(&body);
                text.chars().take(ERROR_QUOTE).collect()
            });
        if detail.is_empty() {
            format!("the app answered {status}")
        } else {
            format!("the app answered {status}: {detail}")
        }
    });
    Outcome {
        status_code: Some(status.as_u16()),
        content_type: content_type.and_then(|v| v.to_str().ok()).map(str::to_string),
        body: body.to_vec(),
        error_type: error
            .as_ref()
            .map(|_| if status == StatusCode::BAD_GATEWAY { "replica_failed" } else { "app_error" }.into()),
        error,
        logs: "[]".into(),
    }
}

fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if cause.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// A log line as fal's queue shows it.
fn log_value(line: &AppLogLine) -> serde_json::Value {
    let level = match line.source {
        LogSource::Stdout => "STDOUT",
        LogSource::Stderr => "STDERR",
        LogSource::Build | LogSource::Engine => "INFO",
    };
    serde_json::json!({
        "message": line.line,
        "level": level,
        "source": source_name(line.source),
        "timestamp": timestamp(line.time),
    })
}

fn logs_value(lines: &[AppLogLine]) -> serde_json::Value {
    serde_json::Value::Array(lines.iter().map(log_value).collect())
}

fn logs_json(lines: &[AppLogLine]) -> String {
    logs_value(lines).to_string()
}

/// RFC 3339 in UTC, to the microsecond (`2026-12-02T04:30:00.123456Z`).
fn timestamp(time: SystemTime) -> String {
    let nanos = time.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0);
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            t.year(),
            t.month() as u8,
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.microsecond()
        ),
        Err(_) => "1970-01-01T00:00:00.000000Z".into(),
    }
}

/// The headers of a submitted request that are kept for the app.
fn kept_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    let keep = |name: &HeaderName| {
        let name = name.as_str();
        matches!(name, "content-type" | "content-encoding" | "accept" | "accept-language" | "user-agent")
            || (name.starts_with("x-") && name != REQUEST_TIMEOUT && name != proxy::REQUEST_ID)
    };
    headers
        .iter()
        .filter(|(name, _)| keep(name))
        .filter_map(|(name, value)| Some((name.as_str().to_string(), value.to_str().ok()?.to_string())))
        .collect()
}

/// The query less `fal_webhook`, and the webhook's URL.
fn split_webhook(query: Option<&str>) -> (String, Option<String>) {
    let Some(query) = query else { return (String::new(), None) };
    let mut webhook = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name == "fal_webhook" {
            webhook = Some(percent_decode(value));
        } else {
            kept.push(pair);
        }
    }
    (kept.join("&"), webhook)
}

/// `application/x-www-form-urlencoded` decoding of one value.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `?logs=` asks for logs (`1` or `true`, as fal-client sends it).
fn wants_logs(query: Option<&str>) -> bool {
    query.unwrap_or_default().split('&').any(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, "1"));
        name == "logs" && matches!(value.to_ascii_lowercase().as_str(), "1" | "true" | "yes")
    })
}

/// `scheme://host` as the client called it.
fn origin(tls: bool, request: &Request) -> String {
    let host = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
        .unwrap_or_else(|| "localhost".into());
    format!("{}://{host}", if tls { "https" } else { "http" })
}

/// The queue's routes.
pub fn routes(queue: Arc<Queue>) -> Router {
    Router::new()
        .route("/queue/{user}/{app}", any(root))
        .route("/queue/{user}/{app}/", any(root))
        .route("/queue/{user}/{app}/{*rest}", any(rest))
        .route_layer(axum::middleware::map_response(crate::gateway::sandboxed))
        .with_state(queue)
}

async fn root(
    State(queue): State<Arc<Queue>>,
    Path((user, app)): Path<(String, String)>,
    request: Request,
) -> Response<Body> {
    if request.method() != Method::POST {
        return method_not_allowed(request.method(), "POST to submit a request");
    }
    submit(queue, user, app, String::new(), request).await
}

async fn rest(
    State(queue): State<Arc<Queue>>,
    Path((user, app, rest)): Path<(String, String, String)>,
    request: Request,
) -> Response<Body> {
    let method = request.method().clone();
    let segments: Vec<&str> = rest.split('/').collect();
    if method == Method::POST {
        return submit(queue, user, app, rest, request).await;
    }
    let (id, action) = match segments.as_slice() {
        ["requests", id] => (*id, ""),
        ["requests", id, "status"] => (*id, "status"),
        ["requests", id, "status", "stream"] => (*id, "stream"),
        ["requests", id, "cancel"] => (*id, "cancel"),
        ["requests", id, "webhook"] => (*id, "webhook"),
        _ => {
            return json_error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "nothing is served at {}: POST to /queue/{user}/{app}[/path] submits; a request is at \
                     /queue/{user}/{app}/requests/<id>[/status|/status/stream|/cancel]",
                    request.uri().path()
                ),
            )
        }
    };
    let expected = if action == "cancel" { Method::PUT } else { Method::GET };
    if method != expected {
        return method_not_allowed(&method, if action == "cancel" { "PUT to cancel" } else { "GET" });
    }
    let id = id.to_string();
    let base = format!("{}/queue/{user}/{app}/requests/{id}", origin(queue.tls, &request));
    let with_logs = wants_logs(request.uri().query());
    // The request's body is not Sync, so only what is read of it is held across awaits.
    let headers = request.headers().clone();
    drop(request);
    let stored = match readable(&queue, &headers, &user, &app, &id).await {
        Ok(stored) => stored,
        Err(response) => return response,
    };
    match action {
        "status" => match queue.status(&stored, with_logs, &base).await {
            Ok((status, body)) => (status, axum::Json(body)).into_response(),
            Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        },
        "stream" => status_stream(queue, id, with_logs, base),
        "cancel" => cancel(queue, stored).await,
        "webhook" => webhook_attempts(queue, id).await,
        _ => result(stored),
    }
}

fn method_not_allowed(method: &Method, allowed: &str) -> Response<Body> {
    json_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("{method} is not served here: {allowed}"))
}

/// The stored request `id`, if the caller may read it at this path (see the module's doc).
async fn readable(
    queue: &Arc<Queue>,
    headers: &HeaderMap,
    user: &str,
    app: &str,
    id: &str,
) -> Result<Stored, Response<Body>> {
    let unknown = || {
        json_error(
            StatusCode::NOT_FOUND,
            "unknown_request",
            format!(
                "app {user}/{app} has no request {id:?} (results are kept {} hours after they are done)",
                queue.retention.as_secs_f64() / 3600.0
            ),
        )
    };
    let key = id.to_string();
    let stored = match queue.store.blocking(move |store| store.get(&key)).await {
        Ok(Some(stored)) => stored,
        Ok(None) => return Err(unknown()),
        Err(e) => return Err(json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())),
    };
    let this_app = stored.request.owner == user && (stored.request.app == app || stored.request.revision == app);
    if !this_app {
        return Err(unknown());
    }
    let Some(submitter) = &stored.request.submitter else { return Ok(stored) };
    let caller = queue.gateway.caller(headers)?;
    match caller {
        None => Err(json_error(
            StatusCode::UNAUTHORIZED,
            "missing_key",
            format!(
                "request {id} was submitted with a key: send `Authorization: Key <key_id>:<key_secret>` of its user"
            ),
        )),
        Some(caller)
            if &caller.user_id == submitter
                || caller.user_id == stored.request.owner
                || caller.scope == Scope::Admin =>
        {
            Ok(stored)
        }
        Some(caller) => Err(json_error(
            StatusCode::FORBIDDEN,
            "wrong_key",
            format!(
                "request {id} is user {submitter:?}'s; key {} is user {:?}'s. Use a key of the user who submitted it",
                caller.key_id, caller.user_id
            ),
        )),
    }
}

/// `POST /queue/<user>/<app>[/path]`.
async fn submit(queue: Arc<Queue>, user: String, app: String, path: String, request: Request) -> Response<Body> {
    let revision = match queue.gateway.admit(request.headers(), &user, &app).await {
        Ok(revision) => revision,
        Err(response) => return response,
    };
    // A public app takes requests without a key; a wrong one there is as good as none.
    let submitter = queue.gateway.caller(request.headers()).ok().flatten().map(|caller| caller.user_id);
    let (query, webhook) = split_webhook(request.uri().query());
    if let Some(url) = &webhook {
        if let Err(detail) = webhook::validate(url) {
            return json_error(StatusCode::BAD_REQUEST, "bad_webhook", detail);
        }
    }
    let too_large = || {
        json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!(
                "the queue stores request bodies of at most {} MiB; send large inputs as URLs the app downloads",
                MAX_BODY >> 20
            ),
        )
    };
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY as u64) {
        return too_large();
    }
    let deadline_ms = request
        .headers()
        .get(REQUEST_TIMEOUT)
        .and_then(|v| v.to_str().ok()?.trim().parse::<f64>().ok())
        .filter(|seconds| seconds.is_finite() && *seconds > 0.0)
        .map(|seconds| now_ms() + (seconds.min(QUEUE_WAIT.as_secs_f64()) * 1000.0) as i64);
    let base = origin(queue.tls, &request);
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(body) => body,
        Err(error) if is_length_limit(&error) => return too_large(),
        Err(error) => {
            return json_error(StatusCode::BAD_REQUEST, "bad_body", format!("the request's body was cut off: {error}"))
        }
    };
    let new = NewRequest {
        id: uuid::Uuid::new_v4().to_string(),
        owner: user.clone(),
        app: app.clone(),
        revision: revision.id.clone(),
        submitter,
        method: parts.method.as_str().to_string(),
        path: format!("/{path}"),
        query,
        headers: kept_headers(&parts.headers),
        body: body.to_vec(),
        webhook,
        deadline_ms,
    };
    let stored = new.clone();
    let (position, seq) = match queue.store.blocking(move |store| store.insert(&stored)).await {
        Ok(placed) => placed,
        Err(e) => return json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    };
    let id = new.id;
    tracing::debug!(request = %id, app = %format!("{user}/{app}"), position, "queued");
    queue.enqueue(&user, &revision.id, seq, id.clone());
    let url = format!("{base}/queue/{user}/{app}/requests/{id}");
    let mut response = axum::Json(serde_json::json!({
        "request_id": id,
        "response_url": url,
        "status_url": format!("{url}/status"),
        "cancel_url": format!("{url}/cancel"),
        "queue_position": position,
    }))
    .into_response();
    if let Ok(value) = HeaderValue::try_from(id.as_str()) {
        response.headers_mut().insert(proxy::REQUEST_ID, value);
    }
    response
}

/// `GET .../requests/<id>`: the app's answer as stored.
fn result(stored: Stored) -> Response<Body> {
    let id = &stored.request.id;
    match stored.state {
        RequestState::Queued | RequestState::Running => {
            let state = if stored.state == RequestState::Queued { "in the queue" } else { "in progress" };
            return json_error(
                StatusCode::BAD_REQUEST,
                "not_done",
                format!("request {id} is still {state}: its status URL says when it is done"),
            );
        }
        RequestState::Done => {}
    }
    let outcome = stored.outcome;
    let Some(code) = outcome.status_code else {
        let kind = outcome.error_type.unwrap_or_else(|| "failed".into());
        let status = match kind.as_str() {
            "cancelled" => StatusCode::BAD_REQUEST,
            "no_replica" => StatusCode::GATEWAY_TIMEOUT,
            "replica_failed" => StatusCode::BAD_GATEWAY,
            "app_deleted" => StatusCode::GONE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let detail = outcome.error.unwrap_or_else(|| "the request failed".into());
        return json_error(status, &kind, detail);
    };
    let mut response = Response::new(Body::from(outcome.body));
    *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
    if let Some(value) = outcome.content_type.and_then(|t| HeaderValue::try_from(t).ok()) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    if let Ok(value) = HeaderValue::try_from(id.as_str()) {
        response.headers_mut().insert(proxy::REQUEST_ID, value);
    }
    response
}

/// `GET .../requests/<id>/webhook` (ours): the request's webhook delivery, each attempt with its outcome.
async fn webhook_attempts(queue: Arc<Queue>, id: String) -> Response<Body> {
    let key = id.clone();
    match queue.store.blocking(move |store| store.webhook(&key)).await {
        Ok(Some((state, attempts))) => {
            let attempts: Vec<_> = attempts
                .iter()
                .map(|a| {
                    serde_json::json!({
                        "attempt": a.attempt,
                        "timestamp": timestamp(UNIX_EPOCH + Duration::from_millis(a.at_ms.max(0) as u64)),
                        "status_code": a.status_code,
                        "error": a.error,
                    })
                })
                .collect();
            axum::Json(serde_json::json!({ "request_id": id, "state": state, "attempts": attempts })).into_response()
        }
        Ok(None) => json_error(
            StatusCode::NOT_FOUND,
            "no_webhook",
            format!("request {id} has no webhook delivery (none was asked for, or it is not done yet)"),
        ),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// `PUT .../requests/<id>/cancel`.
async fn cancel(queue: Arc<Queue>, stored: Stored) -> Response<Body> {
    let id = stored.request.id.clone();
    let already = || {
        let body = serde_json::json!({
            "status": "ALREADY_COMPLETED",
            "error": "already_completed",
            "detail": format!("request {id} is already done: there is nothing to cancel"),
        });
        (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
    };
    if stored.state == RequestState::Done {
        return already();
    }
    // Taken out of its line first, so that no dispatcher hands it over while it is cancelled.
    if let Some(line) = queue.lines().by_revision.get(&stored.request.revision) {
        line.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&stored.seq);
    }
    let task = queue.lines().active.get_mut(&id).and_then(|active| active.task.take());
    let outcome = failure("cancelled", "the request was cancelled".into());
    let logs = queue.live_logs(&id);
    let outcome = Outcome { logs: logs.map(|l| logs_json(&l)).unwrap_or_else(|| "[]".into()), ..outcome };
    if !queue.finish(&id, stored.request.webhook.as_deref(), outcome).await {
        return already();
    }
    // Its task ends: a request waiting for a replica leaves the replica set's line, and a running one drops its
    // connection to the replica, which gives the replica back.
    if let Some(task) = task {
        task.abort();
    }
    tracing::debug!(request = %id, "cancelled");
    (StatusCode::ACCEPTED, axum::Json(serde_json::json!({ "status": "CANCELLATION_REQUESTED" }))).into_response()
}

/// `GET .../requests/<id>/status/stream`: each new status as a server-sent event, until `COMPLETED`.
fn status_stream(queue: Arc<Queue>, id: String, with_logs: bool, base: String) -> Response<Body> {
    struct Streaming {
        queue: Arc<Queue>,
        id: String,
        last: Option<String>,
        done: bool,
    }
    let start = Streaming { queue, id, last: None, done: false };
    let events = futures_util::stream::unfold(start, move |mut at| {
        let base = base.clone();
        async move {
            loop {
                if at.done {
                    return None;
                }
                let key = at.id.clone();
                let stored = match at.queue.store.blocking(move |store| store.get(&key)).await {
                    Ok(Some(stored)) => stored,
                    Ok(None) | Err(_) => return None,
                };
                let (_, body) = match at.queue.status(&stored, with_logs, &base).await {
                    Ok(status) => status,
                    Err(_) => return None,
                };
                at.done = stored.state == RequestState::Done;
                let text = body.to_string();
                if at.last.as_deref() != Some(text.as_str()) {
                    at.last = Some(text.clone());
                    let event = Bytes::from(format!("data: {text}\n\n"));
                    return Some((Ok::<_, std::convert::Infallible>(event), at));
                }
                tokio::time::sleep(STREAM_POLL).await;
            }
        }
    });
    let mut response = Response::new(Body::from_stream(events));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(state: RequestState, outcome: Outcome) -> Stored {
        Stored {
            seq: 1,
            request: NewRequest {
                id: "r1".into(),
                owner: "alice".into(),
                app: "app".into(),
                revision: "rev".into(),
                submitter: None,
                method: "POST".into(),
                path: "/".into(),
                query: String::new(),
                headers: Vec::new(),
                body: Vec::new(),
                webhook: None,
                deadline_ms: None,
            },
            state,
            runs: 1,
            submitted_ms: 0,
            started_ms: Some(1000),
            finished_ms: Some(3500),
            outcome,
        }
    }

    #[test]
    fn the_webhook_leaves_the_query_and_logs_is_read_as_fal_client_sends_it() {
        let (query, webhook) = split_webhook(Some("a=1&fal_webhook=http%3A%2F%2F127.0.0.1%3A9%2Fhook%3Fx%3D1&b=2"));
        assert_eq!((query.as_str(), webhook.as_deref()), ("a=1&b=2", Some("http://127.0.0.1:9/hook?x=1")));
        assert_eq!(split_webhook(None), (String::new(), None));
        assert!(wants_logs(Some("logs=true")) && wants_logs(Some("x=1&logs=1")));
        assert!(!wants_logs(Some("logs=false")) && !wants_logs(Some("logs=0")) && !wants_logs(None));
        assert_eq!(percent_decode("a%2"), "a%2", "a cut escape stays as it is");
    }

    #[test]
    fn only_the_headers_an_app_reads_are_kept() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("content-type", "application/json"),
            ("authorization", "Key a:b"),
            ("cookie", "c=1"),
            ("x-custom", "1"),
            ("x-fal-request-timeout", "10"),
            ("accept-encoding", "gzip"),
        ] {
            headers.insert(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        let kept = kept_headers(&headers);
        let names: Vec<_> = kept.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-type", "x-custom"]);
    }

    #[test]
    fn an_error_answer_says_the_apps_detail() {
        let json = HeaderValue::from_static("application/json");
        let ok = answered(StatusCode::OK, Some(&json), Bytes::from_static(b"{\"y\":1}"));
        assert_eq!((ok.error, ok.status_code, ok.content_type.as_deref()), (None, Some(200), Some("application/json")));
        let failed =
            answered(StatusCode::UNPROCESSABLE_ENTITY, Some(&json), Bytes::from_static(b"{\"detail\":\"bad x\"}"));
        assert_eq!(failed.error.as_deref(), Some("the app answered 422 Unprocessable Entity: bad x"));
        assert_eq!(failed.error_type.as_deref(), Some("app_error"));
        let text = answered(StatusCode::INTERNAL_SERVER_ERROR, None, Bytes::from_static(b"Internal Server Error"));
        assert_eq!(text.error.as_deref(), Some("the app answered 500 Internal Server Error: Internal Server Error"));
    }

    #[test]
    fn a_result_is_the_apps_answer_or_its_error() {
        let done = stored(
            RequestState::Done,
            Outcome {
                status_code: Some(201),
                content_type: Some("text/plain".into()),
                body: b"hi".to_vec(),
                ..Outcome::default()
            },
        );
        let response = result(done);
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/plain");
        assert_eq!(response.headers()[proxy::REQUEST_ID], "r1");
        assert_eq!(result(stored(RequestState::Running, Outcome::default())).status(), StatusCode::BAD_REQUEST);
        let cancelled = stored(RequestState::Done, failure("cancelled", "the request was cancelled".into()));
        assert_eq!(result(cancelled).status(), StatusCode::BAD_REQUEST);
        let timed_out = stored(RequestState::Done, failure("no_replica", "none".into()));
        assert_eq!(result(timed_out).status(), StatusCode::GATEWAY_TIMEOUT);
    }

    #[test]
    fn statuses_have_the_shapes_fal_client_reads() {
        let base = "https://h/queue/alice/app/requests/r1";
        let (code, body) = status_body(&stored(RequestState::Queued, Outcome::default()), Some(3), None, true, base);
        assert_eq!(
            (code, &body["status"], &body["queue_position"]),
            (StatusCode::ACCEPTED, &"IN_QUEUE".into(), &3.into())
        );
        assert_eq!(body["status_url"], format!("{base}/status"));
        let line =
            AppLogLine { time: UNIX_EPOCH, source: LogSource::Stdout, line: "hi".into(), request_id: "r1".into() };
        let running = stored(RequestState::Running, Outcome::default());
        let (code, body) = status_body(&running, None, Some(vec![line]), true, base);
        assert_eq!(
            (code, &body["status"], &body["logs"][0]["message"]),
            (StatusCode::ACCEPTED, &"IN_PROGRESS".into(), &"hi".into())
        );
        let (_, body) = status_body(&running, None, None, false, base);
        assert!(body["logs"].is_null(), "logs are null unless asked for, and the key is there: fal-client reads it");
        let done =
            stored(RequestState::Done, Outcome { status_code: Some(200), logs: "[]".into(), ..Outcome::default() });
        let (code, body) = status_body(&done, None, None, true, base);
        assert_eq!(
            (code, &body["status"], &body["logs"]),
            (StatusCode::OK, &"COMPLETED".into(), &serde_json::json!([]))
        );
        assert_eq!(body["metrics"]["inference_time"], 2.5);
        assert!(body.get("error").is_none());
        let failed = stored(RequestState::Done, failure("cancelled", "the request was cancelled".into()));
        let (_, body) = status_body(&failed, None, None, false, base);
        assert_eq!((&body["error"], &body["error_type"]), (&"the request was cancelled".into(), &"cancelled".into()));
    }

    #[test]
    fn log_lines_are_fals_log_objects() {
        let line = AppLogLine {
            time: UNIX_EPOCH + Duration::from_micros(1_764_649_800_123_456),
            source: LogSource::Stderr,
            line: "warn".into(),
            request_id: "r1".into(),
        };
        assert_eq!(
            log_value(&line),
            serde_json::json!({"message": "warn", "level": "STDERR", "source": "stderr",
                "timestamp": "2025-12-02T04:30:00.123456Z"})
        );
    }
}
