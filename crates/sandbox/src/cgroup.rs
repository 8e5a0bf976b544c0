//! cgroup v1 and v2: finding the hierarchy, creating one cgroup per worker, reading back OOM kills, and (cgroup v1's
//! `devices` controller, where it is mounted) the devices a jailed worker may open.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::gpu::CharDevice;
use crate::SandboxError;

/// CFS period used for CPU quotas: 100 ms, the kernel's default.
const CPU_PERIOD_US: u64 = 100_000;
/// Directory, below the hierarchy (v2) or below our own cgroup (v1), that holds the workers' cgroups.
const BASE_NAME: &str = "fal-serverless";

/// The ceilings of one worker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// CPU cores, as a quota of CPU time per period (0.25 = a quarter of one core).
    pub cpus: f64,
    pub memory_bytes: u64,
    pub pids: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// The cgroup hierarchy this process may create worker cgroups in.
#[derive(Debug)]
pub struct CgroupManager {
    version: CgroupVersion,
    /// v2: one directory; v1: one per controller (memory, cpu, pids, and devices where it is mounted).
    bases: Vec<(Controller, PathBuf)>,
}

/// Numbers this process's worker cgroups (`<pid>-<n>`): one count for every manager of the process, so that two
/// never make the same cgroup.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Controller {
    Unified,
    Memory,
    Cpu,
    Pids,
    Devices,
}

impl Controller {
    fn v1_name(self) -> &'static str {
        match self {
            Controller::Unified => "",
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Pids => "pids",
            Controller::Devices => "devices",
        }
    }
}

impl CgroupManager {
    /// Finds a writable hierarchy: v2 where its controllers are enabled, else v1's memory, cpu and pids
    /// controllers. Returns [`SandboxError::Unavailable`] with the reason when neither can be written.
    pub fn detect() -> Result<Self, SandboxError> {
        let mountinfo =
            fs::read_to_string("/proc/self/mountinfo").map_err(|e| io("read", "/proc/self/mountinfo", e))?;
        let own = fs::read_to_string("/proc/self/cgroup").map_err(|e| io("read", "/proc/self/cgroup", e))?;
        let mounts = parse_mountinfo(&mountinfo);

        let mut reasons = Vec::new();
        if let Some(root) = mounts.iter().find(|m| m.fstype == "cgroup2").map(|m| m.mount_point.clone()) {
            match Self::setup_v2(&root) {
                Ok(manager) => return Ok(manager),
                Err(reason) => reasons.push(format!("cgroup v2 at {}: {reason}", root.display())),
            }
        }
        match Self::setup_v1(&mounts, &own) {
            Ok(manager) => return Ok(manager),
            Err(reason) => reasons.push(format!("cgroup v1: {reason}")),
        }
        Err(SandboxError::Unavailable(reasons.join("; ")))
    }

    fn setup_v2(root: &Path) -> Result<Self, String> {
        let controllers = fs::read_to_string(root.join("cgroup.controllers")).map_err(|e| e.to_string())?;
        let available: Vec<&str> = controllers.split_whitespace().collect();
        for needed in ["cpu", "memory", "pids"] {
            if !available.contains(&needed) {
                return Err(format!("controller {needed} is not enabled (have: {})", controllers.trim()));
            }
        }
        // Worker cgroups sit below the root, which is exempt from the no-internal-processes rule, so enabling the
        // controllers for our subtree does not require moving any process.
        let base = root.join(BASE_NAME);
        enable_v2_controllers(root).map_err(|e| e.to_string())?;
        mkdir(&base).map_err(|e| e.to_string())?;
        writable(&base)?;
        enable_v2_controllers(&base).map_err(|e| e.to_string())?;
        let manager = Self { version: CgroupVersion::V2, bases: vec![(Controller::Unified, base)] };
        manager.remove_stale();
        Ok(manager)
    }

    fn setup_v1(mounts: &[Mount], own: &str) -> Result<Self, String> {
        let bases = v1_bases(mounts, own)?;
        for (_, base) in &bases {
            mkdir(base).map_err(|e| format!("cannot create {}: {e}", base.display()))?;
            writable(base)?;
        }
        let manager = Self { version: CgroupVersion::V1, bases };
        manager.remove_stale();
        Ok(manager)
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// Creates a cgroup for one worker with `limits` applied. The worker joins it through [`crate::ProcessSetup`].
    pub fn create(&self, limits: &Limits) -> Result<WorkerCgroup, SandboxError> {
        let name = format!("{}-{}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let mut cgroup = WorkerCgroup { version: self.version, dirs: Vec::new(), procs: Vec::new() };
        for (controller, base) in &self.bases {
            let dir = base.join(&name);
            mkdir(&dir).map_err(|e| io("create", &dir, e))?;
            cgroup.dirs.push((*controller, dir.clone()));
            apply_limits(*controller, &dir, limits)?;
            let procs = dir.join("cgroup.procs");
            let file = OpenOptions::new().write(true).open(&procs).map_err(|e| io("open", &procs, e))?;
            cgroup.procs.push(file);
        }
        Ok(cgroup)
    }

    /// Removes the worker cgroups of engines that no longer exist (a `kill -9`'d client or server), with whatever
    /// they left running: a dead engine's worker died with it (`PR_SET_PDEATHSIG`), but its worker's children did not,
    /// and nothing else stops them.
    fn remove_stale(&self) {
        for (controller, base) in &self.bases {
            let Ok(entries) = fs::read_dir(base) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let owner = name.to_str().and_then(|n| n.split('-').next()).and_then(|p| p.parse::<i32>().ok());
                if owner.is_some_and(|pid| !process_exists(pid)) {
                    kill_and_remove(self.version, &[(*controller, entry.path())], STALE_REMOVE_WITHIN);
                }
            }
        }
    }
}

/// Whether a process `pid` exists (of any user).
fn process_exists(pid: i32) -> bool {
    // SAFETY: kill with signal 0 sends nothing; it only asks whether the pid exists.
    let found = unsafe { libc::kill(pid, 0) } == 0;
    // EPERM: it exists, as another user's.
    found || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Where worker cgroups go on v1: for each controller, below our own cgroup in that controller's hierarchy, so
/// whatever limits the caller lives under still bind its workers. memory, cpu and pids are needed; devices is used
/// where it is mounted (without it, a jailed worker's devices are bounded by its jail's `/dev` alone).
fn v1_bases(mounts: &[Mount], own: &str) -> Result<Vec<(Controller, PathBuf)>, String> {
    let mut bases = [Controller::Memory, Controller::Cpu, Controller::Pids]
        .into_iter()
        .map(|controller| {
            v1_base(mounts, own, controller)
                .ok_or_else(|| format!("the {} controller is not mounted", controller.v1_name()))
        })
        .collect::<Result<Vec<_>, String>>()?;
    bases.extend(v1_base(mounts, own, Controller::Devices));
    Ok(bases)
}

fn v1_base(mounts: &[Mount], own: &str, controller: Controller) -> Option<(Controller, PathBuf)> {
    let name = controller.v1_name();
    let mount = mounts.iter().find(|m| m.fstype == "cgroup" && m.super_options.split(',').any(|o| o == name))?;
    // /proc/self/cgroup lines: `hierarchy-id:controller,controller:/path`.
    let own_path = own
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':').skip(1);
            fields.next().zip(fields.next())
        })
        .find(|(controllers, _)| controllers.split(',').any(|c| c == name))
        .map(|(_, path)| path.trim_start_matches('/'))
        .unwrap_or("");
    Some((controller, mount.mount_point.join(own_path).join(BASE_NAME)))
}

/// What the cgroup of a process has used: CPU time since it was made, and memory now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
}

/// What the cgroup process `pid` is in has used (a worker's: it is alone in its own), read from cgroup v2's
/// `cpu.stat` and `memory.current`, or v1's `cpuacct.usage` and `memory.usage_in_bytes`. `None` if the process
/// is gone or its cgroup cannot be read.
pub fn usage_of(pid: u32) -> Option<Usage> {
    let mounts = parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").ok()?);
    let membership = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path_of = |name: &str| {
        membership.lines().find_map(|line| {
            let mut fields = line.splitn(3, ':').skip(1);
            let (controllers, path) = fields.next().zip(fields.next())?;
            let matches =
                if name.is_empty() { controllers.is_empty() } else { controllers.split(',').any(|c| c == name) };
            matches.then(|| path.trim_start_matches('/').to_string())
        })
    };
    let read = |dir: &Path, file: &str| fs::read_to_string(dir.join(file)).ok();
    let v1 = |name: &str| {
        let mount = mounts.iter().find(|m| m.fstype == "cgroup" && m.super_options.split(',').any(|o| o == name))?;
        Some(mount.mount_point.join(path_of(name)?))
    };
    if let Some(memory) = v1("memory") {
        let memory_bytes = read(&memory, "memory.usage_in_bytes")?.trim().parse().ok()?;
        // cpuacct counts the worker's CPU time only where the worker's cgroup is in it (it is mounted with cpu, as
        // systemd does): else its time is summed over the processes of its cgroup.
        let accounted = (path_of("cpuacct") == path_of("memory")).then(|| v1("cpuacct")).flatten();
        let cpu_seconds = match accounted.and_then(|cpu| read(&cpu, "cpuacct.usage")) {
            Some(nanos) => nanos.trim().parse::<f64>().ok()? / 1e9,
            None => processes_cpu_seconds(&read(&memory, "cgroup.procs")?),
        };
        return Some(Usage { cpu_seconds, memory_bytes });
    }
    let unified = mounts.iter().find(|m| m.fstype == "cgroup2")?.mount_point.join(path_of("")?);
    let memory_bytes = read(&unified, "memory.current")?.trim().parse().ok()?;
    let stat = read(&unified, "cpu.stat")?;
    let micros: f64 = stat.lines().find_map(|l| l.strip_prefix("usage_usec "))?.trim().parse().ok()?;
    Some(Usage { cpu_seconds: micros / 1e6, memory_bytes })
}

/// The CPU time (user and system, their waited-for children's included) of the processes listed in `procs`.
fn processes_cpu_seconds(procs: &str) -> f64 {
    // SAFETY: sysconf reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    procs
        .split_whitespace()
        .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command (which may hold spaces) in parentheses: utime is the 12th, then stime,
            // cutime, cstime.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11..15)?.iter().filter_map(|f| f.parse::<f64>().ok()).sum::<f64>())
        })
        .sum::<f64>()
        / ticks
}

/// Whether the kernel enforces a cgroup's device list, and if not, why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceControl {
    Enforced,
    NotEnforced(&'static str),
}

/// How long removing a worker's cgroup may wait for its processes to be gone (a fork bomb's thousand children take a
/// moment to be reaped).
const REMOVE_WITHIN: Duration = Duration::from_secs(10);
/// The same for a dead engine's cgroups, removed while a new engine starts: less, so a start is never held long.
const STALE_REMOVE_WITHIN: Duration = Duration::from_secs(2);

/// The cgroup of one worker; removed when dropped, after every process still in it has been killed. Dropping it may
/// block for a moment: drop it on a blocking thread.
#[derive(Debug)]
pub struct WorkerCgroup {
    version: CgroupVersion,
    dirs: Vec<(Controller, PathBuf)>,
    /// `cgroup.procs` of each directory, opened before fork so the child joins without allocating.
    procs: Vec<File>,
}

impl WorkerCgroup {
    pub(crate) fn procs_files(&self) -> impl Iterator<Item = &File> {
        self.procs.iter()
    }

    /// Lets the cgroup's processes open (read and write) the character devices in `allowed` and no other device:
    /// cgroup v1's `devices` controller, denying all, then allowing each. Call before a process joins. On cgroup v2
    /// device control needs an eBPF program, which this crate does not load; there, and where v1's controller is
    /// not mounted, nothing is written and the jail's `/dev` alone bounds the devices.
    pub fn allow_devices_only(&self, allowed: &[CharDevice]) -> Result<DeviceControl, SandboxError> {
        if self.version == CgroupVersion::V2 {
            return Ok(DeviceControl::NotEnforced("cgroup v2 controls devices only through an eBPF program"));
        }
        let Some((_, dir)) = self.dirs.iter().find(|(c, _)| *c == Controller::Devices) else {
            return Ok(DeviceControl::NotEnforced("the cgroup v1 devices controller is not mounted"));
        };
        write(dir, "devices.deny", "a")?;
        // The kernel takes one rule per write.
        for device in allowed {
            write(dir, "devices.allow", &format!("{device} rw"))?;
        }
        Ok(DeviceControl::Enforced)
    }

    /// Whether the kernel's OOM killer has killed a process of this cgroup.
    pub fn oom_killed(&self) -> bool {
        let (file, key) = match self.version {
            CgroupVersion::V2 => ("memory.events", "oom_kill"),
            CgroupVersion::V1 => ("memory.oom_control", "oom_kill"),
        };
        self.dirs
            .iter()
            .filter(|(c, _)| matches!(c, Controller::Unified | Controller::Memory))
            .filter_map(|(_, dir)| fs::read_to_string(dir.join(file)).ok())
            .any(|text| {
                text.lines().any(|line| {
                    let mut parts = line.split_whitespace();
                    parts.next() == Some(key) && parts.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0) > 0
                })
            })
    }
}

impl Drop for WorkerCgroup {
    fn drop(&mut self) {
        self.procs.clear();
        kill_and_remove(self.version, &self.dirs, REMOVE_WITHIN);
    }
}

/// Kills every process in a worker's cgroup, then removes its directories (one on v2, one per controller on v1).
///
/// Every process is killed first, not only the worker: its children too, wherever they went (a daemon that left the
/// worker's session, a fork bomb's sleepers), since none can leave the cgroup. The kernel refuses to remove a cgroup
/// while a task remains, and killed tasks take a moment to be reaped: the kill is repeated until the directories go,
/// or `within` has passed (then a warning names what is left).
fn kill_and_remove(version: CgroupVersion, dirs: &[(Controller, PathBuf)], within: Duration) {
    let deadline = Instant::now() + within;
    kill_all(version, dirs);
    for (_, dir) in dirs {
        loop {
            match fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() > deadline => {
                    tracing::warn!("could not remove cgroup {}: {e}", dir.display());
                    break;
                }
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(5));
                    kill_all(version, dirs);
                }
            }
        }
    }
}

/// Sends SIGKILL to every process in the cgroup.
///
/// v2: `cgroup.kill` (Linux 5.14+) kills the whole subtree at once, atomically. Older v2 kernels: the cgroup is
/// frozen (`cgroup.freeze`, 5.2+) so that nothing in it can fork while its pids are read and killed, then thawed
/// (frozen tasks die of SIGKILL on v2 all the same). v1 (no freezer of ours): each pid of `cgroup.procs` is killed;
/// a child forked meanwhile is caught by the next round, which [`kill_and_remove`] repeats until the cgroup is
/// empty (the pids limit bounds how many a fork loop can make).
fn kill_all(version: CgroupVersion, dirs: &[(Controller, PathBuf)]) {
    if version == CgroupVersion::V2 {
        if let Some((_, dir)) = dirs.first() {
            if fs::write(dir.join("cgroup.kill"), "1").is_ok() {
                return;
            }
            let frozen = fs::write(dir.join("cgroup.freeze"), "1").is_ok();
            kill_listed(dir);
            if frozen {
                let _ = fs::write(dir.join("cgroup.freeze"), "0");
            }
            return;
        }
    }
    for (_, dir) in dirs {
        kill_listed(dir);
    }
}

fn kill_listed(dir: &Path) {
    let Ok(pids) = fs::read_to_string(dir.join("cgroup.procs")) else { return };
    for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()).filter(|&pid| pid > 1) {
        // SAFETY: kill sends a signal and touches no memory; the pid is in a cgroup only our workers join, and a pid
        // listed there cannot be reused before it is reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn apply_limits(controller: Controller, dir: &Path, limits: &Limits) -> Result<(), SandboxError> {
    let quota = ((limits.cpus * CPU_PERIOD_US as f64).round() as u64).max(1000);
    match controller {
        Controller::Unified => {
            write(dir, "memory.max", &limits.memory_bytes.to_string())?;
            write_optional(dir, "memory.swap.max", "0");
            // An OOM kill takes the whole cgroup (Linux 4.19+): a worker whose child was killed for memory (a
            // DataLoader's, a pool's) would otherwise wait for it forever, and is reported as over its machine type.
            write_optional(dir, "memory.oom.group", "1");
            write(dir, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
            write(dir, "pids.max", &limits.pids.to_string())?;
        }
        Controller::Memory => {
            write(dir, "memory.limit_in_bytes", &limits.memory_bytes.to_string())?;
            // Only present where swap accounting is on; without it there is no swap to bound.
            write_optional(dir, "memory.memsw.limit_in_bytes", &limits.memory_bytes.to_string());
        }
        Controller::Cpu => {
            write(dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
            write(dir, "cpu.cfs_quota_us", &quota.to_string())?;
        }
        Controller::Pids => write(dir, "pids.max", &limits.pids.to_string())?,
        // A new cgroup inherits its parent's device list; [`WorkerCgroup::allow_devices_only`] narrows it.
        Controller::Devices => {}
    }
    Ok(())
}

fn enable_v2_controllers(dir: &Path) -> std::io::Result<()> {
    let current = fs::read_to_string(dir.join("cgroup.subtree_control"))?;
    let missing: Vec<String> = ["cpu", "memory", "pids"]
        .iter()
        .filter(|c| !current.split_whitespace().any(|have| have == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    OpenOptions::new().write(true).open(dir.join("cgroup.subtree_control"))?.write_all(missing.join(" ").as_bytes())
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), SandboxError> {
    let path = dir.join(file);
    OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| io("write", &path, e))
}

fn write_optional(dir: &Path, file: &str, value: &str) {
    let _ = OpenOptions::new().write(true).open(dir.join(file)).and_then(|mut f| f.write_all(value.as_bytes()));
}

/// Whether this process may create worker cgroups in `base`: a base another user made (a root server's, found by an
/// unprivileged one) exists, but is not ours to write.
fn writable(base: &Path) -> Result<(), String> {
    let path = std::ffi::CString::new(base.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{} is not a valid path", base.display()))?;
    // SAFETY: access reads the NUL-terminated path and touches no other memory.
    if unsafe { libc::access(path.as_ptr(), libc::W_OK) } == 0 {
        Ok(())
    } else {
        Err(format!("cannot write {}: {}", base.display(), std::io::Error::last_os_error()))
    }
}

fn mkdir(dir: &Path) -> std::io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> SandboxError {
    SandboxError::Io { action, path: path.into(), source }
}

#[derive(Debug, PartialEq)]
struct Mount {
    mount_point: PathBuf,
    fstype: String,
    super_options: String,
}

/// Parses `/proc/self/mountinfo`: `id parent major:minor root mount-point options [optional...] - fstype source super`.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            let mut right = right.split_whitespace();
            let fstype = right.next()?.to_string();
            let super_options = right.nth(1).unwrap_or("").to_string();
            Some(Mount { mount_point: unescape_octal(mount_point).into(), fstype, super_options })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            out.push((bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
30 25 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:5 - cgroup2 cgroup2 rw
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid shared:9 - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
37 30 0:33 / /mnt/with\\040space rw - ext4 /dev/vda rw";

    #[test]
    fn a_process_cpu_time_is_read_from_proc() {
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(200) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let seconds = processes_cpu_seconds(&format!("{}\n", std::process::id()));
        assert!(seconds >= 0.1, "{seconds}");
        assert_eq!(processes_cpu_seconds("999999999\n"), 0.0);
    }

    #[test]
    fn mountinfo_yields_type_point_and_controllers() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts.len(), 5);
        assert_eq!(mounts[1].fstype, "cgroup2");
        assert_eq!(mounts[1].mount_point, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(mounts[3].super_options, "rw,cpu,cpuacct");
        assert_eq!(mounts[4].mount_point, PathBuf::from("/mnt/with space"));
    }

    #[test]
    fn v1_nests_below_own_cgroup_per_controller() {
        let mut mounts = parse_mountinfo(MOUNTINFO);
        let own = "4:memory:/job\n1:cpu,cpuacct:/\n2:pids:/job/step\n";
        // The pids controller is missing from this mount table: v1 must refuse and say which.
        let err = v1_bases(&mounts, own).unwrap_err();
        assert!(err.contains("pids"), "{err}");

        mounts.extend(parse_mountinfo("38 30 0:34 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids"));
        let bases: Vec<PathBuf> = v1_bases(&mounts, own).unwrap().into_iter().map(|(_, p)| p).collect();
        assert_eq!(
            bases,
            [
                "/sys/fs/cgroup/memory/job/fal-serverless",
                "/sys/fs/cgroup/cpu,cpuacct/fal-serverless",
                "/sys/fs/cgroup/pids/job/step/fal-serverless"
            ]
            .map(PathBuf::from)
        );
        // The devices controller is used where it is mounted, and its absence refuses nothing.
        mounts.extend(parse_mountinfo("39 30 0:35 / /sys/fs/cgroup/devices rw - cgroup cgroup rw,devices"));
        let bases = v1_bases(&mounts, &format!("{own}5:devices:/job\n")).unwrap();
        assert_eq!(bases.len(), 4);
        assert_eq!(bases[3], (Controller::Devices, PathBuf::from("/sys/fs/cgroup/devices/job/fal-serverless")));
    }

    // --- on this host's own cgroups: run as root only (CI is); elsewhere they say so and pass ---------------------

    fn as_root(test: &str) -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("{test}: skipped, needs root to make cgroups");
        }
        root
    }

    /// Starts `sh -c 'sleep 60 & sleep 60'` in `cgroup`; returns the shell, once its child is in the cgroup too.
    fn tree_in(cgroup: &WorkerCgroup, procs: &Path) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let setup = crate::ProcessSetup::new(None, Some(cgroup));
        let mut command = std::process::Command::new("sh");
        command.args(["-c", "sleep 60 & sleep 60"]);
        // SAFETY: `apply` only makes async-signal-safe system calls on descriptors that outlive the spawn.
        unsafe { command.pre_exec(move || setup.apply()) };
        let shell = command.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        // At least the shell (or the last command, which dash execs in its place) and the backgrounded sleep.
        while fs::read_to_string(procs).unwrap().lines().count() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        shell
    }

    fn gone(pid: i32) -> bool {
        // A zombie (reparented to an init that has not reaped it yet) is gone for our purposes.
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| stat.rsplit(')').next().unwrap_or("").split_whitespace().next() == Some("Z"))
            .unwrap_or(true)
    }

    fn pids(procs: &Path) -> Vec<i32> {
        fs::read_to_string(procs).unwrap().lines().map(|p| p.parse().unwrap()).collect()
    }

    #[test]
    fn dropping_a_cgroup_kills_every_process_in_it_then_removes_it() {
        if !as_root("dropping_a_cgroup_kills_every_process_in_it_then_removes_it") {
            return;
        }
        let mut cases = Vec::new();
        if let Ok(manager) = CgroupManager::detect() {
            let cgroup = manager.create(&Limits { cpus: 0.5, memory_bytes: 256 << 20, pids: 64 }).unwrap();
            let procs = cgroup.dirs.last().unwrap().1.join("cgroup.procs");
            cases.push((cgroup, procs));
        }
        // cgroup v2's own kill (`cgroup.kill`), where a v2 hierarchy is mounted: no controller is needed for it.
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        if let Some(v2) = parse_mountinfo(&mountinfo).into_iter().find(|m| m.fstype == "cgroup2") {
            let dir = v2.mount_point.join(format!("fal-serverless-unit-{}", std::process::id()));
            mkdir(&dir).unwrap();
            let procs = dir.join("cgroup.procs");
            let file = OpenOptions::new().write(true).open(&procs).unwrap();
            let cgroup =
                WorkerCgroup { version: CgroupVersion::V2, dirs: vec![(Controller::Unified, dir)], procs: vec![file] };
            cases.push((cgroup, procs));
        }
        assert!(!cases.is_empty(), "no cgroup hierarchy to test with");
        for (cgroup, procs) in cases {
            let version = cgroup.version;
            let mut shell = tree_in(&cgroup, &procs);
            let tree = pids(&procs);
            assert!(tree.len() >= 2, "{version:?}: {tree:?}");
            drop(cgroup);
            let _ = shell.wait();
            assert!(tree.iter().all(|&pid| gone(pid)), "{version:?}: {tree:?} outlived their cgroup");
            assert!(!procs.parent().unwrap().exists(), "{version:?}: the cgroup is still there");
        }
    }

    #[test]
    fn a_starting_manager_removes_a_dead_engines_cgroups_with_what_runs_in_them() {
        if !as_root("a_starting_manager_removes_a_dead_engines_cgroups_with_what_runs_in_them") {
            return;
        }
        let Ok(manager) = CgroupManager::detect() else { return };
        // A pid that no longer exists: a process that has been waited for.
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        dead.wait().unwrap();
        let mut stale = manager.create(&Limits { cpus: 0.5, memory_bytes: 256 << 20, pids: 64 }).unwrap();
        let renamed: Vec<(Controller, PathBuf)> =
            stale.dirs.iter().map(|(c, dir)| (*c, dir.with_file_name(format!("{}-0", dead.id())))).collect();
        for ((_, from), (_, to)) in stale.dirs.iter().zip(&renamed) {
            fs::rename(from, to).unwrap();
        }
        stale.dirs = renamed.clone();
        let procs = renamed.last().unwrap().1.join("cgroup.procs");
        let mut shell = tree_in(&stale, &procs);
        let tree = pids(&procs);
        // Left as a killed engine leaves it: nothing removes it but the next manager.
        std::mem::forget(stale);
        drop(CgroupManager::detect().unwrap());
        let _ = shell.wait();
        assert!(tree.iter().all(|&pid| gone(pid)), "{tree:?} outlived their dead engine's cgroup");
        assert!(renamed.iter().all(|(_, dir)| !dir.exists()), "the dead engine's cgroup is still there");
    }
}
