//! The Slurm launcher: a worker is a Slurm job. Its allocation is the machine type's (`--cpus-per-task`, `--mem`,
//! `--gres` for GPU types), and Slurm enforces it (`task/cgroup`). The job's script connects three TCP streams back
//! to this engine (frames, stdout, stderr), each opened with the worker's one-time token, then runs the agent as the
//! local provider would (in the jail, where the server has one). The environment is built by the engine into a cache
//! the nodes share, at the same path. What every cluster shares (the start, the callback, the jobs' book, leftovers)
//! is [`super::cluster`]'s; this module is how Slurm's commands do each part.
//!
//! One `squeue` of this server's jobs each [`POLL`] answers for every job someone waits on; a job that left the
//! queue is asked of `scontrol`, which keeps an ended job's state a while (out of memory, node failure, cancelled).
//! A command that fails (slurmctld timing out) says nothing of any job: the waiting calls are told the cluster does
//! not answer, and keep waiting. Jobs carry the server's tag in their comment, so a restarted engine cancels the warm
//! jobs of its previous run instead of leaking them.
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
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::cluster::book::{EndCause, Ending, JobBook, JobState};
use super::cluster::{connect_back, JobRequest, Launcher, SubmitError};
use crate::error::CallError;
use crate::machine::MachineType;
use crate::worker::{AgentCommand, BoxFuture, WorkerSpec};

/// The job name of every worker job; the comment tells one server's jobs from another's.
const JOB_NAME: &str = "fal-worker";
/// How often the queue is asked for the states of the jobs someone waits on.
const POLL: Duration = Duration::from_millis(500);
/// How long a Slurm command may take (slurmctld's own timeout is 10 s by default); then it is killed, and what it was
/// asked is unknown.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

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
pub(crate) struct Slurm {
    config: SlurmConfig,
}

impl Slurm {
    pub fn new(config: SlurmConfig) -> Self {
        Self { config }
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
        // The agent gets only what Slurm sets for the job of its environment: SLURM_* (the job's id, its nodes) and
        // which GPUs it was given; sbatch passes the server's own environment on (its `--export=ALL` default).
        let kept: Vec<&str> = std::iter::once("SLURM_*").chain(SLURM_GPU_VARIABLES).collect();
        script.push_str(&connect_back(spec, agent, (&address.ip().to_string(), address.port()), token, &kept));
        script
    }

    /// Runs a Slurm command to its end: its stdout, or what went wrong (its stderr, or why it could not run).
    async fn run(&self, name: &str, args: &[&str], input: Option<&str>) -> Result<String, String> {
        let mut command = Command::new(program(self.config.bin_dir.as_ref(), name));
        command.args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        command.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = command.spawn().map_err(|e| format!("cannot run {name}: {e}; is Slurm installed here?"))?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(input.as_bytes()).await.map_err(|e| format!("{name}: {e}"))?;
        }
        let output = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| format!("{name} did not answer within {}s", COMMAND_TIMEOUT.as_secs()))?
            .map_err(|e| format!("{name}: {e}"))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
            return Err(if stderr.is_empty() { format!("{name} failed ({})", output.status) } else { stderr });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// This server's jobs in Slurm's queue (pending, running, completing), by id.
    async fn queue(&self) -> Result<HashMap<String, QueuedJob>, String> {
        let listed =
            self.run("squeue", &["--noheader", "--name", JOB_NAME, "--format", "%i|%T|%r|%N|%k"], None).await?;
        Ok(parse_queue(&listed, &self.config.tag))
    }

    /// How a job that left the queue ended; `Ok(None)`: Slurm says it has not.
    async fn ending(&self, id: &str) -> Result<Option<Ending>, String> {
        let shown = match self.run("scontrol", &["--oneliner", "show", "job", id], None).await {
            Ok(shown) => shown,
            // Ended long enough ago to be purged (MinJobAge).
            Err(error) if error.contains("Invalid job id") => {
                return Ok(Some(Ending {
                    cause: EndCause::Other,
                    node: None,
                    detail: "no longer known to Slurm".into(),
                }))
            }
            Err(error) => return Err(error),
        };
        Ok(parse_ending(&shown))
    }

    /// One look at the queue, recorded in `book` for the jobs it follows.
    async fn look(&self, book: &JobBook) -> Result<(), String> {
        let followed = book.followed();
        if followed.is_empty() {
            return Ok(());
        }
        let queue = self.queue().await?;
        let mut trouble = Ok(());
        for id in followed {
            match queue.get(&id) {
                Some(job) if !is_terminal(&job.state) => book.record(&id, job.job_state()),
                // One job's scontrol failing leaves the others' states to be recorded.
                _ => match self.ending(&id).await {
                    Ok(Some(ending)) => book.record(&id, JobState::Ended(ending)),
                    Ok(None) => {}
                    Err(error) => trouble = trouble.and(Err(error)),
                },
            }
        }
        trouble
    }
}

impl Launcher for Slurm {
    const JOB: &'static str = "Slurm job";
    const WAITING: &'static str = "waiting for a Slurm allocation";
    const CLUSTER: &'static str = "Slurm";
    const SECTION: &'static str = "slurm";
    const JAILS: bool = true;
    const KEEPS_ENDED: bool = false;

    fn callback_address(&self) -> Result<SocketAddr, CallError> {
        self.config.callback.ok_or_else(|| {
            CallError::Spawn("the slurm provider needs `callback`: an address of this host the nodes reach".into())
        })
    }

    fn submit<'a>(&'a self, job: JobRequest<'a>) -> BoxFuture<'a, Result<String, SubmitError>> {
        Box::pin(async move {
            let allocation = self.allocation(job.machine);
            let script = self.script(job.spec, job.agent, &allocation, job.callback, job.token);
            let refused = |reason: String| SubmitError::Refused { asked: allocation.options().join(" "), reason };
            let printed = self.run("sbatch", &["--parsable"], Some(&script)).await.map_err(refused)?;
            // `--parsable` prints `<id>` or `<id>;<cluster>`.
            let id = printed.trim().split(';').next().unwrap_or("").to_string();
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
                return Err(refused(format!("sbatch printed no job id: {printed:?}")));
            }
            Ok(id)
        })
    }

    fn observe(self: Arc<Self>, book: Arc<JobBook>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            loop {
                book.until_followed().await;
                match self.look(&book).await {
                    Ok(()) => book.trouble(None),
                    Err(why) => {
                        tracing::warn!(%why, "cannot ask Slurm for the state of worker jobs; asking again");
                        book.trouble(Some(why));
                    }
                }
                tokio::time::sleep(POLL).await;
            }
        })
    }

    fn cancel<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let ids: Vec<&str> = ids.iter().map(String::as_str).filter(|id| !id.is_empty()).collect();
            if ids.is_empty() {
                return Ok(());
            }
            self.run("scancel", &ids, None).await.map(drop)
        })
    }

    fn leftovers(&self) -> BoxFuture<'_, Result<Vec<String>, String>> {
        Box::pin(async move { Ok(self.queue().await?.into_keys().collect()) })
    }
}

/// A job as `squeue` lists it.
#[derive(Debug, Clone, PartialEq)]
struct QueuedJob {
    state: String,
    reason: String,
    node: Option<String>,
}

impl QueuedJob {
    fn job_state(&self) -> JobState {
        match self.state.as_str() {
            "RUNNING" | "CONFIGURING" | "COMPLETING" => JobState::Running { node: self.node.clone() },
            _ => JobState::Waiting { reason: with_reason(&self.state, &self.reason) },
        }
    }
}

/// `squeue --format %i|%T|%r|%N|%k` lines, those whose comment is `tag`.
fn parse_queue(listed: &str, tag: &str) -> HashMap<String, QueuedJob> {
    listed
        .lines()
        .filter_map(|line| {
            let mut fields = line.trim().splitn(5, '|');
            let (id, state, reason, node, comment) =
                (fields.next()?, fields.next()?, fields.next()?, fields.next()?, fields.next()?);
            (comment == tag && !id.is_empty()).then(|| {
                let node = Some(node.to_string()).filter(|n| !n.is_empty() && n != "(null)");
                (id.to_string(), QueuedJob { state: state.into(), reason: reason.into(), node })
            })
        })
        .collect()
}

/// An ending from `scontrol --oneliner show job`; `None` if the job has not ended.
fn parse_ending(shown: &str) -> Option<Ending> {
    let field = |name: &str| shown.split_whitespace().find_map(|kv| kv.strip_prefix(name)).map(str::to_string);
    let state = field("JobState=")?;
    if !is_terminal(&state) {
        return None;
    }
    let detail = with_reason(&state, &field("Reason=").unwrap_or_default());
    let node = field("NodeList=").filter(|n| !n.is_empty() && n != "(null)");
    let cause = match state.as_str() {
        "OUT_OF_MEMORY" => EndCause::OutOfMemory,
        "NODE_FAIL" => EndCause::NodeLost,
        "CANCELLED" | "PREEMPTED" => EndCause::Cancelled,
        _ => EndCause::Other,
    };
    Some(Ending { cause, node, detail })
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

fn is_terminal(state: &str) -> bool {
    !matches!(state, "PENDING" | "CONFIGURING" | "RUNNING" | "COMPLETING" | "SUSPENDED" | "RESIZING" | "REQUEUED")
}

/// What Slurm sets in a job given GPUs (`--gres`), passed on to its agent with `SLURM_*` (see [`Slurm::script`]).
const SLURM_GPU_VARIABLES: [&str; 3] = ["CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "ROCR_VISIBLE_DEVICES"];

#[cfg(test)]
mod tests {
    use super::*;

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
        let provider = Slurm::new(config);
        let spec = WorkerSpec::bare("/data/envs/u/k/bin/python", "/data/envs/u/k");
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
        let kept = "case $name in SLURM_*|CUDA_VISIBLE_DEVICES|GPU_DEVICE_ORDINAL|ROCR_VISIBLE_DEVICES) kept+=";
        assert!(script.lines().any(|l| l.starts_with("kept=(); for name in $(compgen -e)") && l.contains(kept)));
        let start = r#""${kept[@]}" LANG=C.UTF-8 PATH='/data/envs/u/k/bin:/usr/local/bin:/usr/bin:/bin' "#;
        assert!(exec.starts_with(start), "{exec}");
        assert!(exec.contains(" VIRTUAL_ENV='/data/envs/u/k' "), "{exec}");
        assert!(!script.contains("export "), "nothing is exported into the job's own environment");
        // The agent's source travels quoted, whole, as the last argument.
        let exec = exec.split_once(" '/data/envs/u/k/bin/python' ").map(|(_, exec)| exec).unwrap();
        assert!(exec.starts_with("'-I' '-u' '-c' '"), "{exec}");
        assert!(exec.contains("def serve():") && exec.ends_with("serve()\n'\n"));
    }

    #[test]
    fn the_queue_is_read_for_this_servers_jobs_alone() {
        let listed = "12|PENDING|Resources||fal-serverless-a\n13|RUNNING|None|node-1|fal-serverless-a\n\
                      14|RUNNING|None|node-1|fal-serverless-b\n";
        let queue = parse_queue(listed, "fal-serverless-a");
        assert_eq!(queue.len(), 2);
        assert_eq!(queue["12"].job_state(), JobState::Waiting { reason: "PENDING (Resources)".into() });
        assert_eq!(queue["13"].job_state(), JobState::Running { node: Some("node-1".into()) });
        assert!(parse_queue("garbage\n\n", "fal-serverless-a").is_empty());
    }

    #[test]
    fn scontrol_says_how_a_job_ended() {
        let shown = "JobId=7 JobName=fal-worker JobState=OUT_OF_MEMORY Reason=OutOfMemory NodeList=node-2 Comment=x";
        let ending = parse_ending(shown).unwrap();
        assert_eq!((ending.cause, ending.node.as_deref()), (EndCause::OutOfMemory, Some("node-2")));
        assert_eq!(parse_ending("JobId=7 JobState=CANCELLED Reason=None NodeList=(null)").unwrap().detail, "CANCELLED");
        assert_eq!(parse_ending("JobId=7 JobState=NODE_FAIL Reason=NodeDown").unwrap().cause, EndCause::NodeLost);
        assert_eq!(parse_ending("JobId=7 JobState=RUNNING Reason=None"), None, "a running job has not ended");
        assert_eq!(parse_ending(""), None);
    }

    /// Slurm's four commands as shell scripts in a directory: `sbatch` hands out ids 100, 101, ...; `squeue` lists
    /// every submitted job PENDING (or fails while the file `squeue-fails` exists); `scontrol` says PENDING;
    /// `scancel` records what it cancelled. Each records its calls in `<name>.calls`.
    fn fake_slurm(dir: &std::path::Path) {
        use std::os::unix::fs::PermissionsExt;
        let scripts = [
            ("sbatch", "cat > /dev/null; exec 9> \"$D/lock\"; flock 9; n=$(($(wc -l < \"$D/submitted\" 2>/dev/null || echo 0) + 100)); echo $n >> \"$D/submitted\"; echo $n"),
            ("squeue", "if [ -e \"$D/squeue-fails\" ]; then echo 'slurm_load_jobs error: Socket timed out on send/recv operation' >&2; exit 1; fi; touch \"$D/submitted\"; while read -r id; do grep -qx \"$id\" \"$D/cancelled\" 2>/dev/null || echo \"$id|PENDING|Resources||fal-serverless-t\"; done < \"$D/submitted\""),
            ("scontrol", "echo \"JobId=$4 JobState=PENDING Reason=Resources\""),
            ("scancel", "for id in \"$@\"; do echo $id >> \"$D/cancelled\"; done"),
        ];
        for (name, body) in scripts {
            let path = dir.join(name);
            let text = format!("#!/bin/sh\nD='{}'\necho \"$@\" >> \"$D/{name}.calls\"\n{body}\n", dir.display());
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    fn calls(dir: &std::path::Path, name: &str) -> Vec<String> {
        std::fs::read_to_string(dir.join(format!("{name}.calls")))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    fn fake_provider(dir: &std::path::Path) -> super::super::cluster::ClusterProvider<Slurm> {
        fake_slurm(dir);
        super::super::cluster::ClusterProvider::new(Slurm::new(SlurmConfig {
            callback: Some("127.0.0.1:0".parse().unwrap()),
            tag: "fal-serverless-t".into(),
            bin_dir: Some(dir.to_path_buf()),
            ..Default::default()
        }))
    }

    fn spec() -> WorkerSpec {
        WorkerSpec::bare("/usr/bin/python3", "/usr")
    }

    #[tokio::test]
    async fn one_squeue_serves_every_waiting_start_and_its_failure_is_no_end() {
        use super::super::Provider;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("squeue-fails"), "").unwrap();
        let provider = fake_provider(dir.path());
        let machine = MachineType::new("XS", 0.25, 256 * 1024 * 1024, 0);
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let logs = {
            let lines = lines.clone();
            crate::logs::LogSink::new(move |line| lines.lock().unwrap().push(line.line))
        };
        let wait = Some(Duration::from_secs(3));
        let start = || provider.start(spec(), &machine, wait, &logs);
        let recovering = async {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            std::fs::remove_file(dir.path().join("squeue-fails")).unwrap();
        };
        let (a, b, c, d, ()) = tokio::join!(start(), start(), start(), start(), recovering);
        for start in [a, b, c, d] {
            // Slurm failing to answer is not the job's end: each start waited its whole time.
            assert!(matches!(start, Err(CallError::Timeout { .. })), "{start:?}");
        }
        let lines = lines.lock().unwrap().clone();
        assert!(
            lines.iter().any(|l| l.contains("does not answer (slurm_load_jobs error: Socket timed out")),
            "{lines:?}"
        );
        assert!(lines.iter().any(|l| l == "waiting for a Slurm allocation: PENDING (Resources)"), "{lines:?}");
        // One squeue per look for all four (and one for the previous run's jobs), not one per start: over 3 s at
        // one look each 500 ms, at most 8 looks.
        let looks = calls(dir.path(), "squeue").len();
        assert!((2..=9).contains(&looks), "{looks} squeue calls for 4 waiting starts");
        // The timed-out starts' jobs were cancelled, by a scancel that was waited for.
        tokio::time::timeout(Duration::from_secs(5), async {
            while std::fs::read_to_string(dir.path().join("cancelled")).unwrap_or_default().lines().count() < 4 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the abandoned jobs were not cancelled");
        let mut cancelled: Vec<String> = calls(dir.path(), "scancel").join(" ").split(' ').map(String::from).collect();
        cancelled.sort();
        assert_eq!(cancelled, ["100", "101", "102", "103"]);
    }

    #[tokio::test]
    async fn jobs_a_previous_run_left_are_cancelled_before_any_of_this_runs() {
        use super::super::Provider;
        let dir = tempfile::tempdir().unwrap();
        fake_slurm(dir.path());
        // The previous run's job, still queued.
        std::fs::write(dir.path().join("submitted"), "99\n").unwrap();
        std::fs::write(dir.path().join("sbatch.calls"), "").unwrap();
        let provider = fake_provider(dir.path());
        let machine = MachineType::new("XS", 0.25, 256 * 1024 * 1024, 0);
        let logs = crate::logs::LogSink::discard();
        let start = provider.start(spec(), &machine, Some(Duration::from_millis(600)), &logs);
        assert!(matches!(start.await, Err(CallError::Timeout { .. })));
        let cancels = calls(dir.path(), "scancel");
        assert_eq!(cancels.first().map(String::as_str), Some("99"), "{cancels:?}");
    }
}
