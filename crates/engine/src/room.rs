//! Room for a new worker: what a worker holds for as long as it lives, warm idle time included.
//!
//! The engine asks its caller's [`Room`] only when a call needs a new worker; a call that finds a warm one waits for
//! nothing, since that worker already holds its share. The server's room is its capacity (machine type sizes, per
//! user shares); the local host has none.

use std::any::Any;
use std::time::Duration;

use crate::error::CallError;
use crate::logs::LogSink;
use crate::machine::MachineType;
use crate::worker::BoxFuture;

/// What a worker keeps while it lives; dropped after the worker has stopped.
pub type Hold = Box<dyn Any + Send + Sync>;

pub trait Room: Send + Sync + std::fmt::Debug {
    /// Waits (at most `wait`) until a worker of `machine` may start, and returns what it must hold.
    fn reserve<'a>(
        &'a self,
        machine: &'a MachineType,
        wait: Option<Duration>,
        logs: &'a LogSink,
    ) -> BoxFuture<'a, Result<Hold, CallError>>;
}
