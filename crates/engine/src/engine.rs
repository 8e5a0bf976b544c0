//! The engine: one call from spec to reply.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use fal_sandbox::{CgroupManager, Jail, JailNetwork, Limits, NetworkManager};

use crate::environment::{
    find_interpreter, installation_of, use_environment, BuildSandbox, Builder, EnvBuilder, EnvSpec, EnvironmentPolicy,
    EnvironmentStore, Eviction, Interpreter, PruneReport, PythonVersion, Serializer,
};
use crate::error::{CallError, EnvironmentError};
use crate::logs::{LogSink, LogSource};
use crate::machine::{MachineType, MachineTypes};
use crate::provider::cluster::ClusterProvider;
use crate::provider::kubernetes::Kubernetes;
use crate::provider::local::LocalProvider;
use crate::provider::slurm::Slurm;
use crate::provider::{Provider, ProviderConfig};
use crate::room::{Granted, Room};
use crate::variables::WorkerVariables;
use crate::worker::{NoReply, Outgoing, PoolKey, Taken, Worker, WorkerJail, WorkerLink, WorkerPool, WorkerSpec};

/// Default ceiling on a call's payload and on a reply: large enough for real arrays, small enough to fail clearly.
const DEFAULT_MAX_PAYLOAD: usize = 1 << 30;
/// The uid that builds layers shared by every tenant (the dill layer), and runs jailed processes of callers that
/// name no uid: `nobody`, which no tenant's own processes use.
const SHARED_UID: u32 = 65534;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Where environments live (`<cache_dir>/envs/<tenant>/<key>`), and the layers they share
    /// (`<cache_dir>/layers/`).
    pub cache_dir: PathBuf,
    /// The `uv` binary.
    pub uv: PathBuf,
    pub machine_types: MachineTypes,
    pub max_payload_bytes: usize,
    /// Jail workers and environment builds (the server does; the local host does not: there the user runs their
    /// own code).
    pub jail: Option<Jail>,
    /// Network namespaces for jailed workers and builds; `None`: loopback only.
    pub network: Option<Arc<NetworkManager>>,
    /// What a jailed environment build may use.
    pub build: BuildLimits,
    /// Where workers run.
    pub provider: ProviderConfig,
    /// When environments are removed: the server's `[environments]`. `None` (the local host): never by the engine
    /// itself; `fal-serverless envs prune` does it when asked.
    pub environments: Option<EnvironmentPolicy>,
    /// Told of builds and worker starts (the server's metrics); `None`: nobody.
    pub observer: Option<Arc<dyn crate::Observer>>,
}

/// The limits of one jailed environment build (`[build]` in the server's config).
#[derive(Debug, Clone, Copy)]
pub struct BuildLimits {
    pub limits: Limits,
    pub timeout: Duration,
    /// What one build may write to disk (its environment, and what it adds to its uv cache).
    pub disk_bytes: u64,
}

impl Default for BuildLimits {
    /// 2 CPUs, 4 GiB, 1024 tasks, 15 minutes, 20 GiB of disk.
    fn default() -> Self {
        Self {
            limits: Limits { cpus: 2.0, memory_bytes: 4 << 30, pids: 1024 },
            timeout: Duration::from_secs(900),
            disk_bytes: 20 << 30,
        }
    }
}

impl EngineConfig {
    /// `FAL_SERVERLESS_CACHE_DIR`, else `$XDG_CACHE_HOME/fal-serverless`, else `~/.cache/fal-serverless`; the uv
    /// binary from `FAL_SERVERLESS_UV`, else `uv` on `PATH`; the payload limit from
    /// `FAL_SERVERLESS_MAX_PAYLOAD_BYTES`, else 1 GiB.
    pub fn from_env() -> Self {
        let cache_dir = std::env::var_os("FAL_SERVERLESS_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
                .unwrap_or_else(std::env::temp_dir)
                .join("fal-serverless")
        });
        let uv = std::env::var_os("FAL_SERVERLESS_UV").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("uv"));
        let max_payload_bytes = std::env::var("FAL_SERVERLESS_MAX_PAYLOAD_BYTES")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_MAX_PAYLOAD);
        Self {
            cache_dir,
            uv,
            machine_types: MachineTypes::builtin(),
            max_payload_bytes,
            jail: None,
            network: None,
            build: BuildLimits::default(),
            provider: ProviderConfig::Local,
            environments: None,
            observer: None,
        }
    }
}

/// One call to run.
#[derive(Debug, Clone)]
pub struct CallRequest {
    /// Whose call this is: workers and environments are never shared across tenants. A plain name (letters,
    /// digits, `-`, `_`).
    pub tenant: String,
    /// The uid (and gid) the tenant's jailed workers and builds run as; `None`: `nobody`.
    pub uid: Option<u32>,
    pub env: EnvSpec,
    /// An interpreter of `env.python` to build with, if the caller knows one (the client's own, on the local host).
    pub interpreter: Option<PathBuf>,
    pub machine_type: String,
    pub keep_alive: Duration,
    /// The call, pickled as `env.serializer` says: with `function`, only its `(args, kwargs)`.
    pub payload: Bytes,
    /// The function pickled alone, when `payload` holds only its arguments: a map's items share it, and a worker
    /// running several loads it once.
    pub function: Option<Bytes>,
    /// A setup function, pickled as the call is: run once per worker (for the same bytes), its result passed to the
    /// function as its first positional argument (`setup_function`, as the original's agent does).
    pub setup: Option<Bytes>,
    /// Where each item a generator function yields goes, as it is produced; a full channel holds the worker back.
    /// `None`: the items are dropped (the call's result is `None`).
    pub on_item: Option<tokio::sync::mpsc::Sender<Bytes>>,
    /// The most the function may run on its worker, waiting for room included; past it the worker is stopped.
    /// `None`: no limit.
    pub timeout: Option<Duration>,
    /// Where the call gets room to run, and a new worker room to live (the server's capacity); `None`: it needs
    /// none.
    pub room: Option<Arc<dyn Room>>,
    /// Told which worker runs the call once it has one, before the call is sent: how a call that serves (a web
    /// endpoint's replica, which listens on a port until stopped) is found.
    pub on_worker: Option<tokio::sync::mpsc::UnboundedSender<CallWorker>>,
    /// A directory of the host kept across calls (the server: its tenant's persistent storage), which the call's
    /// worker sees read-write at `/data` when jailed, and where it is otherwise; `FAL_DATA_DIR` names it in the
    /// worker. One tenant's calls name the same one (its workers are pooled by tenant). `None`: none.
    pub data_dir: Option<PathBuf>,
    /// Given to each new worker of this call (the server's way back to itself, for calls the function makes); its
    /// class keeps workers with different links apart in the pool.
    pub link: Option<Arc<dyn WorkerLink>>,
    /// Environment variables for the call's worker (the server's: its user's secrets). A warm worker is only reused
    /// by calls with the same ones; see [`Engine::replace_workers`] for stopping those a change left behind.
    pub variables: WorkerVariables,
}

/// The worker a call runs on, as [`CallRequest::on_worker`] is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallWorker {
    pub pid: u32,
    /// Its address in its own network namespace (jailed workers): where the server reaches a port it listens on.
    pub address: Option<std::net::IpAddr>,
}

/// The function's outcome, still pickled: its return value, or (`raised`) a description of its exception.
#[derive(Debug)]
pub struct CallReply {
    pub raised: bool,
    pub payload: Bytes,
    /// The worker process that ran the call.
    pub worker_pid: u32,
}

/// A live worker, as listed by [`Engine::workers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    pub pid: u32,
    pub tenant: String,
    pub env_key: String,
    pub machine_type: String,
    pub busy: bool,
    /// Calls completed by this worker.
    pub calls: u64,
    /// Its own hostname, where it has one (jailed workers).
    pub hostname: Option<String>,
    /// Its address in its own network namespace: where the server (and only the server) connects to a port it
    /// listens on.
    pub address: Option<std::net::IpAddr>,
    pub started: SystemTime,
}

/// What [`Engine::stop_worker`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerStop {
    /// It was idle, and is gone.
    Stopped,
    /// It is busy: it stops when its call ends, instead of staying warm.
    AfterItsCall,
    /// No live worker has that pid (for that user).
    NotFound,
}

#[derive(Debug, Clone)]
pub struct Engine(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    config: EngineConfig,
    builder: EnvBuilder,
    /// The environments `builder` builds, for listing and eviction.
    environments: EnvironmentStore,
    /// One eviction pass at a time.
    evicting: tokio::sync::Mutex<()>,
    /// Environments shared by other environments' workers, built from constants only (the dill layer).
    layers: EnvBuilder,
    pool: WorkerPool,
    provider: Box<dyn Provider>,
    /// Interpreters found by version, and what each interpreter said of its installation: asked once each.
    interpreters: Mutex<HashMap<PythonVersion, PathBuf>>,
    installations: Mutex<HashMap<PathBuf, Interpreter>>,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Self {
        // One hierarchy for workers and builds. Finding it also removes cgroups that a previous run (of a server
        // killed with SIGKILL, say) left behind.
        let cgroups = Arc::new(CgroupManager::detect().map_err(|e| e.to_string()));
        let provider: Box<dyn Provider> = match &config.provider {
            ProviderConfig::Local => {
                // Files shown to jailed workers go with the network's (`<data dir>/run`).
                let run_dir = config.jail.as_ref().map(|_| config.cache_dir.join("run"));
                Box::new(LocalProvider::new(cgroups.clone(), config.network.clone(), run_dir.as_deref()))
            }
            ProviderConfig::Slurm(slurm) => Box::new(ClusterProvider::new(Slurm::new(slurm.clone()))),
            ProviderConfig::Kubernetes(kubernetes) => {
                Box::new(ClusterProvider::new(Kubernetes::new(kubernetes.clone())))
            }
        };
        let sandbox = config.jail.clone().map(|jail| BuildSandbox {
            jail,
            network: config.network.clone(),
            limits: config.build.limits,
            timeout: config.build.timeout,
            disk_bytes: config.build.disk_bytes,
            caches: config.cache_dir.join("build-cache"),
            shared_uid: SHARED_UID,
        });
        let builder = |dir: &str| {
            EnvBuilder::new(config.cache_dir.join(dir), config.uv.clone(), sandbox.clone(), cgroups.clone())
        };
        Self(Arc::new(Inner {
            builder: builder("envs"),
            environments: EnvironmentStore::new(config.cache_dir.join("envs")),
            evicting: tokio::sync::Mutex::default(),
            layers: builder("layers"),
            config,
            pool: WorkerPool::default(),
            provider,
            interpreters: Mutex::default(),
            installations: Mutex::default(),
        }))
    }

    pub fn machine_types(&self) -> &MachineTypes {
        &self.0.config.machine_types
    }

    /// Runs one call: on a warm worker if one is idle, else on a new one (building its environment first if no
    /// process has yet). Whatever the worker prints goes to `logs` as it is printed.
    pub async fn call(&self, request: CallRequest, logs: &LogSink) -> Result<CallReply, CallError> {
        let inner = &self.0;
        let machine = inner.config.machine_types.get(&request.machine_type)?;
        if request.tenant.is_empty()
            || !request.tenant.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(CallError::Spawn(format!("invalid tenant name {:?}", request.tenant)));
        }
        let size = [&request.function, &request.setup].into_iter().flatten().map(Bytes::len).sum::<usize>()
            + request.payload.len();
        if size > inner.config.max_payload_bytes {
            return Err(CallError::PayloadTooLarge { size, limit: inner.config.max_payload_bytes });
        }
        if let Some(why) = request.variables.unfit() {
            return Err(CallError::Spawn(why));
        }
        let key = PoolKey {
            tenant: request.tenant.clone(),
            env_key: request.env.key(),
            machine_type: machine.name.clone(),
            link_class: request.link.as_ref().map(|link| link.class()).unwrap_or_default(),
            variables: request.variables.digest(),
        };
        let mut timeout = request.timeout;
        let waiting = Instant::now();
        // Room to run (and, for a new worker, room for it), waited for within the call's timeout. A warm worker is
        // taken only once there is room: a call that gives up waiting leaves it warm.
        let (granted, warm) = loop {
            let Some(room) = &request.room else { break (None, inner.pool.checkout(&key)) };
            let left = timeout.map(|t| t.saturating_sub(waiting.elapsed()));
            if left.is_some_and(|t| t.is_zero()) {
                return Err(CallError::Timeout { seconds: timeout.unwrap_or_default().as_secs_f64() });
            }
            let granted = room.reserve(machine, !inner.pool.has_idle(&key), left, logs).await?;
            match inner.pool.checkout(&key) {
                Some(leased) => break (Some(granted), Some(leased)),
                None if granted.worker.is_some() => break (Some(granted), None),
                // The warm worker went (another call took it, or it expired) while this one waited: ask again, for
                // a new worker this time.
                None => continue,
            }
        };
        // Time spent waiting for room is taken from the function's.
        timeout = timeout.map(|t| t.saturating_sub(waiting.elapsed()).max(Duration::from_millis(1)));
        let (_running, worker_hold) = match granted {
            Some(Granted { call, worker }) => (Some(call), worker),
            None => (None, None),
        };
        let mut leased = match warm {
            Some(leased) => leased,
            None => {
                let worker = self.start_worker(&request, machine, logs).await?.holding(worker_hold);
                inner.pool.lease_new(&key, worker)
            }
        };
        if let Some(on_worker) = &request.on_worker {
            let worker = leased.worker();
            let _ = on_worker.send(CallWorker { pid: worker.pid(), address: worker.address() });
        }
        let outgoing = Outgoing {
            payload: &request.payload,
            setup: request.setup.as_deref(),
            function: request.function.as_deref(),
        };
        let items = request.on_item.as_ref();
        let outcome = match timeout {
            None => leased.worker().call(outgoing, logs, items).await,
            Some(limit) => match tokio::time::timeout(limit, leased.worker().call(outgoing, logs, items)).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    leased.retire().stop().await;
                    return Err(CallError::Timeout { seconds: limit.as_secs_f64() });
                }
            },
        };
        match outcome {
            Ok(reply) => {
                let worker_pid = leased.worker().pid();
                inner.pool.release(key, leased, request.keep_alive);
                Ok(CallReply { raised: reply.raised, payload: reply.payload.into(), worker_pid })
            }
            Err(NoReply::Gone) => Err(leased.retire().failure(&machine.name, &machine.memory_display(), logs).await),
            Err(NoReply::TooLarge { size, limit }) => {
                leased.retire().stop().await;
                Err(CallError::ResultTooLarge { size, limit })
            }
            Err(NoReply::ChildOutOfMemory) => {
                leased.retire().stop().await;
                Err(CallError::OutOfMemory {
                    machine_type: machine.name.clone(),
                    memory: machine.memory_display(),
                    child: true,
                })
            }
        }
    }

    async fn start_worker(
        &self,
        request: &CallRequest,
        machine: &MachineType,
        logs: &LogSink,
    ) -> Result<Worker, CallError> {
        let inner = &self.0;
        // A GPU type this provider cannot have fails before anything is built.
        if let Some(available) = inner.provider.gpus().filter(|&available| machine.gpus > available) {
            return Err(CallError::NoGpu { machine_type: machine.name.clone(), needed: machine.gpus, available });
        }
        // In use from before it is looked for until the worker is gone: no eviction removes it in between.
        let in_use = use_environment(inner.environments.dir(), &request.tenant, &request.env.key()).await?;
        // A built environment names its interpreter; finding one (which asks uv) is only needed to build.
        let env = match inner.builder.built(&request.env, &request.tenant) {
            Some(env) => env,
            None => {
                self.make_room(&request.tenant, logs).await?;
                let interpreter = self.interpreter(request).await?;
                let builder = Builder { tenant: &request.tenant, uid: request.uid.unwrap_or(SHARED_UID) };
                let building = Instant::now();
                let built = inner.builder.ensure(&request.env, builder, &interpreter, logs).await;
                if let Some(observer) = &inner.config.observer {
                    observer.environment_built(built.is_ok(), building.elapsed());
                }
                let env = built?;
                // A build may have taken the environments past their budget.
                if inner.config.environments.is_some() {
                    let engine = self.clone();
                    tokio::spawn(async move { engine.evict_environments().await });
                }
                env
            }
        };
        let layer = match request.env.serializer {
            Serializer::Cloudpickle(_) => None,
            Serializer::Dill => {
                let layer = EnvSpec::dill_layer(request.env.python);
                let built = match inner.layers.built(&layer, "dill") {
                    Some(built) => built,
                    None => {
                        logs.send(
                            LogSource::Build,
                            format!("building the layer dill calls need ({})", layer.requirements.join(", ")),
                        );
                        let interpreter = self.interpreter(request).await?;
                        let builder = Builder { tenant: "dill", uid: SHARED_UID };
                        inner.layers.ensure(&layer, builder, &interpreter, logs).await?
                    }
                };
                Some(built.site_packages(request.env.python))
            }
        };
        // The provider gives it its network (a namespace of its own on this host).
        let jail = inner.config.jail.as_ref().map(|jail| WorkerJail {
            jail: jail.clone(),
            base_prefix: env.base_prefix.clone(),
            uid: request.uid.unwrap_or(SHARED_UID),
            hostname: format!("worker-{:08x}", rand::random::<u32>()),
            network: JailNetwork::Loopback,
            namespace: None,
            resolv_conf: None,
            gpus: None,
        });
        let spec = WorkerSpec {
            python: env.python(),
            env_root: env.root.clone(),
            dill_layer: layer,
            cgroup: None,
            jail,
            visible_gpus: None,
            gpus: None,
            max_payload: inner.config.max_payload_bytes,
            data_dir: request.data_dir.clone(),
            link: request.link.clone(),
            granted: None,
            // The call's own; variables computed for this one worker when it starts go after them here.
            variables: request.variables.clone(),
        };
        tracing::debug!(env = %env.key, machine_type = %machine.name, "starting a worker");
        let starting = Instant::now();
        let mut worker = inner.provider.start(spec, machine, request.timeout, logs).await?;
        if let Some(observer) = &inner.config.observer {
            observer.worker_started(&machine.name, starting.elapsed());
        }
        worker.hold(in_use);
        Ok(worker)
    }

    /// Before a build for `tenant`: within the per-user caps, by removing the tenant's own least recently used
    /// environments not in use; an error naming the cap when every one is in use.
    async fn make_room(&self, tenant: &str, logs: &LogSink) -> Result<(), CallError> {
        let Some(policy) = self.0.config.environments else { return Ok(()) };
        let (engine, owner) = (self.clone(), tenant.to_string());
        let made = tokio::task::spawn_blocking(move || engine.0.environments.make_room(&policy, &owner))
            .await
            .map_err(|e| CallError::Spawn(format!("the task making room for an environment failed: {e}")))?;
        let path = self.0.environments.dir().to_path_buf();
        match made.map_err(|source| EnvironmentError::Io { path, source })? {
            Ok(evicted) => {
                // The shared environments that go with them are no business of the user's.
                for eviction in evicted.iter().filter(|e| !e.environment.is_shared()) {
                    logs.send(
                        LogSource::Build,
                        format!(
                            "removed your least recently used environment {} to make room: you were at this \
                             server's per-user limit ([environments] max_per_user = {}, or disk_per_user_gb)",
                            eviction.environment.key, policy.max_per_user
                        ),
                    );
                }
                log_evictions(&evicted);
                Ok(())
            }
            Err(cap) => Err(cap.into_error().into()),
        }
    }

    /// Applies the environment policy now (see [`EngineConfig::environments`]), on a blocking thread: removes what
    /// it chooses, never an environment in use. Nothing without a policy.
    pub async fn evict_environments(&self) -> PruneReport {
        let Some(policy) = self.0.config.environments else { return PruneReport::default() };
        let _one_at_a_time = self.0.evicting.lock().await;
        let engine = self.clone();
        let pruned =
            tokio::task::spawn_blocking(move || engine.0.environments.prune(&policy, SystemTime::now(), None, false))
                .await;
        match pruned {
            Ok(Ok(report)) => {
                log_evictions(&report.evicted);
                for (eviction, why) in &report.failed {
                    tracing::warn!(user = %eviction.environment.tenant, env = %eviction.environment.key, %why,
                        "could not remove an environment");
                }
                report
            }
            Ok(Err(error)) => {
                tracing::warn!(dir = %self.0.environments.dir().display(), %error, "could not list environments");
                PruneReport::default()
            }
            Err(error) => {
                tracing::warn!(%error, "the environment eviction task failed");
                PruneReport::default()
            }
        }
    }

    /// Applies the environment policy now and then every `every`, forever (the server runs it as a task of its own).
    pub async fn run_eviction(&self, every: Duration) {
        loop {
            self.evict_environments().await;
            tokio::time::sleep(every).await;
        }
    }

    /// An interpreter for the request's Python version: the caller's hint, else one found once per version.
    async fn interpreter(&self, request: &CallRequest) -> Result<Interpreter, CallError> {
        let inner = &self.0;
        let path = match request.interpreter.as_deref().filter(|h| h.exists()) {
            Some(hint) => hint.to_path_buf(),
            None => {
                let known =
                    inner.interpreters.lock().unwrap_or_else(|e| e.into_inner()).get(&request.env.python).cloned();
                match known {
                    Some(path) => path,
                    None => {
                        let path = find_interpreter(inner.builder.uv(), request.env.python).await?;
                        inner
                            .interpreters
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(request.env.python, path.clone());
                        path
                    }
                }
            }
        };
        let known = inner.installations.lock().unwrap_or_else(|e| e.into_inner()).get(&path).cloned();
        if let Some(interpreter) = known {
            return Ok(interpreter);
        }
        let interpreter = installation_of(&path).await?;
        inner.installations.lock().unwrap_or_else(|e| e.into_inner()).insert(path, interpreter.clone());
        Ok(interpreter)
    }

    /// NVIDIA GPUs workers can be given: this host's, for the local provider.
    pub fn gpus(&self) -> u32 {
        self.0.provider.gpus().unwrap_or(0)
    }

    /// Every live worker, idle or busy.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.0.pool.workers()
    }

    /// The environments built on this host (every user's), on a blocking thread.
    pub async fn environments(&self) -> std::io::Result<Vec<crate::EnvironmentInfo>> {
        let engine = self.clone();
        tokio::task::spawn_blocking(move || engine.0.environments.list()).await.map_err(std::io::Error::other)?
    }

    /// Removes `tenant`'s environment `key` (never one in use), on a blocking thread.
    pub async fn remove_environment(&self, tenant: &str, key: &str) -> Result<crate::Removal, crate::RemoveError> {
        let (engine, tenant, key) = (self.clone(), tenant.to_string(), key.to_string());
        tokio::task::spawn_blocking(move || engine.0.environments.remove(&tenant, &key))
            .await
            .unwrap_or_else(|e| Err(crate::RemoveError::Io { path: PathBuf::new(), source: std::io::Error::other(e) }))
    }

    /// Stops the live worker with process id `pid` (of `tenant`, or of anyone: an admin), as a dashboard's stop
    /// button asks: an idle one now (returning once it is gone), a busy one when its call ends (the call is not
    /// cut short).
    pub async fn stop_worker(&self, pid: u32, tenant: Option<&str>) -> WorkerStop {
        match self.0.pool.take_by_pid(pid, tenant) {
            Taken::Idle(worker) => {
                tracing::info!(pid, "stopping an idle worker, as asked");
                // In a task of its own: a caller that goes away (a closed browser tab) cannot cut the stop short and
                // leave its cgroup or namespace behind.
                let _ = tokio::spawn(async move { worker.stop().await }).await;
                WorkerStop::Stopped
            }
            Taken::Busy => {
                tracing::info!(pid, "a busy worker will stop when its call ends, as asked");
                WorkerStop::AfterItsCall
            }
            Taken::NotFound => WorkerStop::NotFound,
        }
    }

    /// Stops the idle worker that has been idle longest (of `tenant`, or of anyone) and waits until it is gone, so
    /// that what it held is free. Returns whether there was one.
    pub async fn stop_idle_worker(&self, tenant: Option<&str>) -> bool {
        match self.0.pool.take_least_recently_used(tenant) {
            Some(worker) => {
                tracing::info!(pid = worker.pid(), "stopping an idle worker to make room for a call");
                worker.stop().await;
                true
            }
            None => false,
        }
    }

    /// After `tenant`'s worker variables changed (a secret set or deleted): stops the tenant's idle workers now, and
    /// those busy now once their calls end instead of keeping them warm. The pool's key already keeps a warm worker
    /// with other variables from being handed a call; this stops such workers from holding memory (and the
    /// tenant's old values) until their keep_alive. Returns how many idle workers were stopped.
    pub async fn replace_workers(&self, tenant: &str) -> usize {
        let idle = self.0.pool.replace(tenant);
        let count = idle.len();
        if count > 0 {
            tracing::info!(user = %tenant, workers = count, "stopping idle workers: their variables changed");
        }
        for worker in idle {
            worker.stop().await;
        }
        count
    }

    /// Stops all idle workers and waits for them; busy ones end with their calls.
    pub async fn shutdown(&self) {
        self.0.pool.shutdown().await;
        self.0.provider.shutdown().await;
    }
}

fn log_evictions(evicted: &[Eviction]) {
    for eviction in evicted {
        let environment = &eviction.environment;
        tracing::info!(user = %environment.tenant, env = %environment.key, bytes = environment.bytes,
            reason = %eviction.reason, "environment removed");
    }
}
