//! `fal_serverless._native`: the engine, embedded in the client process for the `local` host; the client of the
//! server for the `cloud` host; and the `fal-serverless` command line.
//!
//! A thin binding: it converts Python arguments into an engine [`CallRequest`] or a `HostedRun`, runs the call on a
//! process-wide tokio runtime while the GIL is released, hands log lines to a Python callback as they arrive, and
//! maps errors onto the exception classes below. Pickling, hosts and decorators live in the Python package.

use std::path::PathBuf;

use bytes::Bytes;
use std::sync::OnceLock;
use std::time::Duration;

use fal_client::{Client, ClientError, Target};
use fal_engine::{
    options, CallError, CallRequest, EngineConfig, EnvSpec, LogSink, LogSource, PythonVersion, Serializer,
};
use fal_proto::controller::{HostedMap, HostedRun, MachineRequirements, RegisterApplicationRequest};
use fal_proto::{EnvironmentDefinition, LogLevel, LogSource as LogSourceProto, SerializedObject};
use prost_types::value::Kind;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;

create_exception!(fal_serverless, FalServerlessError, PyException, "Base class of every fal-serverless error.");
create_exception!(
    fal_serverless,
    EnvironmentBuildError,
    FalServerlessError,
    "An environment could not be built: a requirement that does not exist, a Python version the host lacks."
);
create_exception!(
    fal_serverless,
    WorkerDiedError,
    FalServerlessError,
    "The worker process running a call died before returning (a crash, os._exit, a kill)."
);
create_exception!(
    fal_serverless,
    MachineTypeExceededError,
    WorkerDiedError,
    "The worker was killed for using more memory than its machine type allows."
);
create_exception!(
    fal_serverless,
    MachineTypeUnavailableError,
    FalServerlessError,
    "The host cannot provide the machine type (a GPU type on a host without GPUs)."
);
create_exception!(
    fal_serverless,
    PayloadTooLargeError,
    FalServerlessError,
    "A call's arguments or result are over the size limit."
);
create_exception!(
    fal_serverless,
    CallTimeoutError,
    FalServerlessError,
    "The call took longer than its timeout (waiting for capacity included); its worker was stopped."
);
create_exception!(
    fal_serverless,
    AuthenticationError,
    FalServerlessError,
    "The server refused the key: missing, unknown, wrong or revoked (the message says which)."
);
create_exception!(
    fal_serverless,
    NoServerConfiguredError,
    FalServerlessError,
    "No fal-serverless server is configured or running for the `cloud` host."
);
create_exception!(
    fal_serverless,
    ServerBusyError,
    FalServerlessError,
    "The server refused the call for now: a limit on what one user or key may have waiting or in flight (the \
     message names it)."
);
create_exception!(
    fal_serverless,
    ServerUnavailableError,
    FalServerlessError,
    "The fal-serverless server could not be reached."
);

create_exception!(
    fal_serverless,
    CallCancelledError,
    FalServerlessError,
    "The call was cancelled by its caller (its `cancel` event was set); its worker was stopped."
);

/// How often a waiting call checks for Ctrl-C.
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fal-serverless-engine")
        .enable_all()
        .build()
        .map_err(|e| FalServerlessError::new_err(format!("could not start the engine's runtime: {e}")))?;
    Ok(RUNTIME.get_or_init(|| runtime))
}

/// [`run_streaming`] for a call whose items are log lines `(source, line)`, handed to `on_log`.
fn run_logged<'py, T, F>(
    py: Python<'py>,
    runtime: &tokio::runtime::Runtime,
    on_log: &Bound<'py, PyAny>,
    call: impl FnOnce(Box<dyn Fn(&'static str, String) + Send + Sync>) -> F,
) -> PyResult<T>
where
    T: Send,
    F: std::future::Future<Output = Result<T, PyErr>> + Send,
{
    run_streaming(
        py,
        runtime,
        None,
        |(source, line): (&'static str, String)| on_log.call1((source, line)).map(drop),
        move |items| call(Box::new(move |source, line| drop(items.send((source, line))))),
    )
}

/// What a call hands its Python caller as it runs: a log line, or an item its generator function yielded.
enum Event {
    Log(&'static str, String),
    Item(Bytes),
}

/// [`run_streaming`] for a call that logs and may yield items, handed to `on_log(source, line)` and
/// `on_item(bytes)`; returns its `(raised, payload)`. A set `cancel` (a `threading.Event`) drops the call.
fn run_call_events<'py, F>(
    py: Python<'py>,
    on_log: &Bound<'py, PyAny>,
    on_item: Option<&Bound<'py, PyAny>>,
    cancel: Option<&Bound<'py, PyAny>>,
    call: impl FnOnce(tokio::sync::mpsc::UnboundedSender<Event>) -> F,
) -> PyResult<(bool, Bound<'py, PyBytes>)>
where
    F: std::future::Future<Output = Result<(bool, Bytes), PyErr>> + Send,
{
    let deliver = |event: Event| match event {
        Event::Log(source, line) => on_log.call1((source, line)).map(drop),
        Event::Item(item) => match on_item {
            Some(on_item) => on_item.call1((PyBytes::new(py, &item),)).map(drop),
            None => Ok(()),
        },
    };
    let (raised, payload) = run_streaming(py, runtime()?, cancel, deliver, call)?;
    Ok((raised, PyBytes::new(py, &payload)))
}

/// A log sink that hands each line to `events`.
fn event_logs(events: &tokio::sync::mpsc::UnboundedSender<Event>) -> LogSink {
    let events = events.clone();
    LogSink::new(move |line| drop(events.send(Event::Log(source_name(line.source), line.line))))
}

/// Runs `call` on the calling thread with the GIL released, handing each item it sends (a log line, say) to
/// `deliver` as it comes and checking for Ctrl-C (and whether `cancel`, a `threading.Event`, is set) meanwhile. The caller's thread polls the call itself (the runtime's
/// threads drive the sockets), so a warm call costs no hand-off between threads. Dropping the call (Ctrl-C, a
/// failing `deliver`) stops whatever it holds.
fn run_streaming<'py, M, T, F>(
    py: Python<'py>,
    runtime: &tokio::runtime::Runtime,
    cancel: Option<&Bound<'py, PyAny>>,
    mut deliver: impl FnMut(M) -> PyResult<()>,
    call: impl FnOnce(tokio::sync::mpsc::UnboundedSender<M>) -> F,
) -> PyResult<T>
where
    M: Send,
    T: Send,
    F: std::future::Future<Output = Result<T, PyErr>> + Send,
{
    enum Step<M, T> {
        Item(M),
        Done(Result<T, PyErr>),
        CheckSignals,
    }
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let mut future = std::pin::pin!(call(sender));
    // A call that logs (or yields) more often than SIGNAL_CHECK is still checked that often.
    let mut checked = std::time::Instant::now();
    loop {
        if checked.elapsed() >= SIGNAL_CHECK {
            checked = std::time::Instant::now();
            check_cancelled(py, cancel)?;
        }
        let step = py.detach(|| {
            runtime.block_on(async {
                tokio::select! {
                    biased;
                    Some(item) = receiver.recv() => Step::Item(item),
                    outcome = &mut future => Step::Done(outcome),
                    () = tokio::time::sleep(SIGNAL_CHECK) => Step::CheckSignals,
                }
            })
        });
        match step {
            Step::Item(item) => deliver(item)?,
            Step::Done(outcome) => {
                // Items sent in the call's last poll are still queued; they come before its outcome.
                while let Ok(item) = receiver.try_recv() {
                    deliver(item)?;
                }
                return outcome;
            }
            Step::CheckSignals => {
                checked = std::time::Instant::now();
                check_cancelled(py, cancel)?;
            }
        }
    }
}

/// Ctrl-C, or a set `cancel` (a `threading.Event`), as the error that drops the call.
fn check_cancelled(py: Python<'_>, cancel: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
    py.check_signals()?;
    match cancel {
        Some(cancel) if cancel.call_method0("is_set")?.is_truthy()? => {
            Err(CallCancelledError::new_err("the call was cancelled; its worker was stopped"))
        }
        _ => Ok(()),
    }
}

fn source_name(source: LogSource) -> &'static str {
    match source {
        LogSource::Stdout => "stdout",
        LogSource::Stderr => "stderr",
        LogSource::Build => "build",
        LogSource::Engine => "engine",
    }
}

fn to_py_err(error: CallError) -> PyErr {
    let message = error.to_string();
    match error {
        CallError::UnknownMachineType(_) => PyValueError::new_err(message),
        CallError::NoGpu { .. } | CallError::Allocation { .. } => MachineTypeUnavailableError::new_err(message),
        CallError::Environment(_) => EnvironmentBuildError::new_err(message),
        CallError::OutOfMemory { .. } => MachineTypeExceededError::new_err(message),
        CallError::WorkerDied { .. } => WorkerDiedError::new_err(message),
        CallError::PayloadTooLarge { .. } | CallError::ResultTooLarge { .. } => PayloadTooLargeError::new_err(message),
        CallError::Timeout { .. } | CallError::GpuWait { .. } => CallTimeoutError::new_err(message),
        CallError::Spawn(_) => FalServerlessError::new_err(message),
        CallError::Busy(_) => ServerBusyError::new_err(message),
    }
}

/// The engine of this process: environments, warm workers, machine types.
#[pyclass(frozen, module = "fal_serverless._native")]
struct Engine {
    engine: fal_engine::Engine,
    cache_dir: PathBuf,
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (uv, cache_dir=None))]
    fn new(uv: PathBuf, cache_dir: Option<PathBuf>) -> PyResult<Self> {
        let mut config = EngineConfig::from_env();
        config.uv = uv;
        if let Some(cache_dir) = cache_dir {
            config.cache_dir = cache_dir;
        }
        let cache_dir = config.cache_dir.clone();
        // The engine forks its workers from the runtime's threads, which live as long as the process.
        let _guard = runtime()?.enter();
        Ok(Self { engine: fal_engine::Engine::new(config), cache_dir })
    }

    #[getter]
    fn cache_dir(&self) -> PathBuf {
        self.cache_dir.clone()
    }

    /// Runs one call; returns `(raised, payload)`. `on_log(source, line)` is called for every line
    /// the call logs, with source one of "stdout", "stderr", "build", "engine"; `on_item(bytes)` for every item a
    /// generator function yields. `function`: the function pickled alone, `payload` being its `(args, kwargs)`;
    /// `setup`: a setup function, pickled. A set `cancel` (a `threading.Event`) stops the call and its worker.
    #[pyo3(signature = (*, python_version, interpreter, requirements, serializer, machine_type, keep_alive, payload, on_log, timeout = None, tenant = "local".to_string(), setup = None, function = None, on_item = None, cancel = None))]
    #[allow(clippy::too_many_arguments)]
    fn call<'py>(
        &self,
        py: Python<'py>,
        python_version: &str,
        interpreter: Option<PathBuf>,
        requirements: Vec<String>,
        serializer: &str,
        machine_type: String,
        keep_alive: f64,
        payload: PyBackedBytes,
        on_log: Bound<'py, PyAny>,
        timeout: Option<f64>,
        tenant: String,
        setup: Option<PyBackedBytes>,
        function: Option<PyBackedBytes>,
        on_item: Option<Bound<'py, PyAny>>,
        cancel: Option<Bound<'py, PyAny>>,
    ) -> PyResult<(bool, Bound<'py, PyBytes>)> {
        let env = env_spec(python_version, &requirements, serializer)?;
        let keep_alive = options::keep_alive(keep_alive).map_err(|e| PyValueError::new_err(e.to_string()))?;
        // The local host's persistent storage: a directory of the cache, named by FAL_DATA_DIR in its workers (they
        // run unjailed, as the user, with no mount namespace of their own to show it at /data).
        let data_dir = self.cache_dir.join("data");
        std::fs::create_dir_all(&data_dir)
            .map_err(|e| FalServerlessError::new_err(format!("cannot create {}: {e}", data_dir.display())))?;
        let request = CallRequest {
            tenant,
            uid: None,
            env,
            interpreter,
            machine_type,
            keep_alive,
            payload: Bytes::from_owner(payload),
            function: function.map(Bytes::from_owner),
            setup: setup.map(Bytes::from_owner),
            on_item: None,
            timeout: timeout.map(timeout_duration).transpose()?,
            room: None,
            on_worker: None,
            data_dir: Some(data_dir),
            link: None,
            variables: Default::default(),
        };

        let engine = self.engine.clone();
        let mut request = request;
        // Items are held a few at a time: the worker waits while the caller has not taken them.
        let (item_sender, mut items) = tokio::sync::mpsc::channel(16);
        request.on_item = on_item.is_some().then_some(item_sender);
        run_call_events(py, &on_log, on_item.as_ref(), cancel.as_ref(), move |events| async move {
            let logs = event_logs(&events);
            let call = engine.call(request, &logs);
            tokio::pin!(call);
            let mut open = true;
            let reply = loop {
                tokio::select! {
                    biased;
                    item = items.recv(), if open => match item {
                        Some(item) => drop(events.send(Event::Item(item))),
                        None => open = false,
                    },
                    reply = &mut call => break reply,
                }
            };
            while let Ok(item) = items.try_recv() {
                drop(events.send(Event::Item(item)));
            }
            let reply = reply.map_err(to_py_err)?;
            Ok((reply.raised, reply.payload))
        })
    }

    /// Live workers as `(pid, env_key, machine_type, busy, calls)`.
    fn workers(&self) -> Vec<(u32, String, String, bool, u64)> {
        self.engine.workers().into_iter().map(|w| (w.pid, w.env_key, w.machine_type, w.busy, w.calls)).collect()
    }

    /// Stops every idle worker and waits until they are gone (and their cgroups removed).
    fn shutdown(&self, py: Python<'_>) -> PyResult<()> {
        let runtime = runtime()?;
        let engine = self.engine.clone();
        py.detach(|| runtime.block_on(engine.shutdown()));
        Ok(())
    }
}

fn client_error(error: ClientError) -> PyErr {
    let message = error.to_string();
    match error {
        ClientError::NoServer | ClientError::Credentials(_) | ClientError::CaFile { .. } => {
            NoServerConfiguredError::new_err(message)
        }
        ClientError::NoKey { .. } => AuthenticationError::new_err(message),
        ClientError::UnknownAuthMode { .. } => PyValueError::new_err(message),
        ClientError::NoRevision => FalServerlessError::new_err(message),
        ClientError::Connect { .. }
        | ClientError::NoResult
        | ClientError::ConnectionLost { .. }
        | ClientError::UntrustedCertificate { .. }
        | ClientError::WrongName { .. }
        | ClientError::NotTls { .. } => ServerUnavailableError::new_err(message),
        ClientError::Server { code, kind, .. } => match (kind.as_deref(), code) {
            (Some("invalid"), _) => PyValueError::new_err(message),
            (Some("environment"), _) => EnvironmentBuildError::new_err(message),
            (Some("worker-died"), _) => WorkerDiedError::new_err(message),
            (Some("machine-type-exceeded"), _) => MachineTypeExceededError::new_err(message),
            (Some("machine-type-unavailable"), _) => MachineTypeUnavailableError::new_err(message),
            (Some("payload-too-large"), _) => PayloadTooLargeError::new_err(message),
            (Some("timeout"), _) => CallTimeoutError::new_err(message),
            (Some("busy"), _) => ServerBusyError::new_err(message),
            (Some(fal_proto::TLS_REQUIRED_KIND), _) => ServerUnavailableError::new_err(message),
            (_, tonic::Code::Unauthenticated | tonic::Code::PermissionDenied) => AuthenticationError::new_err(message),
            (_, tonic::Code::Unavailable) => ServerUnavailableError::new_err(message),
            (_, tonic::Code::ResourceExhausted) => PayloadTooLargeError::new_err(message),
            _ => FalServerlessError::new_err(message),
        },
    }
}

/// A pickle of our SDK's, as the server takes it.
fn cloudpickled(definition: PyBackedBytes) -> SerializedObject {
    SerializedObject {
        method: "cloudpickle".into(),
        definition: Bytes::from_owner(definition),
        was_it_raised: false,
        stringized_traceback: None,
    }
}

/// Batches of a map's inputs held for the server before `MapRun.send` waits (the server reads them as its workers
/// free up).
const MAP_BATCHES_HELD: usize = 4;

/// A map running on the server (`CloudClient.map_start`).
#[pyclass(frozen, module = "fal_serverless._native")]
struct MapRun {
    /// Where inputs go; `None` once they are all sent, or the map was cancelled.
    inputs: std::sync::Mutex<Option<tokio::sync::mpsc::Sender<Vec<SerializedObject>>>>,
    /// The server's messages; `None` once cancelled.
    messages: tokio::sync::Mutex<Option<tonic::Streaming<fal_proto::controller::HostedRunResult>>>,
}

/// A map's message as `MapRun.next` hands it over: `("log", index, source, line)`, `("result", index, raised,
/// payload)`, `("error", index, exception)`, or `("end",)`.
type MapEvent = Py<PyAny>;

#[pymethods]
impl MapRun {
    /// Sends inputs (each a pickle of `(args, kwargs)`), numbered after those sent before; waits (without the GIL)
    /// while the server has not read the batches before.
    fn send(&self, py: Python<'_>, inputs: Vec<PyBackedBytes>) -> PyResult<()> {
        let sender = self.inputs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(sender) = sender else {
            return Err(FalServerlessError::new_err("this map's inputs are closed"));
        };
        let batch: Vec<SerializedObject> = inputs.into_iter().map(cloudpickled).collect();
        let runtime = runtime()?;
        py.detach(|| runtime.block_on(sender.send(batch)))
            .map_err(|_| ServerUnavailableError::new_err("the map ended before all its inputs were sent"))
    }

    /// Says that every input was sent.
    fn close(&self) {
        self.inputs.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// The next message, waiting at most `timeout` seconds (then None); raises what ends the map.
    fn next(&self, py: Python<'_>, timeout: f64) -> PyResult<Option<MapEvent>> {
        let runtime = runtime()?;
        let wait = Duration::from_secs_f64(timeout.clamp(0.0, 3600.0));
        let message = py.detach(|| {
            runtime.block_on(async {
                let mut messages = self.messages.lock().await;
                let Some(stream) = messages.as_mut() else { return Ok(Some(None)) };
                match tokio::time::timeout(wait, stream.message()).await {
                    Err(_) => Ok(None),
                    Ok(next) => next.map(Some).map_err(ClientError::from),
                }
            })
        });
        let message = match message.map_err(client_error)? {
            None => return Ok(None),
            Some(None) => return Ok(Some(("end",).into_pyobject(py)?.into_any().unbind())),
            Some(Some(message)) => message,
        };
        let index = message.map_index.unwrap_or_default();
        if let Some(log) = message.logs.into_iter().next() {
            let event = ("log", index, log_source(&log), log.message);
            return Ok(Some(event.into_pyobject(py)?.into_any().unbind()));
        }
        if let Some(value) = message.return_value {
            let event = ("result", index, value.was_it_raised, PyBytes::new(py, &value.definition));
            return Ok(Some(event.into_pyobject(py)?.into_any().unbind()));
        }
        if let Some(error) = message.map_error {
            let code = tonic::Code::from_i32(error.code);
            let exception = client_error(ClientError::Server { code, kind: Some(error.kind), message: error.message });
            let event = ("error", index, exception.into_value(py));
            return Ok(Some(event.into_pyobject(py)?.into_any().unbind()));
        }
        Ok(Some(("skip",).into_pyobject(py)?.into_any().unbind()))
    }

    /// Ends the map now: the server cancels the inputs still running and stops their workers.
    fn cancel(&self, py: Python<'_>) -> PyResult<()> {
        self.close();
        let runtime = runtime()?;
        py.detach(|| runtime.block_on(async { self.messages.lock().await.take() }));
        Ok(())
    }
}

/// A worker as the server lists it: `(pid, user, env_key, machine_type, busy, calls)`.
type ServerWorker = (String, String, String, String, bool, u64);

/// A connection to a fal-serverless server (the `cloud` host), with the key its calls carry.
#[pyclass(frozen, module = "fal_serverless._native")]
struct CloudClient {
    client: Client,
    /// The key its calls carry, for the server's REST side (users' storage).
    key: (String, String),
}

fn string_value(s: impl Into<String>) -> prost_types::Value {
    prost_types::Value { kind: Some(Kind::StringValue(s.into())) }
}

/// The virtualenv of our SDK's calls and apps: its Python, its requirements and the cloudpickle that loads them.
fn environment(python_version: String, requirements: Vec<String>, serializer: String) -> EnvironmentDefinition {
    let configuration = prost_types::Struct {
        fields: [
            ("python_version".to_string(), string_value(python_version)),
            ("serializer".to_string(), string_value(serializer)),
            (
                "requirements".to_string(),
                prost_types::Value {
                    kind: Some(Kind::ListValue(prost_types::ListValue {
                        values: requirements.into_iter().map(string_value).collect(),
                    })),
                },
            ),
        ]
        .into_iter()
        .collect(),
    };
    EnvironmentDefinition { kind: "virtualenv".into(), configuration: Some(configuration), force: false }
}

/// A server's log as `on_log` names its source: "stdout", "stderr", "build" or "engine".
fn log_source(entry: &fal_proto::Log) -> &'static str {
    match (entry.source(), entry.level()) {
        (LogSourceProto::User, LogLevel::Stderr) => "stderr",
        (LogSourceProto::User, _) => "stdout",
        (LogSourceProto::Builder, _) => "build",
        (LogSourceProto::Bridge, _) => "engine",
    }
}

/// An alias as `CloudClient.list_aliases` lists it: `(alias, revision, auth_mode, max_concurrency, min_concurrency,
/// max_multiplexing, machine_type, replicas, user_id, created_at)` (created_at in seconds since the epoch).
type AliasRow = (String, String, String, i32, i32, i32, String, i32, String, f64);

/// A line of an app's logs as `CloudClient.logs` hands it over: `(timestamp, source, app, request_id, line)`.
type LogRow = (f64, &'static str, String, String, String);

fn seconds(timestamp: Option<&prost_types::Timestamp>) -> f64 {
    timestamp.map(|t| t.seconds as f64 + f64::from(t.nanos) / 1e9).unwrap_or(0.0)
}

#[pymethods]
impl CloudClient {
    /// Connects to the server of `FAL_HOST` (or the local one) with the given key, else `FAL_KEY_ID` /
    /// `FAL_KEY_SECRET`, else the local server's key.
    #[new]
    #[pyo3(signature = (key_id=None, key_secret=None))]
    fn new(py: Python<'_>, key_id: Option<String>, key_secret: Option<String>) -> PyResult<Self> {
        let target = Target::resolve(key_id.zip(key_secret)).map_err(client_error)?;
        let runtime = runtime()?;
        let client = py.detach(|| runtime.block_on(Client::connect(&target))).map_err(client_error)?;
        Ok(Self { client, key: (target.key_id.clone(), target.key_secret.clone()) })
    }

    /// `(key_id, key_secret)`: what the REST side takes in `Authorization: Key id:secret`.
    #[getter]
    fn key(&self) -> (String, String) {
        self.key.clone()
    }

    /// `http://host:port` or `https://host:port`: the server as this client reaches it (https when it speaks TLS).
    #[getter]
    fn uri(&self) -> String {
        self.client.uri().to_string()
    }

    /// Runs one call on the server; returns `(raised, payload)`, like `Engine.call` (with its `setup`, `on_item` and
    /// `cancel`).
    #[pyo3(signature = (*, python_version, requirements, serializer, machine_type, keep_alive, payload, function_name, on_log, timeout = None, setup = None, on_item = None, cancel = None))]
    #[allow(clippy::too_many_arguments)]
    fn run<'py>(
        &self,
        py: Python<'py>,
        python_version: String,
        requirements: Vec<String>,
        serializer: String,
        machine_type: String,
        keep_alive: i32,
        payload: PyBackedBytes,
        function_name: String,
        on_log: Bound<'py, PyAny>,
        timeout: Option<f64>,
        setup: Option<PyBackedBytes>,
        on_item: Option<Bound<'py, PyAny>>,
        cancel: Option<Bound<'py, PyAny>>,
    ) -> PyResult<(bool, Bound<'py, PyBytes>)> {
        let timeout_seconds = timeout.map(|t| timeout_duration(t).map(|d| d.as_secs_f64())).transpose()?;
        let run = HostedRun {
            environments: vec![environment(python_version, requirements, serializer)],
            machine_requirements: Some(MachineRequirements {
                machine_type,
                keep_alive: Some(keep_alive),
                ..Default::default()
            }),
            function: Some(SerializedObject {
                method: "cloudpickle".into(),
                definition: Bytes::from_owner(payload),
                was_it_raised: false,
                stringized_traceback: None,
            }),
            setup_func: setup.map(cloudpickled),
            function_name: Some(function_name),
            timeout_seconds,
        };
        let client = self.client.clone();
        run_call_events(py, &on_log, on_item.as_ref(), cancel.as_ref(), move |events| async move {
            let items = events.clone();
            let on_log = move |entry: fal_proto::Log| drop(events.send(Event::Log(log_source(&entry), entry.message)));
            let on_item = move |item: SerializedObject| drop(items.send(Event::Item(item.definition)));
            let value = client.run(run, on_log, on_item).await.map_err(client_error)?;
            Ok((value.was_it_raised, value.definition))
        })
    }

    /// Starts a map of `function` (pickled alone) on the server; inputs (each a pickle of `(args, kwargs)`) are
    /// sent with `MapRun.send`, results read with `MapRun.next`.
    #[pyo3(signature = (*, python_version, requirements, serializer, machine_type, keep_alive, function, function_name, timeout = None, setup = None, concurrency = None))]
    #[allow(clippy::too_many_arguments)]
    fn map_start(
        &self,
        py: Python<'_>,
        python_version: String,
        requirements: Vec<String>,
        serializer: String,
        machine_type: String,
        keep_alive: i32,
        function: PyBackedBytes,
        function_name: String,
        timeout: Option<f64>,
        setup: Option<PyBackedBytes>,
        concurrency: Option<u32>,
    ) -> PyResult<MapRun> {
        let timeout_seconds = timeout.map(|t| timeout_duration(t).map(|d| d.as_secs_f64())).transpose()?;
        let map = HostedMap {
            environments: vec![environment(python_version, requirements, serializer)],
            machine_requirements: Some(MachineRequirements {
                machine_type,
                keep_alive: Some(keep_alive),
                ..Default::default()
            }),
            function: Some(cloudpickled(function)),
            inputs: Vec::new(),
            setup_func: setup.map(cloudpickled),
            function_name: Some(function_name),
            timeout_seconds,
            concurrency,
        };
        let runtime = runtime()?;
        let (inputs, more) = tokio::sync::mpsc::channel::<Vec<SerializedObject>>(MAP_BATCHES_HELD);
        let client = self.client.clone();
        let messages = py
            .detach(|| runtime.block_on(client.map(map, tokio_stream::wrappers::ReceiverStream::new(more))))
            .map_err(client_error)?;
        Ok(MapRun { inputs: std::sync::Mutex::new(Some(inputs)), messages: tokio::sync::Mutex::new(Some(messages)) })
    }

    /// Deploys a web endpoint: `payload` is the call that serves it on port `exposed_port` (pickled as for `run`);
    /// with no `exposed_port` and no alias, registers a plain function for a schedule (`register_cron`).
    /// Build logs go to `on_log(source, line)` as for `run`. Returns `(revision_id, user_id)`.
    #[pyo3(signature = (*, python_version, requirements, serializer, machine_type, keep_alive, payload, function_name, alias, auth_mode, max_concurrency, min_concurrency, max_multiplexing, exposed_port, on_log))]
    #[allow(clippy::too_many_arguments)]
    fn register_application<'py>(
        &self,
        py: Python<'py>,
        python_version: String,
        requirements: Vec<String>,
        serializer: String,
        machine_type: String,
        keep_alive: i32,
        payload: PyBackedBytes,
        function_name: String,
        alias: Option<String>,
        auth_mode: &str,
        max_concurrency: Option<i32>,
        min_concurrency: Option<i32>,
        max_multiplexing: Option<i32>,
        exposed_port: Option<i32>,
        on_log: Bound<'py, PyAny>,
    ) -> PyResult<(String, String)> {
        let auth_mode = fal_client::parse_auth_mode(auth_mode).map_err(client_error)?;
        let request = RegisterApplicationRequest {
            environments: vec![environment(python_version, requirements, serializer)],
            machine_requirements: Some(MachineRequirements {
                machine_type,
                keep_alive: Some(keep_alive),
                exposed_port,
                ..Default::default()
            }),
            function: Some(SerializedObject {
                method: "cloudpickle".into(),
                definition: Bytes::from_owner(payload),
                was_it_raised: false,
                stringized_traceback: None,
            }),
            setup_func: None,
            application_name: alias,
            auth_mode: Some(auth_mode as i32),
            max_concurrency,
            min_concurrency,
            max_multiplexing,
            function_name: Some(function_name),
        };
        let client = self.client.clone();
        run_logged(py, runtime()?, &on_log, move |log| async move {
            let registered = client
                .register_application(request, move |entry| log(log_source(&entry), entry.message))
                .await
                .map_err(client_error)?;
            Ok((registered.revision, registered.user_id))
        })
    }

    /// Schedules the registered function `revision` at the times of `cron` (UTC); returns the schedule's id.
    fn register_cron(&self, py: Python<'_>, revision: String, cron: String) -> PyResult<String> {
        let runtime = runtime()?;
        let client = self.client.clone();
        py.detach(|| runtime.block_on(client.register_cron(&revision, &cron))).map_err(client_error)
    }

    /// The aliases of this key's user (every user's, for an admin), as `AliasRow`s.
    fn list_aliases(&self, py: Python<'_>) -> PyResult<Vec<AliasRow>> {
        let runtime = runtime()?;
        let client = self.client.clone();
        let aliases = py.detach(|| runtime.block_on(client.list_aliases())).map_err(client_error)?;
        Ok(aliases
            .into_iter()
            .map(|a| {
                let created_at = seconds(a.created_at.as_ref());
                (
                    a.alias,
                    a.revision,
                    fal_client::auth_mode_name(a.auth_mode),
                    a.max_concurrency,
                    a.min_concurrency,
                    a.max_multiplexing,
                    a.machine_type,
                    a.replicas,
                    a.user_id,
                    created_at,
                )
            })
            .collect())
    }

    /// Removes an alias; returns the revision it pointed to.
    fn delete_alias(&self, py: Python<'_>, alias: String) -> PyResult<String> {
        let runtime = runtime()?;
        let client = self.client.clone();
        py.detach(|| runtime.block_on(client.delete_alias(&alias))).map_err(client_error)
    }

    /// Reads apps' logs (of `alias`, an alias or revision id, else of every app of this user's): the last `lines`
    /// lines, then, with `follow`, new ones until Ctrl-C. Each goes to `on_line(timestamp, source, app,
    /// request_id, line)` as it arrives.
    #[pyo3(signature = (*, alias, lines, follow, on_line))]
    fn logs(
        &self,
        py: Python<'_>,
        alias: Option<String>,
        lines: Option<i32>,
        follow: bool,
        on_line: Bound<'_, PyAny>,
    ) -> PyResult<()> {
        if let Some(n) = lines.filter(|n| *n < 0) {
            return Err(PyValueError::new_err(format!("lines must be 0 or more, got {n}")));
        }
        let query = fal_client::LogsQuery { app: alias, lines, follow };
        let client = self.client.clone();
        run_streaming(
            py,
            runtime()?,
            None,
            |row: LogRow| on_line.call1(row).map(drop),
            move |rows| async move {
                client
                    .get_logs(query, move |line| {
                        let entry = line.log_entry.unwrap_or_default();
                        let row = (
                            seconds(entry.timestamp.as_ref()),
                            log_source(&entry),
                            line.app,
                            line.request_id,
                            entry.message,
                        );
                        drop(rows.send(row));
                    })
                    .await
                    .map_err(client_error)
            },
        )
    }

    /// Live workers of this key's user (all, for an admin) as `(pid, user, env_key, machine_type, busy, calls)`.
    fn workers(&self, py: Python<'_>) -> PyResult<Vec<ServerWorker>> {
        let runtime = runtime()?;
        let client = self.client.clone();
        let workers = py.detach(|| runtime.block_on(client.workers())).map_err(client_error)?;
        Ok(workers.into_iter().map(|w| (w.worker_id, w.user_id, w.env_key, w.machine_type, w.busy, w.calls)).collect())
    }
}

/// Where the zero-config local server writes its address and key.
#[pyfunction]
fn local_server_credentials_path() -> PathBuf {
    fal_client::LocalServer::credentials_path()
}

/// Makes the credentials file's directory (mode 0700) if missing and checks that it is this user's alone; returns
/// the file's path.
#[pyfunction]
fn prepare_local_server_dir() -> PyResult<PathBuf> {
    fal_client::LocalServer::prepare_dir().map_err(|e| NoServerConfiguredError::new_err(e.to_string()))
}

/// The local server's `(host, pid)` from its credentials file, `None` without one; refuses a file (or directory)
/// that could be someone else's.
#[pyfunction]
fn read_local_server() -> PyResult<Option<(String, u32)>> {
    let info = fal_client::LocalServer::read().map_err(|e| NoServerConfiguredError::new_err(e.to_string()))?;
    Ok(info.map(|info| (info.host, info.pid)))
}

/// Runs the `fal-serverless` command line (`argv[0]` is the program name); returns its exit code.
#[pyfunction]
fn cli_main(py: Python<'_>, argv: Vec<String>) -> i32 {
    let code = py.detach(|| fal_cli::main(argv.into_iter().map(Into::into)));
    if code == std::process::ExitCode::SUCCESS {
        0
    } else {
        1
    }
}

fn timeout_duration(seconds: f64) -> PyResult<Duration> {
    options::timeout(seconds).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Parses and normalizes PEP 508 requirements; raises ValueError naming a malformed one.
#[pyfunction]
fn normalize_requirements(requirements: Vec<String>) -> PyResult<Vec<String>> {
    fal_engine::normalize_requirements(&requirements).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// The content key of the environment for these requirements, as worker listings show it.
#[pyfunction]
fn environment_key(python_version: &str, requirements: Vec<String>, serializer: &str) -> PyResult<String> {
    Ok(env_spec(python_version, &requirements, serializer)?.key())
}

/// The spec of our SDK's environments: cloudpickle calls, with cloudpickle pinned by `serializer`.
fn env_spec(python_version: &str, requirements: &[String], serializer: &str) -> PyResult<EnvSpec> {
    let invalid = |e: fal_engine::EnvironmentError| PyValueError::new_err(e.to_string());
    let python: PythonVersion = python_version.parse().map_err(invalid)?;
    let spec =
        EnvSpec::new(python, requirements, Serializer::cloudpickle(serializer).map_err(invalid)?).map_err(invalid)?;
    spec.check_protocol().map_err(|e| EnvironmentBuildError::new_err(e.to_string()))?;
    Ok(spec)
}

/// The built-in machine types as `(name, cpus, memory_bytes, gpus)`, smallest first.
#[pyfunction]
fn machine_types() -> Vec<(String, f64, u64, u32)> {
    fal_engine::MachineTypes::builtin().iter().map(|t| (t.name.clone(), t.cpus, t.memory_bytes, t.gpus)).collect()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Engine>()?;
    m.add_class::<CloudClient>()?;
    m.add_function(wrap_pyfunction!(cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(local_server_credentials_path, m)?)?;
    m.add_function(wrap_pyfunction!(prepare_local_server_dir, m)?)?;
    m.add_function(wrap_pyfunction!(read_local_server, m)?)?;
    m.add_function(wrap_pyfunction!(normalize_requirements, m)?)?;
    m.add_function(wrap_pyfunction!(machine_types, m)?)?;
    m.add_function(wrap_pyfunction!(environment_key, m)?)?;
    m.add("MAX_SECONDS", options::MAX_SECONDS)?;
    m.add("PYTHON_VARIABLE", fal_cli::PYTHON_VARIABLE)?;
    m.add("FalServerlessError", py.get_type::<FalServerlessError>())?;
    m.add("EnvironmentBuildError", py.get_type::<EnvironmentBuildError>())?;
    m.add("WorkerDiedError", py.get_type::<WorkerDiedError>())?;
    m.add("MachineTypeExceededError", py.get_type::<MachineTypeExceededError>())?;
    m.add("MachineTypeUnavailableError", py.get_type::<MachineTypeUnavailableError>())?;
    m.add("PayloadTooLargeError", py.get_type::<PayloadTooLargeError>())?;
    m.add("CallTimeoutError", py.get_type::<CallTimeoutError>())?;
    m.add("AuthenticationError", py.get_type::<AuthenticationError>())?;
    m.add("NoServerConfiguredError", py.get_type::<NoServerConfiguredError>())?;
    m.add("ServerBusyError", py.get_type::<ServerBusyError>())?;
    m.add("ServerUnavailableError", py.get_type::<ServerUnavailableError>())?;
    m.add("CallCancelledError", py.get_type::<CallCancelledError>())?;
    m.add_class::<MapRun>()?;
    Ok(())
}
