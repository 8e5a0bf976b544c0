//! Room for a call: what it holds while it runs, and what a new worker holds for as long as it lives.
//!
//! The engine asks its caller's [`Room`] before each call runs: for a call that found a warm worker, room to run
//! (the server counts CPUs of running calls); for one that needs a new worker, that too and room for the worker
//! itself (memory and GPUs, which a warm idle worker keeps). The server's room is its capacity (machine type sizes,
//! per user shares); the local host has none.

use std::any::Any;
use std::time::Duration;

use crate::error::CallError;
use crate::logs::LogSink;
use crate::machine::MachineType;
use crate::worker::BoxFuture;

/// Something held until dropped: by a call until it ends, or by a worker until it has stopped.
pub type Hold = Box<dyn Any + Send + Sync>;

/// What [`Room::reserve`] gives: the call's part, and, when a new worker was asked for, the worker's.
#[derive(Debug)]
pub struct Granted {
    pub call: Hold,
    pub worker: Option<Hold>,
}

pub trait Room: Send + Sync + std::fmt::Debug {
    /// Waits (at most `wait`) until a call of `machine` may run, on a new worker if `new_worker`.
    fn reserve<'a>(
        &'a self,
        machine: &'a MachineType,
        new_worker: bool,
        wait: Option<Duration>,
        logs: &'a LogSink,
    ) -> BoxFuture<'a, Result<Granted, CallError>>;
}
