//! The local provider: workers are processes of this host, each in a cgroup with its machine type's limits, with GPU
//! machine types' workers on GPUs of their own, and, when jailed, in a network namespace of their own.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fal_sandbox::{
    CgroupManager, DeviceControl, JailNetwork, Limits, NetworkManager, NvidiaGpus, WorkerCgroup, JAIL_DEVICES,
};

use super::gpus::{GpuAssignment, GpuLease, GpuWaitError};
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
    gpus: Arc<GpuAssignment>,
}

impl LocalProvider {
    /// `jail_run_dir`: where files shown to jailed workers are written (the driver's `params` for GPU workers), when
    /// workers are jailed.
    pub fn new(
        cgroups: Arc<Result<CgroupManager, String>>,
        network: Option<Arc<NetworkManager>>,
        jail_run_dir: Option<&Path>,
    ) -> Self {
        let mut gpus = NvidiaGpus::discover();
        if let Some(run_dir) = jail_run_dir {
            if let Err(e) = gpus.prepare_for_jail(run_dir) {
                tracing::warn!(
                    "could not write the NVIDIA driver's params for jailed GPU workers in {}: {e}; they see the \
                     driver's own",
                    run_dir.display()
                );
            }
        }
        if !gpus.is_empty() {
            tracing::info!(gpus = gpus.len(), "NVIDIA GPUs found; each GPU worker gets its own");
        }
        Self::with_gpus(cgroups, network, gpus)
    }

    fn with_gpus(
        cgroups: Arc<Result<CgroupManager, String>>,
        network: Option<Arc<NetworkManager>>,
        gpus: NvidiaGpus,
    ) -> Self {
        let gpus = GpuAssignment::new(gpus);
        let provider = Self { cgroups, network, warned_unlimited: AtomicBool::new(false), gpus };
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

    /// GPUs of its own for a worker of a GPU machine type, waiting up to `wait` while other workers hold them all.
    async fn gpus_for(
        &self,
        machine: &MachineType,
        wait: Option<std::time::Duration>,
        logs: &LogSink,
    ) -> Result<GpuLease, CallError> {
        let total = self.gpus.total();
        let on_wait = || {
            logs.send(
                LogSource::Engine,
                format!(
                    "waiting for a free GPU for machine type {}: each of this host's {total} GPU(s) is held by \
                     another worker (running a call, or warm for its keep_alive)",
                    machine.name
                ),
            )
        };
        self.gpus.take(machine.gpus as usize, wait, on_wait).await.map_err(|e| match e {
            GpuWaitError::TooMany { needed, total } => {
                CallError::NoGpu { machine_type: machine.name.clone(), needed: needed as u32, available: total as u32 }
            }
            GpuWaitError::TimedOut { needed, total, waited } => CallError::GpuWait {
                machine_type: machine.name.clone(),
                needed: needed as u32,
                total: total as u32,
                seconds: waited.as_secs_f64(),
            },
        })
    }
}

impl Provider for LocalProvider {
    fn start<'a>(
        &'a self,
        mut spec: WorkerSpec,
        machine: &'a MachineType,
        wait: Option<std::time::Duration>,
        logs: &'a LogSink,
    ) -> BoxFuture<'a, Result<Worker, CallError>> {
        Box::pin(async move {
            // GPUs first: waiting for them holds nothing else (no cgroup, no namespace).
            let gpus = match machine.gpus {
                0 => None,
                _ => Some(self.gpus_for(machine, wait, logs).await?),
            };
            let jailed = spec.jail.is_some();
            // CPU types see no GPU at all (an empty CUDA_VISIBLE_DEVICES).
            spec.visible_gpus = Some(gpus.as_ref().map(|g| g.cuda_visible_devices(jailed)).unwrap_or_default());
            let grant = gpus.as_ref().filter(|_| jailed).map(GpuLease::grant);
            if let Some(grant) = &grant {
                if !grant.devices.iter().any(|d| d.ends_with("nvidia-uvm")) {
                    logs.send(
                        LogSource::Engine,
                        "this host has no /dev/nvidia-uvm, so CUDA cannot initialise in the worker's jail; the \
                         server's admin can create it with `nvidia-modprobe -u -c=0` (or by running any CUDA \
                         program on the host once)",
                    );
                }
            }
            if let Some(gpus) = &gpus {
                tracing::debug!(machine_type = %machine.name, gpus = %gpus.describe(), "a worker's GPUs");
            }
            spec.cgroup = self.cgroup_for(machine, logs).await?;
            if let (Some(cgroup), true) = (&spec.cgroup, jailed) {
                // A jailed worker may open its jail's devices and its own GPUs', where the kernel can enforce it.
                let mut allowed = JAIL_DEVICES.to_vec();
                allowed.extend(grant.iter().flat_map(|g| g.char_devices.iter().copied()));
                match cgroup.allow_devices_only(&allowed).map_err(|e| CallError::Spawn(e.to_string()))? {
                    DeviceControl::Enforced => {}
                    DeviceControl::NotEnforced(why) => {
                        tracing::debug!("devices are bounded by the jail's /dev alone: {why}")
                    }
                }
            }
            if let Some(jail) = spec.jail.as_mut() {
                jail.gpus = grant;
            }
            spec.gpus = gpus;
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
            if let Some(link) = spec.link.clone() {
                let netns =
                    spec.jail.as_ref().and_then(|j| j.namespace.as_ref()).and_then(|n| n.path()).map(Path::to_path_buf);
                let granted = tokio::task::spawn_blocking(move || link.attach(netns.as_deref()))
                    .await
                    .map_err(|e| CallError::Spawn(format!("the task linking the worker to its caller failed: {e}")))?
                    .map_err(CallError::Spawn)?;
                spec.granted = Some(granted);
            }
            // A worker's PDEATHSIG follows the thread that forked it: fork from the runtime's threads, which live as
            // long as the runtime, never from a caller's thread (which polls its call itself, and may end first).
            tokio::spawn(async move { Worker::spawn(spec) })
                .await
                .map_err(|e| CallError::Spawn(format!("the task starting the worker failed: {e}")))?
        })
    }

    fn gpus(&self) -> Option<u32> {
        Some(self.gpus.total() as u32)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use super::*;

    /// A provider with one fake GPU (no cgroups, unjailed), and a "python" that, in place of the agent, reads the
    /// variables the engine sends on fd 3 into `received` (a file of the temp dir) and sleeps, so a worker is a real
    /// process whose environment can be read. bash's `read` takes one byte at a time from a socket.
    fn provider_and_spec() -> (tempfile::TempDir, LocalProvider, impl Fn() -> WorkerSpec) {
        let root = tempfile::tempdir().expect("temp dir");
        let gpu = root.path().join("nvidia/gpus/0000:18:00.0");
        std::fs::create_dir_all(&gpu).expect("fake /proc entry");
        std::fs::write(gpu.join("information"), "Model: \t H200\nDevice Minor: \t 0\n").expect("information");
        let gpus = NvidiaGpus::discover_at(&root.path().join("nvidia"), &root.path().join("dev"), root.path());
        let provider = LocalProvider::with_gpus(Arc::new(Err("not in this test".into())), None, gpus);
        let python = root.path().join("python");
        let received = root.path().join("received");
        let agent = format!(
            "#!/bin/bash\nwhile IFS= read -r -d '' v <&3 && [ -n \"$v\" ]; do printf '%s\\0' \"$v\"; done > {0}.tmp\n\
             mv {0}.tmp {0}\nexec sleep 60\n",
            received.display()
        );
        std::fs::write(&python, agent).expect("fake python");
        std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let env_root = root.path().to_path_buf();
        let spec = move || WorkerSpec::bare(python.clone(), env_root.clone());
        (root, provider, spec)
    }

    /// The worker's environment variables. `/proc/PID/environ` reads empty while the process is inside `execve`
    /// (the spawn returns once the exec is past its point of no return, before the new image's environment is laid
    /// out; and the fake python execs `sleep` in turn), so an empty read is retried.
    fn environ(pid: u32) -> Vec<String> {
        for _ in 0..200 {
            let bytes = std::fs::read(format!("/proc/{pid}/environ")).expect("the worker's environment");
            if !bytes.is_empty() {
                return bytes.split(|b| *b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("worker {pid} showed no environment in 2 s")
    }

    /// What the fake agent read from its socket: the variables, in order.
    fn received(root: &Path) -> Vec<String> {
        let path = root.join("received");
        for _ in 0..500 {
            if let Ok(bytes) = std::fs::read(&path) {
                return bytes
                    .split(|b| *b == 0)
                    .filter(|v| !v.is_empty())
                    .map(|v| String::from_utf8_lossy(v).into())
                    .collect();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the worker read no variables in 5 s")
    }

    #[tokio::test]
    async fn a_workers_variables_reach_it_on_its_socket_not_its_environment_and_the_engines_own_win() {
        let (root, provider, spec) = provider_and_spec();
        let cpu = MachineType::new("S", 1.0, 1 << 30, 0);
        let mut spec = spec();
        spec.variables.push("API_TOKEN", "multi\nline value");
        spec.variables.push("CUDA_VISIBLE_DEVICES", "7");
        spec.variables.push("PATH", "/evil");
        spec.variables.push("EMPTY", "");
        let worker = provider.start(spec, &cpu, None, &LogSink::discard()).await.expect("a worker");
        // Sent whole at spawn (it fits the socket's buffer): read before any call.
        assert_eq!(received(root.path()), ["API_TOKEN=multi\nline value", "EMPTY="]);
        let env = environ(worker.pid());
        assert!(!env.iter().any(|v| v.starts_with("API_TOKEN=") || v.starts_with("EMPTY=")), "{env:?}");
        assert!(env.contains(&"CUDA_VISIBLE_DEVICES=".to_string()), "{env:?}");
        assert!(env.iter().any(|v| v.starts_with("PATH=") && !v.contains("/evil")), "{env:?}");
        worker.stop().await;
    }

    #[tokio::test]
    async fn a_gpu_worker_holds_its_gpu_until_it_stops() {
        let (_root, provider, spec) = provider_and_spec();
        let gpu = MachineType::new("GPU", 1.0, 1 << 30, 1);
        let cpu = MachineType::new("S", 1.0, 1 << 30, 0);
        let logs = LogSink::discard();
        let first = provider.start(spec(), &gpu, None, &logs).await.expect("a GPU is free");
        let env = environ(first.pid());
        assert!(env.contains(&"CUDA_VISIBLE_DEVICES=0".to_string()), "{env:?}");
        assert!(env.contains(&"CUDA_DEVICE_ORDER=PCI_BUS_ID".to_string()), "{env:?}");
        // A CPU worker sees no GPU, and takes none.
        let plain = provider.start(spec(), &cpu, None, &logs).await.expect("a CPU worker");
        assert!(environ(plain.pid()).contains(&"CUDA_VISIBLE_DEVICES=".to_string()));
        // While the first lives (warm or busy: the provider cannot tell), a second GPU worker waits, then says why.
        let second = provider.start(spec(), &gpu, Some(Duration::from_millis(200)), &logs).await;
        let error = second.expect_err("the only GPU is held").to_string();
        assert!(error.contains("no GPU came free for machine type GPU") && error.contains("0.2 s"), "{error}");
        // Stopped, it gives its GPU back.
        first.stop().await;
        let third = provider.start(spec(), &gpu, Some(Duration::from_secs(5)), &logs).await.expect("given back");
        third.stop().await;
        plain.stop().await;
        let too_many = MachineType::new("GPUx2", 1.0, 1 << 30, 2);
        let error = provider.start(spec(), &too_many, None, &logs).await.expect_err("one GPU only");
        assert!(matches!(error, CallError::NoGpu { needed: 2, available: 1, .. }), "{error}");
    }
}
