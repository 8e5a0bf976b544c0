//! `IsolateController`: each RPC authenticates, validates, acts, and maps failures to a `Status` a user can act on.
//!
//! Errors that end a `Run` carry the metadata key `fal-error-kind` (`invalid`, `environment`, `worker-died`,
//! `machine-type-exceeded`, `machine-type-unavailable`, `payload-too-large`, `internal`), so clients can raise the
//! matching exception.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fal_engine::{CallError, CallRequest, Engine, EnvSpec, LogLine, LogSink, LogSource, PythonVersion};
use fal_proto::controller::isolate_controller_server::IsolateController;
use fal_proto::controller::{
    create_user_key_request, hosted_run_status, CreateUserKeyRequest, CreateUserKeyResponse, HostedRun,
    HostedRunResult, HostedRunStatus, ListUserKeysRequest, ListUserKeysResponse, RevokeUserKeyRequest,
    RevokeUserKeyResponse, UserKeyInfo, WorkerStatus, WorkerStatusListRequest, WorkerStatusListResponse,
};
use fal_proto::{EnvironmentDefinition, Log, SerializedObject, AUTH_KEY_ID, AUTH_KEY_SECRET};
use prost_types::value::Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::activity::Activity;
use crate::capacity::Capacity;
use crate::store::{Caller, Scope, Store, StoreError};

const DEFAULT_KEEP_ALIVE: i32 = 10;
const NO_KEY: &str = "no key was sent: set FAL_KEY_ID and FAL_KEY_SECRET, or pass \
                      credentials=CloudKeyCredentials(key_id=..., key_secret=...); an admin makes keys with \
                      `fal-serverless keys create`";

#[derive(Debug, Clone)]
pub struct Controller {
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
        CallError::NoGpu { .. } => (Code::FailedPrecondition, "machine-type-unavailable"),
        CallError::Environment(_) => (Code::FailedPrecondition, "environment"),
        CallError::Spawn(_) => (Code::Internal, "internal"),
        CallError::OutOfMemory { .. } => (Code::ResourceExhausted, "machine-type-exceeded"),
        CallError::WorkerDied { .. } => (Code::Aborted, "worker-died"),
        CallError::PayloadTooLarge { .. } | CallError::ResultTooLarge { .. } => {
            (Code::ResourceExhausted, "payload-too-large")
        }
    };
    error_status(code, kind, error.to_string())
}

fn store_status(error: StoreError) -> Status {
    match error {
        StoreError::Database(_) => Status::internal(error.to_string()),
        StoreError::NotYours(_) => Status::permission_denied(error.to_string()),
        StoreError::InvalidUser(_) => Status::invalid_argument(error.to_string()),
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
fn call_request(caller: &Caller, run: &mut HostedRun) -> Result<CallRequest, Status> {
    let function = run.function.take().ok_or_else(|| invalid("HostedRun.function is missing"))?;
    if function.method != "cloudpickle" {
        return Err(invalid(format!(
            "serialization method {:?} is not supported; this server runs \"cloudpickle\" calls",
            function.method
        )));
    }
    let (requirements, python, serializer) = environment(&run.environments)?;
    let env = EnvSpec::new(python, &requirements, &serializer).map_err(|e| invalid(e.to_string()))?;
    let machine = run.machine_requirements.clone().unwrap_or_default();
    let keep_alive = machine.keep_alive.unwrap_or(DEFAULT_KEEP_ALIVE);
    if keep_alive < 0 {
        return Err(invalid(format!("keep_alive must be 0 or more seconds, got {keep_alive}")));
    }
    Ok(CallRequest {
        tenant: caller.user_id.clone(),
        env,
        interpreter: None,
        machine_type: if machine.machine_type.is_empty() { "XS".into() } else { machine.machine_type },
        keep_alive: Duration::from_secs(keep_alive as u64),
        payload: function.definition,
    })
}

/// Requirements, Python version and serializer from the (at most one) `virtualenv` environment definition.
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

fn run_message(run_id: &str, logs: Vec<Log>, state: hosted_run_status::State) -> HostedRunResult {
    HostedRunResult {
        run_id: run_id.to_string(),
        status: Some(HostedRunStatus { state: state as i32 }),
        logs,
        return_value: None,
    }
}

type Stream<T> = UnboundedReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl IsolateController for Controller {
    type RunStream = Stream<HostedRunResult>;

    async fn run(&self, request: Request<HostedRun>) -> Result<Response<Self::RunStream>, Status> {
        let caller = self.authenticate(&request)?;
        let mut run = request.into_inner();
        let function_name = run.function_name.clone().unwrap_or_else(|| "<unnamed>".into());
        let call = call_request(&caller, &mut run)?;
        let machine = self.engine.machine_types().get(&call.machine_type).map_err(|e| invalid(e.to_string()))?.clone();
        if let Some(reason) = self.capacity.never_fits(&machine) {
            return Err(error_status(tonic::Code::FailedPrecondition, "machine-type-unavailable", reason));
        }

        let (sender, receiver) = mpsc::unbounded_channel();
        let this = self.clone();
        let run_id = format!("{:016x}", rand::random::<u64>());
        tokio::spawn(async move {
            let _busy = this.activity.busy();
            let started = Instant::now();
            let env_key = call.env.key();
            let log_sender = sender.clone();
            let log_run_id = run_id.clone();
            let logs = LogSink::new(move |line| {
                let message = run_message(&log_run_id, vec![log_message(line)], hosted_run_status::State::InProgress);
                let _ = log_sender.send(Ok(message));
            });
            let reservation = this.capacity.reserve(&machine, || {
                logs.send(LogSource::Engine, format!("waiting for capacity to run machine type {}", machine.name))
            });
            let outcome = tokio::select! {
                outcome = async { let _held = reservation.await; this.engine.call(call, &logs).await } => Some(outcome),
                // The client went away: dropping the call stops its worker rather than leaving it busy.
                () = sender.closed() => None,
            };
            let summary = match &outcome {
                None => "cancelled: the client went away".to_string(),
                Some(Ok(reply)) if reply.raised => "raised".to_string(),
                Some(Ok(_)) => "returned".to_string(),
                Some(Err(error)) => format!("failed: {error}"),
            };
            tracing::info!(user = %caller.user_id, function = %function_name, env = %env_key,
                machine_type = %machine.name, duration_ms = started.elapsed().as_millis() as u64,
                outcome = %summary, "call");
            let Some(outcome) = outcome else { return };
            let message = match outcome {
                Ok(reply) => Ok(HostedRunResult {
                    return_value: Some(SerializedObject {
                        method: "cloudpickle".into(),
                        definition: reply.payload,
                        was_it_raised: reply.raised,
                        stringized_traceback: None,
                    }),
                    ..run_message(&run_id, Vec::new(), hosted_run_status::State::Success)
                }),
                Err(error) => Err(call_error_status(&error)),
            };
            let _ = sender.send(message);
        });
        Ok(Response::new(UnboundedReceiverStream::new(receiver)))
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
                ..Default::default()
            })
            .collect();
        Ok(Response::new(WorkerStatusListResponse { worker_status }))
    }
}
