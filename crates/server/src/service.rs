//! `IsolateController`: each RPC authenticates, validates, acts, and maps failures to a `Status` a user can act on.
//!
//! Errors that end a `Run` carry the metadata key `fal-error-kind` (`invalid`, `environment`, `worker-died`,
//! `machine-type-exceeded`, `machine-type-unavailable`, `payload-too-large`, `timeout`, `internal`), so clients can
//! raise the matching exception.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use fal_engine::{
    options, BoxFuture, CallError, CallRequest, Engine, EnvSpec, Granted, Hold, LogBudget, LogLine, LogSink, LogSource,
    MachineType, PythonVersion, Room, Serializer,
};
use fal_proto::controller::hosted_run_status::State;
use fal_proto::controller::isolate_controller_server::IsolateController;
use fal_proto::controller::{
    create_user_key_request, CreateUserKeyRequest, CreateUserKeyResponse, DeleteAliasRequest, DeleteAliasResult,
    GetLogsRequest, HostedRun, HostedRunResult, HostedRunStatus, ListAliasesRequest, ListAliasesResult,
    ListSecretsRequest, ListSecretsResponse, ListUserKeysRequest, ListUserKeysResponse, RegisterApplicationRequest,
    RevokeUserKeyRequest, RevokeUserKeyResponse, SetSecretRequest, SetSecretResponse, UserKeyInfo, WorkerStatus,
    WorkerStatusListRequest, WorkerStatusListResponse,
};
use fal_proto::controller::{
    CancelCronRequest, CancelCronResult, GetActivationLogsRequest, GetActivationLogsResult, GetRunLogsRequest,
    GetRunLogsResult, HostedMap, ListActivationsRequest, ListActivationsResult, ListCronsRequest, ListCronsResult,
    ListRunsRequest, ListRunsResult, MapRequest, RegisterCronRequest, RegisterCronResult,
};
use fal_proto::{EnvironmentDefinition, Log, SerializedObject};
use prost_types::value::Kind;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::activity::Activity;
use crate::admission::Admitted;
use crate::capacity::{Capacity, Crowded};
use crate::config::UserLimits;
use crate::dill;
use crate::secrets::Secrets;
use crate::store::{Caller, Scope, Store, StoreError};

const DEFAULT_KEEP_ALIVE: i32 = 10;
const SERVER_STOPPED: &str = "the server stopped before the call finished (calls get a grace period, and this one ran \
                              past it); its worker was stopped. Call it again once the server is back";

/// A call's timeout when its client names none (an original isolate client never does).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);
pub(crate) const NO_KEY: &str = "no key was sent: set FAL_KEY_ID and FAL_KEY_SECRET, or pass \
                      credentials=CloudKeyCredentials(key_id=..., key_secret=...); an admin makes keys with \
                      `fal-serverless keys create`";

#[derive(Debug, Clone)]
pub struct Controller {
    /// The uids users' jailed processes run as: `.1` of them from `.0`.
    pub uids: (u32, u32),
    pub engine: Engine,
    pub store: Arc<Store>,
    pub capacity: Arc<Capacity>,
    pub activity: Arc<Activity>,
    pub limits: UserLimits,
    /// Becomes true when the server's stop grace is over: calls still running end.
    pub ending: tokio::sync::watch::Receiver<bool>,
    /// Functions deployed as web endpoints.
    pub apps: Arc<crate::apps::Apps>,
    /// The run history every call is recorded in.
    pub runs: Arc<crate::runs::Runs>,
    pub schedules: Arc<crate::schedules::Schedules>,
    /// Users' persistent storage, each user's at /data in their workers.
    pub storage: Arc<crate::storage::Storage>,
    /// How workers reach the server, for the calls their functions make.
    pub nested: Arc<crate::nested::Nested>,
    /// Users' secrets, their workers' environment variables.
    pub secrets: Arc<Secrets>,
}

pub(crate) fn error_status(code: tonic::Code, kind: &'static str, message: impl Into<String>) -> Status {
    let mut metadata = MetadataMap::new();
    metadata.insert("fal-error-kind", tonic::metadata::MetadataValue::from_static(kind));
    Status::with_metadata(code, message, metadata)
}

pub(crate) fn invalid(message: impl Into<String>) -> Status {
    error_status(tonic::Code::InvalidArgument, "invalid", message)
}

pub(crate) fn call_error_status(error: &CallError) -> Status {
    let (code, kind) = call_error_kind(error);
    error_status(code, kind, error.to_string())
}

/// The status code and `fal-error-kind` of a failed call.
pub(crate) fn call_error_kind(error: &CallError) -> (tonic::Code, &'static str) {
    use tonic::Code;
    match error {
        CallError::UnknownMachineType(_) => (Code::InvalidArgument, "invalid"),
        CallError::NoGpu { .. } | CallError::Allocation { .. } => {
            (Code::FailedPrecondition, "machine-type-unavailable")
        }
        CallError::Environment(_) => (Code::FailedPrecondition, "environment"),
        CallError::Spawn(_) => (Code::Internal, "internal"),
        CallError::OutOfMemory { .. } => (Code::ResourceExhausted, "machine-type-exceeded"),
        CallError::WorkerDied { .. } => (Code::Aborted, "worker-died"),
        CallError::PayloadTooLarge { .. } | CallError::ResultTooLarge { .. } => {
            (Code::ResourceExhausted, "payload-too-large")
        }
        CallError::Timeout { .. } | CallError::GpuWait { .. } => (Code::DeadlineExceeded, "timeout"),
        CallError::Busy(_) => (Code::ResourceExhausted, "busy"),
    }
}

pub(crate) fn store_status(error: StoreError) -> Status {
    match error {
        StoreError::Database(_) => Status::internal(error.to_string()),
        StoreError::NotYours(_) => Status::permission_denied(error.to_string()),
        StoreError::InvalidUser(_) => Status::invalid_argument(error.to_string()),
        StoreError::NoUidLeft { .. } | StoreError::TooManyKeys { .. } => Status::resource_exhausted(error.to_string()),
        StoreError::Task(_) => Status::internal(error.to_string()),
        _ => Status::unauthenticated(error.to_string()),
    }
}

/// Who made `request`, as [`crate::admission::Admission`] found before its body was read, and its place in flight.
/// Keys are managed with keys of the store: a worker's key (a function's, valid while its worker lives) must not
/// outlive it by making a lasting one.
fn refuse_worker_key(caller: &Caller, what: &str) -> Result<(), Status> {
    if caller.depth == 0 {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "a function cannot {what} with its worker's key (FAL_KEY_ID in a worker is valid only while the worker \
         lives): manage keys from outside, with `fal-serverless keys`"
    )))
}

pub(crate) fn admitted<T>(request: &Request<T>) -> Result<Admitted, Status> {
    request
        .extensions()
        .get::<Admitted>()
        .cloned()
        .ok_or_else(|| Status::internal("the request was not admitted (the server's admission layer is missing)"))
}

/// The engine's call for a `HostedRun`, or what is wrong with it.
pub(crate) fn call_request(caller: &Caller, run: &mut HostedRun) -> Result<CallRequest, Status> {
    let function = run.function.take().ok_or_else(|| invalid("HostedRun.function is missing"))?;
    let setup = run.setup_func.take();
    if let Some(setup) = setup.as_ref().filter(|setup| setup.method != function.method) {
        return Err(invalid(format!(
            "the setup function is pickled with {:?} and the function with {:?}: pickle both the same way",
            setup.method, function.method
        )));
    }
    let (requirements, python, cloudpickle) = environment(&run.environments)?;
    let serializer = match function.method.as_str() {
        "cloudpickle" => Serializer::cloudpickle(&cloudpickle).map_err(|e| invalid(e.to_string()))?,
        dill::METHOD => Serializer::Dill,
        other => {
            return Err(invalid(format!(
                "serialization method {other:?} is not supported; this server runs \"cloudpickle\" calls (this \
                 project's SDK) and \"dill\" calls (the original fal-serverless client)"
            )))
        }
    };
    let env = EnvSpec::new(python, &requirements, serializer).map_err(|e| invalid(e.to_string()))?;
    let local = env.local_references();
    if !local.is_empty() {
        return Err(error_status(
            tonic::Code::InvalidArgument,
            "environment",
            format!(
                "requirements [{}] name files of the server's machine (file:// or a local path); a server builds \
                 only from package indexes and remote URLs. Publish the package (or serve it from an index or \
                 https URL), or run the function on the local host: .on(local)",
                local.join(", ")
            ),
        ));
    }
    env.check_protocol().map_err(|e| error_status(tonic::Code::InvalidArgument, "environment", e.to_string()))?;
    let machine = run.machine_requirements.clone().unwrap_or_default();
    let keep_alive = options::whole_keep_alive(machine.keep_alive.unwrap_or(DEFAULT_KEEP_ALIVE))
        .map_err(|e| invalid(e.to_string()))?;
    let timeout = match run.timeout_seconds {
        None => DEFAULT_TIMEOUT,
        Some(seconds) => options::timeout(seconds).map_err(|e| invalid(e.to_string()))?,
    };
    Ok(CallRequest {
        tenant: caller.user_id.clone(),
        // The server fills it in from its records (`Controller::run`).
        uid: None,
        env,
        interpreter: None,
        machine_type: if machine.machine_type.is_empty() { "XS".into() } else { machine.machine_type },
        keep_alive,
        payload: function.definition,
        function: None,
        setup: setup.map(|setup| setup.definition),
        // The server streams them where the client reads them (`Controller::run`).
        on_item: None,
        timeout: Some(timeout),
        // The server gives it its capacity (`Controller::run`).
        room: None,
        on_worker: None,
        // The server gives it its user's storage (`Controller::run`).
        data_dir: None,
        // The server links it back to itself (`Controller::run`, the apps' launcher).
        link: None,
        // The server fills them in from its records (`for_user`).
        variables: Default::default(),
    })
}

/// What a call of `user` gets from the server's records, whoever built it (a `Run`, an app's replica, a schedule's
/// activation): the uid its jailed processes run as, and the user's secrets as its worker's environment variables.
/// Every call the server makes for a user goes through here.
pub(crate) async fn for_user(
    call: &mut CallRequest,
    user: &str,
    keys: &Arc<Store>,
    secrets: &Secrets,
    (first_uid, uid_count): (u32, u32),
) -> Result<(), Status> {
    let owner = user.to_string();
    call.uid = Some(keys.blocking(move |store| store.uid(&owner, first_uid, uid_count)).await.map_err(store_status)?);
    call.variables = secrets.variables(user).await.map_err(|e| e.status())?;
    Ok(())
}

/// Requirements, Python version and, for cloudpickle calls, cloudpickle's pinned requirement from the (at most one)
/// `virtualenv` environment definition.
fn environment(definitions: &[EnvironmentDefinition]) -> Result<(Vec<String>, PythonVersion, String), Status> {
    let definition = match definitions {
        [] => None,
        [one] if one.kind == "virtualenv" => Some(one),
        [one] => return Err(invalid(format!("environment kind {:?} is not supported; use \"virtualenv\"", one.kind))),
        _ => return Err(invalid("at most one environment definition is supported")),
    };
    let fields = definition.and_then(|d| d.configuration.as_ref()).map(|c| &c.fields);
    let get = |name: &str| fields.and_then(|f| f.get(name)).and_then(|v| v.kind.as_ref());
    let requirements = match get("requirements") {
        None | Some(Kind::NullValue(_)) => Vec::new(),
        Some(Kind::ListValue(list)) => list
            .values
            .iter()
            .map(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Ok(s.clone()),
                _ => Err(invalid("requirements must be a list of strings")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(invalid("requirements must be a list of strings")),
    };
    let python = match get("python_version") {
        Some(Kind::StringValue(v)) => v.parse().map_err(|e: fal_engine::EnvironmentError| invalid(e.to_string()))?,
        _ => return Err(invalid("the environment definition needs python_version (\"3.11\", say)")),
    };
    let serializer = match get("serializer") {
        Some(Kind::StringValue(v)) => v.clone(),
        _ => "cloudpickle".to_string(),
    };
    Ok((requirements, python, serializer))
}

pub(crate) fn log_message(line: LogLine) -> Log {
    use fal_proto::{LogLevel, LogSource as Source};
    let (source, level) = match line.source {
        LogSource::Stdout => (Source::User, LogLevel::Stdout),
        LogSource::Stderr => (Source::User, LogLevel::Stderr),
        LogSource::Build => (Source::Builder, LogLevel::Info),
        LogSource::Engine => (Source::Bridge, LogLevel::Warning),
    };
    Log {
        message: line.line,
        source: source as i32,
        level: level as i32,
        timestamp: Some(prost_types::Timestamp::from(SystemTime::now())),
    }
}

/// A message of a generator function's run: one item it yielded.
fn item_message(item: Bytes) -> HostedRunResult {
    let item = SerializedObject { method: "cloudpickle".into(), definition: item, ..Default::default() };
    HostedRunResult { item: Some(item), ..run_message("", Vec::new(), State::InProgress) }
}

pub(crate) fn run_message(run_id: &str, logs: Vec<Log>, state: State) -> HostedRunResult {
    HostedRunResult {
        run_id: run_id.to_string(),
        status: Some(HostedRunStatus { state: state as i32 }),
        logs,
        return_value: None,
        ..Default::default()
    }
}

/// Logs its notice when dropped, unless defused first: how a call that was dropped half way gets its log line.
struct NoticeOnDrop(Option<String>);

impl NoticeOnDrop {
    fn defuse(mut self) {
        self.0 = None;
    }
}

impl Drop for NoticeOnDrop {
    fn drop(&mut self) {
        if let Some(notice) = self.0.take() {
            tracing::info!("{notice}");
        }
    }
}

/// A new worker's room on this server: its share of the capacity, for the caller; while the call waits, idle
/// workers are stopped to make room.
#[derive(Debug)]
pub(crate) struct CapacityRoom {
    pub capacity: Arc<Capacity>,
    pub engine: Engine,
    pub user: String,
    pub payload_bytes: usize,
}

impl Room for CapacityRoom {
    fn reserve<'a>(
        &'a self,
        machine: &'a MachineType,
        new_worker: bool,
        wait: Option<Duration>,
        logs: &'a LogSink,
    ) -> BoxFuture<'a, Result<Granted, CallError>> {
        Box::pin(async move {
            let waiting =
                || logs.send(LogSource::Engine, format!("waiting for capacity to run machine type {}", machine.name));
            let make_room = |crowded: Crowded| {
                let engine = self.engine.clone();
                async move {
                    match crowded {
                        Crowded::ByOwnWorkers(user) => engine.stop_idle_worker(Some(&user)).await,
                        Crowded::ByAnyone => engine.stop_idle_worker(None).await,
                        // Only running calls hold CPUs: stopping an idle worker frees none.
                        Crowded::UserBusy | Crowded::ServerBusy => false,
                    }
                }
            };
            let reserving =
                self.capacity.reserve(&self.user, machine, new_worker, self.payload_bytes, waiting, make_room);
            let reserved = match wait {
                Some(limit) => tokio::time::timeout(limit, reserving)
                    .await
                    .map_err(|_| CallError::Timeout { seconds: limit.as_secs_f64() })?,
                None => reserving.await,
            };
            let (call, worker) = reserved.map_err(|e| CallError::Busy(e.to_string()))?;
            Ok(Granted { call: Box::new(call), worker: worker.map(|w| Box::new(w) as Hold) })
        })
    }
}

/// A call checked and given what the server's records say (its uid, secrets, storage, way back), ready to run.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub call: CallRequest,
    pub machine: MachineType,
    pub function_name: String,
    /// Said in the call's logs when it runs: the keep_alive asked for was cut to this server's most.
    pub cut_keep_alive: Option<String>,
}

impl Controller {
    /// `run` checked and made into the engine's call, with what the server's records give `caller`'s calls.
    pub(crate) async fn prepare(
        &self,
        caller: &Caller,
        authority: Option<&str>,
        run: &mut HostedRun,
    ) -> Result<Prepared, Status> {
        let function_name = run.function_name.clone().unwrap_or_else(|| "<unnamed>".into());
        if caller.depth > self.limits.max_call_depth {
            return Err(error_status(
                tonic::Code::FailedPrecondition,
                "call-depth",
                format!(
                    "this call would be {} nested calls deep (a function calling an isolated function that calls \
                     another...), past this server's limit of {} ([limits] max_call_depth): call the function \
                     directly instead of through another, or ask the server's admin to raise the limit",
                    caller.depth, self.limits.max_call_depth
                ),
            ));
        }
        let mut call = call_request(caller, run)?;
        call.link = Some(self.nested.link(&caller.user_id, caller.depth, authority));
        for_user(&mut call, &caller.user_id, &self.store, &self.secrets, self.uids).await?;
        if let Some(uid) = call.uid {
            call.data_dir = Some(
                crate::storage::data_dir(&self.storage, &caller.user_id, uid)
                    .await
                    .map_err(|e| error_status(tonic::Code::Internal, "storage", e))?,
            );
        }
        // Longer than this server keeps workers warm: cut, and said in the call's logs.
        let max_keep_alive = self.limits.max_keep_alive;
        let cut_keep_alive = (call.keep_alive > max_keep_alive).then(|| {
            let asked = std::mem::replace(&mut call.keep_alive, max_keep_alive);
            format!(
                "keep_alive {} s is more than this server keeps a worker warm; it stays warm {} s after the call \
                 ([limits] max_keep_alive_seconds)",
                asked.as_secs_f64(),
                max_keep_alive.as_secs()
            )
        });
        let machine = self.engine.machine_types().get(&call.machine_type).map_err(|e| invalid(e.to_string()))?.clone();
        if let Some(reason) = self.capacity.never_fits(&machine) {
            return Err(error_status(tonic::Code::FailedPrecondition, "machine-type-unavailable", reason));
        }
        Ok(Prepared { call, machine, function_name, cut_keep_alive })
    }

    /// Runs a prepared call of `caller`'s to its outcome (the return value, or the exception, still pickled),
    /// recorded in the run history as a run of `kind` with id `run_id`; each line it logs goes to `on_log`, counted
    /// against `budget` until the reader takes it. The run is recorded from now; dropped before its end, the call is
    /// recorded as cancelled and its worker stopped.
    pub(crate) fn execute(
        &self,
        caller: &Caller,
        prepared: Prepared,
        kind: &'static str,
        run_id: String,
        on_log: impl Fn(LogLine) + Send + Sync + 'static,
        budget: Arc<LogBudget>,
    ) -> impl Future<Output = Result<SerializedObject, Status>> + Send + 'static {
        let Prepared { mut call, machine, function_name, cut_keep_alive } = prepared;
        let (this, caller) = (self.clone(), caller.clone());
        let recording = self.runs.begin(crate::runs::NewRun {
            id: run_id,
            user_id: caller.user_id.clone(),
            kind,
            function: function_name.clone(),
            machine_type: machine.name.clone(),
            queued_ms: crate::runs::now_ms(),
            ..Default::default()
        });
        async move {
            let _busy = this.activity.busy();
            let started = Instant::now();
            let serializer = call.env.serializer.clone();
            let env_key = call.env.key();
            let kept = recording.logs.clone();
            let logs = LogSink::with_budget(
                move |line| {
                    kept.push(line.source, &line.line);
                    on_log(line);
                },
                budget,
            );
            if let Some(notice) = cut_keep_alive {
                logs.send(LogSource::Engine, notice);
            }
            let cancelled = NoticeOnDrop(Some(format!(
                "call by {} of {function_name} cancelled: the client went away",
                caller.user_id
            )));
            // The timeout counts from arrival: time spent waiting for capacity is taken from the function's.
            let timeout = call.timeout.unwrap_or(DEFAULT_TIMEOUT);
            call.timeout = Some(timeout);
            call.room = Some(Arc::new(CapacityRoom {
                capacity: this.capacity.clone(),
                engine: this.engine.clone(),
                user: caller.user_id.clone(),
                payload_bytes: call.payload.len(),
            }));
            let mut ending = this.ending.clone();
            let (workers, watched) = mpsc::unbounded_channel();
            call.on_worker = Some(workers);
            let outcome = tokio::select! {
                outcome = crate::runs::watching(this.engine.call(call, &logs), watched, &recording) => match outcome {
                    // The engine saw what was left of it; the caller knows the timeout it asked for.
                    Err(CallError::Timeout { .. }) => Err(CallError::Timeout { seconds: timeout.as_secs_f64() }),
                    outcome => outcome,
                },
                _ = ending.wait_for(|ended| *ended) => {
                    cancelled.defuse();
                    recording.finish(crate::runs::Outcome::cancelled("server-stopped", SERVER_STOPPED));
                    tracing::warn!(user = %caller.user_id, function = %function_name, "call ended: the server stopped");
                    return Err(error_status(tonic::Code::Unavailable, "server-stopped", SERVER_STOPPED));
                }
            };
            cancelled.defuse();
            recording.finish(match &outcome {
                Ok(reply) if reply.raised => {
                    if let Some(traceback) = crate::runs::raised_traceback(&serializer, &reply.payload) {
                        recording.logs.push(LogSource::Engine, &traceback);
                    }
                    crate::runs::Outcome::error("raised", "the function raised an exception")
                }
                Ok(_) => crate::runs::Outcome::Success,
                Err(CallError::Timeout { .. }) => crate::runs::Outcome::Timeout(format!(
                    "the call ran past its timeout of {} s",
                    timeout.as_secs_f64()
                )),
                Err(error) => crate::runs::Outcome::error(call_error_kind(error).1, error.to_string()),
            });
            let summary = match &outcome {
                Ok(reply) if reply.raised => "raised".to_string(),
                Ok(_) => "returned".to_string(),
                Err(error) => format!("failed: {error}"),
            };
            tracing::info!(user = %caller.user_id, function = %function_name, env = %env_key,
                machine_type = %machine.name, duration_ms = started.elapsed().as_millis() as u64,
                outcome = %summary, kind, "call");
            let reply = outcome.map_err(|error| call_error_status(&error))?;
            match serializer {
                Serializer::Cloudpickle(_) => Ok(SerializedObject {
                    method: "cloudpickle".into(),
                    definition: reply.payload,
                    was_it_raised: reply.raised,
                    stringized_traceback: None,
                }),
                Serializer::Dill => dill::return_value(reply.raised, reply.payload),
            }
        }
    }
}

/// The items of a generator function the server holds for its client; beyond them, the worker waits at its next.
const ITEMS_HELD: usize = 16;

type CallFuture = Pin<Box<dyn Future<Output = Result<HostedRunResult, Status>> + Send>>;

/// The log bytes of one call the server holds while its client reads them: beyond it, the worker's output is not
/// read (the worker waits on its pipe) until the client catches up.
const LOG_BUDGET: usize = 1 << 20;

/// The messages of one run: its logs and the items it yields as they come, then its outcome (after every log and
/// item sent before it).
struct RunStream {
    /// Each log message with its size, given back to `budget` as it leaves.
    logs: mpsc::UnboundedReceiver<(HostedRunResult, usize)>,
    budget: Arc<LogBudget>,
    items: mpsc::Receiver<Bytes>,
    call: Option<CallFuture>,
    outcome: Option<Result<HostedRunResult, Status>>,
}

impl Stream for RunStream {
    type Item = Result<HostedRunResult, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(call) = this.call.as_mut() else {
            // Logs and items sent before the call ended go first; their senders are gone with the call, so this
            // ends. A line logged before an item was yielded was sent before it.
            let log = this.logs.try_recv().ok().map(|(log, _)| Ok(log));
            let item = || this.items.try_recv().ok().map(|item| Ok(item_message(item)));
            return Poll::Ready(log.or_else(item).or_else(|| this.outcome.take()));
        };
        if let Poll::Ready(Some((log, bytes))) = this.logs.poll_recv(cx) {
            this.budget.taken(bytes);
            return Poll::Ready(Some(Ok(log)));
        }
        if let Poll::Ready(Some(item)) = this.items.poll_recv(cx) {
            return Poll::Ready(Some(Ok(item_message(item))));
        }
        match call.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(outcome) => {
                this.call = None;
                this.outcome = Some(outcome);
                Pin::new(this).poll_next(cx)
            }
        }
    }
}

#[tonic::async_trait]
impl IsolateController for Controller {
    type RunStream = Pin<Box<dyn Stream<Item = Result<HostedRunResult, Status>> + Send>>;

    async fn run(&self, request: Request<HostedRun>) -> Result<Response<Self::RunStream>, Status> {
        let Admitted { caller, place } = admitted(&request)?;
        let authority = request.extensions().get::<crate::http::ClientAuthority>().map(|a| a.0.clone());
        let mut run = request.into_inner();
        let mut prepared = self.prepare(&caller, authority.as_deref(), &mut run).await?;
        // A generator function's items, as it yields them: a few held here, then the worker waits.
        let (item_sender, items) = mpsc::channel(ITEMS_HELD);
        if matches!(prepared.call.env.serializer, Serializer::Cloudpickle(_)) {
            prepared.call.on_item = Some(item_sender);
        }
        let (log_sender, log_receiver) = mpsc::unbounded_channel();
        let budget = LogBudget::new(LOG_BUDGET);
        let stream_budget = budget.clone();
        let run_id = format!("{:016x}", rand::random::<u64>());
        let log_run_id = run_id.clone();
        let on_log = move |line: LogLine| {
            let bytes = line.line.len();
            let message = run_message(&log_run_id, vec![log_message(line)], State::InProgress);
            let _ = log_sender.send((message, bytes));
        };
        let execution = self.execute(&caller, prepared, "call", run_id.clone(), on_log, budget);
        let call = async move {
            // The call holds its place in flight (its key's and the server's) until it ends.
            let _place = place;
            let return_value = execution.await?;
            Ok(HostedRunResult { return_value: Some(return_value), ..run_message(&run_id, Vec::new(), State::Success) })
        };
        // The call runs as the response stream is polled, in the task that serves this request: when the client
        // goes away, the stream is dropped and so is the call, which stops its worker rather than leaving it busy.
        let mut stream =
            RunStream { logs: log_receiver, budget: stream_budget, items, call: Some(Box::pin(call)), outcome: None };
        // Answer only once there is something to say: a warm call's headers, result and trailers then leave
        // together, and a call that fails before any log is a plain error status.
        match stream.next().await {
            Some(Ok(first)) => Ok(Response::new(Box::pin(tokio_stream::once(Ok(first)).chain(stream)))),
            Some(Err(status)) => Err(status),
            None => Err(Status::internal("the run ended without a result")),
        }
    }

    type MapStream = crate::map::MapResults;

    async fn map(&self, request: Request<HostedMap>) -> Result<Response<Self::MapStream>, Status> {
        let Admitted { caller, place } = admitted(&request)?;
        let authority = request.extensions().get::<crate::http::ClientAuthority>().map(|a| a.0.clone());
        let map = request.into_inner();
        Ok(Response::new(crate::map::start(self, caller, place, authority, map, None).await?))
    }

    type MapStreamStream = crate::map::MapResults;

    async fn map_stream(
        &self,
        request: Request<tonic::Streaming<MapRequest>>,
    ) -> Result<Response<Self::MapStreamStream>, Status> {
        let Admitted { caller, place } = admitted(&request)?;
        let authority = request.extensions().get::<crate::http::ClientAuthority>().map(|a| a.0.clone());
        let mut inputs = request.into_inner();
        let first =
            inputs.message().await?.ok_or_else(|| invalid("the map's stream ended before its first message"))?;
        let mut map = first.map.ok_or_else(|| invalid("a map's first message must hold the map (MapRequest.map)"))?;
        map.inputs.extend(first.inputs);
        Ok(Response::new(crate::map::start(self, caller, place, authority, map, Some(inputs)).await?))
    }

    async fn create_user_key(
        &self,
        request: Request<CreateUserKeyRequest>,
    ) -> Result<Response<CreateUserKeyResponse>, Status> {
        let Admitted { caller, .. } = admitted(&request)?;
        refuse_worker_key(&caller, "create keys")?;
        let request = request.into_inner();
        let scope = match request.scope() {
            create_user_key_request::Scope::Admin => Scope::Admin,
            create_user_key_request::Scope::Api => Scope::Api,
        };
        let user = request.user_id.unwrap_or_else(|| caller.user_id.clone());
        if caller.scope != Scope::Admin && (user != caller.user_id || scope == Scope::Admin) {
            return Err(Status::permission_denied(
                "only an admin key can create admin keys or keys for other users; ask your server's admin",
            ));
        }
        let (alias, max_keys, owner) = (request.alias.unwrap_or_default(), self.limits.max_keys_per_user, user.clone());
        let (key, secret) = self
            .store
            .blocking(move |store| store.create_key_within(&owner, scope, &alias, max_keys))
            .await
            .map_err(store_status)?;
        tracing::info!(by = %caller.user_id, user = %user, key_id = %key.key_id, "key created");
        Ok(Response::new(CreateUserKeyResponse { key_secret: secret, key_id: key.key_id }))
    }

    async fn list_user_keys(
        &self,
        request: Request<ListUserKeysRequest>,
    ) -> Result<Response<ListUserKeysResponse>, Status> {
        let Admitted { caller, .. } = admitted(&request)?;
        let user = (caller.scope != Scope::Admin).then(|| caller.user_id.clone());
        let keys = self.store.blocking(move |store| store.list_keys(user.as_deref())).await.map_err(store_status)?;
        let user_keys = keys
            .into_iter()
            .map(|k| UserKeyInfo {
                key_id: k.key_id,
                created_at: Some(prost_types::Timestamp { seconds: k.created_at, nanos: 0 }),
                scope: match k.scope {
                    Scope::Admin => create_user_key_request::Scope::Admin,
                    Scope::Api => create_user_key_request::Scope::Api,
                } as i32,
                alias: k.alias,
                user_id: k.user_id,
            })
            .collect();
        Ok(Response::new(ListUserKeysResponse { user_keys }))
    }

    async fn revoke_user_key(
        &self,
        request: Request<RevokeUserKeyRequest>,
    ) -> Result<Response<RevokeUserKeyResponse>, Status> {
        let Admitted { caller, .. } = admitted(&request)?;
        refuse_worker_key(&caller, "revoke keys")?;
        let key_id = request.into_inner().key_id;
        let (by, revoked) = (caller.clone(), key_id.clone());
        self.store.blocking(move |store| store.revoke(&by, &revoked)).await.map_err(store_status)?;
        tracing::info!(by = %caller.user_id, key_id = %key_id, "key revoked");
        Ok(Response::new(RevokeUserKeyResponse {}))
    }

    async fn worker_status_list(
        &self,
        request: Request<WorkerStatusListRequest>,
    ) -> Result<Response<WorkerStatusListResponse>, Status> {
        let Admitted { caller, .. } = admitted(&request)?;
        let request = request.into_inner();
        let worker_status = self
            .engine
            .workers()
            .into_iter()
            .filter(|w| caller.scope == Scope::Admin || w.tenant == caller.user_id)
            .filter(|w| request.user_id.as_ref().is_none_or(|u| *u == w.tenant))
            .filter(|w| request.machine_type.as_ref().is_none_or(|m| *m == w.machine_type))
            .map(|w| WorkerStatus {
                worker_id: w.pid.to_string(),
                user_id: w.tenant,
                machine_type: w.machine_type,
                env_key: w.env_key,
                busy: w.busy,
                calls: w.calls,
                hostname: w.hostname.unwrap_or_default(),
                address: w.address.map(|a| a.to_string()).unwrap_or_default(),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(WorkerStatusListResponse { worker_status }))
    }

    type RegisterApplicationStream = crate::apps::rpc::RegisterStream;

    async fn register_application(
        &self,
        request: Request<RegisterApplicationRequest>,
    ) -> Result<Response<Self::RegisterApplicationStream>, Status> {
        let Admitted { caller, .. } = admitted(&request)?;
        let _busy = self.activity.busy();
        Ok(Response::new(crate::apps::rpc::register(&self.apps, &caller, request.into_inner()).await?))
    }

    async fn list_aliases(&self, request: Request<ListAliasesRequest>) -> Result<Response<ListAliasesResult>, Status> {
        let Admitted { caller, .. } = admitted(&request)?;
        Ok(Response::new(crate::apps::rpc::list(&self.apps, &caller).await?))
    }

    type GetLogsStream = crate::apps::rpc::LogStream;

    async fn get_logs(&self, request: Request<GetLogsRequest>) -> Result<Response<Self::GetLogsStream>, Status> {
        let Admitted { caller, .. } = admitted(&request)?;
        Ok(Response::new(crate::apps::rpc::logs(&self.apps, &caller, request.into_inner()).await?))
    }

    async fn delete_alias(&self, request: Request<DeleteAliasRequest>) -> Result<Response<DeleteAliasResult>, Status> {
        let Admitted { caller, .. } = admitted(&request)?;
        Ok(Response::new(crate::apps::rpc::delete(&self.apps, &caller, &request.into_inner().alias).await?))
    }

    async fn register_cron(
        &self,
        request: Request<RegisterCronRequest>,
    ) -> Result<Response<RegisterCronResult>, Status> {
        let Admitted { caller, .. } = admitted(&request)?;
        Ok(Response::new(crate::schedules::rpc::register(&self.schedules, &caller, request.into_inner()).await?))
    }

    async fn cancel_cron(&self, request: Request<CancelCronRequest>) -> Result<Response<CancelCronResult>, Status> {
        let Admitted { caller, .. } = admitted(&request)?;
        Ok(Response::new(crate::schedules::rpc::cancel(&self.schedules, &caller, request.into_inner()).await?))
    }

    async fn list_crons(&self, request: Request<ListCronsRequest>) -> Result<Response<ListCronsResult>, Status> {
        let Admitted { caller, .. } = admitted(&request)?;
        Ok(Response::new(crate::schedules::rpc::list(&self.schedules, &caller).await?))
    }

    async fn list_activations(
        &self,
        request: Request<ListActivationsRequest>,
    ) -> Result<Response<ListActivationsResult>, Status> {
        let Admitted { caller, .. } = admitted(&request)?;
        Ok(Response::new(crate::schedules::rpc::activations(&self.schedules, &caller, request.into_inner()).await?))
    }

    async fn get_activation_logs(
        &self,
        request: Request<GetActivationLogsRequest>,
    ) -> Result<Response<GetActivationLogsResult>, Status> {
        let Admitted { caller, .. } = admitted(&request)?;
        Ok(Response::new(crate::schedules::rpc::logs(&self.schedules, &caller, request.into_inner()).await?))
    }

    async fn list_runs(&self, request: Request<ListRunsRequest>) -> Result<Response<ListRunsResult>, Status> {
        let Admitted { caller, .. } = admitted(&request)?;
        Ok(Response::new(crate::runs::rpc::list(&self.runs, &caller, request.into_inner()).await?))
    }

    async fn get_run_logs(&self, request: Request<GetRunLogsRequest>) -> Result<Response<GetRunLogsResult>, Status> {
        let Admitted { caller, .. } = admitted(&request)?;
        Ok(Response::new(crate::runs::rpc::logs(&self.runs, &caller, request.into_inner()).await?))
    }

    async fn set_secret(&self, request: Request<SetSecretRequest>) -> Result<Response<SetSecretResponse>, Status> {
        let Admitted { caller, .. } = admitted(&request)?;
        let user = self.secrets.set(&caller, request.into_inner()).await.map_err(|e| e.status())?;
        // The user's warm workers and replicas hold the old values: replaced (see `secrets`' module doc).
        self.engine.replace_workers(&user).await;
        self.apps.replace_replicas(&user);
        Ok(Response::new(SetSecretResponse {}))
    }

    async fn list_secrets(
        &self,
        request: Request<ListSecretsRequest>,
    ) -> Result<Response<ListSecretsResponse>, Status> {
        let Admitted { caller, .. } = admitted(&request)?;
        Ok(Response::new(self.secrets.list(&caller, request.into_inner()).await.map_err(|e| e.status())?))
    }
}

#[cfg(test)]
mod tests {
    use fal_proto::controller::MachineRequirements;

    use super::*;

    fn run(keep_alive: i32, timeout_seconds: Option<f64>) -> HostedRun {
        let python = prost_types::Value { kind: Some(Kind::StringValue("3.11".into())) };
        HostedRun {
            environments: vec![EnvironmentDefinition {
                kind: "virtualenv".into(),
                configuration: Some(prost_types::Struct {
                    fields: [("python_version".to_string(), python)].into_iter().collect(),
                }),
                force: false,
            }],
            machine_requirements: Some(MachineRequirements { keep_alive: Some(keep_alive), ..Default::default() }),
            function: Some(SerializedObject { method: "cloudpickle".into(), ..Default::default() }),
            timeout_seconds,
            ..Default::default()
        }
    }

    #[test]
    fn out_of_range_seconds_are_invalid_arguments_naming_the_range() {
        let caller = Caller { user_id: "u".into(), key_id: "k".into(), scope: Scope::Api, depth: 0 };
        let call = call_request(&caller, &mut run(i32::MAX, Some(1.5))).unwrap();
        assert_eq!(
            (call.keep_alive, call.timeout),
            (Duration::from_secs(i32::MAX as u64), Some(Duration::from_millis(1500)))
        );
        for (keep_alive, timeout, says) in [
            (-1, None, "keep_alive must be a number of seconds from 0 to 2147483647, got -1"),
            (i32::MIN, None, "got -2147483648"),
            (10, Some(f64::NAN), "timeout must be a number of seconds above 0 and at most 2147483647, got NaN"),
            (10, Some(f64::INFINITY), "got inf"),
            (10, Some(1e300), "got 1e300"),
            (10, Some(-1.0), "got -1.0"),
            (10, Some(0.0), "got 0.0"),
        ] {
            let status = call_request(&caller, &mut run(keep_alive, timeout)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().ends_with(says), "{}", status.message());
        }
    }
}
