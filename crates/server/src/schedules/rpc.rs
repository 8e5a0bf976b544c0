//! The schedule RPCs of isolate-proto 0.0.37 (`RegisterCron`, `ListCrons`, `ListActivations`, `GetActivationLogs`,
//! `CancelCron`), in the shapes the 0.6.41 client reads. A user sees and cancels their own schedules, an admin
//! everyone's.

use fal_proto::controller::{
    ActivationResultType, CancelCronRequest, CancelCronResult, CronResultType, GetActivationLogsRequest,
    GetActivationLogsResult, ListActivationsRequest, ListActivationsResult, ListCronsResult, RegisterCronRequest,
    RegisterCronResult, RegisterCronResultType,
};
use tonic::Status;

use super::{parse, CronRow, ScheduleStore, ScheduleStoreError, Schedules};
use crate::apps::AppError;
use crate::runs::{now_ms, proto_logs, timestamp};
use crate::service::invalid;
use crate::store::{Caller, Scope};

/// Activations `ListActivations` answers with at most, newest first.
const MAX_ACTIVATIONS: usize = 1000;

fn internal(error: impl std::fmt::Display) -> Status {
    Status::internal(error.to_string())
}

async fn blocking<T: Send + 'static>(
    schedules: &Schedules,
    work: impl FnOnce(&ScheduleStore) -> Result<T, ScheduleStoreError> + Send + 'static,
) -> Result<T, Status> {
    crate::db::blocking(&schedules.store, work).await.map_err(internal)
}

fn not_found(cron_id: &str) -> Status {
    Status::not_found(format!(
        "no schedule {cron_id:?} of yours; `fal-serverless cron list` lists your schedules and their ids"
    ))
}

/// Cron `id`, if `caller` may see it.
async fn owned(schedules: &Schedules, caller: &Caller, id: &str) -> Result<CronRow, Status> {
    let key = id.to_string();
    match blocking(schedules, move |store| store.get(&key)).await? {
        Some(row) if caller.scope == Scope::Admin || row.user_id == caller.user_id => Ok(row),
        _ => Err(not_found(id)),
    }
}

pub async fn register(
    schedules: &Schedules,
    caller: &Caller,
    request: RegisterCronRequest,
) -> Result<RegisterCronResult, Status> {
    let cron = parse(request.cron.trim()).map_err(invalid)?;
    let revision = match schedules.apps.resolve(&caller.user_id, &request.application_id).await {
        Ok(revision) => revision,
        Err(AppError::NotFound { .. }) => {
            return Err(Status::not_found(format!(
                "user {:?} has no registered function {:?}: `fal-serverless function schedule CRON FILE FUNCTION` \
                 registers it and schedules it",
                caller.user_id, request.application_id
            )))
        }
        Err(error) => return Err(internal(error)),
    };
    if revision.serves {
        return Err(invalid(format!(
            "{} is a web endpoint (it serves on a port and never returns); a schedule runs a plain function once per \
             time. Schedule a function without serve=True (it may call the endpoint)",
            revision.name()
        )));
    }
    let max = schedules.config.max_per_user;
    let now = now_ms();
    let row = CronRow {
        id: uuid::Uuid::new_v4().to_string(),
        user_id: caller.user_id.clone(),
        revision: revision.id.clone(),
        function_name: revision.function_name.clone(),
        machine_type: revision.machine_type.clone(),
        cron: request.cron.trim().to_string(),
        created_ms: now,
        last_due_ms: now,
        active: true,
    };
    let stored = row.clone();
    if !blocking(schedules, move |store| store.insert_within(&stored, max)).await? {
        return Err(Status::resource_exhausted(format!(
            "user {:?} has {max} active schedules, the most this server allows ([schedules] max_per_user); cancel \
             one with `fal-serverless cron cancel CRON_ID`",
            caller.user_id
        )));
    }
    tracing::info!(user = %row.user_id, cron = %row.id, expression = %row.cron, revision = %row.revision,
        "schedule registered");
    let cron_id = row.id.clone();
    schedules.add(row, cron, true);
    Ok(RegisterCronResult { result: Some(RegisterCronResultType { cron_id }) })
}

pub async fn list(schedules: &Schedules, caller: &Caller) -> Result<ListCronsResult, Status> {
    let user = (caller.scope != Scope::Admin).then(|| caller.user_id.clone());
    let rows = blocking(schedules, move |store| store.list(user.as_deref())).await?;
    let crons = rows
        .into_iter()
        .map(|row| {
            let next = if row.active {
                schedules.next_run(&row.id).or_else(|| {
                    parse(&row.cron).ok().and_then(|c| c.find_next_occurrence(&chrono::Utc::now(), false).ok())
                })
            } else {
                None
            };
            CronResultType {
                cron_string: row.cron,
                cron_id: row.id,
                next_run: next.map(|t| timestamp(t.timestamp_millis())),
                is_active: row.active,
                application_id: row.revision,
                user_id: row.user_id,
                created_at: Some(timestamp(row.created_ms)),
                function_name: row.function_name,
            }
        })
        .collect();
    Ok(ListCronsResult { crons })
}

pub async fn activations(
    schedules: &Schedules,
    caller: &Caller,
    request: ListActivationsRequest,
) -> Result<ListActivationsResult, Status> {
    let row = owned(schedules, caller, &request.cron_id).await?;
    let rows = blocking(schedules, move |store| store.activations(&row.id, MAX_ACTIVATIONS)).await?;
    let activations = rows
        .into_iter()
        .map(|a| ActivationResultType {
            activation_id: a.id,
            started_at: a.started_ms.map(timestamp),
            finished_at: a.finished_ms.map(timestamp),
            scheduled_at: Some(timestamp(a.due_ms)),
            outcome: a.outcome,
            error_kind: a.error_kind,
            error: a.error,
        })
        .collect();
    Ok(ListActivationsResult { activations })
}

pub async fn logs(
    schedules: &Schedules,
    caller: &Caller,
    request: GetActivationLogsRequest,
) -> Result<GetActivationLogsResult, Status> {
    let row = owned(schedules, caller, &request.cron_id).await?;
    let id = request.activation_id.clone();
    match blocking(schedules, move |store| store.activation_logs(&row.id, &id)).await? {
        Some(logs) => Ok(GetActivationLogsResult { logs: proto_logs(&logs) }),
        None => Err(Status::not_found(format!(
            "schedule {:?} has no activation {:?}; `fal-serverless cron activations {}` lists them",
            request.cron_id, request.activation_id, request.cron_id
        ))),
    }
}

pub async fn cancel(
    schedules: &Schedules,
    caller: &Caller,
    request: CancelCronRequest,
) -> Result<CancelCronResult, Status> {
    let row = owned(schedules, caller, &request.cron_id).await?;
    let id = row.id.clone();
    let cancelled = blocking(schedules, move |store| store.cancel(&id, now_ms())).await?;
    schedules.remove(&row.id);
    if cancelled {
        tracing::info!(by = %caller.user_id, cron = %row.id, "schedule cancelled");
    }
    Ok(CancelCronResult {})
}
