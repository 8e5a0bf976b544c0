//! The fal-serverless server: `IsolateController` over gRPC (wire-compatible with isolate-proto 0.0.37) in front of
//! the engine, with keys, per-user workers and environments, jailed workers and a capacity that calls queue for.
//!
//! Owns: authentication (keys in SQLite, in the data dir), the mapping from RPCs to engine calls, capacity, and the
//! server's lifetime (graceful stop, idle stop in zero-config mode). It does not build environments or run workers
//! itself: that is `fal-engine`, with `fal-sandbox`'s jail.
//!
//! Calls come from this project's SDK (cloudpickle) or from the original fal-serverless client (dill; see `dill.rs`).
//! The same port serves HTTP (`http.rs` routes by content type): the gateway to apps, functions deployed as web
//! endpoints (`apps/`, `gateway/`), and their queue (`queue/`). Workers reach the server back for the calls their
//! functions make (`nested/`).
//!
//! Runs are recorded in a history (`runs/`), and functions run on cron schedules (`schedules/`).
//!
//! Data dir (mode 0700): `state.sqlite3` (keys, apps, queued requests, users' secrets encrypted, runs, schedules;
//! mode 0600),
//! `secrets.key` (the key of those secrets, mode 0600, unless `[secrets] key_file` keeps it elsewhere), `envs/<user>/<key>` (environments, removed by the
//! `[environments]` policy), `layers/dill/<key>` (the dill layer, per Python version), `config.toml`, `tls/` (a
//! self-signed CA and the server's certificate and key, when `server init --tls-self-signed` made them).

mod activity;
mod admission;
mod apps;
mod capacity;
mod config;
mod dashboard;
mod db;
mod dill;
mod gateway;
mod http;
mod listener;
mod map;
mod metrics;
mod nested;
mod queue;
mod runs;
mod schedules;
mod secrets;
mod service;
mod storage;
mod store;
mod tls;

use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fal_engine::{Engine, EngineConfig, ProviderConfig};
use fal_proto::controller::isolate_controller_server::IsolateControllerServer;
use fal_proto::MAX_MESSAGE;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;

pub use crate::capacity::Resources;

/// Entry points for the fuzz targets in `fuzz/` (and their regression tests); not part of the server's API.
#[doc(hidden)]
pub mod fuzzing {
    use prost::Message;

    use crate::store::{Caller, Scope};

    /// Decodes `bytes` as a `HostedRun` and validates it as the server does before running it. Returns whether it
    /// would be run.
    pub fn validate_run(bytes: &[u8]) -> bool {
        let Ok(mut run) = fal_proto::controller::HostedRun::decode(bytes) else { return false };
        let caller = Caller { user_id: "fuzz".into(), key_id: "fuzz".into(), scope: Scope::Api, depth: 0 };
        crate::service::call_request(&caller, &mut run).is_ok()
    }

    #[cfg(test)]
    mod tests {
        /// Every input kept in fuzz/regressions/run_request (crashes the fuzzer found, edge cases) is still
        /// refused without a panic, and a well-formed request still passes.
        #[test]
        fn kept_fuzz_inputs_validate_without_panicking() {
            let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/regressions/run_request");
            let inputs: Vec<_> =
                std::fs::read_dir(dir).unwrap().map(|e| std::fs::read(e.unwrap().path()).unwrap()).collect();
            assert!(!inputs.is_empty());
            for input in inputs {
                assert!(!super::validate_run(&input));
            }
            use fal_proto::controller::HostedRun;
            use fal_proto::{EnvironmentDefinition, SerializedObject};
            use prost::Message;
            let value = |s: &str| prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(s.into())) };
            let run = HostedRun {
                environments: vec![EnvironmentDefinition {
                    kind: "virtualenv".into(),
                    configuration: Some(prost_types::Struct {
                        fields: [("python_version".to_string(), value("3.11"))].into_iter().collect(),
                    }),
                    force: false,
                }],
                function: Some(SerializedObject { method: "cloudpickle".into(), ..Default::default() }),
                ..Default::default()
            };
            assert!(super::validate_run(&run.encode_to_vec()));
        }
    }
}
pub use crate::config::{ConfigError, ServerConfig, UserLimits, DEFAULT_LISTEN};
pub use crate::store::{KeyInfo, Scope, Store, StoreError};
pub use crate::tls::{self_signed, SelfSigned, TlsError, TlsFiles};

const STATE_FILE: &str = "state.sqlite3";
/// The key users' secrets are encrypted with, unless `[secrets] key_file` names another place.
const SECRETS_KEY_FILE: &str = "secrets.key";
/// How long calls still running when the server is told to stop may take to finish; then they are ended (their
/// clients get an error saying the server went away) and their workers stopped.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long ended calls' connections get to close after the grace.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot use the data dir {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}; is another server running there? Pick another with --listen")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot set up the network namespaces of workers and builds: {0}. Install iproute2 and nftables, or set \
         [network] egress = \"none\" and build_egress = \"none\" in the config to give them loopback only"
    )]
    Network(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Database(#[from] db::DatabaseError),
    #[error(transparent)]
    Sandbox(#[from] fal_sandbox::SandboxError),
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    #[error(transparent)]
    Secrets(#[from] secrets::SecretsError),
    #[error(
        "the data dir {path} is on a network file system ({file_system}), where SQLite's locking is unsafe for the \
         server's state (state.sqlite3). Keep the data dir on this host's disk, and set [slurm] shared_dir (in its \
         config.toml) to the directory every node mounts: environments are built there. To keep this server's keys \
         and apps, move state.sqlite3 and secrets.key into the new data dir"
    )]
    StateOnNetworkFileSystem { path: std::path::PathBuf, file_system: &'static str },
}

/// What a starting server tells whoever started it.
#[derive(Debug)]
pub struct Started {
    pub address: SocketAddr,
    /// The first admin key, when this start created it (shown once).
    pub admin_key: Option<(KeyInfo, String)>,
    /// Why workers are not jailed, when they are not.
    pub unjailed: Option<String>,
    /// The certificate and key the port serves TLS with, when it does.
    pub tls: Option<TlsFiles>,
}

/// The network file system `path` is on, by name, if it is on one (or on one of the cluster file systems that
/// share SQLite's trouble with locks).
fn network_file_system(path: &std::path::Path) -> Option<&'static str> {
    const KNOWN: [(i64, &str); 12] = [
        (0x6969, "nfs"),
        (0x517b, "smb"),
        (0xff53_4d42, "cifs"),
        (0xfe53_4d42, "smb2"),
        (0x0bd0_0bd0, "lustre"),
        (0x4750_4653, "gpfs"),
        (0x00c3_6400, "ceph"),
        (0x1983_0326, "beegfs"),
        (0x5346_414f, "afs"),
        (0x7375_7245, "coda"),
        (0x0102_1997, "9p"),
        (0x1366_1366, "orangefs"),
    ];
    // The data dir may not exist yet: its nearest existing ancestor is where it will be.
    let absolute = std::path::absolute(path).ok()?;
    let existing = absolute.ancestors().find(|p| p.exists())?;
    let c_path = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer of statfs's size, filled on success.
    if unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statfs succeeded, so it filled the buffer. (`f_type` is i64 here, another integer elsewhere.)
    #[allow(clippy::unnecessary_cast)]
    let kind = unsafe { stat.assume_init() }.f_type as i64;
    KNOWN.iter().find(|(magic, _)| *magic == kind).map(|(_, name)| *name)
}

/// Opens the data dir (creating it, mode 0700) and its key store; creates the first admin key if there is none.
pub fn init(data_dir: &Path) -> Result<(Store, Option<(KeyInfo, String)>), ServerError> {
    let io = |source| ServerError::DataDir { path: data_dir.to_path_buf(), source };
    std::fs::create_dir_all(data_dir).map_err(io)?;
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    let state = data_dir.join(STATE_FILE);
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&state).map_err(io)?;
    let store = Store::open(&state)?;
    let admin_key =
        if store.is_empty()? { Some(store.create_key("admin", Scope::Admin, "first admin key")?) } else { None };
    Ok((store, admin_key))
}

/// Runs the server until `shutdown` resolves (or, with `idle_shutdown`, until it has been idle that long).
pub async fn serve(
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
    started: impl FnOnce(&Started),
) -> Result<(), ServerError> {
    // Slurm mode is where a data dir on a shared file system is likely (the nodes need the environments); on one
    // host, a home directory on NFS holds the zero-config server's data dir, and has so far.
    if config.provider.cluster().is_some() {
        if let Some(file_system) = network_file_system(&config.data_dir) {
            return Err(ServerError::StateOnNetworkFileSystem { path: config.data_dir.clone(), file_system });
        }
    }
    let (store, admin_key) = init(&config.data_dir)?;
    // Opened before anything starts: a missing or wrong key file stops the server at once, saying so.
    let secrets = {
        let key_file = config.secrets.key_file.clone().unwrap_or_else(|| config.data_dir.join(SECRETS_KEY_FILE));
        let store = secrets::SecretStore::open(&config.data_dir.join(STATE_FILE), &key_file)?;
        secrets::Secrets::new(store, config.secrets.clone())
    };
    // Read before anything starts, so a bad certificate stops the server at once with what is wrong.
    let tls = config.tls.as_ref().map(tls::server_config).transpose()?;
    let jail = fal_sandbox::Jail::from_path();
    let root = geteuid() == 0;
    let unjailed = match (&jail, root) {
        (Some(_), true) => None,
        (None, _) => Some("bubblewrap (bwrap) or setpriv is not installed: install the bubblewrap package".to_string()),
        (Some(_), false) => Some("the server does not run as root, so it cannot drop workers to another user".into()),
    };
    let jail = if unjailed.is_none() { jail } else { None };
    if jail.is_some() {
        // Every jail loads the seccomp filter: one that cannot be compiled here stops the server at once, not at the
        // first call.
        fal_sandbox::seccomp_program()?;
    }
    // Jailed workers and builds get network namespaces of their own (on this host; a cluster's nodes keep theirs).
    let network = match &jail {
        Some(_) => {
            let run_dir = config.data_dir.join("run");
            let policy = config.network.clone();
            let tag = config.tag.clone();
            let manager =
                tokio::task::spawn_blocking(move || fal_sandbox::NetworkManager::setup(policy, &tag, &run_dir))
                    .await
                    .map_err(|e| ServerError::Network(e.to_string()))?
                    .map_err(|e| ServerError::Network(e.to_string()))?;
            Some(Arc::new(manager))
        }
        None => None,
    };
    let metrics = Arc::new(metrics::Metrics::default());
    // The engine's own settings (uv, payload limit) come from the environment, as everywhere it runs.
    let engine = Engine::new(EngineConfig {
        observer: Some(metrics.clone()),
        cache_dir: config.environments_dir.clone(),
        machine_types: config.machine_types.clone(),
        jail,
        network: network.clone(),
        build: config.build,
        provider: config.provider.clone(),
        environments: Some(config.environments),
        ..EngineConfig::from_env()
    });
    // Environments unused too long or over the budget are removed now, then every prune_interval (and after builds).
    let evicting = {
        let (engine, every) = (engine.clone(), config.prune_interval);
        tokio::spawn(async move { engine.run_eviction(every).await })
    };
    // On a cluster, its scheduler queues what does not fit; this server's own size does not bound it.
    let host = match config.provider {
        ProviderConfig::Local => Resources::of_host(engine.gpus()),
        ProviderConfig::Slurm(_) | ProviderConfig::Kubernetes(_) => Resources::unbounded(),
    };
    let resources = Resources {
        cpus: config.cpus.unwrap_or(host.cpus),
        memory_bytes: config.memory_bytes.unwrap_or(host.memory_bytes),
        gpus: config.gpus.unwrap_or(host.gpus),
    };
    // Users' storage (its image mounted, when it has one) before anything can run a call.
    let storage = {
        let (settings, data_dir) = (config.storage.clone(), config.data_dir.clone());
        let no_mount = match (&config.provider, root) {
            // Its workers see no /data: storage is a directory of this host.
            (ProviderConfig::Slurm(_), _) => Some("workers run on Slurm, where no /data is mounted"),
            (ProviderConfig::Kubernetes(_), _) => Some("workers run on Kubernetes, where no /data is mounted"),
            (_, false) => Some("the server does not run as root, so it cannot mount a btrfs image"),
            (_, true) => None,
        };
        let opened = tokio::task::spawn_blocking(move || storage::Storage::open(&settings, &data_dir, no_mount)).await;
        Arc::new(
            opened.map_err(|e| ServerError::DataDir {
                path: config.data_dir.clone(),
                source: std::io::Error::other(e),
            })??,
        )
    };
    let activity = Arc::new(activity::Activity::default());
    let store = Arc::new(store);
    let admission = admission::Admission::new(store.clone(), activity.clone(), config.admission);
    let (end_calls, ending) = tokio::sync::watch::channel(false);
    let capacity = Arc::new(capacity::Capacity::new(resources, config.sharing));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Listen { addr: config.listen, source })?;
    let address = listener.local_addr().map_err(|source| ServerError::Listen { addr: config.listen, source })?;
    let (nested, worker_connections) = nested::Nested::new(nested::NestedParts {
        keys: store.worker_keys().clone(),
        run_dir: &config.data_dir.join("run"),
        layers_dir: &config.data_dir.join("layers"),
        sdk_package: std::env::var_os(nested::SDK_VARIABLE).map(Into::into),
        address,
        plaintext: tls.is_none(),
        jailed: unjailed.is_none(),
    });
    let apps = apps::Apps::new(apps::AppsParts {
        store: Arc::new(apps::AppStore::open(&config.data_dir.join(STATE_FILE))?),
        keys: store.clone(),
        secrets: secrets.clone(),
        engine: engine.clone(),
        capacity: capacity.clone(),
        uids: (config.first_uid, config.uid_count),
        storage: storage.clone(),
        max_keep_alive: config.limits.max_keep_alive,
        config: config.apps,
        unavailable: match (&config.provider, &unjailed) {
            (ProviderConfig::Slurm(_) | ProviderConfig::Kubernetes(_), _) => Some(format!(
                "web endpoints run on this server's own workers, and its workers run on {} (provider = {:?}): \
                 deploy to a server whose provider is local",
                config.provider.cluster().unwrap_or_default(),
                config.provider.cluster().unwrap_or_default().to_lowercase()
            )),
            (_, Some(reason)) => Some(format!(
                "web endpoints need jailed workers, each with a network namespace of its own where its replica \
                 listens on port 8080, and this server does not jail them ({reason}). Run the server as root with \
                 bubblewrap installed"
            )),
            (_, None) => None,
        },
        nested: nested.clone(),
    });
    // The run history's writer, and the schedules (whose missed activations run once, now).
    let runs = runs::Runs::start(
        Arc::new(runs::RunStore::open(&config.data_dir.join(STATE_FILE))?),
        config.runs,
        metrics.clone(),
    );
    let schedules = schedules::Schedules::start(
        Arc::new(schedules::ScheduleStore::open(&config.data_dir.join(STATE_FILE))?),
        apps.clone(),
        runs.clone(),
        config.schedules,
    )
    .await;
    let controller = service::Controller {
        ending,
        uids: (config.first_uid, config.uid_count),
        engine: engine.clone(),
        store: store.clone(),
        capacity: capacity.clone(),
        activity: activity.clone(),
        limits: config.limits,
        apps: apps.clone(),
        runs: runs.clone(),
        schedules: schedules.clone(),
        storage: storage.clone(),
        nested,
        secrets: secrets.clone(),
    };
    let gateway = Arc::new(gateway::Gateway {
        apps: apps.clone(),
        keys: store.clone(),
        client: gateway::proxy::client(),
        runs: runs.clone(),
        metrics: metrics.clone(),
    });
    let console_controller = controller.clone();

    let info = Started { address, admin_key, unjailed, tls: config.tls.clone() };
    tracing::info!(%address, tls = tls.is_some(), data_dir = %config.data_dir.display(), cpus = resources.cpus,
        memory_bytes = resources.memory_bytes, gpus = resources.gpus, jailed = info.unjailed.is_none(),
        secrets_key = %secrets.key_file().display(), "serving");
    if let Some(reason) = &info.unjailed {
        tracing::warn!(
            "workers and environment builds are NOT jailed ({reason}): every user's code runs as this server's user, \
             with its network"
        );
    }
    if tls.is_none() && !address.ip().is_loopback() {
        tracing::warn!(
            "serving plaintext gRPC on {address}, which is not loopback: keys and calls cross the network unencrypted. \
             Give the server a certificate (--tls-cert/--tls-key, or `fal-serverless server init --tls-self-signed \
             NAME...`)"
        );
    }
    started(&info);

    let idle = async {
        match config.idle_shutdown {
            Some(limit) => loop {
                tokio::time::sleep(Duration::from_secs(5).min(limit)).await;
                if activity.idle_for() >= limit && engine.workers().is_empty() {
                    tracing::info!("idle for {}s: stopping", limit.as_secs());
                    break;
                }
            },
            None => std::future::pending().await,
        }
    };
    // Every request's key is checked (and its place in flight taken) before its body is read.
    let service = InterceptedService::new(
        IsolateControllerServer::new(controller)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        admission,
    );
    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let stop = async {
        tokio::select! {
            () = shutdown => {},
            () = idle => {},
        }
        let _ = stopping.send(());
    };
    // gRPC and HTTP share the port (`http.rs`): the service's routes, and the gateway's with a JSON 404 for the rest.
    let grpc = tonic::service::Routes::new(service).prepare().into_axum_router();
    // The queue (its requests survive restarts) dispatches what a stopped server left once the port is about to
    // serve.
    let queue_store = Arc::new(queue::store::QueueStore::open(&config.data_dir.join(STATE_FILE))?);
    let queue = queue::Queue::start(gateway.clone(), queue_store.clone(), tls.is_some()).await;
    let files = storage::rest::Files {
        storage: storage.clone(),
        gateway: gateway.clone(),
        uids: (config.first_uid, config.uid_count),
    };
    let console = Arc::new(dashboard::Console {
        controller: console_controller,
        gateway: gateway.clone(),
        keys: store,
        capacity: capacity.clone(),
        metrics,
        queue: queue_store.clone(),
        sessions: Default::default(),
        data_dir: config.data_dir.clone(),
        environments_dir: config.environments_dir.clone(),
        jailed: info.unjailed.is_none(),
        local_cgroups: info.unjailed.is_none() && matches!(config.provider, ProviderConfig::Local),
        metrics_public: config.metrics_public,
        tls: tls.is_some(),
    });
    let gateway = gateway::routes(gateway)
        .merge(queue::routes(queue.clone()))
        .merge(storage::rest::routes(files))
        .merge(dashboard::routes(console));
    apps.start_kept_warm().await;
    // Connections from workers' own namespaces (`nested/`) are served as the port's are.
    let worker_connections =
        tokio_stream::wrappers::UnboundedReceiverStream::new(worker_connections).map(|c| Ok(listener::Conn::Plain(c)));
    let incoming = listener::Incoming::new(listener, tls).merge(worker_connections);
    let serving = http::serve(admission::limited(incoming, config.admission.max_connections), grpc, gateway, stop);
    let grace_over = async {
        let _ = stopped.await;
        tracing::info!("stopping: calls still running have {}s to finish", STOP_GRACE.as_secs());
        tokio::time::sleep(STOP_GRACE).await;
    };
    tokio::pin!(serving);
    tokio::select! {
        () = &mut serving => {},
        () = grace_over => {
            tracing::warn!("calls still running after {}s: ending them", STOP_GRACE.as_secs());
            // Each call ends itself (its connection's task runs it, which dropping `serving` would not stop): its
            // client is told, its worker stopped. Then the connections close.
            let _ = end_calls.send(true);
            let _ = tokio::time::timeout(CLOSE_GRACE, &mut serving).await;
        }
    };
    evicting.abort();
    // Requests the queue runs are dropped first (they stay in SQLite, to run again): a replica stopped under one
    // must not read as its failure.
    queue.stop();
    schedules.shutdown().await;
    apps.shutdown().await;
    engine.shutdown().await;
    // Last: what the stop ended is in the history too.
    runs.close().await;
    if let Some(network) = network {
        let _ = tokio::task::spawn_blocking(move || network.close()).await;
    }
    // Once no worker has it bound: the image's mount goes.
    let _ = tokio::task::spawn_blocking(move || storage.close()).await;
    tracing::info!("stopped");
    Ok(())
}

fn geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    #[test]
    fn local_disks_are_not_network_file_systems_and_a_missing_dir_is_judged_by_its_parent() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(super::network_file_system(dir.path()), None);
        assert_eq!(super::network_file_system(&dir.path().join("not/yet")), None);
        assert_eq!(super::network_file_system(std::path::Path::new("relative/not/yet")), None);
        // /proc is no network file system either; what statfs reports for it is read, not guessed.
        assert_eq!(super::network_file_system(std::path::Path::new("/proc")), None);
    }
}
