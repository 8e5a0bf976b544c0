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

use fal_engine::{CallError, CallRequest, Engine, EnvSpec, LogLine, LogSink, LogSource, PythonVersion, Serializer};
use fal_proto::controller::hosted_run_status::State;
use fal_proto::controller::isolate_controller_server::IsolateController;
use fal_proto::controller::{
    create_user_key_request, CreateUserKeyRequest, CreateUserKeyResponse, HostedRun, HostedRunResult, HostedRunStatus,
    ListUserKeysRequest, ListUserKeysResponse, RevokeUserKeyRequest, RevokeUserKeyResponse, UserKeyInfo, WorkerStatus,
    WorkerStatusListRequest, WorkerStatusListResponse,
};
use fal_proto::{EnvironmentDefinition, Log, SerializedObject, AUTH_KEY_ID, AUTH_KEY_SECRET};
use prost_types::value::Kind;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::activity::Activity;
use crate::capacity::Capacity;
use crate::dill;
use crate::store::{Caller, Scope, Store, StoreError};

const DEFAULT_KEEP_ALIVE: i32 = 10;
/// A call's timeout when its client names none (an original isolate client never does).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);
const NO_KEY: &str = "no key was sent: set FAL_KEY_ID and FAL_KEY_SECRET, or pass \
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
}

fn error_status(code: tonic::Code, kind: &'static str, message: impl Into<String>) -> Status {
    let mut metadata = MetadataMap::new();
    metadata.insert("fal-error-kind", tonic::metadata::MetadataValue::from_static(kind));
    Status::with_metadata(code, message, metadata)
}

fn invalid(message: impl Into<String>) -> Status {
    error_status(tonic::Code::InvalidArgument, "invalid", message)
}

fn call_error_status(error: &CallError) -> Status {
    use tonic::Code;
    let (code, kind) = match error {
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
    };
    error_status(code, kind, error.to_string())
}

fn store_status(error: StoreError) -> Status {
    match error {
        StoreError::Database(_) => Status::internal(error.to_string()),
        StoreError::NotYours(_) => Status::permission_denied(error.to_string()),
        StoreError::InvalidUser(_) => Status::invalid_argument(error.to_string()),
        StoreError::NoUidLeft { .. } => Status::resource_exhausted(error.to_string()),
        _ => Status::unauthenticated(error.to_string()),
    }
}

impl Controller {
    fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        self.activity.touch();
        let metadata = request.metadata();
        let id = metadata.get(AUTH_KEY_ID).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty());
        let secret = metadata.get(AUTH_KEY_SECRET).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty());
        let (Some(id), Some(secret)) = (id, secret) else {
            return Err(Status::unauthenticated(NO_KEY));
        };
        self.store.verify(id, secret).map_err(store_status)
    }
}

/// The engine's call for a `HostedRun`, or what is wrong with it.
pub(crate) fn call_request(caller: &Caller, run: &mut HostedRun) -> Result<CallRequest, Status> {
    let function = run.function.take().ok_or_else(|| invalid("HostedRun.function is missing"))?;
    if run.setup_func.is_some() {
        return Err(invalid(
            "setup_function is not supported by this server; call the setup from the function itself, and mark it \
             @cached to run it once per warm worker",
        ));
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
    let machine = run.machine_requirements.clone().unwrap_or_default();
    let keep_alive = machine.keep_alive.unwrap_or(DEFAULT_KEEP_ALIVE);
    if keep_alive < 0 {
        return Err(invalid(format!("keep_alive must be 0 or more seconds, got {keep_alive}")));
    }
    let timeout = match run.timeout_seconds {
        None => DEFAULT_TIMEOUT,
        Some(seconds) => Duration::try_from_secs_f64(seconds)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| invalid(format!("timeout must be a positive number of seconds, got {seconds}")))?,
    };
    Ok(CallRequest {
        tenant: caller.user_id.clone(),
        // The server fills it in from its records (`Controller::run`).
        uid: None,
        env,
        interpreter: None,
        machine_type: if machine.machine_type.is_empty() { "XS".into() } else { machine.machine_type },
        keep_alive: Duration::from_secs(keep_alive as u64),
        payload: function.definition,
        timeout: Some(timeout),
    })
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

fn log_message(line: LogLine) -> Log {
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

fn run_message(run_id: &str, logs: Vec<Log>, state: State) -> HostedRunResult {
    HostedRunResult {
        run_id: run_id.to_string(),
        status: Some(HostedRunStatus { state: state as i32 }),
        logs,
        return_value: None,
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

type CallFuture = Pin<Box<dyn Future<Output = Result<HostedRunResult, Status>> + Send>>;

/// The messages of one run: its logs as they come, then its outcome (after every log sent before it).
struct RunStream {
    logs: mpsc::UnboundedReceiver<HostedRunResult>,
    call: Option<CallFuture>,
    outcome: Option<Result<HostedRunResult, Status>>,
}

impl Stream for RunStream {
    type Item = Result<HostedRunResult, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(call) = this.call.as_mut() else {
            // Logs sent before the call ended go first; the sender is gone with the call, so this ends.
            return Poll::Ready(this.logs.try_recv().ok().map(Ok).or_else(|| this.outcome.take()));
        };
        if let Poll::Ready(Some(log)) = this.logs.poll_recv(cx) {
            return Poll::Ready(Some(Ok(log)));
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
        let caller = self.authenticate(&request)?;
        let mut run = request.into_inner();
        let function_name = run.function_name.clone().unwrap_or_else(|| "<unnamed>".into());
        let mut call = call_request(&caller, &mut run)?;
        call.uid = Some(self.store.uid(&caller.user_id, self.uids.0, self.uids.1).map_err(store_status)?);
        let serializer = call.env.serializer.clone();
        let machine = self.engine.machine_types().get(&call.machine_type).map_err(|e| invalid(e.to_string()))?.clone();
        if let Some(reason) = self.capacity.never_fits(&machine) {
            return Err(error_status(tonic::Code::FailedPrecondition, "machine-type-unavailable", reason));
        }

        let (log_sender, log_receiver) = mpsc::unbounded_channel();
        let this = self.clone();
        let run_id = format!("{:016x}", rand::random::<u64>());
        let call = async move {
            let _busy = this.activity.busy();
            let started = Instant::now();
            let mut call = call;
            let env_key = call.env.key();
            let log_run_id = run_id.clone();
            let logs = LogSink::new(move |line| {
                let _ = log_sender.send(run_message(&log_run_id, vec![log_message(line)], State::InProgress));
            });
            let reservation = this.capacity.reserve(&machine, || {
                logs.send(LogSource::Engine, format!("waiting for capacity to run machine type {}", machine.name))
            });
            let cancelled = NoticeOnDrop(Some(format!(
                "call by {} of {function_name} cancelled: the client went away",
                caller.user_id
            )));
            // The timeout counts from arrival: time spent waiting for capacity is taken from the function's.
            let timeout = call.timeout.unwrap_or(DEFAULT_TIMEOUT);
            let outcome = match tokio::time::timeout(timeout, reservation).await {
                Ok(_held) => {
                    call.timeout = Some(timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(1)));
                    match this.engine.call(call, &logs).await {
                        // The engine saw what was left of it; the caller knows the timeout it asked for.
                        Err(CallError::Timeout { .. }) => Err(CallError::Timeout { seconds: timeout.as_secs_f64() }),
                        outcome => outcome,
                    }
                }
                Err(_) => Err(CallError::Timeout { seconds: timeout.as_secs_f64() }),
            };
            cancelled.defuse();
            let summary = match &outcome {
                Ok(reply) if reply.raised => "raised".to_string(),
                Ok(_) => "returned".to_string(),
                Err(error) => format!("failed: {error}"),
            };
            tracing::info!(user = %caller.user_id, function = %function_name, env = %env_key,
                machine_type = %machine.name, duration_ms = started.elapsed().as_millis() as u64,
                outcome = %summary, "call");
            let reply = outcome.map_err(|error| call_error_status(&error))?;
            let return_value = match serializer {
                Serializer::Cloudpickle(_) => SerializedObject {
                    method: "cloudpickle".into(),
                    definition: reply.payload,
                    was_it_raised: reply.raised,
                    stringized_traceback: None,
                },
                Serializer::Dill => dill::return_value(reply.raised, reply.payload)?,
            };
            Ok(HostedRunResult { return_value: Some(return_value), ..run_message(&run_id, Vec::new(), State::Success) })
        };
        // The call runs as the response stream is polled, in the task that serves this request: when the client
        // goes away, the stream is dropped and so is the call, which stops its worker rather than leaving it busy.
        let mut stream = RunStream { logs: log_receiver, call: Some(Box::pin(call)), outcome: None };
        // Answer only once there is something to say: a warm call's headers, result and trailers then leave
        // together, and a call that fails before any log is a plain error status.
        match stream.next().await {
            Some(Ok(first)) => Ok(Response::new(Box::pin(tokio_stream::once(Ok(first)).chain(stream)))),
            Some(Err(status)) => Err(status),
            None => Err(Status::internal("the run ended without a result")),
        }
    }

    async fn create_user_key(
        &self,
        request: Request<CreateUserKeyRequest>,
    ) -> Result<Response<CreateUserKeyResponse>, Status> {
        let caller = self.authenticate(&request)?;
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
        let (key, secret) =
            self.store.create_key(&user, scope, request.alias.as_deref().unwrap_or("")).map_err(store_status)?;
        tracing::info!(by = %caller.user_id, user = %user, key_id = %key.key_id, "key created");
        Ok(Response::new(CreateUserKeyResponse { key_secret: secret, key_id: key.key_id }))
    }

    async fn list_user_keys(
        &self,
        request: Request<ListUserKeysRequest>,
    ) -> Result<Response<ListUserKeysResponse>, Status> {
        let caller = self.authenticate(&request)?;
        let user = (caller.scope != Scope::Admin).then_some(caller.user_id.as_str());
        let keys = self.store.list_keys(user).map_err(store_status)?;
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
        let caller = self.authenticate(&request)?;
        let key_id = request.into_inner().key_id;
        self.store.revoke(&caller, &key_id).map_err(store_status)?;
        tracing::info!(by = %caller.user_id, key_id = %key_id, "key revoked");
        Ok(Response::new(RevokeUserKeyResponse {}))
    }

    async fn worker_status_list(
        &self,
        request: Request<WorkerStatusListRequest>,
    ) -> Result<Response<WorkerStatusListResponse>, Status> {
        let caller = self.authenticate(&request)?;
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
}
