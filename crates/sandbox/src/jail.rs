//! The jail: a process's view of the system, built with bubblewrap.
//!
//! Granted, read-only: the system's programs and libraries (`/usr`, and `/bin`, `/lib`, `/lib64`, `/sbin` as the
//! usual links into it), `/etc`, and the paths the caller names, each at its real path: the engine names the
//! interpreter's installation, the worker's own environment and, for dill workers, the dill layer's packages.
//! Granted, writable: a private, empty `/tmp` (also `HOME`; mode 1777) and `/dev/shm`, which vanish with the process, and the
//! paths the caller names as writable (an environment build's staging dir and its user's build cache), and host
//! directories the caller binds read-write at other paths ([`Grants::binds`]: a worker's user's persistent storage
//! at `/data`; never an environment build's). Granted: a
//! fresh `/proc` of its own PID namespace, a minimal `/dev`, a hostname of its own, and a network namespace of its
//! own: loopback only, or the one the caller made for it (see `network.rs`), with that namespace's `resolv.conf`, and
//! the `/etc/hosts` the caller names (a worker's: the name of the server's listener on its namespace's loopback).
//! Granted to a process given GPUs, and to no other: its own GPUs' device nodes, the driver's control devices, the
//! driver's `/proc/driver/nvidia` narrowed to its GPUs and the `/sys` entries CUDA reads (the list: `gpu.rs`).
//!
//! Denied: every other path (the server's data dir, other environments, users' homes), the host's processes (a PID
//! namespace of its own: nothing outside can be seen or signalled), the host's network, IPC and hostname namespaces,
//! every capability, and the server's identity: bubblewrap sets up the view as root, then `setpriv` switches to the
//! process's unprivileged user (a uid per user, never the server's), clears the capability bounding set and
//! inheritable capabilities, and sets no-new-privileges before the program starts. Every device but those of the
//! minimal `/dev` ([`JAIL_DEVICES`]) and a GPU process's own ([`GpuGrant`]): absent from its `/dev`, and, where the
//! caller applies them to the process's cgroup (cgroup v1's `devices` controller), refused by the kernel too. The
//! btrfs ioctls that make subvolumes and snapshots, by a seccomp filter bubblewrap loads where the caller gives one
//! ([`Grants::seccomp`]; the list and why: `seccomp.rs`): a subvolume inside `/data` would escape its user's quota.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use crate::gpu::{CharDevice, GpuGrant};

/// The character devices of the jail's minimal `/dev` (bubblewrap's `--dev`): `null`, `zero`, `full`, `random`,
/// `urandom`, `tty`, `ptmx` and its own pseudo-terminals. A device cgroup allows these and a GPU process's own.
pub const JAIL_DEVICES: &[CharDevice] = &[
    CharDevice { major: 1, minor: Some(3) },
    CharDevice { major: 1, minor: Some(5) },
    CharDevice { major: 1, minor: Some(7) },
    CharDevice { major: 1, minor: Some(8) },
    CharDevice { major: 1, minor: Some(9) },
    CharDevice { major: 5, minor: Some(0) },
    CharDevice { major: 5, minor: Some(2) },
    // Unix98 pty slaves (`/dev/pts/N`) use majors 136 to 143.
    CharDevice { major: 136, minor: None },
    CharDevice { major: 137, minor: None },
    CharDevice { major: 138, minor: None },
    CharDevice { major: 139, minor: None },
    CharDevice { major: 140, minor: None },
    CharDevice { major: 141, minor: None },
    CharDevice { major: 142, minor: None },
    CharDevice { major: 143, minor: None },
];

/// Where the jail's tools are.
#[derive(Debug, Clone)]
pub struct Jail {
    pub bwrap: PathBuf,
    pub setpriv: PathBuf,
}

/// What one jailed process is granted beyond the fixed set above.
#[derive(Debug, Clone, Copy)]
pub struct Grants<'a> {
    /// Visible read-only at their real paths.
    pub read_only: &'a [&'a Path],
    /// Visible writable at their real paths (they must exist).
    pub writable: &'a [&'a Path],
    /// Host directories (they must exist) visible writable at another path: `(host, at)`. `at` must be absolute and
    /// outside the paths above; its missing parents are created walkable (mode 0755) and empty.
    pub binds: &'a [(&'a Path, &'a Path)],
    pub uid: u32,
    pub gid: u32,
    pub hostname: &'a str,
    pub network: JailNetwork,
    /// A file to show as `/etc/resolv.conf`.
    pub resolv_conf: Option<&'a Path>,
    /// A file to show as `/etc/hosts` (a worker's: the name it reaches its server by).
    pub hosts: Option<&'a Path>,
    /// GPUs given to this process: their device nodes and the driver's control devices bound read-write, the
    /// driver's `/proc/driver/nvidia` shown narrowed to them, the `/sys` entries CUDA reads read-only, and the
    /// driver's library dir where it is outside the system's. `None`: no GPU, no device beyond the minimal `/dev`.
    pub gpus: Option<&'a GpuGrant>,
    /// The descriptor the child inherits its system call filter on ([`crate::seccomp_filter_fd`], passed on with
    /// [`crate::ProcessSetup::inheriting`]): bubblewrap loads it (`--seccomp`) just before the program starts. Every
    /// jail of this host's workers and builds has one; `None` only where no descriptor can be handed over (a Slurm
    /// job's script, whose workers have no `/data`).
    pub seccomp: Option<RawFd>,
}

/// The network a jailed process has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JailNetwork {
    /// A namespace of its own with loopback only, made by the jail.
    Loopback,
    /// A namespace of its own that the caller made and put the process in before the jail starts.
    Joined,
    /// The host's (a Slurm node's: the cluster's network policy applies there).
    Host,
}

impl Jail {
    /// bubblewrap and setpriv from `PATH`.
    pub fn from_path() -> Option<Self> {
        Some(Self { bwrap: which("bwrap")?, setpriv: which("setpriv")? })
    }

    /// The program and arguments that run `program args...` inside the jail with `grants`.
    pub fn wrap(&self, grants: &Grants<'_>, program: &Path, args: &[&str]) -> (PathBuf, Vec<String>) {
        let mut argv: Vec<String> = [
            "--die-with-parent",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--ro-bind",
            "/usr",
            "/usr",
            "--ro-bind",
            "/etc",
            "/etc",
            // Writable by the unprivileged user as on any host (tempfile, which dill imports, needs it).
            "--perms",
            "01777",
            "--tmpfs",
            "/tmp",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            // POSIX semaphores and shared memory (multiprocessing, DataLoader workers): private, like /tmp.
            "--perms",
            "01777",
            "--tmpfs",
            "/dev/shm",
            "--chdir",
            "/tmp",
            "--setenv",
            "HOME",
            "/tmp",
        ]
        .map(String::from)
        .to_vec();
        argv.extend(["--hostname".into(), grants.hostname.to_string()]);
        if grants.network == JailNetwork::Loopback {
            argv.push("--unshare-net".into());
        }
        if let Some(fd) = grants.seccomp {
            argv.extend(["--seccomp".into(), fd.to_string()]);
        }
        if let Some(resolv_conf) = grants.resolv_conf {
            argv.extend(["--ro-bind".into(), resolv_conf.display().to_string(), "/etc/resolv.conf".into()]);
        }
        if let Some(hosts) = grants.hosts {
            argv.extend(["--ro-bind".into(), hosts.display().to_string(), "/etc/hosts".into()]);
        }
        if let Some(gpus) = grants.gpus {
            for device in &gpus.devices {
                argv.extend(["--dev-bind".into(), device.display().to_string(), device.display().to_string()]);
            }
            // An empty /proc/driver/nvidia over the PID namespace's /proc, then the driver's files and this process's
            // GPUs' entries alone: the other GPUs' entries are not listed.
            if !gpus.driver_proc.is_empty() {
                argv.extend(["--tmpfs".into(), "/proc/driver/nvidia".into()]);
                argv.extend(["--dir".into(), "/proc/driver/nvidia/gpus".into()]);
            }
            for (host, jailed) in &gpus.driver_proc {
                argv.extend(["--ro-bind".into(), host.display().to_string(), jailed.display().to_string()]);
            }
            if let Some(path) = &gpus.library_path {
                argv.extend(["--setenv".into(), "LD_LIBRARY_PATH".into(), path.display().to_string()]);
            }
        }
        for link in ["bin", "lib", "lib64", "sbin"] {
            let path = Path::new("/").join(link);
            if let Ok(target) = std::fs::read_link(&path) {
                argv.extend(["--symlink".into(), target.display().to_string(), path.display().to_string()]);
            } else if path.is_dir() {
                argv.extend(["--ro-bind".into(), path.display().to_string(), path.display().to_string()]);
            }
        }
        // Bound paths show their whole subtree; created directories (and the /tmp tmpfs) are empty but for what is
        // bound below them.
        let mut bound: Vec<PathBuf> = ["/usr", "/etc"].map(PathBuf::from).to_vec();
        let mut created: Vec<PathBuf> = Vec::new();
        let gpu_paths = grants.gpus.map(|g| g.read_only.as_slice()).unwrap_or_default();
        let paths = grants
            .read_only
            .iter()
            .copied()
            .chain(gpu_paths.iter().map(PathBuf::as_path))
            .map(|p| (p, "--ro-bind"))
            .chain(grants.writable.iter().map(|p| (*p, "--bind")));
        for (path, how) in paths {
            // bubblewrap would create missing parents as root-only directories; the unprivileged process must be
            // able to walk through them, and see nothing else there.
            for ancestor in path.ancestors().skip(1).collect::<Vec<_>>().into_iter().rev().skip(1) {
                if created.iter().any(|c| c == ancestor) || bound.iter().any(|b| ancestor.starts_with(b)) {
                    continue;
                }
                argv.extend(["--perms".into(), "0755".into(), "--dir".into(), ancestor.display().to_string()]);
                created.push(ancestor.to_path_buf());
            }
            argv.extend([how.into(), path.display().to_string(), path.display().to_string()]);
            bound.push(path.to_path_buf());
        }
        for (host, at) in grants.binds {
            for ancestor in at.ancestors().skip(1).collect::<Vec<_>>().into_iter().rev().skip(1) {
                if created.iter().any(|c| c == ancestor) || bound.iter().any(|b| ancestor.starts_with(b)) {
                    continue;
                }
                argv.extend(["--perms".into(), "0755".into(), "--dir".into(), ancestor.display().to_string()]);
                created.push(ancestor.to_path_buf());
            }
            argv.extend(["--bind".into(), host.display().to_string(), at.display().to_string()]);
        }
        argv.extend([
            "--".into(),
            self.setpriv.display().to_string(),
            format!("--reuid={}", grants.uid),
            format!("--regid={}", grants.gid),
            "--clear-groups".into(),
            "--inh-caps=-all".into(),
            "--bounding-set=-all".into(),
            "--no-new-privs".into(),
            program.display().to_string(),
        ]);
        argv.extend(args.iter().map(|a| a.to_string()));
        (self.bwrap.clone(), argv)
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|dir| Path::new(dir).join(name)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_parents_walkable_and_each_path_read_only_once() {
        let jail = Jail { bwrap: "bwrap".into(), setpriv: "setpriv".into() };
        let python = Path::new("/opt/py/3.11");
        let env = Path::new("/var/lib/fal/envs/u1/abc");
        fn grants<'a>(read_only: &'a [&'a Path]) -> Grants<'a> {
            Grants {
                read_only,
                writable: &[],
                binds: &[],
                uid: 200_001,
                gid: 200_001,
                hostname: "worker-1a2b",
                network: JailNetwork::Loopback,
                resolv_conf: None,
                hosts: None,
                gpus: None,
                seccomp: None,
            }
        }
        let (_, argv) = jail.wrap(&grants(&[python, env]), Path::new("/var/lib/fal/envs/u1/abc/bin/python"), &["-I"]);
        let text = argv.join(" ");
        assert!(text.contains("--perms 0755 --dir /opt --perms 0755 --dir /opt/py --ro-bind /opt/py/3.11 /opt/py/3.11"));
        assert!(text.contains("--dir /var/lib/fal/envs/u1 --ro-bind /var/lib/fal/envs/u1/abc /var/lib/fal/envs/u1/abc"));
        assert_eq!(text.matches("--dir /var ").count(), 1);
        assert!(text.ends_with(
            "--reuid=200001 --regid=200001 --clear-groups --inh-caps=-all --bounding-set=-all \
                                --no-new-privs /var/lib/fal/envs/u1/abc/bin/python -I"
        ));
        // The private /tmp is writable by the unprivileged user.
        assert!(text.contains("--perms 01777 --tmpfs /tmp"));
        // Nothing of the data dir beyond the environment itself is bound.
        assert!(!text.contains("--bind /var/lib/fal "));
        // Below the private /tmp, parents are created walkable too (a data dir may live there).
        let (_, argv) = jail.wrap(&grants(&[Path::new("/tmp/data/envs/u1/abc")]), Path::new("/x"), &[]);
        assert!(argv.join(" ").contains("--dir /tmp/data --perms 0755 --dir /tmp/data/envs"));
        // Its own hostname, and a network namespace with loopback only unless it joined one.
        assert!(text.contains("--hostname worker-1a2b --unshare-net"));
        let joined =
            Grants { network: JailNetwork::Joined, resolv_conf: Some(Path::new("/run/r.conf")), ..grants(&[]) };
        let text = jail.wrap(&joined, Path::new("/x"), &[]).1.join(" ");
        assert!(!text.contains("--unshare-net") && text.contains("--ro-bind /run/r.conf /etc/resolv.conf"));
        // A worker's hosts file is shown over /etc/hosts, after /etc itself.
        let hosts = Grants { hosts: Some(Path::new("/run/hosts/default")), ..joined };
        let text = jail.wrap(&hosts, Path::new("/x"), &[]).1.join(" ");
        let (etc, shown) = (text.find("--ro-bind /etc /etc"), text.find("--ro-bind /run/hosts/default /etc/hosts"));
        assert!(etc.is_some() && shown.is_some() && etc < shown, "{text}");
        // Writable grants are bound read-write.
        let staging = [Path::new("/data/envs/u1/.tmp-abc")];
        let text = jail.wrap(&Grants { writable: &staging, ..grants(&[]) }, Path::new("/x"), &[]).1.join(" ");
        assert!(text.contains("--bind /data/envs/u1/.tmp-abc /data/envs/u1/.tmp-abc"));
        // A host dir bound at another path: read-write there, and nowhere else.
        let storage = [(Path::new("/var/lib/fal/storage/u1"), Path::new("/data"))];
        let text = jail.wrap(&Grants { binds: &storage, ..grants(&[]) }, Path::new("/x"), &[]).1.join(" ");
        assert!(text.contains("--bind /var/lib/fal/storage/u1 /data --"), "{text}");
        assert!(!text.contains("--dir /var"), "{text}");
        // The seccomp filter bubblewrap loads, by its descriptor's number.
        assert!(!text.contains("--seccomp"));
        let text = jail.wrap(&Grants { seccomp: Some(12), ..grants(&[]) }, Path::new("/x"), &[]).1.join(" ");
        assert!(text.contains("--seccomp 12 "), "{text}");
    }

    fn gpu_grant() -> GpuGrant {
        let driver = |p: &str| (PathBuf::from(p), PathBuf::from(p));
        GpuGrant {
            devices: vec!["/dev/nvidia1".into(), "/dev/nvidiactl".into()],
            driver_proc: vec![
                driver("/proc/driver/nvidia/version"),
                ("/data/run/nvidia-params".into(), "/proc/driver/nvidia/params".into()),
                driver("/proc/driver/nvidia/gpus/0000:28:00.0"),
            ],
            read_only: vec!["/sys/devices/system".into(), "/sys/bus/pci/devices".into()],
            library_path: Some("/opt/nvidia/lib64".into()),
            char_devices: Vec::new(),
        }
    }

    #[test]
    fn a_gpu_process_sees_its_own_devices_and_its_gpus_driver_entries_alone() {
        let jail = Jail { bwrap: "bwrap".into(), setpriv: "setpriv".into() };
        let base = Grants {
            read_only: &[],
            writable: &[],
            binds: &[],
            uid: 200_001,
            gid: 200_001,
            hostname: "worker-1a2b",
            network: JailNetwork::Loopback,
            resolv_conf: None,
            hosts: None,
            gpus: None,
            seccomp: None,
        };
        let plain = jail.wrap(&base, Path::new("/x"), &[]).1.join(" ");
        assert!(!plain.contains("nvidia") && !plain.contains("/sys") && !plain.contains("--dev-bind"), "{plain}");

        let grant = gpu_grant();
        let argv = jail.wrap(&Grants { gpus: Some(&grant), ..base }, Path::new("/x"), &[]).1;
        let text = argv.join(" ");
        assert!(text.contains("--dev-bind /dev/nvidia1 /dev/nvidia1 --dev-bind /dev/nvidiactl /dev/nvidiactl"));
        assert!(text.contains(
            "--tmpfs /proc/driver/nvidia --dir /proc/driver/nvidia/gpus \
             --ro-bind /proc/driver/nvidia/version /proc/driver/nvidia/version \
             --ro-bind /data/run/nvidia-params /proc/driver/nvidia/params \
             --ro-bind /proc/driver/nvidia/gpus/0000:28:00.0 /proc/driver/nvidia/gpus/0000:28:00.0"
        ));
        assert!(text.contains(
            "--perms 0755 --dir /sys --perms 0755 --dir /sys/devices --ro-bind /sys/devices/system /sys/devices/system \
             --perms 0755 --dir /sys/bus --perms 0755 --dir /sys/bus/pci --ro-bind /sys/bus/pci/devices"
        ));
        assert!(text.contains("--setenv LD_LIBRARY_PATH /opt/nvidia/lib64"));
        // Mounted over what they narrow: after the minimal /dev and the PID namespace's /proc.
        let at = |arg: &str| argv.iter().position(|a| a == arg).unwrap();
        assert!(at("/dev") < at("/dev/nvidia1") && at("/proc") < at("/proc/driver/nvidia"));
    }

    /// bubblewrap takes a GPU grant's arguments and the process sees what they grant (as root, where bubblewrap is
    /// installed; this host's `/dev/loop-control` standing in for a GPU's node).
    #[test]
    fn bubblewrap_applies_a_gpu_grant() {
        let (Some(jail), true) = (Jail::from_path(), unsafe { libc::geteuid() } == 0) else {
            eprintln!("skipped: needs root and bubblewrap");
            return;
        };
        let device = Path::new("/dev/loop-control");
        let library = tempfile::tempdir().unwrap();
        if !device.exists() || !Path::new("/sys/devices/system").is_dir() {
            eprintln!("skipped: no {} here", device.display());
            return;
        }
        let grant = GpuGrant {
            devices: vec![device.to_path_buf()],
            driver_proc: Vec::new(),
            read_only: vec!["/sys/devices/system".into(), library.path().to_path_buf()],
            library_path: Some(library.path().to_path_buf()),
            char_devices: Vec::new(),
        };
        let grants = Grants {
            read_only: &[],
            writable: &[],
            binds: &[],
            uid: 65534,
            gid: 65534,
            hostname: "worker-test",
            network: JailNetwork::Loopback,
            resolv_conf: None,
            hosts: None,
            gpus: Some(&grant),
            seccomp: None,
        };
        let script = format!(
            "test -c {dev} && test -d /sys/devices/system/cpu && test ! -e /sys/class && \
             test -d \"$LD_LIBRARY_PATH\" && test ! -e /dev/kvm && echo granted",
            dev = device.display()
        );
        let (program, argv) = jail.wrap(&grants, Path::new("/bin/sh"), &["-c", &script]);
        let output = std::process::Command::new(program).args(argv).output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            "granted",
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// bubblewrap loads the filter from the descriptor the child inherits: in the jail a subvolume ioctl fails with
    /// EPERM (without the filter, /tmp's tmpfs answers ENOTTY), another ioctl (TCGETS) as it would (as root, where
    /// bubblewrap and the system's python3 are installed).
    #[test]
    fn bubblewrap_loads_the_seccomp_filter() {
        let python = Path::new("/usr/bin/python3");
        let (Some(jail), true, true) = (Jail::from_path(), unsafe { libc::geteuid() } == 0, python.is_file()) else {
            eprintln!("skipped: needs root, bubblewrap and /usr/bin/python3");
            return;
        };
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let script = "import errno, fcntl, os\n\
                      fd = os.open('/tmp', os.O_RDONLY)\n\
                      for cmd in (0x5000940E, 0x5401):\n\
                      \x20   try:\n\
                      \x20       fcntl.ioctl(fd, cmd, bytearray(4096))\n\
                      \x20   except OSError as e:\n\
                      \x20       print(errno.errorcode[e.errno])";
        let run = |seccomp: Option<&std::os::fd::OwnedFd>| {
            let fd = seccomp.map(|f| f.as_raw_fd());
            let grants = Grants {
                read_only: &[],
                writable: &[],
                binds: &[],
                uid: 65534,
                gid: 65534,
                hostname: "worker-test",
                network: JailNetwork::Loopback,
                resolv_conf: None,
                hosts: None,
                gpus: None,
                seccomp: fd,
            };
            let (program, argv) = jail.wrap(&grants, python, &["-c", script]);
            let setup = crate::ProcessSetup::new(None, None).inheriting(fd);
            let mut command = std::process::Command::new(program);
            command.args(argv);
            // SAFETY: `apply` only makes async-signal-safe system calls on descriptors that outlive the spawn.
            unsafe { command.pre_exec(move || setup.apply()) };
            let output = command.output().unwrap();
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
            String::from_utf8_lossy(&output.stdout).split_whitespace().collect::<Vec<_>>().join(" ")
        };
        let filter = crate::seccomp_filter_fd().unwrap();
        assert_eq!(run(Some(&filter)), "EPERM ENOTTY");
        assert_eq!(run(None), "ENOTTY ENOTTY");
    }
}
