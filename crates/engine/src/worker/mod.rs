//! Workers: Python processes inside an environment that run one call at a time.
//!
//! The engine and a worker speak [frames](frame) on a socket of their own (fd 3 in the worker); the worker's stdout
//! and stderr are read line by line into the call's logs. On this host those are a socket pair and two pipes; for a
//! Slurm job, three TCP streams. Where the worker runs (and how it ended) is its [`Placement`]'s business.
//! `agent.py` is the worker's side: stdlib and its serializer only, so an environment never needs this project
//! installed.

pub(crate) mod frame;
mod link;
mod output;
mod pool;
mod process;

pub use link::{LinkGrant, WorkerLink};
pub(crate) use pool::{PoolKey, Taken, WorkerPool};
pub use process::BoxFuture;
pub(crate) use process::{AgentCommand, NoReply, Outgoing, Placement, Worker, WorkerJail, WorkerSpec};
