//! What can go wrong with a call, in words a user can act on.

use std::path::PathBuf;

use crate::machine::UnknownMachineType;

/// An environment could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum EnvironmentError {
    #[error("invalid requirement {requirement:?}: {reason}")]
    InvalidRequirement { requirement: String, reason: String },
    #[error(
        "requirement {requirement:?} would replace the {needed} this environment's worker unpickles calls with \
         ({why}), and no call could run: remove it from requirements, or allow {needed}"
    )]
    BreaksProtocol { requirement: String, needed: String, why: &'static str },
    #[error("invalid python version {0:?}: expected MAJOR.MINOR, for example \"3.11\"")]
    InvalidPythonVersion(String),
    #[error(
        "Python {requested} is not available on this machine; it has {}. Install Python {requested} there, or run \
         the client with one of those versions",
        if available.is_empty() { "none that uv can find".to_string() } else { available.join(", ") }
    )]
    PythonNotFound { requested: String, available: Vec<String> },
    #[error("could not run uv at {uv}: {source}; install uv (`pip install uv`) or point FAL_SERVERLESS_UV at it")]
    UvMissing {
        uv: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not install requirements [{requirements}] for Python {python}:\n{output}")]
    InstallFailed { requirements: String, python: String, output: String },
    #[error("could not create the virtual environment for Python {python}:\n{output}")]
    VenvFailed { python: String, output: String },
    #[error(
        "the environment build took longer than the server's build timeout of {seconds} s and was stopped; ask the \
         server's admin to raise [build] timeout_seconds, or use requirements that install faster (wheels)"
    )]
    BuildTimeout { seconds: u64 },
    #[error(
        "the environment build exceeded the server's build memory limit of {memory_mb} MB and was killed; ask the \
         server's admin to raise [build] memory_gb"
    )]
    BuildOutOfMemory { memory_mb: u64 },
    #[error(
        "the environment build wrote more than the server's build disk limit of {gigabytes} GB and was stopped; ask \
         the server's admin to raise [build] disk_gb, or use smaller requirements"
    )]
    BuildDiskExceeded { gigabytes: f64 },
    #[error(
        "you have {count} environments, the most this server keeps per user ([environments] max_per_user = {limit}), \
         and every one is in use by a live worker, so none can make room for a new one. Wait for those workers to \
         stop (warm workers stop when their keep_alive ends), or ask the server's admin to raise max_per_user or \
         remove environments (`fal-serverless envs rm`, `fal-serverless envs prune`)"
    )]
    UserEnvironments { count: usize, limit: usize },
    #[error(
        "your environments take {gigabytes:.2} GB, the most this server keeps per user ([environments] \
         disk_per_user_gb = {limit_gigabytes:.2}), and every one is in use by a live worker, so none can make room \
         for a new one. Wait for those workers to stop (warm workers stop when their keep_alive ends), or ask the \
         server's admin to raise disk_per_user_gb or remove environments (`fal-serverless envs rm`, \
         `fal-serverless envs prune`)"
    )]
    UserDisk { gigabytes: f64, limit_gigabytes: f64 },
    #[error("could not set up the build's sandbox: {0}")]
    Sandbox(String),
    #[error("environment cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A call that did not produce a reply from the function.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    UnknownMachineType(#[from] UnknownMachineType),
    #[error(
        "machine type {machine_type} needs {needed} GPU(s); this machine has {available}. Use a CPU machine type \
         (XS, S, M, L, XL) or run on a host with GPUs"
    )]
    NoGpu { machine_type: String, needed: u32, available: u32 },
    #[error(
        "no GPU came free for machine type {machine_type} (needs {needed}) in the {seconds:.1} s the call's timeout \
         left: each of this host's {total} GPU(s) was held by another worker, running a call or warm for its \
         keep_alive. Retry later, pass a larger timeout, or use a smaller keep_alive for GPU functions"
    )]
    GpuWait { machine_type: String, needed: u32, total: u32, seconds: f64 },
    #[error(transparent)]
    Environment(#[from] EnvironmentError),
    #[error("could not start a worker: {0}")]
    Spawn(String),
    #[error(
        "the cluster refused an allocation for machine type {machine_type} ({options}): {reason}. Use another \
         machine type, or ask the server's admin to change its mapping ([{section}.machine_types.{machine_type}])"
    )]
    Allocation {
        machine_type: String,
        options: String,
        reason: String,
        /// The config table that maps machine types for this cluster: `slurm`, `kubernetes`.
        section: &'static str,
    },
    #[error(
        "the worker exceeded the {memory} of machine type {machine_type} {}; use a larger machine_type",
        if *child {
            "(the kernel killed a process the function started, so the call was stopped with its worker)"
        } else {
            "and was killed"
        }
    )]
    OutOfMemory {
        machine_type: String,
        memory: String,
        /// The process killed was one the function started (its worker's agent lived on).
        child: bool,
    },
    #[error("the worker running this call died before returning: it {how}. The next call gets a fresh worker")]
    WorkerDied { how: String },
    #[error(
        "the call's arguments are {size} bytes when pickled, over the limit of {limit} bytes; pass large data by \
         reference (a path or URL) instead"
    )]
    PayloadTooLarge { size: usize, limit: usize },
    #[error(
        "the function's result is {size} bytes when pickled, over the limit of {limit} bytes; return large data by \
         reference (write it to a file and return its path) instead. The worker was stopped"
    )]
    ResultTooLarge { size: usize, limit: usize },
    #[error(
        "the call reached its timeout of {seconds} s and was stopped (its worker too, if it had started); if it \
         needs longer, pass a larger timeout: @isolated(timeout=...)"
    )]
    Timeout { seconds: f64 },
    /// The server's capacity refused to queue the call (a per-user limit); the message names the limit.
    #[error("{0}")]
    Busy(String),
}
