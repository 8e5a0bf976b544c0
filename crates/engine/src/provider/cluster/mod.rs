//! What every cluster provider shares, whatever engine runs its jobs: a worker is a job of the cluster, sized by its
//! machine type, whose agent connects back to this engine ([`callback`]). A [`Launcher`] knows one cluster engine
//! (how to submit a job, cancel jobs, and observe their states); this module does the rest, once for all of them:
//!
//! * the start: submit, tell the caller while the job waits for resources, hand back the worker once its three
//!   streams have connected, or say why it ended before it did;
//! * one observer per provider keeping the [`JobBook`](book::JobBook) of every job someone waits on current, instead
//!   of a poll per waiting call;
//! * a worker's end: why its job ended (out of memory, its node lost, cancelled by an admin), from the same book;
//! * cancelling: a job whose start was abandoned is cancelled, and the command that does it is waited for;
//! * leftovers: the jobs a previous run of this server left (it was killed, say) are cancelled before the first
//!   job of this run is submitted.

pub(crate) mod book;
pub(crate) mod callback;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OnceCell};

use self::book::{next_change, EndCause, Ending, JobBook, JobState};
use self::callback::{Callback, Stream};
use super::Provider;
use crate::error::CallError;
use crate::logs::{LogSink, LogSource};
use crate::machine::MachineType;
use crate::worker::{AgentCommand, BoxFuture, Placement, Worker, WorkerSpec};

/// How long the cluster may take to say why a job whose worker's connection closed ended.
const END_GRACE: Duration = Duration::from_secs(15);
/// How long a stopping engine waits for the cancellations still queued.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// One cluster engine, as the providers' shared logic needs it.
pub(crate) trait Launcher: Send + Sync + std::fmt::Debug + 'static {
    /// What its jobs are called in messages: "Slurm job", "pod".
    const JOB: &'static str;
    /// How a caller is told its job waits, before the reason: "waiting for a Slurm allocation".
    const WAITING: &'static str;
    /// The cluster engine's name: "Slurm", "Kubernetes".
    const CLUSTER: &'static str;
    /// The config table of its settings: "slurm".
    const SECTION: &'static str;
    /// Whether workers run in the server's jail inside their job (bubblewrap on the node); else the job itself is
    /// the sandbox (a pod), and the jail's uid is what the job runs as.
    const JAILS: bool;
    /// Whether an ended job stays in the cluster until it is cancelled (a pod until it is deleted), so that ending
    /// is not enough.
    const KEEPS_ENDED: bool;

    /// The address workers connect back to (port 0: any free port).
    fn callback_address(&self) -> Result<SocketAddr, CallError>;

    /// Submits a worker job and returns its id.
    fn submit<'a>(&'a self, job: JobRequest<'a>) -> BoxFuture<'a, Result<String, SubmitError>>;

    /// Keeps `book` current for as long as the provider lives: the state of every job it follows.
    fn observe(self: Arc<Self>, book: Arc<JobBook>) -> BoxFuture<'static, ()>;

    /// Cancels (deletes) jobs, and waits until the cluster has taken the request.
    fn cancel<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), String>>;

    /// The jobs a previous run of this server left: cancelled before this run submits any.
    fn leftovers(&self) -> BoxFuture<'_, Result<Vec<String>, String>>;
}

/// What a launcher needs to submit one worker job.
pub(crate) struct JobRequest<'a> {
    pub spec: &'a WorkerSpec,
    pub agent: &'a AgentCommand,
    pub machine: &'a MachineType,
    /// Where the job connects back to, saying `token` on each stream.
    pub callback: SocketAddr,
    pub token: &'a str,
    /// The uid the job's processes run as, for a launcher that does not jail ([`Launcher::JAILS`]).
    pub run_as: Option<u32>,
}

/// Why a job was not submitted.
#[derive(Debug)]
pub(crate) enum SubmitError {
    /// The cluster would not take what was asked for (a mapping of the machine type's it cannot give).
    Refused {
        /// What was asked for, as the admin maps it: `--cpus-per-task=4 --mem=16384M --gres=gpu:1`.
        asked: String,
        /// The cluster's words.
        reason: String,
    },
    /// The cluster could not be asked, or refused the server itself (its permissions, say).
    Failed(String),
}

/// The shell script that makes a job a worker: it connects three streams back to `host:port` (frames, stdout,
/// stderr), each first saying `token`, then execs the agent with the engine's variables and, of the job's own
/// environment, only the variables `kept` names (shell patterns: `SLURM_*`): what the cluster sets for the job, not
/// what it passed on from the server's environment. Needs bash (`/dev/tcp`).
pub(crate) fn connect_back(
    spec: &WorkerSpec,
    agent: &AgentCommand,
    (host, port): (&str, u16),
    token: &str,
    kept: &[&str],
) -> String {
    use std::fmt::Write as _;
    let mut script = String::new();
    let _ = writeln!(
        script,
        "exec 3<>/dev/tcp/{host}/{port} 4<>/dev/tcp/{host}/{port} 5<>/dev/tcp/{host}/{port} || exit 1"
    );
    let _ = writeln!(
        script,
        "printf '{token} frames\\n' >&3; printf '{token} stdout\\n' >&4; printf '{token} stderr\\n' >&5"
    );
    let _ = writeln!(script, "exec 0</dev/null 1>&4 2>&5 4>&- 5>&-");
    let _ = writeln!(
        script,
        "kept=(); for name in $(compgen -e); do case $name in {}) kept+=(\"$name=${{!name}}\");; esac; done",
        kept.join("|")
    );
    let mut exec = format!("exec env -i \"${{kept[@]}}\" LANG=C.UTF-8 PATH={}", quote(&spec.clean_path()));
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

/// `value` quoted for bash.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// A provider running workers as jobs of the cluster `L` launches on.
#[derive(Debug)]
pub(crate) struct ClusterProvider<L: Launcher> {
    shared: Arc<Shared<L>>,
    /// The task keeping the book current, ended with the provider.
    observer: Option<tokio::task::AbortHandle>,
}

impl<L: Launcher> Drop for ClusterProvider<L> {
    fn drop(&mut self) {
        if let Some(observer) = &self.observer {
            observer.abort();
        }
    }
}

#[derive(Debug)]
struct Shared<L: Launcher> {
    launcher: Arc<L>,
    book: Arc<JobBook>,
    callback: OnceCell<Arc<Callback>>,
    /// Set once the previous run's jobs are cancelled (or could not be listed).
    cleaned: OnceCell<()>,
    /// Jobs to cancel, from where nothing can wait (a start dropped mid-way).
    cancels: mpsc::UnboundedSender<Cancel>,
}

/// What the canceller is asked.
#[derive(Debug)]
enum Cancel {
    Job(String),
    /// Answered once every job asked before is cancelled.
    Flush(tokio::sync::oneshot::Sender<()>),
}

impl<L: Launcher> ClusterProvider<L> {
    /// Starts the observer and the canceller, and the clean-up of the previous run's jobs: in the current tokio
    /// runtime, which the engine is made in.
    pub fn new(launcher: L) -> Self {
        let launcher = Arc::new(launcher);
        let book = Arc::new(JobBook::default());
        let (cancels, cancelled) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            launcher: launcher.clone(),
            book: book.clone(),
            callback: OnceCell::new(),
            cleaned: OnceCell::new(),
            cancels,
        });
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!("a cluster provider made outside a tokio runtime cannot observe its jobs");
            return Self { shared, observer: None };
        };
        let observer = runtime.spawn(launcher.clone().observe(book)).abort_handle();
        // Ends once the last job that could send to it is gone.
        runtime.spawn(cancel_dropped(launcher, cancelled));
        let cleaning = Arc::downgrade(&shared);
        runtime.spawn(async move {
            if let Some(shared) = cleaning.upgrade() {
                shared.clean_up().await;
            }
        });
        Self { shared, observer: Some(observer) }
    }
}

impl<L: Launcher> Shared<L> {
    /// Cancels the jobs a previous run of this server left (once; every start waits for it, so none of this run's
    /// own jobs can be among them).
    async fn clean_up(&self) {
        self.cleaned
            .get_or_init(|| async {
                let left = match self.launcher.leftovers().await {
                    Ok(left) => left,
                    Err(error) => {
                        tracing::warn!(%error, "cannot list the worker jobs of this server's previous run");
                        return;
                    }
                };
                if left.is_empty() {
                    return;
                }
                tracing::info!(jobs = %left.join(","), "cancelling worker jobs of this server's previous run");
                if let Err(error) = self.launcher.cancel(&left).await {
                    tracing::warn!(%error, "cannot cancel the worker jobs of this server's previous run");
                }
            })
            .await;
    }

    async fn callback(&self) -> Result<Arc<Callback>, CallError> {
        let callback = self
            .callback
            .get_or_try_init(|| async {
                let asked = self.launcher.callback_address()?;
                Callback::listen(asked)
                    .await
                    .map_err(|e| CallError::Spawn(format!("cannot listen for worker jobs on {asked}: {e}")))
            })
            .await?;
        Ok(callback.clone())
    }
}

/// Cancels the jobs sent here (those of starts dropped before their worker connected), a batch at a time, waiting
/// for each cancellation: none is left a zombie.
async fn cancel_dropped<L: Launcher>(launcher: Arc<L>, mut asked: mpsc::UnboundedReceiver<Cancel>) {
    while let Some(first) = asked.recv().await {
        let (mut ids, mut flushes) = (Vec::new(), Vec::new());
        let mut next = Some(first);
        while let Some(cancel) = next {
            match cancel {
                Cancel::Job(id) => ids.push(id),
                Cancel::Flush(done) => flushes.push(done),
            }
            next = asked.try_recv().ok();
        }
        if !ids.is_empty() {
            if let Err(error) = launcher.cancel(&ids).await {
                tracing::warn!(%error, jobs = %ids.join(","), "cannot cancel abandoned worker jobs");
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

impl<L: Launcher> Provider for ClusterProvider<L> {
    fn start<'a>(
        &'a self,
        mut spec: WorkerSpec,
        machine: &'a MachineType,
        wait: Option<Duration>,
        logs: &'a LogSink,
    ) -> BoxFuture<'a, Result<Worker, CallError>> {
        // Persistent storage is a directory of the server's host, which a cluster's nodes do not have.
        spec.data_dir = None;
        if let Some(jail) = spec.jail.as_mut() {
            // The job's agent needs the node's network to connect back; the cluster's network policy applies.
            jail.network = fal_sandbox::JailNetwork::Host;
        }
        let run_as = if L::JAILS { None } else { spec.jail.take().map(|jail| jail.uid) };
        Box::pin(async move {
            let shared = &self.shared;
            shared.clean_up().await;
            let callback = shared.callback().await?;
            let mut expected = callback.expect();
            // No seccomp filter: the job could be handed no descriptor of ours. What it takes away matters for
            // `/data`'s quota, and a job has no `/data`.
            let agent = spec.agent_command(None)?;
            let request = JobRequest {
                spec: &spec,
                agent: &agent,
                machine,
                callback: callback.address,
                token: &expected.token,
                run_as,
            };
            let id = shared.launcher.submit(request).await.map_err(|error| match error {
                SubmitError::Refused { asked, reason } => CallError::Allocation {
                    machine_type: machine.name.clone(),
                    options: asked,
                    reason,
                    section: L::SECTION,
                },
                SubmitError::Failed(why) => CallError::Spawn(format!("cannot submit a {}: {why}", L::JOB)),
            })?;
            // Until the worker is connected, the job is this start's to cancel (if the caller goes away, say).
            let mut job = ClusterJob { shared: shared.clone(), id, node: None, stopped: false };
            let mut following = shared.book.follow(&job.id);
            if let Some(why) = following.trouble.borrow_and_update().clone() {
                logs.send(LogSource::Engine, format!("the cluster does not answer ({why}); still waiting"));
            }
            let mut streams: HashMap<Stream, TcpStream> = HashMap::new();
            let mut shown = String::new();
            let deadline = async {
                match wait {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(deadline);
            while streams.len() < 3 {
                tokio::select! {
                    connection = expected.streams.recv() => {
                        if let Some((kind, stream)) = connection {
                            streams.insert(kind, stream);
                        }
                    }
                    state = next_change(&mut following.state) => match state {
                        JobState::Waiting { reason } if reason != shown => {
                            logs.send(LogSource::Engine, format!("{}: {reason}", L::WAITING));
                            shown = reason;
                        }
                        JobState::Running { node } => job.node = node.or(job.node.take()),
                        JobState::Ended(ending) => {
                            // Dropped with this start, the job is cancelled where the cluster keeps it.
                            job.stopped = !L::KEEPS_ENDED;
                            let hint = match ending.cause {
                                EndCause::Unstartable => String::new(),
                                _ => format!(
                                    ". If it failed, check that the nodes reach this server's callback address {}",
                                    callback.address
                                ),
                            };
                            return Err(CallError::WorkerDied {
                                how: format!(
                                    "ended before it connected: its {} {} ended ({}){hint}",
                                    L::JOB, job.id, ending.detail
                                ),
                            });
                        }
                        _ => {}
                    },
                    trouble = next_change(&mut following.trouble) => {
                        if let Some(why) = trouble {
                            logs.send(LogSource::Engine, format!("the cluster does not answer ({why}); still waiting"));
                        }
                    }
                    () = &mut deadline => {
                        return Err(CallError::Timeout { seconds: wait.unwrap_or_default().as_secs_f64() });
                    }
                }
            }
            drop(following);
            let (Some(mut frames), Some(stdout), Some(stderr)) =
                (streams.remove(&Stream::Frames), streams.remove(&Stream::Stdout), streams.remove(&Stream::Stderr))
            else {
                return Err(CallError::Spawn("a worker job connected the same stream twice".into()));
            };
            let _ = frames.set_nodelay(true);
            frames
                .write_all(&agent.variables_message(&spec.variables))
                .await
                .map_err(|e| CallError::Spawn(format!("{} {}: sending its variables: {e}", L::JOB, job.id)))?;
            let fd = |stream: TcpStream| stream.into_std().map(OwnedFd::from);
            let job_id = job.id.clone();
            let spawn_error = |e: std::io::Error| CallError::Spawn(format!("{} {job_id}: {e}", L::JOB));
            let (stdout, stderr) = (fd(stdout).map_err(spawn_error)?, fd(stderr).map_err(spawn_error)?);
            tracing::debug!(job = %job.id, node = ?job.node, machine_type = %machine.name, "worker job connected");
            Worker::connected(Box::new(job), Box::new(frames), stdout, stderr, spec.max_payload).map_err(spawn_error)
        })
    }

    fn gpus(&self) -> Option<u32> {
        None
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (done, flushed) = tokio::sync::oneshot::channel();
            if self.shared.cancels.send(Cancel::Flush(done)).is_ok()
                && tokio::time::timeout(SHUTDOWN_GRACE, flushed).await.is_err()
            {
                tracing::warn!("worker jobs abandoned at shutdown may not all be cancelled");
            }
        })
    }
}

/// A worker's job, from submission on. Dropped before it is stopped (its start was abandoned while it queued), it
/// is cancelled.
#[derive(Debug)]
pub(crate) struct ClusterJob<L: Launcher> {
    shared: Arc<Shared<L>>,
    id: String,
    node: Option<String>,
    stopped: bool,
}

impl<L: Launcher> Drop for ClusterJob<L> {
    fn drop(&mut self) {
        self.shared.book.forget(&self.id);
        if !self.stopped {
            let _ = self.shared.cancels.send(Cancel::Job(std::mem::take(&mut self.id)));
        }
    }
}

impl<L: Launcher> Placement for ClusterJob<L> {
    fn id(&self) -> u32 {
        self.id.parse().unwrap_or(0)
    }

    fn has_ended(&mut self) -> bool {
        // What the observer saw, where it sees every job (a watch); asking the cluster is too slow for every call.
        // A job that ended while idle also closed its connection, which the worker itself sees.
        self.shared.book.is_gone(&self.id)
    }

    fn ended<'a>(&'a mut self, machine_type: &'a str, memory: &'a str) -> BoxFuture<'a, CallError> {
        Box::pin(async move {
            let mut following = self.shared.book.follow(&self.id);
            let grace = tokio::time::sleep(END_GRACE);
            tokio::pin!(grace);
            let ended = loop {
                tokio::select! {
                    state = next_change(&mut following.state) => match state {
                        // Where it ran, for the message if the cluster never says how it ended.
                        JobState::Running { node: Some(node) } => self.node = Some(node),
                        JobState::Ended(ending) => break Ok(ending),
                        _ => {}
                    },
                    () = &mut grace => break Err(following.trouble.borrow().clone()),
                }
            };
            drop(following);
            let node = |ending: Option<&Ending>| {
                ending
                    .and_then(|e| e.node.clone())
                    .or_else(|| self.node.clone())
                    .map(|n| format!("node {n}"))
                    .unwrap_or_else(|| "its node".into())
            };
            let ending = match ended {
                Ok(ending) => ending,
                // The worker's connection is gone but the cluster still runs the job (its node is unreachable,
                // say), or the cluster cannot tell: the job is cancelled, so that nothing holds its allocation.
                Err(trouble) => {
                    let cancelled = self.shared.launcher.cancel(std::slice::from_ref(&self.id)).await;
                    // Only now: dropped before, it is still this placement's to cancel.
                    self.stopped = true;
                    let now = if cancelled.is_ok() { ", now cancelled" } else { "" };
                    let why = match trouble {
                        Some(why) => format!("; the cluster does not answer ({why}), so why is unknown"),
                        None => "; the node may be down".into(),
                    };
                    return CallError::WorkerDied {
                        how: format!(
                            "lost its connection to the server, on {} ({} {}{now}){why}",
                            node(None),
                            L::JOB,
                            self.id
                        ),
                    };
                }
            };
            if L::KEEPS_ENDED {
                if let Err(error) = self.shared.launcher.cancel(std::slice::from_ref(&self.id)).await {
                    tracing::warn!(%error, job = %self.id, "cannot remove an ended worker job");
                }
            }
            self.stopped = true;
            let (job, id, detail) = (L::JOB, &self.id, &ending.detail);
            match ending.cause {
                EndCause::OutOfMemory => CallError::OutOfMemory {
                    machine_type: machine_type.to_string(),
                    memory: memory.to_string(),
                    child: false,
                },
                EndCause::NodeLost => CallError::WorkerDied {
                    how: format!("was lost with {} ({job} {id}: {detail})", node(Some(&ending))),
                },
                EndCause::Cancelled => {
                    CallError::WorkerDied { how: format!("was cancelled in {} ({job} {id}: {detail})", L::CLUSTER) }
                }
                EndCause::Unstartable | EndCause::Other => {
                    CallError::WorkerDied { how: format!("ended ({job} {id}: {detail})") }
                }
            }
        })
    }

    fn stop(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.stopped {
                return;
            }
            if let Err(error) = self.shared.launcher.cancel(std::slice::from_ref(&self.id)).await {
                tracing::warn!(%error, job = %self.id, "cannot cancel a worker job");
            }
            // Only now: dropped while cancelling, it is cancelled again from its drop.
            self.stopped = true;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
