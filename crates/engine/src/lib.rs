//! The engine: turns "run this pickled call in an environment with these requirements, on this machine type" into
//! a result.
//!
//! It owns three things and nothing else:
//! * [environments](EnvSpec): a spec (Python major.minor, normalized requirements, serializer) hashes to a content
//!   key; the environment is built once per (tenant, key) with `uv venv` + `uv pip install`, atomically, into a
//!   cache dir;
//! * [workers](Engine::call): a warm Python process per (tenant, environment, machine type), reused within
//!   `keep_alive`, talking length-prefixed frames on a socket of its own while its stdout and stderr stream back as
//!   [`LogLine`]s;
//! * [machine types](MachineTypes): the CPU, memory and GPU ceilings a worker runs under, applied by `fal-sandbox`.
//!
//! It knows nothing of gRPC, PyO3 or authentication: payloads are opaque bytes, tenants are opaque strings.

mod engine;
mod environment;
mod error;
mod logs;
mod machine;
mod worker;

pub use crate::engine::{CallReply, CallRequest, Engine, EngineConfig, WorkerInfo};
pub use crate::environment::{normalize_requirements, EnvSpec, PythonVersion};
pub use crate::error::{CallError, EnvironmentError};
pub use crate::logs::{LogLine, LogSink, LogSource};
pub use crate::machine::{MachineType, MachineTypes, UnknownMachineType};
