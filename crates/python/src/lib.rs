//! `fal_serverless._native`: the engine, embedded in the client process for the `local` host.
//!
//! A thin binding: it converts Python arguments into an engine [`CallRequest`], runs the call on a process-wide
//! tokio runtime while the GIL is released, hands log lines to a Python callback as they arrive, and maps engine
//! errors onto the exception classes below. Pickling, hosts and decorators live in the Python package.

use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::Duration;

use fal_engine::{CallError, CallReply, CallRequest, EngineConfig, EnvSpec, LogSink, LogSource, PythonVersion};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
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

enum Event {
    Log(LogSource, String),
    Done(Result<CallReply, CallError>),
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
        CallError::NoGpu { .. } => MachineTypeUnavailableError::new_err(message),
        CallError::Environment(_) => EnvironmentBuildError::new_err(message),
        CallError::OutOfMemory { .. } => MachineTypeExceededError::new_err(message),
        CallError::WorkerDied { .. } => WorkerDiedError::new_err(message),
        CallError::PayloadTooLarge { .. } | CallError::ResultTooLarge { .. } => PayloadTooLargeError::new_err(message),
        CallError::Spawn(_) => FalServerlessError::new_err(message),
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
        // The engine spawns its workers from the runtime's threads, which live as long as the process.
        let _guard = runtime()?.enter();
        Ok(Self { engine: fal_engine::Engine::new(config), cache_dir })
    }

    #[getter]
    fn cache_dir(&self) -> PathBuf {
        self.cache_dir.clone()
    }

    /// Runs one call; returns `(raised, payload, worker_pid)`. `on_log(source, line)` is called for every line
    /// the call logs, with source one of "stdout", "stderr", "build", "engine".
    #[pyo3(signature = (*, python_version, interpreter, requirements, serializer, machine_type, keep_alive, payload, on_log, tenant = "local".to_string()))]
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
        payload: &[u8],
        on_log: Bound<'py, PyAny>,
        tenant: String,
    ) -> PyResult<(bool, Bound<'py, PyBytes>, u32)> {
        let python: PythonVersion = python_version.parse().map_err(|e| PyValueError::new_err(format!("{e}")))?;
        let env = EnvSpec::new(python, &requirements, serializer).map_err(|e| PyValueError::new_err(e.to_string()))?;
        if !(keep_alive.is_finite() && keep_alive >= 0.0) {
            return Err(PyValueError::new_err(format!("keep_alive must be 0 or more seconds, got {keep_alive}")));
        }
        let request = CallRequest {
            tenant,
            env,
            interpreter,
            machine_type,
            keep_alive: Duration::from_secs_f64(keep_alive),
            payload: payload.to_vec(),
        };

        let (events, received) = mpsc::channel::<Event>();
        let log_events = events.clone();
        let logs = LogSink::new(move |line| drop(log_events.send(Event::Log(line.source, line.line))));
        let engine = self.engine.clone();
        let task = runtime()?.spawn(async move {
            let outcome = engine.call(request, &logs).await;
            let _ = events.send(Event::Done(outcome));
        });
        // Aborting drops the call, which stops the worker it holds: a call the caller gave up on never lingers.
        let abort = scopeguard(move || task.abort());
        let mut receiver = received;
        loop {
            // The receiver travels into the GIL-free closure and back: `&Receiver` may not cross threads.
            let (event, back) = py.detach(move || (receiver.recv_timeout(SIGNAL_CHECK), receiver));
            receiver = back;
            match event {
                Ok(Event::Log(source, line)) => {
                    on_log.call1((source_name(source), line))?;
                }
                Ok(Event::Done(outcome)) => {
                    abort.defuse();
                    let reply = outcome.map_err(to_py_err)?;
                    return Ok((reply.raised, PyBytes::new(py, &reply.payload), reply.worker_pid));
                }
                Err(RecvTimeoutError::Timeout) => py.check_signals()?,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(FalServerlessError::new_err("the engine stopped before the call finished"));
                }
            }
        }
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

/// Runs a closure on drop unless defused.
struct ScopeGuard<F: FnOnce()>(Option<F>);

fn scopeguard<F: FnOnce()>(f: F) -> ScopeGuard<F> {
    ScopeGuard(Some(f))
}

impl<F: FnOnce()> ScopeGuard<F> {
    fn defuse(mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for ScopeGuard<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// Parses and normalizes PEP 508 requirements; raises ValueError naming a malformed one.
#[pyfunction]
fn normalize_requirements(requirements: Vec<String>) -> PyResult<Vec<String>> {
    fal_engine::normalize_requirements(&requirements).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// The content key of the environment for these requirements, as worker listings show it.
#[pyfunction]
fn environment_key(python_version: &str, requirements: Vec<String>, serializer: &str) -> PyResult<String> {
    let python: PythonVersion = python_version.parse().map_err(|e| PyValueError::new_err(format!("{e}")))?;
    let spec = EnvSpec::new(python, &requirements, serializer).map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(spec.key())
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
    m.add_function(wrap_pyfunction!(normalize_requirements, m)?)?;
    m.add_function(wrap_pyfunction!(machine_types, m)?)?;
    m.add_function(wrap_pyfunction!(environment_key, m)?)?;
    m.add("FalServerlessError", py.get_type::<FalServerlessError>())?;
    m.add("EnvironmentBuildError", py.get_type::<EnvironmentBuildError>())?;
    m.add("WorkerDiedError", py.get_type::<WorkerDiedError>())?;
    m.add("MachineTypeExceededError", py.get_type::<MachineTypeExceededError>())?;
    m.add("MachineTypeUnavailableError", py.get_type::<MachineTypeUnavailableError>())?;
    m.add("PayloadTooLargeError", py.get_type::<PayloadTooLargeError>())?;
    Ok(())
}
