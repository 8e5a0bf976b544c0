//! The Slurm provider: a worker is a Slurm job. Its allocation is the machine type's (`--cpus-per-task`, `--mem`,
//! `--gres` for GPU types), and Slurm enforces it (`task/cgroup`). The job's script connects three TCP streams back
//! to this engine (frames, stdout, stderr), each opened with the worker's one-time token, then runs the agent as the
//! local provider would (in the jail, where the server has one). The environment is built by the engine into a cache
//! the nodes share, at the same path.
//!
//! A worker ends when the engine stops it (its keep_alive expired: the job is cancelled, releasing the allocation),
//! or when its job ends on its own; [`SlurmJob::ended`] asks Slurm why (out of memory, node failure, cancelled).
//! Jobs carry the server's tag in their comment, so a restarted engine cancels the warm jobs of its previous run
//! instead of leaking them.
//!
//! A worker's [variables](crate::WorkerVariables) (a user's secrets) are never in the job script, which Slurm keeps
//! in its state directory and shows to `scontrol write batch_script`, nor in the job's environment as submitted
//! (`scontrol show job`), nor in the environment the script execs the agent (or its jail) with: the engine sends them
//! on the frames stream once the job has connected, before any frame, and the agent reads them from it and sets them
//! itself, as on this host (see [`crate::WorkerVariables`]). They cross the network as the calls' payloads do, on the
//! streams to the callback address.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::sync::{mpsc, OnceCell};

use super::Provider;
use crate::error::CallError;
use crate::logs::{LogSink, LogSource};
use crate::machine::MachineType;
use crate::worker::{AgentCommand, BoxFuture, Placement, Worker, WorkerSpec};

/// The job name of every worker job; the comment tells one server's jobs from another's.
const JOB_NAME: &str = "fal-worker";
/// How often a queued job's state is asked for.
const POLL: Duration = Duration::from_millis(500);
/// How long Slurm may take to record why a job whose worker vanished ended.
const END_GRACE: Duration = Duration::from_secs(15);
/// TCP keepalive on worker jobs' streams: a node that vanished (powered off, cut off the network) without closing
/// them fails its call within about a minute instead of leaving it to its timeout. Idle time before the first
/// probe, time between probes, probes unanswered before the stream is closed.
const TCP_KEEPALIVE: (Duration, Duration, u32) = (Duration::from_secs(15), Duration::from_secs(5), 3);
/// How long anything sent (data, or those probes) may go unacknowledged before the stream is closed: covers data
/// in flight to a vanished node, where keepalive does not probe. Linux lets it override keepalive's count, so it
/// is keepalive's own total (15 s + 3 x 5 s).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// How a server runs workers on Slurm.
#[derive(Debug, Clone, Default)]
pub struct SlurmConfig {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// An address of this host that the nodes reach; worker jobs connect back to it (port 0: any free port).
    pub callback: Option<SocketAddr>,
    /// What to ask Slurm for, per machine type; a type not named here asks for its own CPUs (rounded up), memory
    /// and, for GPU types, `gpu:<count>`.
    pub allocations: BTreeMap<String, SlurmAllocation>,
    /// Marks this server's jobs (their comment); stable across restarts of the same server.
    pub tag: String,
    /// Where `sbatch`, `squeue`, `scontrol` and `scancel` are; `None`: `PATH`.
    pub bin_dir: Option<PathBuf>,
}

/// One machine type's allocation.
#[derive(Debug, Clone, PartialEq)]
pub struct SlurmAllocation {
    pub cpus_per_task: u32,
    pub memory_mb: u64,
    /// `--gres`, such as `gpu:a100:1`.
    pub gres: Option<String>,
}

impl SlurmAllocation {
    fn of(machine: &MachineType) -> Self {
        Self {
            cpus_per_task: machine.cpus.ceil().max(1.0) as u32,
            memory_mb: machine.memory_bytes.div_ceil(1024 * 1024),
            gres: (machine.gpus > 0).then(|| format!("gpu:{}", machine.gpus)),
        }
    }

    /// The `sbatch` options, as a user would read them in an error.
    fn options(&self) -> Vec<String> {
        let mut options = vec![format!("--cpus-per-task={}", self.cpus_per_task), format!("--mem={}M", self.memory_mb)];
        options.extend(self.gres.iter().map(|gres| format!("--gres={gres}")));
        options
    }
}

#[derive(Debug)]
pub(crate) struct SlurmProvider {
    config: SlurmConfig,
    callback: OnceCell<Arc<Callback>>,
}

/// The listener worker jobs connect back to, and who waits for which token.
#[derive(Debug)]
struct Callback {
    address: SocketAddr,
    waiting: Mutex<HashMap<String, mpsc::UnboundedSender<(Stream, TcpStream)>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Stream {
    Frames,
    Stdout,
    Stderr,
}

impl SlurmProvider {
    pub fn new(config: SlurmConfig) -> Self {
        let provider = Self { config, callback: OnceCell::new() };
        provider.cancel_jobs_of_a_previous_run();
        provider
    }

    /// Warm jobs a previous run of this server started (it was killed, say) are cancelled: nothing would ever call
    /// them again, and they hold allocations.
    fn cancel_jobs_of_a_previous_run(&self) {
        let listed = std::process::Command::new(program(self.config.bin_dir.as_ref(), "squeue"))
            .args(["--noheader", "--name", JOB_NAME, "--format", "%i|%k"])
            .stdin(Stdio::null())
            .output();
        let output = match listed {
            Ok(output) if output.status.success() => output,
            Ok(output) => {
                tracing::warn!("squeue failed: {}", String::from_utf8_lossy(&output.stderr).trim());
                return;
            }
            Err(error) => {
                tracing::warn!("cannot run squeue ({error}); is Slurm installed on this host?");
                return;
            }
        };
        let ours: Vec<String> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split_once('|'))
            .filter(|(_, comment)| *comment == self.config.tag)
            .map(|(id, _)| id.trim().to_string())
            .collect();
        if ours.is_empty() {
            return;
        }
        tracing::info!(jobs = %ours.join(","), "cancelling worker jobs of this server's previous run");
        let scancel = program(self.config.bin_dir.as_ref(), "scancel");
        let _ = std::process::Command::new(scancel).args(&ours).stdin(Stdio::null()).output();
    }

    async fn callback(&self) -> Result<Arc<Callback>, CallError> {
        let callback = self
            .callback
            .get_or_try_init(|| async {
                let asked = self.config.callback.ok_or_else(|| {
                    CallError::Spawn(
                        "the slurm provider needs `callback`: an address of this host the nodes reach".into(),
                    )
                })?;
                let listener = TcpListener::bind(asked)
                    .await
                    .map_err(|e| CallError::Spawn(format!("cannot listen for worker jobs on {asked}: {e}")))?;
                let address = listener.local_addr().map_err(|e| CallError::Spawn(e.to_string()))?;
                let callback = Arc::new(Callback { address, waiting: Mutex::default() });
                tokio::spawn(accept(listener, Arc::downgrade(&callback)));
                Ok::<_, CallError>(callback)
            })
            .await?;
        Ok(callback.clone())
    }

    fn allocation(&self, machine: &MachineType) -> SlurmAllocation {
        self.config.allocations.get(&machine.name).cloned().unwrap_or_else(|| SlurmAllocation::of(machine))
    }

    /// The batch script of a worker job: connect back, then become the agent.
    fn script(
        &self,
        spec: &WorkerSpec,
        agent: &AgentCommand,
        allocation: &SlurmAllocation,
        address: SocketAddr,
        token: &str,
    ) -> String {
        let mut script = String::from("#!/bin/bash\n");
        let mut directive = |option: String| {
            let _ = writeln!(script, "#SBATCH {option}");
        };
        directive(format!("--job-name={JOB_NAME}"));
        directive(format!("--comment={}", self.config.tag));
        directive("--output=/dev/null".into());
        directive("--nodes=1".into());
        directive("--ntasks=1".into());
        // A worker whose node failed is gone with its call; a requeued copy would have nobody to serve.
        directive("--no-requeue".into());
        for option in allocation.options() {
            directive(option);
        }
        if let Some(partition) = &self.config.partition {
            directive(format!("--partition={partition}"));
        }
        if let Some(account) = &self.config.account {
            directive(format!("--account={account}"));
        }
        if let Some(qos) = &self.config.qos {
            directive(format!("--qos={qos}"));
        }
        let (host, port) = (address.ip(), address.port());
        let _ = writeln!(
            script,
            "exec 3<>/dev/tcp/{host}/{port} 4<>/dev/tcp/{host}/{port} 5<>/dev/tcp/{host}/{port} || exit 1"
        );
        let _ = writeln!(
            script,
            "printf '{token} frames\\n' >&3; printf '{token} stdout\\n' >&4; printf '{token} stderr\\n' >&5"
        );
        let _ = writeln!(script, "exec 0</dev/null 1>&4 2>&5 4>&- 5>&-");
        // The agent starts with the engine's variables and nothing else of the job's environment: sbatch passes the
        // server's own on (its `--export=ALL` default), which the user's function must not see. Only what Slurm
        // sets for the job goes through: SLURM_* (the job's id, its nodes) and which GPUs it was given.
        let _ = writeln!(
            script,
            "slurm=(); for name in $(compgen -e); do case $name in SLURM_*|{}) slurm+=(\"$name=${{!name}}\");; esac; \
             done",
            SLURM_GPU_VARIABLES.join("|")
        );
        let mut exec = format!("exec env -i \"${{slurm[@]}}\" LANG=C.UTF-8 PATH={}", quote(&spec.clean_path()));
        for (name, value) in &agent.env {
            let _ = write!(exec, " {name}={}", quote(value));
        }
        let _ = write!(exec, " {}", quote(&agent.program.display().to_string()));
        for arg in &agent.args {
            exec.push(' ');
            exec.push_str(&quote(arg));
        }
        script.push_str(&exec);
        script.push('\n');
        script
    }

    async fn submit(&self, script: &str) -> Result<String, String> {
        let mut sbatch = command(self.config.bin_dir.as_ref(), "sbatch");
        sbatch.arg("--parsable").stdin(Stdio::piped());
        let mut child = sbatch.spawn().map_err(|e| format!("cannot run sbatch: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).await.map_err(|e| format!("sbatch: {e}"))?;
        }
        let output = child.wait_with_output().await.map_err(|e| format!("sbatch: {e}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
        }
        // `--parsable` prints `<id>` or `<id>;<cluster>`.
        let id = String::from_utf8_lossy(&output.stdout).trim().split(';').next().unwrap_or("").to_string();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
            return Err(format!("sbatch printed no job id: {:?}", String::from_utf8_lossy(&output.stdout)));
        }
        Ok(id)
    }
}

impl Provider for SlurmProvider {
    fn start<'a>(
        &'a self,
        mut spec: WorkerSpec,
        machine: &'a MachineType,
        wait: Option<Duration>,
        logs: &'a LogSink,
    ) -> BoxFuture<'a, Result<Worker, CallError>> {
        // Persistent storage is a directory of the server's host, which a cluster's nodes do not have.
        spec.data_dir = None;
        Box::pin(async move {
            let callback = self.callback().await?;
            let token = token();
            let (sender, mut connections) = mpsc::unbounded_channel();
            let _registered = Registration::new(&callback, &token, sender);
            let allocation = self.allocation(machine);
            let mut spec = spec;
            if let Some(jail) = spec.jail.as_mut() {
                // The job's agent needs the node's network to connect back; the cluster's network policy applies.
                jail.network = fal_sandbox::JailNetwork::Host;
            }
            // No seccomp filter: the job's script could hand bubblewrap no descriptor of ours. What it takes away
            // matters for `/data`'s quota, and a job has no `/data`.
            let agent = spec.agent_command(None)?;
            let script = self.script(&spec, &agent, &allocation, callback.address, &token);
            let id = self.submit(&script).await.map_err(|reason| CallError::Allocation {
                machine_type: machine.name.clone(),
                options: allocation.options().join(" "),
                reason,
            })?;
            // Until the worker is connected, the job is this call's to cancel (if the caller goes away, say).
            let mut job = SlurmJob { id, bin_dir: self.config.bin_dir.clone(), node: None, stopped: false };
            let mut streams: HashMap<Stream, TcpStream> = HashMap::new();
            let mut shown = String::new();
            let deadline = wait.map(|wait| tokio::time::Instant::now() + wait);
            while streams.len() < 3 {
                tokio::select! {
                    connection = connections.recv() => {
                        if let Some((kind, stream)) = connection {
                            streams.insert(kind, stream);
                        }
                    }
                    () = tokio::time::sleep(POLL) => {
                        let (state, reason, node) = job.queue_state().await;
                        if state.is_empty() || is_terminal(&state) {
                            let why = job.final_state().await.unwrap_or(state);
                            return Err(CallError::WorkerDied {
                                how: format!(
                                    "ended before it connected: its Slurm job {} is {why}. If it failed, check that \
                                     the nodes reach this server's callback address {}",
                                    job.id, callback.address
                                ),
                            });
                        }
                        job.node = node.or(job.node.take());
                        let now = with_reason(&state, &reason);
                        if state == "PENDING" && now != shown {
                            logs.send(LogSource::Engine, format!("waiting for a Slurm allocation: {now}"));
                            shown = now;
                        }
                        if deadline.is_some_and(|deadline| tokio::time::Instant::now() > deadline) {
                            return Err(CallError::Timeout { seconds: wait.unwrap_or_default().as_secs_f64() });
                        }
                    }
                }
            }
            let (Some(frames), Some(stdout), Some(stderr)) =
                (streams.remove(&Stream::Frames), streams.remove(&Stream::Stdout), streams.remove(&Stream::Stderr))
            else {
                return Err(CallError::Spawn("a worker job connected the same stream twice".into()));
            };
            let _ = frames.set_nodelay(true);
            let mut frames = frames;
            frames
                .write_all(&agent.variables_message(&spec.variables))
                .await
                .map_err(|e| CallError::Spawn(format!("worker job {}: sending its variables: {e}", job.id)))?;
            let fd = |stream: TcpStream| stream.into_std().map(OwnedFd::from);
            let job_id = job.id.clone();
            let spawn_error = |e: std::io::Error| CallError::Spawn(format!("worker job {job_id}: {e}"));
            let (stdout, stderr) = (fd(stdout).map_err(spawn_error)?, fd(stderr).map_err(spawn_error)?);
            tracing::debug!(job = %job.id, node = ?job.node, machine_type = %machine.name, "worker job connected");
            let placement = Box::new(std::mem::replace(&mut job, SlurmJob::defused()));
            Worker::connected(placement, Box::new(frames), stdout, stderr, spec.max_payload).map_err(spawn_error)
        })
    }

    fn gpus(&self) -> Option<u32> {
        None
    }
}

/// A worker's job, from submission on. Dropped before it is stopped (its call was abandoned while it queued), it is
/// cancelled.
#[derive(Debug)]
pub(crate) struct SlurmJob {
    id: String,
    bin_dir: Option<PathBuf>,
    node: Option<String>,
    stopped: bool,
}

impl SlurmJob {
    fn defused() -> Self {
        Self { id: String::new(), bin_dir: None, node: None, stopped: true }
    }

    fn command(&self, name: &str) -> Command {
        command(self.bin_dir.as_ref(), name)
    }

    /// State, reason and node as `squeue` shows them; an empty state once the job has left the queue.
    async fn queue_state(&self) -> (String, String, Option<String>) {
        let output =
            self.command("squeue").args(["--noheader", "--jobs", &self.id, "--format", "%T|%r|%N"]).output().await;
        let text = output.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
        let mut fields = text.splitn(3, '|');
        let state = fields.next().unwrap_or("").to_string();
        let reason = fields.next().unwrap_or("").to_string();
        let node = fields.next().map(str::to_string).filter(|n| !n.is_empty());
        (state, reason, node)
    }

    /// `JobState` as `scontrol` records it, kept a while after the job ended.
    async fn final_state(&self) -> Option<String> {
        let output = self.command("scontrol").args(["--oneliner", "show", "job", &self.id]).output().await.ok()?;
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        let field = |name: &str| text.split_whitespace().find_map(|kv| kv.strip_prefix(name)).map(str::to_string);
        Some(with_reason(&field("JobState=")?, &field("Reason=").unwrap_or_default()))
    }

    fn cancel_now(&self) {
        if self.id.is_empty() {
            return;
        }
        // Not awaited: this runs from Drop, and scancel only asks slurmctld.
        let _ = std::process::Command::new(program(self.bin_dir.as_ref(), "scancel"))
            .arg(&self.id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

impl Drop for SlurmJob {
    fn drop(&mut self) {
        if !self.stopped {
            self.cancel_now();
        }
    }
}

impl Placement for SlurmJob {
    fn id(&self) -> u32 {
        self.id.parse().unwrap_or(0)
    }

    fn has_ended(&mut self) -> bool {
        // Known only by asking Slurm, too slow for every call; a job that ended while idle closed its connection,
        // which the worker itself sees.
        false
    }

    fn ended<'a>(&'a mut self, machine_type: &'a str, memory: &'a str) -> BoxFuture<'a, CallError> {
        Box::pin(async move {
            if self.node.is_none() {
                self.node = self.queue_state().await.2;
            }
            let deadline = tokio::time::Instant::now() + END_GRACE;
            let mut state = None;
            while tokio::time::Instant::now() < deadline {
                let (queued, _, _) = self.queue_state().await;
                if queued.is_empty() || is_terminal(&queued) {
                    state = self.final_state().await;
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
            let node = self.node.clone().map(|n| format!("node {n}")).unwrap_or_else(|| "its node".into());
            let Some(state) = state else {
                // The worker's connection is gone but Slurm still runs the job: its node is unreachable, say.
                self.cancel_now();
                self.stopped = true;
                return CallError::WorkerDied {
                    how: format!(
                        "lost its connection to the server, on {node} (Slurm job {}, now cancelled); the node may be \
                         down",
                        self.id
                    ),
                };
            };
            self.stopped = true;
            if state.starts_with("OUT_OF_MEMORY") {
                return CallError::OutOfMemory {
                    machine_type: machine_type.to_string(),
                    memory: memory.to_string(),
                    child: false,
                };
            }
            let how = if state.starts_with("NODE_FAIL") {
                format!("was lost with {node} (Slurm job {}: {state})", self.id)
            } else if state.starts_with("CANCELLED") {
                format!("was cancelled in Slurm (job {}: {state})", self.id)
            } else {
                format!("ended (Slurm job {}: {state})", self.id)
            };
            CallError::WorkerDied { how }
        })
    }

    fn stop(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.stopped {
                return;
            }
            self.stopped = true;
            let _ = self.command("scancel").arg(&self.id).output().await;
        })
    }
}

/// A job's state as Slurm words it, with the reason Slurm gives where it gives one: `PENDING (Resources)`.
fn with_reason(state: &str, reason: &str) -> String {
    match reason {
        "" | "None" => state.to_string(),
        reason => format!("{state} ({reason})"),
    }
}

/// A Slurm command: from `bin_dir`, or `PATH`.
fn program(bin_dir: Option<&PathBuf>, name: &str) -> PathBuf {
    bin_dir.map(|dir| dir.join(name)).unwrap_or_else(|| name.into())
}

fn command(bin_dir: Option<&PathBuf>, name: &str) -> Command {
    let mut command = Command::new(program(bin_dir, name));
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    command
}

fn is_terminal(state: &str) -> bool {
    !matches!(state, "PENDING" | "CONFIGURING" | "RUNNING" | "COMPLETING" | "SUSPENDED" | "RESIZING" | "REQUEUED")
}

/// Removes a token's waiter when its start is over, however it ended.
struct Registration<'a> {
    callback: &'a Callback,
    token: String,
}

impl<'a> Registration<'a> {
    fn new(callback: &'a Callback, token: &str, sender: mpsc::UnboundedSender<(Stream, TcpStream)>) -> Self {
        callback.waiting.lock().unwrap_or_else(|e| e.into_inner()).insert(token.to_string(), sender);
        Self { callback, token: token.to_string() }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.callback.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.token);
    }
}

/// Accepts worker jobs' connections: each names its token and stream on its first line.
async fn accept(listener: TcpListener, callback: std::sync::Weak<Callback>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        if callback.strong_count() == 0 {
            return;
        }
        set_tcp_keepalive(&stream);
        let callback = callback.clone();
        tokio::spawn(async move {
            let greeted = tokio::time::timeout(Duration::from_secs(10), greeting(&mut stream)).await;
            let Ok(Ok(Some((token, kind)))) = greeted else { return };
            let Some(callback) = callback.upgrade() else { return };
            let waiting = callback.waiting.lock().unwrap_or_else(|e| e.into_inner()).get(&token).cloned();
            if let Some(sender) = waiting {
                let _ = sender.send((kind, stream));
            }
        });
    }
}

/// Sets TCP keepalive and a user timeout on a worker job's stream (the job's end, bash's `/dev/tcp`, cannot; its
/// agent sets keepalive on the frames stream itself).
fn set_tcp_keepalive(stream: &TcpStream) {
    let (idle, interval, retries) = TCP_KEEPALIVE;
    let keepalive = socket2::TcpKeepalive::new().with_time(idle).with_interval(interval).with_retries(retries);
    let socket = socket2::SockRef::from(stream);
    if let Err(error) =
        socket.set_tcp_keepalive(&keepalive).and_then(|()| socket.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT)))
    {
        tracing::debug!(%error, "cannot set TCP keepalive on a worker job's stream");
    }
}

/// Reads `<token> <stream>\n` byte by byte, so nothing after it is consumed.
async fn greeting(stream: &mut TcpStream) -> std::io::Result<Option<(String, Stream)>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 128 {
        if stream.read(&mut byte).await? == 0 {
            return Ok(None);
        }
        if byte[0] == b'\n' {
            let text = String::from_utf8_lossy(&line).to_string();
            let Some((token, kind)) = text.split_once(' ') else { return Ok(None) };
            let kind = match kind {
                "frames" => Stream::Frames,
                "stdout" => Stream::Stdout,
                "stderr" => Stream::Stderr,
                _ => return Ok(None),
            };
            return Ok(Some((token.to_string(), kind)));
        }
        line.push(byte[0]);
    }
    Ok(None)
}

/// What Slurm sets in a job given GPUs (`--gres`), passed on to its agent with `SLURM_*` (see
/// [`SlurmProvider::script`]).
const SLURM_GPU_VARIABLES: [&str; 3] = ["CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "ROCR_VISIBLE_DEVICES"];

/// A one-time secret a worker job proves itself with.
fn token() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// `value` quoted for bash.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn worker_job_streams_get_tcp_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        let (_client, (stream, _)) = (client.unwrap(), accepted.unwrap());
        let socket = socket2::SockRef::from(&stream);
        assert!(!socket.keepalive().unwrap());
        set_tcp_keepalive(&stream);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), TCP_KEEPALIVE.0);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), TCP_KEEPALIVE.2);
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(TCP_USER_TIMEOUT));
    }

    #[test]
    fn machine_types_map_to_allocations() {
        let m = MachineType::new("M", 2.0, 8 * 1024 * 1024 * 1024, 0);
        assert_eq!(SlurmAllocation::of(&m).options(), ["--cpus-per-task=2", "--mem=8192M"]);
        let xs = MachineType::new("XS", 0.25, 256 * 1024 * 1024, 0);
        assert_eq!(SlurmAllocation::of(&xs).options(), ["--cpus-per-task=1", "--mem=256M"]);
        let gpu = MachineType::new("GPU", 8.0, 64 * 1024 * 1024 * 1024, 1);
        assert_eq!(SlurmAllocation::of(&gpu).options()[2], "--gres=gpu:1");
    }

    #[test]
    fn the_job_script_asks_for_the_allocation_then_becomes_the_agent() {
        let config =
            SlurmConfig { partition: Some("debug".into()), tag: "fal-serverless-t".into(), ..Default::default() };
        let provider = SlurmProvider { config, callback: OnceCell::new() };
        let spec = WorkerSpec {
            python: "/data/envs/u/k/bin/python".into(),
            env_root: "/data/envs/u/k".into(),
            dill_layer: None,
            cgroup: None,
            jail: None,
            visible_gpus: None,
            gpus: None,
            max_payload: 1024,
            data_dir: None,
            link: None,
            granted: None,
            variables: crate::WorkerVariables::new(),
        };
        let allocation = SlurmAllocation { cpus_per_task: 2, memory_mb: 2048, gres: None };
        let agent = spec.agent_command(None).unwrap();
        let script = provider.script(&spec, &agent, &allocation, "10.0.0.5:7000".parse().unwrap(), "abc");
        for line in [
            "#SBATCH --comment=fal-serverless-t",
            "#SBATCH --no-requeue",
            "#SBATCH --cpus-per-task=2",
            "#SBATCH --mem=2048M",
            "#SBATCH --partition=debug",
            "exec 3<>/dev/tcp/10.0.0.5/7000 4<>/dev/tcp/10.0.0.5/7000 5<>/dev/tcp/10.0.0.5/7000 || exit 1",
            "printf 'abc frames\\n' >&3; printf 'abc stdout\\n' >&4; printf 'abc stderr\\n' >&5",
        ] {
            assert!(script.lines().any(|l| l == line), "{line:?} missing from:\n{script}");
        }
        // The agent gets the engine's variables alone (and the GPUs Slurm gave), none of the job's environment.
        let exec = script.split_once("\nexec env -i ").map(|(_, exec)| exec).unwrap();
        let kept = "case $name in SLURM_*|CUDA_VISIBLE_DEVICES|GPU_DEVICE_ORDINAL|ROCR_VISIBLE_DEVICES) slurm+=";
        assert!(script.lines().any(|l| l.starts_with("slurm=(); for name in $(compgen -e)") && l.contains(kept)));
        let start = r#""${slurm[@]}" LANG=C.UTF-8 PATH='/data/envs/u/k/bin:/usr/local/bin:/usr/bin:/bin' "#;
        assert!(exec.starts_with(start), "{exec}");
        assert!(exec.contains(" VIRTUAL_ENV='/data/envs/u/k' "), "{exec}");
        assert!(!script.contains("export "), "nothing is exported into the job's own environment");
        // The agent's source travels quoted, whole, as the last argument.
        let exec = exec.split_once(" '/data/envs/u/k/bin/python' ").map(|(_, exec)| exec).unwrap();
        assert!(exec.starts_with("'-I' '-u' '-c' '"), "{exec}");
        assert!(exec.contains("def serve():") && exec.ends_with("serve()\n'\n"));
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
