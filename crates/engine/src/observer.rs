//! What the engine reports as it works, for whoever counts it (the server's Prometheus metrics): a seam, so the
//! engine keeps no metrics library of its own and a caller without one pays nothing.

use std::time::Duration;

/// Told of each environment build and each worker start. Calls come from the engine's tasks: keep them cheap.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// An environment was built (`ok`), or its build failed, after `took`.
    fn environment_built(&self, ok: bool, took: Duration);
    /// A worker of `machine_type` was started for a call (a cold start, its environment ready), after `took`.
    fn worker_started(&self, machine_type: &str, took: Duration);
}
