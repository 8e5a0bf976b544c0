//! One worker process: spawning it inside its environment and limits, calling it, and reading how it died.

use std::future::Future;
use std::io::Write as _;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fal_sandbox::{GpuGrant, Grants, Jail, JailNetwork, Namespace, ProcessSetup, WorkerCgroup};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use zeroize::Zeroizing;

use super::frame::{write_frame, FrameError, FrameReader, CALL, FUNCTION, RAISED, RETURNED, SETUP, YIELDED};
use super::link::{LinkGrant, WorkerLink};
use super::output::{pipe, OutputPipe};
use crate::environment::EnvUse;
use crate::error::CallError;
use crate::logs::{LogSink, LogSource};
use crate::provider::gpus::GpuLease;
use crate::room::Hold;
use crate::variables::WorkerVariables;

const AGENT: &str = include_str!("agent.py");
/// What the engine sets (or, `PYTHONHOME`, removes) in every worker's environment besides [`AgentCommand::env`].
const ENGINE_VARIABLES: [&str; 3] = ["PATH", "LANG", "PYTHONHOME"];
/// Names the directory the agent appends to `sys.path` ([`LinkGrant::python_path`]).
const AGENT_PATH_VARIABLE: &str = "FAL_AGENT_PYTHON_PATH";
/// How long a worker whose socket closed may take to exit before it is killed, so its exit status can be read.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// How often a busy worker's cgroup is asked whether the kernel killed one of its processes for memory.
const OOM_POLL: Duration = Duration::from_millis(250);
/// After an OOM kill: how long the agent's connection may take to close, when it was the agent that was killed.
const OOM_SETTLE: Duration = Duration::from_millis(500);

/// How to start a worker.
#[derive(Debug)]
pub(crate) struct WorkerSpec {
    pub python: PathBuf,
    pub env_root: PathBuf,
    /// For workers of dill calls: the dill layer's `site-packages`, which the agent adds after the environment's own.
    pub dill_layer: Option<PathBuf>,
    pub cgroup: Option<WorkerCgroup>,
    /// The jail to run in; `None` runs as the caller, unjailed.
    pub jail: Option<WorkerJail>,
    /// `CUDA_VISIBLE_DEVICES`: the GPUs this worker may use; empty for none. `None` leaves it as it is (a cluster's
    /// scheduler sets it).
    pub visible_gpus: Option<String>,
    /// The GPUs this worker holds (the local provider's): given back once its processes are gone.
    pub gpus: Option<GpuLease>,
    pub max_payload: usize,
    /// A host directory kept across workers (its user's persistent storage): bound read-write at [`DATA_MOUNT`] in a
    /// jailed worker; an unjailed one (the local host) uses it where it is. Either way `FAL_DATA_DIR` names it.
    pub data_dir: Option<PathBuf>,
    /// The call's link, which the provider asks for [`WorkerSpec::granted`] once it knows the worker's network.
    pub link: Option<Arc<dyn WorkerLink>>,
    /// What the link gave this worker: shown to it at start, and kept until it has ended.
    pub granted: Option<LinkGrant>,
    /// The caller's variables: set by the agent in its environment before it runs anything else, sent on its socket
    /// ([`AgentCommand::variables_message`]), never in the environment it is exec'd with, which the root-run jailer
    /// shares. The engine's own win over one of the same name.
    pub variables: WorkerVariables,
}

/// Where a jailed worker sees [`WorkerSpec::data_dir`], as the original's workers see their user's storage.
pub(crate) const DATA_MOUNT: &str = "/data";

/// What a jailed worker runs as and sees, beyond its environment.
#[derive(Debug)]
pub(crate) struct WorkerJail {
    pub jail: Jail,
    /// The installation of the interpreter the environment was built with, from the server's record of the build.
    pub base_prefix: PathBuf,
    /// Its user's own uid (and gid).
    pub uid: u32,
    pub hostname: String,
    pub network: JailNetwork,
    /// The network namespace the provider made for it (`network` is then [`JailNetwork::Joined`]); the worker
    /// holds it until it ends.
    pub namespace: Option<Namespace>,
    pub resolv_conf: Option<PathBuf>,
    /// What its GPUs grant it (their device nodes and the driver's entries), for a worker of a GPU machine type.
    pub gpus: Option<GpuGrant>,
}

/// The command line that runs the agent for a [`WorkerSpec`], and the variables it needs (beyond `PATH` and `LANG`).
pub(crate) struct AgentCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The names of the variables the jail sets itself (`HOME`, the GPU driver's `LD_LIBRARY_PATH`).
    jail_env: Vec<String>,
}

impl AgentCommand {
    /// Whether the engine, or the jail, sets `name` in the worker's environment itself.
    fn sets(&self, name: &str) -> bool {
        ENGINE_VARIABLES.contains(&name)
            || self.env.iter().any(|(own, _)| own == name)
            || self.jail_env.iter().any(|own| own == name)
    }

    /// What the engine writes on the agent's socket before the first frame: the caller's `variables` but those the
    /// engine or the jail set, which win as they did when both were in one environment (see [`WorkerVariables`]).
    pub fn variables_message(&self, variables: &WorkerVariables) -> Zeroizing<Vec<u8>> {
        variables.message(|name| self.sets(name))
    }
}

/// The variables bubblewrap sets in the jail: each `--setenv NAME VALUE` among its own options (before `--`).
fn jail_variables(args: &[String]) -> Vec<String> {
    let options: Vec<&String> = args.iter().take_while(|arg| *arg != "--").collect();
    options.windows(2).filter(|pair| pair[0] == "--setenv").map(|pair| pair[1].clone()).collect()
}

impl WorkerSpec {
    /// A worker of `python` in the environment at `env_root`, with nothing else (tests' workers).
    #[cfg(test)]
    pub fn bare(python: impl Into<PathBuf>, env_root: impl Into<PathBuf>) -> Self {
        Self {
            python: python.into(),
            env_root: env_root.into(),
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
        }
    }

    /// `PATH` for a worker that inherits nothing: the environment's scripts, then the system's.
    pub fn clean_path(&self) -> String {
        format!("{}:/usr/local/bin:/usr/bin:/bin", self.env_root.join("bin").display())
    }

    /// `seccomp`: the descriptor a jailed worker inherits its system call filter on (see [`Grants::seccomp`]).
    pub fn agent_command(&self, seccomp: Option<RawFd>) -> Result<AgentCommand, CallError> {
        // The agent's arguments (after `-c`) name the serializer: none for cloudpickle, `dill <layer>` for dill.
        let mut agent_args = vec!["-I", "-u", "-c", AGENT];
        let layer = self
            .dill_layer
            .as_deref()
            .map(|path| {
                path.to_str().ok_or_else(|| {
                    CallError::Spawn(format!(
                        "the dill layer's path {} is not UTF-8; use a plain data dir",
                        path.display()
                    ))
                })
            })
            .transpose()?;
        if let Some(layer) = layer {
            agent_args.extend(["dill", layer]);
        }
        let granted = self.granted.as_ref();
        let (program, args): (PathBuf, Vec<String>) = match &self.jail {
            Some(jailed) => {
                let mut read_only = vec![jailed.base_prefix.as_path(), self.env_root.as_path()];
                read_only.extend(layer.map(std::path::Path::new));
                let data = self.data_dir.as_deref().map(|dir| (dir, std::path::Path::new(DATA_MOUNT)));
                let binds: Vec<_> = data.into_iter().collect();
                read_only.extend(granted.iter().flat_map(|g| g.read_only.iter().map(PathBuf::as_path)));
                let grants = Grants {
                    read_only: &read_only,
                    writable: &[],
                    binds: &binds,
                    uid: jailed.uid,
                    gid: jailed.uid,
                    hostname: &jailed.hostname,
                    network: jailed.network,
                    resolv_conf: jailed.resolv_conf.as_deref(),
                    hosts: granted.and_then(|g| g.hosts_file.as_deref()),
                    gpus: jailed.gpus.as_ref(),
                    seccomp,
                };
                jailed.jail.wrap(&grants, &self.python, &agent_args)
            }
            None => (self.python.clone(), agent_args.iter().map(|a| a.to_string()).collect()),
        };
        let mut env = vec![("VIRTUAL_ENV".to_string(), self.env_root.display().to_string())];
        if let Some(dir) = &self.data_dir {
            let seen = if self.jail.is_some() { DATA_MOUNT.to_string() } else { dir.display().to_string() };
            env.push(("FAL_DATA_DIR".to_string(), seen));
        }
        if let Some(gpus) = &self.visible_gpus {
            env.push(("CUDA_VISIBLE_DEVICES".to_string(), gpus.clone()));
            if !gpus.is_empty() {
                // Indices in CUDA_VISIBLE_DEVICES count in bus order, as the provider numbered them (see gpus.rs).
                env.push(("CUDA_DEVICE_ORDER".to_string(), "PCI_BUS_ID".to_string()));
            }
        }
        if let Some(granted) = granted {
            env.extend(granted.env.iter().cloned());
            if let Some(path) = &granted.python_path {
                // The agent appends it to `sys.path` (it runs with `-I`, which ignores PYTHONPATH) and removes the
                // variable, so the function's own subprocesses do not inherit it.
                env.push((AGENT_PATH_VARIABLE.to_string(), path.display().to_string()));
            }
        }
        let jail_env = if self.jail.is_some() { jail_variables(&args) } else { Vec::new() };
        Ok(AgentCommand { program, args, env, jail_env })
    }
}

/// Why a call got no reply.
#[derive(Debug)]
pub(crate) enum NoReply {
    /// The worker is gone (or broke the protocol); [`Worker::failure`] says how.
    Gone,
    /// The reply is over the payload limit; the worker is in the middle of sending it and must be stopped.
    TooLarge { size: usize, limit: usize },
    /// The kernel killed a process the function started (not the agent) for exceeding the machine type's memory.
    /// The worker must be stopped: what the function waits for may never come (a pool's lost task), and the state it
    /// keeps for the next call is missing a part.
    ChildOutOfMemory,
}

/// What the function did: returned (`raised == false`) or raised; the payload is the worker's pickle of it.
#[derive(Debug)]
pub(crate) struct Reply {
    pub raised: bool,
    pub payload: Vec<u8>,
}

/// What the engine sends a worker for one call (see `frame.rs`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outgoing<'a> {
    pub payload: &'a [u8],
    /// The call's setup function, run once per worker for the same bytes.
    pub setup: Option<&'a [u8]>,
    /// The function pickled alone, `payload` being only its arguments.
    pub function: Option<&'a [u8]>,
}

impl<'a> Outgoing<'a> {
    /// A call of `payload` alone.
    #[cfg(test)]
    pub fn payload(payload: &'a [u8]) -> Self {
        Self { payload, setup: None, function: None }
    }
}

/// A socket to a worker's agent: a socket pair on this host, a TCP connection from a cluster's node.
pub(crate) trait Duplex: AsyncRead + AsyncWrite + AsRawFd + Send + Unpin + std::fmt::Debug {}
impl<T: AsyncRead + AsyncWrite + AsRawFd + Send + Unpin + std::fmt::Debug> Duplex for T {}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a worker runs, as its provider holds it: a process of this host with its cgroup, or a cluster's job.
pub(crate) trait Placement: Send + std::fmt::Debug {
    /// What worker listings show: a pid, a job id.
    fn id(&self) -> u32;
    /// Whether it has ended (while idle, say): such a worker is never handed a call.
    fn has_ended(&mut self) -> bool;
    /// After the worker's socket closed: waits (briefly) for it to end, and says why it did.
    fn ended<'a>(&'a mut self, machine_type: &'a str, memory: &'a str) -> BoxFuture<'a, CallError>;
    /// Ends it, with every process it started, and waits until it has.
    fn stop(&mut self) -> BoxFuture<'_, ()>;
    /// Whether the kernel killed one of its processes for exceeding its memory (where the provider can tell).
    fn memory_exceeded(&self) -> bool {
        false
    }
    /// Its hostname, if it has one of its own.
    fn hostname(&self) -> Option<&str> {
        None
    }
    /// Its address in a network namespace of its own, if it has one.
    fn address(&self) -> Option<std::net::IpAddr> {
        None
    }
}

#[derive(Debug)]
pub(crate) struct Worker {
    placement: Box<dyn Placement>,
    frames: Box<dyn Duplex>,
    reader: FrameReader,
    stdout: OutputPipe,
    stderr: OutputPipe,
    /// What it holds while it lives (its share of the server's capacity): given back once it has stopped.
    hold: Option<Hold>,
    /// Its environment's use lock, held while the worker lives: no eviction removes the environment under it.
    environment: Option<EnvUse>,
    /// What its call's link gave it to keep while it lives (a key that is valid only that long).
    link: Option<Box<dyn std::any::Any + Send + Sync>>,
    /// What of its variables' message the socket had no room for at spawn: written before the first call's frame.
    unsent: Zeroizing<Vec<u8>>,
}

/// A worker process of this host: the leader of a process group of its own (`setsid` in [`ProcessSetup`]), which
/// everything it starts belongs to unless it leaves it (a daemon's `setsid`); the cgroup, where there is one, holds
/// even those.
#[derive(Debug)]
struct LocalProcess {
    child: Child,
    pid: u32,
    /// Whether `child` has been waited for. Until then it is at least a zombie, so neither its pid nor its process
    /// group's id can belong to another process, and the group may be signalled.
    reaped: bool,
    cgroup: Option<WorkerCgroup>,
    /// Its network namespace, removed (with its veth) once the worker has ended.
    namespace: Option<Namespace>,
    /// Its GPUs, given back once the worker has ended.
    gpus: Option<GpuLease>,
    hostname: Option<String>,
    /// Jailed workers run under bubblewrap, which reports a signal as exit code 128 + signal.
    jailed: bool,
}

impl Worker {
    /// A worker whose agent is connected: frames on `frames`, its stdout and stderr readable on the two descriptors.
    pub fn connected(
        placement: Box<dyn Placement>,
        frames: Box<dyn Duplex>,
        stdout: OwnedFd,
        stderr: OwnedFd,
        max_payload: usize,
    ) -> std::io::Result<Self> {
        Ok(Self {
            placement,
            frames,
            reader: FrameReader::new(max_payload),
            stdout: OutputPipe::new(stdout, LogSource::Stdout)?,
            stderr: OutputPipe::new(stderr, LogSource::Stderr)?,
            hold: None,
            environment: None,
            link: None,
            unsent: Zeroizing::default(),
        })
    }

    /// Gives the worker what it must hold while it lives.
    pub fn holding(mut self, hold: Option<Hold>) -> Self {
        self.hold = hold;
        self
    }

    /// Keeps what its link gave it until the worker is gone.
    pub fn keep_link(&mut self, keep: Option<Box<dyn std::any::Any + Send + Sync>>) {
        self.link = keep;
    }

    /// Holds `environment` (its environment's use lock) until the worker is gone.
    pub fn hold(&mut self, environment: EnvUse) {
        self.environment = Some(environment);
    }

    /// Starts a worker process on this host.
    pub fn spawn(mut spec: WorkerSpec) -> Result<Self, CallError> {
        let spawn_error = |what: &str, e: std::io::Error| CallError::Spawn(format!("{what}: {e}"));
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| spawn_error("socketpair", e))?;
        let (stdout_read, stdout_write) = pipe().map_err(|e| spawn_error("pipe", e))?;
        let (stderr_read, stderr_write) = pipe().map_err(|e| spawn_error("pipe", e))?;

        // A jail's own system call filter: it takes away the ioctls that make btrfs subvolumes (which would escape
        // the user's storage quota at /data).
        let seccomp = spec
            .jail
            .is_some()
            .then(fal_sandbox::seccomp_filter_fd)
            .transpose()
            .map_err(|e| CallError::Spawn(e.to_string()))?;
        let agent = spec.agent_command(seccomp.as_ref().map(AsRawFd::as_raw_fd))?;
        let message = agent.variables_message(&spec.variables);
        let keep = spec.granted.as_mut().and_then(|granted| granted.keep.take());
        let mut command = Command::new(&agent.program);
        command.args(&agent.args);
        if spec.jail.is_some() {
            // A jailed worker inherits nothing of the server's environment (its secrets included).
            command.env_clear();
        }
        // The caller's variables are not set here: they go on the socket (see `WorkerSpec::variables`).
        if spec.jail.is_some() {
            command.env("LANG", "C.UTF-8").env("PATH", spec.clean_path());
        } else {
            // Unjailed (the local host), the user's own tools stay reachable after the environment's.
            let mut path = spec.env_root.join("bin").into_os_string();
            if let Some(inherited) = std::env::var_os("PATH") {
                path.push(":");
                path.push(inherited);
            }
            command.env("PATH", path);
        }
        command
            .envs(agent.env)
            .env_remove("PYTHONHOME")
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout_write))
            .stderr(Stdio::from(stderr_write))
            .kill_on_drop(true);
        let namespace = spec.jail.as_mut().and_then(|j| j.namespace.take());
        let netns = match namespace.as_ref().and_then(Namespace::path) {
            Some(path) => Some(std::fs::File::open(path).map_err(|e| spawn_error(&path.display().to_string(), e))?),
            None => None,
        };
        let setup = ProcessSetup::new(Some(theirs.as_raw_fd()), spec.cgroup.as_ref())
            .in_network(netns.as_ref().map(|f| f.as_raw_fd()))
            .inheriting(seccomp.as_ref().map(AsRawFd::as_raw_fd));
        // SAFETY: `apply` only makes async-signal-safe system calls on descriptors that outlive the spawn.
        unsafe {
            command.pre_exec(move || setup.apply());
        }
        let program = command.as_std().get_program().to_string_lossy().into_owned();
        let child = command.spawn().map_err(|e| spawn_error(&program, e))?;
        drop((theirs, netns, seccomp));
        // `command` holds the write ends of the pipes; they must close here, or we never see end of stream.
        drop(command);
        let pid = child.id().unwrap_or(0);
        ours.set_nonblocking(true).map_err(|e| spawn_error("socket", e))?;
        let unsent = write_now(&ours, &message);
        drop(message);
        let frames = UnixStream::from_std(ours).map_err(|e| spawn_error("socket", e))?;
        let hostname = spec.jail.as_ref().map(|j| j.hostname.clone());
        let process = LocalProcess {
            child,
            pid,
            reaped: false,
            cgroup: spec.cgroup,
            namespace,
            gpus: spec.gpus,
            hostname,
            jailed: spec.jail.is_some(),
        };
        let mut worker =
            Self::connected(Box::new(process), Box::new(frames), stdout_read, stderr_read, spec.max_payload)
                .map_err(|e| spawn_error("pipe", e))?;
        worker.keep_link(keep);
        worker.unsent = unsent;
        Ok(worker)
    }

    pub fn pid(&self) -> u32 {
        self.placement.id()
    }

    pub fn hostname(&self) -> Option<&str> {
        self.placement.hostname()
    }

    pub fn address(&self) -> Option<std::net::IpAddr> {
        self.placement.address()
    }

    /// Whether the worker has ended (while idle, say), or lost a process to the OOM killer (a child the last call
    /// left running): such a worker is never handed a call.
    pub fn has_exited(&mut self) -> bool {
        self.placement.has_ended() || self.connection_closed() || self.placement.memory_exceeded()
    }

    /// Whether the agent's end of the frame stream is gone, asked of the kernel without waiting. The placement may
    /// not know yet (a cluster's job is known only by asking the cluster), but a closed connection means the agent
    /// is gone. An idle agent sends nothing, so anything readable (end of stream, an error, a stray byte) rules the
    /// worker out; peeking consumes nothing.
    fn connection_closed(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: `recv` writes at most one byte into `byte`, which outlives the call; the descriptor is ours and open.
        let read = unsafe {
            libc::recv(self.frames.as_raw_fd(), (&raw mut byte).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        };
        let would_block = read < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock;
        !would_block
    }

    /// Sends one call and waits for its reply, forwarding the worker's output to `logs` and what it yields to
    /// `items` meanwhile (dropped where there is no `items`: a generator's caller that asked for none).
    pub async fn call(
        &mut self,
        call: Outgoing<'_>,
        logs: &LogSink,
        items: Option<&tokio::sync::mpsc::Sender<Bytes>>,
    ) -> Result<Reply, NoReply> {
        if !self.unsent.is_empty() {
            let unsent = std::mem::take(&mut self.unsent);
            if self.frames.write_all(&unsent).await.is_err() {
                return Err(NoReply::Gone);
            }
        }
        let frames = [(SETUP, call.setup), (FUNCTION, call.function), (CALL, Some(call.payload))];
        for (kind, payload) in frames.into_iter().filter_map(|(kind, payload)| Some((kind, payload?))) {
            if write_frame(&mut self.frames, kind, payload).await.is_err() {
                return Err(NoReply::Gone);
            }
        }
        // The first look after OOM_POLL, not at once (an interval's first tick is immediate): a warm call that
        // returns sooner reads the counter only once, with its reply.
        let mut oom_poll = tokio::time::interval_at(tokio::time::Instant::now() + OOM_POLL, OOM_POLL);
        oom_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Output first: lines printed before the reply was sent belong to this call.
            tokio::select! {
                biased;
                () = self.stdout.forward(logs), if self.stdout.is_open() => {}
                () = self.stderr.forward(logs), if self.stderr.is_open() => {}
                frame = self.reader.next(&mut self.frames) => {
                    // The pipes may still hold bytes written before the reply; the reply is only read after them.
                    self.drain_output(logs);
                    let frame = match frame {
                        Ok(Some(frame)) if frame.kind == YIELDED => {
                            // A consumer that is slow holds the worker back here (at its next item), not the
                            // engine's memory; one that went away ends the call as the caller drops it.
                            if let Some(items) = items {
                                let _ = items.send(Bytes::from(frame.payload)).await;
                            }
                            continue;
                        }
                        frame => frame,
                    };
                    return match frame {
                        // A child killed for memory fails the call even if the function carried on (a
                        // `subprocess.run` that saw -9): what it returned is missing that child's part.
                        Ok(Some(_)) if self.placement.memory_exceeded() => Err(NoReply::ChildOutOfMemory),
                        Ok(Some(frame)) if frame.kind == RETURNED || frame.kind == RAISED => {
                            Ok(Reply { raised: frame.kind == RAISED, payload: frame.payload })
                        }
                        Err(FrameError::TooLarge { size, limit }) => Err(NoReply::TooLarge { size, limit }),
                        _ => Err(NoReply::Gone),
                    };
                }
                _ = oom_poll.tick() => {
                    if !self.placement.memory_exceeded() {
                        continue;
                    }
                    // A process of this worker was killed for memory. Where the agent itself was, its connection
                    // closes at once: let it, so that the error says the worker was killed. Otherwise it was a child
                    // of the function, which may wait for it forever (a pool's lost task): the call ends here.
                    let settled = tokio::time::timeout(OOM_SETTLE, self.reader.next(&mut self.frames)).await;
                    self.drain_output(logs);
                    return match settled {
                        Ok(Ok(None) | Err(_)) => Err(NoReply::Gone),
                        Ok(Ok(Some(_))) | Err(_) => Err(NoReply::ChildOutOfMemory),
                    };
                }
            }
        }
    }

    /// Forwards what the worker's pipes hold now, partial last lines included.
    fn drain_output(&mut self, logs: &LogSink) {
        self.stdout.drain_held(logs);
        self.stderr.drain_held(logs);
        self.stdout.flush_partial(logs);
        self.stderr.flush_partial(logs);
    }

    /// After [`Worker::call`] returned [`NoReply::Gone`]: waits for the worker to end and says how it went.
    pub async fn failure(mut self, machine_type: &str, memory: &str, logs: &LogSink) -> CallError {
        let error = self.placement.ended(machine_type, memory).await;
        // Its last words (a traceback, "Segmentation fault") are part of this call's logs.
        for pipe in [&mut self.stdout, &mut self.stderr] {
            pipe.drain_held(logs);
            pipe.flush_partial(logs);
        }
        error
    }

    /// Ends the worker and waits for it.
    pub async fn stop(mut self) {
        self.placement.stop().await;
    }
}

impl Placement for LocalProcess {
    fn id(&self) -> u32 {
        self.pid
    }

    fn hostname(&self) -> Option<&str> {
        self.hostname.as_deref()
    }

    fn address(&self) -> Option<std::net::IpAddr> {
        self.namespace.as_ref().and_then(Namespace::address).map(std::net::IpAddr::V4)
    }

    fn has_ended(&mut self) -> bool {
        self.reaped || has_exited(self.pid)
    }

    fn memory_exceeded(&self) -> bool {
        self.cgroup.as_ref().is_some_and(WorkerCgroup::oom_killed)
    }

    fn ended<'a>(&'a mut self, machine_type: &'a str, memory: &'a str) -> BoxFuture<'a, CallError> {
        Box::pin(async move {
            // Waited for without reaping it, so that its process group can still be signalled safely afterwards.
            let deadline = tokio::time::Instant::now() + EXIT_GRACE;
            while !has_exited(self.pid) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // What it started goes with it (and it too, if it has not ended within its grace).
            self.kill_group();
            let status = self.wait().await;
            let oom_killed = self.memory_exceeded();
            // Whatever the worker left running goes with its cgroup; its namespace goes after it.
            self.release().await;
            if oom_killed {
                return CallError::OutOfMemory {
                    machine_type: machine_type.to_string(),
                    memory: memory.to_string(),
                    child: false,
                };
            }
            let how =
                status.map(|s| describe_exit(s, self.jailed)).unwrap_or_else(|| "its exit status is unknown".into());
            CallError::WorkerDied { how }
        })
    }

    fn stop(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.kill_group();
            let _ = self.wait().await;
            self.release().await;
        })
    }
}

impl LocalProcess {
    /// Kills the worker's process group: the worker and every process it started that stayed in its group (all of
    /// them, for a jailed worker: bubblewrap keeps its PID namespace in the group, and the namespace dies with its
    /// first process anyway). Only while the worker is unreaped, when the group's id cannot be another's.
    fn kill_group(&mut self) {
        let Ok(pgid) = libc::pid_t::try_from(self.pid) else { return };
        // pid 0 or 1 would name our own group or init's: never a worker's.
        if self.reaped || pgid <= 1 {
            return;
        }
        // SAFETY: kill sends a signal and touches no memory; the group is the unreaped worker's own (see `reaped`).
        if unsafe { libc::kill(-pgid, libc::SIGKILL) } < 0 {
            // No group (it never got one): the worker alone.
            let _ = self.child.start_kill();
        }
    }

    /// Reaps the worker, once.
    async fn wait(&mut self) -> Option<ExitStatus> {
        let status = self.child.wait().await.ok();
        self.reaped = true;
        status
    }

    /// Removes its cgroup (killing what is left in it), then its network namespace, then gives back its GPUs: only
    /// once nothing of the worker can still use them. Removing a cgroup may retry for a moment while the kernel
    /// finishes tearing the processes down: on a blocking thread.
    async fn release(&mut self) {
        let (cgroup, namespace) = (self.cgroup.take(), self.namespace.take());
        if cgroup.is_some() || namespace.is_some() {
            let _ = tokio::task::spawn_blocking(move || drop((cgroup, namespace))).await;
        }
        self.gpus.take();
    }
}

impl Drop for LocalProcess {
    /// A worker dropped without [`Placement::stop`] (outside a runtime, at process teardown): its group is killed
    /// here; `kill_on_drop` and the runtime's reaper see to the worker itself.
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// Writes what of `message` the non-blocking `socket` takes now, and returns the rest: a message larger than the
/// socket's buffer (secrets of a few hundred KiB) waits for the agent to read, which a spawn does not wait for. An
/// error (the agent is gone already) leaves the rest too: the first call's write then fails, and says how it died.
fn write_now(socket: &std::os::unix::net::UnixStream, message: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut written = 0;
    while written < message.len() {
        match (&*socket).write(&message[written..]) {
            Ok(0) => break,
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    Zeroizing::new(message[written..].to_vec())
}

/// Whether the child `pid` has exited, asked without reaping it (`WNOWAIT`).
fn has_exited(pid: libc::id_t) -> bool {
    // SAFETY: an all-zero siginfo_t is a valid value; waitid writes only into it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child with a valid pointer to `info`; WNOWAIT leaves it waitable for `Child::wait`.
    let result =
        unsafe { libc::waitid(libc::P_PID, pid, &raw mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) };
    // ECHILD: no such child any more (reaped already); otherwise a pid is filled in once it has exited.
    // SAFETY: `si_pid` reads the field waitid filled in (or the zero it started as).
    result < 0 || unsafe { info.si_pid() } != 0
}

fn describe_exit(status: ExitStatus, jailed: bool) -> String {
    let signal = status.signal().or_else(|| status.code().filter(|c| jailed && *c > 128).map(|c| c - 128));
    if let Some(signal) = signal {
        let name = match signal {
            libc::SIGSEGV => " (SIGSEGV, a segmentation fault)",
            libc::SIGKILL => " (SIGKILL)",
            libc::SIGABRT => " (SIGABRT)",
            libc::SIGTERM => " (SIGTERM)",
            libc::SIGBUS => " (SIGBUS)",
            _ => "",
        };
        format!("killed by signal {signal}{name}")
    } else {
        format!("exited with code {}", status.code().unwrap_or(-1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A placement that never learns of its own end, as a cluster's job between polls.
    #[derive(Debug)]
    struct Unknowing;

    impl Placement for Unknowing {
        fn id(&self) -> u32 {
            0
        }
        fn has_ended(&mut self) -> bool {
            false
        }
        fn ended<'a>(&'a mut self, _: &'a str, _: &'a str) -> BoxFuture<'a, CallError> {
            Box::pin(async { CallError::WorkerDied { how: "ended".into() } })
        }
        fn stop(&mut self) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    fn worker() -> (Worker, UnixStream) {
        let (ours, agent) = UnixStream::pair().expect("socket pair");
        let (stdout, _) = pipe().expect("pipe");
        let (stderr, _) = pipe().expect("pipe");
        let worker = Worker::connected(Box::new(Unknowing), Box::new(ours), stdout, stderr, 1024).expect("worker");
        (worker, agent)
    }

    #[tokio::test]
    async fn an_idle_worker_whose_agent_closed_its_connection_has_exited() {
        let (mut worker, agent) = worker();
        assert!(!worker.has_exited());
        drop(agent);
        assert!(worker.has_exited());
    }

    #[test]
    fn a_jailed_workers_message_leaves_out_what_the_engine_and_the_jail_set() {
        let spec = WorkerSpec {
            python: "/data/envs/u/k/bin/python".into(),
            env_root: "/data/envs/u/k".into(),
            dill_layer: None,
            cgroup: None,
            jail: Some(WorkerJail {
                jail: Jail { bwrap: "bwrap".into(), setpriv: "setpriv".into() },
                base_prefix: "/usr".into(),
                uid: 1000,
                hostname: "worker".into(),
                network: JailNetwork::Loopback,
                namespace: None,
                resolv_conf: None,
                gpus: None,
            }),
            visible_gpus: Some(String::new()),
            gpus: None,
            max_payload: 1024,
            data_dir: None,
            link: None,
            granted: None,
            variables: WorkerVariables::new(),
        };
        let agent = spec.agent_command(None).expect("agent command");
        let mut variables = WorkerVariables::new();
        for name in ["TOKEN", "HOME", "PATH", "LANG", "PYTHONHOME", "VIRTUAL_ENV", "CUDA_VISIBLE_DEVICES", "OTHER"] {
            variables.push(name, "x");
        }
        assert_eq!(*agent.variables_message(&variables), b"TOKEN=x\0OTHER=x\0\0");
        // Only the jail's own options count: what follows `--` is the program's command line.
        let args =
            ["--setenv", "HOME", "/tmp", "--bind", "/a", "/a", "--", "setpriv", "--setenv", "NOT"].map(String::from);
        assert_eq!(jail_variables(&args), ["HOME"]);
    }

    #[test]
    fn what_the_socket_has_no_room_for_is_kept_whole() {
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        ours.set_nonblocking(true).expect("non-blocking");
        let message: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
        let unsent = write_now(&ours, &message);
        assert!(!unsent.is_empty() && unsent.len() < message.len(), "{} of {} unsent", unsent.len(), message.len());
        let mut sent = vec![0; message.len() - unsent.len()];
        std::io::Read::read_exact(&mut theirs, &mut sent).expect("what was sent");
        sent.extend_from_slice(&unsent);
        assert!(sent == message);
    }

    #[tokio::test]
    async fn the_rest_of_the_variables_goes_before_the_first_calls_frame() {
        let (mut worker, mut agent) = worker();
        worker.unsent = Zeroizing::new(b"A=1\0\0".to_vec());
        let agent = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut got = [0u8; 5 + 5 + 4];
            agent.read_exact(&mut got).await.expect("variables and frame");
            write_frame(&mut agent, RETURNED, b"ok").await.expect("reply");
            (got, agent)
        });
        let reply = worker.call(Outgoing::payload(b"call"), &LogSink::discard(), None).await.expect("a reply");
        assert_eq!((reply.raised, reply.payload.as_slice()), (false, &b"ok"[..]));
        let (got, _agent) = agent.await.expect("agent");
        assert_eq!(&got, b"A=1\0\0\0\0\0\x04\x01call");
        assert!(worker.unsent.is_empty());
    }

    #[tokio::test]
    async fn an_idle_worker_whose_agent_sends_unasked_has_exited() {
        let (mut worker, agent) = worker();
        agent.try_write(b"x").expect("write");
        assert!(worker.has_exited());
    }

    #[tokio::test]
    async fn setup_and_function_go_before_the_call_and_yielded_items_reach_the_caller_in_order() {
        let (mut worker, mut agent) = worker();
        let agent = tokio::spawn(async move {
            let mut reader = FrameReader::new(1024);
            let mut kinds = Vec::new();
            for _ in 0..3 {
                let frame = reader.next(&mut agent).await.expect("a frame").expect("not closed");
                kinds.push((frame.kind, frame.payload));
            }
            for item in [&b"one"[..], b"two", b"three"] {
                write_frame(&mut agent, YIELDED, item).await.expect("item");
            }
            write_frame(&mut agent, RETURNED, b"end").await.expect("reply");
            (kinds, agent)
        });
        let (items, mut received) = tokio::sync::mpsc::channel(1);
        let call = Outgoing { payload: b"args", setup: Some(b"setup"), function: Some(b"fn") };
        // A channel of one: the worker waits at each item until it is taken, and none is lost.
        let taker = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(item) = received.recv().await {
                got.push(item);
            }
            got
        });
        let reply = worker.call(call, &LogSink::discard(), Some(&items)).await.expect("a reply");
        drop(items);
        assert_eq!(reply.payload, b"end");
        let (kinds, _agent) = agent.await.expect("agent");
        let expected = [(SETUP, b"setup".to_vec()), (FUNCTION, b"fn".to_vec()), (CALL, b"args".to_vec())];
        assert_eq!(kinds, expected);
        assert_eq!(taker.await.expect("taker"), [&b"one"[..], b"two", b"three"]);
    }

    #[tokio::test]
    async fn items_of_a_caller_that_asked_for_none_are_dropped() {
        let (mut worker, mut agent) = worker();
        let agent = tokio::spawn(async move {
            let mut reader = FrameReader::new(1024);
            reader.next(&mut agent).await.expect("a frame");
            write_frame(&mut agent, YIELDED, b"item").await.expect("item");
            write_frame(&mut agent, RETURNED, b"none").await.expect("reply");
            agent
        });
        let reply = worker.call(Outgoing::payload(b"call"), &LogSink::discard(), None).await.expect("a reply");
        assert_eq!(reply.payload, b"none");
        drop(agent.await);
    }
}
