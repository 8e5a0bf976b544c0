//! What a worker process is granted, and nothing else.
//!
//! This crate owns the two things the engine does to a worker process beyond running it:
//!
//! * **Limits** ([`Limits`]), applied through a cgroup of the worker's own ([`WorkerCgroup`]), on cgroup v2 or on the
//!   v1 `cpu`, `memory` and `pids` controllers:
//!   - CPU: a CFS quota of `cpus` cores per 100 ms period;
//!   - memory: a hard limit of `memory_bytes`, swap included where the kernel accounts it;
//!   - processes: at most `pids` tasks (threads count).
//!
//!   - devices (cgroup v1's `devices` controller, where mounted; [`WorkerCgroup::allow_devices_only`]): a jailed
//!     worker may open only the devices of its jail's `/dev` and, for a GPU worker, its own GPUs' nodes. cgroup v2
//!     needs an eBPF program for this, which is not loaded: there the jail's `/dev` alone bounds devices.
//!
//!   A worker whose cgroup records an OOM kill is reported as having exceeded its machine type; on v2 an OOM kill
//!   takes the whole cgroup (`memory.oom.group`). A cgroup is removed only after every process in it is killed
//!   (`cgroup.kill` on v2, else each pid of `cgroup.procs`), and an engine that starts removes the cgroups (and
//!   what still runs in them) of engines that died.
//! * **Process attributes** ([`ProcessSetup`]), applied between `fork` and `exec`:
//!   - a session and process group of its own (`setsid`), so the terminal's Ctrl-C reaches the client, never the
//!     worker, and the engine stops the worker's whole process tree by killing the group;
//!   - `PR_SET_PDEATHSIG = SIGKILL`, so a worker never outlives the process that started it;
//!   - membership of its cgroup before the first instruction of Python runs;
//!   - no inherited descriptor besides stdio but the frame socket, as fd 3, and a jailed process's seccomp filter
//!     (which bubblewrap reads and closes before the program starts).
//!
//! * **A view of the system** ([`Jail`]), for workers and environment builds of other users (the server):
//!   bubblewrap namespaces, a read-only environment, a private `/tmp`, a hostname of its own, the user's own
//!   unprivileged uid; its module doc lists every grant and denial.
//! * **A system call filter** ([`seccomp_filter_fd`]) for every jailed process: a seccomp denylist of the btrfs
//!   ioctls that make subvolumes and snapshots, which would escape a user's storage quota; its module doc says why.
//! * **GPUs** ([`NvidiaGpus`]): this host's NVIDIA GPUs as the driver lists them, and what a jailed process given
//!   some of them is granted ([`GpuGrant`]): its own device nodes, the driver's control devices, the driver's
//!   `/proc` entries narrowed to its GPUs; its module doc lists every grant.
//! * **A network of its own** ([`NetworkManager`]): a network namespace per jailed process, with loopback only or
//!   egress to public addresses through a veth and the server's nftables table; its module doc lists what is
//!   reachable.
//!
//! Where cgroups cannot be written (no root, no delegated v2 hierarchy) [`CgroupManager::detect`] says why, and the
//! caller decides to run unlimited. On the local host no jail is used: the worker runs as the calling user, with
//! the user's own view of the system.

mod cgroup;
mod gpu;
mod jail;
mod network;
mod process;
mod seccomp;

pub use crate::cgroup::{usage_of, CgroupManager, CgroupVersion, DeviceControl, Limits, Usage, WorkerCgroup};
pub use crate::gpu::{CharDevice, GpuGrant, NvidiaGpu, NvidiaGpus};
pub use crate::jail::{Grants, Jail, JailNetwork, JAIL_DEVICES};
pub use crate::network::{host_resolver, Egress, Ipv4Net, Namespace, NetworkManager, NetworkPolicy};
pub use crate::process::ProcessSetup;
pub use crate::seccomp::{filter_fd as seccomp_filter_fd, program as seccomp_program, DENIED_IOCTLS};

/// Why the sandbox could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cgroup limits are unavailable: {0}")]
    Unavailable(String),
    #[error("cannot make the jail's system call filter: {0}")]
    Seccomp(String),
    #[error("could not {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}
