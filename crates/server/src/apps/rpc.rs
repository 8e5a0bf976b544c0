//! The app RPCs of `IsolateController` (`RegisterApplication`, `ListAliases`, `GetLogs`, `DeleteAlias`): what they
//! ask of [`Apps`], and their answers in the wire's shapes (those the 0.6.41 client reads, and our extensions).

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use fal_engine::{LogLine, LogSink};
use fal_proto::controller::{
    AliasInfo, DeleteAliasResult, GetLogsRequest, GetLogsResult, ListAliasesResult, RegisterApplicationRequest,
    RegisterApplicationResult, RegisterApplicationResultType,
};
use fal_proto::Log;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::Status;

use super::logs::{AppLogLine, AppLogs};
use super::{AppError, Apps, Revision};
use crate::service::{error_status, invalid, log_message};
use crate::store::Caller;

/// Lines `GetLogs` answers with when its filter names no number.
const DEFAULT_LINES: usize = 100;

pub type LogStream = Pin<Box<dyn Stream<Item = Result<GetLogsResult, Status>> + Send>>;
pub type RegisterStream = Pin<Box<dyn Stream<Item = Result<RegisterApplicationResult, Status>> + Send>>;

pub fn app_status(error: AppError) -> Status {
    match error {
        AppError::Invalid(message) => invalid(message),
        AppError::NotFound { .. } => Status::not_found(error.to_string()),
        AppError::Unavailable(_) => error_status(tonic::Code::FailedPrecondition, "invalid", error.to_string()),
        AppError::Store(_) | AppError::Keys(_) => Status::internal(error.to_string()),
    }
}

pub async fn register(
    apps: &Apps,
    caller: &Caller,
    request: RegisterApplicationRequest,
) -> Result<RegisterStream, Status> {
    let lines = Arc::new(Mutex::new(Vec::<LogLine>::new()));
    let sink = {
        let lines = lines.clone();
        LogSink::new(move |line| lines.lock().unwrap_or_else(|e| e.into_inner()).push(line))
    };
    let revision = apps.register(caller, request, &sink).await.map_err(app_status)?;
    let logs: Vec<Log> =
        std::mem::take(&mut *lines.lock().unwrap_or_else(|e| e.into_inner())).into_iter().map(log_message).collect();
    let result = RegisterApplicationResult {
        logs,
        result: Some(RegisterApplicationResultType { application_id: revision.id, user_id: revision.user_id }),
    };
    Ok(Box::pin(tokio_stream::once(Ok(result))))
}

pub async fn list(apps: &Apps, caller: &Caller) -> Result<ListAliasesResult, Status> {
    let aliases = apps.aliases(caller).await.map_err(app_status)?;
    let aliases = aliases
        .into_iter()
        .map(|state| {
            let r = state.revision;
            AliasInfo {
                alias: r.alias.clone().unwrap_or_default(),
                revision: r.id,
                auth_mode: r.auth as i32,
                max_concurrency: r.max_concurrency as i32,
                user_id: r.user_id,
                min_concurrency: r.min_concurrency as i32,
                max_multiplexing: r.max_multiplexing as i32,
                machine_type: r.machine_type,
                replicas: (state.replicas.ready + state.replicas.starting) as i32,
                created_at: Some(prost_types::Timestamp { seconds: r.created_at, nanos: 0 }),
            }
        })
        .collect();
    Ok(ListAliasesResult { aliases })
}

pub async fn delete(apps: &Apps, caller: &Caller, alias: &str) -> Result<DeleteAliasResult, Status> {
    let revision = apps.delete(caller, alias).await.map_err(app_status)?;
    Ok(DeleteAliasResult { revision })
}

/// The app a `GetLogs` filter names: its `alias` (ours), or its `url`, `.../apps/<user>/<app>[/...]` or the
/// original's `<user>-<alias>.<gateway host>`. `None`: every alias of the caller.
fn named_app(caller: &Caller, alias: Option<&str>, url: Option<&str>) -> Result<Option<(String, String)>, Status> {
    if let Some(alias) = alias.filter(|a| !a.is_empty()) {
        return Ok(Some((caller.user_id.clone(), alias.to_string())));
    }
    let Some(url) = url.filter(|u| !u.is_empty()) else { return Ok(None) };
    if let Some((_, path)) = url.split_once("/apps/") {
        let mut parts = path.split('/');
        if let (Some(user), Some(app)) = (parts.next(), parts.next()) {
            if !user.is_empty() && !app.is_empty() {
                return Ok(Some((user.to_string(), app.to_string())));
            }
        }
    }
    let host = url.split("://").last().unwrap_or(url);
    let label = host.split(['.', '/', ':']).next().unwrap_or_default();
    if let Some(app) = label.strip_prefix(&format!("{}-", caller.user_id)).filter(|a| !a.is_empty()) {
        return Ok(Some((caller.user_id.clone(), app.to_string())));
    }
    Err(invalid(format!(
        "the URL {url:?} names no app of yours: give an app's URL (`.../apps/<user>/<alias>`) or its alias"
    )))
}

/// A line as a `Log`: the server's own notes about an app (registered, a replica ready or stopped) are news, not
/// warnings as they are in a call's logs.
fn app_log_message(line: LogLine) -> Log {
    let engine = line.source == fal_engine::LogSource::Engine;
    let mut message = log_message(line);
    if engine {
        message.level = fal_proto::LogLevel::Info as i32;
    }
    message
}

fn log_result(app: &str, line: AppLogLine) -> GetLogsResult {
    let request_id = line.request_id.clone();
    let mut entry = app_log_message(LogLine { source: line.source, line: line.line });
    entry.timestamp = Some(prost_types::Timestamp::from(line.time));
    GetLogsResult { log_entry: Some(entry), app: app.to_string(), request_id }
}

pub async fn logs(apps: &Apps, caller: &Caller, request: GetLogsRequest) -> Result<LogStream, Status> {
    let filter = request.filter.unwrap_or_default();
    let lines = match filter.lines {
        None => DEFAULT_LINES,
        Some(n) if n >= 0 => n as usize,
        Some(n) => return Err(invalid(format!("lines {n} must not be negative"))),
    };
    let revisions: Vec<Revision> = match named_app(caller, filter.alias.as_deref(), filter.url.as_deref())? {
        Some((user, app)) => {
            if user != caller.user_id && caller.scope != crate::store::Scope::Admin {
                return Err(Status::permission_denied(format!(
                    "the app {user}/{app} is not yours: only its owner (or an admin) reads its logs"
                )));
            }
            vec![apps.resolve(&user, &app).await.map_err(app_status)?]
        }
        None => apps.aliases(caller).await.map_err(app_status)?.into_iter().map(|a| a.revision).collect(),
    };
    let mut tail = Vec::new();
    let (sender, receiver) = mpsc::unbounded_channel();
    for revision in &revisions {
        let name = revision.name().to_string();
        let logs: Arc<AppLogs> = apps.logs(revision);
        let (kept, mut live) = logs.tail(lines);
        tail.extend(kept.into_iter().map(|line| (name.clone(), line)));
        if request.follow == Some(true) {
            let sender = sender.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        line = live.recv() => match line {
                            Ok(line) => if sender.send(Ok(log_result(&name, line))).is_err() { return },
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                                let note = AppLogLine {
                                    time: std::time::SystemTime::now(),
                                    source: fal_engine::LogSource::Engine,
                                    line: format!("... {missed} lines were printed faster than they were read"),
                                    request_id: String::new(),
                                };
                                if sender.send(Ok(log_result(&name, note))).is_err() { return }
                            }
                            Err(_) => return,
                        },
                        () = sender.closed() => return,
                    }
                }
            });
        }
    }
    drop(sender);
    tail.sort_by_key(|(_, line)| line.time);
    let skip = tail.len().saturating_sub(lines);
    let first: Vec<_> = tail.into_iter().skip(skip).map(|(name, line)| Ok(log_result(&name, line))).collect();
    let live = tokio_stream::wrappers::UnboundedReceiverStream::new(receiver);
    Ok(Box::pin(tokio_stream::StreamExt::chain(tokio_stream::iter(first), live)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Scope;

    #[test]
    fn a_logs_filter_names_an_app_by_alias_or_by_either_url() {
        let caller = Caller { user_id: "alice".into(), key_id: "k".into(), scope: Scope::Api, depth: 0 };
        let app = |user: &str, app: &str| Some((user.to_string(), app.to_string()));
        assert_eq!(named_app(&caller, Some("web"), None).unwrap(), app("alice", "web"));
        assert_eq!(named_app(&caller, None, Some("https://h:1/apps/bob/x/y")).unwrap(), app("bob", "x"));
        assert_eq!(named_app(&caller, None, Some("alice-my-app.gateway.example")).unwrap(), app("alice", "my-app"));
        assert_eq!(named_app(&caller, None, None).unwrap(), None);
        assert!(named_app(&caller, None, Some("elsewhere.example")).is_err());
    }
}
