//! The engine: turns "run this pickled call in an environment with these requirements, on this machine type" into
//! a result.
//!
//! It owns these things and nothing else:
//! * [environments](EnvSpec): a spec (Python major.minor, normalized requirements, serializer) hashes to a content
//!   key; the environment is built once per (tenant, key) with `uv venv` + `uv pip install`, atomically, into a
//!   cache dir, and removed by an [eviction policy](EnvironmentPolicy) when unused long enough or over a disk
//!   budget, never while in use ([`EnvironmentStore`]);
//! * [workers](Engine::call): a warm Python process per (tenant, environment, machine type), reused within
//!   `keep_alive`, talking length-prefixed frames on a socket of its own while its stdout and stderr stream back as
//!   [`LogLine`]s;
//! * [worker variables](WorkerVariables): environment variables a caller gives a call's workers (opaque to the
//!   engine, shown by name only), part of what makes a warm worker reusable;
//! * [machine types](MachineTypes): the CPU, memory and GPU ceilings a worker runs under, applied by `fal-sandbox`
//!   on this host, or by Slurm when workers run on a cluster ([`ProviderConfig`]).
//!
//! It knows nothing of gRPC, PyO3 or authentication: payloads are opaque bytes, tenants are opaque strings.

mod engine;
mod environment;
mod error;
mod logs;
mod machine;
mod observer;
pub mod options;
mod provider;
mod room;
mod variables;
mod worker;

pub use crate::engine::{
    BuildLimits, CallReply, CallRequest, CallWorker, Engine, EngineConfig, WorkerInfo, WorkerStop,
};
pub use crate::environment::{
    normalize_requirements, EnvSpec, EnvironmentInfo, EnvironmentPolicy, EnvironmentStore, Eviction, EvictionReason,
    PruneReport, PythonVersion, Removal, RemoveError, Serializer, DILL_LAYER,
};
pub use crate::error::{CallError, EnvironmentError};
pub use crate::logs::{LogBudget, LogLine, LogSink, LogSource};
pub use crate::machine::{MachineType, MachineTypes, UnknownMachineType};
pub use crate::observer::Observer;
pub use crate::provider::{
    EnvironmentsVolume, KubernetesConfig, PodResources, PodToleration, ProviderConfig, SlurmAllocation, SlurmConfig,
};
pub use crate::room::{Granted, Hold, Room};
pub use crate::variables::WorkerVariables;
pub use crate::worker::{BoxFuture, LinkGrant, WorkerLink};

/// Entry points for the fuzz targets in `fuzz/` (and their regression tests); not part of the engine's API.
#[doc(hidden)]
pub mod fuzzing {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    use crate::worker::frame::FrameReader;

    /// Reads `bytes` as the engine reads a worker's socket: frames until the end or the first error. Returns how
    /// many whole frames were read.
    pub fn read_worker_frames(bytes: &[u8], max_payload: usize) -> usize {
        let mut reader = FrameReader::new(max_payload);
        let mut input = bytes;
        let mut frames = 0;
        loop {
            let next = std::pin::pin!(reader.next(&mut input));
            // A byte slice is always ready: the read completes in one poll.
            match next.poll(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(Ok(Some(_))) => frames += 1,
                Poll::Ready(_) | Poll::Pending => return frames,
            }
        }
    }

    #[cfg(test)]
    mod tests {
        /// Every input kept in fuzz/regressions/worker_frames (crashes the fuzzer found, edge cases) still reads
        /// without a panic.
        #[test]
        fn kept_fuzz_inputs_read_without_panicking() {
            let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/regressions/worker_frames");
            let inputs: Vec<_> =
                std::fs::read_dir(dir).unwrap().map(|e| std::fs::read(e.unwrap().path()).unwrap()).collect();
            assert!(!inputs.is_empty());
            for input in inputs {
                super::read_worker_frames(&input, 1 << 20);
            }
            let two = [&[0, 0, 0, 1, 2, 7][..], &[0, 0, 0, 0, 3]].concat();
            assert_eq!(super::read_worker_frames(&two, 10), 2);
        }
    }
}
