//! The local provider: workers are processes of this host, each in a cgroup with its machine type's limits and, when
//! jailed, in a network namespace of its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fal_sandbox::{CgroupManager, JailNetwork, Limits, NetworkManager, WorkerCgroup};

use super::Provider;
use crate::error::CallError;
use crate::logs::{LogSink, LogSource};
use crate::machine::MachineType;
use crate::worker::{BoxFuture, Worker, WorkerSpec};

#[derive(Debug)]
pub(crate) struct LocalProvider {
    cgroups: Arc<Result<CgroupManager, String>>,
    /// Network namespaces for jailed workers; `None`: the jail gives them loopback only.
    network: Option<Arc<NetworkManager>>,
    warned_unlimited: AtomicBool,
    gpus: u32,
}

impl LocalProvider {
    pub fn new(cgroups: Arc<Result<CgroupManager, String>>, network: Option<Arc<NetworkManager>>) -> Self {
        let provider = Self { cgroups, network, warned_unlimited: AtomicBool::new(false), gpus: count_gpus() };
        if let Some(network) = provider.network.clone() {
            std::thread::spawn(move || network.refill());
        }
        provider
    }

    /// A cgroup with the machine type's limits, or `None` (with one warning per engine) where limits cannot be set.
    /// Made on a blocking thread: a cgroup's directories and files are written one system call at a time.
    async fn cgroup_for(&self, machine: &MachineType, logs: &LogSink) -> Result<Option<WorkerCgroup>, CallError> {
        match self.cgroups.as_ref() {
            Ok(_) => {
                let limits = Limits { cpus: machine.cpus, memory_bytes: machine.memory_bytes, pids: machine.pids };
                let cgroups = self.cgroups.clone();
                tokio::task::spawn_blocking(move || match cgroups.as_ref() {
                    Ok(manager) => manager.create(&limits).map(Some).map_err(|e| CallError::Spawn(e.to_string())),
                    Err(_) => Ok(None),
                })
                .await
                .map_err(|e| CallError::Spawn(format!("the task preparing the worker's cgroup failed: {e}")))?
            }
            Err(reason) => {
                if !self.warned_unlimited.swap(true, Ordering::Relaxed) {
                    logs.send(
                        LogSource::Engine,
                        format!(
                            "machine type limits cannot be applied on this machine, so workers run without CPU and \
                             memory limits ({reason}). Run as root, or on a host with a delegated cgroup v2 \
                             hierarchy, to enforce them."
                        ),
                    );
                }
                Ok(None)
            }
        }
    }

    /// `CUDA_VISIBLE_DEVICES` for a worker of `machine`: empty for CPU types (no GPU is visible to them); for GPU
    /// types the first GPUs of this host (the engine refused types needing more than [`Provider::gpus`] says). On the
    /// local host workers share the host's GPUs, as the user's own processes do; exclusive assignment is the server's
    /// job.
    fn visible_gpus(machine: &MachineType) -> String {
        (0..machine.gpus).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
    }
}

impl Provider for LocalProvider {
    fn start<'a>(
        &'a self,
        mut spec: WorkerSpec,
        machine: &'a MachineType,
        _wait: Option<std::time::Duration>,
        logs: &'a LogSink,
    ) -> BoxFuture<'a, Result<Worker, CallError>> {
        Box::pin(async move {
            spec.visible_gpus = Some(Self::visible_gpus(machine));
            spec.cgroup = self.cgroup_for(machine, logs).await?;
            if let (Some(jail), Some(network)) = (spec.jail.as_mut(), &self.network) {
                let taken = network.clone();
                let egress = network.policy().egress;
                let namespace = tokio::task::spawn_blocking(move || taken.take(egress))
                    .await
                    .map_err(|e| CallError::Spawn(format!("the task preparing the network failed: {e}")))?
                    .map_err(|e| CallError::Spawn(e.to_string()))?;
                // The next cold start finds one ready.
                let refill = network.clone();
                tokio::task::spawn_blocking(move || refill.refill());
                if namespace.path().is_some() {
                    jail.network = JailNetwork::Joined;
                    jail.resolv_conf = Some(network.resolv_conf().to_path_buf());
                }
                jail.namespace = Some(namespace);
            }
            // A worker's PDEATHSIG follows the thread that forked it: fork from the runtime's threads, which live as
            // long as the runtime, never from a caller's thread (which polls its call itself, and may end first).
            tokio::spawn(async move { Worker::spawn(spec) })
                .await
                .map_err(|e| CallError::Spawn(format!("the task starting the worker failed: {e}")))?
        })
    }

    fn gpus(&self) -> Option<u32> {
        Some(self.gpus)
    }
}

/// NVIDIA GPUs the driver reports.
fn count_gpus() -> u32 {
    std::fs::read_dir("/proc/driver/nvidia/gpus").map(|entries| entries.count() as u32).unwrap_or(0)
}
