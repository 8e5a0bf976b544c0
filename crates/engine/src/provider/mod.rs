//! Providers: where workers run. The engine builds a worker's environment and decides when it needs a new worker; a
//! provider starts that worker on its machines, under the machine type's limits, and hands it back connected.
//!
//! * [`local`]: a process of this host, in a cgroup the engine makes (and the server's jail), on GPUs of its own
//!   ([`gpus`]) for GPU machine types.
//! * [`cluster`]: a job of a cluster's engine on one of its nodes, sized by the machine type, whose agent connects
//!   back over TCP; the cluster enforces the limits. One [`cluster::Launcher`] per cluster engine:
//!   * [`slurm`]: a Slurm batch job;
//!   * [`kubernetes`]: a pod.
//!
//! Another cluster engine is another [`cluster::Launcher`]; a provider that is not a cluster at all, another
//! implementation of [`Provider`] and of the [`Placement`](crate::worker::Placement) its workers report their end
//! through.

pub(crate) mod cluster;
pub(crate) mod gpus;
pub(crate) mod kubernetes;
pub(crate) mod local;
pub(crate) mod slurm;

use crate::error::CallError;
use crate::logs::LogSink;
use crate::machine::MachineType;
use crate::worker::{BoxFuture, Worker, WorkerSpec};

pub use kubernetes::{EnvironmentsVolume, KubernetesConfig, PodResources, PodToleration};
pub use slurm::{SlurmAllocation, SlurmConfig};

/// Which provider an engine runs its workers with.
#[derive(Debug, Clone, Default)]
pub enum ProviderConfig {
    /// Processes of this host.
    #[default]
    Local,
    /// Jobs of a Slurm cluster.
    Slurm(SlurmConfig),
    /// Pods of a Kubernetes cluster.
    Kubernetes(KubernetesConfig),
}

impl ProviderConfig {
    /// The cluster engine workers run on (`"Slurm"`, `"Kubernetes"`); `None`: this host.
    pub fn cluster(&self) -> Option<&'static str> {
        match self {
            Self::Local => None,
            Self::Slurm(_) => Some("Slurm"),
            Self::Kubernetes(_) => Some("Kubernetes"),
        }
    }
}

pub(crate) trait Provider: Send + Sync + std::fmt::Debug {
    /// Starts a worker of `spec` sized for `machine`, and returns it once its agent is connected. `wait` bounds how
    /// long that may take waiting for resources (a cluster's queue, this host's GPUs): the call's timeout.
    fn start<'a>(
        &'a self,
        spec: WorkerSpec,
        machine: &'a MachineType,
        wait: Option<std::time::Duration>,
        logs: &'a LogSink,
    ) -> BoxFuture<'a, Result<Worker, CallError>>;

    /// GPUs a machine type may be given (for capacity and early refusals); `None`: the provider does not know.
    fn gpus(&self) -> Option<u32>;

    /// Finishes what the provider still does for workers that are gone (a cluster's cancellations), before the
    /// engine stops.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
