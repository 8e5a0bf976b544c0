//! Schedules: a registered plain function (an anonymous app revision that does not serve) run at the times of a cron
//! expression, in UTC, as a plain call by its owner (its environment, machine type and keep_alive as registered, the
//! owner's uid and capacity), each run an *activation* with its logs (capped as runs' are) and outcome, kept in
//! SQLite (`store.rs`) and in the run history (kind "activation", the same id).
//!
//! Cron expressions are parsed by `croner`: five fields (minute hour day-of-month month day-of-week), as the
//! original takes, or six with seconds first; no year field. A revision that serves (a web endpoint) is refused: a
//! schedule runs a function once, and a serving one never returns.
//!
//! The rules:
//! * One scheduler task wakes at the next due time of any schedule (or when one is added or cancelled).
//! * An activation still running when the next time is due is not started twice: that time is recorded as a
//!   `skipped` activation, whose log says which one was still running.
//! * Due times missed while the server was down (or while it could not keep up) run ONCE, at start, and that
//!   activation's log and the server's log say how many were missed. A schedule's `last_due_ms` is stored before its
//!   activation runs, so a crash during an activation does not run it again; the next start marks that activation
//!   cancelled (`server-stopped`).
//! * Cancelling stops future activations; one running then is left to finish, and its outcome is recorded.
//! * The server's stop ends running activations (cancelled, `server-stopped`) before the engine stops their workers.

pub mod rpc;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use fal_engine::{CallError, LogSink, LogSource};
use tokio::sync::{watch, Notify};

pub use self::store::{ActivationRow, CronRow, ScheduleStore, ScheduleStoreError};
use crate::apps::Apps;
use crate::runs::{now_ms, NewRun, Outcome, Runs};

/// Missed due times counted at most, for the log of a catch-up (a schedule every second, down for a week).
const MAX_COUNTED: usize = 10_000;
/// The scheduler looks again at least this often (a clock that jumped).
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// How long the server's stop waits for running activations to record their end.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// `[schedules]` in the server's config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulesConfig {
    /// The longest one activation may run; then it ends as a timeout.
    pub activation_timeout: Duration,
    /// Active schedules one user may have.
    pub max_per_user: usize,
}

impl Default for SchedulesConfig {
    fn default() -> Self {
        Self { activation_timeout: Duration::from_secs(3600), max_per_user: 100 }
    }
}

/// A cron expression as this server reads it, or why it is not one.
pub fn parse(expression: &str) -> Result<croner::Cron, String> {
    let parser = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .year(croner::parser::Year::Disallowed)
        .build();
    let cron = parser.parse(expression).map_err(|e| {
        format!(
            "cron expression {expression:?} is not valid: {e}. Use five fields (minute hour day-of-month month \
             day-of-week, in UTC: \"*/5 * * * *\" is every five minutes) or six with seconds first"
        )
    })?;
    cron.find_next_occurrence(&Utc::now(), false)
        .map_err(|e| format!("cron expression {expression:?} has no next time ({e}): it would never run"))?;
    Ok(cron)
}

/// What a schedule has to do at `now`, having dealt with every due time up to `after`.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Nothing yet: its next time.
    Wait { next: DateTime<Utc> },
    /// Due times passed: run once, for the latest of them (`missed` of them passed, counted up to a cap), then wait
    /// for `next`.
    Run { due: DateTime<Utc>, missed: usize, next: Option<DateTime<Utc>> },
    /// It has no time left.
    Never,
}

pub fn plan(cron: &croner::Cron, after: DateTime<Utc>, now: DateTime<Utc>) -> Plan {
    let first = match cron.find_next_occurrence(&after, false) {
        Ok(first) => first,
        Err(_) => return Plan::Never,
    };
    if first > now {
        return Plan::Wait { next: first };
    }
    let mut due = first;
    let mut missed = 1;
    for time in cron.iter_after(first) {
        if time > now || missed >= MAX_COUNTED {
            break;
        }
        due = time;
        missed += 1;
    }
    // Past the cap, the latest due time is found directly.
    if missed >= MAX_COUNTED {
        if let Ok(latest) = cron.find_previous_occurrence(&now, true) {
            due = due.max(latest);
        }
    }
    Plan::Run { due, missed, next: cron.find_next_occurrence(&now, false).ok() }
}

pub fn utc(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

struct Entry {
    row: CronRow,
    cron: croner::Cron,
    next: Option<DateTime<Utc>>,
    /// The activation running now, if any: its id and task.
    running: Option<(String, tokio::task::JoinHandle<()>)>,
    /// Whether this entry has been looked at since the server started (a first look that finds missed times says
    /// they were missed while the server was down).
    seen: bool,
}

/// The schedules of this server and their scheduler.
pub struct Schedules {
    pub store: Arc<ScheduleStore>,
    apps: Arc<Apps>,
    runs: Arc<Runs>,
    pub config: SchedulesConfig,
    entries: Mutex<HashMap<String, Entry>>,
    wake: Notify,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Schedules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schedules").field("config", &self.config).finish()
    }
}

impl Schedules {
    /// Loads the active schedules (marking activations a stopped server left running as ended by that stop) and
    /// starts the scheduler, which first runs, once each, the schedules that missed times while the server was down.
    pub async fn start(
        store: Arc<ScheduleStore>,
        apps: Arc<Apps>,
        runs: Arc<Runs>,
        config: SchedulesConfig,
    ) -> Arc<Self> {
        let loaded = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || {
                let interrupted = store.end_interrupted(now_ms())?;
                Ok::<_, ScheduleStoreError>((interrupted, store.active()?))
            })
            .await
        };
        let rows = match loaded {
            Ok(Ok((interrupted, rows))) => {
                if interrupted > 0 {
                    tracing::info!("{interrupted} schedule activations were running when the server last stopped");
                }
                rows
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot read the schedules: none runs until the server restarts");
                Vec::new()
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the schedules: none runs until the server restarts");
                Vec::new()
            }
        };
        let schedules = Arc::new(Self {
            store,
            apps,
            runs,
            config,
            entries: Mutex::default(),
            wake: Notify::new(),
            stop: watch::channel(false).0,
            task: Mutex::default(),
        });
        for row in rows {
            match parse(&row.cron) {
                Ok(cron) => schedules.add(row, cron, false),
                Err(error) => {
                    tracing::warn!(cron = %row.id, %error, "a stored schedule cannot be read; it does not run")
                }
            }
        }
        let task = tokio::spawn(schedules.clone().run());
        *schedules.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        schedules
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a schedule to the scheduler (`fresh`: just registered, so nothing of it was missed).
    pub fn add(&self, row: CronRow, cron: croner::Cron, fresh: bool) {
        let id = row.id.clone();
        self.entries().insert(id, Entry { row, cron, next: None, running: None, seen: fresh });
        self.wake.notify_one();
    }

    /// Takes cron `id` out of the scheduler; its running activation (if any) goes on to its end.
    pub fn remove(&self, id: &str) {
        self.entries().remove(id);
        self.wake.notify_one();
    }

    /// The next time of active schedule `id`, as the scheduler has it.
    pub fn next_run(&self, id: &str) -> Option<DateTime<Utc>> {
        self.entries().get(id).and_then(|e| e.next)
    }

    async fn run(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        let mut pruned = tokio::time::Instant::now();
        loop {
            if pruned.elapsed() >= self.runs.config.prune_interval {
                pruned = tokio::time::Instant::now();
                // Activations go with the run history's retention.
                let before = now_ms() - self.runs.config.retention.as_millis() as i64;
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(error) = store.prune(before) {
                        tracing::warn!(%error, "cannot delete old schedule activations");
                    }
                });
            }
            let wait = self.tick();
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.wake.notified() => {}
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
        }
    }

    /// Starts (or skips) what is due; returns how long to sleep.
    fn tick(self: &Arc<Self>) -> Duration {
        let now = Utc::now();
        let mut soonest = now + chrono::Duration::from_std(MAX_SLEEP).unwrap_or_default();
        let mut entries = self.entries();
        for entry in entries.values_mut() {
            let after = utc(entry.row.last_due_ms);
            let at_start = !std::mem::replace(&mut entry.seen, true);
            match plan(&entry.cron, after, now) {
                Plan::Never => entry.next = None,
                Plan::Wait { next } => entry.next = Some(next),
                Plan::Run { due, missed, next } => {
                    entry.next = next;
                    entry.row.last_due_ms = due.timestamp_millis();
                    let note = match (at_start, missed) {
                        (true, _) => Some(format!(
                            "{missed}{} due times of this schedule passed while the server was down (the latest at \
                             {}): running once now",
                            if missed >= MAX_COUNTED { "+" } else { "" },
                            due.to_rfc3339()
                        )),
                        (false, 1) => None,
                        (false, _) => Some(format!(
                            "{missed} due times passed since the last activation (the server fell behind): running \
                             once now"
                        )),
                    };
                    if let Some(note) = &note {
                        tracing::info!(cron = %entry.row.id, user = %entry.row.user_id, "{note}");
                    }
                    self.fire(entry, due, note);
                }
            }
            if let Some(next) = entry.next {
                soonest = soonest.min(next);
            }
        }
        (soonest - Utc::now()).to_std().unwrap_or(Duration::ZERO).max(Duration::from_millis(10))
    }

    /// Starts an activation of `entry` for its due time `due`, or records it skipped if its last one still runs.
    fn fire(self: &Arc<Self>, entry: &mut Entry, due: DateTime<Utc>, note: Option<String>) {
        let id = uuid::Uuid::new_v4().to_string();
        let due_ms = due.timestamp_millis();
        if let Some((running, task)) = &entry.running {
            if !task.is_finished() {
                let message = format!(
                    "skipped: activation {running} of this schedule is still running (an activation is not started \
                     twice)"
                );
                tracing::info!(cron = %entry.row.id, due = %due.to_rfc3339(), "schedule activation {message}");
                let now = now_ms();
                let activation = ActivationRow {
                    id,
                    cron_id: entry.row.id.clone(),
                    due_ms,
                    started_ms: Some(now),
                    finished_ms: Some(now),
                    outcome: "skipped".into(),
                    error_kind: "still-running".into(),
                    error: message.clone(),
                };
                let logs = crate::runs::LogCapture::new(self.runs.config.log_limit);
                logs.push(LogSource::Engine, &message);
                let (logs, _) = logs.json();
                let store = self.store.clone();
                let cron_id = entry.row.id.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(error) = store.activate(&cron_id, due_ms, &activation, &logs) {
                        tracing::warn!(%error, cron = %cron_id, "cannot record a skipped activation");
                    }
                });
                return;
            }
        }
        let task = tokio::spawn(self.clone().activate(entry.row.clone(), id.clone(), due_ms, note));
        entry.running = Some((id, task));
    }

    /// One activation: recorded as running (and the schedule's due time as dealt with), run, its end recorded.
    async fn activate(self: Arc<Self>, row: CronRow, id: String, due_ms: i64, note: Option<String>) {
        let started = now_ms();
        let recording = self.runs.begin(NewRun {
            id: id.clone(),
            user_id: row.user_id.clone(),
            kind: "activation",
            function: row.function_name.clone(),
            app: row.revision.clone(),
            revision: row.revision.clone(),
            cron_id: row.id.clone(),
            machine_type: row.machine_type.clone(),
            queued_ms: started,
        });
        let activation = ActivationRow {
            id: id.clone(),
            cron_id: row.id.clone(),
            due_ms,
            started_ms: Some(started),
            finished_ms: None,
            outcome: "running".into(),
            error_kind: String::new(),
            error: String::new(),
        };
        let (store, cron_id) = (self.store.clone(), row.id.clone());
        let recorded = tokio::task::spawn_blocking(move || store.activate(&cron_id, due_ms, &activation, "[]")).await;
        if !matches!(recorded, Ok(Ok(()))) {
            // Not run: a time that cannot be marked dealt with could run again after a restart.
            tracing::warn!(cron = %row.id, "cannot record an activation in SQLite: it does not run");
            recording.finish(Outcome::error("internal", "the activation could not be recorded, so it did not run"));
            return;
        }
        tracing::info!(cron = %row.id, user = %row.user_id, activation = %id, "schedule activation");
        if let Some(note) = note {
            recording.logs.push(LogSource::Engine, &note);
        }
        let capture = recording.logs.clone();
        let logs = LogSink::new(move |line| capture.push(line.source, &line.line));
        let mut stop = self.stop.subscribe();
        let outcome = match self.call(&row).await {
            Err(message) => {
                logs.send(LogSource::Engine, format!("the activation cannot run: {message}"));
                Outcome::error("invalid", message)
            }
            Ok(mut call) => {
                let timeout = self.config.activation_timeout;
                call.timeout = Some(timeout);
                let (workers, watched) = tokio::sync::mpsc::unbounded_channel();
                call.on_worker = Some(workers);
                let engine = self.apps.engine().clone();
                let serializer = call.env.serializer.clone();
                tokio::select! {
                    outcome = crate::runs::watching(engine.call(call, &logs), watched, &recording) => match outcome {
                        Ok(reply) if reply.raised => {
                            let traceback = crate::runs::raised_traceback(&serializer, &reply.payload);
                            logs.send(LogSource::Engine, traceback.unwrap_or_else(|| "the function raised an exception".into()));
                            Outcome::error("raised", "the function raised an exception (its traceback is in the logs)")
                        }
                        Ok(_) => Outcome::Success,
                        Err(CallError::Timeout { .. }) => Outcome::Timeout(format!(
                            "the activation ran past {} s ([schedules] activation_timeout_seconds)",
                            timeout.as_secs()
                        )),
                        Err(error) => {
                            let kind = crate::service::call_error_kind(&error).1;
                            logs.send(LogSource::Engine, error.to_string());
                            Outcome::error(kind, error.to_string())
                        }
                    },
                    _ = stop.wait_for(|stopped| *stopped) => {
                        Outcome::cancelled("server-stopped", "the server stopped while this activation ran")
                    }
                }
            }
        };
        recording.finish(outcome.clone());
        let (json, cut) = recording.logs.json();
        let store = self.store.clone();
        let finished = tokio::task::spawn_blocking(move || {
            let (name, kind, message) = outcome.parts();
            store.finish(&id, now_ms(), (name, kind, message), &json, cut)
        })
        .await;
        if !matches!(finished, Ok(Ok(()))) {
            tracing::warn!(cron = %row.id, "cannot record how an activation ended");
        }
    }

    async fn call(&self, row: &CronRow) -> Result<fal_engine::CallRequest, String> {
        let revision = self.apps.resolve(&row.user_id, &row.revision).await.map_err(|e| e.to_string())?;
        self.apps.plain_call(&revision).await
    }

    /// Stops the scheduler; running activations end as cancelled by the stop (waiting a little for them to record).
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let running: Vec<_> = self.entries().values_mut().filter_map(|e| e.running.take()).map(|(_, t)| t).collect();
        let _ = tokio::time::timeout(STOP_WAIT, async {
            for task in running {
                let _ = task.await;
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn five_and_six_fields_parse_and_bad_ones_say_why() {
        let every_minute = parse("* * * * *").unwrap();
        assert_eq!(
            every_minute.find_next_occurrence(&at("2026-01-01T10:00:30Z"), false).unwrap(),
            at("2026-01-01T10:01:00Z")
        );
        let every_two_seconds = parse("*/2 * * * * *").unwrap();
        assert_eq!(
            every_two_seconds.find_next_occurrence(&at("2026-01-01T10:00:01Z"), false).unwrap(),
            at("2026-01-01T10:00:02Z")
        );
        for bad in ["", "* * *", "61 * * * *", "* * * * * * *", "not a cron", "0 0 31 2 *"] {
            let error = parse(bad).unwrap_err();
            assert!(error.contains(&format!("{bad:?}")), "{error}");
        }
        assert!(parse("61 * * * *").unwrap_err().contains("is not valid"));
        assert!(parse("0 0 31 2 *").unwrap_err().contains("never"));
    }

    #[test]
    fn the_next_run_is_the_first_time_after_the_last_dealt_with() {
        let cron = parse("0 * * * *").unwrap();
        assert_eq!(
            plan(&cron, at("2026-01-01T10:00:00Z"), at("2026-01-01T10:30:00Z")),
            Plan::Wait { next: at("2026-01-01T11:00:00Z") }
        );
        assert_eq!(
            plan(&cron, at("2026-01-01T10:00:00Z"), at("2026-01-01T11:00:00Z")),
            Plan::Run { due: at("2026-01-01T11:00:00Z"), missed: 1, next: Some(at("2026-01-01T12:00:00Z")) }
        );
    }

    #[test]
    fn times_missed_while_down_run_once_for_the_latest() {
        let cron = parse("*/10 * * * *").unwrap();
        // Down from 10:05 to 11:02: 10:10, 10:20, ..., 11:00 passed (six), one run for 11:00, then 11:10.
        assert_eq!(
            plan(&cron, at("2026-01-01T10:00:00Z"), at("2026-01-01T11:02:00Z")),
            Plan::Run { due: at("2026-01-01T11:00:00Z"), missed: 6, next: Some(at("2026-01-01T11:10:00Z")) }
        );
        // Every second for a week: counted up to the cap, the latest still found.
        let cron = parse("* * * * * *").unwrap();
        match plan(&cron, at("2026-01-01T00:00:00Z"), at("2026-01-08T00:00:00.500Z")) {
            Plan::Run { due, missed, next } => {
                assert_eq!(
                    (due, missed, next),
                    (at("2026-01-08T00:00:00Z"), MAX_COUNTED, Some(at("2026-01-08T00:00:01Z")))
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
