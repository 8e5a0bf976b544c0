//! The dashboard's pages: each reads what the signed-in caller may see (an admin everyone's) and renders a
//! template of `templates/dashboard/`. Forms POST back with the session's CSRF token and redirect (a reload never
//! repeats an action), except a new key's, whose answer shows its secret that once.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use askama::Template;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::{Html, IntoResponse, Redirect};
use axum::Form;
use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use serde::Deserialize;

use super::session::{self, Session};
use super::Console;
use crate::runs::store::{parse_cursor, RunQuery};
use crate::runs::{now_ms, LiveLog};
use crate::store::{Caller, Scope};

/// Runs on one page of the history.
const RUNS_PER_PAGE: usize = 50;

/// What every page shows in its header.
pub struct Nav {
    pub user: String,
    pub admin: bool,
    pub csrf: String,
    pub page: &'static str,
}

impl Nav {
    fn new(caller: &Caller, session: &Session, page: &'static str) -> Self {
        Self { user: caller.user_id.clone(), admin: caller.scope == Scope::Admin, csrf: session.csrf.clone(), page }
    }
}

fn render(page: impl Template) -> Response<Body> {
    match page.render() {
        Ok(html) => {
            let mut response = Html(html).into_response();
            let headers = response.headers_mut();
            // Only our own script and style; nothing framed elsewhere.
            headers.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                     form-action 'self'; frame-ancestors 'none'",
                ),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(error) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("the page could not be rendered: {error}")).into_response()
        }
    }
}

fn to_login() -> Response<Body> {
    Redirect::to("/login").into_response()
}

fn error_page(status: StatusCode, nav: Nav, message: String) -> Response<Body> {
    let mut response = render(ErrorPage { nav, message });
    *response.status_mut() = status;
    response
}

/// Signs the request's session in, or sends it to the sign-in page.
macro_rules! signed_in {
    ($console:expr, $headers:expr) => {
        match $console.signed_in(&$headers) {
            Some(signed_in) => signed_in,
            None => return to_login(),
        }
    };
}

/// A POST's session, with its CSRF token checked.
macro_rules! posted {
    ($console:expr, $headers:expr, $csrf:expr) => {{
        let (id, session, caller) = signed_in!($console, $headers);
        if !session::csrf_matches(&$csrf, &session) {
            let nav = Nav::new(&caller, &session, "");
            return error_page(
                StatusCode::FORBIDDEN,
                nav,
                "this form is out of date (or not from this dashboard): reload the page and try again".into(),
            );
        }
        (id, session, caller)
    }};
}

fn ago(time: SystemTime) -> String {
    let seconds = SystemTime::now().duration_since(time).unwrap_or_default().as_secs();
    match seconds {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

fn at_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

fn clock(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from(at_ms(ms)).format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n => format!("{:.0} KiB", n as f64 / 1024.0),
    }
}

// --- sign-in ---------------------------------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "dashboard/login.html")]
struct LoginPage {
    error: Option<String>,
}

pub async fn home(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response<Body> {
    match console.signed_in(&headers) {
        Some(_) => Redirect::to("/workers").into_response(),
        None => to_login(),
    }
}

pub async fn login_form() -> Response<Body> {
    render(LoginPage { error: None })
}

#[derive(Deserialize)]
pub struct LoginForm {
    key: String,
}

pub async fn login(State(console): State<Arc<Console>>, Form(form): Form<LoginForm>) -> Response<Body> {
    let refused = |message: &str| {
        let mut response = render(LoginPage { error: Some(message.into()) });
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        response
    };
    let Some((id, secret)) = form.key.trim().split_once(':') else {
        return refused("a key is KEY_ID:KEY_SECRET, as `fal-serverless keys create` prints it");
    };
    let (id, secret) = (id.trim().to_string(), secret.trim().to_string());
    match console.keys.verify(&id, &secret) {
        Err(_) => {
            return refused(
                "that key is not valid here (wrong, or revoked): check it, or ask your server's admin for one",
            )
        }
        // A worker's key (a function's, for the calls it makes) stands for its user only for calls.
        Ok(caller) if caller.depth > 0 => {
            return refused("a worker's key cannot sign in: use a key `fal-serverless keys create` made")
        }
        Ok(_) => {}
    }
    let token = console.sessions.create(id, secret);
    let mut response = Redirect::to("/workers").into_response();
    if let Ok(cookie) = HeaderValue::from_str(&session::set_cookie(&token, console.tls)) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

#[derive(Deserialize)]
pub struct CsrfForm {
    csrf: String,
}

pub async fn logout(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response<Body> {
    let (id, _, _) = posted!(console, headers, form.csrf);
    console.sessions.remove(&id);
    let mut response = Redirect::to("/login").into_response();
    if let Ok(cookie) = HeaderValue::from_str(&session::clear_cookie(console.tls)) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

#[derive(Template)]
#[template(path = "dashboard/error.html")]
struct ErrorPage {
    nav: Nav,
    message: String,
}

// --- workers ---------------------------------------------------------------------------------------------------

struct WorkerRow {
    pid: u32,
    user: String,
    machine_type: String,
    env_key: String,
    state: &'static str,
    calls: u64,
    age: String,
    cpu: String,
    memory: String,
}

#[derive(Template)]
#[template(path = "dashboard/workers.html")]
struct WorkersPage {
    nav: Nav,
    workers: Vec<WorkerRow>,
    capacity: Vec<(&'static str, String, String)>,
    notice: Option<String>,
}

pub async fn workers(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response<Body> {
    let (id, session, caller) = signed_in!(console, headers);
    let listed: Vec<_> = console
        .controller
        .engine
        .workers()
        .into_iter()
        .filter(|w| caller.scope == Scope::Admin || w.tenant == caller.user_id)
        .collect();
    // A worker's own cgroup is on this host only for jailed workers of the local provider (a Slurm worker's "pid"
    // is its job's id; an unjailed worker shares the server's cgroup).
    let pids: Vec<u32> = if console.local_cgroups { listed.iter().map(|w| w.pid).collect() } else { Vec::new() };
    let usage = tokio::task::spawn_blocking(move || pids.into_iter().map(fal_sandbox::usage_of).collect::<Vec<_>>())
        .await
        .unwrap_or_default();
    let workers = listed
        .into_iter()
        .zip(usage.into_iter().chain(std::iter::repeat(None)))
        .map(|(w, usage)| WorkerRow {
            pid: w.pid,
            user: w.tenant,
            machine_type: w.machine_type,
            env_key: w.env_key.chars().take(12).collect(),
            state: if w.busy { "busy" } else { "idle" },
            calls: w.calls,
            age: ago(w.started),
            cpu: usage.map(|u| format!("{:.2} s", u.cpu_seconds)).unwrap_or_else(|| "-".into()),
            memory: usage.map(|u| bytes(u.memory_bytes)).unwrap_or_else(|| "-".into()),
        })
        .collect();
    let (reserved, total) = console.capacity.usage();
    let capacity = vec![
        ("CPUs", format!("{:.2}", reserved.cpus), format!("{:.2}", total.cpus)),
        ("Memory", bytes(reserved.memory_bytes), bytes(total.memory_bytes)),
        ("GPUs", reserved.gpus.to_string(), total.gpus.to_string()),
    ];
    let notice = console.sessions.take_notice(&id);
    render(WorkersPage { nav: Nav::new(&caller, &session, "workers"), workers, capacity, notice })
}

pub async fn stop_worker(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(pid): Path<u32>,
    Form(form): Form<CsrfForm>,
) -> Response<Body> {
    let (id, _, caller) = posted!(console, headers, form.csrf);
    let tenant = (caller.scope != Scope::Admin).then_some(caller.user_id.as_str());
    let notice = match console.controller.engine.stop_worker(pid, tenant).await {
        fal_engine::WorkerStop::Stopped => format!("worker {pid} stopped"),
        fal_engine::WorkerStop::AfterItsCall => format!("worker {pid} is busy: it stops when its call ends"),
        fal_engine::WorkerStop::NotFound => format!("there is no worker {pid} of yours (it may have stopped already)"),
    };
    tracing::info!(by = %caller.user_id, pid, %notice, "dashboard: stop a worker");
    console.sessions.notify(&id, notice);
    Redirect::to("/workers").into_response()
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

// --- runs ------------------------------------------------------------------------------------------------------

struct RunLine {
    id: String,
    user: String,
    kind: String,
    what: String,
    machine_type: String,
    queued: String,
    duration: String,
    outcome: String,
    error: String,
}

#[derive(Template)]
#[template(path = "dashboard/runs.html")]
struct RunsPage {
    nav: Nav,
    runs: Vec<RunLine>,
    filters: RunFilters,
    outcomes: [&'static str; 5],
    windows: [(&'static str, &'static str); 4],
    /// The query string of the next page, if there is one.
    next: Option<String>,
}

#[derive(Deserialize, Default, Clone)]
pub struct RunFilters {
    #[serde(default)]
    user: String,
    /// A function or app (alias or revision).
    #[serde(default)]
    function: String,
    #[serde(default)]
    outcome: String,
    /// `1h`, `24h`, `7d` or empty (any time).
    #[serde(default)]
    since: String,
    #[serde(default)]
    before: String,
}

fn window(since: &str) -> Option<Duration> {
    let hours = match since {
        "1h" => 1,
        "24h" => 24,
        "7d" => 24 * 7,
        _ => return None,
    };
    Some(Duration::from_secs(hours * 3600))
}

fn run_line(row: crate::runs::RunRow) -> RunLine {
    let duration = match row.finished_ms {
        Some(end) => format!("{:.3} s", (end - row.queued_ms).max(0) as f64 / 1000.0),
        None => "running".into(),
    };
    let what = [&row.function, &row.app].into_iter().find(|s| !s.is_empty()).cloned().unwrap_or_default();
    RunLine {
        id: row.id,
        user: row.user_id,
        kind: row.kind,
        what,
        machine_type: row.machine_type,
        queued: clock(row.queued_ms),
        duration,
        outcome: row.outcome,
        error: row.error.chars().take(200).collect(),
    }
}

pub async fn runs(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Query(filters): Query<RunFilters>,
) -> Response<Body> {
    let (_, session, caller) = signed_in!(console, headers);
    let user = match caller.scope {
        Scope::Admin => Some(filters.user.clone()).filter(|u| !u.is_empty()),
        _ => Some(caller.user_id.clone()),
    };
    let query = RunQuery {
        user,
        app: Some(filters.function.clone()).filter(|f| !f.is_empty()),
        outcome: Some(filters.outcome.clone()).filter(|o| !o.is_empty()),
        since_ms: window(&filters.since).map(|w| now_ms() - w.as_millis() as i64),
        before: parse_cursor(&filters.before),
        limit: RUNS_PER_PAGE + 1,
        ..Default::default()
    };
    let store = console.controller.runs.store.clone();
    let listed = tokio::task::spawn_blocking(move || store.list(&query).map_err(|e| e.to_string())).await;
    let mut rows = match listed.unwrap_or_else(|e| Err(e.to_string())) {
        Ok(rows) => rows,
        Err(error) => return error_page(StatusCode::INTERNAL_SERVER_ERROR, Nav::new(&caller, &session, "runs"), error),
    };
    let next = (rows.len() > RUNS_PER_PAGE).then(|| {
        rows.truncate(RUNS_PER_PAGE);
        let cursor = rows.last().map(|r| r.cursor()).unwrap_or_default();
        format!(
            "user={}&function={}&outcome={}&since={}&before={}",
            urlencode(&filters.user),
            urlencode(&filters.function),
            urlencode(&filters.outcome),
            urlencode(&filters.since),
            urlencode(&cursor)
        )
    });
    render(RunsPage {
        nav: Nav::new(&caller, &session, "runs"),
        runs: rows.into_iter().map(run_line).collect(),
        filters,
        outcomes: ["success", "error", "timeout", "cancelled", "running"],
        windows: [("", "any time"), ("1h", "last hour"), ("24h", "last 24 hours"), ("7d", "last 7 days")],
        next,
    })
}

struct LogLine {
    time: String,
    source: String,
    message: String,
}

#[derive(Template)]
#[template(path = "dashboard/run.html")]
struct RunPage {
    nav: Nav,
    run: RunLine,
    worker: String,
    live: bool,
    logs: Vec<LogLine>,
    truncated: bool,
}

fn log_line(value: &serde_json::Value) -> LogLine {
    let text = |key: &str| value.get(key).and_then(|v| v.as_str()).unwrap_or_default().to_string();
    LogLine { time: text("timestamp"), source: text("source"), message: text("message") }
}

/// Run `id` as stored, if the caller may see it, with its logs (JSON).
async fn stored_run(console: &Console, caller: &Caller, id: &str) -> Option<(crate::runs::RunRow, String)> {
    let (store, wanted) = (console.controller.runs.store.clone(), id.to_string());
    let found = tokio::task::spawn_blocking(move || store.logs(&wanted)).await.ok().and_then(Result::ok).flatten();
    found.filter(|(row, _)| caller.scope == Scope::Admin || row.user_id == caller.user_id)
}

pub async fn run(State(console): State<Arc<Console>>, headers: HeaderMap, Path(id): Path<String>) -> Response<Body> {
    let (_, session, caller) = signed_in!(console, headers);
    let nav = Nav::new(&caller, &session, "runs");
    let Some((row, stored)) = stored_run(&console, &caller, &id).await else {
        return error_page(StatusCode::NOT_FOUND, nav, format!("there is no run {id} of yours"));
    };
    // A run going on shows the lines it has printed so far, and the page's script follows the rest from there. One
    // that has just ended may not be stored as ended yet (the history writes every few ms): its events give it.
    let (live, logs) = match console.controller.runs.peek(&row.id) {
        Some((_, lines, ended)) => (ended.is_none(), lines),
        None if row.finished_ms.is_none() => (true, Vec::new()),
        None => (false, serde_json::from_str(&stored).unwrap_or_default()),
    };
    let (worker, truncated) = (row.worker.clone(), row.logs_truncated);
    render(RunPage { nav, run: run_line(row), worker, live, logs: logs.iter().map(log_line).collect(), truncated })
}

fn event(name: &str, data: &str) -> Result<Bytes, std::convert::Infallible> {
    Ok(Bytes::from(format!("event: {name}\ndata: {data}\n\n")))
}

/// `GET /runs/{id}/events`: a run's log lines as server-sent events (`line` events with fal's log JSON, from its
/// first line), followed live while it goes on, then one `end` event with its outcome (`lagged` says how many lines
/// a watcher too slow to keep up missed).
pub async fn run_events(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response<Body> {
    let (_, session, caller) = signed_in!(console, headers);
    let theirs = |owner: &str| caller.scope == Scope::Admin || owner == caller.user_id;
    let mine = console.controller.runs.peek(&id).is_some_and(|(owner, _, _)| theirs(&owner));
    let watched = if mine { console.controller.runs.watch(&id) } else { None };
    let body = match watched {
        Some((_, (lines, ended, receiver))) => {
            let earlier = futures_util::stream::iter(lines).map(|line| event("line", &line.to_string()));
            let later = match ended {
                Some(outcome) => futures_util::stream::iter(vec![event("end", outcome)]).boxed(),
                None => follow(receiver).boxed(),
            };
            Body::from_stream(earlier.chain(later))
        }
        None => match ended_run(&console, &caller, &id).await {
            Some((row, stored)) => {
                let lines: Vec<serde_json::Value> = serde_json::from_str(&stored).unwrap_or_default();
                let mut events: Vec<_> = lines.iter().map(|line| event("line", &line.to_string())).collect();
                events.push(event("end", &row.outcome));
                Body::from_stream(futures_util::stream::iter(events))
            }
            None => {
                let nav = Nav::new(&caller, &session, "runs");
                return error_page(StatusCode::NOT_FOUND, nav, format!("there is no run {id} of yours that ended"));
            }
        },
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// How long the events of a run no longer live wait for its end to be stored (the history writes in batches).
const STORED_END_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Run `id` as stored once its end is, waiting [`STORED_END_WAIT`] for it.
async fn ended_run(console: &Console, caller: &Caller, id: &str) -> Option<(crate::runs::RunRow, String)> {
    let deadline = tokio::time::Instant::now() + STORED_END_WAIT;
    loop {
        match stored_run(console, caller, id).await {
            Some(found) if found.0.finished_ms.is_some() => return Some(found),
            // Not the caller's, or not there at all: no waiting.
            None => return None,
            Some(_) if tokio::time::Instant::now() >= deadline => return None,
            Some(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

/// What follows for a watcher of a live run: its lines, until its end.
fn follow(
    receiver: tokio::sync::broadcast::Receiver<LiveLog>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
    tokio_stream::wrappers::BroadcastStream::new(receiver)
        .scan(false, |ended, item| {
            let text = match item {
                _ if *ended => return std::future::ready(None),
                Ok(LiveLog::Line(line)) => format!("event: line\ndata: {line}\n\n"),
                Ok(LiveLog::Ended(outcome)) => {
                    *ended = true;
                    format!("event: end\ndata: {outcome}\n\n")
                }
                Err(BroadcastStreamRecvError::Lagged(n)) => format!("event: lagged\ndata: {n}\n\n"),
            };
            std::future::ready(Some(text))
        })
        .map(|text| Ok(Bytes::from(text)))
}

// --- apps ------------------------------------------------------------------------------------------------------

struct AppRow {
    user: String,
    alias: String,
    revision: String,
    function: String,
    auth: &'static str,
    machine_type: String,
    running: u32,
    starting: u32,
    max: u32,
    in_flight: u32,
    waiting: u64,
    rate: String,
    latency: String,
}

#[derive(Template)]
#[template(path = "dashboard/apps.html")]
struct AppsPage {
    nav: Nav,
    apps: Vec<AppRow>,
}

/// The window request rate and latency are measured over.
const TRAFFIC_WINDOW: Duration = Duration::from_secs(300);

pub async fn apps(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response<Body> {
    let (_, session, caller) = signed_in!(console, headers);
    let nav = Nav::new(&caller, &session, "apps");
    let aliases = match console.controller.apps.aliases(&caller).await {
        Ok(aliases) => aliases,
        Err(error) => return error_page(StatusCode::INTERNAL_SERVER_ERROR, nav, error.to_string()),
    };
    let (runs, queue) = (console.controller.runs.store.clone(), console.queue.clone());
    let since = now_ms() - TRAFFIC_WINDOW.as_millis() as i64;
    let apps = tokio::task::spawn_blocking(move || {
        aliases
            .into_iter()
            .map(|a| {
                let r = &a.revision;
                let (count, mean) = runs.app_traffic(&r.user_id, r.name(), since).unwrap_or((0, None));
                let queued = queue.depth(Some(&r.id)).unwrap_or(0);
                AppRow {
                    user: r.user_id.clone(),
                    alias: r.name().to_string(),
                    revision: r.id.clone(),
                    function: r.function_name.clone(),
                    auth: match r.auth {
                        crate::apps::AuthMode::Private => "private",
                        crate::apps::AuthMode::Public => "public",
                        crate::apps::AuthMode::Shared => "shared",
                    },
                    machine_type: r.machine_type.clone(),
                    running: a.replicas.ready,
                    starting: a.replicas.starting,
                    max: r.max_concurrency,
                    in_flight: a.replicas.in_flight,
                    waiting: u64::from(a.replicas.waiting) + queued,
                    rate: format!("{:.2}/s", count as f64 / TRAFFIC_WINDOW.as_secs_f64()),
                    latency: mean.map(|ms| format!("{:.0} ms", ms)).unwrap_or_else(|| "-".into()),
                }
            })
            .collect()
    })
    .await
    .unwrap_or_default();
    render(AppsPage { nav, apps })
}

// --- schedules -------------------------------------------------------------------------------------------------

struct ScheduleRow {
    id: String,
    user: String,
    function: String,
    cron: String,
    machine_type: String,
    active: bool,
    last_due: String,
}

#[derive(Template)]
#[template(path = "dashboard/schedules.html")]
struct SchedulesPage {
    nav: Nav,
    schedules: Vec<ScheduleRow>,
    activations: Vec<RunLine>,
}

pub async fn schedules(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response<Body> {
    let (_, session, caller) = signed_in!(console, headers);
    let user = (caller.scope != Scope::Admin).then(|| caller.user_id.clone());
    let (store, runs) = (console.controller.schedules.store.clone(), console.controller.runs.store.clone());
    let (schedules, activations) = tokio::task::spawn_blocking(move || {
        let schedules = store.list(user.as_deref()).unwrap_or_default();
        let query = RunQuery { user, kind: Some("activation"), limit: RUNS_PER_PAGE, ..Default::default() };
        let activations = runs.list(&query).unwrap_or_default();
        (schedules, activations)
    })
    .await
    .unwrap_or_default();
    let schedules = schedules
        .into_iter()
        .map(|s| ScheduleRow {
            id: s.id,
            user: s.user_id,
            function: s.function_name,
            cron: s.cron,
            machine_type: s.machine_type,
            active: s.active,
            last_due: if s.last_due_ms > 0 { clock(s.last_due_ms) } else { "-".into() },
        })
        .collect();
    render(SchedulesPage {
        nav: Nav::new(&caller, &session, "schedules"),
        schedules,
        activations: activations.into_iter().map(run_line).collect(),
    })
}

// --- environments ----------------------------------------------------------------------------------------------

struct EnvironmentRow {
    user: String,
    key: String,
    size: String,
    last_used: String,
    in_use: bool,
    packages: String,
}

#[derive(Template)]
#[template(path = "dashboard/environments.html")]
struct EnvironmentsPage {
    nav: Nav,
    environments: Vec<EnvironmentRow>,
    notice: Option<String>,
}

/// The distributions installed in an environment (`name==version`, from its `*.dist-info` directories).
fn installed(env_dir: &std::path::Path) -> String {
    let mut found = Vec::new();
    let Ok(lib) = std::fs::read_dir(env_dir.join("lib")) else { return String::new() };
    for python in lib.flatten() {
        let Ok(entries) = std::fs::read_dir(python.path().join("site-packages")) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".dist-info") {
                if let Some((name, version)) = stem.rsplit_once('-') {
                    found.push(format!("{name}=={version}"));
                }
            }
        }
    }
    found.sort();
    found.join(", ")
}

pub async fn environments(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response<Body> {
    let (id, session, caller) = signed_in!(console, headers);
    let nav = Nav::new(&caller, &session, "environments");
    let listed = match console.controller.engine.environments().await {
        Ok(listed) => listed,
        Err(error) => return error_page(StatusCode::INTERNAL_SERVER_ERROR, nav, error.to_string()),
    };
    let envs_dir = console.environments_dir.join("envs");
    let admin = caller.scope == Scope::Admin;
    let user = caller.user_id.clone();
    let environments = tokio::task::spawn_blocking(move || {
        listed
            .into_iter()
            .filter(|e| !e.is_shared() && (admin || e.tenant == user))
            .map(|e| EnvironmentRow {
                packages: installed(&envs_dir.join(&e.tenant).join(&e.key)),
                user: e.tenant,
                key: e.key,
                size: bytes(e.bytes),
                last_used: format!("{} ago", ago(e.last_used)),
                in_use: e.in_use,
            })
            .collect()
    })
    .await
    .unwrap_or_default();
    let notice = console.sessions.take_notice(&id);
    render(EnvironmentsPage { nav, environments, notice })
}

pub async fn remove_environment(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path((user, key)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Response<Body> {
    let (id, _, caller) = posted!(console, headers, form.csrf);
    let notice = if caller.scope != Scope::Admin && user != caller.user_id {
        format!("there is no environment {user}/{key} of yours")
    } else {
        match console.controller.engine.remove_environment(&user, &key).await {
            Ok(removal) => format!("removed {user}/{key} ({})", bytes(removal.environment.bytes)),
            Err(error) => error.to_string(),
        }
    };
    console.sessions.notify(&id, notice);
    Redirect::to("/environments").into_response()
}

// --- keys and secrets ------------------------------------------------------------------------------------------

struct KeyRow {
    id: String,
    user: String,
    scope: &'static str,
    alias: String,
    created: String,
    current: bool,
}

#[derive(Template)]
#[template(path = "dashboard/keys.html")]
struct KeysPage {
    nav: Nav,
    keys: Vec<KeyRow>,
    /// A key just made: its id and secret, shown this once.
    created: Option<(String, String)>,
    error: Option<String>,
}

async fn keys_page(
    console: &Console,
    caller: &Caller,
    session: &Session,
    created: Option<(String, String)>,
    error: Option<String>,
) -> Response<Body> {
    let user = (caller.scope != Scope::Admin).then(|| caller.user_id.clone());
    let listed = console.keys.blocking(move |store| store.list_keys(user.as_deref())).await.unwrap_or_default();
    let keys = listed
        .into_iter()
        .map(|k| KeyRow {
            current: k.key_id == caller.key_id,
            id: k.key_id,
            user: k.user_id,
            scope: match k.scope {
                Scope::Admin => "admin",
                Scope::Api => "api",
            },
            alias: k.alias,
            created: clock(k.created_at * 1000),
        })
        .collect();
    let mut response = render(KeysPage { nav: Nav::new(caller, session, "keys"), keys, created, error: error.clone() });
    if error.is_some() {
        *response.status_mut() = StatusCode::BAD_REQUEST;
    }
    response
}

pub async fn keys(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response<Body> {
    let (_, session, caller) = signed_in!(console, headers);
    keys_page(&console, &caller, &session, None, None).await
}

#[derive(Deserialize)]
pub struct NewKey {
    csrf: String,
    #[serde(default)]
    alias: String,
    /// For an admin: whose key (default: their own) and whether it is an admin key.
    #[serde(default)]
    user: String,
    #[serde(default)]
    admin: Option<String>,
}

pub async fn create_key(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Form(form): Form<NewKey>,
) -> Response<Body> {
    let (_, session, caller) = posted!(console, headers, form.csrf);
    let is_admin = caller.scope == Scope::Admin;
    let user = Some(form.user.trim().to_string())
        .filter(|u| !u.is_empty() && is_admin)
        .unwrap_or_else(|| caller.user_id.clone());
    let scope = if is_admin && form.admin.is_some() { Scope::Admin } else { Scope::Api };
    if !user.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        let error = format!("{user:?} is not a user name: letters, digits, '-' and '_' only");
        return keys_page(&console, &caller, &session, None, Some(error)).await;
    }
    let max = console.controller.limits.max_keys_per_user;
    let (owner, alias) = (user.clone(), form.alias.trim().to_string());
    match console.keys.blocking(move |store| store.create_key_within(&owner, scope, &alias, max)).await {
        Ok((key, secret)) => {
            tracing::info!(by = %caller.user_id, user = %user, key_id = %key.key_id, "key created (dashboard)");
            keys_page(&console, &caller, &session, Some((key.key_id, secret)), None).await
        }
        Err(error) => keys_page(&console, &caller, &session, None, Some(error.to_string())).await,
    }
}

pub async fn revoke_key(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response<Body> {
    let (_, session, caller) = posted!(console, headers, form.csrf);
    let (by, revoked) = (caller.clone(), id.clone());
    match console.keys.blocking(move |store| store.revoke(&by, &revoked)).await {
        Ok(()) => {
            tracing::info!(by = %caller.user_id, key_id = %id, "key revoked (dashboard)");
            Redirect::to("/keys").into_response()
        }
        Err(error) => keys_page(&console, &caller, &session, None, Some(error.to_string())).await,
    }
}

struct SecretRow {
    user: String,
    name: String,
    set: String,
}

#[derive(Template)]
#[template(path = "dashboard/secrets.html")]
struct SecretsPage {
    nav: Nav,
    secrets: Vec<SecretRow>,
}

pub async fn secrets(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response<Body> {
    let (_, session, caller) = signed_in!(console, headers);
    let nav = Nav::new(&caller, &session, "secrets");
    let listed = match console.controller.secrets.list(&caller, Default::default()).await {
        Ok(listed) => listed,
        Err(error) => return error_page(StatusCode::INTERNAL_SERVER_ERROR, nav, error.to_string()),
    };
    let secrets = listed
        .secrets
        .into_iter()
        .map(|s| SecretRow {
            user: s.user_id,
            name: s.name,
            set: s.created_time.map(|t| clock(t.seconds * 1000)).unwrap_or_default(),
        })
        .collect();
    render(SecretsPage { nav, secrets })
}

// --- static ----------------------------------------------------------------------------------------------------

pub async fn css() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css")], include_str!("../../static/dashboard.css"))
}

pub async fn js() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript")], include_str!("../../static/dashboard.js"))
}
