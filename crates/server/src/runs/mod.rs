//! Run history: every call (`Run`), web request (the gateway), queued request (the queue) and schedule activation
//! is a run, recorded with its user, what ran, its machine type, its queued/started/finished times, its outcome, its
//! worker and its logs (capped per run at `[runs] log_limit_kb`, marked when cut), kept `[runs] retention_days`.
//!
//! Recording never waits for SQLite on the path of a call: each run sends its start and its end over a bounded
//! channel ([`QUEUE`] events, [`QUEUE_BYTES`] of their logs) to one writer task, which lets events gather for
//! [`GATHER`] and writes them in one transaction. When the channel is full (the disk fell that far behind), the
//! event is dropped and counted, and the writer says how many it lost in the server's log: a run may then be
//! missing, or stay "running" in the history until the next start, which
//! marks such runs as ended by the server's stop. The writer also prunes old runs every `prune_interval`.

pub mod rpc;
pub mod store;
pub mod web;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fal_engine::{CallWorker, LogSource};
use fal_proto::controller::RunInfo;
use fal_proto::Log;
use tokio::sync::{broadcast, mpsc, Notify};

use crate::metrics::Metrics;

pub use self::store::{RunRow, RunStore};

/// Events the channel to the writer holds; past it, events are dropped (see the module's doc).
pub const QUEUE: usize = 16_384;
/// Bytes of logs (and a little for each event) the channel holds at most: events are bounded by size too, since
/// each ended run carries up to `[runs] log_limit_kb` of logs.
pub const QUEUE_BYTES: usize = 64 << 20;
/// What an event is counted as beyond its logs.
const EVENT_BYTES: usize = 512;
/// How long the writer lets events gather after the first one before it writes them: one transaction for the
/// calls of that time, not one per event (each a commit, which under a steady stream of calls cost the 2-core
/// machine of bench/RESULTS.md more than the calls' own path).
const GATHER: Duration = Duration::from_millis(20);
/// Events the writer takes into one transaction at most.
const BATCH: usize = 1024;

/// `[runs]` in the server's config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunsConfig {
    /// Runs older than this (by their arrival) are deleted.
    pub retention: Duration,
    /// The log bytes one run keeps; past it its logs say they were cut.
    pub log_limit: usize,
    /// How often old runs are deleted.
    pub prune_interval: Duration,
}

impl Default for RunsConfig {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(30 * 24 * 3600),
            log_limit: 64 * 1024,
            prune_interval: Duration::from_secs(3600),
        }
    }
}

/// What a run is, known when it arrives.
#[derive(Debug, Clone, Default)]
pub struct NewRun {
    pub id: String,
    pub user_id: String,
    /// "call", "web", "queue" or "activation".
    pub kind: &'static str,
    pub function: String,
    pub app: String,
    pub revision: String,
    pub cron_id: String,
    pub machine_type: String,
    pub queued_ms: i64,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success,
    /// It failed: a short kind (the `fal-error-kind` of calls, "raised", "http-502", ...) and what happened.
    Error {
        kind: String,
        message: String,
    },
    Timeout(String),
    /// It was stopped before it ended: its client went away, it was cancelled, the server stopped.
    Cancelled {
        kind: String,
        message: String,
    },
}

impl Outcome {
    pub fn error(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Error { kind: kind.into(), message: message.into() }
    }

    pub fn cancelled(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Cancelled { kind: kind.into(), message: message.into() }
    }

    /// Its name, its error's kind and its message, as stored.
    pub fn parts(&self) -> (&'static str, &str, &str) {
        match self {
            Self::Success => ("success", "", ""),
            Self::Error { kind, message } => ("error", kind, message),
            Self::Timeout(message) => ("timeout", "timeout", message),
            Self::Cancelled { kind, message } => ("cancelled", kind, message),
        }
    }
}

/// A run's end, with everything known of it (the writer stores it whole, whether or not its start arrived).
#[derive(Debug, Clone)]
pub struct Ended {
    pub run: NewRun,
    pub started_ms: Option<i64>,
    pub finished_ms: i64,
    pub worker: String,
    pub outcome: Outcome,
    /// Its log lines as JSON (see [`LogCapture`]) and whether they were cut.
    pub logs: String,
    pub logs_truncated: bool,
}

#[derive(Debug)]
enum Event {
    Started(NewRun),
    Ended(Box<Ended>),
}

impl Event {
    /// What it counts for against [`QUEUE_BYTES`].
    fn weight(&self) -> usize {
        match self {
            Event::Started(_) => EVENT_BYTES,
            Event::Ended(ended) => EVENT_BYTES + ended.logs.len(),
        }
    }
}

/// The run history: where runs are sent, and the store they are read from.
#[derive(Debug)]
pub struct Runs {
    sender: mpsc::Sender<Event>,
    /// What the channel holds, by [`Event::weight`].
    queued_bytes: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
    stop: Arc<Notify>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    pub store: Arc<RunStore>,
    pub config: RunsConfig,
    /// Runs going on now, by id: their owner and their logs so far, for watching them live (the dashboard).
    live: Mutex<HashMap<String, (String, Arc<LogCapture>)>>,
    metrics: Arc<Metrics>,
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Runs {
    /// Marks the runs a stopped server left running as ended by that stop, then starts the writer.
    pub fn start(store: Arc<RunStore>, config: RunsConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        match store.end_interrupted(now_ms()) {
            Ok(0) => {}
            Ok(n) => tracing::info!("{n} runs were still running when the server last stopped: marked cancelled"),
            Err(error) => tracing::warn!(%error, "cannot mark the runs a stopped server left"),
        }
        let (sender, receiver) = mpsc::channel(QUEUE);
        let (dropped, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(Notify::new()));
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let channel = Channel { receiver, queued_bytes: queued_bytes.clone(), dropped: dropped.clone() };
        let writer = tokio::spawn(write(store.clone(), config, channel, stop.clone()));
        let writer = Mutex::new(Some(writer));
        let live = Mutex::default();
        Arc::new(Self { sender, queued_bytes, dropped, stop, writer, store, config, live, metrics })
    }

    fn send(&self, event: Event) {
        let weight = event.weight();
        let before = self.queued_bytes.fetch_add(weight, Ordering::Relaxed);
        // One event alone always fits (a run whose logs are larger than the whole budget is still recorded).
        if (before > 0 && before + weight > QUEUE_BYTES) || self.sender.try_send(event).is_err() {
            self.queued_bytes.fetch_sub(weight, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records that `run` arrived (it is listed as running), and returns its recording, which records its end.
    pub fn begin(self: &Arc<Self>, run: NewRun) -> Recording {
        self.send(Event::Started(run.clone()));
        let logs = LogCapture::new(self.config.log_limit);
        self.live_runs().insert(run.id.clone(), (run.user_id.clone(), logs.clone()));
        Recording {
            runs: self.clone(),
            run,
            state: Mutex::new(RecordingState::default()),
            logs,
            done: Default::default(),
        }
    }

    /// Records a run whose start was not recorded (the queue's, which records its requests itself until they end).
    pub fn ended(&self, ended: Ended) {
        self.metrics.run_ended(&ended);
        // Told its end under the live runs' lock: no watcher finds it live without its end coming.
        let mut live = self.live_runs();
        if let Some((_, logs)) = live.remove(&ended.run.id) {
            logs.end(ended.outcome.parts().0);
        }
        drop(live);
        self.send(Event::Ended(Box::new(ended)));
    }

    /// Run `id`'s owner and what [`LogCapture::subscribe`] gives, while it goes on (or has just ended: its end is
    /// then in what it gives).
    pub fn watch(&self, id: &str) -> Option<(String, Watched)> {
        let (owner, logs) = self.live_runs().get(id).cloned()?;
        Some((owner, logs.subscribe()))
    }

    /// Run `id`'s owner, its lines so far and its end if it has ended, while it is live (no watcher is made).
    pub fn peek(&self, id: &str) -> Option<(String, Vec<serde_json::Value>, Option<&'static str>)> {
        let (owner, logs) = self.live_runs().get(id).cloned()?;
        let kept = logs.kept.lock().unwrap_or_else(|e| e.into_inner());
        Some((owner, kept.lines.clone(), kept.ended))
    }

    fn live_runs(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Arc<LogCapture>)>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes what was sent so far and stops the writer (the server stops).
    pub async fn close(&self) {
        self.stop.notify_one();
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(writer) = writer {
            let _ = writer.await;
        }
    }
}

#[derive(Debug, Default)]
struct RecordingState {
    started_ms: Option<i64>,
    worker: String,
}

/// One run being recorded: its end is recorded once, by [`Recording::finish`], or when dropped unfinished (its
/// caller went away) as cancelled.
#[derive(Debug)]
pub struct Recording {
    runs: Arc<Runs>,
    run: NewRun,
    state: Mutex<RecordingState>,
    pub logs: Arc<LogCapture>,
    done: std::sync::atomic::AtomicBool,
}

impl Recording {
    /// It started on `worker` (a pid, or a replica's address).
    pub fn started(&self, worker: impl Into<String>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.started_ms = Some(now_ms());
        state.worker = worker.into();
    }

    /// It started on the engine's worker `worker`.
    pub fn on_worker(&self, worker: CallWorker) {
        self.started(worker.pid.to_string());
    }

    pub fn finish(&self, outcome: Outcome) {
        if self.done.swap(true, Ordering::SeqCst) {
            return;
        }
        let (logs, logs_truncated) = self.logs.json();
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.runs.ended(Ended {
            run: self.run.clone(),
            started_ms: state.started_ms,
            finished_ms: now_ms(),
            worker: state.worker.clone(),
            outcome,
            logs,
            logs_truncated,
        });
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        self.finish(Outcome::cancelled("client-gone", "the client went away before the run ended"));
    }
}

/// Runs `call` (an engine call whose `on_worker` sends to `workers`), telling `recording` when it gets its worker.
pub async fn watching<T>(
    call: impl std::future::Future<Output = T>,
    mut workers: mpsc::UnboundedReceiver<CallWorker>,
    recording: &Recording,
) -> T {
    tokio::pin!(call);
    let mut open = true;
    loop {
        tokio::select! {
            outcome = &mut call => return outcome,
            worker = workers.recv(), if open => match worker {
                Some(worker) => recording.on_worker(worker),
                None => open = false,
            },
        }
    }
}

/// One kept log line, as JSON: fal's log object (`message`, `level`, `source`, `timestamp`), the queue's shape.
pub fn log_value(time: SystemTime, source: LogSource, line: &str) -> serde_json::Value {
    let (level, source) = match source {
        LogSource::Stdout => ("STDOUT", "stdout"),
        LogSource::Stderr => ("STDERR", "stderr"),
        LogSource::Build => ("INFO", "build"),
        LogSource::Engine => ("INFO", "server"),
    };
    serde_json::json!({ "message": line, "level": level, "source": source, "timestamp": rfc3339(time) })
}

/// RFC 3339 in UTC, to the microsecond.
pub fn rfc3339(time: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(time).format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// What a live run's watcher receives.
#[derive(Debug, Clone)]
pub enum LiveLog {
    Line(serde_json::Value),
    /// The run ended, with this outcome (`success`, `error`, ...).
    Ended(&'static str),
}

/// Lines a slow watcher may fall behind by before it misses some (it is told so).
const LIVE_LAG: usize = 1024;

/// The log lines of one run, kept up to a number of bytes: later lines are left out, and a last line says so.
/// Each kept line also goes to whoever watches the run live.
#[derive(Debug)]
pub struct LogCapture {
    limit: usize,
    kept: Mutex<Captured>,
}

#[derive(Debug, Default)]
struct Captured {
    lines: Vec<serde_json::Value>,
    bytes: usize,
    left_out: usize,
    /// Made by the first watcher: a run nobody watches (nearly all) costs nothing more.
    live: Option<broadcast::Sender<LiveLog>>,
    /// How it ended, once it has.
    ended: Option<&'static str>,
}

impl Captured {
    fn tell(&self, event: LiveLog) {
        if let Some(live) = &self.live {
            let _ = live.send(event);
        }
    }
}

/// What a watcher of a run gets: its lines so far, how it ended if it has, and a receiver of what follows.
pub type Watched = (Vec<serde_json::Value>, Option<&'static str>, broadcast::Receiver<LiveLog>);

impl LogCapture {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { limit, kept: Mutex::default() })
    }

    /// The lines so far, its end if it has ended, and a receiver of what follows: taken under the lock lines are
    /// pushed under, so none is missed or seen twice.
    pub fn subscribe(&self) -> Watched {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let receiver = kept.live.get_or_insert_with(|| broadcast::channel(LIVE_LAG).0).subscribe();
        (kept.lines.clone(), kept.ended, receiver)
    }

    /// Tells watchers the run ended.
    fn end(&self, outcome: &'static str) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.ended = Some(outcome);
        kept.tell(LiveLog::Ended(outcome));
    }

    pub fn push(&self, source: LogSource, line: &str) {
        self.push_at(SystemTime::now(), source, line);
    }

    pub fn push_at(&self, time: SystemTime, source: LogSource, line: &str) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.left_out > 0 || kept.bytes + line.len() > self.limit {
            kept.left_out += 1;
            return;
        }
        kept.bytes += line.len();
        let value = log_value(time, source, line);
        if kept.live.is_some() {
            kept.tell(LiveLog::Line(value.clone()));
        }
        kept.lines.push(value);
    }

    /// Adds lines already in fal's JSON shape (the queue's), as many as fit.
    pub fn push_values(&self, values: Vec<serde_json::Value>) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        for value in values {
            let bytes = value.get("message").and_then(|m| m.as_str()).map_or(0, str::len);
            if kept.left_out > 0 || kept.bytes + bytes > self.limit {
                kept.left_out += 1;
                continue;
            }
            kept.bytes += bytes;
            if kept.live.is_some() {
                kept.tell(LiveLog::Line(value.clone()));
            }
            kept.lines.push(value);
        }
    }

    /// The lines as a JSON array, with a last line saying how many were left out, and whether any were.
    pub fn json(&self) -> (String, bool) {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let mut lines = kept.lines.clone();
        if kept.left_out > 0 {
            let note = format!(
                "... {} more lines left out: a run keeps {} KiB of logs ([runs] log_limit_kb)",
                kept.left_out,
                self.limit / 1024
            );
            lines.push(log_value(SystemTime::now(), LogSource::Engine, &note));
        }
        (serde_json::Value::Array(lines).to_string(), kept.left_out > 0)
    }
}

/// The traceback of a raised call, from the worker's description of its exception (see the engine's `agent.py`):
/// for dill, its JSON line; for cloudpickle, the `traceback` string of the pickled dict, found without unpickling
/// (the history keeps it as the run's last log line; the caller gets the whole exception as before).
pub fn raised_traceback(serializer: &fal_engine::Serializer, payload: &[u8]) -> Option<String> {
    match serializer {
        fal_engine::Serializer::Dill => {
            let line = &payload[..payload.iter().position(|&b| b == b'\n')?];
            let value: serde_json::Value = serde_json::from_slice(line).ok()?;
            value.get("traceback")?.as_str().map(str::to_string)
        }
        fal_engine::Serializer::Cloudpickle(_) => {
            const KEY: &[u8] = b"\x8c\x09traceback";
            let at = payload.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
            let mut rest = payload.get(at..)?;
            if rest.first() == Some(&0x94) {
                rest = &rest[1..];
            }
            let (len, start): (usize, usize) = match *rest.first()? {
                0x8c => (usize::from(*rest.get(1)?), 2),
                b'X' => (u32::from_le_bytes(rest.get(1..5)?.try_into().ok()?) as usize, 5),
                0x8d => (usize::try_from(u64::from_le_bytes(rest.get(1..9)?.try_into().ok()?)).ok()?, 9),
                _ => return None,
            };
            let text = rest.get(start..start.checked_add(len)?)?;
            Some(String::from_utf8_lossy(text).into_owned())
        }
    }
}

/// Stored log lines (a JSON array of fal's log objects) as the wire's `Log`s.
pub fn proto_logs(json: &str) -> Vec<Log> {
    use fal_proto::{LogLevel, LogSource as Source};
    let values: Vec<serde_json::Value> = serde_json::from_str(json).unwrap_or_default();
    values
        .iter()
        .map(|value| {
            let text = |name: &str| value.get(name).and_then(|v| v.as_str()).unwrap_or_default();
            let (source, level) = match text("source") {
                "stdout" => (Source::User, LogLevel::Stdout),
                "stderr" => (Source::User, LogLevel::Stderr),
                "build" => (Source::Builder, LogLevel::Info),
                _ => (Source::Bridge, LogLevel::Info),
            };
            let timestamp = chrono::DateTime::parse_from_rfc3339(text("timestamp"))
                .ok()
                .map(|t| prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 });
            Log { message: text("message").to_string(), source: source as i32, level: level as i32, timestamp }
        })
        .collect()
}

pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

/// A stored run on the wire.
pub fn run_info(row: &RunRow) -> RunInfo {
    RunInfo {
        run_id: row.id.clone(),
        user_id: row.user_id.clone(),
        kind: row.kind.clone(),
        function: row.function.clone(),
        app: row.app.clone(),
        revision: row.revision.clone(),
        cron_id: row.cron_id.clone(),
        machine_type: row.machine_type.clone(),
        queued_at: Some(timestamp(row.queued_ms)),
        started_at: row.started_ms.map(timestamp),
        finished_at: row.finished_ms.map(timestamp),
        outcome: row.outcome.clone(),
        error_kind: row.error_kind.clone(),
        error: row.error.clone(),
        worker: row.worker.clone(),
        logs_truncated: row.logs_truncated,
    }
}

/// The writer: takes what the channel holds, writes it in one transaction; prunes every `prune_interval`; on stop,
/// writes what is left and ends.
/// The writer's end of the channel, with the counts it keeps.
struct Channel {
    receiver: mpsc::Receiver<Event>,
    queued_bytes: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
}

async fn write(store: Arc<RunStore>, config: RunsConfig, channel: Channel, stop: Arc<Notify>) {
    let Channel { mut receiver, queued_bytes, dropped } = channel;
    let mut prune = tokio::time::interval(config.prune_interval);
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let stopping = tokio::select! {
            n = receiver.recv_many(&mut batch, BATCH) => {
                if n > 0 && n < BATCH {
                    tokio::time::sleep(GATHER).await;
                    while batch.len() < BATCH {
                        match receiver.try_recv() {
                            Ok(event) => batch.push(event),
                            Err(_) => break,
                        }
                    }
                }
                n == 0
            }
            () = stop.notified() => true,
            _ = prune.tick() => {
                let (store, before) = (store.clone(), now_ms() - config.retention.as_millis() as i64);
                match tokio::task::spawn_blocking(move || store.prune(before)).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => tracing::info!("deleted {n} runs older than the retention ([runs] retention_days)"),
                    Ok(Err(error)) => tracing::warn!(%error, "cannot delete old runs"),
                    Err(error) => tracing::warn!(%error, "the run pruning task failed"),
                }
                false
            }
        };
        if stopping {
            receiver.close();
            while let Ok(event) = receiver.try_recv() {
                batch.push(event);
            }
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            tracing::warn!(
                "{lost} run history events were dropped: the history's writer fell {QUEUE} events or {} MiB of logs \
                 behind (a slow disk?); those runs may be missing or shown running",
                QUEUE_BYTES >> 20
            );
        }
        if !batch.is_empty() {
            let events = std::mem::take(&mut batch);
            let weight: usize = events.iter().map(Event::weight).sum();
            let store = store.clone();
            let written = tokio::task::spawn_blocking(move || {
                let (started, ended): (Vec<_>, Vec<_>) =
                    events.into_iter().partition(|e| matches!(e, Event::Started(_)));
                let started: Vec<NewRun> = started
                    .into_iter()
                    .filter_map(|e| if let Event::Started(r) = e { Some(r) } else { None })
                    .collect();
                let ended: Vec<Ended> =
                    ended.into_iter().filter_map(|e| if let Event::Ended(r) = e { Some(*r) } else { None }).collect();
                store.write(&started, &ended)
            })
            .await;
            // Written (or failed): what the events held is freed.
            queued_bytes.fetch_sub(weight, Ordering::Relaxed);
            match written {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%error, "cannot write runs to the history"),
                Err(error) => tracing::warn!(%error, "the run history's writer task failed"),
            }
            batch = Vec::with_capacity(BATCH);
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn the_channel_is_bounded_by_the_logs_it_holds_and_frees_them_once_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RunStore::open(&dir.path().join("state.db")).unwrap());
        let runs = Runs::start(store.clone(), RunsConfig::default(), Default::default());
        // The writer has not run yet (one thread, not yielded to): what is sent waits in the channel.
        let ended = |i: usize| Ended {
            // Arrived now: one arrived at 0 (1970) would be pruned as past the retention by the writer's first prune.
            run: NewRun {
                id: format!("run-{i}"),
                user_id: "u".into(),
                kind: "call",
                queued_ms: now_ms(),
                ..NewRun::default()
            },
            started_ms: None,
            finished_ms: 0,
            worker: String::new(),
            outcome: Outcome::cancelled("test", "test"),
            logs: "x".repeat(1 << 20),
            logs_truncated: false,
        };
        let fit = QUEUE_BYTES / ((1 << 20) + EVENT_BYTES);
        for i in 0..fit + 3 {
            runs.ended(ended(i));
        }
        assert_eq!(runs.dropped.load(Ordering::Relaxed), 3, "past the bytes, events are dropped, not queued");
        runs.close().await;
        assert_eq!(runs.queued_bytes.load(Ordering::Relaxed), 0);
        let all = store::RunQuery { user: None, app: None, limit: fit + 10, ..Default::default() };
        assert_eq!(store.list(&all).unwrap().len(), fit);
    }

    #[test]
    fn a_capture_keeps_its_limit_and_says_what_it_left_out() {
        let capture = LogCapture::new(10);
        capture.push(LogSource::Stdout, "12345");
        capture.push(LogSource::Stderr, "67890");
        capture.push(LogSource::Stdout, "x");
        capture.push(LogSource::Stdout, "y");
        let (json, cut) = capture.json();
        assert!(cut);
        let logs = proto_logs(&json);
        assert_eq!(logs.len(), 3);
        assert_eq!(logs[0].message, "12345");
        assert_eq!(logs[1].level, fal_proto::LogLevel::Stderr as i32);
        assert!(logs[2].message.contains("2 more lines left out"), "{}", logs[2].message);
        assert!(logs[0].timestamp.is_some());
        let (json, cut) = LogCapture::new(10).json();
        assert_eq!((json.as_str(), cut), ("[]", false));
    }

    #[tokio::test]
    async fn a_watched_run_gives_its_lines_so_far_then_each_new_one_then_its_end() {
        let runs = Runs::start(
            Arc::new(RunStore::open(&tempfile::tempdir().unwrap().path().join("s.sqlite3")).unwrap()),
            RunsConfig::default(),
            Default::default(),
        );
        let run = NewRun { id: "r1".into(), user_id: "alice".into(), kind: "call", ..Default::default() };
        let recording = runs.begin(run);
        recording.logs.push(LogSource::Stdout, "before");
        let (owner, (lines, ended, mut receiver)) = runs.watch("r1").unwrap();
        assert_eq!((owner.as_str(), lines.len(), ended), ("alice", 1, None));
        recording.logs.push(LogSource::Stdout, "after");
        let Ok(LiveLog::Line(line)) = receiver.recv().await else { panic!("a line") };
        assert_eq!(line["message"], "after");
        recording.finish(Outcome::Success);
        let Ok(LiveLog::Ended(outcome)) = receiver.recv().await else { panic!("the end") };
        assert_eq!(outcome, "success");
        // Ended, it is no longer watched live (the stored run has it all).
        assert!(runs.watch("r1").is_none());
        runs.close().await;
    }

    #[test]
    fn a_raised_calls_traceback_is_found_in_either_description() {
        use fal_engine::Serializer;
        let dill = b"{\"stage\": \"call\", \"traceback\": \"Traceback: boom\"}\n\x80\x04junk";
        assert_eq!(raised_traceback(&Serializer::Dill, dill).as_deref(), Some("Traceback: boom"));
        let cloudpickle = Serializer::Cloudpickle("cloudpickle==3.1.1".into());
        // `{"traceback": "Trace"}` as pickle protocol 5 writes it (a memoized short string), and a long one.
        let short = b"\x80\x05\x95\x00}\x94(\x8c\x09traceback\x94\x8c\x05Trace\x94u.";
        assert_eq!(raised_traceback(&cloudpickle, short).as_deref(), Some("Trace"));
        let mut long = b"\x8c\x09traceback\x94X\x2c\x01\x00\x00".to_vec();
        long.extend(std::iter::repeat_n(b'x', 300));
        assert_eq!(raised_traceback(&cloudpickle, &long).map(|t| t.len()), Some(300));
        for garbage in [&b""[..], b"\x8c\x09traceback", b"\x8c\x09traceback\x94X\xff\xff\xff\xff", b"\n"] {
            assert_eq!(raised_traceback(&cloudpickle, garbage), None);
            assert_eq!(raised_traceback(&Serializer::Dill, garbage), None);
        }
    }

    #[test]
    fn milliseconds_are_timestamps() {
        assert_eq!(timestamp(1_500), prost_types::Timestamp { seconds: 1, nanos: 500_000_000 });
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(1_500)), "1970-01-01T00:00:01.500000Z");
    }
}
