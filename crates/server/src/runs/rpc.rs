//! `ListRuns` and `GetRunLogs` (extensions): a user sees their own runs, an admin everyone's.

use fal_proto::controller::{GetRunLogsRequest, GetRunLogsResult, ListRunsRequest, ListRunsResult};
use tonic::Status;

use super::store::{parse_cursor, RunQuery};
use super::{proto_logs, run_info, Runs};
use crate::service::invalid;
use crate::store::{Caller, Scope};

const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 1000;

fn internal(error: impl std::fmt::Display) -> Status {
    Status::internal(error.to_string())
}

pub async fn list(runs: &Runs, caller: &Caller, request: ListRunsRequest) -> Result<ListRunsResult, Status> {
    let limit = match request.limit {
        0 => DEFAULT_LIMIT,
        n if n > 0 && n as usize <= MAX_LIMIT => n as usize,
        n => return Err(invalid(format!("limit {n} is out of range: from 1 to {MAX_LIMIT}"))),
    };
    let user = match (caller.scope, request.user_id) {
        (Scope::Admin, user) => user,
        (_, Some(user)) if user != caller.user_id => {
            return Err(Status::permission_denied(format!(
                "only an admin sees another user's runs; key {} is user {:?}'s",
                caller.key_id, caller.user_id
            )))
        }
        _ => Some(caller.user_id.clone()),
    };
    let before = match request.before.filter(|b| !b.is_empty()) {
        None => None,
        Some(cursor) => Some(parse_cursor(&cursor).ok_or_else(|| {
            invalid(format!("before {cursor:?} is not a cursor: pass the next_cursor of the previous page"))
        })?),
    };
    let query = RunQuery {
        user,
        app: request.app.filter(|a| !a.is_empty()),
        failed_only: request.failed_only,
        before,
        limit,
        ..Default::default()
    };
    let store = runs.store.clone();
    let rows = tokio::task::spawn_blocking(move || store.list(&query)).await.map_err(internal)?.map_err(internal)?;
    let next_cursor = (rows.len() == limit).then(|| rows.last().map(|r| r.cursor())).flatten();
    Ok(ListRunsResult { runs: rows.iter().map(run_info).collect(), next_cursor })
}

pub async fn logs(runs: &Runs, caller: &Caller, request: GetRunLogsRequest) -> Result<GetRunLogsResult, Status> {
    let store = runs.store.clone();
    let id = request.run_id.clone();
    let found = tokio::task::spawn_blocking(move || store.logs(&id)).await.map_err(internal)?.map_err(internal)?;
    match found {
        Some((row, logs)) if caller.scope == Scope::Admin || row.user_id == caller.user_id => {
            Ok(GetRunLogsResult { run: Some(run_info(&row)), logs: proto_logs(&logs) })
        }
        // Another user's run reads as no run: its id tells nothing.
        _ => Err(Status::not_found(format!(
            "no run {:?} of yours (runs are kept [runs] retention_days); `fal-serverless runs list` lists them",
            request.run_id
        ))),
    }
}
