//! The Kubernetes launcher: a worker is a pod. Its container's CPU and memory requests equal its limits, the machine
//! type's (so the kubelet enforces them, and the pod is of the Guaranteed class), with `nvidia.com/gpu` for GPU
//! types; it is labelled with the server's tag, the user and the environment, runs the worker image (which has the
//! Python the environments were built with, at the same path), mounts its own environment (a `subPath`, read-only)
//! from a volume every node has (a hostPath or a PersistentVolumeClaim) at the path the server built it at, and
//! connects back to the server as a Slurm job does (bash's `/dev/tcp`, a one-time token per pod).
//!
//! A bare pod, not a Job: a worker is never retried (`restartPolicy: Never`; a second copy would have nobody to
//! serve), its end is the pod's, and deleting it is all a stop needs; a Job would only add a controller between the
//! server and the pod (and its pods would outlive a Job deleted without propagation).
//!
//! One watch of this server's pods (by label) keeps the [`JobBook`] current: unschedulable (the scheduler's message
//! goes to the caller's logs), running on a node, killed for memory (`OOMKilled`), evicted or deleted, an image that
//! cannot be pulled. The pod is the sandbox here: the worker runs as the user's uid, without privilege escalation or
//! capabilities, without a service account token; the server's bubblewrap jail is not used inside it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, EnvVarSource, HostPathVolumeSource, Node, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, Pod, PodSpec, ResourceRequirements, SeccompProfile, SecurityContext, Toleration,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::runtime::watcher;
use tokio::sync::OnceCell;

use super::cluster::book::{EndCause, Ending, JobBook, JobState};
use super::cluster::{connect_back, JobRequest, Launcher, SubmitError};
use crate::error::CallError;
use crate::machine::MachineType;
use crate::worker::BoxFuture;

/// The label every worker pod of this server carries, valued with its tag.
const SERVER_LABEL: &str = "fal-serverless/server";
const USER_LABEL: &str = "fal-serverless/user";
const ENVIRONMENT_LABEL: &str = "fal-serverless/environment";
/// The GPU resource a GPU machine type asks for unless its mapping says another.
const NVIDIA_GPU: &str = "nvidia.com/gpu";
/// The uid workers run as where the server has no uid of the user's (it does not jail).
const NOBODY: u32 = 65534;
/// How long what the watch said of a pod is kept after the pod is gone (for a worker that asks why it ended).
const KEPT: Duration = Duration::from_secs(600);
/// How often followed jobs are given what the watch knows of them (a job followed after its pod's last event).
const TICK: Duration = Duration::from_millis(200);
/// What a worker's function sees of its pod's environment: which pod and node it is (from the downward API) and
/// which GPUs it was given.
const KEPT_VARIABLES: [&str; 3] = ["FAL_WORKER_POD", "FAL_WORKER_NODE", "NVIDIA_VISIBLE_DEVICES"];
/// Waiting reasons of a container that will not start by waiting longer.
const UNSTARTABLE: [&str; 6] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// How a server runs workers on Kubernetes.
#[derive(Debug, Clone, Default)]
pub struct KubernetesConfig {
    /// A kubeconfig file; `None`: `$KUBECONFIG` or `~/.kube/config`, else the pod's service account (in-cluster).
    pub kubeconfig: Option<PathBuf>,
    pub namespace: String,
    /// The worker image: has bash and the Python the environments were built with, at the same path.
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`; `None`: Kubernetes's default for the image's tag.
    pub image_pull_policy: Option<String>,
    pub service_account: Option<String>,
    pub priority_class: Option<String>,
    /// Pods use their node's network (clusters without a pod network, or a callback only nodes reach).
    pub host_network: bool,
    /// Where the server listens for worker pods (port 0: any free port).
    pub callback: Option<SocketAddr>,
    /// The host name or address pods connect to, if not `callback`'s (a Service's name, for a server in the
    /// cluster: it listens on all addresses there).
    pub advertise: Option<String>,
    /// Where the environments come from on the nodes.
    pub volume: EnvironmentsVolume,
    /// The server's environments dir: mounted at the same path in each pod.
    pub environments_dir: PathBuf,
    pub machine_types: BTreeMap<String, PodResources>,
    /// Marks this server's pods (a label); stable across restarts of the same server.
    pub tag: String,
}

/// The volume the environments are on, as every node sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum EnvironmentsVolume {
    /// A directory of every node.
    HostPath(PathBuf),
    /// A PersistentVolumeClaim (ReadOnlyMany or ReadWriteMany) the server has mounted too.
    Claim(String),
}

impl Default for EnvironmentsVolume {
    fn default() -> Self {
        Self::HostPath(PathBuf::new())
    }
}

/// One machine type's pod: overrides of its size, and where it may run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodResources {
    /// A Kubernetes quantity (`"2"`, `"500m"`); `None`: the machine type's CPUs.
    pub cpu: Option<String>,
    /// A Kubernetes quantity (`"8Gi"`); `None`: the machine type's memory.
    pub memory: Option<String>,
    /// GPUs; `None`: the machine type's.
    pub gpus: Option<u32>,
    /// The GPU resource name; `None`: `nvidia.com/gpu`.
    pub gpu_resource: Option<String>,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<PodToleration>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodToleration {
    pub key: Option<String>,
    pub operator: Option<String>,
    pub value: Option<String>,
    pub effect: Option<String>,
}

pub(crate) struct Kubernetes {
    config: KubernetesConfig,
    client: OnceCell<kube::Client>,
}

impl std::fmt::Debug for Kubernetes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubernetes").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Kubernetes {
    pub fn new(config: KubernetesConfig) -> Self {
        Self { config, client: OnceCell::new() }
    }

    async fn client(&self) -> Result<kube::Client, String> {
        let client = self
            .client
            .get_or_try_init(|| async {
                let config = match &self.config.kubeconfig {
                    Some(path) => {
                        let file = kube::config::Kubeconfig::read_from(path)
                            .map_err(|e| format!("cannot read the kubeconfig {}: {e}", path.display()))?;
                        kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                            .await
                            .map_err(|e| format!("the kubeconfig {}: {e}", path.display()))?
                    }
                    None => kube::Config::infer()
                        .await
                        .map_err(|e| format!("no Kubernetes cluster configured ({e}); set [kubernetes] kubeconfig"))?,
                };
                kube::Client::try_from(config).map_err(|e| format!("cannot make a Kubernetes client: {e}"))
            })
            .await?;
        Ok(client.clone())
    }

    async fn pods(&self) -> Result<Api<Pod>, String> {
        Ok(Api::namespaced(self.client().await?, &self.config.namespace))
    }

    fn selector(&self) -> String {
        format!("{SERVER_LABEL}={}", self.config.tag)
    }

    /// The pod of a worker job.
    fn pod(&self, job: &JobRequest<'_>, resources: &Sized, name: &str) -> Pod {
        let config = &self.config;
        // `<environments>/envs/<user>/<key>`: the user and the environment, as labels.
        let mut parts = job.spec.env_root.iter().rev().map(|p| p.to_string_lossy().into_owned());
        let (key, user) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        let labels = BTreeMap::from([
            (SERVER_LABEL.to_string(), config.tag.clone()),
            (USER_LABEL.to_string(), label_value(&user)),
            (ENVIRONMENT_LABEL.to_string(), label_value(&key)),
            ("app.kubernetes.io/managed-by".to_string(), "fal-serverless".to_string()),
        ]);
        let annotations = BTreeMap::from([("fal-serverless/user".to_string(), user)]);
        let host = config.advertise.clone().unwrap_or_else(|| job.callback.ip().to_string());
        let script = connect_back(job.spec, job.agent, (&host, job.callback.port()), job.token, &KEPT_VARIABLES);
        let mut limits = BTreeMap::from([
            ("cpu".to_string(), Quantity(resources.cpu.clone())),
            ("memory".to_string(), Quantity(resources.memory.clone())),
        ]);
        if resources.gpus > 0 {
            limits.insert(resources.gpu_resource.clone(), Quantity(resources.gpus.to_string()));
        }
        // Only this worker's environment (and the dill layer it loads), not the whole directory: another user's
        // environments are not this pod's to read.
        let mounts = [Some(job.spec.env_root.as_path()), job.spec.dill_layer.as_deref()]
            .into_iter()
            .flatten()
            .filter_map(|path| {
                let sub_path = path.strip_prefix(&config.environments_dir).ok()?;
                Some(VolumeMount {
                    name: "environments".into(),
                    mount_path: path.display().to_string(),
                    sub_path: Some(sub_path.display().to_string()),
                    read_only: Some(true),
                    ..VolumeMount::default()
                })
            })
            .collect();
        let volume = match &config.volume {
            EnvironmentsVolume::HostPath(path) => Volume {
                name: "environments".into(),
                host_path: Some(HostPathVolumeSource {
                    path: path.display().to_string(),
                    type_: Some("Directory".into()),
                }),
                ..Volume::default()
            },
            EnvironmentsVolume::Claim(claim) => Volume {
                name: "environments".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    read_only: Some(true),
                }),
                ..Volume::default()
            },
        };
        let container = Container {
            name: "worker".into(),
            image: Some(config.image.clone()),
            image_pull_policy: config.image_pull_policy.clone(),
            command: Some(vec!["/bin/bash".into(), "-c".into(), script]),
            env: Some(vec![downward("FAL_WORKER_POD", "metadata.name"), downward("FAL_WORKER_NODE", "spec.nodeName")]),
            resources: Some(ResourceRequirements {
                requests: Some(limits.clone()),
                limits: Some(limits),
                ..ResourceRequirements::default()
            }),
            volume_mounts: Some(mounts),
            security_context: Some(SecurityContext {
                // The user's uid where the server has one for them (it jails), else nobody's: never root.
                run_as_user: Some(i64::from(job.run_as.unwrap_or(NOBODY))),
                run_as_group: Some(i64::from(job.run_as.unwrap_or(NOBODY))),
                run_as_non_root: Some(true),
                allow_privilege_escalation: Some(false),
                capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
                seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
                ..SecurityContext::default()
            }),
            ..Container::default()
        };
        Pod {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some(labels),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: vec![container],
                restart_policy: Some("Never".into()),
                host_network: config.host_network.then_some(true),
                dns_policy: config.host_network.then(|| "ClusterFirstWithHostNet".to_string()),
                // The user's code gets no credentials for the cluster's API.
                automount_service_account_token: Some(false),
                enable_service_links: Some(false),
                service_account_name: config.service_account.clone(),
                priority_class_name: config.priority_class.clone(),
                node_selector: (!resources.node_selector.is_empty()).then(|| resources.node_selector.clone()),
                tolerations: (!resources.tolerations.is_empty()).then(|| resources.tolerations.clone()),
                termination_grace_period_seconds: Some(5),
                volumes: Some(vec![volume]),
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    /// Whether some node offers `resource` (for GPU types: refused at once on a cluster without GPUs, not left
    /// Pending until the call's timeout).
    async fn offered(&self, resource: &str) -> Result<bool, String> {
        let nodes: Api<Node> = Api::all(self.client().await?);
        let listed =
            nodes.list(&ListParams::default()).await.map_err(|e| format!("cannot list nodes: {}", api_error(&e)))?;
        Ok(listed.items.iter().any(|node| {
            node.status
                .as_ref()
                .and_then(|s| s.allocatable.as_ref())
                .and_then(|a| a.get(resource))
                .is_some_and(|q| q.0 != "0")
        }))
    }
}

/// A machine type's pod size, as Kubernetes quantities.
#[derive(Debug, Clone, PartialEq)]
struct Sized {
    cpu: String,
    memory: String,
    gpus: u32,
    gpu_resource: String,
    node_selector: BTreeMap<String, String>,
    tolerations: Vec<Toleration>,
}

impl Sized {
    fn of(machine: &MachineType, mapped: Option<&PodResources>) -> Self {
        let mapped = mapped.cloned().unwrap_or_default();
        Self {
            cpu: mapped.cpu.unwrap_or_else(|| format!("{}m", (machine.cpus * 1000.0).ceil().max(1.0) as u64)),
            memory: mapped.memory.unwrap_or_else(|| machine.memory_bytes.to_string()),
            gpus: mapped.gpus.unwrap_or(machine.gpus),
            gpu_resource: mapped.gpu_resource.unwrap_or_else(|| NVIDIA_GPU.into()),
            node_selector: mapped.node_selector,
            tolerations: mapped
                .tolerations
                .into_iter()
                .map(|t| Toleration {
                    key: t.key,
                    operator: t.operator,
                    value: t.value,
                    effect: t.effect,
                    toleration_seconds: None,
                })
                .collect(),
        }
    }

    /// As a user would read it in an error.
    fn asked(&self) -> String {
        let mut asked = format!("cpu={} memory={}", self.cpu, self.memory);
        if self.gpus > 0 {
            asked.push_str(&format!(" {}={}", self.gpu_resource, self.gpus));
        }
        asked
    }
}

impl Launcher for Kubernetes {
    const JOB: &'static str = "pod";
    const WAITING: &'static str = "waiting for a Kubernetes node";
    const CLUSTER: &'static str = "Kubernetes";
    const SECTION: &'static str = "kubernetes";
    const JAILS: bool = false;
    const KEEPS_ENDED: bool = true;

    fn callback_address(&self) -> Result<SocketAddr, CallError> {
        self.config.callback.ok_or_else(|| {
            CallError::Spawn("the kubernetes provider needs `callback`: an address of the server pods reach".into())
        })
    }

    fn submit<'a>(&'a self, job: JobRequest<'a>) -> BoxFuture<'a, Result<String, SubmitError>> {
        Box::pin(async move {
            let sized = Sized::of(job.machine, self.config.machine_types.get(&job.machine.name));
            let refused = |reason: String| SubmitError::Refused { asked: sized.asked(), reason };
            if sized.gpus > 0 && !self.offered(&sized.gpu_resource).await.map_err(SubmitError::Failed)? {
                return Err(refused(format!(
                    "no node of the cluster offers {} (is the device plugin installed?)",
                    sized.gpu_resource
                )));
            }
            let name = format!("fal-worker-{}", hex::encode(rand::random::<[u8; 6]>()));
            let pod = self.pod(&job, &sized, &name);
            let pods = self.pods().await.map_err(SubmitError::Failed)?;
            // Dropped while the API creates it (its call abandoned), the pod would have no job to delete it.
            let mut unowned = Unowned { pods: pods.clone(), name: Some(name.clone()) };
            let created = pods.create(&PostParams::default(), &pod).await;
            unowned.name = None;
            match created {
                Ok(_) => Ok(name),
                // Invalid (422): what the machine type's mapping asks for (a quantity, a resource) is refused.
                Err(error) => match &error {
                    kube::Error::Api(status) if status.code == 422 => Err(refused(api_error(&error))),
                    _ => Err(SubmitError::Failed(api_error(&error))),
                },
            }
        })
    }

    fn observe(self: Arc<Self>, book: Arc<JobBook>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut seen = Seen::default();
            loop {
                let pods = match self.pods().await {
                    Ok(pods) => pods,
                    Err(why) => {
                        book.trouble(Some(why));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let config = watcher::Config::default().labels(&self.selector());
                let mut events = std::pin::pin!(watcher(pods, config));
                let mut tick = tokio::time::interval(TICK);
                loop {
                    tokio::select! {
                        event = events.next() => match event {
                            Some(Ok(event)) => {
                                book.trouble(None);
                                seen.event(event, &book);
                            }
                            // The watcher retries on its own; a failure is told to the waiting calls meanwhile.
                            Some(Err(error)) => {
                                book.trouble(Some(format!("watching pods: {error}")));
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                            None => break,
                        },
                        _ = tick.tick() => seen.tell(&book),
                    }
                }
            }
        })
    }

    fn cancel<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let pods = self.pods().await?;
            // At once (grace 0): the worker has nothing to finish (it is idle, or its call is over). A graceful
            // delete waits on the kubelet, which on the test cluster kept pods terminating for over a minute. Known
            // cost: the pod leaves the API before its container is gone, so the scheduler may count its node's
            // resources free a little early.
            let now = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
            for id in ids.iter().filter(|id| !id.is_empty()) {
                match pods.delete(id, &now).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.code == 404 => {}
                    Err(error) => return Err(format!("cannot delete pod {id}: {}", api_error(&error))),
                }
            }
            Ok(())
        })
    }

    fn leftovers(&self) -> BoxFuture<'_, Result<Vec<String>, String>> {
        Box::pin(async move {
            let pods = self.pods().await?;
            let listed = pods
                .list(&ListParams::default().labels(&self.selector()))
                .await
                .map_err(|e| format!("cannot list pods: {}", api_error(&e)))?;
            Ok(listed.items.into_iter().filter_map(|pod| pod.metadata.name).collect())
        })
    }
}

/// A variable valued with a field of the pod (the downward API).
fn downward(name: &str, field: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: field.into(), api_version: None }),
            ..EnvVarSource::default()
        }),
        value: None,
    }
}

/// A pod being created: deleted if its creation is abandoned (`name` still set when dropped).
struct Unowned {
    pods: Api<Pod>,
    name: Option<String>,
}

impl Drop for Unowned {
    fn drop(&mut self) {
        if let (Some(name), Ok(runtime)) = (self.name.take(), tokio::runtime::Handle::try_current()) {
            let pods = self.pods.clone();
            runtime.spawn(async move {
                match pods.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.code == 404 => {}
                    Err(error) => {
                        tracing::warn!(pod = %name, error = %api_error(&error), "cannot delete an abandoned pod")
                    }
                }
            });
        }
    }
}

/// What the watch said of this server's pods, kept a while after each is gone.
#[derive(Debug, Default)]
struct Seen {
    pods: HashMap<String, (JobState, Instant)>,
    /// The pods of a (re-)list under way: those it leaves out are gone.
    listing: Option<HashSet<String>>,
}

impl Seen {
    fn event(&mut self, event: watcher::Event<Pod>, book: &JobBook) {
        match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                let Some(name) = pod.metadata.name.clone() else { return };
                if let Some(listing) = self.listing.as_mut() {
                    listing.insert(name.clone());
                }
                self.set(name, state_of(&pod), book);
            }
            watcher::Event::Delete(pod) => {
                let Some(name) = pod.metadata.name.clone() else { return };
                let last = self.pods.get(&name).map(|(state, _)| state.clone()).unwrap_or_else(|| state_of(&pod));
                self.set(name, deleted(&pod, last), book);
            }
            watcher::Event::Init => self.listing = Some(HashSet::new()),
            // A re-list (after the watch expired, say) tells no deletions: pods it did not list went meanwhile.
            watcher::Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                let vanished: Vec<String> = self.pods.keys().filter(|name| !listed.contains(*name)).cloned().collect();
                for name in vanished {
                    if let Some((last, _)) = self.pods.get(&name).cloned() {
                        if !matches!(last, JobState::Ended(_)) {
                            let ending = Ending { cause: EndCause::Cancelled, node: None, detail: "deleted".into() };
                            self.set(name, JobState::Ended(ending), book);
                        }
                    }
                }
            }
        }
    }

    fn set(&mut self, name: String, state: JobState, book: &JobBook) {
        if matches!(state, JobState::Ended(_)) {
            book.gone(&name);
        }
        self.pods.insert(name, (state, Instant::now()));
    }

    /// Gives followed jobs what is known of them (one followed after its pod's last event too), and forgets pods
    /// gone long enough.
    fn tell(&mut self, book: &JobBook) {
        self.pods.retain(|name, (state, seen)| {
            let kept = seen.elapsed() < KEPT || !matches!(state, JobState::Ended(_));
            if !kept {
                book.forget(name);
            }
            kept
        });
        for id in book.followed() {
            if let Some((state, _)) = self.pods.get(&id) {
                book.record(&id, state.clone());
            }
        }
    }
}

/// What the API said, without kube-rs's wrapping.
fn api_error(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.reason),
        other => other.to_string(),
    }
}

/// A label value made of `text`: at most 63 of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
fn label_value(text: &str) -> String {
    let cleaned: String =
        text.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).take(63).collect();
    cleaned.trim_matches(|c: char| !c.is_ascii_alphanumeric()).to_string()
}

/// What a pod's status says of its worker.
fn state_of(pod: &Pod) -> JobState {
    let status = pod.status.clone().unwrap_or_default();
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let containers = status.container_statuses.clone().unwrap_or_default();
    let on = node.as_ref().map(|n| format!(" on node {n}")).unwrap_or_default();
    let ending = |cause, detail: String| JobState::Ended(Ending { cause, node: node.clone(), detail });
    if status.reason.as_deref() == Some("Evicted") {
        return ending(EndCause::Cancelled, format!("evicted{on}: {}", status.message.clone().unwrap_or_default()));
    }
    let oom_killed = containers.iter().any(|c| {
        let terminated = c.state.as_ref().and_then(|s| s.terminated.as_ref());
        terminated.and_then(|t| t.reason.as_deref()) == Some("OOMKilled")
    });
    if oom_killed {
        return ending(EndCause::OutOfMemory, "OOMKilled".into());
    }
    // Being deleted (by an admin, say): what its container does meanwhile (killed: Failed) is that deletion's.
    if pod.metadata.deletion_timestamp.is_some() {
        return ending(EndCause::Cancelled, format!("deleted{on}"));
    }
    match status.phase.as_deref().unwrap_or("Pending") {
        "Pending" => {
            for container in &containers {
                let waiting = container.state.as_ref().and_then(|s| s.waiting.as_ref());
                if let Some(waiting) = waiting.filter(|w| UNSTARTABLE.contains(&w.reason.as_deref().unwrap_or(""))) {
                    let detail = format!(
                        "could not start its image {}: {}: {}",
                        container.image,
                        waiting.reason.clone().unwrap_or_default(),
                        waiting.message.clone().unwrap_or_default()
                    );
                    return ending(EndCause::Unstartable, detail);
                }
            }
            let unschedulable = status
                .conditions
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False");
            match unschedulable {
                Some(condition) => JobState::Waiting {
                    reason: condition.message.or(condition.reason).unwrap_or_else(|| "Pending".into()),
                },
                // Placed, its container starting.
                None => JobState::Running { node },
            }
        }
        "Running" => JobState::Running { node },
        "Unknown" => ending(EndCause::NodeLost, "its node stopped answering".into()),
        phase => {
            let terminated = containers.iter().find_map(|c| c.state.as_ref().and_then(|s| s.terminated.clone()));
            let how = terminated
                .map(|t| {
                    format!(": exit code {}{}", t.exit_code, t.reason.map(|r| format!(" ({r})")).unwrap_or_default())
                })
                .unwrap_or_default();
            ending(EndCause::Other, format!("{phase}{on}{how}"))
        }
    }
}

/// The state of a pod that is gone: deleted (by an admin, or with its node) unless it had ended before.
fn deleted(pod: &Pod, last: JobState) -> JobState {
    match last {
        JobState::Ended(ending) => JobState::Ended(ending),
        _ => {
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            let on = node.as_ref().map(|n| format!(" on node {n}")).unwrap_or_default();
            JobState::Ended(Ending { cause: EndCause::Cancelled, node, detail: format!("deleted{on}") })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::WorkerSpec;

    fn launcher(machine_types: BTreeMap<String, PodResources>) -> Kubernetes {
        Kubernetes::new(KubernetesConfig {
            namespace: "fal".into(),
            image: "registry.example/fal-worker:3.11".into(),
            image_pull_policy: Some("IfNotPresent".into()),
            host_network: true,
            volume: EnvironmentsVolume::HostPath("/srv/fal".into()),
            environments_dir: "/srv/fal".into(),
            machine_types,
            tag: "fal-serverless-t".into(),
            ..KubernetesConfig::default()
        })
    }

    fn pod_for(launcher: &Kubernetes, machine: &MachineType) -> Pod {
        let spec = WorkerSpec::bare("/srv/fal/envs/alice/k1/bin/python", "/srv/fal/envs/alice/k1");
        let agent = spec.agent_command(None).unwrap();
        let job = JobRequest {
            spec: &spec,
            agent: &agent,
            machine,
            callback: "10.0.0.5:7000".parse().unwrap(),
            token: "tok",
            run_as: Some(100_123),
        };
        let sized = Sized::of(machine, launcher.config.machine_types.get(&machine.name));
        launcher.pod(&job, &sized, "fal-worker-1")
    }

    #[test]
    fn a_machine_type_becomes_a_guaranteed_pod_of_its_size_running_as_the_user_without_credentials() {
        let xs = MachineType::new("XS", 0.25, 256 * 1024 * 1024, 0);
        let pod = pod_for(&launcher(BTreeMap::new()), &xs);
        let labels = pod.metadata.labels.clone().unwrap();
        assert_eq!(labels[SERVER_LABEL], "fal-serverless-t");
        assert_eq!((labels[USER_LABEL].as_str(), labels[ENVIRONMENT_LABEL].as_str()), ("alice", "k1"));
        let spec = pod.spec.unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.host_network, Some(true));
        let container = &spec.containers[0];
        let resources = container.resources.clone().unwrap();
        assert_eq!(resources.requests, resources.limits, "requests equal limits: the kubelet enforces them");
        let limits = resources.limits.unwrap();
        assert_eq!((limits["cpu"].0.as_str(), limits["memory"].0.as_str()), ("250m", "268435456"));
        assert!(!limits.contains_key(NVIDIA_GPU));
        let security = container.security_context.clone().unwrap();
        assert_eq!((security.run_as_user, security.allow_privilege_escalation), (Some(100_123), Some(false)));
        assert_eq!(security.capabilities.unwrap().drop.unwrap(), ["ALL"]);
        // The script connects back with the pod's token, then becomes the agent, keeping only its pod's variables.
        let command = container.command.clone().unwrap();
        assert_eq!(command[..2], ["/bin/bash", "-c"]);
        assert!(command[2].starts_with("exec 3<>/dev/tcp/10.0.0.5/7000 "), "{}", command[2]);
        assert!(command[2].contains("printf 'tok frames\\n' >&3"));
        assert!(command[2].contains("case $name in FAL_WORKER_POD|FAL_WORKER_NODE|NVIDIA_VISIBLE_DEVICES)"));
        // Only its own environment is mounted, read-only, where the server built it.
        let mounts = container.volume_mounts.clone().unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(
            (mounts[0].mount_path.as_str(), mounts[0].sub_path.as_deref(), mounts[0].read_only),
            ("/srv/fal/envs/alice/k1", Some("envs/alice/k1"), Some(true))
        );
        let volume = &spec.volumes.unwrap()[0];
        assert_eq!(volume.host_path.as_ref().unwrap().path, "/srv/fal");
    }

    #[test]
    fn a_gpu_type_asks_for_its_gpus_and_a_mapping_overrides_size_and_placement() {
        let gpu = MachineType::new("GPU", 8.0, 64 * 1024 * 1024 * 1024, 1);
        let limits = |pod: Pod| pod.spec.unwrap().containers[0].resources.clone().unwrap().limits.unwrap();
        assert_eq!(limits(pod_for(&launcher(BTreeMap::new()), &gpu))[NVIDIA_GPU].0, "1");
        let mapped = PodResources {
            cpu: Some("6".into()),
            memory: Some("48Gi".into()),
            gpus: Some(2),
            node_selector: BTreeMap::from([("gpu".to_string(), "a100".to_string())]),
            tolerations: vec![PodToleration {
                key: Some("nvidia.com/gpu".into()),
                operator: Some("Exists".into()),
                value: None,
                effect: Some("NoSchedule".into()),
            }],
            ..PodResources::default()
        };
        let pod = pod_for(&launcher(BTreeMap::from([("GPU".to_string(), mapped)])), &gpu);
        let spec = pod.spec.clone().unwrap();
        assert_eq!(spec.node_selector.unwrap()["gpu"], "a100");
        assert_eq!(spec.tolerations.unwrap()[0].effect.as_deref(), Some("NoSchedule"));
        let limits = limits(pod);
        assert_eq!(
            (limits["cpu"].0.as_str(), limits["memory"].0.as_str(), limits[NVIDIA_GPU].0.as_str()),
            ("6", "48Gi", "2")
        );
    }

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "fal-worker-1"},
            "spec": {"nodeName": "n1", "containers": [{"name": "worker", "image": "img:1"}]},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn pod_statuses_become_job_states() {
        let unschedulable = pod(serde_json::json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
            "status": "False", "reason": "Unschedulable", "message": "0/1 nodes are available: 1 Insufficient cpu."}]}));
        assert_eq!(
            state_of(&unschedulable),
            JobState::Waiting { reason: "0/1 nodes are available: 1 Insufficient cpu.".into() }
        );
        let pulling = pod(serde_json::json!({"phase": "Pending", "containerStatuses": [{"name": "worker",
            "image": "img:1", "imageID": "", "ready": false, "restartCount": 0, "state": {"waiting":
            {"reason": "ErrImageNeverPull", "message": "Container image \"img:1\" is not present"}}}]}));
        let JobState::Ended(ending) = state_of(&pulling) else { panic!("an image that cannot be pulled is an end") };
        assert!(ending.detail.contains("img:1") && ending.detail.contains("ErrImageNeverPull"), "{}", ending.detail);
        let oom = pod(serde_json::json!({"phase": "Failed", "containerStatuses": [{"name": "worker", "image": "img:1",
            "imageID": "", "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 137,
            "reason": "OOMKilled"}}}]}));
        assert!(matches!(state_of(&oom), JobState::Ended(Ending { cause: EndCause::OutOfMemory, .. })));
        let mut deleting = pod(serde_json::json!({"phase": "Running"}));
        assert_eq!(state_of(&deleting), JobState::Running { node: Some("n1".into()) });
        deleting.metadata = serde_json::from_value(
            serde_json::json!({"name": "fal-worker-1", "deletionTimestamp": "2026-12-04T10:00:00Z"}),
        )
        .unwrap();
        let JobState::Ended(ending) = state_of(&deleting) else { panic!("a pod being deleted is an end") };
        assert_eq!((ending.cause, ending.detail.as_str()), (EndCause::Cancelled, "deleted on node n1"));
        let evicted = pod(serde_json::json!({"phase": "Failed", "reason": "Evicted", "message": "low on memory"}));
        assert!(matches!(state_of(&evicted), JobState::Ended(Ending { cause: EndCause::Cancelled, .. })));
    }

    #[test]
    fn label_values_are_made_valid() {
        assert_eq!(label_value("alice"), "alice");
        assert_eq!(label_value("a@b.c"), "a_b.c");
        assert_eq!(label_value("-x-"), "x");
        assert_eq!(label_value(&"u".repeat(80)).len(), 63);
    }
}
