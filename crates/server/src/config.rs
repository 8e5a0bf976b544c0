//! The server's configuration: command-line choices, plus an optional TOML file in the data dir.
//!
//! ```toml
//! listen = "127.0.0.1:6005"
//! idle_shutdown_seconds = 900        # stop after this long without calls or workers (default: never)
//!
//! [capacity]                         # default: this host's cores, memory and NVIDIA GPUs
//! cpus = 16
//! memory_gb = 64
//! gpus = 2
//! user_share = 0.75                  # the most of the CPUs and memory one user's workers hold (1.0: no limit)
//!
//! [machine_types.XXL]                # added to (or replacing) the built-in XS, S, M, L, XL, GPU-T4, GPU
//! cpus = 16
//! memory_gb = 128
//! gpus = 0
//!
//! [jail]                             # uids of users' workers and builds: first_uid + n for the n-th user
//! first_uid = 200000
//! uid_count = 100000
//!
//! [build]                            # what one environment build may use (jailed, as its user)
//! cpus = 2
//! memory_gb = 4
//! pids = 1024
//! timeout_seconds = 900
//! disk_gb = 20                       # its environment, and what it adds to its uv cache
//!
//! [network]                          # what jailed workers and builds reach
//! egress = "internet"                # workers reach public addresses; or "none": loopback only
//! build_egress = "internet"          # the same for environment builds (which download packages)
//! allow = ["10.1.0.0/16"]            # private ranges reachable all the same
//! subnet = "10.250.0.0/16"           # where the namespaces' veth addresses come from
//! resolver = "10.0.0.2:53"           # DNS; default: the first nameserver of /etc/resolv.conf
//!
//! [limits]                           # what clients and users can make the server hold
//! max_connections = 256              # open connections; more wait to be accepted
//! max_requests = 4096                # requests in flight (a call counts until it ends, queued time included)
//! max_requests_per_key = 256         # the same, per key
//! max_workers_per_user = 64          # live workers (busy or warm) of one user
//! max_queued_gb_per_user = 1         # payloads of one user's calls waiting for capacity
//! max_keep_alive_seconds = 3600      # a longer keep_alive is cut to this (the call's logs say so)
//! max_keys_per_user = 50             # keys (not revoked) of one user; more are refused
//! max_call_depth = 4                 # nested calls: a function calling a function ... at most this deep
//!
//! [environments]                     # when environments are removed (never one in use: a live worker's, or one a
//!                                    # build or call is starting on); least recently used first
//! max_unused_days = 30               # no worker used it for this long (or max_unused_seconds)
//! disk_budget_gb = 200               # all environments together; default: half the data dir's file system
//! max_per_user = 50                  # a build past it first removes that user's least recently used
//! disk_per_user_gb = 50              # the same for their disk; default: a quarter of disk_budget_gb
//! prune_interval_seconds = 3600      # how often the server applies this (and after each build)
//!
//! [apps]                             # web endpoints and their queue
//! request_timeout_seconds = 300      # how long a request waits for a replica (the first builds the environment)
//! default_max_concurrency = 2        # replicas an app runs at most when it names no max_concurrency
//! max_concurrency = 64               # the most any app may ask for
//! start_timeout_seconds = 900        # from a replica's start to its port answering
//! result_retention_hours = 24        # how long the queue keeps finished requests' results
//! webhook_attempts = 5               # deliveries of a webhook before it is given up
//!
//! [runs]                             # the run history (calls, web requests, activations)
//! retention_days = 30                # runs older than this are deleted (checked every prune_interval_seconds)
//! log_limit_kb = 64                  # log bytes kept per run; past it the run's logs say they were cut
//! prune_interval_seconds = 3600
//!
//! [schedules]                        # cron schedules of functions
//! activation_timeout_seconds = 3600  # the longest one activation may run
//! max_per_user = 100                 # active schedules of one user
//! [storage]                          # users' persistent storage, /data in their workers
//! root = "/srv/fal-storage"          # default: <data dir>/storage (a btrfs image is mounted there if it is not btrfs)
//! quota_mb = 1024                    # what one user may keep (kernel-enforced on btrfs)
//! image_gb = 16                      # the image's size, sparse; a larger value grows it at the next start
//! [metrics]                          # Prometheus metrics at GET /metrics
//! public = false                     # true: scraped without a key (else an admin key, `Authorization: Key ...`)
//! [secrets]                          # users' secrets (`fal-serverless secrets`), their workers' variables
//! key_file = "/etc/fal/secrets.key"  # the key they are encrypted with (mode 0600, made on first start; keep it
//!                                    # apart from the database and back it up); default: <data-dir>/secrets.key
//! max_per_user = 50                  # secrets one user may hold
//! max_value_kb = 16                  # the largest value (max_per_user x this: at most 1 MiB)
//!
//! [tls]                              # serve TLS only (paths relative to the config file's directory)
//! cert = "server.pem"                # the certificate chain, PEM
//! key = "server.key"                 # its private key, PEM
//! ```
//!
//! `fal-serverless envs list|rm|prune` shows and removes environments by hand; `prune` applies `[environments]`.
//!
//! Without `[tls]` (or `--tls-cert`/`--tls-key`), a data dir holding the pair `server init --tls-self-signed` made
//! (`<data-dir>/tls/server.pem`, `server.key`) serves TLS with it; otherwise the port is plaintext.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fal_engine::{
    BuildLimits, EnvironmentPolicy, EnvironmentsVolume, KubernetesConfig, MachineType, MachineTypes, PodResources,
    PodToleration, ProviderConfig, SlurmAllocation, SlurmConfig,
};
use fal_sandbox::{Egress, Limits, NetworkPolicy};
use serde::Deserialize;

use crate::admission::AdmissionLimits;
use crate::apps::AppsConfig;
use crate::capacity::Sharing;
use crate::runs::RunsConfig;
use crate::schedules::SchedulesConfig;
use crate::secrets::SecretsConfig;
use crate::storage::StorageConfig;
use sha2::{Digest, Sha256};

use crate::tls::TlsFiles;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
/// Where the server listens unless told otherwise: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:6005";

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Overrides of the host's capacity, from the config file.
    pub cpus: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub gpus: Option<u32>,
    pub machine_types: MachineTypes,
    pub idle_shutdown: Option<Duration>,
    /// Zero-config mode: where to write this server's address and the local admin key (mode 0600).
    pub credentials_file: Option<PathBuf>,
    /// Where workers run: this host, or a Slurm cluster (`provider = "slurm"` and a `[slurm]` table).
    pub provider: ProviderConfig,
    /// Where environments are built: the data dir, or for Slurm `[slurm] shared_dir` (a directory every node mounts
    /// at the same path), so that the server's state stays on its own disk.
    pub environments_dir: PathBuf,
    /// The uids users' jailed processes run as: `uid_count` from `first_uid`.
    pub first_uid: u32,
    pub uid_count: u32,
    pub build: BuildLimits,
    pub network: NetworkPolicy,
    pub admission: AdmissionLimits,
    pub sharing: Sharing,
    /// When environments are removed (`[environments]`).
    pub environments: EnvironmentPolicy,
    /// How often the server applies `environments` (it also does after each build).
    pub prune_interval: Duration,
    pub limits: UserLimits,
    /// Names this server's own things on the host (its nftables table, its Slurm jobs): the same for the same data
    /// dir across restarts, different for another.
    pub tag: String,
    /// The certificate and key the port serves TLS with; `None`: plaintext.
    pub tls: Option<TlsFiles>,
    /// Web endpoints and their queue (`[apps]`).
    pub apps: AppsConfig,
    /// The run history (`[runs]`).
    pub runs: RunsConfig,
    /// Schedules (`[schedules]`).
    pub schedules: SchedulesConfig,
    /// Users' persistent storage (`[storage]`).
    pub storage: StorageConfig,
    /// Users' secrets (`[secrets]`).
    pub secrets: SecretsConfig,
    /// `GET /metrics` takes no key (`[metrics] public = true`); else an admin key.
    pub metrics_public: bool,
}

/// What one user may ask of the server (`[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserLimits {
    /// The longest a worker stays warm after a call; a request asking more gets this, and is told so.
    pub max_keep_alive: Duration,
    /// Keys of one user that are not revoked.
    pub max_keys_per_user: u32,
    /// How deep calls may nest (a function calling an isolated function is depth 1); deeper ones are refused.
    pub max_call_depth: u32,
}

impl Default for UserLimits {
    /// An hour of keep_alive, 50 keys, calls nested 4 deep.
    fn default() -> Self {
        Self { max_keep_alive: Duration::from_secs(3600), max_keys_per_user: 50, max_call_depth: 4 }
    }
}

/// The deepest `[limits] max_call_depth` may allow.
const MAX_CALL_DEPTH: u32 = 64;

/// uids from 200000 on: above the ranges distributions give people and services, below 2^31.
const DEFAULT_FIRST_UID: u32 = 200_000;
const DEFAULT_UID_COUNT: u32 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the config file {path} is invalid: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    idle_shutdown_seconds: Option<u64>,
    #[serde(default)]
    capacity: CapacityConfig,
    #[serde(default)]
    machine_types: BTreeMap<String, MachineTypeConfig>,
    provider: Option<String>,
    slurm: Option<SlurmFileConfig>,
    kubernetes: Option<KubernetesFileConfig>,
    #[serde(default)]
    jail: JailConfig,
    #[serde(default)]
    build: BuildConfig,
    #[serde(default)]
    network: NetworkConfig,
    #[serde(default)]
    limits: LimitsConfig,
    #[serde(default)]
    environments: EnvironmentsConfig,
    tls: Option<TlsConfig>,
    #[serde(default)]
    apps: AppsFileConfig,
    #[serde(default)]
    runs: RunsFileConfig,
    #[serde(default)]
    schedules: SchedulesFileConfig,
    #[serde(default)]
    storage: StorageFileConfig,
    #[serde(default)]
    secrets: SecretsFileConfig,
    #[serde(default)]
    metrics: MetricsFileConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsFileConfig {
    #[serde(default)]
    public: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsFileConfig {
    retention_days: Option<f64>,
    log_limit_kb: Option<u64>,
    prune_interval_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchedulesFileConfig {
    activation_timeout_seconds: Option<u64>,
    max_per_user: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StorageFileConfig {
    root: Option<PathBuf>,
    quota_mb: Option<f64>,
    image_gb: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretsFileConfig {
    key_file: Option<PathBuf>,
    max_per_user: Option<u32>,
    max_value_kb: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppsFileConfig {
    request_timeout_seconds: Option<u64>,
    default_max_concurrency: Option<u32>,
    max_concurrency: Option<u32>,
    start_timeout_seconds: Option<u64>,
    result_retention_hours: Option<f64>,
    webhook_attempts: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsConfig {
    max_connections: Option<usize>,
    max_requests: Option<usize>,
    max_requests_per_key: Option<usize>,
    max_workers_per_user: Option<usize>,
    max_queued_gb_per_user: Option<f64>,
    max_keep_alive_seconds: Option<u32>,
    max_keys_per_user: Option<u32>,
    max_call_depth: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvironmentsConfig {
    max_unused_days: Option<f64>,
    max_unused_seconds: Option<u64>,
    disk_budget_gb: Option<f64>,
    max_per_user: Option<usize>,
    disk_per_user_gb: Option<f64>,
    prune_interval_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsConfig {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct JailConfig {
    first_uid: Option<u32>,
    uid_count: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildConfig {
    cpus: Option<f64>,
    memory_gb: Option<f64>,
    pids: Option<u64>,
    timeout_seconds: Option<u64>,
    disk_gb: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkConfig {
    egress: Option<String>,
    build_egress: Option<String>,
    #[serde(default)]
    allow: Vec<String>,
    subnet: Option<String>,
    resolver: Option<String>,
}

/// `[slurm]`: how machine types become Slurm allocations.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlurmFileConfig {
    partition: Option<String>,
    account: Option<String>,
    qos: Option<String>,
    /// `host:port` of this server that the nodes reach; worker jobs connect back to it (port 0: any).
    callback: Option<String>,
    /// `"shared"`: the data dir (environments included) is on a file system every node mounts at the same path.
    env_cache: Option<String>,
    /// Where the Slurm commands are, if not on `PATH`.
    bin_dir: Option<PathBuf>,
    /// A directory every node mounts at the same path, where environments are built (absolute); unset: the data
    /// dir is that directory, which then must not be on a network file system (the server's state is in it).
    shared_dir: Option<PathBuf>,
    #[serde(default)]
    machine_types: BTreeMap<String, SlurmMachineTypeConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlurmMachineTypeConfig {
    cpus_per_task: u32,
    memory_mb: u64,
    gres: Option<String>,
}

/// `[kubernetes]`: how machine types become pods.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KubernetesFileConfig {
    /// A kubeconfig file; unset: `$KUBECONFIG`, `~/.kube/config`, or the pod's service account.
    kubeconfig: Option<PathBuf>,
    namespace: Option<String>,
    /// The worker image: bash, and the Python the environments are built with at the same path.
    image: Option<String>,
    image_pull_policy: Option<String>,
    service_account: Option<String>,
    priority_class: Option<String>,
    #[serde(default)]
    host_network: bool,
    /// `host:port` this server listens on for worker pods (port 0: any).
    callback: Option<String>,
    /// The host name or address pods connect to, if not `callback`'s host (a Service's name).
    advertise: Option<String>,
    /// The server's directory of environments, mounted at the same path in every pod.
    shared_dir: Option<PathBuf>,
    /// That directory as every node has it (a hostPath volume); unset: `shared_dir`.
    host_path: Option<PathBuf>,
    /// Or a PersistentVolumeClaim holding it (mounted read-only in pods; the server mounts it at `shared_dir`).
    claim: Option<String>,
    #[serde(default)]
    machine_types: BTreeMap<String, KubernetesMachineTypeConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KubernetesMachineTypeConfig {
    cpu: Option<String>,
    memory: Option<String>,
    gpus: Option<u32>,
    gpu_resource: Option<String>,
    #[serde(default)]
    node_selector: BTreeMap<String, String>,
    #[serde(default)]
    tolerations: Vec<TolerationConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TolerationConfig {
    key: Option<String>,
    operator: Option<String>,
    value: Option<String>,
    effect: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CapacityConfig {
    cpus: Option<f64>,
    memory_gb: Option<f64>,
    gpus: Option<u32>,
    user_share: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineTypeConfig {
    cpus: f64,
    memory_gb: f64,
    #[serde(default)]
    gpus: u32,
    pids: Option<u64>,
}

impl ServerConfig {
    /// Defaults, then `config_file` (or `<data_dir>/config.toml` if it exists). `listen` from the command line, if
    /// given, wins over the file.
    pub fn load(data_dir: &Path, config_file: Option<&Path>, listen: Option<SocketAddr>) -> Result<Self, ConfigError> {
        let default_file = data_dir.join("config.toml");
        let path = config_file.map(Path::to_path_buf).or_else(|| default_file.is_file().then_some(default_file));
        let file = match &path {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| ConfigError::Invalid { path: path.clone(), message: e.to_string() })?
            }
            None => FileConfig::default(),
        };
        let invalid = |message: String| ConfigError::Invalid { path: path.clone().unwrap_or_default(), message };

        let listen = match (listen, &file.listen) {
            (Some(listen), _) => listen,
            (None, Some(text)) => text.parse().map_err(|e| invalid(format!("listen = {text:?}: {e}")))?,
            (None, None) => DEFAULT_LISTEN.parse().map_err(|e| invalid(format!("{e}")))?,
        };
        let mut machine_types = MachineTypes::builtin();
        for (name, t) in file.machine_types {
            if !(positive(t.cpus) && positive(t.memory_gb)) {
                return Err(invalid(format!("machine type {name}: cpus and memory_gb must be positive numbers")));
            }
            let mut machine = MachineType::new(&name, t.cpus, (t.memory_gb * GIB) as u64, t.gpus);
            if let Some(pids) = t.pids {
                machine.pids = pids;
            }
            machine_types.insert(machine);
        }
        // The same server (the same data dir) names its things the same way across restarts, and no other server does.
        let canonical = data_dir.canonicalize().unwrap_or_else(|_| data_dir.to_path_buf());
        let tag = hex::encode(&Sha256::digest(canonical.as_os_str().as_encoded_bytes())[..8]);
        let first_uid = file.jail.first_uid.unwrap_or(DEFAULT_FIRST_UID);
        let uid_count = file.jail.uid_count.unwrap_or(DEFAULT_UID_COUNT);
        if first_uid < 1000 || uid_count == 0 || first_uid as u64 + uid_count as u64 > 1 << 31 {
            return Err(invalid(format!(
                "[jail] first_uid = {first_uid}, uid_count = {uid_count}: the uids must be at least 1000 (not a \
                 system account), at least one, and below 2147483648"
            )));
        }
        if ![file.capacity.cpus, file.capacity.memory_gb].into_iter().flatten().all(positive) {
            return Err(invalid("[capacity] cpus and memory_gb must be positive numbers".into()));
        }
        let build = build_limits(&file.build).map_err(invalid)?;
        let network = network_policy(&file.network).map_err(invalid)?;
        let admission = admission_limits(&file.limits).map_err(invalid)?;
        let sharing = sharing(&file.capacity, &file.limits).map_err(invalid)?;
        let (environments, prune_interval) = environment_policy(&file.environments).map_err(invalid)?;
        let limits = user_limits(&file.limits).map_err(invalid)?;
        let mut environments_dir = data_dir.to_path_buf();
        let provider = match (file.provider.as_deref(), file.slurm) {
            (Some("kubernetes"), None) => {
                let kubernetes = file.kubernetes.unwrap_or_default();
                let config = kubernetes_config(&tag, kubernetes, &machine_types).map_err(invalid)?;
                environments_dir = config.environments_dir.clone();
                ProviderConfig::Kubernetes(config)
            }
            (_, _) if file.kubernetes.is_some() && file.provider.as_deref() != Some("kubernetes") => {
                return Err(invalid(
                    "a [kubernetes] table is set but provider is not \"kubernetes\"; add provider = \"kubernetes\""
                        .into(),
                ))
            }
            (None | Some("local"), None) => ProviderConfig::Local,
            (None | Some("local") | Some("kubernetes"), Some(_)) => {
                return Err(invalid(
                    "a [slurm] table is set but provider is not \"slurm\"; add provider = \"slurm\"".into(),
                ))
            }
            (Some("slurm"), slurm) => {
                let mut slurm = slurm.unwrap_or_default();
                if let Some(shared) = slurm.shared_dir.take() {
                    if !shared.is_absolute() {
                        return Err(invalid(format!(
                            "[slurm] shared_dir = {shared:?}: must be an absolute path, the same on every node"
                        )));
                    }
                    environments_dir = shared;
                }
                ProviderConfig::Slurm(slurm_config(&tag, slurm, &machine_types).map_err(invalid)?)
            }
            (Some(other), _) => {
                return Err(invalid(format!("provider = {other:?}: expected \"local\", \"slurm\" or \"kubernetes\"")))
            }
        };
        let secrets = secrets_config(&file.secrets, path.as_deref().and_then(Path::parent)).map_err(invalid)?;
        let tls = match file.tls {
            Some(tls) => {
                let base = path.as_deref().and_then(Path::parent).unwrap_or(data_dir);
                Some(TlsFiles { cert: base.join(tls.cert), key: base.join(tls.key) })
            }
            None => TlsFiles::in_data_dir(data_dir),
        };
        Ok(Self {
            listen,
            provider,
            environments_dir,
            data_dir: data_dir.to_path_buf(),
            cpus: file.capacity.cpus,
            memory_bytes: file.capacity.memory_gb.map(|gb| (gb * GIB) as u64),
            gpus: file.capacity.gpus,
            machine_types,
            idle_shutdown: file.idle_shutdown_seconds.map(Duration::from_secs),
            credentials_file: None,
            first_uid,
            uid_count,
            build,
            network,
            admission,
            sharing,
            environments,
            prune_interval,
            limits,
            tag,
            tls,
            apps: apps_config(&file.apps).map_err(invalid)?,
            runs: runs_config(&file.runs).map_err(invalid)?,
            schedules: schedules_config(&file.schedules).map_err(invalid)?,
            storage: storage_config(&file.storage, path.as_deref().and_then(Path::parent).unwrap_or(data_dir))
                .map_err(invalid)?,
            secrets,
            metrics_public: file.metrics.public,
        })
    }
}

fn runs_config(file: &RunsFileConfig) -> Result<RunsConfig, String> {
    let default = RunsConfig::default();
    let retention = match file.retention_days {
        None => default.retention,
        Some(days) if positive(days) && days < 1e6 => Duration::from_secs_f64(days * 86400.0),
        Some(days) => return Err(format!("[runs] retention_days = {days}: must be a positive number of days")),
    };
    let log_limit = match file.log_limit_kb {
        None => default.log_limit,
        Some(kb) if (1..=1 << 20).contains(&kb) => (kb as usize) * 1024,
        Some(kb) => return Err(format!("[runs] log_limit_kb = {kb}: must be from 1 to 1048576")),
    };
    let prune_interval = match file.prune_interval_seconds {
        None => default.prune_interval,
        Some(0) => return Err("[runs] prune_interval_seconds must be at least 1".into()),
        Some(n) => Duration::from_secs(n),
    };
    Ok(RunsConfig { retention, log_limit, prune_interval })
}

fn schedules_config(file: &SchedulesFileConfig) -> Result<SchedulesConfig, String> {
    let default = SchedulesConfig::default();
    let activation_timeout = match file.activation_timeout_seconds {
        None => default.activation_timeout,
        Some(n) if (1..=i32::MAX as u64).contains(&n) => Duration::from_secs(n),
        Some(n) => return Err(format!("[schedules] activation_timeout_seconds = {n}: must be from 1 to 2147483647")),
    };
    Ok(SchedulesConfig { activation_timeout, max_per_user: file.max_per_user.unwrap_or(default.max_per_user) })
}

fn storage_config(file: &StorageFileConfig, base: &Path) -> Result<StorageConfig, String> {
    let default = StorageConfig::default();
    let quota_mb = file.quota_mb.unwrap_or(default.quota_bytes as f64 / (1 << 20) as f64);
    if !(1.0..=1e9).contains(&quota_mb) {
        return Err(format!("[storage] quota_mb = {quota_mb}: a size of at least 1 MB"));
    }
    let image_gb = file.image_gb.unwrap_or(default.image_bytes as f64 / GIB);
    if !(0.25..=1e6).contains(&image_gb) {
        return Err(format!("[storage] image_gb = {image_gb}: a size of at least 0.25 GB"));
    }
    Ok(StorageConfig {
        root: file.root.as_ref().map(|root| base.join(root)),
        quota_bytes: (quota_mb * (1 << 20) as f64) as u64,
        image_bytes: (image_gb * GIB) as u64,
    })
}

/// `[secrets]`; a relative `key_file` is relative to the config file's directory.
fn secrets_config(file: &SecretsFileConfig, base: Option<&Path>) -> Result<SecretsConfig, String> {
    let default = SecretsConfig::default();
    let max_per_user = file.max_per_user.unwrap_or(default.max_per_user);
    let max_value_bytes = file.max_value_kb.map(|kb| kb as usize * 1024).unwrap_or(default.max_value_bytes);
    if max_per_user == 0 || max_value_bytes == 0 {
        return Err("[secrets] max_per_user and max_value_kb must be at least 1".into());
    }
    // A worker's environment and arguments share what `execve` takes (about 2 MiB); past that no worker of the
    // user could start.
    if max_per_user as usize * max_value_bytes > 1 << 20 {
        return Err(format!(
            "[secrets] max_per_user = {max_per_user} secrets of max_value_kb = {} KiB may come to more than 1 MiB, \
             more than a worker's environment can hold; lower one of them",
            max_value_bytes / 1024
        ));
    }
    let key_file = file.key_file.as_ref().map(|path| base.map(|b| b.join(path)).unwrap_or_else(|| path.clone()));
    Ok(SecretsConfig { key_file, max_per_user, max_value_bytes })
}

fn apps_config(file: &AppsFileConfig) -> Result<AppsConfig, String> {
    let default = AppsConfig::default();
    let seconds = |name: &str, value: Option<u64>, default: Duration| match value {
        None => Ok(default),
        Some(0) => Err(format!("[apps] {name} must be at least 1")),
        Some(n) => Ok(Duration::from_secs(n)),
    };
    let max_concurrency = file.max_concurrency.unwrap_or(default.max_concurrency);
    let default_max_concurrency = file.default_max_concurrency.unwrap_or(default.default_max_concurrency);
    if max_concurrency == 0 || default_max_concurrency == 0 || default_max_concurrency > max_concurrency {
        return Err("[apps] max_concurrency and default_max_concurrency must be at least 1, the default no more than \
                    the maximum"
            .into());
    }
    let result_retention = match file.result_retention_hours {
        None => default.result_retention,
        Some(hours) if positive(hours) => Duration::from_secs_f64(hours * 3600.0),
        Some(hours) => return Err(format!("[apps] result_retention_hours = {hours}: must be a positive number")),
    };
    Ok(AppsConfig {
        request_timeout: seconds("request_timeout_seconds", file.request_timeout_seconds, default.request_timeout)?,
        default_max_concurrency,
        max_concurrency,
        start_timeout: seconds("start_timeout_seconds", file.start_timeout_seconds, default.start_timeout)?,
        result_retention,
        webhook_attempts: file.webhook_attempts.unwrap_or(default.webhook_attempts).max(1),
    })
}

fn admission_limits(file: &LimitsConfig) -> Result<AdmissionLimits, String> {
    let default = AdmissionLimits::default();
    let limits = AdmissionLimits {
        max_connections: file.max_connections.unwrap_or(default.max_connections),
        max_requests: file.max_requests.unwrap_or(default.max_requests),
        max_requests_per_key: file.max_requests_per_key.unwrap_or(default.max_requests_per_key),
    };
    if limits.max_connections == 0 || limits.max_requests == 0 || limits.max_requests_per_key == 0 {
        return Err("[limits] max_connections, max_requests and max_requests_per_key must be at least 1".into());
    }
    // Tokio's semaphore counts to usize::MAX >> 3.
    if limits.max_connections > 1 << 30 {
        return Err("[limits] max_connections must be at most 1073741824".into());
    }
    Ok(limits)
}

fn sharing(capacity: &CapacityConfig, limits: &LimitsConfig) -> Result<Sharing, String> {
    let default = Sharing::default();
    let user_share = capacity.user_share.unwrap_or(default.user_share);
    if !(user_share > 0.0 && user_share <= 1.0) {
        return Err(format!("[capacity] user_share = {user_share}: a fraction above 0 and at most 1"));
    }
    let max_workers_per_user = limits.max_workers_per_user.unwrap_or(default.max_workers_per_user);
    if max_workers_per_user == 0 {
        return Err("[limits] max_workers_per_user must be at least 1".into());
    }
    let queued_gb = limits.max_queued_gb_per_user.unwrap_or(default.max_queued_bytes_per_user as f64 / GIB);
    if !(queued_gb > 0.0 && queued_gb <= 1e6) {
        return Err(format!("[limits] max_queued_gb_per_user = {queued_gb}: a size above 0 GB and at most 1000000"));
    }
    Ok(Sharing { user_share, max_workers_per_user, max_queued_bytes_per_user: (queued_gb * GIB) as usize })
}

fn build_limits(file: &BuildConfig) -> Result<BuildLimits, String> {
    let default = BuildLimits::default();
    let cpus = file.cpus.unwrap_or(default.limits.cpus);
    let memory_gb = file.memory_gb.unwrap_or(default.limits.memory_bytes as f64 / GIB);
    let pids = file.pids.unwrap_or(default.limits.pids);
    let timeout = file.timeout_seconds.unwrap_or(default.timeout.as_secs());
    let disk_gb = file.disk_gb.unwrap_or(default.disk_bytes as f64 / GIB);
    if !(positive(cpus) && positive(memory_gb) && pids > 0 && timeout > 0 && positive(disk_gb)) {
        return Err("[build] cpus, memory_gb, pids, timeout_seconds and disk_gb must be positive".into());
    }
    Ok(BuildLimits {
        limits: Limits { cpus, memory_bytes: (memory_gb * GIB) as u64, pids },
        timeout: Duration::from_secs(timeout),
        disk_bytes: (disk_gb * GIB) as u64,
    })
}

/// How often the server applies `[environments]` unless told.
const DEFAULT_PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

fn environment_policy(file: &EnvironmentsConfig) -> Result<(EnvironmentPolicy, Duration), String> {
    let default = EnvironmentPolicy::default();
    let max_unused = match (file.max_unused_days, file.max_unused_seconds) {
        (Some(_), Some(_)) => {
            return Err("[environments] sets both max_unused_days and max_unused_seconds; keep one".into())
        }
        (Some(days), None) if days.is_finite() && days > 0.0 && days < 1e6 => Duration::from_secs_f64(days * 86400.0),
        (None, Some(seconds)) if seconds > 0 => Duration::from_secs(seconds),
        (None, None) => default.max_unused,
        _ => return Err("[environments] max_unused_days and max_unused_seconds must be positive".into()),
    };
    let gigabytes = |name: &str, value: Option<f64>| match value {
        None => Ok(None),
        Some(gb) if gb.is_finite() && gb > 0.0 && gb < 1e9 => Ok(Some((gb * GIB) as u64)),
        Some(gb) => Err(format!("[environments] {name} = {gb}: must be a positive number of GB")),
    };
    let max_per_user = file.max_per_user.unwrap_or(default.max_per_user);
    let prune_interval = file.prune_interval_seconds.map_or(DEFAULT_PRUNE_INTERVAL, Duration::from_secs);
    if max_per_user == 0 || prune_interval.is_zero() {
        return Err("[environments] max_per_user and prune_interval_seconds must be positive".into());
    }
    let policy = EnvironmentPolicy {
        max_unused,
        disk_budget_bytes: gigabytes("disk_budget_gb", file.disk_budget_gb)?,
        max_per_user,
        disk_per_user_bytes: gigabytes("disk_per_user_gb", file.disk_per_user_gb)?,
    };
    Ok((policy, prune_interval))
}

/// Above zero and finite (TOML has `inf` and `nan`), so that it converts to bytes or a quota without saturating.
fn positive(value: f64) -> bool {
    value > 0.0 && value.is_finite()
}

fn user_limits(file: &LimitsConfig) -> Result<UserLimits, String> {
    let default = UserLimits::default();
    let keep_alive = file.max_keep_alive_seconds.map_or(default.max_keep_alive, |s| Duration::from_secs(s.into()));
    if keep_alive > Duration::from_secs(fal_engine::options::MAX_SECONDS.into()) {
        return Err(format!(
            "[limits] max_keep_alive_seconds = {}: at most {} (what a request's keep_alive can carry)",
            keep_alive.as_secs(),
            fal_engine::options::MAX_SECONDS
        ));
    }
    let max_keys_per_user = file.max_keys_per_user.unwrap_or(default.max_keys_per_user);
    if max_keys_per_user == 0 {
        return Err("[limits] max_keys_per_user = 0: at least 1 (a user with no key cannot call)".into());
    }
    let max_call_depth = file.max_call_depth.unwrap_or(default.max_call_depth);
    if max_call_depth > MAX_CALL_DEPTH {
        return Err(format!(
            "[limits] max_call_depth = {max_call_depth}: at most {MAX_CALL_DEPTH} (each level holds a worker while the \
             next runs); 0 refuses every call made from inside a function"
        ));
    }
    Ok(UserLimits { max_keep_alive: keep_alive, max_keys_per_user, max_call_depth })
}

fn network_policy(file: &NetworkConfig) -> Result<NetworkPolicy, String> {
    let mut policy = NetworkPolicy::internet();
    let egress = |name: &str, value: Option<&str>| match value {
        None | Some("internet") => Ok(Egress::Internet),
        Some("none") => Ok(Egress::None),
        Some(other) => Err(format!("[network] {name} = {other:?}: expected \"internet\" or \"none\"")),
    };
    policy.egress = egress("egress", file.egress.as_deref())?;
    policy.build_egress = egress("build_egress", file.build_egress.as_deref())?;
    policy.allow = file
        .allow
        .iter()
        .map(|net| net.parse().map_err(|e| format!("[network] allow: {e}")))
        .collect::<Result<_, _>>()?;
    if let Some(subnet) = &file.subnet {
        policy.subnet = subnet.parse().map_err(|e| format!("[network] subnet: {e}"))?;
    }
    if let Some(resolver) = &file.resolver {
        let parsed =
            resolver.parse().or_else(|_| resolver.parse().map(|ip| std::net::SocketAddrV4::new(ip, 53))).map_err(
                |_| format!("[network] resolver = {resolver:?}: expected an IPv4 address, optionally with :port"),
            )?;
        policy.resolver = Some(parsed);
    }
    Ok(policy)
}

fn slurm_config(tag: &str, file: SlurmFileConfig, machine_types: &MachineTypes) -> Result<SlurmConfig, String> {
    match file.env_cache.as_deref() {
        None | Some("shared") => {}
        Some("per-node") => {
            return Err("[slurm] env_cache = \"per-node\" is not supported yet; set [slurm] shared_dir to a directory \
                        every node mounts at the same path and env_cache = \"shared\""
                .into())
        }
        Some(other) => return Err(format!("[slurm] env_cache = {other:?}: expected \"shared\"")),
    }
    let callback = match &file.callback {
        None => None,
        Some(text) => Some(text.parse().map_err(|e| format!("[slurm] callback = {text:?}: {e}; expected host:port"))?),
    };
    let mut allocations = BTreeMap::new();
    for (name, t) in file.machine_types {
        machine_types.get(&name).map_err(|e| format!("[slurm.machine_types.{name}]: {e}"))?;
        if t.cpus_per_task == 0 || t.memory_mb == 0 {
            return Err(format!("[slurm.machine_types.{name}]: cpus_per_task and memory_mb must be positive"));
        }
        allocations
            .insert(name, SlurmAllocation { cpus_per_task: t.cpus_per_task, memory_mb: t.memory_mb, gres: t.gres });
    }
    Ok(SlurmConfig {
        partition: file.partition,
        account: file.account,
        qos: file.qos,
        callback,
        allocations,
        tag: format!("fal-serverless-{tag}"),
        bin_dir: file.bin_dir,
    })
}

fn kubernetes_config(
    tag: &str,
    file: KubernetesFileConfig,
    machine_types: &MachineTypes,
) -> Result<KubernetesConfig, String> {
    let callback = match &file.callback {
        None => return Err("[kubernetes] callback is needed: host:port of this server that pods reach".into()),
        Some(text) => text.parse().map_err(|e| format!("[kubernetes] callback = {text:?}: {e}; expected host:port"))?,
    };
    let Some(image) = file.image.filter(|i| !i.is_empty()) else {
        return Err("[kubernetes] image is needed: the worker image (bash, and the environments' Python)".into());
    };
    let Some(shared_dir) = file.shared_dir else {
        return Err("[kubernetes] shared_dir is needed: the directory of environments the pods mount".into());
    };
    if !shared_dir.is_absolute() {
        return Err(format!("[kubernetes] shared_dir = {shared_dir:?}: must be an absolute path"));
    }
    if let Some(policy) = file.image_pull_policy.as_deref() {
        if !["Always", "IfNotPresent", "Never"].contains(&policy) {
            return Err(format!(
                "[kubernetes] image_pull_policy = {policy:?}: expected \"Always\", \"IfNotPresent\" or \"Never\""
            ));
        }
    }
    let volume = match (file.host_path, file.claim) {
        (Some(_), Some(_)) => return Err("[kubernetes]: give host_path or claim, not both".into()),
        (None, Some(claim)) => EnvironmentsVolume::Claim(claim),
        (host_path, None) => EnvironmentsVolume::HostPath(host_path.unwrap_or_else(|| shared_dir.clone())),
    };
    let mut mapped = BTreeMap::new();
    for (name, t) in file.machine_types {
        machine_types.get(&name).map_err(|e| format!("[kubernetes.machine_types.{name}]: {e}"))?;
        let tolerations = t
            .tolerations
            .into_iter()
            .map(|t| PodToleration { key: t.key, operator: t.operator, value: t.value, effect: t.effect })
            .collect();
        mapped.insert(
            name,
            PodResources {
                cpu: t.cpu,
                memory: t.memory,
                gpus: t.gpus,
                gpu_resource: t.gpu_resource,
                node_selector: t.node_selector,
                tolerations,
            },
        );
    }
    Ok(KubernetesConfig {
        kubeconfig: file.kubeconfig,
        namespace: file.namespace.unwrap_or_else(|| "default".into()),
        image,
        image_pull_policy: file.image_pull_policy,
        service_account: file.service_account,
        priority_class: file.priority_class,
        host_network: file.host_network,
        callback: Some(callback),
        advertise: file.advertise,
        volume,
        environments_dir: shared_dir,
        machine_types: mapped,
        tag: format!("fal-serverless-{tag}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_adds_machine_types_and_overrides_capacity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.toml"),
            "listen = \"127.0.0.1:7000\"\n[capacity]\ngpus = 2\n[machine_types.XXL]\ncpus = 16\nmemory_gb = 64\n",
        )
        .unwrap();
        let config = ServerConfig::load(dir.path(), None, None).unwrap();
        assert_eq!(config.listen.port(), 7000);
        assert_eq!(config.gpus, Some(2));
        assert_eq!(config.machine_types.get("XXL").unwrap().memory_bytes, 64 << 30);
        assert!(config.machine_types.get("XS").is_ok());
    }

    #[test]
    fn secrets_section_names_its_key_file_relative_to_the_config_and_bounds_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let write = |text: &str| std::fs::write(dir.path().join("config.toml"), text).unwrap();
        let defaults = ServerConfig::load(dir.path(), None, None).unwrap().secrets;
        assert_eq!(defaults, SecretsConfig::default());
        write("[secrets]\nkey_file = \"keys/secrets.key\"\nmax_per_user = 10\nmax_value_kb = 4\n");
        let secrets = ServerConfig::load(dir.path(), None, None).unwrap().secrets;
        assert_eq!(secrets.key_file, Some(dir.path().join("keys/secrets.key")));
        assert_eq!((secrets.max_per_user, secrets.max_value_bytes), (10, 4096));
        for (bad, says) in [
            ("[secrets]\nmax_per_user = 0\n", "at least 1"),
            ("[secrets]\nmax_per_user = 1000\nmax_value_kb = 64\n", "more than 1 MiB"),
            ("[secrets]\nkeyfile = \"x\"\n", "unknown field"),
        ] {
            write(bad);
            let error = ServerConfig::load(dir.path(), None, None).unwrap_err().to_string();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn slurm_maps_machine_types_and_refuses_what_it_cannot_do() {
        let dir = tempfile::tempdir().unwrap();
        let write = |text: &str| std::fs::write(dir.path().join("config.toml"), text).unwrap();
        write(
            "provider = \"slurm\"\n[slurm]\npartition = \"debug\"\ncallback = \"10.0.0.5:0\"\n\
             [slurm.machine_types.L]\ncpus_per_task = 2\nmemory_mb = 4096\ngres = \"gpu:a100:1\"\n",
        );
        let ProviderConfig::Slurm(slurm) = ServerConfig::load(dir.path(), None, None).unwrap().provider else {
            panic!("not slurm");
        };
        assert_eq!(slurm.partition.as_deref(), Some("debug"));
        assert_eq!(slurm.allocations["L"].gres.as_deref(), Some("gpu:a100:1"));
        assert!(slurm.tag.starts_with("fal-serverless-"));
        write("provider = \"slurm\"\n[slurm.machine_types.XXXL]\ncpus_per_task = 2\nmemory_mb = 1\n");
        let err = ServerConfig::load(dir.path(), None, None).unwrap_err().to_string();
        assert!(err.contains("unknown machine type \"XXXL\""), "{err}");
        write("provider = \"slurm\"\n[slurm]\nenv_cache = \"per-node\"\n");
        assert!(ServerConfig::load(dir.path(), None, None).unwrap_err().to_string().contains("not supported yet"));
        write("[slurm]\npartition = \"x\"\n");
        assert!(ServerConfig::load(dir.path(), None, None).unwrap_err().to_string().contains("provider = \"slurm\""));
        // Environments go to the shared dir; the data dir (the server's state) stays where it is.
        write("provider = \"slurm\"\n[slurm]\nshared_dir = \"/shared/fal\"\n");
        let config = ServerConfig::load(dir.path(), None, None).unwrap();
        assert_eq!(
            (config.environments_dir.as_path(), config.data_dir.as_path()),
            (Path::new("/shared/fal"), dir.path())
        );
        write("provider = \"slurm\"\n[slurm]\nshared_dir = \"shared\"\n");
        assert!(ServerConfig::load(dir.path(), None, None)
            .unwrap_err()
            .to_string()
            .contains("must be an absolute path"));
        write("provider = \"slurm\"\n");
        assert_eq!(ServerConfig::load(dir.path(), None, None).unwrap().environments_dir, dir.path());
    }

    #[test]
    fn kubernetes_maps_machine_types_to_pods_and_refuses_what_it_cannot_do() {
        let dir = tempfile::tempdir().unwrap();
        let write = |text: &str| std::fs::write(dir.path().join("config.toml"), text).unwrap();
        let load = || ServerConfig::load(dir.path(), None, None);
        let base = "provider = \"kubernetes\"\n[kubernetes]\nimage = \"fal-worker:1\"\ncallback = \"10.0.0.5:0\"\n\
                    shared_dir = \"/srv/fal\"\n";
        write(&format!(
            "{base}claim = \"fal-envs\"\n[kubernetes.machine_types.GPU]\ncpu = \"6\"\nmemory = \"48Gi\"\n\
             node_selector = {{ gpu = \"a100\" }}\n\
             tolerations = [{{ key = \"nvidia.com/gpu\", operator = \"Exists\", effect = \"NoSchedule\" }}]\n"
        ));
        let config = load().unwrap();
        assert_eq!(config.environments_dir, Path::new("/srv/fal"));
        let ProviderConfig::Kubernetes(kubernetes) = config.provider else { panic!("not kubernetes") };
        assert_eq!(
            (kubernetes.namespace.as_str(), kubernetes.volume),
            ("default", EnvironmentsVolume::Claim("fal-envs".into()))
        );
        assert_eq!(kubernetes.machine_types["GPU"].node_selector["gpu"], "a100");
        assert_eq!(kubernetes.machine_types["GPU"].tolerations[0].operator.as_deref(), Some("Exists"));
        write(base);
        let ProviderConfig::Kubernetes(kubernetes) = load().unwrap().provider else { panic!("not kubernetes") };
        assert_eq!(
            kubernetes.volume,
            EnvironmentsVolume::HostPath("/srv/fal".into()),
            "the nodes' path is the server's"
        );
        for (bad, says) in [
            (
                "provider = \"kubernetes\"\n[kubernetes]\ncallback = \"1.2.3.4:0\"\nshared_dir = \"/s\"\n",
                "image is needed",
            ),
            ("provider = \"kubernetes\"\n[kubernetes]\nimage = \"i\"\nshared_dir = \"/s\"\n", "callback is needed"),
            (&format!("{base}host_path = \"/a\"\nclaim = \"c\"\n"), "not both"),
            (&format!("{base}image_pull_policy = \"Sometimes\"\n"), "image_pull_policy"),
            (&format!("{base}[kubernetes.machine_types.XXXL]\ncpu = \"1\"\n"), "unknown machine type \"XXXL\""),
            ("[kubernetes]\nimage = \"i\"\n", "provider = \"kubernetes\""),
        ] {
            write(bad);
            let error = load().unwrap_err().to_string();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn jail_build_and_network_sections_parse_and_refuse_nonsense() {
        let dir = tempfile::tempdir().unwrap();
        let write = |text: &str| std::fs::write(dir.path().join("config.toml"), text).unwrap();
        let defaults = ServerConfig::load(dir.path(), None, None).unwrap();
        assert_eq!((defaults.first_uid, defaults.network.egress), (200_000, Egress::Internet));
        write(
            "[jail]\nfirst_uid = 300000\nuid_count = 10\n[build]\ntimeout_seconds = 30\n\
             [network]\negress = \"none\"\nallow = [\"10.1.0.0/16\"]\nresolver = \"127.0.0.1:5353\"\n",
        );
        let config = ServerConfig::load(dir.path(), None, None).unwrap();
        assert_eq!((config.first_uid, config.uid_count), (300_000, 10));
        assert_eq!(config.build.timeout, Duration::from_secs(30));
        assert_eq!((config.network.egress, config.network.build_egress), (Egress::None, Egress::Internet));
        assert_eq!(config.network.allow[0].to_string(), "10.1.0.0/16");
        assert_eq!(config.network.resolver.unwrap().port(), 5353);
        assert_eq!(config.limits, UserLimits::default());
        write("[limits]\nmax_keep_alive_seconds = 60\nmax_keys_per_user = 3\n");
        let limits = ServerConfig::load(dir.path(), None, None).unwrap().limits;
        assert_eq!((limits.max_keep_alive, limits.max_keys_per_user), (Duration::from_secs(60), 3));
        for (bad, says) in [
            ("[network]\negress = \"lan\"\n", "expected \"internet\""),
            ("[network]\nallow = [\"10.1.0.1/16\"]\n", "host bits"),
            ("[jail]\nfirst_uid = 0\n", "at least 1000"),
            ("[build]\nmemory_gb = 0\n", "must be positive"),
            ("[build]\ncpus = inf\n", "must be positive"),
            ("[machine_types.X]\ncpus = nan\nmemory_gb = 1\n", "must be positive numbers"),
            ("[capacity]\nmemory_gb = inf\n", "must be positive numbers"),
            ("[limits]\nmax_keep_alive_seconds = 4000000000\n", "at most 2147483647"),
            ("[limits]\nmax_call_depth = 65\n", "at most 64"),
            ("[limits]\nmax_keys_per_user = 0\n", "at least 1"),
        ] {
            write(bad);
            let err = ServerConfig::load(dir.path(), None, None).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn the_environments_section_sets_the_eviction_policy() {
        let dir = tempfile::tempdir().unwrap();
        let write = |text: &str| std::fs::write(dir.path().join("config.toml"), text).unwrap();
        let defaults = ServerConfig::load(dir.path(), None, None).unwrap();
        assert_eq!(defaults.environments, EnvironmentPolicy::default());
        assert_eq!(defaults.prune_interval, Duration::from_secs(3600));
        write(
            "[environments]\nmax_unused_seconds = 5\ndisk_budget_gb = 0.5\nmax_per_user = 3\n\
             disk_per_user_gb = 0.25\nprune_interval_seconds = 2\n",
        );
        let config = ServerConfig::load(dir.path(), None, None).unwrap();
        let policy = config.environments;
        assert_eq!(policy.max_unused, Duration::from_secs(5));
        assert_eq!((policy.disk_budget_bytes, policy.disk_per_user_bytes), (Some(512 << 20), Some(256 << 20)));
        assert_eq!((policy.max_per_user, config.prune_interval), (3, Duration::from_secs(2)));
        write("[environments]\nmax_unused_days = 7\n");
        let week = ServerConfig::load(dir.path(), None, None).unwrap().environments.max_unused;
        assert_eq!(week, Duration::from_secs(7 * 86400));
        for (bad, says) in [
            ("[environments]\nmax_unused_days = 1\nmax_unused_seconds = 1\n", "keep one"),
            ("[environments]\nmax_unused_days = -1\n", "must be positive"),
            ("[environments]\ndisk_budget_gb = 0\n", "disk_budget_gb = 0"),
            ("[environments]\nmax_per_user = 0\n", "must be positive"),
            ("[environments]\nmax_unused = 3\n", "unknown field"),
        ] {
            write(bad);
            let err = ServerConfig::load(dir.path(), None, None).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn tls_comes_from_the_config_file_else_the_data_dirs_own_pair() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ServerConfig::load(dir.path(), None, None).unwrap().tls, None);
        crate::tls::self_signed(dir.path(), &["localhost".into()]).unwrap();
        let made = ServerConfig::load(dir.path(), None, None).unwrap().tls.unwrap();
        assert_eq!(made.cert, dir.path().join("tls/server.pem"));
        std::fs::write(dir.path().join("config.toml"), "[tls]\ncert = \"c.pem\"\nkey = \"/k.pem\"\n").unwrap();
        let named = ServerConfig::load(dir.path(), None, None).unwrap().tls.unwrap();
        assert_eq!((named.cert, named.key), (dir.path().join("c.pem"), PathBuf::from("/k.pem")));
    }

    #[test]
    fn unknown_keys_are_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.toml"), "[capacity]\ncores = 2\n").unwrap();
        let err = ServerConfig::load(dir.path(), None, None).unwrap_err().to_string();
        assert!(err.contains("config.toml") && err.contains("cores"), "{err}");
    }

    #[test]
    fn the_runs_and_schedules_sections_set_retention_log_limit_and_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let config = |text: &str| {
            std::fs::write(dir.path().join("config.toml"), text).unwrap();
            ServerConfig::load(dir.path(), None, None)
        };
        let loaded = config("").unwrap();
        assert_eq!((loaded.runs, loaded.schedules), (RunsConfig::default(), SchedulesConfig::default()));
        let loaded = config(
            "[runs]\nretention_days = 0.5\nlog_limit_kb = 8\nprune_interval_seconds = 60\n\
             [schedules]\nactivation_timeout_seconds = 30\nmax_per_user = 3\n",
        )
        .unwrap();
        assert_eq!(
            loaded.runs,
            RunsConfig {
                retention: Duration::from_secs(43200),
                log_limit: 8192,
                prune_interval: Duration::from_secs(60)
            }
        );
        assert_eq!(loaded.schedules, SchedulesConfig { activation_timeout: Duration::from_secs(30), max_per_user: 3 });
        for (bad, says) in [
            ("[runs]\nretention_days = 0\n", "[runs] retention_days"),
            ("[runs]\nlog_limit_kb = 0\n", "[runs] log_limit_kb"),
            ("[runs]\nprune_interval_seconds = 0\n", "[runs] prune_interval_seconds"),
            ("[schedules]\nactivation_timeout_seconds = 0\n", "[schedules] activation_timeout_seconds"),
            ("[schedules]\nevery = 1\n", "every"),
        ] {
            let error = config(bad).unwrap_err().to_string();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn storage_takes_a_root_a_quota_and_an_image_size() {
        let dir = tempfile::tempdir().unwrap();
        let config = ServerConfig::load(dir.path(), None, None).unwrap();
        assert_eq!(config.storage, StorageConfig::default());
        std::fs::write(dir.path().join("config.toml"), "[storage]\nroot = \"users\"\nquota_mb = 24\nimage_gb = 2\n")
            .unwrap();
        let config = ServerConfig::load(dir.path(), None, None).unwrap();
        assert_eq!(config.storage.root, Some(dir.path().join("users")));
        assert_eq!((config.storage.quota_bytes, config.storage.image_bytes), (24 << 20, 2 << 30));
        std::fs::write(dir.path().join("config.toml"), "[storage]\nquota_mb = 0\n").unwrap();
        let err = ServerConfig::load(dir.path(), None, None).unwrap_err().to_string();
        assert!(err.contains("[storage] quota_mb = 0"), "{err}");
    }
}
